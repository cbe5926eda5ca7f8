/*
 * torch_ckpt.c: PyTorch checkpoints (torch.save's zip format) read without running them.
 *
 * Two layers, each checked as strictly as safetensors.c checks its header. The zip
 * archive: zip.c checks its whole directory (zip.h); every entry must sit under the
 * folder of the first, as torch's reader requires; only stored (uncompressed) entries are
 * read, as torch writes them, so the weights are used in place, in the mapping, as
 * safetensors' are. data.pkl's CRC is checked; the storages' are not (that would read
 * every page of the weights twice; safetensors has no checksum at all).
 *
 * The pickle (data.pkl). What torch 2.15 writes for {name: tensor}, by pickletools:
 *
 *   GLOBAL 'collections OrderedDict', EMPTY_TUPLE, REDUCE      (EMPTY_DICT for a dict)
 *   MARK, and for each tensor:
 *     BINUNICODE name, GLOBAL 'torch._utils _rebuild_tensor_v2', MARK,
 *       MARK 'storage' GLOBAL 'torch FloatStorage' '<key>' 'cpu' numel TUPLE, BINPERSID,
 *       storage_offset, size tuple, stride tuple, NEWFALSE (requires_grad),
 *       GLOBAL 'collections OrderedDict' EMPTY_TUPLE REDUCE (backward hooks), TUPLE, REDUCE
 *   SETITEMS, then BUILD {'_metadata': ...} (module versions: ignored), STOP
 *
 * with BINPUT / BINGET memoising values. A small machine runs those opcodes (and the
 * protocol 4 spellings of the same: FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL) over
 * values of a few kinds (none, bool, integer, string, tuple, dict, one of the allowed
 * globals, storage, tensor); "calling" a global only builds one of those values. Any
 * other opcode or global is an error that names it; nothing is imported or executed.
 * A storage seen twice (tied weights, views) is one storage; a tensor must be a
 * contiguous view inside its storage, and its storage's entry must hold exactly the
 * numel the persistent id declares.
 */
#include "torch_ckpt.h"
#include "utf8.h"
#include "zip.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* a state dict's pickle takes about 150 bytes a tensor: 16 MB is 100,000 tensors */
#define TC_MAX_PICKLE (16 << 20)

/* Pickle opcodes the machine runs (Python's Lib/pickle.py names). */
enum
{
	OP_MARK = '(', OP_STOP = '.', OP_BININT = 'J', OP_BININT1 = 'K', OP_BININT2 = 'M',
	OP_NONE = 'N', OP_BINPERSID = 'Q', OP_REDUCE = 'R', OP_BINUNICODE = 'X',
	OP_BUILD = 'b', OP_GLOBAL = 'c', OP_BINGET = 'h',
	OP_LONG_BINGET = 'j', OP_BINPUT = 'q', OP_LONG_BINPUT = 'r', OP_SETITEM = 's',
	OP_TUPLE = 't', OP_SETITEMS = 'u', OP_EMPTY_DICT = '}', OP_EMPTY_TUPLE = ')',
	OP_PROTO = 0x80, OP_TUPLE1 = 0x85, OP_TUPLE2 = 0x86, OP_TUPLE3 = 0x87,
	OP_NEWTRUE = 0x88, OP_NEWFALSE = 0x89, OP_LONG1 = 0x8a, OP_SHORT_BINUNICODE = 0x8c,
	OP_BINUNICODE8 = 0x8d, OP_STACK_GLOBAL = 0x93, OP_MEMOIZE = 0x94, OP_FRAME = 0x95
};

typedef enum pk_kind
{
	PK_NONE, PK_BOOL, PK_INT, PK_STR, PK_TUPLE, PK_DICT, PK_GLOBAL, PK_STORAGE, PK_TENSOR
} pk_kind;

static const char *const kind_names[] = {
	"None", "a bool", "an integer", "a string", "a tuple", "a dict", "a global",
	"a storage", "a tensor"
};

/* The globals the machine knows; calling one builds a value, never runs anything. */
typedef enum pk_global
{
	G_ORDERED_DICT, G_REBUILD_TENSOR, G_STORAGE
} pk_global;

/*
 * The storage types of torch.save's persistent ids. Beyond float32, float16 and
 * bfloat16, old checkpoints carry bool masks (GPT-J's attn.bias) and may carry integer
 * buffers: plain numbers all, loaded as data and left alone by the model.
 */
static const struct
{
	const char *module;
	const char *name;
	pk_global	global;
	st_dtype	dtype;
}			allowed[] = {
	{"collections", "OrderedDict", G_ORDERED_DICT, 0},
	{"torch._utils", "_rebuild_tensor_v2", G_REBUILD_TENSOR, 0},
	{"torch", "FloatStorage", G_STORAGE, ST_F32},
	{"torch", "HalfStorage", G_STORAGE, ST_F16},
	{"torch", "BFloat16Storage", G_STORAGE, ST_BF16},
	{"torch", "BoolStorage", G_STORAGE, ST_BOOL},
	{"torch", "DoubleStorage", G_STORAGE, ST_F64},
	{"torch", "LongStorage", G_STORAGE, ST_I64},
	{"torch", "IntStorage", G_STORAGE, ST_I32},
	{"torch", "ShortStorage", G_STORAGE, ST_I16},
	{"torch", "CharStorage", G_STORAGE, ST_I8},
	{"torch", "ByteStorage", G_STORAGE, ST_U8},
};

