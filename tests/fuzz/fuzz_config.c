/*
 * fuzz_config.c: libFuzzer target for config_parse.
 *
 * Build and run from the repository root (seeds: the fixtures' config.json files):
 *
 *   make build/fuzz/fuzz_config
 *   mkdir -p /tmp/cfg_corpus
 *   for m in gptj-f32 neox-par-f32 neox-seq-f32; do
 *       cp tests/fixtures/$m/config.json /tmp/cfg_corpus/$m; done
 *   build/fuzz/fuzz_config -max_total_time=120 -max_len=2048 /tmp/cfg_corpus
 *
 * A config that parses must satisfy what the model code relies on.
 */
#include <stdint.h>
#include <stdlib.h>

#include "config.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	dl_config	c;
	dl_error	err;

	if (config_parse((const char *) data, size, &c, &err) != DL_OK)
	{
		if (err.msg[0] == '\0')
			abort();
		return 0;
	}
	if (c.n_embd <= 0 || c.n_head <= 0 || c.n_layer <= 0 || c.n_inner <= 0 || c.max_pos <= 0 ||
		c.head_dim * c.n_head != c.n_embd || c.rotary_dim < 0 || c.rotary_dim % 2 != 0 ||
		c.rotary_dim > c.head_dim || !(c.ln_eps > 0.0f) || !(c.rotary_base > 0.0f) ||
		c.vocab_size != -1)
		abort();
	return 0;
}
