/*
 * bench_cuda.c: decode throughput of a model on the CUDA backend (bfloat16), against the
 * memory-bandwidth limit measured on the same GPU. Prints key=value lines that
 * bench_gptj6b.py turns into its table:
 *   gpu, copy_gbs        device-to-device copy, bytes read + written per second
 *   weight_bytes         bytes read per decode step (every matrix and vector once, one
 *                        embedding row), limit_tok_s = copy_gbs / weight_bytes
 *   b1_prefill_tok_s     one prompt through the model
 *   b1_decode_tok_s      greedy decode of one sequence (median of the timed runs)
 *   bN_decode_tok_s      aggregate greedy decode of N sequences stepping together
 *   sample_bN_*_us       sample_forward alone on N rows of the vocabulary: greedy, and
 *                        sampling with top_p 0.9 (its radix select) or 0.999999 (a cut
 *                        deep in the tail)
 *   bN_launches_per_step kernels (a cuBLAS call as one) a decode step of N sequences
 *                        launches, and per layer: on the emulated plugin only, which
 *                        counts them (the first count towards CUDA graphs and fusion)
 * Each timed run starts from a fresh prefill; a full warm-up run comes first.
 *
 *   bench_cuda --model DIR --prompts FILE [--gen 128] [--batch 64] [--repeat 3]
 *              [--plugin ./dolly_cuda.so] [--device 0]
 * The prompts file holds one prompt per line as space-separated token ids; line 0 is the
 * batch-1 prompt, lines 0 .. N-1 the batch.
 */
#include "../../src/engine/backend.h"
#include "../../src/engine/cuda_plugin.h"
#include "../../src/engine/model.h"
#include "../../src/engine/sampler.h"
#include "bench_util.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PROMPTS 256
#define COPY_BYTES ((size_t) 1 << 30)

/* Print err and exit. */
static void
die(const char *what, const dl_error *err)
{
	bench_die("bench_cuda", what, err);
}