/*
 * A value: BOOL, INT: a; STR: a = offset in the pickle, b = length; TUPLE: a = first of
 * its b items in kids[]; DICT, STORAGE, TENSOR: a = index in dicts[], storages[],
 * tensors[]; GLOBAL: a = index in allowed[].
 */
typedef struct pk_value
{
	int64_t		a;
	uint32_t	b;
	uint8_t		kind;
} pk_value;

/* A dict's items are chained in insertion order. */
typedef struct pk_dict
{
	int32_t		first;			/* item, or -1 */
	int32_t		last;
	int32_t		count;
} pk_dict;

typedef struct pk_item
{
	int32_t		key;			/* values */
	int32_t		value;
	int32_t		next;			/* item, or -1 */
} pk_item;

/* A storage: one archive entry read as an array of numel elements of dtype. */
typedef struct pk_storage
{
	const zip_entry *entry;
	st_dtype	dtype;
	int64_t		numel;
} pk_storage;

/* A tensor: a contiguous view of a storage. */
typedef struct pk_tensor
{
	int32_t		storage;
	int			ndim;
	int64_t		offset;			/* in elements */
	int64_t		shape[ST_MAX_DIMS];
	int64_t		numel;
} pk_tensor;

/* The machine: the pickle, the archive it names storages in, and its arrays. */
typedef struct pk_machine
{
	const uint8_t *p;			/* data.pkl */
	size_t		len;
	size_t		op;				/* offset of the opcode running, for messages */
	const uint8_t *buf;			/* the archive */
	zip_dir    *zip;
	const char *fname;
	dl_error   *err;

	pk_value   *v;
	int32_t		nv,
				capv;
	int32_t    *stack;
	int32_t		nstack,
				capstack;
	int32_t    *marks;			/* stack heights at each MARK */
	int32_t		nmarks,
				capmarks;
	int32_t    *memo;			/* value, or -1 */
	int32_t		nmemo,
				capmemo,
				memo_count;		/* entries set, as len(memo) */
	int32_t    *kids;
	int32_t		nkids,
				capkids;
	pk_dict    *dicts;
	int32_t		ndicts,
				capdicts;
	pk_item    *items;
	int32_t		nitems,
				capitems;
	pk_storage *storages;
	int32_t		nstorages,
				capstorages;
	int32_t    *entry_storage;	/* per archive entry: its storage, or -1 */
	const uint8_t *folder;		/* "<folder>/", which every entry's name starts with */
	size_t		folder_len;
	char	   *name;			/* tc_find's buffer */
	size_t		name_cap;
	pk_tensor  *tensors;
	int32_t		ntensors,
				captensors;
} pk_machine;

/* Fail with a message that names the file and where in data.pkl the machine stands. */
static dl_status
pk_fail(pk_machine *m, dl_status code, const char *fmt,...)
	__attribute__((format(printf, 3, 4)));

static dl_status
pk_fail(pk_machine *m, dl_status code, const char *fmt,...)
{
	char		what[DL_ERRMSG_LEN];
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	return dl_fail(m->err, code, "%s: data.pkl, byte %zu: %s", m->fname, m->op, what);
}

/* Room for one more element in *arr (n used of *cap, each sz bytes); false when out of memory. */
static bool
grow(void **arr, int32_t n, int32_t *cap, size_t sz)
{
	void	   *g;
	int32_t		c;

	if (n < *cap)
		return true;
	if (*cap >= INT32_MAX / 2)
		return false;
	c = *cap ? 2 * *cap : 64;
	g = realloc(*arr, (size_t) c * sz);
	if (g == NULL)
		return false;
	*arr = g;
	*cap = c;
	return true;
}

#define PK_GROW(m, arr, n, cap) \
	(grow((void **) &(m)->arr, (m)->n, &(m)->cap, sizeof(*(m)->arr)) ? DL_OK : \
	 dl_fail((m)->err, DL_ENOMEM, "out of memory reading %s", (m)->fname))

/*
 * The entry "<folder>/" rel key (key: len bytes, may be NULL) of the archive, built in
 * m->name after the folder tc_folder put there; NULL if there is none.
 */
static const zip_entry *
tc_find(pk_machine *m, const char *rel, const uint8_t *key, size_t len)
{
	size_t		rlen = strlen(rel),
				need;

	if (__builtin_add_overflow(m->folder_len + rlen, len, &need))
		return NULL;
	if (need > m->name_cap)
	{
		char	   *g = realloc(m->name, need);

		if (g == NULL)
			return NULL;
		m->name = g;
		m->name_cap = need;
	}
	memcpy(m->name + m->folder_len, rel, rlen);
	if (len > 0)
		memcpy(m->name + m->folder_len + rlen, key, len);
	return zip_find(m->zip, m->name, need);
}

/* Make a new value and push it. */
static dl_status
pk_push_new(pk_machine *m, pk_kind kind, int64_t a, uint32_t b)
{
	dl_status	st = PK_GROW(m, v, nv, capv);

	if (st == DL_OK)
		st = PK_GROW(m, stack, nstack, capstack);
	if (st != DL_OK)
		return st;
	m->v[m->nv] = (pk_value) {.a = a, .b = b, .kind = (uint8_t) kind};
	m->stack[m->nstack++] = m->nv++;
	return DL_OK;
}

/* Pop the top value into *out. */
static dl_status
pk_pop(pk_machine *m, int32_t *out)
{
	if (m->nstack == 0 || (m->nmarks > 0 && m->nstack == m->marks[m->nmarks - 1]))
		return pk_fail(m, DL_EFORMAT, "the stack is empty");
	*out = m->stack[--m->nstack];
	return DL_OK;
}

