/*
 * config.c: reading a Hugging Face config.json into a dl_config.
 *
 * Keys, defaults and precedence follow transformers (5.24) GPTJConfig and GPTNeoXConfig,
 * which the fixtures were made with. Values are range-checked here so that the model
 * code can multiply sizes without overflow checks of its own.
 */
#include "config.h"
#include "files.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <json-c/json.h>

#define CONFIG_MAX_BYTES (16 << 20)
#define MAX_WIDTH (1 << 20)		/* n_embd, n_inner */
#define MAX_LAYERS 4096
#define MAX_POSITIONS (1 << 24)
#define MAX_TOKEN_ID (1 << 30)

#define SUPPORTED_HINT "The supported model types are gptj (GPT-J, dolly-v1) and gpt_neox (GPT-NeoX, Pythia, dolly-v2)."
#define ACT_HINT "The supported activations are gelu_new, gelu_fast, gelu_pytorch_tanh (tanh form) and gelu (erf form)."

/* The value of key in obj, or NULL when absent or JSON null (transformers' None). */
static json_object *
get_value(json_object *obj, const char *key)
{
	json_object *v = NULL;

	if (obj == NULL || !json_object_object_get_ex(obj, key, &v))
		return NULL;
	return v;					/* json-c represents null as NULL */
}

/* Check that v is a JSON integer in [lo, hi] and store it in *out. */
static dl_status
int_value(json_object *v, const char *key, int64_t lo, int64_t hi, int *out,
		  const char *fname, dl_error *err)
{
	int64_t		x;

	if (!json_object_is_type(v, json_type_int))
		return dl_fail(err, DL_EFORMAT, "%s: \"%s\" must be an integer, not %s", fname, key,
					   v ? json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN) : "null");
	x = json_object_get_int64(v);
	/* json-c saturates values above INT64_MAX; its uint64 view tells them apart */
	if (x < lo || x > hi || (x >= 0 && (uint64_t) x != json_object_get_uint64(v)))
		return dl_fail(err, DL_EFORMAT, "%s: \"%s\" is %s; it must be between %lld and %lld",
					   fname, key, json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN),
					   (long long) lo, (long long) hi);
	*out = (int) x;
	return DL_OK;
}

/* Read integer key in [lo, hi] into *out; an optional key that is absent keeps *out. */
static dl_status
get_int(json_object *obj, const char *key, bool required, int64_t lo, int64_t hi, int *out,
		const char *fname, dl_error *err)
{
	json_object *v = get_value(obj, key);

	if (v == NULL)
		return required ? dl_fail(err, DL_EFORMAT, "%s: missing key \"%s\"", fname, key) : DL_OK;
	return int_value(v, key, lo, hi, out, fname, err);
}

/* Read an optional number key (integer or float) into *out, which keeps its default. */
static dl_status
get_number(json_object *obj, const char *key, double *out, const char *fname, dl_error *err)
{
	json_object *v = get_value(obj, key);

	if (v == NULL)
		return DL_OK;
	if (!json_object_is_type(v, json_type_int) && !json_object_is_type(v, json_type_double))
		return dl_fail(err, DL_EFORMAT, "%s: \"%s\" must be a number, not %s", fname, key,
					   json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN));
	*out = json_object_get_double(v);
	return DL_OK;
}

/* Read an optional boolean key into *out, which keeps its default. */
static dl_status
get_bool(json_object *obj, const char *key, bool *out, const char *fname, dl_error *err)
{
	json_object *v = get_value(obj, key);

	if (v == NULL)
		return DL_OK;
	if (!json_object_is_type(v, json_type_boolean))
		return dl_fail(err, DL_EFORMAT, "%s: \"%s\" must be true or false, not %s", fname, key,
					   json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN));
	*out = json_object_get_boolean(v);
	return DL_OK;
}

/* Read an optional string key into *out, which keeps its default. */
static dl_status
get_string(json_object *obj, const char *key, const char **out, const char *fname, dl_error *err)
{
	json_object *v = get_value(obj, key);

	if (v == NULL)
		return DL_OK;
	if (!json_object_is_type(v, json_type_string))
		return dl_fail(err, DL_EFORMAT, "%s: \"%s\" must be a string, not %s", fname, key,
					   json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN));
	*out = json_object_get_string(v);
	return DL_OK;
}

