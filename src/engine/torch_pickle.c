/*
 * torch_pickle.c: the restricted pickle machine that reads a checkpoint's data.pkl.
 *
 * What torch 2.15 writes for {name: tensor}, by pickletools:
 *
 *   GLOBAL 'collections OrderedDict', EMPTY_TUPLE, REDUCE      (EMPTY_DICT for a dict)
 *   MARK, and for each tensor:
 *     BINUNICODE name, GLOBAL 'torch._utils _rebuild_tensor_v2', MARK,
 *       MARK 'storage' GLOBAL 'torch FloatStorage' '<key>' 'cpu' numel TUPLE, BINPERSID,
 *       storage_offset, size tuple, stride tuple, NEWFALSE (requires_grad),
 *       GLOBAL 'collections OrderedDict' EMPTY_TUPLE REDUCE (backward hooks), TUPLE, REDUCE
 *   SETITEMS, then BUILD {'_metadata': ...} (module versions: ignored), STOP
 *
 * with BINPUT / BINGET memoising values. This machine runs those opcodes (and the
 * protocol 4 spellings of the same: FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL) over
 * values of a few kinds (none, bool, integer, string, tuple, dict, one of the allowed
 * globals, storage, tensor); "calling" a global only builds one of those values, which
 * torch_ckpt.c does (torch_ckpt_int.h). Any other opcode is an error that names it;
 * nothing is imported or executed.
 */
#include "torch_ckpt_int.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

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

const char *const pk_kind_names[] = {
	"None", "a bool", "an integer", "a string", "a tuple", "a dict", "a global",
	"a storage", "a tensor"
};

dl_status
pk_fail(pk_machine *m, dl_status code, const char *fmt,...)
{
	char		what[DL_ERRMSG_LEN];
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	return dl_fail(m->err, code, "%s: data.pkl, byte %zu: %s", m->fname, m->op, what);
}

bool
pk_grow(void **arr, int32_t n, int32_t *cap, size_t sz)
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

dl_status
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

dl_status
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

dl_status
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
		return pk_fail(m, DL_EFORMAT, "SETITEM on %s, not a dict", pk_kind_names[m->v[d].kind]);
	if (m->v[key].kind != PK_STR)
		return pk_fail(m, DL_EUNSUPPORTED, "a dict key is %s, not a string", pk_kind_names[m->v[key].kind]);
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
	return tc_push_global(m, mod, (size_t) (nl1 - mod), name, (size_t) (nl2 - name));
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
			return tc_push_global(m, pk_str(m, vals[0]), m->v[vals[0]].b, pk_str(m, vals[1]), m->v[vals[1]].b);
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
			return tc_persistent_load(m, vals[0]);
		case OP_REDUCE:
			return tc_reduce(m);
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
							   pk_kind_names[m->v[vals[1]].kind], pk_kind_names[m->v[vals[0]].kind]);
			return DL_OK;
		default:
			if (op >= 0x20 && op < 0x7f)
				return pk_fail(m, DL_EUNSUPPORTED, "opcode '%c' (0x%02x) is not one a state dict needs", op, op);
			return pk_fail(m, DL_EUNSUPPORTED, "opcode 0x%02x is not one a state dict needs", op);
	}
}

dl_status
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

void
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
