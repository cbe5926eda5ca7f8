/*
 * test_safetensors.c: the safetensors reader on hand-built images (one test per rule of
 * the reference reader), the writer round trip, F16/BF16 conversion, sharded models
 * through the index, and the transformers-written fixture models.
 */
#include "harness.h"
#include "../../src/engine/safetensors.h"
#include "../../src/engine/config.h"

#include <dirent.h>
#include <stdbool.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* A file image: 8-byte little-endian length of header, header, then ndata bytes. */
static uint8_t *
image(const char *header, size_t hlen, size_t ndata, size_t *size)
{
	uint8_t    *buf = malloc(8 + hlen + ndata + 1);
	uint64_t	n = hlen;

	memcpy(buf, &n, 8);
	memcpy(buf + 8, header, hlen);
	for (size_t i = 0; i < ndata; i++)
		buf[8 + hlen + i] = (uint8_t) (i * 7 + 1);
	*size = 8 + hlen + ndata;
	return buf;
}

/* st_parse on a header string plus ndata bytes; frees what it parsed. */
static dl_status
parse_str(const char *header, size_t ndata, dl_error *err)
{
	size_t		size;
	uint8_t    *buf = image(header, strlen(header), ndata, &size);
	st_tensor  *t = NULL;
	int			n = 0;
	dl_status	st = st_parse(buf, size, "f.safetensors", &t, &n, err);

	if (st == DL_OK)
		st_free_tensors(t, n);
	free(buf);
	return st;
}

/* Expect header + ndata to fail with code and a message holding both needles. */
#define CHECK_BAD(header, ndata, code, needle1, needle2) do { \
	dl_error	e_; \
	dl_status	s_ = parse_str(header, ndata, &e_); \
	CHECKF(s_ == (code), "got %s, wanted %s (%s)", dl_status_name(s_), dl_status_name(code), \
		   s_ == DL_OK ? "" : e_.msg); \
	CHECKF(strstr(e_.msg, "f.safetensors") && strstr(e_.msg, needle1) && strstr(e_.msg, needle2), \
		   "message: %s", e_.msg); \
	} while (0)

#define T_A "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}"

TEST(st_parse_good_file)
{
	const char *h = "{\"__metadata__\":{\"format\":\"pt\"},"
		"\"b\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[24,30]}," T_A "}   ";
	size_t		size;
	uint8_t    *buf = image(h, strlen(h), 30, &size);
	st_tensor  *t;
	int			n;
	dl_error	err;

	CHECK_OK(st_parse(buf, size, "f.safetensors", &t, &n, &err), &err);
	CHECK(n == 2);
	CHECK(strcmp(t[0].name, "a") == 0 && strcmp(t[1].name, "b") == 0);	/* sorted */
	CHECK(t[0].dtype == ST_F32 && t[0].ndim == 2 && t[0].shape[0] == 2 && t[0].shape[1] == 3);
	CHECK(t[0].numel == 6 && t[0].nbytes == 24 && t[0].data == buf + 8 + strlen(h));
	CHECK(t[1].dtype == ST_BF16 && t[1].numel == 3 && t[1].nbytes == 6);
	CHECK(t[1].data == buf + 8 + strlen(h) + 24);
	st_free_tensors(t, n);
	free(buf);
}

TEST(st_parse_empty_and_special_shapes)
{
	dl_error	err;

	CHECK_OK(parse_str("{}      ", 0, &err), &err);
	/* a 0-dim scalar holds one element; zero-size tensors take no bytes, anywhere */
	CHECK_OK(parse_str("{\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]},"
					   "\"z\":{\"dtype\":\"F16\",\"shape\":[0,3],\"data_offsets\":[4,4]},"
					   "\"y\":{\"dtype\":\"I64\",\"shape\":[5,0],\"data_offsets\":[0,0]}}", 4, &err), &err);
	/* unknown keys in an entry are ignored, as serde does */
	CHECK_OK(parse_str("{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2],\"x\":[1]}}", 2, &err),
			 &err);
}

TEST(st_parse_scalar_fields)
{
	const char *h = "{\"s\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[0,8]}}";
	size_t		size;
	uint8_t    *buf = image(h, strlen(h), 8, &size);
	st_tensor  *t;
	int			n;
	dl_error	err;

	CHECK_OK(st_parse(buf, size, "f.safetensors", &t, &n, &err), &err);
	CHECK(n == 1 && t[0].ndim == 0 && t[0].numel == 1 && t[0].nbytes == 8);
	st_free_tensors(t, n);
	free(buf);
}

