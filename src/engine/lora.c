/*
 * lora.c: adapters of lora.h: the modules each architecture offers, an adapter's one
 * allocation and its tensor map under PEFT's names, fresh adapters, and PEFT's adapter
 * directories read and written (adapter_config.json through json-c, the tensors through
 * model.c's weights_load and model_save.c's weights_write).
 */
#include "lora.h"

#include "bf16.h"
#include "files.h"
#include "sampler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json.h>

/* A module an architecture lets an adapter target, and where it sits in a layer. */
typedef struct module_spec
{
	const char *name;			/* PEFT's target name */
	const char *path;			/* within a layer, before the name */
	dl_lora_product product;
	int			col0;			/* in widths E of the product's output: q 0, k 1, v 2 */
	int			wide_out;		/* output F wide (fc_in), else E times n_out_e */
	int			n_out_e;
	int			wide_in;		/* input F wide (fc_out), else E */
	int			default_target;	/* PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING */
} module_spec;

static const module_spec gptj_modules[] = {
	{"q_proj", "attn.", DL_LORA_QKV, 0, 0, 1, 0, 1},
	{"k_proj", "attn.", DL_LORA_QKV, 1, 0, 1, 0, 0},
	{"v_proj", "attn.", DL_LORA_QKV, 2, 0, 1, 0, 1},
	{"out_proj", "attn.", DL_LORA_PROJ, 0, 0, 1, 0, 0},
	{"fc_in", "mlp.", DL_LORA_FC_IN, 0, 1, 0, 0, 0},
	{"fc_out", "mlp.", DL_LORA_FC_OUT, 0, 0, 1, 1, 0},
};

static const module_spec neox_modules[] = {
	{"query_key_value", "attention.", DL_LORA_QKV, 0, 0, 3, 0, 1},
	{"dense", "attention.", DL_LORA_PROJ, 0, 0, 1, 0, 0},
	{"dense_h_to_4h", "mlp.", DL_LORA_FC_IN, 0, 1, 0, 0, 0},
	{"dense_4h_to_h", "mlp.", DL_LORA_FC_OUT, 0, 0, 1, 1, 0},
};

/* The modules of c's architecture, *n of them, and the path of layer l's ("%d"). */
static const module_spec *
modules_of(const dl_config *c, int *n, const char **layer_fmt)
{
	if (c->arch == DL_ARCH_GPTJ)
	{
		*n = (int) (sizeof(gptj_modules) / sizeof(gptj_modules[0]));
		*layer_fmt = "transformer.h.%d.";
		return gptj_modules;
	}
	*n = (int) (sizeof(neox_modules) / sizeof(neox_modules[0]));
	*layer_fmt = "gpt_neox.layers.%d.";
	return neox_modules;
}

/* The path of c's input embedding, whose module name lora_token_module gives. */
static const char *
token_embed_path(const dl_config *c)
{
	return c->arch == DL_ARCH_GPTJ ? "transformer.wte" : "gpt_neox.embed_in";
}

const char *
lora_token_module(const dl_config *c)
{
	return c->arch == DL_ARCH_GPTJ ? "wte" : "embed_in";
}

void
lora_defaults(dl_lora_config *cfg)
{
	*cfg = (dl_lora_config) {.r = 8, .alpha = 16.0f, .dropout = 0.05f, .ntargets = 0};
}

/* Whether name is one of the ntargets names. */
static int
named(char (*targets)[32], int ntargets, const char *name)
{
	for (int i = 0; i < ntargets; i++)
		if (strcmp(targets[i], name) == 0)
			return 1;
	return 0;
}

/*
 * The adapter's targets from PEFT module names (none: the architecture's defaults), in
 * the architecture's order; a name it does not have is DL_EINVAL listing those it has.
 */
