/*
 * train.h: fine-tuning with Dolly's recipe: records to examples, the loss, gradients,
 * AdamW, the learning-rate schedule, growing the vocabulary, saving the result.
 *
 * Dolly's recipe (databrickslabs/dolly training/trainer.py): each record becomes
 * INTRO_BLURB + instruction (+ context) + "### Response:\n" + response + "\n\n### End",
 * tokenised once; labels are the tokens themselves with everything up to and including
 * the first "### Response:\n" token masked out (completion-only loss); the loss is the
 * mean cross-entropy of logits[:, :-1] against labels[:, 1:] over unmasked positions.
 *
 * A step is split so that data parallelism can sit between its parts:
 * trainer_backward() accumulates gradients (and the count of label tokens) for one
 * micro-batch; trainer_reduce() sums the gradients (laid out like the parameters, one
 * flat float array) and the label counts over the ranks of a group (collective.h);
 * trainer_update() divides by the GLOBAL label count, clips the global gradient norm,
 * applies AdamW and zeroes the gradients. One process with one micro-batch per step is
 * the same computation. With ZeRO stages 1 and 2 each rank keeps the optimizer state
 * (and at stage 2 the reduced gradients) of its slice of the parameters only.
 */
#ifndef DOLLY_TRAIN_H
#define DOLLY_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "collective.h"
#include "error.h"
#include "files.h"
#include "lora.h"
#include "model.h"
#include "tokenizer.h"

struct dl_lora;

/* One training example: tokens and where the loss starts. */
typedef struct dl_example
{
	int32_t    *ids;			/* malloc'd */
	int			n;
	int			first_label;	/* ids[first_label..n) are predicted (labels); earlier masked */
} dl_example;

/*
 * Build the example of one record (context may be NULL or ""). DL_EINVAL (with a reason
 * in err) when the record cannot be used: empty instruction or response, or n >= max_length
 * tokens (dropped, as Dolly v2 does); the caller counts and reports those.
 */
dl_status	example_from_record(const dl_tokenizer *tok, const char *instruction,
								const char *context, const char *response, int max_length,
								dl_example *ex, dl_error *err);

void		example_free(dl_example *ex);

/*
 * Dolly's split: shuffle the n examples with seed, then hold out round(n * eval_fraction)
 * of them (at least one when the fraction is positive and n > 1) at the front. Returns
 * how many are held out; ex[0..neval) evaluate, ex[neval..n) train.
 */
int			examples_split(dl_example *ex, int n, double eval_fraction, uint64_t seed);

/*
 * Add Dolly's special tokens ("### End", "### Instruction:", "### Response:\n") to a
 * tokenizer and model that lack them: the tokenizer gets them as special tokens, and the
 * embedding and output tables grow to cover their ids (new rows: the mean of the existing
 * rows, so that the new tokens start as an average token; deterministic). A model whose
 * tables already have the rows keeps them. *m may be replaced by a grown model.
 */
dl_status	model_add_dolly_tokens(dl_model **m, dl_tokenizer *tok, dl_error *err);

/*
 * Dolly's special tokens for an adapter over m: those tokenizer tok lacks are added to it,
 * and their rows become the adapter's trained token rows (cfg's tok0 and ntok; none when
 * tok has them all), the base staying frozen. Their ids must fall within m's tables, in
 * the padding rows models of this family have (Pythia's 50,304 for 50,277 tokens,
 * GPT-J's 50,400 for 50,257): a base whose tables would have to grow is refused, with a
 * hint.
 */
dl_status	lora_dolly_tokens(const dl_model *m, dl_tokenizer *tok, dl_lora_config *cfg,
							  dl_error *err);