TEST(st_parse_header_length)
{
	uint8_t		small[7] = {0};
	uint8_t		buf[64];
	uint64_t	n;
	st_tensor  *t;
	int			nt;
	dl_error	err;

	CHECK(st_parse(small, sizeof(small), "f.safetensors", &t, &nt, &err) == DL_EFORMAT);
	CHECK(strstr(err.msg, "too small"));

	memset(buf, ' ', sizeof(buf));
	n = 100000001;				/* over the limit, whatever the file size */
	memcpy(buf, &n, 8);
	CHECK(st_parse(buf, sizeof(buf), "f.safetensors", &t, &nt, &err) == DL_EFORMAT);
	CHECK(strstr(err.msg, "exceeds the limit"));

	n = sizeof(buf) - 7;		/* one byte past the end */
	memcpy(buf, &n, 8);
	CHECK(st_parse(buf, sizeof(buf), "f.safetensors", &t, &nt, &err) == DL_EFORMAT);
	CHECK(strstr(err.msg, "past the end"));

	n = UINT64_MAX;				/* must not wrap around */
	memcpy(buf, &n, 8);
	CHECK(st_parse(buf, sizeof(buf), "f.safetensors", &t, &nt, &err) == DL_EFORMAT);

	n = 0;						/* an empty header is not JSON */
	memcpy(buf, &n, 8);
	CHECK(st_parse(buf, 8, "f.safetensors", &t, &nt, &err) == DL_EFORMAT);
}

TEST(st_parse_data_size)
{
	CHECK_BAD("{" T_A "}", 20, DL_EFORMAT, "truncated", "24");
	CHECK_BAD("{" T_A "}", 28, DL_EFORMAT, "trailing bytes", "28");
}

TEST(st_parse_holes_and_overlaps)
{
	CHECK_BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
			  "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}", 20,
			  DL_EFORMAT, "\"b\"", "hole");
	CHECK_BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
			  "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12,
			  DL_EFORMAT, "\"b\"", "overlap");
	/* the data area must start at offset 0 */
	CHECK_BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12,
			  DL_EFORMAT, "\"a\"", "hole");
	/* two tensors on the same bytes */
	CHECK_BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
			  "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
			  DL_EFORMAT, "overlap", "8");
}

TEST(st_parse_sizes_and_dtypes)
{
	CHECK_BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4,
			  DL_EFORMAT, "\"a\"", "need 8 bytes");
	CHECK_BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8,
			  DL_EFORMAT, "\"a\"", "end before");
	CHECK_BAD("{\"w\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2,
			  DL_EUNSUPPORTED, "\"w\"", "Q4");
	CHECK_BAD("{\"w\":{\"dtype\":7,\"shape\":[2],\"data_offsets\":[0,2]}}", 2,
			  DL_EFORMAT, "\"w\"", "dtype");
	CHECK_BAD("{\"w\":{\"shape\":[2],\"data_offsets\":[0,2]}}", 2, DL_EFORMAT, "\"w\"", "dtype");
	CHECK_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":[-2],\"data_offsets\":[0,2]}}", 2,
			  DL_EFORMAT, "\"w\"", "shape");
	CHECK_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":[2.0],\"data_offsets\":[0,2]}}", 2,
			  DL_EFORMAT, "\"w\"", "shape");
	CHECK_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":2,\"data_offsets\":[0,2]}}", 2,
			  DL_EFORMAT, "\"w\"", "shape");
	CHECK_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,2],\"data_offsets\":[0,2]}}", 2,
			  DL_EUNSUPPORTED, "\"w\"", "9 dimensions");
	CHECK_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}", 0,
			  DL_EFORMAT, "\"w\"", "overflows");
	CHECK_BAD("{\"w\":{\"dtype\":\"U64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}", 0,
			  DL_EFORMAT, "\"w\"", "overflows");
	CHECK_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2,4]}}", 2,
			  DL_EFORMAT, "\"w\"", "data_offsets");
	CHECK_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,18446744073709551615]}}", 2,
			  DL_EFORMAT, "\"w\"", "data_offsets");
	CHECK_BAD("{\"w\":[1,2]}", 0, DL_EFORMAT, "\"w\"", "not an object");
}

TEST(st_parse_duplicates)
{
	CHECK_BAD("{" T_A "," T_A "}", 24, DL_EFORMAT, "\"a\"", "twice");
	/* the same name spelled with an escape is the same name */
	CHECK_BAD("{" T_A ",\"\\u0061\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[24,48]}}", 48,
			  DL_EFORMAT, "\"a\"", "twice");
	CHECK_BAD("{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4,
			  DL_EFORMAT, "\"a\"", "duplicate key");
	CHECK_BAD("{\"__metadata__\":{},\"__metadata__\":{}," T_A "}", 24, DL_EFORMAT, "__metadata__", "twice");
	CHECK_BAD("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}," T_A "}", 24, DL_EFORMAT, "__metadata__",
			  "duplicate");
	/* keys that json-c would cut at a NUL are refused, not merged */
	CHECK_BAD("{\"a\\u0000b\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1]}}", 1, DL_EFORMAT,
			  "NUL", "a");
}

