/*
 * bench_train.c: fine-tuning throughput of a model directory on the CUDA backend in
 * mixed mode (float32 master weights, bfloat16 products), or on the CPU backend with
 * --device -1 (a check of the benchmark itself). Random examples of --seq tokens, every
 * position a label, --batch of them per optimizer step: the shape of a plain torch loop
 * (bench_train_1b.py runs that loop on the same model and prints the table). Prints
 * key=value lines:
 *   gpu, params        the device and the parameters of the model files
 *   step_s             median seconds of an optimizer step (forward, backward, AdamW)
 *   tokens_per_s       batch * seq / step_s
 *   loss_first, loss_last  the mean loss of the first and last timed steps
 *
 *   bench_train --model DIR [--batch 8] [--seq 1024] [--steps 8] [--checkpoint]
 *               [--plugin ./dolly_cuda.so] [--device 0]
 */
#include "../../src/engine/backend.h"
#include "../../src/engine/cuda_plugin.h"
#include "../../src/engine/model.h"
#include "../../src/engine/train.h"
#include "bench_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_STEPS 64

/* Print err and exit. */
static void
die(const char *what, const dl_error *err)
{
	bench_die("bench_train", what, err);
}

/* Ascending order of doubles, for qsort. */
static int
by_value(const void *a, const void *b)
{
	double		x = *(const double *) a,
				y = *(const double *) b;

	return (x > y) - (x < y);
}

int
main(int argc, char **argv)
{
	const char *model = NULL,
			   *plugin_path = "./dolly_cuda.so";
	int			batch = 8,
				seq = 1024,
				steps = 8,
				device = 0,
				checkpoint = 0;
	dl_backend *be;
	dl_model   *m;
	dl_trainer *tr;
	dl_train_config cfg;
	dl_example *ex;
	dl_error	err;
	double		times[MAX_STEPS],
				loss_first = 0,
				loss_last = 0;
	uint64_t	s = 1234;

	setvbuf(stdout, NULL, _IOLBF, 0);	/* each figure out as it is measured */

	for (int i = 1; i < argc; i++)
	{
		const char *a = argv[i],
				   *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (strcmp(a, "--checkpoint") == 0)
			checkpoint = 1;
		else if (v == NULL)
		{
			fprintf(stderr, "bench_train: %s needs a value\n", a);
			return 1;
		}
		else if (strcmp(a, "--model") == 0)
			model = argv[++i];
		else if (strcmp(a, "--plugin") == 0)
			plugin_path = argv[++i];
		else if (strcmp(a, "--batch") == 0)
			batch = atoi(argv[++i]);
		else if (strcmp(a, "--seq") == 0)
			seq = atoi(argv[++i]);
		else if (strcmp(a, "--steps") == 0)
			steps = atoi(argv[++i]);
		else if (strcmp(a, "--device") == 0)
			device = atoi(argv[++i]);
		else
		{
			fprintf(stderr, "bench_train: unknown option %s\n", a);
			return 1;
		}
	}
	if (model == NULL || batch < 1 || seq < 2 || steps < 1 || steps > MAX_STEPS)
	{
		fprintf(stderr, "usage: bench_train --model DIR [--batch B] [--seq T] [--steps 1..%d] [--checkpoint] [--plugin SO] [--device N|-1]\n",
				MAX_STEPS);
		return 1;
	}
	if ((device < 0 ? backend_cpu_create(2, 0, &be, &err)
		 : backend_cuda_create(plugin_path, device, DL_CUDA_MIXED, &be, &err)) != DL_OK)
		die("backend", &err);
	if (device >= 0)
	{
		const dl_cuda_plugin *plugin;
		dl_gpu_info gpus[DL_MAX_GPUS];
		int			ngpus;

		if (cuda_plugin_load(plugin_path, &plugin, &err) != DL_OK ||
			plugin->probe(gpus, DL_MAX_GPUS, &ngpus, &err) != DL_OK)
			die("CUDA plugin", &err);
		printf("gpu=%s\n", gpus[device].name);
	}
	if (dl_model_load(model, be, &m, &err) != DL_OK)
		die(model, &err);
	printf("params=%lld\n", (long long) dl_model_param_count(m));

	/* random tokens; labels from position 1: every next token is predicted */
	ex = calloc(batch, sizeof(dl_example));
	for (int b = 0; b < batch; b++)
	{
		ex[b].ids = malloc(seq * sizeof(int32_t));
		ex[b].n = seq;
		ex[b].first_label = 1;
		for (int t = 0; t < seq; t++)
		{
			s = s * 6364136223846793005ULL + 1442695040888963407ULL;
			ex[b].ids[t] = (int32_t) ((s >> 33) % (uint64_t) m->cfg.vocab_size);
		}
	}
	train_defaults(&cfg);
	cfg.lr = 1e-5f;
	cfg.warmup_steps = 0;
	cfg.max_tokens = batch * seq;
	cfg.max_length = seq;
	cfg.checkpoint = checkpoint;
	if (trainer_create(m, NULL, &cfg, NULL, 0, &tr, &err) != DL_OK)
		die("trainer", &err);

	/* two warm-up steps (cuBLAS picks its kernels, the scratch buffers grow), then the timed ones */
	for (int i = -2; i < steps; i++)
	{
		double		t0 = sys_now_s(),
					loss;
		int64_t		labels;
		float		lr,
					norm;

		if (trainer_backward(tr, ex, batch, &loss, &labels, &err) != DL_OK ||
			trainer_update(tr, labels, i + 2, &lr, &norm, &err) != DL_OK)
			die("training step", &err);
		if (i >= 0)
			times[i] = sys_now_s() - t0;
		if (i == 0)
			loss_first = loss / labels;
		loss_last = loss / labels;
	}
	qsort(times, steps, sizeof(double), by_value);
	printf("batch=%d\nseq=%d\ncheckpoint=%d\n", batch, seq, checkpoint);
	printf("step_s=%.4f\ntokens_per_s=%.1f\n", times[steps / 2], batch * seq / times[steps / 2]);
	printf("loss_first=%.4f\nloss_last=%.4f\n", loss_first, loss_last);
	trainer_free(tr);
	for (int b = 0; b < batch; b++)
		free(ex[b].ids);
	free(ex);
	dl_model_free(m);
	be->destroy(be);
	return 0;
}