/* Optimiser and schedule settings; defaults from train_defaults(). */
typedef struct dl_train_config
{
	float		lr;				/* peak learning rate */
	int			warmup_steps;	/* linear warmup from 0 to lr */
	int			linear_decay;	/* after warmup: 0 constant, 1 linear decay to 0 at total_steps */
	int			total_steps;	/* set by finetune_run (steps of all epochs) */
	float		beta1;
	float		beta2;
	float		eps;
	float		weight_decay;	/* decoupled (AdamW), torch semantics */
	float		max_grad_norm;	/* clip the global norm; 0 = off */
	int			max_tokens;		/* tokens of the largest micro-batch (sizes activations) */
	int			max_length;		/* longest example */
	int			checkpoint;		/* keep only the layers' inputs, recompute the rest (model.h) */
} dl_train_config;

/*
 * Dolly v2's settings: lr 5e-6, warmup 50, betas (0.9, 0.999), eps 1e-8, no decay, clip 1;
 * no activation checkpointing.
 */
void		train_defaults(dl_train_config *cfg);

typedef struct dl_trainer dl_trainer;

/*
 * A trainer for m, or with lora for that adapter of m (m frozen: no gradient or moment of
 * its own): gradients, AdamW moments, activations for backward. With a group of
 * several ranks, ZeRO stage 0 (everything on every rank), 1 (moments of the rank's parts)
 * or 2 (moments and reduced gradients of its parts); alone, or group NULL, stage 0. At
 * stages 0 and 1 on the CPU, a group with peer buffers of the parameters' size gives the
 * trainer its gradient buffer (the others sum from it directly). On a device, the trainer
 * shares its gradients and the parameters with the other ranks (group_share) when every
 * rank can map them, and unshares them when freed; every rank creates and frees its
 * trainer at the same point.
 */
dl_status	trainer_create(dl_model *m, const struct dl_lora *lora, const dl_train_config *cfg,
						   dl_group *group, int stage, dl_trainer **out, dl_error *err);
void		trainer_free(dl_trainer *tr);

/* The ZeRO stage the trainer runs (0 when alone). */
int			trainer_stage(const dl_trainer *tr);

/* Device bytes of its gradients and AdamW state (not the activations). */
size_t		trainer_state_bytes(const dl_trainer *tr);

/* The floats trainer_create allocates for gradients and AdamW on each of nranks at stage. */
size_t		trainer_state_floats(const dl_model *m, const struct dl_lora *lora, int nranks,
								 int stage);

/*
 * Forward and backward of a micro-batch of n examples: gradients of the SUM of the
 * token losses accumulate into the gradient buffer. Returns that sum and the number of
 * label tokens, so losses and counts can be summed over micro-batches and ranks.
 */
dl_status	trainer_backward(dl_trainer *tr, const dl_example *batch, int n,
							 double *loss_sum, int64_t *n_labels, dl_error *err);

/*
 * The next trainer_backward is the step's last on this rank: at ZeRO stages 0 and 1,
 * where the ranks sum from each other's GPU memory, each span it completes starts its
 * sums over the ranks while backward goes on (as stage 2 does every micro-batch), and
 * trainer_reduce finishes them. Every rank must then run at least one micro-batch a step
 * (an empty one will do) and call this before its last.
 */
void		trainer_last_micro_batch(dl_trainer *tr);

/*
 * Sum the step's gradients (stage 0: all of them on every rank; stage 1: each rank its
 * slice's; stage 2: already done span by span in backward), losses and label counts
 * over the ranks, in rank order. Nothing alone.
 */
dl_status	trainer_reduce(dl_trainer *tr, double *loss_sum, int64_t *n_labels, dl_error *err);

/*
 * The gradients (device floats): at stages 0 and 1 all of them, laid out like the
 * parameters (*n of them); at stage 2 this rank's slice of the reduced ones.
 */
float	   *trainer_grads(dl_trainer *tr, size_t *n);

/* Sum a loss and a label count over the ranks (evaluation); nothing alone. */
dl_status	trainer_sum(dl_trainer *tr, double *loss_sum, int64_t *n_labels, dl_error *err);

/*
 * Finish a step: gradients /= n_labels (the global count), clip, AdamW with the
 * scheduled learning rate of step `step` (0-based), zero the gradients; at stages 1
 * and 2, the updated slices gathered into every rank. Reports the learning rate used
 * and the gradient norm before clipping.
 */