static dl_status
set_targets(dl_lora *a, const dl_config *c, char (*targets)[32], int ntargets, dl_error *err)
{
	const char *layer_fmt;
	int			n;
	const module_spec *ms = modules_of(c, &n, &layer_fmt);
	char		names[256] = "";

	for (int i = 0; i < n; i++)
		snprintf(names + strlen(names), sizeof(names) - strlen(names), "%s%s", i ? ", " : "",
				 ms[i].name);
	for (int i = 0; i < ntargets; i++)
	{
		int			known = 0;

		for (int j = 0; j < n; j++)
			known |= strcmp(targets[i], ms[j].name) == 0;
		if (!known)
		{
			dl_fail(err, DL_EINVAL, "%s has no module \"%s\" for LoRA", config_arch_name(c->arch),
					targets[i]);
			return dl_hint(err, "Its layers' linear modules are %s.", names);
		}
	}
	a->ntargets = 0;
	for (int j = 0; j < n; j++)
	{
		dl_lora_target *t = &a->targets[a->ntargets];

		if (ntargets ? !named(targets, ntargets, ms[j].name) : !ms[j].default_target)
			continue;
		snprintf(t->module, sizeof(t->module), "%s", ms[j].name);
		t->product = ms[j].product;
		t->col0 = ms[j].col0 * c->n_embd;
		t->n_out = ms[j].wide_out ? c->n_inner : ms[j].n_out_e * c->n_embd;
		t->n_in = ms[j].wide_in ? c->n_inner : c->n_embd;
		t->rowmap = c->arch != DL_ARCH_GPTJ && ms[j].product == DL_LORA_QKV ? DL_ROWS_NEOX_QKV
			: DL_ROWS_SAME;
		a->ntargets++;
	}
	return DL_OK;
}

void
lora_module_path(const dl_config *c, int l, const dl_lora_target *t, char *buf, size_t len)
{
	const char *layer_fmt;
	int			n,
				at;
	const module_spec *ms = modules_of(c, &n, &layer_fmt);

	at = snprintf(buf, len, layer_fmt, l);
	for (int j = 0; j < n; j++)
		if (strcmp(ms[j].name, t->module) == 0)
			snprintf(buf + at, len - at, "%s%s", ms[j].path, t->module);
}

/* bytes rounded up to a multiple of align */
static size_t
aligned_size(size_t bytes, size_t align)
{
	return (bytes + align - 1) / align * align;
}

/*
 * The map and spans of an adapter with its targets and rank set, for a base of c, on a
 * backend of that alignment: layer by layer, each target's A then B.
 */