/* Pop the values above the last MARK and the mark: they start at stack[*from]. */
static dl_status
pk_pop_mark(pk_machine *m, int32_t *from)
{
	if (m->nmarks == 0)
		return pk_fail(m, DL_EFORMAT, "no MARK to pop to");
	*from = m->marks[--m->nmarks];
	return DL_OK;
}

/* Push a tuple of the n values at stack[from...], which are popped. */
static dl_status
pk_push_tuple(pk_machine *m, int32_t from, int32_t n)
{
	int32_t		first = m->nkids;

	for (int32_t i = 0; i < n; i++)
	{
		dl_status	st = PK_GROW(m, kids, nkids, capkids);

		if (st != DL_OK)
			return st;
		m->kids[m->nkids++] = m->stack[from + i];
	}
	m->nstack = from;
	return pk_push_new(m, PK_TUPLE, first, n);
}

/* Push a new empty dict. */
static dl_status
pk_push_dict(pk_machine *m)
{
	dl_status	st = PK_GROW(m, dicts, ndicts, capdicts);

	if (st != DL_OK)
		return st;
	m->dicts[m->ndicts] = (pk_dict) {-1, -1, 0};
	return pk_push_new(m, PK_DICT, m->ndicts++, 0);
}

/* d[key] = value, for a dict d (a value); keys are strings, as in every dict of a state dict. */
static dl_status
pk_setitem(pk_machine *m, int32_t d, int32_t key, int32_t value)
{
	pk_dict    *dict;
	dl_status	st;

	if (m->v[d].kind != PK_DICT)
		return pk_fail(m, DL_EFORMAT, "SETITEM on %s, not a dict", kind_names[m->v[d].kind]);
	if (m->v[key].kind != PK_STR)
		return pk_fail(m, DL_EUNSUPPORTED, "a dict key is %s, not a string", kind_names[m->v[key].kind]);
	if ((st = PK_GROW(m, items, nitems, capitems)) != DL_OK)
		return st;
	dict = &m->dicts[m->v[d].a];
	m->items[m->nitems] = (pk_item) {key, value, -1};
	if (dict->last >= 0)
		m->items[dict->last].next = m->nitems;
	else
		dict->first = m->nitems;
	dict->last = m->nitems++;
	dict->count++;
	return DL_OK;
}

/* The bytes of string value i. */
static const uint8_t *
pk_str(const pk_machine *m, int32_t i)
{
	return m->p + m->v[i].a;
}

/* Whether value i is the string s. */
static bool
pk_str_is(const pk_machine *m, int32_t i, const char *s)
{
	return m->v[i].kind == PK_STR && (size_t) m->v[i].b == strlen(s) &&
		memcmp(pk_str(m, i), s, m->v[i].b) == 0;
}

/* Push the global module.name if it is one the machine knows; any other is refused. */
static dl_status
pk_push_global(pk_machine *m, const uint8_t *module, size_t mlen, const uint8_t *name, size_t nlen)
{
	char		mod[128],
				nm[128];

	for (size_t i = 0; i < sizeof(allowed) / sizeof(allowed[0]); i++)
		if (mlen == strlen(allowed[i].module) && memcmp(module, allowed[i].module, mlen) == 0 &&
			nlen == strlen(allowed[i].name) && memcmp(name, allowed[i].name, nlen) == 0)
			return pk_push_new(m, PK_GLOBAL, (int64_t) i, 0);
	pk_fail(m, DL_EUNSUPPORTED, "the pickle refers to the global %s.%s, which is not one a state dict of tensors needs; dolly never runs code from a checkpoint",
			dl_shown(mod, sizeof(mod), module, mlen), dl_shown(nm, sizeof(nm), name, nlen));
	return dl_hint(m->err, "A pytorch_model.bin that transformers or torch.save(model.state_dict()) wrote refers only to collections.OrderedDict, torch._utils._rebuild_tensor_v2 and torch storage types; do not load this file with torch either unless you trust where it came from.");
}

/* BINPUT and friends: memo[idx] = the top of the stack. */
static dl_status
pk_memo_put(pk_machine *m, uint64_t idx)
{
	if (m->nstack == 0)
		return pk_fail(m, DL_EFORMAT, "memoising from an empty stack");
	/* picklers number memo entries from 0 up, one per value: idx never reaches the length */
	if (idx >= m->len)
		return pk_fail(m, DL_EFORMAT, "memo index %llu is out of range", (unsigned long long) idx);
	while ((int64_t) m->nmemo <= (int64_t) idx)
	{
		dl_status	st = PK_GROW(m, memo, nmemo, capmemo);

		if (st != DL_OK)
			return st;
		m->memo[m->nmemo++] = -1;
	}
	if (m->memo[idx] < 0)
		m->memo_count++;
	m->memo[idx] = m->stack[m->nstack - 1];
	return DL_OK;
}

/* BINGET and friends: push memo[idx]. */
static dl_status
pk_memo_get(pk_machine *m, uint64_t idx)
{
	dl_status	st;

	if (idx >= (uint64_t) m->nmemo || m->memo[idx] < 0)
		return pk_fail(m, DL_EFORMAT, "memo entry %llu was never set", (unsigned long long) idx);
	if ((st = PK_GROW(m, stack, nstack, capstack)) != DL_OK)
		return st;
	m->stack[m->nstack++] = m->memo[idx];
	return DL_OK;
}