/* Median of n values (sorts them). */
static double
median(double *v, int n)
{
	for (int i = 1; i < n; i++)
		for (int j = i; j > 0 && v[j] < v[j - 1]; j--)
		{
			double		t = v[j];

			v[j] = v[j - 1];
			v[j - 1] = t;
		}
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/*
 * Device-to-device copy bandwidth, bytes read plus written per second: the median of
 * 5 timings of 10 copies of 1 GiB, after a warm-up copy.
 */
static double
copy_bandwidth(dl_backend *be)
{
	dl_error	err;
	void	   *a = be->alloc(be, COPY_BYTES, &err),
			   *b;
	double		t[5];

	if (a == NULL || (b = be->alloc(be, COPY_BYTES, &err)) == NULL)
		die("allocating the copy buffers", &err);
	be->zero(be, a, COPY_BYTES);
	be->copy(be, b, a, COPY_BYTES);
	if (be->synchronize(be, &err) != DL_OK)
		die("copy warm-up", &err);
	for (int r = 0; r < 5; r++)
	{
		double		t0 = sys_now_s();

		for (int i = 0; i < 10; i++)
			be->copy(be, i % 2 ? a : b, i % 2 ? b : a, COPY_BYTES);
		if (be->synchronize(be, &err) != DL_OK)
			die("copy", &err);
		t[r] = 2.0 * 10 * COPY_BYTES / (sys_now_s() - t0);
	}
	be->free(be, a);
	be->free(be, b);
	return median(t, 5);
}

/*
 * Microseconds one sample_forward takes on rows x V logits (random, scale 4, so top-p
 * keeps hundreds to thousands of tokens): the median of 5 timings of 10 calls.
 */
static double
sample_us(dl_backend *be, int V, int rows, dl_sampling p)
{
	size_t		n = (size_t) rows * V;
	float	   *h = malloc(n * sizeof(float));
	dl_sample_row *r = malloc(rows * sizeof(dl_sample_row));
	void	   *logits,
			   *d_rows,
			   *tokens,
			   *ws;
	dl_error	err;
	double		t[5];
	uint64_t	s = 42;

	for (size_t i = 0; i < n; i++)
	{
		s = s * 6364136223846793005ull + 1442695040888963407ull;	/* an LCG's top 24 bits */
		h[i] = (float) (s >> 40) * 0x1p-24f * 8.0f - 4.0f;
	}
	for (int i = 0; i < rows; i++)
		r[i] = (dl_sample_row) {p, (i + 0.5) / rows};
	if (!(logits = be->alloc(be, n * sizeof(float), &err)) ||
		!(d_rows = be->alloc(be, rows * sizeof(dl_sample_row), &err)) ||
		!(tokens = be->alloc(be, rows * sizeof(int32_t), &err)) ||
		!(ws = be->alloc(be, be->sample_workspace(be, rows, V), &err)) ||
		be->upload(be, logits, h, n * sizeof(float), &err) != DL_OK ||
		be->upload(be, d_rows, r, rows * sizeof(dl_sample_row), &err) != DL_OK)
		die("sampling buffers", &err);
	for (int k = 0; k < 6; k++)
	{
		double		t0 = sys_now_s();

		for (int i = 0; i < 10; i++)
			be->sample_forward(be, tokens, logits, d_rows, rows, V, ws);
		if (be->synchronize(be, &err) != DL_OK)
			die("sampling", &err);
		if (k)					/* the first round warms up */
			t[k - 1] = (sys_now_s() - t0) / 10 * 1e6;
	}
	be->free(be, logits), be->free(be, d_rows), be->free(be, tokens), be->free(be, ws);
	free(h), free(r);
	return median(t, 5);
}

/* sample_us for rows rows: greedy, top-p 0.9, and top-p with its cut deep in the tail. */
static void
sample_report(dl_backend *be, int V, int rows)
{
	printf("sample_b%d_greedy_us=%.1f\n", rows, sample_us(be, V, rows, (dl_sampling) {0, 1.0f, 0, 1.0f}));
	printf("sample_b%d_topp09_us=%.1f\n", rows, sample_us(be, V, rows, (dl_sampling) {1, 1.0f, 0, 0.9f}));
	printf("sample_b%d_topp0999999_us=%.1f\n", rows,
		   sample_us(be, V, rows, (dl_sampling) {1, 1.0f, 0, 0.999999f}));
}

/* Bytes a decode step reads: every parameter once, except one row of an untied embedding. */
static double
decode_bytes(const dl_model *m)
{
	double		bytes = 0;

	for (int i = 0; i < m->nmap; i++)
	{
		const dl_tensor_map *e = &m->map[i];
		double		n = (double) e->shape[0] * (e->ndim == 2 ? e->shape[1] : 1);
		double		es = e->fmt == DL_FMT_WEIGHT ? m->be->weight_elem_size : 4;

		if ((char *) m->param_mem + e->offset == (char *) m->p.wte && m->p.wte != m->p.lm_head)
			n = e->ndim == 2 ? e->shape[1] : 1;
		bytes += n * es;
	}
	return bytes;
}

/* Read up to MAX_PROMPTS lines of token ids; returns how many. */
static int
read_prompts(const char *path, int32_t **ids, int *lens)
{
	FILE	   *f = fopen(path, "r");
	char	   *line = NULL;
	size_t		cap = 0;
	int			n = 0;

	if (f == NULL)
	{
		perror(path);
		exit(1);
	}
	while (n < MAX_PROMPTS && getline(&line, &cap, f) > 0)
	{
		char	   *p = line,
				   *end;

		ids[n] = malloc(strlen(line) / 2 * sizeof(int32_t) + sizeof(int32_t));
		lens[n] = 0;
		for (long v = strtol(p, &end, 10); end != p; v = strtol(p, &end, 10))
		{
			ids[n][lens[n]++] = (int32_t) v;
			p = end;
		}
		if (lens[n] > 0)
			n++;
	}
	free(line);
	fclose(f);
	return n;
}

/*
 * n sequences (slots 0 .. n-1): prefill their prompts in one pass, then gen greedy decode
 * steps with all of them together, each step's tokens chosen on the device as generation
 * does. *prefill_s and *decode_s get the times; out (if not NULL) the first sequence's
 * tokens.
 */
static void
run(dl_model *m, dl_kv_cache *c, int32_t **prompts, const int *lens, int n, int gen,
	double *prefill_s, double *decode_s, int32_t *out)
{
	dl_seq		seqs[MAX_PROMPTS];
	dl_sample_row rows[MAX_PROMPTS];
	int32_t		next[MAX_PROMPTS];
	dl_error	err;
	double		t0;

	for (int i = 0; i < n; i++)
	{
		seqs[i] = (dl_seq) {i, 0, lens[i], prompts[i], DL_LOGITS_LAST, NULL};
		rows[i] = (dl_sample_row) {{0, 1.0f, 0, 1.0f}, 0.0};
	}
	t0 = sys_now_s();
	if (dl_model_sample(m, c, seqs, n, rows, next, &err) != DL_OK)
		die("prefill", &err);
	*prefill_s = sys_now_s() - t0;
	t0 = sys_now_s();
	for (int step = 0; step < gen; step++)
	{
		for (int i = 0; i < n; i++)
			seqs[i] = (dl_seq) {i, lens[i] + step, 1, &next[i], DL_LOGITS_LAST, NULL};
		if (out)
			out[step] = next[0];
		if (step == gen - 1)
			break;				/* the last token needs no forward pass */
		if (dl_model_sample(m, c, seqs, n, rows, next, &err) != DL_OK)
			die("decode", &err);
	}
	*decode_s = sys_now_s() - t0;
}

/*
 * The launches of one decode step of n sequences: those of a run of 3 tokens less those of
 * a run of 2, as the emulated plugin counts them (emu_launches; a GPU plugin has no count).
 */
static void
launches_report(const char *plugin_path, dl_model *m, dl_kv_cache *c, int32_t **prompts,
				const int *lens, int n)
{
	void	   *h = dlopen(plugin_path, RTLD_NOW | RTLD_NOLOAD);
	unsigned long long (*count) (void) = h ? (unsigned long long (*) (void)) dlsym(h, "emu_launches") : NULL;
	unsigned long long k[3];
	double		pre,
				dec;

	if (count == NULL)
	{
		if (h)
			dlclose(h);
		return;
	}
	k[0] = count();
	run(m, c, prompts, lens, n, 2, &pre, &dec, NULL);
	k[1] = count();
	run(m, c, prompts, lens, n, 3, &pre, &dec, NULL);
	k[2] = count();
	printf("b%d_launches_per_step=%llu\nb%d_launches_per_step_layer=%.1f\n", n,
		   (k[2] - k[1]) - (k[1] - k[0]), n,
		   (double) ((k[2] - k[1]) - (k[1] - k[0])) / m->cfg.n_layer);
	dlclose(h);
}

int
main(int argc, char **argv)
{
	const char *model = NULL,
			   *prompts_path = NULL,
			   *plugin_path = "./dolly_cuda.so";
	int			gen = 128,
				batch = 64,
				repeat = 3,
				device = 0,
				n,
				lens[MAX_PROMPTS],
				max_len = 0,
				total = 0;
	int32_t    *prompts[MAX_PROMPTS],
				tokens[4096];
	const dl_cuda_plugin *plugin;
	dl_gpu_info gpus[DL_MAX_GPUS];
	int			ngpus;
	dl_backend *be;
	dl_model   *m;
	dl_kv_cache *c;
	dl_error	err;
	double		t0,
				pre,
				dec,
				times[16],
				bytes,
				copy;

	setvbuf(stdout, NULL, _IOLBF, 0);	/* each figure out as it is measured */

	for (int i = 1; i + 1 < argc; i += 2)
	{
		if (strcmp(argv[i], "--model") == 0)
			model = argv[i + 1];
		else if (strcmp(argv[i], "--prompts") == 0)
			prompts_path = argv[i + 1];
		else if (strcmp(argv[i], "--gen") == 0)
			gen = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--batch") == 0)
			batch = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--repeat") == 0)
			repeat = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--plugin") == 0)
			plugin_path = argv[i + 1];
		else if (strcmp(argv[i], "--device") == 0)
			device = atoi(argv[i + 1]);
	}
	if (!model || !prompts_path || gen < 2 || gen > 4096 || batch < 1 || repeat < 1 || repeat > 16)
	{
		fprintf(stderr, "usage: bench_cuda --model DIR --prompts FILE [--gen 2..4096] [--batch N] "
				"[--repeat 1..16] [--plugin PATH] [--device N]\n");
		return 2;
	}
	n = read_prompts(prompts_path, prompts, lens);
	batch = batch < n ? batch : n;
	for (int i = 0; i < batch; i++)
	{
		max_len = lens[i] > max_len ? lens[i] : max_len;
		total += lens[i];
	}

	if (cuda_plugin_load(plugin_path, &plugin, &err) != DL_OK ||
		plugin->probe(gpus, DL_MAX_GPUS, &ngpus, &err) != DL_OK)
		die("CUDA plugin", &err);
	if (device >= ngpus)
	{
		fprintf(stderr, "bench_cuda: no GPU %d (%d visible)\n", device, ngpus);
		return 1;
	}
	printf("gpu=%s\n", gpus[device].name);
	if (backend_cuda_create(plugin_path, device, DL_CUDA_BF16, &be, &err) != DL_OK)
		die("CUDA backend", &err);
	copy = copy_bandwidth(be);
	printf("copy_gbs=%.1f\n", copy / 1e9);

	t0 = sys_now_s();
	if (dl_model_load(model, be, &m, &err) != DL_OK)
		die(model, &err);
	printf("load_s=%.2f\n", sys_now_s() - t0);
	bytes = decode_bytes(m);
	printf("weight_bytes=%.0f\nlimit_tok_s=%.1f\n", bytes, copy / bytes);
	if (dl_kv_cache_create(m, batch, max_len + gen, total, &c, &err) != DL_OK)
		die("KV cache", &err);

	/* batch 1: a warm-up run, then the timed ones */
	run(m, c, prompts, lens, 1, gen < 8 ? gen : 8, &pre, &dec, NULL);
	for (int r = 0; r < repeat; r++)
	{
		run(m, c, prompts, lens, 1, gen, &pre, &dec, tokens);
		times[r] = (gen - 1) / dec;
	}
	printf("b1_prefill_tok_s=%.1f\nb1_decode_tok_s=%.1f\n", lens[0] / pre, median(times, repeat));
	printf("b1_tokens=");
	for (int i = 0; i < gen && i < 16; i++)
		printf("%s%d", i ? "," : "", tokens[i]);
	printf("\n");

	/* the batch, the same way */
	if (batch > 1)
	{
		run(m, c, prompts, lens, batch, gen < 8 ? gen : 8, &pre, &dec, NULL);
		for (int r = 0; r < repeat; r++)
		{
			run(m, c, prompts, lens, batch, gen, &pre, &dec, NULL);
			times[r] = (double) batch * (gen - 1) / dec;
		}
		printf("batch=%d\nbN_prefill_tok_s=%.1f\nbN_decode_tok_s=%.1f\n", batch, total / pre,
			   median(times, repeat));
	}
	launches_report(plugin_path, m, c, prompts, lens, 1);
	if (batch > 1)
		launches_report(plugin_path, m, c, prompts, lens, batch);
	sample_report(be, m->cfg.vocab_size, 1);
	if (batch > 1)
		sample_report(be, m->cfg.vocab_size, batch);
	dl_kv_cache_free(c);
	dl_model_free(m);
	be->destroy(be);
	for (int i = 0; i < n; i++)
		free(prompts[i]);
	return 0;
}
