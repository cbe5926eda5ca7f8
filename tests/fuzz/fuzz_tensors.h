/*
 * fuzz_tensors.h: what the fuzz targets of the weight readers check on every tensor list
 * a reader accepts, beyond "no crash, no sanitizer report": tensors inside the file image
 * with nbytes = numel * dtype size, names sorted and unique, and st_to_f32 succeeding on
 * exactly the float dtypes. abort() on a broken promise, so libFuzzer reports it.
 */
#ifndef DOLLY_FUZZ_TENSORS_H
#define DOLLY_FUZZ_TENSORS_H

#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

/* Check t[0..n) parsed from the image buf[0..size); frees it. */
static void
fuzz_check_tensors(st_tensor *t, int n, const uint8_t *buf, size_t size)
{
	dl_error	err;

	for (int i = 0; i < n; i++)
	{
		float	   *dst;
		dl_status	st;

		if (t[i].data < buf || t[i].nbytes > size || t[i].data + t[i].nbytes > buf + size ||
			t[i].nbytes != (size_t) t[i].numel * st_dtype_size(t[i].dtype) ||
			(i > 0 && strcmp(t[i - 1].name, t[i].name) >= 0))
			abort();
		dst = malloc((size_t) t[i].numel * sizeof(float) + 1);
		st = st_to_f32(&t[i], dst, &err);
		if ((st == DL_OK) != (t[i].dtype == ST_F32 || t[i].dtype == ST_F16 || t[i].dtype == ST_BF16))
			abort();
		free(dst);
	}
	st_free_tensors(t, n);
}

#endif