/*
 * BINPERSID: the persistent id ('storage', <storage type>, key, location, numel) names
 * the entry data/<key>, which must be stored and hold exactly numel elements. A key seen
 * again is the same storage, and must be declared alike.
 */
static dl_status
pk_persistent_load(pk_machine *m, int32_t pid)
{
	const int32_t *f;
	const zip_entry *e;
	st_dtype	dtype;
	int64_t		numel,
				bytes;
	int32_t		s;
	size_t		idx;
	char		key[128];
	dl_status	st;

	if (m->v[pid].kind != PK_TUPLE || m->v[pid].b != 5)
		return pk_fail(m, DL_EUNSUPPORTED, "a persistent id that is not ('storage', storage type, key, location, size)");
	f = m->kids + m->v[pid].a;
	if (!pk_str_is(m, f[0], "storage") ||
		m->v[f[1]].kind != PK_GLOBAL || allowed[m->v[f[1]].a].global != G_STORAGE ||
		m->v[f[2]].kind != PK_STR || m->v[f[3]].kind != PK_STR || m->v[f[4]].kind != PK_INT ||
		m->v[f[4]].a < 0)
		return pk_fail(m, DL_EUNSUPPORTED, "a persistent id that is not ('storage', storage type, key, location, size)");
	dtype = allowed[m->v[f[1]].a].dtype;
	numel = m->v[f[4]].a;
	dl_shown(key, sizeof(key), pk_str(m, f[2]), m->v[f[2]].b);
	e = tc_find(m, "data/", pk_str(m, f[2]), m->v[f[2]].b);
	if (e == NULL)
		return pk_fail(m, DL_EFORMAT, "storage \"%s\" has no entry data/%s in the archive", key, key);
	idx = (size_t) (e - m->zip->e);
	if ((s = m->entry_storage[idx]) >= 0)
	{
		if (m->storages[s].dtype != dtype || m->storages[s].numel != numel)
			return pk_fail(m, DL_EFORMAT, "storage \"%s\" is declared twice, differently (%lld %s, then %lld %s)",
							key, (long long) m->storages[s].numel, st_dtype_name(m->storages[s].dtype),
							(long long) numel, st_dtype_name(dtype));
		return pk_push_new(m, PK_STORAGE, s, 0);
	}
	if ((st = zip_check_stored(e, m->fname, m->err)) != DL_OK)
		return st;
	if (__builtin_mul_overflow(numel, (int64_t) st_dtype_size(dtype), &bytes) || (uint64_t) bytes != e->size)
		return pk_fail(m, DL_EFORMAT, "storage \"%s\" holds %llu bytes, but %lld %s elements need %lld",
						key, (unsigned long long) e->size, (long long) numel, st_dtype_name(dtype),
						bytes < 0 ? -1LL : (long long) bytes);
	if ((st = PK_GROW(m, storages, nstorages, capstorages)) != DL_OK)
		return st;
	m->storages[m->nstorages] = (pk_storage) {e, dtype, numel};
	m->entry_storage[idx] = m->nstorages;
	return pk_push_new(m, PK_STORAGE, m->nstorages++, 0);
}

/* Whether value i is a tuple of at most ST_MAX_DIMS integers (non-negative ones if sizes). */
static bool
pk_dims(const pk_machine *m, int32_t i, bool sizes, int64_t *out, int *n)
{
	if (m->v[i].kind != PK_TUPLE || m->v[i].b > ST_MAX_DIMS)
		return false;
	*n = m->v[i].b;
	for (int d = 0; d < *n; d++)
	{
		const pk_value *x = &m->v[m->kids[m->v[i].a + d]];

		if (x->kind != PK_INT || (sizes && x->a < 0))
			return false;
		out[d] = x->a;
	}
	return true;
}

/*
 * torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
 * backward_hooks[, metadata]): a tensor, if it is a contiguous view inside the storage
 * and carries no hooks or metadata (which a state dict's tensors never do).
 */
static dl_status
pk_rebuild_tensor(pk_machine *m, int32_t args)
{
	const int32_t *a;
	int			nargs = m->v[args].b,
				nstride;
	pk_tensor	t = {0};
	int64_t		stride[ST_MAX_DIMS],
				numel = 1,
				want = 1,
				end;
	const pk_storage *s;
	dl_status	st;

	if (nargs != 6 && nargs != 7)
		return pk_fail(m, DL_EUNSUPPORTED, "_rebuild_tensor_v2 with %d arguments, not 6 or 7", nargs);
	a = m->kids + m->v[args].a;
	if (m->v[a[0]].kind != PK_STORAGE || m->v[a[1]].kind != PK_INT || m->v[a[1]].a < 0 ||
		!pk_dims(m, a[2], true, t.shape, &t.ndim) || !pk_dims(m, a[3], false, stride, &nstride) ||
		nstride != t.ndim || m->v[a[4]].kind != PK_BOOL)
		return pk_fail(m, DL_EFORMAT, "_rebuild_tensor_v2 needs a storage, an offset, sizes and strides (at most %d) and a bool",
					   ST_MAX_DIMS);
	if (m->v[a[5]].kind != PK_DICT || m->dicts[m->v[a[5]].a].count != 0 ||
		(nargs == 7 && (m->v[a[6]].kind != PK_DICT || m->dicts[m->v[a[6]].a].count != 0)))
		return pk_fail(m, DL_EUNSUPPORTED, "a tensor with backward hooks or metadata, which a state dict's tensors do not have");
	t.storage = (int32_t) m->v[a[0]].a;
	t.offset = m->v[a[1]].a;
	s = &m->storages[t.storage];
	for (int d = 0; d < t.ndim; d++)
		if (__builtin_mul_overflow(numel, t.shape[d], &numel))
			return pk_fail(m, DL_EFORMAT, "a tensor whose size overflows");
	/* contiguous: row-major strides, any stride where a dimension is 1 (torch's is_contiguous) */
	for (int d = t.ndim - 1; d >= 0 && numel > 0; d--)
	{
		if (t.shape[d] != 1 && stride[d] != want)
		{
			pk_fail(m, DL_EUNSUPPORTED, "a tensor that is not contiguous (dimension %d has stride %lld, not %lld)",
					d, (long long) stride[d], (long long) want);
			return dl_hint(m->err, "Save the state dict with contiguous tensors, as transformers does: {k: v.contiguous() for k, v in state_dict.items()}.");
		}
		want *= t.shape[d];
	}
	if (__builtin_add_overflow(t.offset, numel, &end) || end > s->numel)
		return pk_fail(m, DL_EFORMAT, "a tensor of %lld elements at offset %lld runs past its storage of %lld",
					   (long long) numel, (long long) t.offset, (long long) s->numel);
	t.numel = numel;
	if ((st = PK_GROW(m, tensors, ntensors, captensors)) != DL_OK)
		return st;
	m->tensors[m->ntensors] = t;
	return pk_push_new(m, PK_TENSOR, m->ntensors++, 0);
}