TEST(st_parse_metadata)
{
	CHECK_BAD("{\"__metadata__\":{\"k\":1}," T_A "}", 24, DL_EFORMAT, "__metadata__", "\"k\"");
	CHECK_BAD("{\"__metadata__\":[\"k\"]," T_A "}", 24, DL_EFORMAT, "__metadata__", "object");
}

TEST(st_parse_metadata_null)
{
	dl_error	err;

	/* serde reads __metadata__ as an Option: null means none */
	CHECK_OK(parse_str("{\"__metadata__\":null," T_A "}", 24, &err), &err);
}

TEST(st_parse_json_strictness)
{
	dl_error	err;
	size_t		size;
	uint8_t    *buf;
	st_tensor  *t;
	int			n;

	/* writers pad with spaces; JSON whitespace is accepted, anything else is not */
	CHECK_OK(parse_str("{" T_A "} \n\t\r", 24, &err), &err);
	CHECK_BAD("{" T_A "} x", 24, DL_EFORMAT, "JSON", "byte");
	CHECK_BAD("{" T_A "}{}", 24, DL_EFORMAT, "JSON", "byte");
	CHECK_BAD("{" T_A, 24, DL_EFORMAT, "JSON", "end");
	CHECK_BAD("[]", 0, DL_EFORMAT, "header", "object");
	CHECK_BAD("{" T_A ",}", 24, DL_EFORMAT, "JSON", "byte");
	CHECK_BAD("{'a':{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1]}}", 1, DL_EFORMAT, "strict", "byte");
	CHECK_BAD("{\"__metadata__\":{},\"a\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1],\"x\":NaN}}", 1,
			  DL_EFORMAT, "strict", "byte");
	CHECK_BAD("{\"__metadata__\":{},\"a\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1],\"x\":1.}}", 1,
			  DL_EFORMAT, "strict", "byte");
	CHECK_OK(parse_str("{\"a\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1],\"x\":[1.5,\"1.\"]}}", 1,
					   &err), &err);
	CHECK_BAD("{\"a\tb\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1]}}", 1, DL_EFORMAT, "control",
			  "byte");

	/* NUL padding is not whitespace */
	buf = image("{" T_A "}\0\0", strlen("{" T_A "}") + 2, 24, &size);
	CHECK(st_parse(buf, size, "f.safetensors", &t, &n, &err) == DL_EFORMAT);
	free(buf);
	/* invalid UTF-8, overlong encodings and surrogates are refused like Rust's from_utf8 */
	CHECK_BAD("{\"__metadata__\":{\"k\":\"\xc3\x28\"}}", 0, DL_EFORMAT, "UTF-8", "byte");
	CHECK_BAD("{\"__metadata__\":{\"k\":\"\xc0\xaf\"}}", 0, DL_EFORMAT, "UTF-8", "byte");
	CHECK_BAD("{\"__metadata__\":{\"k\":\"\xed\xa0\x80\"}}", 0, DL_EFORMAT, "UTF-8", "byte");
	CHECK_BAD("{\"__metadata__\":{\"k\":\"\xf4\x90\x80\x80\"}}", 0, DL_EFORMAT, "UTF-8", "byte");
	CHECK_OK(parse_str("{\"__metadata__\":{\"k\":\"\xc3\xa9\xe6\x97\xa5\xf0\x9f\x98\x80\"}}", 0, &err), &err);
}

/* Reference half -> float, written the slow obvious way. */
static float
half_ref(uint16_t h)
{
	int			sign = h >> 15,
				exp = (h >> 10) & 0x1f,
				man = h & 0x3ff;
	float		v;

	if (exp == 31)
		v = man ? NAN : INFINITY;
	else if (exp == 0)
		v = ldexpf((float) man, -24);
	else
		v = ldexpf((float) (man + 1024), exp - 25);
	return sign ? -v : v;
}

/* The bits of f. */
static uint32_t
bits(float f)
{
	uint32_t	u;

	memcpy(&u, &f, 4);
	return u;
}

TEST(st_to_f32_f16_all_values)
{
	uint8_t    *src = malloc(2 * 65536 + 1);
	float	   *dst = malloc(65536 * sizeof(float));
	st_tensor	t = {.name = "h", .dtype = ST_F16, .ndim = 1, .shape = {65536}, .numel = 65536,
	.nbytes = 2 * 65536};
	dl_error	err;

	/* odd address: data in a file is not aligned */
	for (int i = 0; i < 65536; i++)
		memcpy(src + 1 + 2 * i, &(uint16_t) {(uint16_t) i}, 2);
	t.data = src + 1;
	CHECK_OK(st_to_f32(&t, dst, &err), &err);
	for (int i = 0; i < 65536; i++)
	{
		float		want = half_ref((uint16_t) i);

		if (isnan(want))
			CHECKF(isnan(dst[i]) && (bits(dst[i]) >> 31) == (unsigned) (i >> 15) &&
				   ((bits(dst[i]) >> 13) & 0x3ff) == (unsigned) (i & 0x3ff),
				   "half 0x%04x gave bits 0x%08x", i, bits(dst[i]));
		else
			CHECKF(bits(dst[i]) == bits(want), "half 0x%04x gave 0x%08x, want 0x%08x",
				   i, bits(dst[i]), bits(want));
	}
	/* landmarks: smallest subnormal, largest subnormal, smallest normal, max, -0, inf */
	CHECK(dst[0x0001] == 0x1p-24f && dst[0x03ff] == 1023 * 0x1p-24f && dst[0x0400] == 0x1p-14f);
	CHECK(dst[0x7bff] == 65504.0f && dst[0x3c00] == 1.0f && dst[0xc000] == -2.0f);
	CHECK(bits(dst[0x8000]) == 0x80000000u && isinf(dst[0x7c00]) && dst[0xfc00] < 0);
	CHECK(bits(dst[0x7e00]) == 0x7fc00000u);	/* quiet NaN stays quiet */
	free(src);
	free(dst);
}

