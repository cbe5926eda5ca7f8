/*
 * fuzz_safetensors.c: libFuzzer target for st_parse (a whole file image) and st_to_f32
 * on every tensor of what parses.
 *
 * Build and run from the repository root (seeds written by the reference Python writer):
 *
 *   make build/fuzz/fuzz_safetensors
 *   mkdir -p /tmp/st_corpus && python3 -c "
 *   import numpy as np; from safetensors.numpy import save_file
 *   d = '/tmp/st_corpus/'
 *   save_file({'a': np.arange(6, dtype=np.float32).reshape(2, 3)}, d + 'f32')
 *   save_file({'w': np.ones((2, 2), np.float16), 'b': np.zeros(3, np.int64),
 *              's': np.array(1.5, np.float64), 'e': np.zeros((0, 4), np.uint8)},
 *             d + 'mixed', metadata={'format': 'pt'})
 *   save_file({}, d + 'empty')"
 *   cp tests/fixtures/neox-par-bf16/model.safetensors /tmp/st_corpus/bf16
 *   build/fuzz/fuzz_safetensors -max_total_time=300 -max_len=4096 /tmp/st_corpus
 *
 * Beyond "no crash, no sanitizer report", it checks what st_parse promises: every
 * error names the file, and what parses keeps fuzz_tensors.h's promises.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_tensors.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	st_tensor  *t;
	int			n;
	dl_error	err;

	if (st_parse(data, size, "fuzz.safetensors", &t, &n, &err) == DL_OK)
		fuzz_check_tensors(t, n, data + 8, size - 8);	/* after the header length */
	else if (strstr(err.msg, "fuzz.safetensors") == NULL)
		abort();
	return 0;
}
