/*
 * model.h: GPT-J and GPT-NeoX loaded from a Hugging Face directory, their forward
 * pass over a KV cache for a batch of sequences, and their training pass (loss and
 * gradients of a batch of examples).
 *
 * All parameters live in ONE backend allocation; dl_params points into it (llm.c's
 * malloc_and_point_parameters). dl_tensor_map says where each Hugging Face tensor lives
 * in that allocation, so loading, saving (fine-tuning) and a gradient buffer laid out
 * like the parameters are one loop over one table. Two layouts differ from the file:
 *  - GPT-J's q_proj, k_proj and v_proj are stacked into one [3E, E] matrix (three map
 *    entries, each a block of rows);
 *  - GPT-NeoX's query_key_value rows are interleaved per head in the file (head h owns
 *    rows [h*3D, h*3D + 3D) as q|k|v); they are re-laid at load to q of all heads | k |
 *    v, the same layout as GPT-J's, through model_neox_qkv_hf_row (the one place that
 *    knows the mapping; saving applies it backwards).
 * So both architectures compute qkv [T, 3E] = q | k | v with heads contiguous.
 */
#ifndef DOLLY_MODEL_H
#define DOLLY_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "config.h"
#include "error.h"

/* Device pointers of one layer's parameters; matrices in weight format, vectors float32. */
typedef struct dl_layer_params
{
	float	   *ln1_w;			/* [E] GPT-J ln_1, NeoX input_layernorm */
	float	   *ln1_b;
	float	   *ln2_w;			/* [E] NeoX post_attention_layernorm; NULL for GPT-J */
	float	   *ln2_b;
	void	   *qkv_w;			/* [3E, E] q | k | v, heads contiguous */
	float	   *qkv_b;			/* [3E] NeoX with attention_bias; else NULL */
	void	   *proj_w;			/* [E, E] GPT-J out_proj, NeoX dense */
	float	   *proj_b;			/* [E] NeoX with attention_bias; else NULL */
	void	   *fc_in_w;		/* [F, E] GPT-J fc_in, NeoX dense_h_to_4h */
	float	   *fc_in_b;		/* [F] */
	void	   *fc_out_w;		/* [E, F] GPT-J fc_out, NeoX dense_4h_to_h */
	float	   *fc_out_b;		/* [E] */
} dl_layer_params;

typedef struct dl_params
{
	void	   *wte;			/* [V, E] input embedding */
	dl_layer_params *layers;	/* n_layer, host array of device pointers */
	float	   *lnf_w;			/* [E] GPT-J ln_f, NeoX final_layer_norm */
	float	   *lnf_b;
	void	   *lm_head;		/* [V, E] lm_head / embed_out; == wte when tied */
	float	   *lm_head_b;		/* [V] GPT-J lm_head.bias; NULL for NeoX */
} dl_params;

/* How the rows of a Hugging Face tensor map to the rows of our parameter. */
typedef enum dl_rowmap
{
	DL_ROWS_SAME,				/* row r is row r */
	DL_ROWS_NEOX_QKV			/* our row r is file row model_neox_qkv_hf_row(r) */
} dl_rowmap;

/* One Hugging Face tensor and the place of its rows in the parameter allocation. */
typedef struct dl_tensor_map
{
	char		name[128];		/* as in the safetensors file */
	int			ndim;			/* 1 or 2 */
	int64_t		shape[2];		/* [out, in] for matrices, [n] for vectors */
	dl_fmt		fmt;
	size_t		offset;			/* bytes from the start of the allocation */
	dl_rowmap	rowmap;
} dl_tensor_map;

/*
 * What a training pass computes gradients for and AdamW updates: a model's parameters,
 * or an adapter's over a frozen model (lora.h). Float32 tensors (map) in one allocation,
 * cut into DL_GRAD_SPANS(cfg) spans in the order backward completes them: span s is
 * bytes [spans[2s], spans[2s + 1]) of mem (see dl_model_backward).
 */
