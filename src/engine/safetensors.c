/*
 * safetensors.c: the safetensors format: a file image validated and its tensors listed
 * (st_parse), tensors converted to float32, files written (st_write).
 *
 * The header is parsed with json-c; a small scanner over the already-parsed text adds
 * what json-c does not give: duplicate keys (json-c keeps the last one silently) and the
 * strictness of the reference reader (no single quotes, NaN or raw control characters).
 * Tensors point into the image, which weights.c maps from a model directory; st_to_f32
 * converts on demand.
 */
#include "safetensors_int.h"
#include "bf16.h"
#include "files.h"
#include "utf8.h"

#include <limits.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian and is read in place: a little-endian host is required"
#endif

#define ST_MAX_HEADER 100000000		/* the reference reader's limit */

static const struct
{
	const char *name;
	size_t		size;
}			dtype_info[] = {
	[ST_BOOL] = {"BOOL", 1},
	[ST_U8] = {"U8", 1},
	[ST_I8] = {"I8", 1},
	[ST_I16] = {"I16", 2},
	[ST_U16] = {"U16", 2},
	[ST_F16] = {"F16", 2},
	[ST_BF16] = {"BF16", 2},
	[ST_I32] = {"I32", 4},
	[ST_U32] = {"U32", 4},
	[ST_F32] = {"F32", 4},
	[ST_F64] = {"F64", 8},
	[ST_I64] = {"I64", 8},
	[ST_U64] = {"U64", 8},
	[ST_F8_E4M3] = {"F8_E4M3", 1},
	[ST_F8_E5M2] = {"F8_E5M2", 1},
};

#define ST_NDTYPES ((int) (sizeof(dtype_info) / sizeof(dtype_info[0])))

/* A top-level member of the header as the scanner saw it in the text. */
typedef struct hdr_member
{
	size_t		key_off;		/* the key's string token, quotes included */
	size_t		key_len;
	int64_t		nested;			/* object members inside its value */
} hdr_member;

/* A header entry while st_parse validates it. */
typedef struct hdr_entry
{
	st_tensor	t;
	int64_t		nested;
	int64_t		begin;
	int64_t		end;
} hdr_entry;

/* Bytes per element of dtype (0 for a value outside the enum). */
size_t
st_dtype_size(st_dtype dtype)
{
	return (int) dtype >= 0 && (int) dtype < ST_NDTYPES ? dtype_info[dtype].size : 0;
}

/* The safetensors spelling of dtype. */
const char *
st_dtype_name(st_dtype dtype)
{
	return (int) dtype >= 0 && (int) dtype < ST_NDTYPES ? dtype_info[dtype].name : "unknown";
}

