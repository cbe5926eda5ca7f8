/*
 * dolly_cli.h: what dolly-cli's two files share: the options of all commands, the helpers
 * the commands call, and the commands that write model directories (dolly_cli_train.c).
 */
#ifndef DOLLY_CLI_H
#define DOLLY_CLI_H

#include <stdint.h>

#include "backend.h"
#include "error.h"
#include "lora.h"
#include "model.h"
#include "sampler.h"

/* Command-line options of all commands. */
typedef struct options
{
	const char *model;
	int			threads;
	int			cuda_device;	/* -1: the CPU backend */
	int			max_new;
	dl_sampling sampling;
	uint64_t	seed;
	const char *context;		/* generate: the record's context; init: positions */
	int			raw;
	int			prompt_tokens;
	int			gen_tokens;
	int			batch;
	const char *instruction;	/* generate's instruction, logits' text */
	int			seed_given;
	/* init */
	const char *arch;
	int			layers;
	int			hidden;
	int			heads;
	int			inner;
	float		rotary_pct;
	int			tie;
	const char *tokenizer;
	const char *out;
	/* train */
	const char *data;
	int			epochs;
	float		lr;
	int			batch_size;
	int			max_length;
	int			max_tokens;
	int			warmup;
	float		eval_fraction;
	int			checkpoint;
	int			bf16;			/* --bf16: CPU matrices in bfloat16 */
	/* LoRA: adapters to run (generate, logits: the first; bench: round robin) */
	const char *adapters[8];
	int			nadapters;
	int			lora;			/* train: an adapter, not the whole model */
	dl_lora_config lora_cfg;
} options;

/* Report an engine error (and its hint) on stderr; returns the exit status 1. */
int			report(const dl_error *err);

/* Parse a whole number in [lo, hi] for option opt; 0 on success. */
int			parse_long(const char *opt, const char *s, long long lo, long long hi, long long *out);

/*
 * The backend o asks for and the model of --model, without a tokenizer; 0 on success. On
 * a GPU, mode says how: bfloat16 to generate, mixed (float32 master weights, bfloat16
 * products) to train.
 */
int			load(const options *o, dl_cuda_mode mode, dl_backend **be, dl_model **m, dl_error *err);

/*
 * Peak resident memory of this process in MB (VmHWM), -1 if unknown. Not getrusage's
 * ru_maxrss: that counts the parent's memory when a large process (a Python benchmark)
 * forked us, before exec.
 */
double		peak_rss_mb(void);

/* Load o's adapters of m into out[0 .. o->nadapters); 0 on success. */
int			load_adapters(const options *o, const dl_model *m, dl_lora **out, dl_error *err);

/* The commands that write a model directory; each returns the exit status. */
int			cmd_init(const options *o);
int			cmd_train(const options *o);
int			cmd_convert(const options *o);
int			cmd_merge(const options *o);

#endif