typedef struct dl_trained
{
	void	   *mem;
	size_t		bytes;
	const dl_tensor_map *map;
	int			nmap;
	const size_t *spans;
} dl_trained;

typedef struct dl_model
{
	dl_config	cfg;			/* cfg.vocab_size set from the embedding's rows */
	dl_backend *be;
	void	   *param_mem;		/* the one allocation (device) */
	size_t		param_bytes;
	dl_params	p;
	dl_tensor_map *map;			/* every tensor read from the files */
	int			nmap;
	float	   *rope;			/* device [max_pos, rotary_dim]: cos | sin per position */
	size_t	   *spans;			/* [2 * DL_GRAD_SPANS]: see dl_trained */
} dl_model;

/*
 * Load the model in directory dir (config.json, and the weights st_open finds there)
 * onto backend be, converting F32/F16/BF16 to the backend's formats. Every tensor is
 * checked for presence, dtype and shape; an error names the tensor and the file.
 * Tensors are copied a slice of at most 16 MB of file at a time, whose pages are then
 * dropped from the process (st_release): a load peaks at the parameters plus one slice.
 */
dl_status	dl_model_load(const char *dir, dl_backend *be, dl_model **out, dl_error *err);

/*
 * Called by dl_model_load_watched after each tensor it uploads, with the parameters loaded
 * so far of all; a nonzero return stops the load (DL_ECANCELLED, nothing left allocated).
 */
typedef int (*dl_load_fn) (void *arg, int64_t done, int64_t total);

/* dl_model_load, telling watch (unless NULL) how far it is. */
dl_status	dl_model_load_watched(const char *dir, dl_backend *be, dl_load_fn watch, void *arg,
								  dl_model **out, dl_error *err);

/*
 * A model of configuration cfg (vocab_size set) on be: its tensor map, its one parameter
 * allocation pointed into (contents undefined) and its rotary table. dl_model_load fills
 * the parameters from files; fine-tuning fills them itself (random init, grown tables).
 */
dl_status	dl_model_create(const dl_config *cfg, dl_backend *be, dl_model **out, dl_error *err);

/* Free the model's device memory and the model; NULL is accepted. */
void		dl_model_free(dl_model *m);

/* The number of parameters: the elements of every tensor in the model's files. */
int64_t		dl_model_param_count(const dl_model *m);

/* The model's parameters as what a training pass updates (float32 weights only). */
dl_trained	dl_model_trained(const dl_model *m);

/*
 * Find map entry e's tensor in set and check its dtype (F32, F16 or BF16) and shape: an
 * error names the tensor and its file, or dir (a checkpoint of type) when it is missing.
 */
dl_status	weights_check(const st_set *set, const dl_tensor_map *e, const char *dir,
						  const char *type, const st_tensor **out, dl_error *err);

/*
 * Check the nmap tensors of map against the files of set (dir names them in errors, as a
 * checkpoint of type), then upload each to mem + its offset on be, telling watch (unless
 * NULL): the loading of a model's parameters and of an adapter's. cfg gives the sizes
 * of NeoX's row mapping.
 */
dl_status	weights_load(dl_backend *be, void *mem, const dl_tensor_map *map, int nmap,
						 const dl_config *cfg, const st_set *set, const char *dir,
						 const char *type, dl_load_fn watch, void *arg, dl_error *err);

/*
 * Write the nmap tensors of map at mem (on be) as one safetensors file at path, float32,
 * under their names and in the files' row order (model_save.c).
 */
dl_status	weights_write(dl_backend *be, const void *mem, const dl_tensor_map *map, int nmap,
						  const dl_config *cfg, const char *path, dl_error *err);

/*
 * Write the model of directory src, whose weights are set, as the new directory dst, as
 * model_convert does (train.h), each tensor's bytes given by hook(arg, ...) (safetensors.h;
 * NULL: as they are), tokenizer.json from directory tok_src when it has one (else src):
 * lora_merge writes a base with its targets merged this way.
 */