/* REDUCE: call a known global with a tuple of arguments. */
static dl_status
pk_reduce(pk_machine *m)
{
	int32_t		args = 0,
				fn = 0;
	dl_status	st;

	if ((st = pk_pop(m, &args)) != DL_OK || (st = pk_pop(m, &fn)) != DL_OK)
		return st;
	if (m->v[fn].kind != PK_GLOBAL || m->v[args].kind != PK_TUPLE)
		return pk_fail(m, DL_EFORMAT, "REDUCE of %s with %s", kind_names[m->v[fn].kind],
					   kind_names[m->v[args].kind]);
	switch (allowed[m->v[fn].a].global)
	{
		case G_ORDERED_DICT:
			if (m->v[args].b != 0)
				return pk_fail(m, DL_EUNSUPPORTED, "OrderedDict called with arguments");
			return pk_push_dict(m);
		case G_REBUILD_TENSOR:
			return pk_rebuild_tensor(m, args);
		case G_STORAGE:
			break;
	}
	return pk_fail(m, DL_EUNSUPPORTED, "a storage type called as a function");
}

/* Read the n-byte little-endian unsigned argument at *at, advancing it. */
static dl_status
pk_arg(pk_machine *m, size_t *at, int n, uint64_t *out)
{
	uint64_t	v = 0;

	if (m->len - *at < (size_t) n)
		return pk_fail(m, DL_EFORMAT, "data.pkl ends inside an opcode's argument");
	for (int i = n - 1; i >= 0; i--)
		v = (v << 8) | m->p[*at + i];
	*at += n;
	*out = v;
	return DL_OK;
}

/* Push the string of len bytes at *at, advancing it. */
static dl_status
pk_string(pk_machine *m, size_t *at, uint64_t len)
{
	size_t		from = *at;

	if (len > m->len - *at)
		return pk_fail(m, DL_EFORMAT, "a string of %llu bytes runs past the end of data.pkl",
					   (unsigned long long) len);
	*at += len;
	return pk_push_new(m, PK_STR, (int64_t) from, (uint32_t) len);
}

/* LONG1: a two's complement little-endian integer of n bytes (at most 8 here). */
static dl_status
pk_long1(pk_machine *m, size_t *at)
{
	uint64_t	n = 0,
				v = 0;
	dl_status	st;

	if ((st = pk_arg(m, at, 1, &n)) != DL_OK)
		return st;
	if (n > 8)
		return pk_fail(m, DL_EUNSUPPORTED, "an integer of %llu bytes", (unsigned long long) n);
	if (n == 0)
		return pk_push_new(m, PK_INT, 0, 0);
	if ((st = pk_arg(m, at, (int) n, &v)) != DL_OK)
		return st;
	if (n < 8 && (v >> (8 * n - 1)) & 1)
		v |= ~0ULL << (8 * n);	/* sign extension */
	return pk_push_new(m, PK_INT, (int64_t) v, 0);
}

/* GLOBAL: "module\nname\n" in the pickle. */
static dl_status
pk_global_op(pk_machine *m, size_t *at)
{
	const uint8_t *mod = m->p + *at,
			   *nl1 = memchr(mod, '\n', m->len - *at),
			   *name,
			   *nl2;

	if (nl1 == NULL)
		return pk_fail(m, DL_EFORMAT, "GLOBAL without its module line");
	name = nl1 + 1;
	nl2 = memchr(name, '\n', (size_t) (m->p + m->len - name));
	if (nl2 == NULL)
		return pk_fail(m, DL_EFORMAT, "GLOBAL without its name line");
	*at = (size_t) (nl2 + 1 - m->p);
	return pk_push_global(m, mod, (size_t) (nl1 - mod), name, (size_t) (nl2 - name));
}

/* Pop n values (the top last) into out. */
static dl_status
pk_pop_n(pk_machine *m, int n, int32_t *out)
{
	for (int i = n - 1; i >= 0; i--)
	{
		dl_status	st = pk_pop(m, &out[i]);

		if (st != DL_OK)
			return st;
	}
	return DL_OK;
}

