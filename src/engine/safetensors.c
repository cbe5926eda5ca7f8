/*
 * safetensors.c: reading (mmap + validation) and writing of safetensors files.
 *
 * The header is parsed with json-c; a small scanner over the already-parsed text adds
 * what json-c does not give: duplicate keys (json-c keeps the last one silently) and the
 * strictness of the reference reader (no single quotes, NaN or raw control characters).
 * Tensor data stays in the read-only private mapping; st_to_f32 converts on demand.
 */
#include "safetensors.h"
#include "bf16.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <dirent.h>
#include <unistd.h>

#include <json-c/json.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian and is read in place: a little-endian host is required"
#endif

#define ST_MAX_HEADER 100000000		/* the reference reader's limit */
#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SINGLE_NAME "model.safetensors"

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

/* Offset of the first byte that breaks UTF-8 (overlongs and surrogates included), or n. */
static size_t
utf8_invalid_at(const uint8_t *s, size_t n)
{
	size_t		i = 0;

	while (i < n)
	{
		uint8_t		c = s[i];
		int			more;
		uint8_t		lo = 0x80,
					hi = 0xBF;

		if (c < 0x80)
		{
			i++;
			continue;
		}
		if (c >= 0xC2 && c <= 0xDF)
			more = 1;
		else if (c >= 0xE0 && c <= 0xEF)
		{
			more = 2;
			if (c == 0xE0)
				lo = 0xA0;		/* overlong */
			else if (c == 0xED)
				hi = 0x9F;		/* surrogates */
		}
		else if (c >= 0xF0 && c <= 0xF4)
		{
			more = 3;
			if (c == 0xF0)
				lo = 0x90;		/* overlong */
			else if (c == 0xF4)
				hi = 0x8F;		/* above U+10FFFF */
		}
		else
			return i;
		if (n - i <= (size_t) more)
			return i;
		if (s[i + 1] < lo || s[i + 1] > hi)
			return i;
		for (int k = 2; k <= more; k++)
			if ((s[i + k] & 0xC0) != 0x80)
				return i;
		i += more + 1;
	}
	return n;
}

/*
 * Parse len bytes of JSON as one object, strictly: valid UTF-8, nothing after the
 * object but JSON whitespace. what names the text in messages.
 */