static dl_status
layout(dl_lora *a, const dl_config *c, size_t align, dl_error *err)
{
	int			L = c->n_layer;
	size_t		off = 0;

	a->nmap = 2 * a->ntargets * L + (a->ntok ? 2 : 0);
	a->map = calloc(a->nmap, sizeof(dl_tensor_map));
	a->spans = calloc(2 * DL_GRAD_SPANS(c), sizeof(size_t));
	if (a->map == NULL || a->spans == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating an adapter");
	for (int l = 0; l < L; l++)
	{
		/* span n_layer - l is layer l (model.h's order) */
		a->spans[2 * (L - l)] = off;
		for (int i = 0; i < a->ntargets; i++)
		{
			const dl_lora_target *t = &a->targets[i];
			char		path[96];

			lora_module_path(c, l, t, path, sizeof(path));
			for (int k = 0; k < 2; k++)
			{
				dl_tensor_map *e = &a->map[2 * (l * a->ntargets + i) + k];

				snprintf(e->name, sizeof(e->name), DL_LORA_PREFIX "%s.lora_%c.weight", path,
						 k ? 'B' : 'A');
				e->ndim = 2;
				e->shape[0] = k ? t->n_out : a->r;
				e->shape[1] = k ? a->r : t->n_in;
				e->fmt = DL_FMT_F32;
				e->offset = off;
				e->rowmap = k ? t->rowmap : DL_ROWS_SAME;
				off += aligned_size(e->shape[0] * e->shape[1] * sizeof(float), align);
			}
		}
		a->spans[2 * (L - l) + 1] = off;
	}
	/* the token rows, in the embedding's span and the head's (empty without) */
	for (int k = 0; k < 2; k++)
	{
		int			s = k ? 0 : L + 1;

		a->spans[2 * s] = off;
		if (a->ntok)
		{
			dl_tensor_map *e = &a->map[2 * a->ntargets * L + k];

			snprintf(e->name, sizeof(e->name), DL_LORA_PREFIX "%s.token_adapter.trainable_tokens_delta",
					 k ? DL_LORA_TOKEN_HEAD : token_embed_path(c));
			e->ndim = 2;
			e->shape[0] = a->ntok;
			e->shape[1] = c->n_embd;
			e->fmt = DL_FMT_F32;
			e->offset = off;
			e->rowmap = DL_ROWS_SAME;
			off += aligned_size((size_t) a->ntok * c->n_embd * sizeof(float), align);
		}
		a->spans[2 * s + 1] = off;
	}
	a->bytes = off;
	/* lora_tokens' constants: the base's output rows, eye, index */
	if (a->ntok)
		off += aligned_size((size_t) a->ntok * c->n_embd * sizeof(float), align) +
			aligned_size((size_t) a->ntok * a->ntok * sizeof(float), align) +
			aligned_size((size_t) a->ntok * sizeof(int32_t), align);
	a->mem_bytes = off;
	return DL_OK;
}

/*
 * An adapter for a base of c with rank r, alpha and targets, laid out for a backend of
 * that alignment; no memory yet (model and mem NULL).
 */
static dl_status
lora_new(const dl_config *c, size_t align, const dl_lora_config *cfg, int rslora, dl_lora **out,
		 dl_error *err)
{
	dl_lora    *a;
	dl_status	st;
	int			r = cfg->r;
	float		alpha = cfg->alpha;

	*out = NULL;
	if (r < 1 || r > DL_LORA_MAX_RANK)
		return dl_fail(err, DL_EINVAL, "LoRA rank %d is out of range (1 .. %d)", r, DL_LORA_MAX_RANK);
	if (!(alpha > 0.0f && isfinite(alpha)))
		return dl_fail(err, DL_EINVAL, "LoRA alpha %g is not a finite number > 0", alpha);
	/* (a configuration read without weights has no vocabulary yet: the merge checks it) */
	if (cfg->ntok < 0 || cfg->ntok > DL_LORA_MAX_TOKENS || cfg->tok0 < 0 ||
		(cfg->ntok && c->vocab_size > 0 && cfg->tok0 > c->vocab_size - cfg->ntok))
	{
		dl_fail(err, DL_EINVAL, "token rows %d .. %d are not %s's (0 .. %d), or more than %d",
				cfg->tok0, cfg->tok0 + cfg->ntok - 1, config_arch_name(c->arch), c->vocab_size - 1,
				DL_LORA_MAX_TOKENS);
		return dl_hint(err, "An adapter's token rows are rows the base's tables already have.");
	}
	if (cfg->ntok && c->tie_embeddings)
	{
		dl_fail(err, DL_EUNSUPPORTED, "token rows of an adapter over tied embeddings are not supported");
		return dl_hint(err, "Fine-tune the whole model once (it adds Dolly's tokens), or start from a model that has them.");
	}
	a = calloc(1, sizeof(*a));
	if (a == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating an adapter");
	a->r = r;
	a->alpha = alpha;
	a->rslora = rslora;
	a->scale = rslora ? alpha / sqrtf((float) r) : alpha / (float) r;
	a->tok0 = cfg->tok0;
	a->ntok = cfg->ntok;
	st = set_targets(a, c, (char (*)[32]) cfg->targets, cfg->ntargets, err);
	if (st == DL_OK)
		st = layout(a, c, align, err);
	if (st != DL_OK)
	{
		dl_lora_free(a);
		return st;
	}
	*out = a;
	return DL_OK;
}

/* Rows [row0, row0 + n) of m's table table ([V, E], weight format) as float32 at dst. */
static dl_status
table_rows(const dl_model *m, const void *table, int row0, int n, float *dst, dl_error *err)
{
	dl_backend *be = m->be;
	size_t		count = (size_t) n * m->cfg.n_embd,
				es = be->weight_elem_size;
	const char *src = (const char *) table + (size_t) row0 * m->cfg.n_embd * es;
	uint16_t   *h;
	dl_status	st;

	if (es == sizeof(float))
		return be->download(be, dst, src, count * sizeof(float), err);
	/* the only narrower weight format is bfloat16 (backend.h) */
	h = malloc(count * sizeof(uint16_t));
	if (h == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory reading token rows");
	st = be->download(be, h, src, count * sizeof(uint16_t), err);
	for (size_t i = 0; st == DL_OK && i < count; i++)
		dst[i] = bf16_to_float(h[i]);
	free(h);
	return st;
}

/*
 * a's memory on m's backend, the trained part's contents undefined: a becomes an
 * adapter of m. lora_tokens' constants are set: the base's output rows of the token
 * ids, as the base computes with them, eye and index.
 */
static dl_status
lora_alloc(dl_lora *a, const dl_model *m, dl_error *err)
{
	size_t		E = m->cfg.n_embd,
				n = a->ntok;
	float	   *buf;
	int32_t    *index;
	dl_lora_tokens tk;
	dl_status	st = model_alloc(m->be, a->mem_bytes, &a->mem, err);

	if (st != DL_OK)
		return dl_hint(err, "The adapter needs %zu MB.", a->mem_bytes >> 20);
	a->model = m;
	if (n == 0)
		return DL_OK;
	tk = lora_tokens(a, NULL);
	buf = calloc(n * (E > n ? E : n), sizeof(float));
	index = malloc(n * sizeof(int32_t));
	if (buf == NULL || index == NULL)
		st = dl_fail(err, DL_ENOMEM, "out of memory setting an adapter's token rows");
	if (st == DL_OK)
		st = table_rows(m, m->p.lm_head, a->tok0, n, buf, err);
	if (st == DL_OK)
		st = m->be->upload(m->be, (float *) tk.base_out, buf, n * E * sizeof(float), err);
	if (st == DL_OK)
		st = m->be->synchronize(m->be, err);
	if (st == DL_OK)
	{
		memset(buf, 0, n * n * sizeof(float));
		for (size_t k = 0; k < n; k++)
		{
			buf[k * n + k] = 1.0f;
			index[k] = (int32_t) k;
		}
		st = m->be->upload(m->be, (float *) tk.eye, buf, n * n * sizeof(float), err);
	}
	if (st == DL_OK)
		st = m->be->upload(m->be, (int32_t *) tk.index, index, n * sizeof(int32_t), err);
	if (st == DL_OK)
		st = m->be->synchronize(m->be, err);
	free(buf);
	free(index);
	return st;
}

dl_status
dl_lora_create(const dl_model *m, const dl_lora_config *cfg, uint64_t seed, dl_lora **out,
			   dl_error *err)
{
	dl_lora    *a;
	float	   *buf = NULL;
	dl_rng		rng;
	dl_status	st;

	if (!(cfg->dropout >= 0.0f && cfg->dropout < 1.0f))
		return dl_fail(err, DL_EINVAL, "LoRA dropout %g is out of range [0, 1)", cfg->dropout);
	if (cfg->ntargets < 0 || cfg->ntargets > DL_LORA_MAX_TARGETS)
		return dl_fail(err, DL_EINVAL, "%d LoRA targets; at most %d", cfg->ntargets, DL_LORA_MAX_TARGETS);
	st = lora_new(&m->cfg, m->be->alignment, cfg, 0, &a, err);
	if (st == DL_OK && (st = lora_alloc(a, m, err)) != DL_OK)
		dl_lora_free(a);
	if (st != DL_OK)
		return st;
	a->dropout = cfg->dropout;
	m->be->zero(m->be, a->mem, a->bytes);
	rng_seed(&rng, seed);
	for (int i = 0; i < 2 * a->ntargets * m->cfg.n_layer && st == DL_OK; i += 2)
	{
		/* A: kaiming_uniform_(a = sqrt(5)) as PEFT, uniform in +-1/sqrt(fan_in); B stays 0 */
		const dl_tensor_map *e = &a->map[i];
		size_t		n = (size_t) e->shape[0] * e->shape[1];
		double		bound = 1.0 / sqrt((double) e->shape[1]);
		float	   *grown = realloc(buf, n * sizeof(float));

		if (grown == NULL)
		{
			st = dl_fail(err, DL_ENOMEM, "out of memory initialising an adapter");
			break;
		}
		buf = grown;
		for (size_t j = 0; j < n; j++)
			buf[j] = (float) ((2.0 * rng_uniform(&rng) - 1.0) * bound);
		st = m->be->upload(m->be, (char *) a->mem + e->offset, buf, n * sizeof(float), err);
	}
	if (st == DL_OK)
		st = m->be->synchronize(m->be, err);
	free(buf);
	/* token rows start as the base's, as PEFT's */
	if (st == DL_OK && a->ntok)
	{
		dl_lora_tokens tk = lora_tokens(a, NULL);
		size_t		bytes = (size_t) a->ntok * m->cfg.n_embd * sizeof(float);

		m->be->copy(m->be, (float *) tk.out, tk.base_out, bytes);
		buf = malloc(bytes);
		st = buf ? table_rows(m, m->p.wte, a->tok0, a->ntok, buf, err)
			: dl_fail(err, DL_ENOMEM, "out of memory initialising an adapter");
		if (st == DL_OK)
			st = m->be->upload(m->be, (float *) tk.in, buf, bytes, err);
		if (st == DL_OK)
			st = m->be->synchronize(m->be, err);
		free(buf);
	}
	if (st != DL_OK)
	{
		dl_lora_free(a);
		return st;
	}
	*out = a;
	return DL_OK;
}

/* Member key of obj, NULL when absent or JSON null. */
static json_object *
member(json_object *obj, const char *key)
{
	json_object *v = NULL;

	return json_object_object_get_ex(obj, key, &v) ? v : NULL;
}

/* Whether member key of obj is absent, null, false, or an empty object, list or string. */
static int
unset(json_object *obj, const char *key)
{
	json_object *v = member(obj, key);

	switch (v ? json_object_get_type(v) : json_type_null)
	{
		case json_type_null:
			return 1;
		case json_type_boolean:
			return !json_object_get_boolean(v);
		case json_type_object:
			return json_object_object_length(v) == 0;
		case json_type_array:
			return json_object_array_length(v) == 0;
		case json_type_string:
			return json_object_get_string_len(v) == 0;
		default:
			return 0;
	}
}

/* What of PEFT's LoRA options we do not compute, as a message; NULL when none is set. */
static const char *
unsupported_option(json_object *cfg)
{
	static const char *const options[] = {
		"use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save",
		"fan_in_fan_out", "lora_bias", "target_parameters",
		"layer_replication", "use_qalora", "alora_invocation_tokens",
	};
	const char *bias = member(cfg, "bias") ? json_object_get_string(member(cfg, "bias")) : "none";

	for (size_t i = 0; i < sizeof(options) / sizeof(options[0]); i++)
		if (!unset(cfg, options[i]))
			return options[i];
	return strcmp(bias, "none") == 0 ? NULL : "bias";
}

/* The hint of a directory that is not an adapter's. */
#define ADAPTER_DIR_HINT "An adapter directory is what PEFT's save_pretrained writes."

/*
 * trainable_token_indices of cfg into c's tok0 and ntok, and the embedding's module name
 * into embed: we take the form that names the embedding and lm_head with the same
 * consecutive ids (what we write); absent, none.
 */
static dl_status
read_token_rows(json_object *cfg, const char *path, dl_lora_config *c, char *embed, dl_error *err)
{
	json_object *v = member(cfg, "trainable_token_indices"),
			   *lists[2] = {NULL, NULL};
	int			ok;

	c->tok0 = c->ntok = 0;
	embed[0] = '\0';
	if (unset(cfg, "trainable_token_indices"))
		return DL_OK;
	ok = json_object_is_type(v, json_type_object) && json_object_object_length(v) == 2;
	if (ok)
	{
		json_object_object_foreach(v, key, list)
		{
			int			head = strcmp(key, DL_LORA_TOKEN_HEAD) == 0;

			lists[head] = list;
			if (!head)
				snprintf(embed, 32, "%s", key);
		}
	}
	ok = ok && lists[0] && lists[1] && json_object_is_type(lists[0], json_type_array) &&
		json_object_is_type(lists[1], json_type_array) &&
		json_object_array_length(lists[0]) == json_object_array_length(lists[1]) &&
		json_object_array_length(lists[0]) >= 1 &&
		json_object_array_length(lists[0]) <= DL_LORA_MAX_TOKENS;
	for (size_t i = 0; ok && i < json_object_array_length(lists[0]); i++)
	{
		int			id = json_object_get_int(json_object_array_get_idx(lists[0], i));

		c->tok0 = i ? c->tok0 : id;
		ok = id == c->tok0 + (int) i && id == json_object_get_int(json_object_array_get_idx(lists[1], i));
	}
	if (!ok)
	{
		dl_fail(err, DL_EUNSUPPORTED, "\"%s\": trainable_token_indices of this form is not supported", path);
		return dl_hint(err, "Token rows are served when the input embedding and %s list the same consecutive ids (at most %d).",
					   DL_LORA_TOKEN_HEAD, DL_LORA_MAX_TOKENS);
	}
	c->ntok = (int) json_object_array_length(lists[0]);
	return DL_OK;
}

/*
 * adapter_config.json of dir, checked: its rank, alpha, targets and token rows in c,
 * rsLoRA, the module name its token rows give the embedding, and its base.
 */
static dl_status
read_config(const char *dir, dl_lora_config *c, int *rslora, char *embed, char *base,
			size_t base_len, dl_error *err)
{
	char		path[4200];
	char	   *text;
	size_t		len;
	json_object *cfg,
			   *v;
	const char *what;
	dl_status	st;

	memset(c, 0, sizeof(*c));
	snprintf(path, sizeof(path), "%s/adapter_config.json", dir);
	st = file_read(path, "adapter configuration", 1 << 20, &text, &len, err);
	if (st != DL_OK)
		return dl_hint(err, ADAPTER_DIR_HINT);
	cfg = json_tokener_parse(text);
	free(text);
	if (cfg == NULL || !json_object_is_type(cfg, json_type_object))
	{
		json_object_put(cfg);
		return dl_fail(err, DL_EFORMAT, "\"%s\" is not a JSON object", path);
	}
	st = DL_OK;
	v = member(cfg, "peft_type");
	if (v == NULL || strcmp(json_object_get_string(v), "LORA") != 0)
		st = dl_fail(err, DL_EUNSUPPORTED, "\"%s\": PEFT type %s is not supported; only LORA is",
					 path, v ? json_object_get_string(v) : "(none)");
	else if ((what = unsupported_option(cfg)) != NULL)
	{
		dl_fail(err, DL_EUNSUPPORTED, "\"%s\": the LoRA option \"%s\" is not supported", path, what);
		dl_hint(err, "Adapters of plain LoRA (or rsLoRA) on linear modules, without biases, are served.");
		st = DL_EUNSUPPORTED;
	}
	else if ((v = member(cfg, "target_modules")) == NULL || !json_object_is_type(v, json_type_array) ||
			 json_object_array_length(v) < 1 || json_object_array_length(v) > DL_LORA_MAX_TARGETS)
	{
		dl_fail(err, DL_EFORMAT, "\"%s\": target_modules is not a list of 1 to %d module names", path,
				DL_LORA_MAX_TARGETS);
		dl_hint(err, "A regular expression of module names is not supported: list them.");
		st = DL_EFORMAT;
	}
	else
		st = read_token_rows(cfg, path, c, embed, err);
	if (st == DL_OK)
	{
		c->ntargets = (int) json_object_array_length(v);
		for (int i = 0; i < c->ntargets; i++)
			snprintf(c->targets[i], 32, "%s", json_object_get_string(json_object_array_get_idx(v, i)));
		c->r = member(cfg, "r") ? json_object_get_int(member(cfg, "r")) : 8;
		c->alpha = member(cfg, "lora_alpha") ? (float) json_object_get_double(member(cfg, "lora_alpha")) : 8.0f;
		*rslora = !unset(cfg, "use_rslora");
		v = member(cfg, "base_model_name_or_path");
		snprintf(base, base_len, "%s", v ? json_object_get_string(v) : "");
	}
	json_object_put(cfg);
	return st;
}

dl_status
lora_read(const char *dir, const dl_config *c, size_t align, dl_lora **out, dl_error *err)
{
	dl_lora_config cfg;
	char		base[1024],
				embed[32];
	int			rslora = 0;
	dl_status	st;

	*out = NULL;
	st = read_config(dir, &cfg, &rslora, embed, base, sizeof(base), err);
	if (st == DL_OK && cfg.ntok && strcmp(embed, lora_token_module(c)) != 0)
	{
		dl_fail(err, DL_EINVAL, "the adapter's token rows are of module \"%s\"; %s's embedding is \"%s\"",
				embed, config_arch_name(c->arch), lora_token_module(c));
		return dl_hint(err, "An adapter runs only on the base model it was trained from.");
	}
	if (st == DL_OK)
		st = lora_new(c, align, &cfg, rslora, out, err);
	if (st == DL_OK)
		snprintf((*out)->base_name, sizeof((*out)->base_name), "%s", base);
	return st;
}

dl_status
lora_base_name(const char *dir, char *base, size_t len, dl_error *err)
{
	dl_lora_config cfg;
	char		embed[32];
	int			rslora;

	return read_config(dir, &cfg, &rslora, embed, base, len, err);
}

dl_status
lora_open_tensors(const char *dir, st_set **out, dl_error *err)
{
	char		path[4200];

	snprintf(path, sizeof(path), "%s/adapter_model.safetensors", dir);
	if (st_open_file(path, out, err) != DL_OK)
		return dl_hint(err, ADAPTER_DIR_HINT);
	return DL_OK;
}

dl_status
dl_lora_load(const dl_model *m, const char *dir, dl_lora **out, dl_error *err)
{
	dl_lora    *a;
	st_set	   *set = NULL;
	dl_status	st;
	char		base[1024];
	int			misfit;

	*out = NULL;
	/* the configuration alone first: its errors are its own */
	st = lora_base_name(dir, base, sizeof(base), err);
	if (st != DL_OK)
		return st;
	/* then a module the model lacks, a shape it does not have: another base's adapter */
	st = lora_read(dir, &m->cfg, m->be->alignment, &a, err);
	misfit = st == DL_EINVAL;
	if (st == DL_OK)
		st = lora_alloc(a, m, err);
	if (st == DL_OK)
		st = lora_open_tensors(dir, &set, err);
	if (st == DL_OK)
	{
		st = weights_load(m->be, a->mem, a->map, a->nmap, &m->cfg, set, dir, "LoRA adapter",
						  NULL, NULL, err);
		misfit = st == DL_EFORMAT;
	}
	st_close(set);
	if (misfit)
	{
		char		why[sizeof(err->msg)],
					hint[sizeof(err->hint)];

		snprintf(why, sizeof(why), "%s", err->msg);
		snprintf(hint, sizeof(hint), "%s", err->hint);
		dl_fail(err, st, "the LoRA adapter (of \"%s\") does not fit this model: %s", base, why);
		dl_hint(err, "An adapter runs only on the base model it was trained from.%s%s",
				hint[0] ? " " : "", hint);
	}
	if (st != DL_OK)
	{
		dl_lora_free(a);
		return st;
	}
	*out = a;
	return DL_OK;
}

void
dl_lora_free(dl_lora *a)
{
	if (a == NULL)
		return;
	if (a->model)
		a->model->be->free(a->model->be, a->mem);
	free(a->map);
	free(a->spans);
	free(a);
}

int64_t
dl_lora_param_count(const dl_lora *a)
{
	int64_t		n = 0;

	for (int i = 0; i < a->nmap; i++)
		n += a->map[i].shape[0] * a->map[i].shape[1];
	return n;
}

dl_trained
dl_lora_trained(const dl_lora *a)
{
	return (dl_trained) {a->mem, a->bytes, a->map, a->nmap, a->spans};
}

dl_lora_tokens
lora_tokens(const dl_lora *a, float *const *grads)
{
	dl_lora_tokens t = {0};
	const dl_tensor_map *e;
	int			L;
	size_t		E,
				align;
	const char *c;

	if (a == NULL || a->ntok == 0)
		return t;
	L = a->model->cfg.n_layer;
	E = a->model->cfg.n_embd;
	align = a->model->be->alignment;
	e = &a->map[2 * a->ntargets * L];
	c = (const char *) a->mem + a->bytes;
	t.tok0 = a->tok0;
	t.n = a->ntok;
	t.in = (const float *) ((const char *) a->mem + e[0].offset);
	t.out = (const float *) ((const char *) a->mem + e[1].offset);
	t.base_out = (const float *) c;
	c += aligned_size(a->ntok * E * sizeof(float), align);
	t.eye = (const float *) c;
	c += aligned_size((size_t) a->ntok * a->ntok * sizeof(float), align);
	t.index = (const int32_t *) c;
	/* the embedding's rows in its span, the output's in the head's */
	if (grads && grads[L + 1])
		t.din = (float *) ((char *) grads[L + 1] + (e[0].offset - a->spans[2 * (L + 1)]));
	if (grads && grads[0])
		t.dout = (float *) ((char *) grads[0] + (e[1].offset - a->spans[0]));
	return t;
}

void
lora_tokens_embed(dl_backend *be, float *x, int E, const int32_t *ids, const dl_lora_run *runs,
				  int nruns)
{
	for (int i = 0; i < nruns; i++)
	{
		dl_lora_tokens tk = lora_tokens(runs[i].a, NULL);

		for (int t = runs[i].first; t < runs[i].first + runs[i].n; t++)
			if (ids[t] >= tk.tok0 && ids[t] < tk.tok0 + tk.n)
				be->copy(be, x + (size_t) t * E, tk.in + (size_t) (ids[t] - tk.tok0) * E,
						 E * sizeof(float));
	}
}

void
lora_tokens_embed_backward(dl_backend *be, const dl_lora_tokens *tk, const float *dx, int E,
						   const int32_t *ids, int T)
{
	for (int t = 0; tk->din && t < T; t++)
		if (ids[t] >= tk->tok0 && ids[t] < tk->tok0 + tk->n)
			be->embedding_backward(be, tk->din, dx + (size_t) t * E, tk->index + (ids[t] - tk->tok0),
								   1, E);
}

/* segments of one lora_forward call of lora_tokens_logits; more take several */
#define TOKEN_SEGS 32

void
lora_tokens_logits(dl_backend *be, float *logits, int V, float *u, const float *in, int E,
				   const dl_lora_run *runs, int nruns)
{
	/* the adapters' rows added, then the base's subtracted: two passes over the runs */
	for (int sign = 1; sign >= -1; sign -= 2)
	{
		dl_lora_seg segs[TOKEN_SEGS];
		int			nseg = 0;

		for (int i = 0; i <= nruns; i++)
		{
			dl_lora_tokens tk = lora_tokens(i < nruns ? runs[i].a : NULL, NULL);

			if ((i == nruns || nseg == TOKEN_SEGS) && nseg > 0)
			{
				be->lora_forward(be, logits, V, u, in, E, segs, nseg, NULL);
				nseg = 0;
			}
			if (tk.n == 0 || runs[i].n == 0)
				continue;
			segs[nseg++] = (dl_lora_seg) {
				{sign > 0 ? tk.out : tk.base_out, tk.eye, NULL, NULL, tk.n, (float) sign, 0.0f, 0},
				runs[i].first, runs[i].n, tk.tok0, tk.n};
		}
	}
}

void
lora_tokens_logits_backward(dl_backend *be, const dl_lora_tokens *tk, float *din,
							const float *dlogits, int V, float *u, const float *in, int M, int E)
{
	dl_lora_mats w = {tk->out, tk->eye, tk->dout, NULL, tk->n, 1.0f, 0.0f, 0};

	if (tk->n == 0)
		return;
	be->lora_backward(be, din, dlogits + tk->tok0, V, u, in, &w, M, E, tk->n, NULL);
	w = (dl_lora_mats) {tk->base_out, tk->eye, NULL, NULL, tk->n, -1.0f, 0.0f, 0};
	be->lora_backward(be, din, dlogits + tk->tok0, V, u, in, &w, M, E, tk->n, NULL);
}

dl_lora_mats
lora_mats(const dl_lora *a, int l, int i, float *const *grads)
{
	const dl_tensor_map *e = &a->map[2 * (l * a->ntargets + i)];
	/* layer l's span; its offsets within it locate the gradients */
	int			s = a->model->cfg.n_layer - l;
	size_t		lo = a->spans[2 * s];
	float	   *g = grads ? grads[s] : NULL;

	return (dl_lora_mats) {
		.A = (const float *) ((const char *) a->mem + e[0].offset),
		.B = (const float *) ((const char *) a->mem + e[1].offset),
		.dA = g ? (float *) ((char *) g + (e[0].offset - lo)) : NULL,
		.dB = g ? (float *) ((char *) g + (e[1].offset - lo)) : NULL,
		.r = a->r,
		.scale = a->scale,
		.dropout = grads ? a->dropout : 0.0f,
	};
}