/* bos/eos_token_id: an id, null (-1) or, for eos, a list whose first id stops generation. */
static dl_status
get_token_id(json_object *obj, const char *key, int *out, const char *fname, dl_error *err)
{
	json_object *v = get_value(obj, key);

	*out = -1;
	if (v != NULL && json_object_is_type(v, json_type_array))
	{
		if (json_object_array_length(v) == 0)
			return DL_OK;
		v = json_object_array_get_idx(v, 0);
	}
	else if (v == NULL)
		return DL_OK;
	return int_value(v, key, 0, MAX_TOKEN_ID, out, fname, err);
}

/* Map an activation name to dl_act. */
static dl_status
parse_act(const char *name, const char *key, dl_act *out, const char *fname, dl_error *err)
{
	if (strcmp(name, "gelu_new") == 0 || strcmp(name, "gelu_fast") == 0 ||
		strcmp(name, "gelu_pytorch_tanh") == 0)
		*out = DL_ACT_GELU_TANH;
	else if (strcmp(name, "gelu") == 0)
		*out = DL_ACT_GELU_ERF;
	else
	{
		dl_fail(err, DL_EUNSUPPORTED, "%s: %s \"%s\" is not supported", fname, key, name);
		return dl_hint(err, ACT_HINT);
	}
	return DL_OK;
}

/* GPT-J keys (GPTJConfig): rotary base fixed at 10000, interleaved rotary, parallel block. */
static dl_status
parse_gptj(json_object *root, dl_config *cfg, const char *fname, dl_error *err)
{
	const char *act = "gelu_new";
	double		eps = 1e-5;
	json_object *rd;
	dl_status	st;

	cfg->arch = DL_ARCH_GPTJ;
	cfg->max_pos = 2048;
	if ((st = get_int(root, "n_embd", true, 1, MAX_WIDTH, &cfg->n_embd, fname, err)) ||
		(st = get_int(root, "n_layer", true, 1, MAX_LAYERS, &cfg->n_layer, fname, err)) ||
		(st = get_int(root, "n_head", true, 1, MAX_WIDTH, &cfg->n_head, fname, err)) ||
		(st = get_int(root, "n_positions", false, 1, MAX_POSITIONS, &cfg->max_pos, fname, err)) ||
		(st = get_string(root, "activation_function", &act, fname, err)) ||
		(st = get_number(root, "layer_norm_epsilon", &eps, fname, err)) ||
		(st = get_bool(root, "tie_word_embeddings", &cfg->tie_embeddings, fname, err)))
		return st;
	if (cfg->n_embd % cfg->n_head != 0)
		return dl_fail(err, DL_EFORMAT, "%s: n_embd %d is not divisible by n_head %d",
					   fname, cfg->n_embd, cfg->n_head);
	cfg->head_dim = cfg->n_embd / cfg->n_head;

	/* n_inner null means 4 * n_embd */
	cfg->n_inner = 4 * cfg->n_embd;
	if ((st = get_int(root, "n_inner", false, 1, 4 * MAX_WIDTH, &cfg->n_inner, fname, err)))
		return st;

	/* rotary_dim absent: transformers' default 64; null: the whole head */
	cfg->rotary_dim = 64;
	if (json_object_object_get_ex(root, "rotary_dim", &rd) && rd == NULL)
		cfg->rotary_dim = cfg->head_dim;
	else if ((st = get_int(root, "rotary_dim", false, 0, MAX_WIDTH, &cfg->rotary_dim, fname, err)))
		return st;

	cfg->rotary_interleaved = true;
	cfg->rotary_base = 10000.0f;	/* modeling_gptj hard-codes it */
	cfg->parallel_residual = true;
	cfg->attention_bias = false;	/* q/k/v/out_proj have no bias */
	cfg->ln_eps = (float) eps;
	return parse_act(act, "activation_function", &cfg->act, fname, err);
}

/*
 * GPT-NeoX keys (GPTNeoXConfig). Rotary settings: rope_scaling or rope_parameters
 * {rope_theta, partial_rotary_factor} first, then the old rotary_emb_base / rotary_pct,
 * then 10000 / 0.25, as convert_rope_params_to_dict resolves them. Top-level rope_theta
 * and partial_rotary_factor are ignored there, and so here.
 */
