/*
 * config.h: the model hyper-parameters read from a Hugging Face config.json.
 *
 * Two model types: "gptj" (dolly-v1) and "gpt_neox" (Pythia, dolly-v2). Every key that
 * changes the computation is read, including the newer spellings (rope_theta,
 * partial_rotary_factor, rope_parameters). The vocabulary size is NOT taken from here:
 * the model loader sets vocab_size from the embedding tensor's shape.
 */
#ifndef DOLLY_CONFIG_H
#define DOLLY_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#include "error.h"

typedef enum dl_arch
{
	DL_ARCH_GPTJ,
	DL_ARCH_GPTNEOX
} dl_arch;

typedef enum dl_act
{
	DL_ACT_GELU_TANH,			/* "gelu_new", "gelu_fast", "gelu_pytorch_tanh" */
	DL_ACT_GELU_ERF				/* "gelu": exact erf form */
} dl_act;

typedef struct dl_config
{
	dl_arch		arch;
	int			n_layer;
	int			n_embd;			/* hidden size E */
	int			n_head;
	int			head_dim;		/* E / n_head */
	int			n_inner;		/* MLP width (GPT-J: n_inner or 4E; NeoX: intermediate_size) */
	int			rotary_dim;		/* rotated dims per head (GPT-J rotary_dim, NeoX hs*rotary_pct) */
	bool		rotary_interleaved;	/* GPT-J rotate_every_two; NeoX rotate_half */
	float		rotary_base;	/* 10000 unless rotary_emb_base / rope_theta says otherwise */
	float		ln_eps;
	dl_act		act;
	bool		parallel_residual;	/* GPT-J always; NeoX use_parallel_residual */
	bool		tie_embeddings;	/* output projection shares the input embedding */
	bool		attention_bias;	/* NeoX qkv/dense biases (default true) */
	int			max_pos;		/* n_positions / max_position_embeddings */
	int			config_vocab;	/* vocab_size as written in config.json (informative) */
	int			vocab_size;		/* rows of the embedding tensor: set by the model loader */
	int			bos_id;			/* -1 if absent */
	int			eos_id;			/* -1 if absent */
} dl_config;

/*
 * How a block's two branches meet the residual stream x: the one place where the three
 * layer shapes are told apart (inference's forward pass, training's forward and backward
 * switch on it).
 *   DL_BLOCK_SHARED_NORM  GPT-J:                   x += attn(ln1(x)) + mlp(ln1(x))
 *   DL_BLOCK_PARALLEL     NeoX, parallel residual: x += attn(ln1(x)) + mlp(ln2(x))
 *   DL_BLOCK_SEQUENTIAL   NeoX otherwise:          x += attn(ln1(x)); x += mlp(ln2(x))
 */
typedef enum dl_block
{
	DL_BLOCK_SHARED_NORM,
	DL_BLOCK_PARALLEL,
	DL_BLOCK_SEQUENTIAL
} dl_block;

dl_block	config_block(const dl_config *cfg);

/* "gptj" or "gpt_neox", as config.json's model_type spells it. */
const char *config_arch_name(dl_arch arch);

/* Parse config.json text (len bytes, need not be NUL-terminated). */
dl_status	config_parse(const char *json, size_t len, dl_config *cfg, dl_error *err);

/* Read and parse path (a config.json file). */
dl_status	config_load(const char *path, dl_config *cfg, dl_error *err);

/*
 * Write cfg as a config.json at path that transformers loads (vocab_size must be set).
 * With base_path, the keys of that config.json are kept and ours overwrite them.
 */
dl_status	config_write(const dl_config *cfg, const char *base_path, const char *path,
						 dl_error *err);

#endif
