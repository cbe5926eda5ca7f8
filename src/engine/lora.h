/*
 * lora.h: low-rank adapters (LoRA, Hu et al. 2021) of a GPT-J or GPT-NeoX model, as PEFT
 * makes and stores them: an adapter adds scale * B (A x) to chosen products of every
 * layer (the target modules), with A [r, in] and B [out, r] float32 and scale = alpha / r
 * (alpha / sqrt(r) with rsLoRA). The base model is not copied: one loaded model serves
 * any number of adapters, each sequence of a batch with its own (dl_seq.lora), and
 * fine-tuning trains an adapter's few parameters over a frozen model.
 *
 * An adapter directory is PEFT's: adapter_config.json (r, lora_alpha, lora_dropout,
 * target_modules, base_model_name_or_path, ...) and adapter_model.safetensors, whose
 * tensors are named "base_model.model.<module path>.lora_A.weight" and ".lora_B.weight".
 * All of an adapter's matrices live in one allocation, layer by layer, so that its
 * gradients, like a model's, are one buffer cut into model.h's spans.
 *
 * An adapter may also own rows of the embedding and output tables: the tokens a base
 * lacks (Dolly's, added to its tokenizer) are trained there while the base stays frozen,
 * as PEFT's trainable_token_indices does ("<embedding path>.token_adapter.
 * trainable_tokens_delta" [n, E], despite the name the rows' values, not differences;
 * adapter_config.json lists the ids under the embedding's and the output layer's module
 * names). An adapter with token rows carries its tokenizer (tokenizer.json) too.
 */
#ifndef DOLLY_LORA_H
#define DOLLY_LORA_H

#include "model.h"

#define DL_LORA_MAX_RANK 256
#define DL_LORA_MAX_TARGETS 6	/* GPT-J's q, k, v, out, fc_in, fc_out */
#define DL_LORA_PER_PRODUCT 3	/* targets in one product: GPT-J's q, k and v in qkv */
#define DL_LORA_MAX_TOKENS 16	/* token rows an adapter may own */

/* What PEFT puts before a module's path in the base to name its adapter tensors. */
#define DL_LORA_PREFIX "base_model.model."

/* The output layer's module, of token rows (transformers 5 names GPT-NeoX's embed_out so). */
#define DL_LORA_TOKEN_HEAD "lm_head"

/* The products of a layer an adapter can add to. */
typedef enum dl_lora_product
{
	DL_LORA_QKV,				/* qkv = ln1 Wqkv^T: q, k, v (GPT-J) or query_key_value */
	DL_LORA_PROJ,				/* the attention's output projection */
	DL_LORA_FC_IN,				/* the MLP's first product */
	DL_LORA_FC_OUT				/* the MLP's second product */
} dl_lora_product;

/* One target module: which product, and which of its output columns it adds to. */
typedef struct dl_lora_target
{
	char		module[32];		/* PEFT's name: "q_proj", "query_key_value", "fc_in", ... */
	dl_lora_product product;
	int			col0;			/* first output column of the product it adds to */
	int			n_out;			/* B's rows */
	int			n_in;			/* A's columns */
	dl_rowmap	rowmap;			/* of B's rows: NeoX's query_key_value is re-laid as the model's */
} dl_lora_target;

/* What a fresh adapter is made of (dl_lora_create); PEFT's LoraConfig. */
typedef struct dl_lora_config
{
	int			r;
	float		alpha;
	float		dropout;
	char		targets[DL_LORA_MAX_TARGETS][32];	/* PEFT module names; none: PEFT's default */
	int			ntargets;
	int			tok0;			/* token rows [tok0, tok0 + ntok) trained too; ntok 0: none */
	int			ntok;
} dl_lora_config;

typedef struct dl_lora
{
	const dl_model *model;		/* the base it adapts (not owned); NULL: read only (lora_read) */
	int			r;
	float		alpha;
	float		scale;
	float		dropout;		/* training only */
	int			rslora;			/* scale = alpha / sqrt(r) */
	int			ntargets;
	dl_lora_target targets[DL_LORA_MAX_TARGETS];
	int			tok0;			/* its token rows: ids [tok0, tok0 + ntok); ntok 0: none */
	int			ntok;
	char		base_name[1024];	/* base_model_name_or_path */
	void	   *mem;			/* device, float32: every layer's A and B, layer by layer, then
								 * the token rows (embedding's, output's), then lora_tokens'
								 * constants */
	size_t		bytes;			/* the trained part of mem */
	size_t		mem_bytes;
	dl_tensor_map *map;			/* PEFT's names, per layer and target: A then B; then the
								 * token rows, embedding's and output's */
	int			nmap;
	size_t	   *spans;			/* [2 * DL_GRAD_SPANS]: the head's and the embedding's hold
								 * the token rows, when there are some */
} dl_lora;

/*
 * An adapter's token rows on the device, as the forward uses them: the embedding gets
 * in's row k where the base's row tok0 + k was (a copy), and the logits of those ids
 * become out's products instead of the base's, as a low-rank update of the logits'
 * columns [tok0, tok0 + n) with A = out's rows (and, subtracting, base_out's) and
 * B = eye. With gradients (the open spans), din and dout receive theirs.
 */
typedef struct dl_lora_tokens
{
	int			tok0;
	int			n;				/* 0: the adapter has none */
	const float *in;			/* [n, E] */
	const float *out;			/* [n, E] */
	const float *base_out;		/* [n, E] the base's output rows they replace */
	const float *eye;			/* [n, n] identity */
	const int32_t *index;		/* [n] 0 .. n - 1, for embedding_backward */
	float	   *din;			/* gradients (+=), NULL when not trained */
	float	   *dout;
} dl_lora_tokens;

