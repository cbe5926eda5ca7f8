/*
 * lora.c: adapters of lora.h: the modules each architecture offers, an adapter's one
 * allocation and its tensor map under PEFT's names, fresh adapters, and PEFT's adapter
 * directories read and written (adapter_config.json through json-c, the tensors through
 * model.c's weights_load and model_save.c's weights_write).
 */
#include "lora.h"

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

/*
 * The map and spans of an adapter with its targets and rank set, for a base of c, on a
 * backend of that alignment: layer by layer, each target's A then B.
 */
static dl_status
layout(dl_lora *a, const dl_config *c, size_t align, dl_error *err)
{
	int			L = c->n_layer;
	size_t		off = 0;

	a->nmap = 2 * a->ntargets * L;
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
				off += (e->shape[0] * e->shape[1] * sizeof(float) + align - 1) / align * align;
			}
		}
		a->spans[2 * (L - l) + 1] = off;
	}
	/* the head's and the embedding's spans are empty, at the end */
	a->spans[0] = a->spans[1] = off;
	a->spans[2 * (L + 1)] = a->spans[2 * (L + 1) + 1] = off;
	a->bytes = off;
	return DL_OK;
}

/*
 * An adapter for a base of c with rank r, alpha and targets, laid out for a backend of
 * that alignment; no memory yet (model and mem NULL).
 */
static dl_status
lora_new(const dl_config *c, size_t align, int r, float alpha, int rslora,
		 char (*targets)[32], int ntargets, dl_lora **out, dl_error *err)
{
	dl_lora    *a;
	dl_status	st;

	*out = NULL;
	if (r < 1 || r > DL_LORA_MAX_RANK)
		return dl_fail(err, DL_EINVAL, "LoRA rank %d is out of range (1 .. %d)", r, DL_LORA_MAX_RANK);
	if (!(alpha > 0.0f && isfinite(alpha)))
		return dl_fail(err, DL_EINVAL, "LoRA alpha %g is not a finite number > 0", alpha);
	a = calloc(1, sizeof(*a));
	if (a == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating an adapter");
	a->r = r;
	a->alpha = alpha;
	a->rslora = rslora;
	a->scale = rslora ? alpha / sqrtf((float) r) : alpha / (float) r;
	st = set_targets(a, c, targets, ntargets, err);
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

/* a's memory on m's backend, contents undefined: a becomes an adapter of m. */
static dl_status
lora_alloc(dl_lora *a, const dl_model *m, dl_error *err)
{
	dl_status	st = model_alloc(m->be, a->bytes, &a->mem, err);

	if (st != DL_OK)
		return dl_hint(err, "The adapter needs %zu MB.", a->bytes >> 20);
	a->model = m;
	return DL_OK;
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
	st = lora_new(&m->cfg, m->be->alignment, cfg->r, cfg->alpha, 0,
				  (char (*)[32]) cfg->targets, cfg->ntargets, &a, err);
	if (st == DL_OK && (st = lora_alloc(a, m, err)) != DL_OK)
		dl_lora_free(a);
	if (st != DL_OK)
		return st;
	a->dropout = cfg->dropout;
	m->be->zero(m->be, a->mem, a->bytes);
	rng_seed(&rng, seed);
	for (int i = 0; i < a->nmap && st == DL_OK; i += 2)
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
		"fan_in_fan_out", "lora_bias", "trainable_token_indices", "target_parameters",
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

/* adapter_config.json of dir: checked, its rank, alpha, rsLoRA, targets and base. */
static dl_status
read_config(const char *dir, int *r, float *alpha, int *rslora, char (*targets)[32],
			int *ntargets, char *base, size_t base_len, dl_error *err)
{
	char		path[4200];
	char	   *text;
	size_t		len;
	json_object *cfg,
			   *v;
	const char *what;
	dl_status	st;

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
	if (st == DL_OK)
	{
		*ntargets = (int) json_object_array_length(v);
		for (int i = 0; i < *ntargets; i++)
			snprintf(targets[i], 32, "%s", json_object_get_string(json_object_array_get_idx(v, i)));
		*r = member(cfg, "r") ? json_object_get_int(member(cfg, "r")) : 8;
		*alpha = member(cfg, "lora_alpha") ? (float) json_object_get_double(member(cfg, "lora_alpha")) : 8.0f;
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
	char		targets[DL_LORA_MAX_TARGETS][32],
				base[1024];
	int			r = 0,
				rslora = 0,
				ntargets = 0;
	float		alpha = 0;
	dl_status	st;

	*out = NULL;
	st = read_config(dir, &r, &alpha, &rslora, targets, &ntargets, base, sizeof(base), err);
	if (st == DL_OK)
		st = lora_new(c, align, r, alpha, rslora, targets, ntargets, out, err);
	if (st == DL_OK)
		snprintf((*out)->base_name, sizeof((*out)->base_name), "%s", base);
	return st;
}

dl_status
lora_base_name(const char *dir, char *base, size_t len, dl_error *err)
{
	char		targets[DL_LORA_MAX_TARGETS][32];
	int			r,
				rslora,
				ntargets;
	float		alpha;

	return read_config(dir, &r, &alpha, &rslora, targets, &ntargets, base, len, err);
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