dl_status
st_json_object(const char *text, size_t len, const char *fname, const char *what,
			   json_object **out, dl_error *err)
{
	json_tokener *tok;
	json_object *root;
	size_t		bad = utf8_invalid_at(text, len);

	if (bad < len)
		return dl_fail(err, DL_EFORMAT, "%s: %s is not valid UTF-8 (byte %zu)", fname, what, bad);
	if (len > INT_MAX)
		return dl_fail(err, DL_EFORMAT, "%s: %s is too large (%zu bytes)", fname, what, len);
	tok = json_tokener_new();
	if (tok == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory parsing %s", fname);
	json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
	root = json_tokener_parse_ex(tok, text, (int) len);
	if (root == NULL || json_tokener_get_parse_end(tok) != len)
	{
		enum json_tokener_error jerr = json_tokener_get_error(tok);
		size_t		at = json_tokener_get_parse_end(tok);

		json_object_put(root);
		json_tokener_free(tok);
		return dl_fail(err, DL_EFORMAT, "%s: %s is not valid JSON: %s at byte %zu of the %s", fname, what,
					   jerr == json_tokener_continue ? "unexpected end" :
					   jerr == json_tokener_success ? "trailing data" : json_tokener_error_desc(jerr),
					   at, what);
	}
	json_tokener_free(tok);
	if (!json_object_is_type(root, json_type_object))
	{
		json_object_put(root);
		return dl_fail(err, DL_EFORMAT, "%s: %s is not a JSON object", fname, what);
	}
	*out = root;
	return DL_OK;
}

/*
 * Walk the header text (already accepted by json-c, its root an object) and list the
 * top-level members with the number of object members nested in each value. Also
 * rejects what json-c's strict mode lets through but JSON (and serde_json) forbids:
 * single quotes, NaN, Infinity, "1." and raw control characters in strings.
 */
static dl_status
scan_members(const char *text, size_t len, const char *fname, hdr_member **out, int *nout,
			 dl_error *err)
{
	hdr_member *m = NULL;
	int			n = 0,
				cap = 0,
				depth = 0;
	bool		want_key = false;

	for (size_t i = 0; i < len; i++)
	{
		char		c = text[i];

		if (c == '"')
		{
			size_t		start = i;

			for (i++; i < len && text[i] != '"'; i++)
			{
				if ((unsigned char) text[i] < 0x20)
				{
					free(m);
					return dl_fail(err, DL_EFORMAT,
								   "%s: header has a raw control character in a string at byte %zu",
								   fname, i);
				}
				if (text[i] == '\\')
					i++;
			}
			if (depth == 1 && want_key)
			{
				if (n == cap)
				{
					hdr_member *grown;

					cap = cap ? 2 * cap : 64;
					grown = realloc(m, cap * sizeof(*m));
					if (grown == NULL)
					{
						free(m);
						return dl_fail(err, DL_ENOMEM, "out of memory parsing %s", fname);
					}
					m = grown;
				}
				m[n].key_off = start;
				m[n].key_len = i + 1 - start;
				m[n].nested = 0;
				n++;
				want_key = false;
			}
		}
		else if (c == '{' || c == '[')
			want_key = ++depth == 1;
		else if (c == '}' || c == ']')
			depth--;
		else if (c == ',' && depth == 1)
			want_key = true;
		else if (c == ':' && depth > 1 && n > 0)
			m[n - 1].nested++;
		else if (c == '\'' || c == 'N' || c == 'I' ||
				 (c == '.' && (i + 1 == len || text[i + 1] < '0' || text[i + 1] > '9')))
		{
			free(m);
			return dl_fail(err, DL_EFORMAT,
						   "%s: header is not strict JSON (single quote, NaN, Infinity or \"1.\" at byte %zu)",
						   fname, i);
		}
	}
	*out = m;
	*nout = n;
	return DL_OK;
}

/* Number of object members in o and everything inside it. */
static int64_t
count_members(json_object *o)
{
	int64_t		n = 0;

	if (json_object_is_type(o, json_type_object))
	{
		json_object_object_foreach(o, key, val)
		{
			(void) key;
			n += 1 + count_members(val);
		}
	}
	else if (json_object_is_type(o, json_type_array))
	{
		size_t		len = json_object_array_length(o);

		for (size_t i = 0; i < len; i++)
			n += count_members(json_object_array_get_idx(o, i));
	}
	return n;
}

/* Decode one key token (a JSON string literal) into a malloc'd C string. */
static dl_status
decode_key(json_tokener *tok, const char *token, size_t len, const char *fname, char **out,
		   dl_error *err)
{
	json_object *s;
	const char *str;
	int			slen;

	json_tokener_reset(tok);
	s = json_tokener_parse_ex(tok, token, (int) len);
	if (s == NULL || !json_object_is_type(s, json_type_string))
	{
		json_object_put(s);
		return dl_fail(err, DL_EFORMAT, "%s: header key %.*s cannot be decoded", fname,
					   (int) (len < 100 ? len : 100), token);
	}
	str = json_object_get_string(s);
	slen = json_object_get_string_len(s);
	if (strlen(str) != (size_t) slen)
	{
		json_object_put(s);
		return dl_fail(err, DL_EFORMAT, "%s: header key %.*s contains a NUL character", fname,
					   (int) (len < 100 ? len : 100), token);
	}
	*out = strdup(str);
	json_object_put(s);
	if (*out == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory parsing %s", fname);
	return DL_OK;
}

/* Read a JSON integer in [0, INT64_MAX]; false for anything else. */
static bool
json_get_count(json_object *o, int64_t *out)
{
	int64_t		v;

	if (!json_object_is_type(o, json_type_int))
		return false;
	v = json_object_get_int64(o);
	/* json-c saturates values above INT64_MAX; its uint64 view tells them apart */
	if (v < 0 || (uint64_t) v != json_object_get_uint64(o))
		return false;
	*out = v;
	return true;
}

/* Check __metadata__: an object whose values are all strings, or null as serde allows. */
static dl_status
check_metadata(json_object *meta, const char *fname, dl_error *err)
{
	if (meta == NULL)
		return DL_OK;
	if (!json_object_is_type(meta, json_type_object))
		return dl_fail(err, DL_EFORMAT, "%s: __metadata__ is not an object of strings", fname);
	json_object_object_foreach(meta, key, val)
	{
		if (!json_object_is_type(val, json_type_string))
			return dl_fail(err, DL_EFORMAT, "%s: __metadata__ value of \"%s\" is not a string",
						   fname, key);
	}
	return DL_OK;
}

/* The dtype spelled name (len bytes), or -1. */
static int
dtype_from_name(const char *name, int len)
{
	for (int d = 0; d < ST_NDTYPES; d++)
		if ((size_t) len == strlen(dtype_info[d].name) && memcmp(name, dtype_info[d].name, len) == 0)
			return d;
	return -1;
}

/* Fill e->t's dtype, shape, numel, nbytes and e->begin/end from its header object. */
static dl_status
parse_entry(hdr_entry *e, json_object *val, const char *fname, dl_error *err)
{
	const char *name = e->t.name;
	json_object *dtype,
			   *shape,
			   *offs;
	const char *dname;
	int			d;
	size_t		ndim;
	int64_t		numel = 1;
	int64_t		nbytes;

	if (!json_object_is_type(val, json_type_object))
		return dl_fail(err, DL_EFORMAT, "%s: header entry of tensor \"%s\" is not an object",
					   fname, name);
	if (count_members(val) != e->nested)
		return dl_fail(err, DL_EFORMAT, "%s: header entry of tensor \"%s\" has a duplicate key",
					   fname, name);
	if (!json_object_object_get_ex(val, "dtype", &dtype) ||
		!json_object_is_type(dtype, json_type_string))
		return dl_fail(err, DL_EFORMAT, "%s: tensor \"%s\" has no dtype string", fname, name);
	dname = json_object_get_string(dtype);
	d = dtype_from_name(dname, json_object_get_string_len(dtype));
	if (d < 0)
		return dl_fail(err, DL_EUNSUPPORTED, "%s: tensor \"%s\" has unknown dtype \"%.40s\"",
					   fname, name, dname);
	e->t.dtype = (st_dtype) d;

	if (!json_object_object_get_ex(val, "shape", &shape) ||
		!json_object_is_type(shape, json_type_array))
		return dl_fail(err, DL_EFORMAT, "%s: tensor \"%s\" has no shape array", fname, name);
	ndim = json_object_array_length(shape);
	if (ndim > ST_MAX_DIMS)
		return dl_fail(err, DL_EUNSUPPORTED, "%s: tensor \"%s\" has %zu dimensions; at most %d are supported",
					   fname, name, ndim, ST_MAX_DIMS);
	e->t.ndim = (int) ndim;
	for (size_t i = 0; i < ndim; i++)
	{
		int64_t		dim;

		if (!json_get_count(json_object_array_get_idx(shape, i), &dim))
			return dl_fail(err, DL_EFORMAT,
						   "%s: tensor \"%s\" has a shape entry that is not a non-negative integer",
						   fname, name);
		e->t.shape[i] = dim;
		if (__builtin_mul_overflow(numel, dim, &numel))
			return dl_fail(err, DL_EFORMAT, "%s: tensor \"%s\" has a shape whose size overflows",
						   fname, name);
	}
	if (__builtin_mul_overflow(numel, (int64_t) dtype_info[e->t.dtype].size, &nbytes))
		return dl_fail(err, DL_EFORMAT, "%s: tensor \"%s\" has a byte size that overflows",
					   fname, name);
	e->t.numel = numel;
	e->t.nbytes = (size_t) nbytes;

	if (!json_object_object_get_ex(val, "data_offsets", &offs) ||
		!json_object_is_type(offs, json_type_array) || json_object_array_length(offs) != 2 ||
		!json_get_count(json_object_array_get_idx(offs, 0), &e->begin) ||
		!json_get_count(json_object_array_get_idx(offs, 1), &e->end))
		return dl_fail(err, DL_EFORMAT,
					   "%s: tensor \"%s\" has no data_offsets pair of non-negative integers",
					   fname, name);
	if (e->end < e->begin)
		return dl_fail(err, DL_EFORMAT, "%s: tensor \"%s\" has data_offsets [%lld, %lld] that end before they begin",
					   fname, name, (long long) e->begin, (long long) e->end);
	if (e->end - e->begin != nbytes)
		return dl_fail(err, DL_EFORMAT,
					   "%s: tensor \"%s\" has data_offsets [%lld, %lld] (%lld bytes) but %lld %s elements need %lld bytes",
					   fname, name, (long long) e->begin, (long long) e->end,
					   (long long) (e->end - e->begin), (long long) numel,
					   dtype_info[e->t.dtype].name, (long long) nbytes);
	return DL_OK;
}

/* qsort: header entries by name. */
static int
entry_by_name(const void *a, const void *b)
{
	return strcmp(((const hdr_entry *) a)->t.name, ((const hdr_entry *) b)->t.name);
}

/* qsort: pointers to header entries by (begin, end), as the reference reader orders them. */
static int
entry_by_offset(const void *a, const void *b)
{
	const hdr_entry *x = *(const hdr_entry *const *) a;
	const hdr_entry *y = *(const hdr_entry *const *) b;

	if (x->begin != y->begin)
		return x->begin < y->begin ? -1 : 1;
	return (x->end > y->end) - (x->end < y->end);
}

/* Check that the entries tile [0, data_size) exactly, in offset order. */
static dl_status
check_tiling(hdr_entry *entries, int n, uint64_t data_size, const char *fname, dl_error *err)
{
	hdr_entry **order = malloc((n ? n : 1) * sizeof(*order));
	int64_t		start = 0;
	const char *prev = NULL;

	if (order == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory parsing %s", fname);
	for (int i = 0; i < n; i++)
		order[i] = &entries[i];
	qsort(order, n, sizeof(*order), entry_by_offset);
	for (int i = 0; i < n; i++)
	{
		hdr_entry  *e = order[i];

		if (e->begin != start)
		{
			dl_status	st = prev ?
				dl_fail(err, DL_EFORMAT,
						"%s: tensor \"%s\" starts at data offset %lld but tensor \"%s\" ends at %lld (%s)",
						fname, e->t.name, (long long) e->begin, prev, (long long) start,
						e->begin > start ? "a hole" : "an overlap") :
				dl_fail(err, DL_EFORMAT,
						"%s: tensor \"%s\" starts at data offset %lld, leaving a hole at the start of the data",
						fname, e->t.name, (long long) e->begin);
			free(order);
			return st;
		}
		start = e->end;
		prev = e->t.name;
	}
	free(order);
	if ((uint64_t) start != data_size)
		return dl_fail(err, DL_EFORMAT,
					   "%s: the tensors cover %lld bytes of data but the file holds %llu after the header (%s)",
					   fname, (long long) start, (unsigned long long) data_size,
					   (uint64_t) start < data_size ? "trailing bytes" : "truncated file");
	return DL_OK;
}

/* Free entries[0..n) names and the array. */
static void
free_entries(hdr_entry *entries, int n)
{
	for (int i = 0; i < n; i++)
		free(entries[i].t.name);
	free(entries);
}

/*
 * Validate every top-level member: decode its key, reject duplicates, check
 * __metadata__ and parse each tensor entry. Returns the tensor entries sorted by name.
 */
static dl_status
parse_members(json_object *root, const char *hdr, const hdr_member *m, int nm,
			  const char *fname, hdr_entry **out, int *nout, dl_error *err)
{
	json_tokener *tok = json_tokener_new();
	hdr_entry  *entries = calloc(nm ? nm : 1, sizeof(*entries));
	int			n = 0,
				nmeta = 0;
	dl_status	st = DL_OK;

	if (tok == NULL || entries == NULL)
	{
		st = dl_fail(err, DL_ENOMEM, "out of memory parsing %s", fname);
		goto done;
	}
	json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
	for (int i = 0; i < nm; i++)
	{
		char	   *name;
		json_object *val;

		st = decode_key(tok, hdr + m[i].key_off, m[i].key_len, fname, &name, err);
		if (st != DL_OK)
			goto done;
		if (strcmp(name, "__metadata__") != 0)
		{
			entries[n].t.name = name;
			entries[n].nested = m[i].nested;
			n++;
			continue;
		}
		free(name);
		if (++nmeta > 1)
		{
			st = dl_fail(err, DL_EFORMAT, "%s: __metadata__ appears twice in the header", fname);
			goto done;
		}
		json_object_object_get_ex(root, "__metadata__", &val);
		st = count_members(val) != m[i].nested ?
			dl_fail(err, DL_EFORMAT, "%s: __metadata__ has a duplicate key", fname) :
			check_metadata(val, fname, err);
		if (st != DL_OK)
			goto done;
	}
	qsort(entries, n, sizeof(*entries), entry_by_name);
	for (int i = 1; i < n; i++)
		if (strcmp(entries[i - 1].t.name, entries[i].t.name) == 0)
		{
			st = dl_fail(err, DL_EFORMAT, "%s: tensor \"%s\" appears twice in the header",
						 fname, entries[i].t.name);
			goto done;
		}
	for (int i = 0; i < n; i++)
	{
		json_object *val = NULL;

		json_object_object_get_ex(root, entries[i].t.name, &val);
		st = parse_entry(&entries[i], val, fname, err);
		if (st != DL_OK)
			goto done;
	}

done:
	if (tok)
		json_tokener_free(tok);
	if (st != DL_OK)
	{
		free_entries(entries, n);
		return st;
	}
	*out = entries;
	*nout = n;
	return DL_OK;
}

/* Validate a whole file image and list its tensors (see safetensors.h). */
dl_status
st_parse(const uint8_t *buf, size_t size, const char *fname, st_tensor **tensors, int *n,
		 dl_error *err)
{
	uint64_t	hlen;
	const char *hdr;
	json_object *root = NULL;
	hdr_member *members = NULL;
	int			nm = 0;
	hdr_entry  *entries = NULL;
	int			ne = 0;
	st_tensor  *out;
	dl_status	st;

	if (size < 8)
		return dl_fail(err, DL_EFORMAT, "%s: file is %zu bytes, too small to hold a safetensors header",
					   fname, size);
	memcpy(&hlen, buf, 8);
	if (hlen > ST_MAX_HEADER)
		return dl_fail(err, DL_EFORMAT, "%s: header length %llu exceeds the limit of %d bytes",
					   fname, (unsigned long long) hlen, ST_MAX_HEADER);
	if (hlen > size - 8)
		return dl_fail(err, DL_EFORMAT, "%s: header length %llu runs past the end of the file (%zu bytes)",
					   fname, (unsigned long long) hlen, size);
	hdr = (const char *) buf + 8;

	st = st_json_object(hdr, hlen, fname, "header", &root, err);
	if (st == DL_OK)
		st = scan_members(hdr, hlen, fname, &members, &nm, err);
	if (st == DL_OK)
		st = parse_members(root, hdr, members, nm, fname, &entries, &ne, err);
	free(members);
	json_object_put(root);
	if (st != DL_OK)
		return st;

	st = check_tiling(entries, ne, size - 8 - hlen, fname, err);
	if (st != DL_OK)
	{
		free_entries(entries, ne);
		return st;
	}
	out = malloc((ne ? ne : 1) * sizeof(*out));
	if (out == NULL)
	{
		free_entries(entries, ne);
		return dl_fail(err, DL_ENOMEM, "out of memory parsing %s", fname);
	}
	for (int i = 0; i < ne; i++)
	{
		out[i] = entries[i].t;
		out[i].data = buf + 8 + hlen + entries[i].begin;
		out[i].file = 0;
	}
	free(entries);
	*tensors = out;
	*n = ne;
	return DL_OK;
}

/* Free a tensor list from st_parse. */
/* qsort: tensors by name. */
static int
tensor_by_name(const void *a, const void *b)
{
	return strcmp(((const st_tensor *) a)->name, ((const st_tensor *) b)->name);
}

int
st_sort_by_name(st_tensor *tensors, int n)
{
	qsort(tensors, n, sizeof(*tensors), tensor_by_name);
	for (int i = 1; i < n; i++)
		if (strcmp(tensors[i - 1].name, tensors[i].name) == 0)
			return i;
	return 0;
}

void
st_free_tensors(st_tensor *tensors, int n)
{
	if (tensors == NULL)
		return;
	for (int i = 0; i < n; i++)
		free(tensors[i].name);
	free(tensors);
}

/* IEEE half to float (bf16.h's conversion, which vectorises). */
static void
f16_to_f32(const uint8_t *src, float *dst, size_t n)
{
	for (size_t i = 0; i < n; i++)
	{
		uint16_t	h;

		memcpy(&h, src + 2 * i, sizeof(h));
		dst[i] = f16_to_float(h);
	}
}

/* bfloat16 is the upper half of a float. */
static void
bf16_to_f32(const uint8_t *src, float *dst, size_t n)
{
	for (size_t i = 0; i < n; i++)
	{
		uint16_t	h;

		memcpy(&h, src + 2 * i, sizeof(h));
		dst[i] = bf16_to_float(h);
	}
}

/* Convert a F32, F16 or BF16 tensor to float32. */
dl_status
st_to_f32(const st_tensor *t, float *dst, dl_error *err)
{
	return st_range_to_f32(t, 0, t->numel, dst, err);
}

dl_status
st_range_to_f32(const st_tensor *t, int64_t first, int64_t n, float *dst, dl_error *err)
{
	const uint8_t *src = t->data;

	switch (t->dtype)
	{
		case ST_F32:
			memcpy(dst, src + first * 4, (size_t) n * sizeof(float));
			return DL_OK;
		case ST_F16:
			f16_to_f32(src + first * 2, dst, (size_t) n);
			return DL_OK;
		case ST_BF16:
			bf16_to_f32(src + first * 2, dst, (size_t) n);
			return DL_OK;
		default:
			dl_fail(err, DL_EUNSUPPORTED, "tensor \"%s\" has dtype %s, which cannot be converted to F32",
					t->name, st_dtype_name(t->dtype));
			return dl_hint(err, "Model weights must be F32, F16 or BF16.");
	}
}

st_tensor
st_rows(const st_tensor *t, int64_t first, int64_t n)
{
	st_tensor	part = *t;
	int64_t		row = t->shape[0] ? t->numel / t->shape[0] : 0;

	part.shape[0] = n;
	part.numel = n * row;
	part.nbytes = (size_t) part.numel * st_dtype_size(t->dtype);
	part.data = t->data + (size_t) (first * row) * st_dtype_size(t->dtype);
	return part;
}

/*
 * Check what st_write was given and build the header text: tensors in the order given,
 * __metadata__ first, padded with spaces to a multiple of 8 as the reference writer does.
 */
static dl_status
build_header(const st_write_tensor *tensors, int n, const char *const *meta_kv, int nmeta,
			 const char *path, char **text, size_t *len, dl_error *err)
{
	json_object *root = json_object_new_object();
	json_object *meta = NULL;
	int64_t		offset = 0;
	const char *json;
	size_t		jlen;
	dl_status	st = DL_OK;

	if (root == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory writing \"%s\"", path);
	if (n < 0 || nmeta < 0 || (n > 0 && tensors == NULL) || (nmeta > 0 && meta_kv == NULL))
	{
		json_object_put(root);
		return dl_fail(err, DL_EINVAL, "st_write: bad tensor or metadata count for \"%s\"", path);
	}
	if (nmeta > 0)
	{
		meta = json_object_new_object();
		json_object_object_add(root, "__metadata__", meta);
	}
	for (int i = 0; i < nmeta && st == DL_OK; i++)
	{
		const char *k = meta_kv[2 * i],
				   *v = meta_kv[2 * i + 1];

		if (k == NULL || v == NULL || utf8_invalid_at(k, strlen(k)) < strlen(k) ||
			utf8_invalid_at(v, strlen(v)) < strlen(v))
			st = dl_fail(err, DL_EINVAL, "st_write: metadata pair %d for \"%s\" is missing or not UTF-8",
						 i, path);
		else if (json_object_object_get_ex(meta, k, NULL))
			st = dl_fail(err, DL_EINVAL, "st_write: metadata key \"%s\" given twice for \"%s\"", k, path);
		else
			json_object_object_add(meta, k, json_object_new_string(v));
	}
	for (int i = 0; i < n && st == DL_OK; i++)
	{
		const st_write_tensor *t = &tensors[i];
		json_object *e,
				   *shape,
				   *offs;
		int64_t		numel = 1,
					nbytes;
		bool		bad_dims = t->ndim < 0 || t->ndim > ST_MAX_DIMS;

		if (t->name == NULL || strcmp(t->name, "__metadata__") == 0 ||
			utf8_invalid_at(t->name, strlen(t->name)) < strlen(t->name))
		{
			st = dl_fail(err, DL_EINVAL, "st_write: tensor %d for \"%s\" has a missing or invalid name",
						 i, path);
			break;
		}
		for (int d = 0; !bad_dims && d < t->ndim; d++)
			bad_dims = t->shape[d] < 0 || __builtin_mul_overflow(numel, t->shape[d], &numel);
		if ((int) t->dtype < 0 || (int) t->dtype >= ST_NDTYPES || bad_dims ||
			__builtin_mul_overflow(numel, (int64_t) dtype_info[t->dtype].size, &nbytes) ||
			__builtin_add_overflow(offset, nbytes, &nbytes) || (t->data == NULL && nbytes > offset))
		{
			st = dl_fail(err, DL_EINVAL, "st_write: tensor \"%s\" for \"%s\" has a bad dtype, shape or data",
						 t->name, path);
			break;
		}
		if (json_object_object_get_ex(root, t->name, NULL))
		{
			st = dl_fail(err, DL_EINVAL, "st_write: tensor \"%s\" given twice for \"%s\"", t->name, path);
			break;
		}
		e = json_object_new_object();
		shape = json_object_new_array();
		offs = json_object_new_array();
		json_object_object_add(e, "dtype", json_object_new_string(dtype_info[t->dtype].name));
		for (int d = 0; d < t->ndim; d++)
			json_object_array_add(shape, json_object_new_int64(t->shape[d]));
		json_object_object_add(e, "shape", shape);
		json_object_array_add(offs, json_object_new_int64(offset));
		json_object_array_add(offs, json_object_new_int64(nbytes));	/* the end offset */
		json_object_object_add(e, "data_offsets", offs);
		json_object_object_add(root, t->name, e);
		offset = nbytes;
	}
	if (st != DL_OK)
	{
		json_object_put(root);
		return st;
	}
	json = json_object_to_json_string_ext(root, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
	jlen = json ? strlen(json) : 0;
	*len = (jlen + 7) / 8 * 8;
	*text = json ? malloc(*len) : NULL;
	if (*text == NULL)
	{
		json_object_put(root);
		return dl_fail(err, DL_ENOMEM, "out of memory writing \"%s\"", path);
	}
	memcpy(*text, json, jlen);
	memset(*text + jlen, ' ', *len - jlen);
	json_object_put(root);
	return DL_OK;
}

/* Write a safetensors file atomically (files.h: path.tmp, fsync, rename, fsync the directory). */
dl_status
st_write(const char *path, const st_write_tensor *tensors, int n,
		 const char *const *meta_kv, int nmeta, dl_error *err)
{
	return st_write_hooked(path, tensors, n, meta_kv, nmeta, NULL, NULL, err);
}

dl_status
st_write_hooked(const char *path, const st_write_tensor *tensors, int n,
				const char *const *meta_kv, int nmeta, st_write_hook hook, void *arg,
				dl_error *err)
{
	char	   *header = NULL;
	size_t		hlen = 0;
	uint64_t	len64;
	dl_file_out out;
	dl_status	st;

	st = build_header(tensors, n, meta_kv, nmeta, path, &header, &hlen, err);
	if (st != DL_OK)
		return st;
	st = file_create(path, &out, err);
	if (st != DL_OK)
	{
		free(header);
		return st;
	}
	len64 = hlen;
	st = file_write(&out, &len64, 8, err);
	if (st == DL_OK)
		st = file_write(&out, header, hlen, err);
	for (int i = 0; i < n && st == DL_OK; i++)
	{
		size_t		nbytes = st_dtype_size(tensors[i].dtype);
		const void *data = tensors[i].data;

		for (int d = 0; d < tensors[i].ndim; d++)
			nbytes *= (size_t) tensors[i].shape[d];
		if (hook)
			st = hook(arg, &tensors[i], &data, err);
		if (st == DL_OK)
			st = file_write(&out, data, nbytes, err);
	}
	free(header);
	return file_commit(&out, st, err);
}