static dl_status
parse_json_object(const char *text, size_t len, const char *fname, const char *what,
				  json_object **out, dl_error *err)
{
	json_tokener *tok;
	json_object *root;
	size_t		bad = utf8_invalid_at((const uint8_t *) text, len);

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

/* qsort: tensors by name. */
static int
tensor_by_name(const void *a, const void *b)
{
	return strcmp(((const st_tensor *) a)->name, ((const st_tensor *) b)->name);
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

	st = parse_json_object(hdr, hlen, fname, "header", &root, err);
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
void
st_free_tensors(st_tensor *tensors, int n)
{
	if (tensors == NULL)
		return;
	for (int i = 0; i < n; i++)
		free(tensors[i].name);
	free(tensors);
}

/* Map path read-only (MAP_PRIVATE); empty files are refused. */
static dl_status
map_file(const char *path, void **map, size_t *size, dl_error *err)
{
	struct stat sb;
	int			fd = open(path, O_RDONLY | O_CLOEXEC);
	void	   *p;

	if (fd < 0)
		return dl_fail(err, DL_EIO, "cannot open \"%s\": %s", path, strerror(errno));
	if (fstat(fd, &sb) != 0)
	{
		int			e = errno;

		close(fd);
		return dl_fail(err, DL_EIO, "cannot stat \"%s\": %s", path, strerror(e));
	}
	if (!S_ISREG(sb.st_mode))
	{
		close(fd);
		return dl_fail(err, DL_EIO, "\"%s\" is not a regular file", path);
	}
	if (sb.st_size == 0)
	{
		close(fd);
		return dl_fail(err, DL_EFORMAT, "%s: file is empty", path);
	}
	p = mmap(NULL, (size_t) sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (p == MAP_FAILED)
	{
		int			e = errno;

		close(fd);
		return dl_fail(err, e == ENOMEM ? DL_ENOMEM : DL_EIO, "cannot map \"%s\": %s", path,
					   strerror(e));
	}
	close(fd);
	*map = p;
	*size = (size_t) sb.st_size;
	return DL_OK;
}

/* "dir/name" in a new allocation (NULL when out of memory). */
static char *
path_join(const char *dir, const char *name)
{
	size_t		len = strlen(dir) + strlen(name) + 2;
	char	   *p = malloc(len);

	if (p)
		snprintf(p, len, "%s/%s", dir, name);
	return p;
}

/* An empty set with room for nfiles shards. */
static st_set *
set_new(int nfiles)
{
	st_set	   *set = calloc(1, sizeof(*set));

	if (set == NULL)
		return NULL;
	set->paths = calloc(nfiles, sizeof(*set->paths));
	set->maps = calloc(nfiles, sizeof(*set->maps));
	set->sizes = calloc(nfiles, sizeof(*set->sizes));
	if (set->paths == NULL || set->maps == NULL || set->sizes == NULL)
	{
		st_close(set);
		return NULL;
	}
	return set;
}

/* Map and validate shard number idx of set from path; its tensors go to *tensors, *n. */
static dl_status
set_load_shard(st_set *set, int idx, const char *path, st_tensor **tensors, int *n, dl_error *err)
{
	dl_status	st;

	set->paths[idx] = strdup(path);
	if (set->paths[idx] == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory opening \"%s\"", path);
	set->nfiles = idx + 1;		/* st_close frees the path, and the map once there is one */
	st = map_file(path, &set->maps[idx], &set->sizes[idx], err);
	if (st != DL_OK)
		return st;
	st = st_parse(set->maps[idx], set->sizes[idx], path, tensors, n, err);
	if (st == DL_EFORMAT)
		dl_hint(err, "the file is damaged or not a safetensors file; download or save the model again");
	for (int i = 0; st == DL_OK && i < *n; i++)
		(*tensors)[i].file = idx;
	return st;
}

/* Map and validate one safetensors file as a one-shard set. */
dl_status
st_open_file(const char *path, st_set **out, dl_error *err)
{
	st_set	   *set = set_new(1);
	dl_status	st;

	if (set == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory opening \"%s\"", path);
	st = set_load_shard(set, 0, path, &set->tensors, &set->ntensors, err);
	if (st != DL_OK)
	{
		st_close(set);
		return st;
	}
	*out = set;
	return DL_OK;
}

/* Whether dir holds a file whose name ends in ".bin" (a PyTorch checkpoint). */
static bool
dir_has_bin(const char *dir)
{
	DIR		   *d = opendir(dir);
	struct dirent *de;
	bool		found = false;

	if (d == NULL)
		return false;
	while (!found && (de = readdir(d)) != NULL)
	{
		size_t		len = strlen(de->d_name);

		found = len > 4 && strcmp(de->d_name + len - 4, ".bin") == 0;
	}
	closedir(d);
	return found;
}

/* Whether path exists (or exists but cannot be examined: then opening it reports why). */
static bool
path_exists(const char *path)
{
	struct stat sb;

	return stat(path, &sb) == 0 || errno != ENOENT;
}

/* A shard name from the index must be a plain file name inside the model directory. */
static bool
plain_file_name(const char *name, int len)
{
	return len > 0 && strlen(name) == (size_t) len && strchr(name, '/') == NULL &&
		strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
}

/* qsort: C strings. */
static int
cstr_cmp(const void *a, const void *b)
{
	return strcmp(*(const char *const *) a, *(const char *const *) b);
}

/* Find name in tensors[0..n) sorted by name; NULL if absent. */
static const st_tensor *
find_sorted(const st_tensor *tensors, int n, const char *name)
{
	int			lo = 0,
				hi = n - 1;

	while (lo <= hi)
	{
		int			mid = lo + (hi - lo) / 2;
		int			c = strcmp(name, tensors[mid].name);

		if (c == 0)
			return &tensors[mid];
		if (c < 0)
			hi = mid - 1;
		else
			lo = mid + 1;
	}
	return NULL;
}

/*
 * Read the index's weight_map: check its shard names and return the distinct shard
 * names, sorted (pointers into the json-c objects, valid while index lives).
 */
static dl_status
index_shards(json_object *index, const char *ipath, json_object **wmap, const char ***shards,
			 int *nshards, dl_error *err)
{
	const char **names;
	int			n = 0,
				nd = 0;

	if (!json_object_object_get_ex(index, "weight_map", wmap) ||
		!json_object_is_type(*wmap, json_type_object) || json_object_object_length(*wmap) == 0)
		return dl_fail(err, DL_EFORMAT, "%s: no weight_map object naming the shards", ipath);
	names = malloc(json_object_object_length(*wmap) * sizeof(*names));
	if (names == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory reading \"%s\"", ipath);
	json_object_object_foreach(*wmap, tname, file)
	{
		if (!json_object_is_type(file, json_type_string))
		{
			free(names);
			return dl_fail(err, DL_EFORMAT, "%s: weight_map entry of tensor \"%s\" is not a file name",
						   ipath, tname);
		}
		if (!plain_file_name(json_object_get_string(file), json_object_get_string_len(file)))
		{
			dl_fail(err, DL_EFORMAT, "%s: shard \"%s\" of tensor \"%s\" is not a plain file name",
					ipath, json_object_get_string(file), tname);
			free(names);
			return dl_hint(err, "shards must be files in the model directory itself");
		}
		names[n++] = json_object_get_string(file);
	}
	qsort(names, n, sizeof(*names), cstr_cmp);
	for (int i = 0; i < n; i++)
		if (nd == 0 || strcmp(names[nd - 1], names[i]) != 0)
			names[nd++] = names[i];
	*shards = names;
	*nshards = nd;
	return DL_OK;
}

/* Merge the shards' tensors into set, sorted by name, refusing names found twice. */
static dl_status
set_merge(st_set *set, st_tensor **per, int *nper, dl_error *err)
{
	int			total = 0,
				k = 0;

	for (int i = 0; i < set->nfiles; i++)
		total += nper[i];
	set->tensors = malloc((total ? total : 1) * sizeof(*set->tensors));
	if (set->tensors == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory merging shards");
	for (int i = 0; i < set->nfiles; i++)
	{
		memcpy(set->tensors + k, per[i], nper[i] * sizeof(*per[i]));
		k += nper[i];
		free(per[i]);			/* the names now belong to set->tensors */
		per[i] = NULL;
		nper[i] = 0;
	}
	set->ntensors = total;
	qsort(set->tensors, total, sizeof(*set->tensors), tensor_by_name);
	for (int i = 1; i < total; i++)
		if (strcmp(set->tensors[i - 1].name, set->tensors[i].name) == 0)
			return dl_fail(err, DL_EFORMAT, "tensor \"%s\" is in two shards: \"%s\" and \"%s\"",
						   set->tensors[i].name, set->paths[set->tensors[i - 1].file],
						   set->paths[set->tensors[i].file]);
	return DL_OK;
}

/* Open a sharded model through its index file. */
static dl_status
open_sharded(const char *dir, const char *ipath, st_set **out, dl_error *err)
{
	void	   *imap = NULL;
	size_t		isize = 0;
	json_object *index = NULL,
			   *wmap;
	const char **shards = NULL;
	int			nshards = 0;
	st_tensor **per = NULL;
	int		   *nper = NULL;
	st_set	   *set = NULL;
	dl_status	st;

	st = map_file(ipath, &imap, &isize, err);
	if (st != DL_OK)
		return st;
	st = parse_json_object(imap, isize, ipath, "index", &index, err);
	munmap(imap, isize);
	if (st == DL_OK)
		st = index_shards(index, ipath, &wmap, &shards, &nshards, err);
	if (st != DL_OK)
		goto done;
	set = set_new(nshards);
	per = calloc(nshards, sizeof(*per));
	nper = calloc(nshards, sizeof(*nper));
	if (set == NULL || per == NULL || nper == NULL)
	{
		st = dl_fail(err, DL_ENOMEM, "out of memory opening \"%s\"", ipath);
		goto done;
	}
	for (int i = 0; i < nshards && st == DL_OK; i++)
	{
		char	   *spath = path_join(dir, shards[i]);

		st = spath ? set_load_shard(set, i, spath, &per[i], &nper[i], err) :
			dl_fail(err, DL_ENOMEM, "out of memory opening \"%s\"", ipath);
		free(spath);
	}
	if (st != DL_OK)
		goto done;
	{
		json_object_object_foreach(wmap, tname, file)
		{
			const char *fname = json_object_get_string(file);
			const char **hit = bsearch(&fname, shards, nshards, sizeof(*shards), cstr_cmp);
			int			f = (int) (hit - shards);

			if (find_sorted(per[f], nper[f], tname) == NULL)
			{
				st = dl_fail(err, DL_EFORMAT, "%s: tensor \"%s\" is listed in shard \"%s\", which does not contain it",
							 ipath, tname, fname);
				goto done;
			}
		}
	}
	st = set_merge(set, per, nper, err);

done:
	for (int i = 0; per && i < nshards; i++)
		st_free_tensors(per[i], nper[i]);
	free(per);
	free(nper);
	free(shards);
	json_object_put(index);
	if (st != DL_OK)
	{
		st_close(set);
		return st;
	}
	*out = set;
	return DL_OK;
}

/* Open a model directory: model.safetensors first, else the sharded index. */
dl_status
st_open(const char *dir, st_set **out, dl_error *err)
{
	char	   *single = path_join(dir, ST_SINGLE_NAME);
	char	   *ipath = path_join(dir, ST_INDEX_NAME);
	struct stat sb;
	dl_status	st;

	if (single == NULL || ipath == NULL)
		st = dl_fail(err, DL_ENOMEM, "out of memory opening \"%s\"", dir);
	else if (path_exists(single))
		st = st_open_file(single, out, err);
	else if (path_exists(ipath))
		st = open_sharded(dir, ipath, out, err);
	else if (stat(dir, &sb) != 0)
		st = dl_fail(err, DL_EIO, "cannot open model directory \"%s\": %s", dir, strerror(errno));
	else if (!S_ISDIR(sb.st_mode))
		st = dl_fail(err, DL_EIO, "model path \"%s\" is not a directory", dir);
	else
	{
		dl_fail(err, DL_EIO, "model directory \"%s\" has no %s or %s", dir, ST_SINGLE_NAME,
				ST_INDEX_NAME);
		st = dir_has_bin(dir) ?
			dl_hint(err, "a Hugging Face model directory must contain %s or %s; PyTorch .bin checkpoints are not supported: load the model with transformers and save it with save_pretrained, which writes safetensors",
					ST_SINGLE_NAME, ST_INDEX_NAME) :
			dl_hint(err, "a Hugging Face model directory must contain %s or %s",
					ST_SINGLE_NAME, ST_INDEX_NAME);
	}
	free(single);
	free(ipath);
	return st;
}

/* Binary search of the set's tensors, which are sorted by name. */
const st_tensor *
st_find(const st_set *set, const char *name)
{
	return find_sorted(set->tensors, set->ntensors, name);
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
			return dl_hint(err, "model weights must be F32, F16 or BF16");
	}
}

/* Unmap the shards and free the set. */
void
st_close(st_set *set)
{
	if (set == NULL)
		return;
	for (int i = 0; i < set->nfiles; i++)
		if (set->maps[i])
			munmap(set->maps[i], set->sizes[i]);
	for (int i = 0; i < set->nfiles; i++)
		free(set->paths[i]);
	free(set->paths);
	free(set->maps);
	free(set->sizes);
	st_free_tensors(set->tensors, set->ntensors);
	free(set);
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

		if (k == NULL || v == NULL || utf8_invalid_at((const uint8_t *) k, strlen(k)) < strlen(k) ||
			utf8_invalid_at((const uint8_t *) v, strlen(v)) < strlen(v))
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
			utf8_invalid_at((const uint8_t *) t->name, strlen(t->name)) < strlen(t->name))
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

/* write() all of buf to fd, retrying short writes. */
static dl_status
write_all(int fd, const void *buf, size_t len, const char *path, dl_error *err)
{
	const uint8_t *p = buf;

	while (len > 0)
	{
		ssize_t		w = write(fd, p, len);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return dl_fail(err, DL_EIO, "cannot write \"%s\": %s", path,
						   w < 0 ? strerror(errno) : "no progress");
		p += w;
		len -= (size_t) w;
	}
	return DL_OK;
}

/* fsync the directory holding path, so a rename into it survives a crash. */
static dl_status
fsync_parent(const char *path, dl_error *err)
{
	const char *slash = strrchr(path, '/');
	char	   *dir = slash ? strndup(path, slash == path ? 1 : (size_t) (slash - path)) : strdup(".");
	int			fd;
	dl_status	st = DL_OK;

	if (dir == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory writing \"%s\"", path);
	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 || fsync(fd) != 0)
		st = dl_fail(err, DL_EIO, "cannot fsync directory \"%s\": %s", dir, strerror(errno));
	if (fd >= 0)
		close(fd);
	free(dir);
	return st;
}

/* Write a safetensors file atomically: path.tmp, fsync, rename, fsync the directory. */
dl_status
st_write(const char *path, const st_write_tensor *tensors, int n,
		 const char *const *meta_kv, int nmeta, dl_error *err)
{
	char	   *header = NULL;
	size_t		hlen = 0;
	char	   *tmp;
	uint64_t	len64;
	int			fd;
	dl_status	st;

	st = build_header(tensors, n, meta_kv, nmeta, path, &header, &hlen, err);
	if (st != DL_OK)
		return st;
	tmp = malloc(strlen(path) + 5);
	if (tmp == NULL)
	{
		free(header);
		return dl_fail(err, DL_ENOMEM, "out of memory writing \"%s\"", path);
	}
	sprintf(tmp, "%s.tmp", path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
	{
		st = dl_fail(err, DL_EIO, "cannot create \"%s\": %s", tmp, strerror(errno));
		free(header);
		free(tmp);
		return st;
	}
	len64 = hlen;
	st = write_all(fd, &len64, 8, tmp, err);
	if (st == DL_OK)
		st = write_all(fd, header, hlen, tmp, err);
	for (int i = 0; i < n && st == DL_OK; i++)
	{
		size_t		nbytes = st_dtype_size(tensors[i].dtype);

		for (int d = 0; d < tensors[i].ndim; d++)
			nbytes *= (size_t) tensors[i].shape[d];
		st = write_all(fd, tensors[i].data, nbytes, tmp, err);
	}
	if (st == DL_OK && fsync(fd) != 0)
		st = dl_fail(err, DL_EIO, "cannot fsync \"%s\": %s", tmp, strerror(errno));
	if (close(fd) != 0 && st == DL_OK)
		st = dl_fail(err, DL_EIO, "cannot close \"%s\": %s", tmp, strerror(errno));
	if (st == DL_OK && rename(tmp, path) != 0)
		st = dl_fail(err, DL_EIO, "cannot rename \"%s\" to \"%s\": %s", tmp, path, strerror(errno));
	if (st != DL_OK)
		unlink(tmp);
	else
		st = fsync_parent(path, err);
	free(header);
	free(tmp);
	return st;
}