TEST(st_to_f32_bf16_and_f32)
{
	uint16_t	h[6] = {0x3f80, 0xc040, 0xff80, 0x7fc1, 0x0001, 0x8000};
	uint8_t		raw[1 + sizeof(h)];
	float		f[3] = {1.5f, -0.0f, 3e38f};
	uint8_t		rawf[1 + sizeof(f)];
	float		out[6];
	st_tensor	t = {.name = "b", .dtype = ST_BF16, .ndim = 1, .shape = {6}, .numel = 6, .nbytes = 12};
	dl_error	err;

	memcpy(raw + 1, h, sizeof(h));
	t.data = raw + 1;
	CHECK_OK(st_to_f32(&t, out, &err), &err);
	CHECK(out[0] == 1.0f && out[1] == -3.0f && isinf(out[2]) && out[2] < 0);
	CHECK(bits(out[3]) == 0x7fc10000u && bits(out[4]) == 0x00010000u && bits(out[5]) == 0x80000000u);

	memcpy(rawf + 1, f, sizeof(f));
	t.dtype = ST_F32;
	t.numel = 3;
	t.shape[0] = 3;
	t.nbytes = 12;
	t.data = rawf + 1;
	CHECK_OK(st_to_f32(&t, out, &err), &err);
	CHECK(memcmp(out, f, sizeof(f)) == 0);

	t.dtype = ST_I32;
	CHECK(st_to_f32(&t, out, &err) == DL_EUNSUPPORTED);
	CHECKF(strstr(err.msg, "\"b\"") && strstr(err.msg, "I32"), "%s", err.msg);
}

TEST(st_dtype_names_and_sizes)
{
	CHECK(st_dtype_size(ST_BF16) == 2 && strcmp(st_dtype_name(ST_BF16), "BF16") == 0);
	CHECK(st_dtype_size(ST_F8_E5M2) == 1 && strcmp(st_dtype_name(ST_F8_E4M3), "F8_E4M3") == 0);
	CHECK(st_dtype_size(ST_U64) == 8 && st_dtype_size((st_dtype) 99) == 0);
}

/* A fresh directory under /tmp. */
static char *
make_tmpdir(void)
{
	char		tmpl[] = "/tmp/dolly_st_XXXXXX";
	char	   *d = mkdtemp(tmpl);

	return d ? strdup(d) : NULL;
}

/* Remove dir and the plain files in it. */
static void
remove_tmpdir(char *dir)
{
	DIR		   *d = opendir(dir);
	struct dirent *de;
	char		p[4096];

	while (d && (de = readdir(d)) != NULL)
	{
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		snprintf(p, sizeof(p), "%s/%s", dir, de->d_name);
		unlink(p);
	}
	if (d)
		closedir(d);
	rmdir(dir);
	free(dir);
}

/* dir/name into a static buffer. */
static const char *
in_dir(const char *dir, const char *name)
{
	static char buf[4096];

	snprintf(buf, sizeof(buf), "%s/%s", dir, name);
	return buf;
}

/* Write len bytes to dir/name. */
static void
write_bytes(const char *dir, const char *name, const char *data, size_t len)
{
	FILE	   *f = fopen(in_dir(dir, name), "wb");

	fwrite(data, 1, len, f);
	fclose(f);
}

/* Write a C string to dir/name. */
static void
write_text(const char *dir, const char *name, const char *text)
{
	write_bytes(dir, name, text, strlen(text));
}