dl_status	model_dir_write(const char *src, const st_set *set, const char *tok_src,
							const char *dst, st_write_hook hook, void *arg, dl_error *err);

/* be->alloc as a dl_status: *out is NULL on failure. */
dl_status	model_alloc(dl_backend *be, size_t bytes, void **out, dl_error *err);

/* File row of the GPT-NeoX fused QKV tensor that our row r (in [0, 3E)) comes from. */
int32_t		model_neox_qkv_hf_row(int n_head, int head_dim, int r);

/*
 * The KV cache of n_slots sequences of up to max_ctx tokens each, and the activation
 * buffers of forward passes of up to max_tokens tokens through it: everything a forward
 * pass needs is allocated here, once. Used by one thread at a time.
 */
typedef struct dl_kv_cache
{
	dl_model   *model;
	int			n_slots;
	int			max_ctx;
	int			max_tokens;
	int			logit_rows;		/* rows of logits computed per product (chunked above) */
	void	   *kv;				/* device: K then V, each [n_layer, n_slots, max_ctx, E] */
	size_t		layer_stride;	/* bytes between layers within K (or V) */
	void	   *act;			/* device: the activation buffers below */
	float	   *x;				/* [T, E] the residual stream */
	float	   *ln;				/* [T, E] layer norm output */
	float	   *qkv;			/* [T, 3E] */
	float	   *att;			/* [T, E] attention output (before the projection) */
	float	   *fc;				/* [T, F] MLP hidden */
	float	   *lg_in;			/* [R, E] rows whose logits are wanted */
	float	   *logits;			/* [R, V] */
	void	   *attn_ws;		/* the backend's attention workspace (its own layout) */
	dl_sample_row *sample_rows;	/* [R] sampling parameters of the logit rows */
	int32_t    *tokens;			/* [R] their sampled tokens */
	void	   *sample_ws;		/* the backend's sampling workspace */
	float	   *lora_u;			/* [T, DL_LORA_MAX_RANK * DL_LORA_PER_PRODUCT] adapters' u, and
								 * [R, DL_LORA_MAX_TOKENS] their token rows' */
	int32_t    *meta;			/* device: ids [T] | pos [T] | rows [T] | spans */
	int32_t    *h_meta;			/* the same, staged on the host */
	struct dl_lora_run *h_runs;	/* [n_slots] host: the adapters' runs of a pass */
	size_t		meta_bytes;
} dl_kv_cache;

/* Allocate a cache and its activations (limits are checked against the model). */
dl_status	dl_kv_cache_create(dl_model *m, int n_slots, int max_ctx, int max_tokens,
							   dl_kv_cache **out, dl_error *err);

/* Free a cache; NULL is accepted. */
void		dl_kv_cache_free(dl_kv_cache *c);

/* Which logits a sequence wants from a forward pass. */
typedef enum dl_want
{
	DL_LOGITS_NONE,				/* a chunk of a prompt whose end comes later */
	DL_LOGITS_LAST,				/* the last new token: generation */
	DL_LOGITS_ALL				/* every new token: tests, scoring */
} dl_want;

/* One sequence's part of a forward pass. */
typedef struct dl_seq
{
	int			slot;			/* cache slot, unique within a batch */
	int			pos;			/* tokens already in the slot = position of ids[0] */
	int			n_tokens;		/* new tokens, >= 1 */
	const int32_t *ids;
	dl_want		want;
	const struct dl_lora *lora;	/* the adapter it runs with (lora.h); NULL: the model alone */
} dl_seq;

/*
 * Run n sequences' new tokens through the model in one pass: their keys and values join
 * the cache, and the logits they asked for are written to logits (host), [rows, V] in
 * sequence order. Prefill of prompts of any lengths and one-token decode steps mix freely.
 * The total of new tokens must not exceed the cache's max_tokens.
 */