/* Run one opcode at *at (advanced past it and its arguments); *stop when it was STOP. */
static dl_status
pk_step(pk_machine *m, size_t *at, bool *stop)
{
	uint8_t		op = m->p[*at];
	uint64_t	x = 0;
	int32_t		vals[3] = {0},
				from = 0;
	dl_status	st = DL_OK;

	m->op = (*at)++;
	switch (op)
	{
		case OP_PROTO:
			if ((st = pk_arg(m, at, 1, &x)) == DL_OK && (x < 2 || x > 5))
				st = pk_fail(m, DL_EUNSUPPORTED, "pickle protocol %llu; torch.save writes 2", (unsigned long long) x);
			return st;
		case OP_FRAME:
			/* protocol 4's frames only group opcodes for I/O */
			if ((st = pk_arg(m, at, 8, &x)) == DL_OK && x > m->len - *at)
				st = pk_fail(m, DL_EFORMAT, "a frame of %llu bytes runs past the end", (unsigned long long) x);
			return st;
		case OP_MARK:
			if ((st = PK_GROW(m, marks, nmarks, capmarks)) == DL_OK)
				m->marks[m->nmarks++] = m->nstack;
			return st;
		case OP_STOP:
			if (m->nmarks != 0 || m->nstack != 1)
				return pk_fail(m, DL_EFORMAT, "STOP with %d values and %d marks on the stack, not one value",
							   (int) m->nstack, (int) m->nmarks);
			if (*at != m->len)
				return pk_fail(m, DL_EFORMAT, "%zu bytes after STOP", m->len - *at);
			*stop = true;
			return DL_OK;
		case OP_GLOBAL:
			return pk_global_op(m, at);
		case OP_STACK_GLOBAL:
			if ((st = pk_pop_n(m, 2, vals)) != DL_OK)
				return st;
			if (m->v[vals[0]].kind != PK_STR || m->v[vals[1]].kind != PK_STR)
				return pk_fail(m, DL_EFORMAT, "STACK_GLOBAL of values that are not strings");
			return pk_push_global(m, pk_str(m, vals[0]), m->v[vals[0]].b, pk_str(m, vals[1]), m->v[vals[1]].b);
		case OP_BINPUT:
		case OP_LONG_BINPUT:
			if ((st = pk_arg(m, at, op == OP_BINPUT ? 1 : 4, &x)) != DL_OK)
				return st;
			return pk_memo_put(m, x);
		case OP_MEMOIZE:
			return pk_memo_put(m, (uint64_t) m->memo_count);
		case OP_BINGET:
		case OP_LONG_BINGET:
			if ((st = pk_arg(m, at, op == OP_BINGET ? 1 : 4, &x)) != DL_OK)
				return st;
			return pk_memo_get(m, x);
		case OP_EMPTY_DICT:
			return pk_push_dict(m);
		case OP_EMPTY_TUPLE:
			return pk_push_tuple(m, m->nstack, 0);
		case OP_TUPLE:
			if ((st = pk_pop_mark(m, &from)) != DL_OK)
				return st;
			return pk_push_tuple(m, from, m->nstack - from);
		case OP_TUPLE1:
		case OP_TUPLE2:
		case OP_TUPLE3:
			if ((st = pk_pop_n(m, op - OP_TUPLE1 + 1, vals)) != DL_OK)
				return st;
			m->nstack += op - OP_TUPLE1 + 1;	/* they are in place: make the tuple of them */
			return pk_push_tuple(m, m->nstack - (op - OP_TUPLE1 + 1), op - OP_TUPLE1 + 1);
		case OP_BININT:
			if ((st = pk_arg(m, at, 4, &x)) != DL_OK)
				return st;
			return pk_push_new(m, PK_INT, (int32_t) (uint32_t) x, 0);
		case OP_BININT1:
		case OP_BININT2:
			if ((st = pk_arg(m, at, op == OP_BININT1 ? 1 : 2, &x)) != DL_OK)
				return st;
			return pk_push_new(m, PK_INT, (int64_t) x, 0);
		case OP_LONG1:
			return pk_long1(m, at);
		case OP_NONE:
			return pk_push_new(m, PK_NONE, 0, 0);
		case OP_NEWTRUE:
		case OP_NEWFALSE:
			return pk_push_new(m, PK_BOOL, op == OP_NEWTRUE, 0);
		case OP_BINUNICODE:
		case OP_SHORT_BINUNICODE:
		case OP_BINUNICODE8:
			if ((st = pk_arg(m, at, op == OP_BINUNICODE ? 4 : op == OP_SHORT_BINUNICODE ? 1 : 8, &x)) != DL_OK)
				return st;
			return pk_string(m, at, x);
		case OP_BINPERSID:
			if ((st = pk_pop(m, &vals[0])) != DL_OK)
				return st;
			return pk_persistent_load(m, vals[0]);
		case OP_REDUCE:
			return pk_reduce(m);
		case OP_SETITEM:
			if ((st = pk_pop_n(m, 2, vals)) != DL_OK || (st = pk_pop(m, &vals[2])) != DL_OK)
				return st;
			m->nstack++;		/* the dict stays */
			return pk_setitem(m, vals[2], vals[0], vals[1]);
		case OP_SETITEMS:
			if ((st = pk_pop_mark(m, &from)) != DL_OK)
				return st;
			if ((m->nstack - from) % 2 != 0 || from == 0 ||
				(m->nmarks > 0 && from == m->marks[m->nmarks - 1]))
				return pk_fail(m, DL_EFORMAT, "SETITEMS without a dict or with an odd number of values");
			for (int32_t i = from; i < m->nstack && st == DL_OK; i += 2)
				st = pk_setitem(m, m->stack[from - 1], m->stack[i], m->stack[i + 1]);
			m->nstack = from;
			return st;
		case OP_BUILD:
			/* the only state a state dict has: OrderedDict's attributes ({'_metadata': ...}) */
			if ((st = pk_pop(m, &vals[0])) != DL_OK || (st = pk_pop(m, &vals[1])) != DL_OK)
				return st;
			m->nstack++;
			if (m->v[vals[1]].kind != PK_DICT || m->v[vals[0]].kind != PK_DICT)
				return pk_fail(m, DL_EUNSUPPORTED, "BUILD of %s with %s; only a dict's attributes are accepted",
							   kind_names[m->v[vals[1]].kind], kind_names[m->v[vals[0]].kind]);
			return DL_OK;
		default:
			if (op >= 0x20 && op < 0x7f)
				return pk_fail(m, DL_EUNSUPPORTED, "opcode '%c' (0x%02x) is not one a state dict needs", op, op);
			return pk_fail(m, DL_EUNSUPPORTED, "opcode 0x%02x is not one a state dict needs", op);
	}
}