TEST(st_write_round_trip)
{
	char	   *dir = make_tmpdir();
	float		a[6] = {1, -2, 3.5f, 0, -0.0f, 1e-30f};
	uint16_t	b[3] = {0x3f80, 0x4000, 0xbf80};	/* BF16 1, 2, -1 */
	uint16_t	h[2] = {0x3c00, 0x0001};	/* F16 1, 2^-24 */
	st_write_tensor w[] = {
		{"layer.a", ST_F32, 2, {2, 3}, a},
		{"b/slash", ST_BF16, 1, {3}, b},
		{"h", ST_F16, 1, {2}, h},
		{"empty", ST_F32, 2, {0, 4}, NULL},
		{"scalar", ST_F32, 0, {0}, a},
	};
	const char *meta[] = {"format", "pt", "note", "x\"y"};
	const char *want = "{\"__metadata__\":{\"format\":\"pt\",\"note\":\"x\\\"y\"},"
		"\"layer.a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
		"\"b/slash\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[24,30]},"
		"\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[30,34]},"
		"\"empty\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[34,34]},"
		"\"scalar\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[34,38]}}";
	st_set	   *set;
	const st_tensor *t;
	float		out[6];
	uint64_t	hlen;
	dl_error	err;

	CHECK(dir != NULL);
	CHECK_OK(st_write(in_dir(dir, "x.safetensors"), w, 5, meta, 2, &err), &err);
	CHECK(access(in_dir(dir, "x.safetensors.tmp"), F_OK) != 0);
	CHECK_OK(st_open_file(in_dir(dir, "x.safetensors"), &set, &err), &err);

	/* the header is exactly the documented layout, padded with spaces to 8 bytes */
	memcpy(&hlen, set->maps[0], 8);
	CHECK(hlen % 8 == 0 && hlen >= strlen(want) && hlen - strlen(want) < 8);
	CHECK(memcmp((char *) set->maps[0] + 8, want, strlen(want)) == 0);
	for (size_t i = strlen(want); i < hlen; i++)
		CHECK(((char *) set->maps[0])[8 + i] == ' ');
	CHECK(set->sizes[0] == 8 + hlen + 38);

	CHECK(set->ntensors == 5 && set->nfiles == 1);
	t = st_find(set, "layer.a");
	CHECK(t && t->ndim == 2 && t->shape[1] == 3 && memcmp(t->data, a, 24) == 0);
	CHECK_OK(st_to_f32(t, out, &err), &err);
	CHECK(memcmp(out, a, sizeof(a)) == 0);
	t = st_find(set, "b/slash");
	CHECK_OK(st_to_f32(t, out, &err), &err);
	CHECK(out[0] == 1.0f && out[1] == 2.0f && out[2] == -1.0f);
	t = st_find(set, "h");
	CHECK_OK(st_to_f32(t, out, &err), &err);
	CHECK(out[0] == 1.0f && out[1] == 0x1p-24f);
	t = st_find(set, "empty");
	CHECK(t && t->numel == 0 && t->nbytes == 0);
	t = st_find(set, "scalar");
	CHECK(t && t->ndim == 0 && t->numel == 1 && memcmp(t->data, a, 4) == 0);
	CHECK(st_find(set, "missing") == NULL && st_find(set, "") == NULL);
	st_close(set);

	/* overwriting goes through the temporary file too */
	CHECK_OK(st_write(in_dir(dir, "x.safetensors"), w, 1, NULL, 0, &err), &err);
	CHECK_OK(st_open_file(in_dir(dir, "x.safetensors"), &set, &err), &err);
	CHECK(set->ntensors == 1 && memcmp((char *) set->maps[0] + 8, "{\"layer.a\"", 10) == 0);
	st_close(set);
	remove_tmpdir(dir);
}

TEST(st_write_rejects_bad_input)
{
	char	   *dir = make_tmpdir();
	float		a[2] = {1, 2};
	st_write_tensor dup[] = {{"a", ST_F32, 1, {2}, a}, {"a", ST_F32, 1, {2}, a}};
	st_write_tensor bad_dims[] = {{"a", ST_F32, 9, {1}, a}};
	st_write_tensor neg[] = {{"a", ST_F32, 1, {-1}, a}};
	st_write_tensor reserved[] = {{"__metadata__", ST_F32, 1, {2}, a}};
	st_write_tensor no_data[] = {{"a", ST_F32, 1, {2}, NULL}};
	const char *meta_dup[] = {"k", "1", "k", "2"};
	dl_error	err;

	CHECK(dir != NULL);
	CHECK(st_write(in_dir(dir, "y"), dup, 2, NULL, 0, &err) == DL_EINVAL);
	CHECKF(strstr(err.msg, "\"a\"") && strstr(err.msg, "twice"), "%s", err.msg);
	CHECK(st_write(in_dir(dir, "y"), bad_dims, 1, NULL, 0, &err) == DL_EINVAL);
	CHECK(st_write(in_dir(dir, "y"), neg, 1, NULL, 0, &err) == DL_EINVAL);
	CHECK(st_write(in_dir(dir, "y"), reserved, 1, NULL, 0, &err) == DL_EINVAL);
	CHECK(st_write(in_dir(dir, "y"), no_data, 1, NULL, 0, &err) == DL_EINVAL);
	CHECK(st_write(in_dir(dir, "y"), dup, 1, meta_dup, 2, &err) == DL_EINVAL);
	CHECK(access(in_dir(dir, "y"), F_OK) != 0 && access(in_dir(dir, "y.tmp"), F_OK) != 0);
	CHECK(st_write("/nonexistent-dir/y", dup, 1, NULL, 0, &err) == DL_EIO);
	CHECKF(strstr(err.msg, "/nonexistent-dir/y.tmp"), "%s", err.msg);
	remove_tmpdir(dir);
}