dl_status	dl_model_forward(dl_model *m, dl_kv_cache *c, const dl_seq *seqs, int n,
							 float *logits, dl_error *err);

/*
 * dl_model_forward that returns a token instead of the logits of each row: tokens[r]
 * (host) is the backend's sample_forward of logit row r with rows[r] (host), so only the
 * token ids leave the device. Generation asks for DL_LOGITS_LAST rows this way.
 */
dl_status	dl_model_sample(dl_model *m, dl_kv_cache *c, const dl_seq *seqs, int n,
							const dl_sample_row *rows, int32_t *tokens, dl_error *err);

/*
 * Training (model_backward.c). Gradients are laid out like the trained parameters
 * (dl_trained: the model's, or an adapter's): the gradient of a parameter is at the same
 * byte offset as the parameter (so a dl_tensor_map entry locates both, and data
 * parallelism sums one flat buffer, or spans of it). That needs a float32 weight format;
 * dl_train_acts_create checks it.
 */
struct dl_example;

/*
 * The activations a backward pass needs, for batches of up to max_tokens tokens in
 * sequences of up to max_len tokens, allocated once. Used by one thread at a time.
 * With checkpoint, only each layer's input is kept and backward recomputes the rest of
 * a layer's activations before its backward: one layer's buffers instead of n_layer,
 * for one more forward, with the same gradients bit for bit.
 */
typedef struct dl_train_acts dl_train_acts;

/*
 * Allocate the activations of training passes (limits are checked against the model).
 * With lora, the passes train that adapter of m (and run it with its dropout); m is
 * frozen. Without, they train m.
 */
dl_status	dl_train_acts_create(dl_model *m, const struct dl_lora *lora, int max_tokens,
								 int max_len, int checkpoint, dl_train_acts **out,
								 dl_error *err);

/* What the passes of a train against compute gradients for. */
dl_trained	dl_train_acts_trained(const dl_train_acts *a);

/* The device bytes they take. */
size_t		dl_train_acts_bytes(const dl_train_acts *a);

/* Free them; NULL is accepted. */
void		dl_train_acts_free(dl_train_acts *a);

/*
 * Backward completes the gradients of the trained parameters span by span, in this
 * order: span 0 the head (final norm, output layer), spans 1 .. n_layer the layers from
 * the last to the first, span n_layer + 1 the embedding (to which a tied output layer
 * also adds, from the start). The spans cover the trained allocation (an adapter's
 * head and embedding spans are empty).
 */
#define DL_GRAD_SPANS(cfg) ((cfg)->n_layer + 2)

/*
 * Where backward accumulates (+=) gradients: span s's in open(arg, s), laid out like its
 * bytes of the trained parameters (float32, device), from the span's start until
 * close(arg, s) says they are complete. Only the head, the layer being worked on and a
 * tied embedding are open at once (an untied embedding opens after the last layer
 * closes). One buffer laid out like the parameters serves every span; ZeRO stage 2
 * gives a zeroed buffer per span and sums it over the ranks at close.
 */
typedef struct dl_grad_sink
{
	float	   *(*open) (void *arg, int span);
	dl_status	(*close) (void *arg, int span, dl_error *err);
	void	   *arg;
} dl_grad_sink;

/*
 * The loss of a batch of n independent examples (train.h's dl_example; positions start
 * at 0 in each): position t of an example predicts its token t + 1, for t in
 * [first_label - 1, len - 1). Sets *loss_sum to the sum of the token cross-entropies
 * and *n_labels to their number. With a sink, also the backward pass: the gradients of
 * that SUM accumulate into the sink's spans, every span opened and closed in order even
 * when the batch has no label (then adding nothing).
 */
dl_status	dl_model_backward(dl_model *m, dl_train_acts *a, const struct dl_example *batch,
							  int n, const dl_grad_sink *sink, double *loss_sum,
							  int64_t *n_labels, dl_error *err);

#endif