/* Run the pickle to its STOP; *result: the value it returns. */
static dl_status
pk_run(pk_machine *m, int32_t *result)
{
	size_t		at = 0;
	bool		stop = false;

	while (at < m->len && !stop)
	{
		dl_status	st = pk_step(m, &at, &stop);

		if (st != DL_OK)
			return st;
	}
	if (!stop)
	{
		m->op = m->len;
		return pk_fail(m, DL_EFORMAT, "the pickle ends without STOP");
	}
	*result = m->stack[0];
	return DL_OK;
}

/* Free the machine's arrays. */
static void
pk_free(pk_machine *m)
{
	free(m->v);
	free(m->stack);
	free(m->marks);
	free(m->memo);
	free(m->kids);
	free(m->dicts);
	free(m->items);
	free(m->storages);
	free(m->entry_storage);
	free(m->tensors);
	free(m->name);
}

/* qsort: tensors by name. */
static int
tensor_by_name(const void *a, const void *b)
{
	return strcmp(((const st_tensor *) a)->name, ((const st_tensor *) b)->name);
}

/* The state dict (value d) as st_tensors sorted by name: string keys, tensor values. */
static dl_status
pk_state_dict(pk_machine *m, int32_t d, st_tensor **out, int *nout)
{
	const pk_dict *dict;
	st_tensor  *t;
	int			n = 0;

	if (m->v[d].kind != PK_DICT)
		return dl_fail(m->err, DL_EUNSUPPORTED, "%s: the checkpoint holds %s, not a state dict", m->fname,
					   kind_names[m->v[d].kind]);
	dict = &m->dicts[m->v[d].a];
	t = calloc(dict->count ? dict->count : 1, sizeof(*t));
	if (t == NULL)
		return dl_fail(m->err, DL_ENOMEM, "out of memory reading %s", m->fname);
	for (int32_t i = dict->first; i >= 0; i = m->items[i].next)
	{
		const pk_item *it = &m->items[i];
		const uint8_t *key = pk_str(m, it->key);
		size_t		klen = m->v[it->key].b;
		char		nm[128];
		const pk_tensor *pt;
		const pk_storage *s;

		dl_shown(nm, sizeof(nm), key, klen);
		if (utf8_invalid_at((const char *) key, klen) < klen || memchr(key, 0, klen) != NULL)
		{
			st_free_tensors(t, n);
			return dl_fail(m->err, DL_EFORMAT, "%s: the state dict has a name that is not UTF-8 text: \"%s\"",
						   m->fname, nm);
		}
		if (m->v[it->value].kind != PK_TENSOR)
		{
			st_free_tensors(t, n);
			dl_fail(m->err, DL_EUNSUPPORTED, "%s: \"%s\" in the checkpoint is %s, not a tensor", m->fname, nm,
					kind_names[m->v[it->value].kind]);
			return dl_hint(m->err, "dolly reads state dicts of tensors, as transformers saves them in pytorch_model.bin; a training checkpoint holding a model and an optimizer is not one.");
		}
		pt = &m->tensors[m->v[it->value].a];
		s = &m->storages[pt->storage];
		t[n].name = strndup((const char *) key, klen);
		if (t[n].name == NULL)
		{
			st_free_tensors(t, n);
			return dl_fail(m->err, DL_ENOMEM, "out of memory reading %s", m->fname);
		}
		t[n].dtype = s->dtype;
		t[n].ndim = pt->ndim;
		memcpy(t[n].shape, pt->shape, sizeof(t[n].shape));
		t[n].numel = pt->numel;
		t[n].nbytes = (size_t) pt->numel * st_dtype_size(s->dtype);
		t[n].data = m->buf + s->entry->data + (size_t) pt->offset * st_dtype_size(s->dtype);
		t[n].file = 0;
		n++;
	}
	qsort(t, n, sizeof(*t), tensor_by_name);
	for (int i = 1; i < n; i++)
		if (strcmp(t[i - 1].name, t[i].name) == 0)
		{
			dl_status	st = dl_fail(m->err, DL_EFORMAT, "%s: tensor \"%s\" appears twice in the state dict",
									 m->fname, t[i].name);

			st_free_tensors(t, n);
			return st;
		}
	*out = t;
	*nout = n;
	return DL_OK;
}