/* Resident kB of the mapping that holds addr (/proc/self/smaps), -1 if not found. */
static long
mapping_rss_kb(const void *addr)
{
	FILE	   *f = fopen("/proc/self/smaps", "r");
	char		line[512];
	unsigned long lo,
				hi;
	long		kb = -1;
	bool		in = false;

	while (f && fgets(line, sizeof(line), f))
	{
		if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2)
			in = (uintptr_t) addr >= lo && (uintptr_t) addr < hi;
		else if (in && sscanf(line, "Rss: %ld kB", &kb) == 1)
			break;
	}
	if (f)
		fclose(f);
	return kb;
}

/*
 * A load drops a tensor's pages from its mapping once copied: the mapping's resident
 * memory falls, the bytes read the same afterwards (from the page cache), and bytes that
 * are not in the set's mappings (a copy in memory) are left alone. st_rows views rows.
 */
TEST(st_release_drops_mapped_pages_only)
{
	char	   *dir = make_tmpdir();
	size_t		n = 1 << 20;	/* 4 MB */
	float	   *v = malloc(n * sizeof(float)),
			   *heap = malloc(n * sizeof(float));
	st_write_tensor w[] = {{"big", ST_F32, 2, {1 << 10, 1 << 10}, v}};
	st_set	   *set;
	const st_tensor *t;
	st_tensor	rows,
				copy;
	double		sum = 0;
	long		before,
				after;
	dl_error	err;

	CHECK(dir != NULL && v != NULL && heap != NULL);
	for (size_t i = 0; i < n; i++)
		v[i] = (float) i;
	CHECK_OK(st_write(in_dir(dir, "m.safetensors"), w, 1, NULL, 0, &err), &err);
	CHECK_OK(st_open_file(in_dir(dir, "m.safetensors"), &set, &err), &err);
	t = st_find(set, "big");
	for (size_t i = 0; i < t->nbytes; i += 512)
		sum += t->data[i];
	before = mapping_rss_kb(t->data);
	st_release(set, t);
	after = mapping_rss_kb(t->data);
	CHECKF(before >= 4096 && after >= 0 && after <= 8, "resident %ld kB, then %ld kB (%g)", before, after, sum);
	CHECK(memcmp(t->data, v, t->nbytes) == 0);

	rows = st_rows(t, 3, 2);
	CHECK(rows.shape[0] == 2 && rows.shape[1] == 1024 && rows.numel == 2048 &&
		  rows.nbytes == 8192 && memcmp(rows.data, v + 3 * 1024, 8192) == 0);

	memcpy(heap, v, n * sizeof(float));
	copy = *t;
	copy.data = (const uint8_t *) heap;
	st_release(set, &copy);
	CHECK(memcmp(heap, v, n * sizeof(float)) == 0);
	st_close(set);
	free(v);
	free(heap);
	remove_tmpdir(dir);
}

/* Two shards: "a" and "b" in shard 1, "c" in shard 2. */
static void
write_shards(const char *dir, dl_error *err)
{
	static const float v[4] = {1, 2, 3, 4};
	st_write_tensor s1[] = {{"a", ST_F32, 1, {2}, v}, {"b", ST_F32, 1, {1}, v + 2}};
	st_write_tensor s2[] = {{"c", ST_F32, 2, {1, 1}, v + 3}};

	st_write(in_dir(dir, "model-00001-of-00002.safetensors"), s1, 2, NULL, 0, err);
	st_write(in_dir(dir, "model-00002-of-00002.safetensors"), s2, 1, NULL, 0, err);
}

#define INDEX_HEAD "{\"metadata\":{\"total_size\":16},\"weight_map\":{"

TEST(st_open_sharded)
{
	char	   *dir = make_tmpdir();
	st_set	   *set;
	const st_tensor *t;
	dl_error	err;

	CHECK(dir != NULL);
	write_shards(dir, &err);
	write_text(dir, "model.safetensors.index.json", INDEX_HEAD
			   "\"c\":\"model-00002-of-00002.safetensors\","
			   "\"a\":\"model-00001-of-00002.safetensors\","
			   "\"b\":\"model-00001-of-00002.safetensors\"}}\n");
	CHECK_OK(st_open(dir, &set, &err), &err);
	CHECK(set->nfiles == 2 && set->ntensors == 3);
	t = st_find(set, "c");
	CHECK(t && t->ndim == 2 && strstr(set->paths[t->file], "model-00002-of-00002"));
	{
		float		out[2];

		CHECK_OK(st_to_f32(st_find(set, "a"), out, &err), &err);
		CHECK(out[0] == 1.0f && out[1] == 2.0f);
		CHECK_OK(st_to_f32(t, out, &err), &err);
		CHECK(out[0] == 4.0f);
	}
	CHECK(strstr(set->paths[st_find(set, "b")->file], "model-00001-of-00002"));
	st_close(set);
	remove_tmpdir(dir);
}