static dl_status
parse_neox(json_object *root, dl_config *cfg, const char *fname, dl_error *err)
{
	const char *act = "gelu";
	const char *rope_type = "default";
	double		eps = 1e-5,
				theta = 10000.0,
				pct = 0.25;
	json_object *rope;
	dl_status	st;

	cfg->arch = DL_ARCH_GPTNEOX;
	cfg->max_pos = 2048;
	cfg->parallel_residual = true;
	cfg->attention_bias = true;
	if ((st = get_int(root, "hidden_size", true, 1, MAX_WIDTH, &cfg->n_embd, fname, err)) ||
		(st = get_int(root, "num_hidden_layers", true, 1, MAX_LAYERS, &cfg->n_layer, fname, err)) ||
		(st = get_int(root, "num_attention_heads", true, 1, MAX_WIDTH, &cfg->n_head, fname, err)) ||
		(st = get_int(root, "intermediate_size", true, 1, 4 * MAX_WIDTH, &cfg->n_inner, fname, err)) ||
		(st = get_int(root, "max_position_embeddings", false, 1, MAX_POSITIONS, &cfg->max_pos, fname, err)) ||
		(st = get_string(root, "hidden_act", &act, fname, err)) ||
		(st = get_number(root, "layer_norm_eps", &eps, fname, err)) ||
		(st = get_bool(root, "use_parallel_residual", &cfg->parallel_residual, fname, err)) ||
		(st = get_bool(root, "tie_word_embeddings", &cfg->tie_embeddings, fname, err)) ||
		(st = get_bool(root, "attention_bias", &cfg->attention_bias, fname, err)) ||
		(st = get_number(root, "rotary_emb_base", &theta, fname, err)) ||
		(st = get_number(root, "rotary_pct", &pct, fname, err)))
		return st;
	if (cfg->n_embd % cfg->n_head != 0)
		return dl_fail(err, DL_EFORMAT, "%s: hidden_size %d is not divisible by num_attention_heads %d",
					   fname, cfg->n_embd, cfg->n_head);
	cfg->head_dim = cfg->n_embd / cfg->n_head;

	/* transformers: rope_scaling or rope_parameters (an empty dict counts as absent) */
	rope = get_value(root, "rope_scaling");
	if (rope == NULL || (json_object_is_type(rope, json_type_object) &&
						 json_object_object_length(rope) == 0))
		rope = get_value(root, "rope_parameters");
	if (rope != NULL)
	{
		if (!json_object_is_type(rope, json_type_object))
			return dl_fail(err, DL_EFORMAT, "%s: rope_parameters must be an object", fname);
		if ((st = get_string(rope, "type", &rope_type, fname, err)) ||
			(st = get_string(rope, "rope_type", &rope_type, fname, err)) ||
			(st = get_number(rope, "rope_theta", &theta, fname, err)) ||
			(st = get_number(rope, "partial_rotary_factor", &pct, fname, err)))
			return st;
		if (strcmp(rope_type, "default") != 0)
		{
			dl_fail(err, DL_EUNSUPPORTED, "%s: rope_type \"%s\" is not supported", fname, rope_type);
			return dl_hint(err, "Only the default rotary embedding (no scaling) is implemented.");
		}
	}
	if (!(pct >= 0.0 && pct <= 1.0))
		return dl_fail(err, DL_EFORMAT, "%s: partial rotary factor %g is outside [0, 1]", fname, pct);
	if (!(theta > 0.0 && theta <= 1e30))
		return dl_fail(err, DL_EFORMAT, "%s: rotary base %g must be positive and finite", fname, theta);
	/* int(head_size * partial_rotary_factor): Python float product, truncated */
	cfg->rotary_dim = (int) ((double) cfg->head_dim * pct);
	cfg->rotary_base = (float) theta;
	cfg->rotary_interleaved = false;
	cfg->ln_eps = (float) eps;
	return parse_act(act, "hidden_act", &cfg->act, fname, err);
}