dl_status	trainer_update(dl_trainer *tr, int64_t n_labels, int step, float *lr,
						   float *grad_norm, dl_error *err);

/* Mean loss over examples without touching gradients (evaluation). */
dl_status	trainer_eval(dl_trainer *tr, const dl_example *batch, int n, double *loss_sum,
						 int64_t *n_labels, dl_error *err);

/* What a fine-tuning run reports as it goes. */
typedef struct dl_train_progress
{
	const char *phase;			/* "training", "evaluating" */
	int			epoch;			/* 1-based */
	int			step;			/* optimizer steps done */
	int			total_steps;
	double		train_loss;		/* mean over the last step's label tokens */
	double		eval_loss;		/* NaN until the first evaluation */
	double		tokens_per_second;	/* training tokens, averaged over the run */
	float		lr;
	float		grad_norm;
	size_t		state_bytes;	/* this rank's gradients and AdamW state (trainer_state_bytes) */
	int			zero_stage;		/* the stage the trainer runs */
} dl_train_progress;

/* Called after every step and evaluation; a nonzero return stops the run (DL_ECANCELLED). */
typedef int (*dl_progress_fn) (void *arg, const dl_train_progress *p);

typedef struct dl_finetune_opts
{
	dl_train_config cfg;
	int			epochs;
	int			batch_size;		/* examples per optimizer step, over all ranks */
	int			rank;			/* this process's rank and the number of ranks: */
	int			nranks;			/* rank r takes examples r, r + nranks, ... of each batch */
	int			eval_every;		/* steps between evaluations; 0 = end of each epoch only */
	uint64_t	seed;			/* shuffles the training examples every epoch */
	dl_group   *group;			/* the ranks (nranks of them); NULL alone */
	struct dl_lora *lora;		/* the adapter of m to train (lora.h); NULL: m itself */
	int			zero_stage;		/* 0, 1, 2: see trainer_create */
	int			comm_bf16;		/* the group stages gradients as bfloat16 (the caller sets it) */
	dl_progress_fn progress;
	void	   *progress_arg;
} dl_finetune_opts;

/*
 * Fine-tune m on train (ntrain examples) for opts->epochs epochs, evaluating on eval
 * (neval, may be 0). The examples are shuffled with opts->seed at every epoch (the same
 * order on every rank). The final progress is left in *last.
 */
dl_status	finetune_run(dl_model *m, const dl_example *train, int ntrain,
						 const dl_example *eval, int neval, const dl_finetune_opts *opts,
						 dl_train_progress *last, dl_error *err);

/*
 * Save m as a Hugging Face model directory at dir: config.json (over base_config when
 * given), tokenizer.json, model.safetensors in F32 with Hugging Face's names and layout.
 * Written into a hidden directory beside it, ".<name>" DL_SAVE_TMP_MARK "<pid>" (no model
 * name starts with "."), and renamed when complete, so a crash never leaves a half-written
 * model under dir; what a crash leaves is found by that name. dir must not exist.
 */
dl_status	model_save(const dl_model *m, const dl_tokenizer *tok, const char *base_config,
					   const char *dir, dl_error *err);

/*
 * Write the model of directory src (any weights st_open reads: PyTorch .bin, say) as a
 * new directory dst in safetensors, as model_save writes one (aside, then renamed):
 * config.json and the tokenizer's files copied; every tensor but the buffers
 * transformers ignores (GPT-J's attn.bias, attn.masked_bias, ...) with its name, dtype
 * and bytes, in model.safetensors, or in as many shards as src has, with
 * model.safetensors.index.json.
 */
dl_status	model_convert(const char *src, const char *dst, dl_error *err);

/*
 * A model with random weights (normal(0, 0.02) matrices and embeddings, unit layer-norm
 * gains, zero biases; torch's init for these models), seeded: the base for the demo and
 * for tests and benchmarks that need a model of a given shape. cfg->vocab_size is set.
 */
dl_status	model_create_random(const dl_config *cfg, dl_backend *be, uint64_t seed,
								dl_model **out, dl_error *err);

#endif