/* Why buf is not a zip archive: torch.save's format before torch 1.6 starts with a pickle. */
static dl_status
not_zip(const uint8_t *buf, size_t size, const char *fname, dl_error *err)
{
	/* pickle protocol 2, then LONG1 of the 10-byte magic number 0x1950a86a20f9469cfc6c */
	static const uint8_t legacy[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20,
	0x6a, 0xa8, 0x50, 0x19};

	if (size < sizeof(legacy) || memcmp(buf, legacy, sizeof(legacy)) != 0)
		return err->code;
	dl_fail(err, DL_EUNSUPPORTED, "%s: a PyTorch checkpoint in the format of torch before 1.6, which dolly does not read",
			fname);
	return dl_hint(err, "Save it again with torch.save from torch 1.6 or later, or with transformers' save_pretrained.");
}

/* torch's reader takes the folder of the first entry as the archive's; every entry must be in it. */
static dl_status
tc_folder(pk_machine *m)
{
	const zip_entry *first = &m->zip->e[0];
	const uint8_t *slash = memchr(first->name, '/', first->name_len);
	char		nm[128],
				folder[128];

	if (slash == NULL || slash == first->name)
		return dl_fail(m->err, DL_EFORMAT, "%s: zip entry \"%s\" is not in a folder, as torch.save puts every entry",
					   m->fname, dl_shown(nm, sizeof(nm), first->name, first->name_len));
	m->folder = first->name;
	m->folder_len = (size_t) (slash - first->name) + 1;
	m->name = malloc(m->folder_len);
	if (m->name == NULL)
		return dl_fail(m->err, DL_ENOMEM, "out of memory reading %s", m->fname);
	memcpy(m->name, m->folder, m->folder_len);
	m->name_cap = m->folder_len;
	for (size_t i = 0; i < m->zip->n; i++)
	{
		const zip_entry *e = &m->zip->e[i];

		if (e->name_len <= m->folder_len || memcmp(e->name, m->folder, m->folder_len) != 0)
			return dl_fail(m->err, DL_EFORMAT, "%s: zip entry \"%s\" is not in the archive's folder \"%s\"",
						   m->fname, dl_shown(nm, sizeof(nm), e->name, e->name_len),
						   dl_shown(folder, sizeof(folder), m->folder, m->folder_len));
	}
	return DL_OK;
}

/*
 * data.pkl, once the archive is checked: stored, within the size limit, matching its
 * CRC. A byteorder entry, which newer torch writes, must say little-endian (without it
 * torch reads the host's order).
 */
static dl_status
tc_pickle(pk_machine *m)
{
	const zip_entry *order = tc_find(m, "byteorder", NULL, 0),
			   *pkl = tc_find(m, "data.pkl", NULL, 0);
	dl_status	st;

	if (order && (st = zip_check_stored(order, m->fname, m->err)) != DL_OK)
		return st;
	if (order && (order->size != 6 || memcmp(m->buf + order->data, "little", 6) != 0))
		return dl_fail(m->err, DL_EUNSUPPORTED, "%s: the checkpoint was written on a big-endian machine",
					   m->fname);
	if (pkl == NULL)
		return dl_fail(m->err, DL_EFORMAT, "%s: the archive has no data.pkl, so it was not written by torch.save",
					   m->fname);
	if ((st = zip_check_stored(pkl, m->fname, m->err)) != DL_OK)
		return st;
	if (pkl->size > TC_MAX_PICKLE)
		return dl_fail(m->err, DL_EFORMAT, "%s: data.pkl is %llu bytes, over the limit of %d for a state dict",
					   m->fname, (unsigned long long) pkl->size, TC_MAX_PICKLE);
#ifndef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION	/* the fuzzer cannot forge CRCs */
	/* torch.serialization.set_crc32_options(False) writes 0 */
	if (pkl->crc != 0 && zip_crc32(m->buf + pkl->data, pkl->size) != pkl->crc)
		return dl_fail(m->err, DL_EFORMAT, "%s: data.pkl does not match its CRC-32", m->fname);
#endif
	m->p = m->buf + pkl->data;
	m->len = pkl->size;
	m->entry_storage = malloc(m->zip->n * sizeof(*m->entry_storage));
	if (m->entry_storage == NULL)
		return dl_fail(m->err, DL_ENOMEM, "out of memory reading %s", m->fname);
	for (size_t i = 0; i < m->zip->n; i++)
		m->entry_storage[i] = -1;
	return DL_OK;
}

/* Parse and validate a checkpoint image (see torch_ckpt.h). */
dl_status
torch_ckpt_parse(const uint8_t *buf, size_t size, const char *fname, st_tensor **tensors, int *n,
				 dl_error *err)
{
	zip_dir		z = {0};
	pk_machine	m = {.buf = buf, .zip = &z, .fname = fname, .err = err};
	int32_t		result = 0;
	dl_status	st;

	st = zip_read(buf, size, fname, &z, err);
	if (st == DL_EFORMAT && z.n == 0)
		st = not_zip(buf, size, fname, err);
	if (st == DL_OK)
		st = tc_folder(&m);
	if (st == DL_OK)
		st = tc_pickle(&m);
	if (st == DL_OK)
		st = pk_run(&m, &result);
	if (st == DL_OK)
		st = pk_state_dict(&m, result, tensors, n);
	pk_free(&m);
	zip_free(&z);
	return st;
}
