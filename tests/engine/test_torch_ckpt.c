/*
 * test_torch_ckpt.c: the PyTorch checkpoint reader on archives that torch.save wrote
 * (tests/fixtures/torch-ckpt, made by tests/make_fixtures.py build_torch_archives):
 * values, dtypes, shapes, storages shared by views at offsets, the same archive in
 * ZIP64's layout; the damaged and malicious archives refused, each with its error; every
 * truncation and every flipped byte of a good one refused or read inside the file.
 */
#include "harness.h"
#include "../../src/engine/safetensors.h"
#include "../../src/engine/torch_ckpt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The whole of a fixture file, malloc'd; NULL when it cannot be read. */
static uint8_t *
slurp(const char *rel, size_t *size)
{
	FILE	   *f = fopen(fixture_path(rel), "rb");
	uint8_t    *buf = NULL;
	long		n;

	if (f && fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) > 0 && fseek(f, 0, SEEK_SET) == 0 &&
		(buf = malloc((size_t) n)) != NULL && fread(buf, 1, (size_t) n, f) != (size_t) n)
	{
		free(buf);
		buf = NULL;
	}
	else if (buf)
		*size = (size_t) n;
	if (f)
		fclose(f);
	return buf;
}

/* Tensor name of set as float32 values (malloc'd), NULL if absent or not a float. */
static float *
values(const st_set *set, const char *name)
{
	const st_tensor *t = st_find(set, name);
	float	   *v = t ? malloc((t->numel ? t->numel : 1) * sizeof(float)) : NULL;

	if (v && st_to_f32(t, v, NULL) != DL_OK)
	{
		free(v);
		return NULL;
	}
	return v;
}

/* Whether the float tensor name of set holds exactly the n values want. */
static int
holds(const st_set *set, const char *name, const float *want, int n)
{
	const st_tensor *t = st_find(set, name);
	float	   *v = values(set, name);
	int			ok = v && t->numel == n && memcmp(v, want, n * sizeof(float)) == 0;

	if (!ok)
		fprintf(stderr, "  %s: not the values torch saved\n", name);
	free(v);
	return ok;
}

/* The tensors of views.bin (build_torch_archives): every value, dtype, shape and view. */
static void
check_views(const char *rel, int *failed_)
{
	static const float whole[] = {0, 0.25f, 0.5f, 0.75f, 1, 1.25f, 1.5f, 1.75f, 2, 2.25f};
	static const float matrix[] = {-2.5f, -1.5f, -0.5f, 0.5f, 1.5f, 2.5f};
	static const float half[] = {1.5f, -2.0f, 65504.0f};
	static const float brain[] = {0.5f, -3.0f, 0x1.94p+99f};	/* 1e30 in bfloat16 */
	static const float scalar[] = {-1e9f};
	static const int64_t ids[] = {7, -1, (int64_t) 1 << 40};
	st_set	   *set;
	const st_tensor *w,
			   *t,
			   *m;
	dl_error	err;

	CHECK_OK(st_open_file(fixture_path(rel), &set, &err), &err);
	CHECKF(set->ntensors == 11, "%d tensors", set->ntensors);
	CHECK(holds(set, "whole", whole, 10) && holds(set, "head", whole, 4) &&
		  holds(set, "tail", whole + 4, 6) && holds(set, "row", whole + 5, 5) &&
		  holds(set, "matrix", matrix, 6) && holds(set, "half", half, 3) &&
		  holds(set, "brain", brain, 3) && holds(set, "scalar", scalar, 1));
	/* views share their storage: one copy of the bytes, at the views' offsets */
	w = st_find(set, "whole");
	CHECK(st_find(set, "head")->data == w->data && st_find(set, "tail")->data == w->data + 16 &&
		  st_find(set, "row")->data == w->data + 20);
	t = st_find(set, "matrix");
	CHECK(t->dtype == ST_F32 && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3);
	CHECK(st_find(set, "half")->dtype == ST_F16 && st_find(set, "brain")->dtype == ST_BF16);
	t = st_find(set, "scalar");
	CHECK(t->ndim == 0 && t->numel == 1 && t->nbytes == 4);
	t = st_find(set, "ids");
	CHECK(t->dtype == ST_I64 && t->numel == 3 && memcmp(t->data, ids, sizeof(ids)) == 0);
	m = st_find(set, "mask");
	CHECK(m->dtype == ST_BOOL && m->ndim == 4 && m->shape[2] == 3 && m->shape[3] == 3);
	for (int r = 0; r < 3; r++)
		for (int c = 0; c < 3; c++)
			CHECK(m->data[r * 3 + c] == (c <= r));
	t = st_find(set, "empty");
	CHECK(t->ndim == 2 && t->shape[0] == 0 && t->shape[1] == 4 && t->numel == 0 && t->nbytes == 0);
	st_close(set);
}

