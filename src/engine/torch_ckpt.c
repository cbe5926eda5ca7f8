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
 * The pickle (data.pkl) is run by torch_pickle.c's machine; this file gives its values
 * their meaning: the globals a state dict needs (any other is an error that names it),
 * storages named by persistent ids, tensors rebuilt as views of them, and the resulting
 * dict as st_tensors. A storage seen twice (tied weights, views) is one storage; a tensor
 * must be a contiguous view inside its storage, and its storage's entry must hold exactly
 * the numel the persistent id declares.
 */
#include "torch_ckpt.h"
#include "torch_ckpt_int.h"
#include "utf8.h"

#include <stdlib.h>

/* a state dict's pickle takes about 150 bytes a tensor: 16 MB is 100,000 tensors */
#define TC_MAX_PICKLE (16 << 20)

/* The globals the machine knows; calling one builds a value, never runs anything. */
typedef enum tc_global
{
	G_ORDERED_DICT, G_REBUILD_TENSOR, G_STORAGE
} tc_global;

/*
 * The storage types of torch.save's persistent ids. Beyond float32, float16 and
 * bfloat16, old checkpoints carry bool masks (GPT-J's attn.bias) and may carry integer
 * buffers: plain numbers all, loaded as data and left alone by the model.
 */
static const struct
{
	const char *module;
	const char *name;
	tc_global	global;
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

dl_status
tc_push_global(pk_machine *m, const uint8_t *module, size_t mlen, const uint8_t *name, size_t nlen)
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

dl_status
tc_persistent_load(pk_machine *m, int32_t pid)
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
tc_dims(const pk_machine *m, int32_t i, bool sizes, int64_t *out, int *n)
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
tc_rebuild_tensor(pk_machine *m, int32_t args)
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
		!tc_dims(m, a[2], true, t.shape, &t.ndim) || !tc_dims(m, a[3], false, stride, &nstride) ||
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

dl_status
tc_reduce(pk_machine *m)
{
	int32_t		args = 0,
				fn = 0;
	dl_status	st;

	if ((st = pk_pop(m, &args)) != DL_OK || (st = pk_pop(m, &fn)) != DL_OK)
		return st;
	if (m->v[fn].kind != PK_GLOBAL || m->v[args].kind != PK_TUPLE)
		return pk_fail(m, DL_EFORMAT, "REDUCE of %s with %s", pk_kind_names[m->v[fn].kind],
					   pk_kind_names[m->v[args].kind]);
	switch (allowed[m->v[fn].a].global)
	{
		case G_ORDERED_DICT:
			if (m->v[args].b != 0)
				return pk_fail(m, DL_EUNSUPPORTED, "OrderedDict called with arguments");
			return pk_push_dict(m);
		case G_REBUILD_TENSOR:
			return tc_rebuild_tensor(m, args);
		case G_STORAGE:
			break;
	}
	return pk_fail(m, DL_EUNSUPPORTED, "a storage type called as a function");
}

/* The state dict (value d) as st_tensors sorted by name: string keys, tensor values. */
static dl_status
tc_state_dict(pk_machine *m, int32_t d, st_tensor **out, int *nout)
{
	const pk_dict *dict;
	st_tensor  *t;
	int			n = 0,
				dup;

	if (m->v[d].kind != PK_DICT)
		return dl_fail(m->err, DL_EUNSUPPORTED, "%s: the checkpoint holds %s, not a state dict", m->fname,
					   pk_kind_names[m->v[d].kind]);
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
					pk_kind_names[m->v[it->value].kind]);
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
	if ((dup = st_sort_by_name(t, n)) > 0)
	{
		dl_status	st = dl_fail(m->err, DL_EFORMAT, "%s: tensor \"%s\" appears twice in the state dict",
								 m->fname, t[dup].name);

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
		st = tc_state_dict(&m, result, tensors, n);
	pk_free(&m);
	zip_free(&z);
	return st;
}