/*
 * st_open on dir with this index must fail with code and a message holding both
 * needles; the error is left in the caller's err.
 */
#define CHECK_BAD_INDEX(dir, index, code, needle1, needle2) do { \
	st_set	   *s_ = NULL; \
	dl_status	r_; \
	write_text(dir, "model.safetensors.index.json", index); \
	r_ = st_open(dir, &s_, &err); \
	if (r_ == DL_OK) st_close(s_); \
	CHECKF(r_ == (code), "got %s: %s", dl_status_name(r_), r_ == DL_OK ? "" : err.msg); \
	CHECKF(strstr(err.msg, needle1) && strstr(err.msg, needle2), "message: %s", err.msg); \
	} while (0)

TEST(st_open_sharded_errors)
{
	char	   *dir = make_tmpdir();
	dl_error	err;

	CHECK(dir != NULL);
	write_shards(dir, &err);
	/* shard names must stay inside the model directory */
	CHECK_BAD_INDEX(dir, INDEX_HEAD "\"a\":\"../model-00001-of-00002.safetensors\"}}",
					DL_EFORMAT, "../model-00001", "\"a\"");
	CHECKF(strstr(err.hint, "model directory itself"), "hint: %s", err.hint);
	CHECK_BAD_INDEX(dir, INDEX_HEAD "\"a\":\"/etc/passwd\"}}", DL_EFORMAT, "/etc/passwd", "plain file");
	CHECK_BAD_INDEX(dir, INDEX_HEAD "\"a\":\"..\"}}", DL_EFORMAT, "\"..\"", "plain file");
	CHECK_BAD_INDEX(dir, INDEX_HEAD "\"a\":\"x\\u0000y\"}}", DL_EFORMAT, "\"a\"", "plain file");
	/* a tensor the index places in a shard that lacks it */
	CHECK_BAD_INDEX(dir, INDEX_HEAD "\"c\":\"model-00001-of-00002.safetensors\"}}",
					DL_EFORMAT, "\"c\"", "does not contain");
	/* a shard that does not exist */
	CHECK_BAD_INDEX(dir, INDEX_HEAD "\"a\":\"model-00003-of-00003.safetensors\"}}",
					DL_EIO, "model-00003-of-00003.safetensors", "No such file");
	CHECK_BAD_INDEX(dir, "{\"weight_map\":{}}", DL_EFORMAT, "weight_map", "index.json");
	CHECK_BAD_INDEX(dir, "{\"weight_map\":{\"a\":3}}", DL_EFORMAT, "\"a\"", "file name");
	CHECK_BAD_INDEX(dir, "{\"weight_map\":", DL_EFORMAT, "index.json", "JSON");
	CHECK_BAD_INDEX(dir, "", DL_EFORMAT, "index.json", "empty");

	/* the same tensor in two shards */
	{
		static const float v[1] = {5};
		st_write_tensor s3[] = {{"a", ST_F32, 1, {1}, v}};

		CHECK_OK(st_write(in_dir(dir, "model-00002-of-00002.safetensors"), s3, 1, NULL, 0, &err), &err);
		CHECK_BAD_INDEX(dir, INDEX_HEAD "\"a\":\"model-00001-of-00002.safetensors\","
						"\"b\":\"model-00002-of-00002.safetensors\"}}",
						DL_EFORMAT, "\"b\"", "does not contain");
		CHECK_BAD_INDEX(dir, INDEX_HEAD "\"b\":\"model-00001-of-00002.safetensors\","
						"\"a\":\"model-00002-of-00002.safetensors\"}}",
						DL_EFORMAT, "\"a\"", "two shards");
	}
	/* a damaged shard is reported by its own path */
	write_text(dir, "model-00002-of-00002.safetensors", "garbage!garbage!");
	CHECK_BAD_INDEX(dir, INDEX_HEAD "\"c\":\"model-00002-of-00002.safetensors\"}}",
					DL_EFORMAT, "model-00002-of-00002.safetensors", "header");
	remove_tmpdir(dir);
}