TEST(torch_ckpt_views)
{
	if (access(fixture_path("torch-ckpt/views.bin"), R_OK) != 0)
		SKIP("torch-ckpt fixtures not generated yet");
	check_views("torch-ckpt/views.bin", failed_);
}

/* The same entries laid out as torch lays out archives past 4 GB: the same tensors. */
TEST(torch_ckpt_zip64)
{
	if (access(fixture_path("torch-ckpt/zip64.bin"), R_OK) != 0)
		SKIP("torch-ckpt fixtures not generated yet");
	check_views("torch-ckpt/zip64.bin", failed_);
}

TEST(torch_ckpt_refuses_bad_archives)
{
	static const struct
	{
		const char *file;
		dl_status	code;
		const char *says;
	}			cases[] = {
		{"os_system.bin", DL_EUNSUPPORTED, "global posix.system, which is not one a state dict"},
		{"numpy_global.bin", DL_EUNSUPPORTED, "global numpy._core.multiarray._reconstruct,"},
		{"short_storage.bin", DL_EFORMAT, "storage \"0\" holds 8 bytes, but 4 F32 elements need 16"},
		{"past_storage.bin", DL_EFORMAT, "a tensor of 4 elements at offset 1 runs past its storage of 4"},
		{"bad_offset.bin", DL_EFORMAT, "zip entry \"small/data/0\" has no local header"},
		{"noncontiguous.bin", DL_EUNSUPPORTED, "not contiguous (dimension 1 has stride 3, not 1)"},
		{"compressed.bin", DL_EUNSUPPORTED, "is compressed (method 8)"},
		{"legacy.bin", DL_EUNSUPPORTED, "format of torch before 1.6"},
	};

	if (access(fixture_path("torch-ckpt/views.bin"), R_OK) != 0)
		SKIP("torch-ckpt fixtures not generated yet");
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
	{
		char		rel[128];
		st_set	   *set = NULL;
		dl_error	err;
		dl_status	st;

		snprintf(rel, sizeof(rel), "torch-ckpt/%s", cases[i].file);
		st = st_open_file(fixture_path(rel), &set, &err);
		st_close(set);
		CHECKF(st == cases[i].code, "%s: got %s (%s)", rel, dl_status_name(st), st ? err.msg : "");
		CHECKF(strstr(err.msg, fixture_path(rel)) && strstr(err.msg, cases[i].says) && err.hint[0],
			   "%s: %s / %s", rel, err.msg, err.hint);
	}
}

/*
 * Every prefix of a good archive is refused, and so is, or reads inside the file, every
 * archive with one byte flipped (data.pkl's CRC catches the pickle's bytes).
 */
TEST(torch_ckpt_truncated_and_flipped)
{
	size_t		size = 0;
	uint8_t    *good = slurp("torch-ckpt/views.bin", &size);
	int			refused = 0;

	if (good == NULL)
		SKIP("torch-ckpt fixtures not generated yet");
	for (size_t k = 0; k < size; k++)
	{
		uint8_t    *buf = malloc(k ? k : 1);
		st_tensor  *t = NULL;
		int			n = 0;
		dl_error	err;
		dl_status	st;

		memcpy(buf, good, k);
		st = torch_ckpt_parse(buf, k, "cut.bin", &t, &n, &err);
		st_free_tensors(t, st == DL_OK ? n : 0);
		free(buf);
		CHECKF(st != DL_OK && strstr(err.msg, "cut.bin"), "%zu of %zu bytes: %s", k, size,
			   st == DL_OK ? "read" : err.msg);
	}
	for (size_t k = 0; k < size; k++)
	{
		st_tensor  *t = NULL;
		int			n = 0;
		dl_error	err;
		dl_status	st;

		good[k] ^= 0xFF;
		st = torch_ckpt_parse(good, size, "flip.bin", &t, &n, &err);
		good[k] ^= 0xFF;
		if (st != DL_OK)
		{
			refused++;
			CHECKF(strstr(err.msg, "flip.bin"), "byte %zu: %s", k, err.msg);
			continue;
		}
		for (int i = 0; i < n; i++)
			CHECKF(t[i].data >= good && t[i].data + t[i].nbytes <= good + size, "byte %zu: %s outside",
				   k, t[i].name);
		st_free_tensors(t, n);
	}
	/* only the tensors' own bytes (and a few unchecked fields) may change unnoticed */
	CHECKF(refused > (int) size / 2, "%d of %zu flips refused", refused, size);
	free(good);
}