/* Parse config text; fname names it in messages. */
static dl_status
parse_config(const char *json, size_t len, const char *fname, dl_config *cfg, dl_error *err)
{
	json_tokener *tok;
	json_object *root;
	const char *model_type = NULL;
	dl_status	st;

	memset(cfg, 0, sizeof(*cfg));
	if (len > CONFIG_MAX_BYTES)
		return dl_fail(err, DL_EFORMAT, "%s: %zu bytes is too large for a config.json", fname, len);
	tok = json_tokener_new();
	if (tok == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory parsing %s", fname);
	json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
	root = json_tokener_parse_ex(tok, json, (int) len);
	if (root == NULL || json_tokener_get_parse_end(tok) != len)
	{
		enum json_tokener_error jerr = json_tokener_get_error(tok);

		st = dl_fail(err, DL_EFORMAT, "%s: not valid JSON: %s at byte %zu", fname,
					 jerr == json_tokener_continue ? "unexpected end" :
					 jerr == json_tokener_success ? "trailing data" : json_tokener_error_desc(jerr),
					 json_tokener_get_parse_end(tok));
		json_object_put(root);
		json_tokener_free(tok);
		return st;
	}
	json_tokener_free(tok);
	if (!json_object_is_type(root, json_type_object))
	{
		json_object_put(root);
		return dl_fail(err, DL_EFORMAT, "%s: not a JSON object", fname);
	}

	st = get_string(root, "model_type", &model_type, fname, err);
	if (st == DL_OK && model_type == NULL)
	{
		st = dl_fail(err, DL_EFORMAT, "%s: no model_type", fname);
		dl_hint(err, SUPPORTED_HINT);
	}
	else if (st == DL_OK && strcmp(model_type, config_arch_name(DL_ARCH_GPTJ)) == 0)
		st = parse_gptj(root, cfg, fname, err);
	else if (st == DL_OK && strcmp(model_type, config_arch_name(DL_ARCH_GPTNEOX)) == 0)
		st = parse_neox(root, cfg, fname, err);
	else if (st == DL_OK)
	{
		st = dl_fail(err, DL_EUNSUPPORTED, "%s: model_type \"%s\" is not supported", fname, model_type);
		dl_hint(err, SUPPORTED_HINT);
	}

	cfg->config_vocab = -1;
	if (st == DL_OK &&
		(st = get_int(root, "vocab_size", false, 1, INT_MAX, &cfg->config_vocab, fname, err)) == DL_OK &&
		(st = get_token_id(root, "bos_token_id", &cfg->bos_id, fname, err)) == DL_OK)
		st = get_token_id(root, "eos_token_id", &cfg->eos_id, fname, err);
	json_object_put(root);
	if (st != DL_OK)
		return st;

	if (cfg->rotary_dim % 2 != 0 || cfg->rotary_dim > cfg->head_dim)
		return dl_fail(err, DL_EFORMAT, "%s: rotary dimension %d must be even and at most the head size %d",
					   fname, cfg->rotary_dim, cfg->head_dim);
	if (!(cfg->ln_eps > 0.0f && cfg->ln_eps <= 1.0f))
		return dl_fail(err, DL_EFORMAT, "%s: layer norm epsilon %g must be in (0, 1]",
					   fname, (double) cfg->ln_eps);
	cfg->vocab_size = -1;
	return DL_OK;
}

/* Parse config.json text held in memory. */
dl_block
config_block(const dl_config *cfg)
{
	if (cfg->arch == DL_ARCH_GPTJ)
		return DL_BLOCK_SHARED_NORM;
	return cfg->parallel_residual ? DL_BLOCK_PARALLEL : DL_BLOCK_SEQUENTIAL;
}

const char *
config_arch_name(dl_arch arch)
{
	return arch == DL_ARCH_GPTJ ? "gptj" : "gpt_neox";
}

dl_status
config_parse(const char *json, size_t len, dl_config *cfg, dl_error *err)
{
	return parse_config(json, len, "config.json", cfg, err);
}

/* Read and parse a config.json file, naming it in errors. */
dl_status
config_load(const char *path, dl_config *cfg, dl_error *err)
{
	char	   *buf;
	size_t		len;
	dl_status	st = file_read(path, "model configuration", CONFIG_MAX_BYTES, &buf, &len, err);

	if (st != DL_OK)
		return st;
	st = parse_config(buf, len, path, cfg, err);
	free(buf);
	return st;
}

/* NeoX's rotary_pct such that transformers' int(head_dim * pct) gives back rotary_dim. */
static double
rotary_pct_for(const dl_config *cfg)
{
	double		pct = (double) cfg->rotary_dim / cfg->head_dim;

	while ((int) (cfg->head_dim * pct) < cfg->rotary_dim)
		pct = nextafter(pct, 2.0);
	return pct;
}

/* A float as JSON in its shortest decimal form (1e-05, not 9.9999997473787516e-06). */
static json_object *
float_json(float v)
{
	char		buf[32];

	for (int prec = 1; prec <= 9; prec++)
	{
		snprintf(buf, sizeof(buf), "%.*g", prec, (double) v);
		if ((float) strtod(buf, NULL) == v)
			break;
	}
	return json_object_new_double_s(strtod(buf, NULL), buf);
}

/* The keys of cfg as transformers names them for its model type. */
static void
config_fill(json_object *o, const dl_config *cfg)
{
	const char *act = cfg->act == DL_ACT_GELU_ERF ? "gelu" : "gelu_new";

#define SET(key, val) json_object_object_add(o, key, val)
	if (cfg->arch == DL_ARCH_GPTJ)
	{
		SET("architectures", json_object_new_array());
		json_object_array_add(json_object_object_get(o, "architectures"),
							  json_object_new_string("GPTJForCausalLM"));
		SET("model_type", json_object_new_string(config_arch_name(DL_ARCH_GPTJ)));
		SET("n_embd", json_object_new_int(cfg->n_embd));
		SET("n_layer", json_object_new_int(cfg->n_layer));
		SET("n_head", json_object_new_int(cfg->n_head));
		SET("n_inner", json_object_new_int(cfg->n_inner));
		SET("rotary_dim", json_object_new_int(cfg->rotary_dim));
		SET("n_positions", json_object_new_int(cfg->max_pos));
		SET("activation_function", json_object_new_string(act));
		SET("layer_norm_epsilon", float_json(cfg->ln_eps));
	}
	else
	{
		SET("architectures", json_object_new_array());
		json_object_array_add(json_object_object_get(o, "architectures"),
							  json_object_new_string("GPTNeoXForCausalLM"));
		SET("model_type", json_object_new_string(config_arch_name(DL_ARCH_GPTNEOX)));
		SET("hidden_size", json_object_new_int(cfg->n_embd));
		SET("num_hidden_layers", json_object_new_int(cfg->n_layer));
		SET("num_attention_heads", json_object_new_int(cfg->n_head));
		SET("intermediate_size", json_object_new_int(cfg->n_inner));
		SET("rotary_pct", json_object_new_double(rotary_pct_for(cfg)));
		SET("rotary_emb_base", float_json(cfg->rotary_base));
		SET("max_position_embeddings", json_object_new_int(cfg->max_pos));
		SET("hidden_act", json_object_new_string(act));
		SET("layer_norm_eps", float_json(cfg->ln_eps));
		SET("use_parallel_residual", json_object_new_boolean(cfg->parallel_residual));
		SET("attention_bias", json_object_new_boolean(cfg->attention_bias));
		/* the newer spelling wins in transformers: keep it from contradicting ours */
		json_object_object_del(o, "rope_parameters");
		json_object_object_del(o, "rope_scaling");
	}
	SET("vocab_size", json_object_new_int(cfg->vocab_size));
	SET("tie_word_embeddings", json_object_new_boolean(cfg->tie_embeddings));
	SET("bos_token_id", cfg->bos_id >= 0 ? json_object_new_int(cfg->bos_id) : NULL);
	SET("eos_token_id", cfg->eos_id >= 0 ? json_object_new_int(cfg->eos_id) : NULL);
	SET("torch_dtype", json_object_new_string("float32"));
	json_object_object_del(o, "dtype");
#undef SET
}

/*
 * Write cfg as a config.json at path that transformers loads. With base_path, the base
 * model's config.json is kept (keys we do not model survive) and ours overwrite it.
 */
dl_status
config_write(const dl_config *cfg, const char *base_path, const char *path, dl_error *err)
{
	json_object *o;
	dl_status	st = DL_OK;

	if (base_path == NULL)
		o = json_object_new_object();
	else if ((o = json_object_from_file(base_path)) == NULL ||
			 !json_object_is_type(o, json_type_object))
	{
		json_object_put(o);
		return dl_fail(err, DL_EFORMAT, "cannot read \"%s\": %s", base_path,
					   json_util_get_last_err());
	}
	config_fill(o, cfg);
	if (json_object_to_file_ext(path, o, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_NOSLASHESCAPE) != 0)
		st = dl_fail(err, DL_EIO, "cannot write \"%s\": %s", path, json_util_get_last_err());
	json_object_put(o);
	return st;
}