TEST(st_open_directory_errors)
{
	char	   *dir = make_tmpdir();
	st_set	   *set;
	dl_error	err;

	CHECK(dir != NULL);
	CHECK(st_open(dir, &set, &err) == DL_EIO);
	CHECKF(strstr(err.msg, dir) && strstr(err.hint, "model.safetensors.index.json") &&
		   strstr(err.hint, "pytorch_model.bin.index.json"), "%s / %s", err.msg, err.hint);
	/* without safetensors, pytorch_model.bin is read (and reported by path) */
	write_text(dir, "pytorch_model.bin", "x");
	CHECK(st_open(dir, &set, &err) == DL_EFORMAT);
	CHECKF(strstr(err.msg, "pytorch_model.bin:") && strstr(err.hint, "torch.save"), "%s / %s",
		   err.msg, err.hint);
	CHECK(st_open("/nonexistent/model", &set, &err) == DL_EIO);
	CHECKF(strstr(err.msg, "/nonexistent/model"), "%s", err.msg);

	/* model.safetensors is preferred over an index (and .bin), and a bad one is reported by path */
	write_text(dir, "model.safetensors.index.json", "not json");
	write_bytes(dir, "model.safetensors", "\x10\0\0\0\0\0\0\0{\"a\":1}         ", 24);
	CHECK(st_open(dir, &set, &err) == DL_EFORMAT);
	CHECKF(strstr(err.msg, "model.safetensors:") && err.hint[0], "%s", err.msg);
	write_text(dir, "model.safetensors", "");
	CHECK(st_open(dir, &set, &err) == DL_EFORMAT);
	CHECKF(strstr(err.msg, "empty"), "%s", err.msg);
	remove_tmpdir(dir);
}

/* Open fixture model dir, convert every float tensor, load its config.json. */
static void
check_fixture_model(const char *model, bool sharded, dl_arch arch, int *failed_)
{
	char		dir[4096];
	st_set	   *set;
	dl_config	cfg;
	dl_error	err;
	size_t		maxn = 0;
	float	   *buf;

	snprintf(dir, sizeof(dir), "%s", fixture_path(model));
	CHECK_OK(st_open(dir, &set, &err), &err);
	CHECKF(sharded ? set->nfiles > 1 : set->nfiles == 1, "%s: %d files", model, set->nfiles);
	CHECK(set->ntensors > 0);
	for (int i = 0; i < set->ntensors; i++)
		if ((size_t) set->tensors[i].numel > maxn)
			maxn = (size_t) set->tensors[i].numel;
	buf = malloc(maxn * sizeof(float));
	for (int i = 0; i < set->ntensors; i++)
	{
		const st_tensor *t = &set->tensors[i];

		CHECK(i == 0 || strcmp(set->tensors[i - 1].name, t->name) < 0);
		CHECK(t->dtype == ST_F32 || t->dtype == ST_BF16);
		CHECK_OK(st_to_f32(t, buf, &err), &err);
		for (int64_t k = 0; k < t->numel; k++)
			CHECKF(isfinite(buf[k]), "%s: %s[%lld] = %g", model, t->name, (long long) k, buf[k]);
	}
	free(buf);
	st_close(set);
	snprintf(dir, sizeof(dir), "%s", fixture_path(model));
	strcat(dir, "/config.json");
	CHECK_OK(config_load(dir, &cfg, &err), &err);
	CHECK(cfg.arch == arch && cfg.rotary_dim > 0 && cfg.rotary_dim <= cfg.head_dim);
}

TEST(st_fixture_models)
{
	static const struct
	{
		const char *name;
		dl_arch		arch;
	}			models[] = {
		{"gptj-f32", DL_ARCH_GPTJ}, {"gptj-bf16", DL_ARCH_GPTJ},
		{"neox-par-f32", DL_ARCH_GPTNEOX}, {"neox-par-bf16", DL_ARCH_GPTNEOX},
		{"neox-seq-f32", DL_ARCH_GPTNEOX},
	};
	struct stat sb;

	if (stat(fixture_path("neox-seq-f32/model.safetensors.index.json"), &sb) != 0)
		SKIP("fixture models not generated yet");
	for (size_t i = 0; i < sizeof(models) / sizeof(models[0]); i++)
	{
		bool		sharded = strcmp(models[i].name, "neox-seq-f32") == 0;
		char		rel[256];

		snprintf(rel, sizeof(rel), "%s/%s", models[i].name,
				 sharded ? "model.safetensors.index.json" : "model.safetensors");
		CHECKF(stat(fixture_path(rel), &sb) == 0, "missing %s", rel);
		check_fixture_model(models[i].name, sharded, models[i].arch, failed_);
		if (*failed_)
			return;
	}
}

TEST(st_fixture_expected_outputs)
{
	st_set	   *set;
	const st_tensor *ids;
	dl_error	err;
	struct stat sb;

	if (stat(fixture_path("gptj-f32/expected.safetensors"), &sb) != 0)
		SKIP("fixture models not generated yet");
	CHECK_OK(st_open_file(fixture_path("gptj-f32/expected.safetensors"), &set, &err), &err);
	ids = st_find(set, "prompt_0_ids");
	CHECK(ids && ids->dtype == ST_I32 && ids->ndim == 1 && ids->numel > 0);
	CHECK(st_find(set, "prompt_0_logits") && st_find(set, "prompt_0_logits")->ndim == 2);
	CHECK(st_find(set, "prompt_0_greedy") && st_find(set, "prompt_0_greedy")->numel == 32);
	st_close(set);
}