/* Defaults: r 8, alpha 16, dropout 0.05, PEFT's default targets for the architecture. */
void		lora_defaults(dl_lora_config *cfg);

/*
 * A fresh adapter of m: A as PEFT initialises it (kaiming-uniform: uniform in
 * +-1/sqrt(in)), from seed; B zero, so the adapted model starts as the base. Unknown
 * targets, ranks out of 1 .. DL_LORA_MAX_RANK and dropout outside [0, 1) are DL_EINVAL.
 */
dl_status	dl_lora_create(const dl_model *m, const dl_lora_config *cfg, uint64_t seed,
						   dl_lora **out, dl_error *err);

/*
 * Load PEFT adapter directory dir onto m's backend, for m. A LoRA of other shapes (another
 * base), another PEFT type, or what we do not compute (DoRA, biases, per-module ranks) is
 * an error that says so.
 */
dl_status	dl_lora_load(const dl_model *m, const char *dir, dl_lora **out, dl_error *err);

/* The base_model_name_or_path of adapter directory dir, its configuration checked. */
dl_status	lora_base_name(const char *dir, char *base, size_t len, dl_error *err);

/*
 * The adapter of directory dir for a base of configuration c, checked as dl_lora_load
 * checks it and its map laid out for a backend of that alignment, without its tensors
 * (model and mem NULL): what dl_lora_load and lora_merge start from. Free with
 * dl_lora_free.
 */
dl_status	lora_read(const char *dir, const dl_config *c, size_t align, dl_lora **out,
					  dl_error *err);

/* Open the tensors of adapter directory dir (adapter_model.safetensors). */
dl_status	lora_open_tensors(const char *dir, st_set **out, dl_error *err);

/* The path of target t's module of layer l in the base ("transformer.h.3.attn.q_proj"). */
void		lora_module_path(const dl_config *c, int l, const dl_lora_target *t, char *buf,
							 size_t len);

/*
 * Merge the adapter of directory adapter_dir into the model of directory base_dir, as
 * PEFT's merge_and_unload, as a new model directory out_dir (which must not exist;
 * written aside and renamed, as model_convert): config.json, generation_config.json and
 * the tokenizer's files copied; every tensor of the base as it is (less the buffers
 * transformers ignores), in as many shards, but each target's weight W, which becomes
 * W + scale B A, computed in float32 and stored in W's dtype (rounded to nearest even).
 * The weights are streamed tensor by tensor without loading a model (lora_merge.c).
 */
dl_status	lora_merge(const char *base_dir, const char *adapter_dir, const char *out_dir,
					   dl_error *err);

/*
 * Save as a PEFT adapter directory dir (which must not exist; written aside and renamed,
 * as model_save): adapter_config.json naming base_name, adapter_model.safetensors, and
 * with token rows tok's tokenizer.json (which must then be given: it has their tokens)
 * (lora_save.c).
 */
struct dl_tokenizer;
dl_status	dl_lora_save(const dl_lora *a, const char *base_name, const struct dl_tokenizer *tok,
						 const char *dir, dl_error *err);

/* Free; NULL is accepted. */
void		dl_lora_free(dl_lora *a);

/* PEFT's name of c's input embedding module ("wte", "embed_in"), of token rows. */
const char *lora_token_module(const dl_config *c);

/* a's token rows (lora_tokens' n 0 when NULL or none); with grads, their gradients. */
dl_lora_tokens lora_tokens(const dl_lora *a, float *const *grads);

/* Rows [first, first + n) of a batch, run with adapter a. */
typedef struct dl_lora_run
{
	const dl_lora *a;
	int			first;
	int			n;
} dl_lora_run;

/*
 * After the base's embedding of a batch into x [T, E]: row t of a run whose adapter owns
 * token ids[t] (host) becomes the adapter's row.
 */
void		lora_tokens_embed(dl_backend *be, float *x, int E, const int32_t *ids,
							  const dl_lora_run *runs, int nruns);

/* Its backward: the owned rows' gradients (+=) from dx's rows, for training's one adapter. */
void		lora_tokens_embed_backward(dl_backend *be, const dl_lora_tokens *tk, const float *dx,
									   int E, const int32_t *ids, int T);

/*
 * After the base's logits [M, V] of rows in [M, E]: in each run's rows, the logits of its
 * adapter's token ids become in's products with the adapter's rows instead of the base's
 * (+= in out^T - in base_out^T over those columns, one lora_forward each). u: scratch of
 * M * DL_LORA_MAX_TOKENS floats.
 */
void		lora_tokens_logits(dl_backend *be, float *logits, int V, float *u, const float *in,
							   int E, const dl_lora_run *runs, int nruns);

/* Its backward from dlogits: din += through both products, tk's dout (+=). */
void		lora_tokens_logits_backward(dl_backend *be, const dl_lora_tokens *tk, float *din,
										const float *dlogits, int V, float *u, const float *in,
										int M, int E);

/* Parameters of the adapter. */
int64_t		dl_lora_param_count(const dl_lora *a);

/* The adapter's parameters as what a training pass updates. */
dl_trained	dl_lora_trained(const dl_lora *a);

/*
 * The matrices of target i of layer l; with grads (the open gradient spans, laid out like
 * the adapter), the gradients too.
 */
dl_lora_mats lora_mats(const dl_lora *a, int l, int i, float *const *grads);

#endif
