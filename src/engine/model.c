/*
 * model.c: loading GPT-J and GPT-NeoX parameters from a Hugging Face directory into one
 * backend allocation; see model.h for the layout. The forward pass is in model_forward.c.
 */
#include "model.h"
#include "safetensors.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The tensor map under construction, with the dl_params field each entry starts. */
typedef struct map_builder
{
	dl_tensor_map *map;
	int			n;
	int			cap;
	void	 ***slots;			/* slots[i]: where entry i's device pointer goes, or NULL */
	size_t		off;
	size_t		align;
	size_t		wsize;
} map_builder;

dl_status
model_alloc(dl_backend *be, size_t bytes, void **out, dl_error *err)
{
	dl_error	local;

	if (err == NULL)
		err = &local;
	*out = be->alloc(be, bytes, err);
	return *out ? DL_OK : err->code;
}

int32_t
model_neox_qkv_hf_row(int n_head, int head_dim, int r)
{
	int			E = n_head * head_dim;
	int			part = r / E;	/* 0 q, 1 k, 2 v */
	int			h = r % E / head_dim;
	int			d = r % head_dim;

	(void) n_head;
	return h * 3 * head_dim + part * head_dim + d;
}

/*
 * Append a tensor of shape [rows] (cols 0) or [rows, cols]. With a slot it starts a new
 * parameter (aligned) whose device pointer is stored in *slot after allocation; without,
 * its rows directly follow the previous entry's (GPT-J's k_proj after q_proj).
 */
static dl_status
map_add(map_builder *b, void **slot, dl_fmt fmt, dl_rowmap rowmap, int64_t rows, int64_t cols,
		dl_error *err, const char *name_fmt,...) __attribute__((format(printf, 8, 9)));

static dl_status
map_add(map_builder *b, void **slot, dl_fmt fmt, dl_rowmap rowmap, int64_t rows, int64_t cols,
		dl_error *err, const char *name_fmt,...)
{
	dl_tensor_map *e;
	va_list		ap;

	if (b->n == b->cap)
	{
		int			cap = b->cap ? b->cap * 2 : 64;
		dl_tensor_map *map = realloc(b->map, cap * sizeof(*map));
		void	 ***slots = realloc(b->slots, cap * sizeof(*slots));

		if (map)
			b->map = map;
		if (slots)
			b->slots = slots;
		if (map == NULL || slots == NULL)
			return dl_fail(err, DL_ENOMEM, "out of memory building the tensor map");
		b->cap = cap;
	}
	e = &b->map[b->n];
	va_start(ap, name_fmt);
	vsnprintf(e->name, sizeof(e->name), name_fmt, ap);
	va_end(ap);
	e->ndim = cols ? 2 : 1;
	e->shape[0] = rows;
	e->shape[1] = cols;
	e->fmt = fmt;
	e->rowmap = rowmap;
	if (slot)
		b->off = (b->off + b->align - 1) / b->align * b->align;
	e->offset = b->off;
	b->off += (size_t) rows * (cols ? cols : 1) * (fmt == DL_FMT_WEIGHT ? b->wsize : sizeof(float));
	b->slots[b->n] = slot;
	b->n++;
	return DL_OK;
}

#define ADD(slot, fmt, rm, rows, cols, ...) do { \
		dl_status	st_ = map_add(b, (void **) (slot), fmt, rm, rows, cols, err, __VA_ARGS__); \
		if (st_ != DL_OK) return st_; \
	} while (0)
#define MAT DL_FMT_WEIGHT
#define VEC DL_FMT_F32
#define SAME DL_ROWS_SAME

/* The tensors of a GPT-J checkpoint (MODEL_SPEC.md section 5). */
static dl_status
map_gptj(map_builder *b, dl_model *m, dl_error *err)
{
	const dl_config *c = &m->cfg;
	int64_t		E = c->n_embd,
				F = c->n_inner,
				V = c->vocab_size;

	ADD(&m->p.wte, MAT, SAME, V, E, "transformer.wte.weight");
	for (int i = 0; i < c->n_layer; i++)
	{
		dl_layer_params *L = &m->p.layers[i];

		ADD(&L->ln1_w, VEC, SAME, E, 0, "transformer.h.%d.ln_1.weight", i);
		ADD(&L->ln1_b, VEC, SAME, E, 0, "transformer.h.%d.ln_1.bias", i);
		ADD(&L->qkv_w, MAT, SAME, E, E, "transformer.h.%d.attn.q_proj.weight", i);
		ADD(NULL, MAT, SAME, E, E, "transformer.h.%d.attn.k_proj.weight", i);
		ADD(NULL, MAT, SAME, E, E, "transformer.h.%d.attn.v_proj.weight", i);
		ADD(&L->proj_w, MAT, SAME, E, E, "transformer.h.%d.attn.out_proj.weight", i);
		ADD(&L->fc_in_w, MAT, SAME, F, E, "transformer.h.%d.mlp.fc_in.weight", i);
		ADD(&L->fc_in_b, VEC, SAME, F, 0, "transformer.h.%d.mlp.fc_in.bias", i);
		ADD(&L->fc_out_w, MAT, SAME, E, F, "transformer.h.%d.mlp.fc_out.weight", i);
		ADD(&L->fc_out_b, VEC, SAME, E, 0, "transformer.h.%d.mlp.fc_out.bias", i);
	}
	ADD(&m->p.lnf_w, VEC, SAME, E, 0, "transformer.ln_f.weight");
	ADD(&m->p.lnf_b, VEC, SAME, E, 0, "transformer.ln_f.bias");
	if (!c->tie_embeddings)
		ADD(&m->p.lm_head, MAT, SAME, V, E, "lm_head.weight");
	/* nn.Linear(n_embd, vocab_size) has a bias, and transformers always saves it */
	ADD(&m->p.lm_head_b, VEC, SAME, V, 0, "lm_head.bias");
	return DL_OK;
}

/* The tensors of a GPT-NeoX checkpoint (MODEL_SPEC.md section 6). */
static dl_status
map_neox(map_builder *b, dl_model *m, dl_error *err)
{
	const dl_config *c = &m->cfg;
	int64_t		E = c->n_embd,
				F = c->n_inner,
				V = c->vocab_size;

	ADD(&m->p.wte, MAT, SAME, V, E, "gpt_neox.embed_in.weight");
	for (int i = 0; i < c->n_layer; i++)
	{
		dl_layer_params *L = &m->p.layers[i];

		ADD(&L->ln1_w, VEC, SAME, E, 0, "gpt_neox.layers.%d.input_layernorm.weight", i);
		ADD(&L->ln1_b, VEC, SAME, E, 0, "gpt_neox.layers.%d.input_layernorm.bias", i);
		ADD(&L->ln2_w, VEC, SAME, E, 0, "gpt_neox.layers.%d.post_attention_layernorm.weight", i);
		ADD(&L->ln2_b, VEC, SAME, E, 0, "gpt_neox.layers.%d.post_attention_layernorm.bias", i);
		ADD(&L->qkv_w, MAT, DL_ROWS_NEOX_QKV, 3 * E, E,
			"gpt_neox.layers.%d.attention.query_key_value.weight", i);
		if (c->attention_bias)
			ADD(&L->qkv_b, VEC, DL_ROWS_NEOX_QKV, 3 * E, 0,
				"gpt_neox.layers.%d.attention.query_key_value.bias", i);
		ADD(&L->proj_w, MAT, SAME, E, E, "gpt_neox.layers.%d.attention.dense.weight", i);
		if (c->attention_bias)
			ADD(&L->proj_b, VEC, SAME, E, 0, "gpt_neox.layers.%d.attention.dense.bias", i);
		ADD(&L->fc_in_w, MAT, SAME, F, E, "gpt_neox.layers.%d.mlp.dense_h_to_4h.weight", i);
		ADD(&L->fc_in_b, VEC, SAME, F, 0, "gpt_neox.layers.%d.mlp.dense_h_to_4h.bias", i);
		ADD(&L->fc_out_w, MAT, SAME, E, F, "gpt_neox.layers.%d.mlp.dense_4h_to_h.weight", i);
		ADD(&L->fc_out_b, VEC, SAME, E, 0, "gpt_neox.layers.%d.mlp.dense_4h_to_h.bias", i);
	}
	ADD(&m->p.lnf_w, VEC, SAME, E, 0, "gpt_neox.final_layer_norm.weight");
	ADD(&m->p.lnf_b, VEC, SAME, E, 0, "gpt_neox.final_layer_norm.bias");
	if (!c->tie_embeddings)
		ADD(&m->p.lm_head, MAT, SAME, V, E, "embed_out.weight");
	return DL_OK;
}

/* Format a shape as "[a, b]". */
static const char *
shape_str(char *buf, size_t len, int ndim, const int64_t *shape)
{
	size_t		at = snprintf(buf, len, "[");

	for (int i = 0; i < ndim && at < len; i++)
		at += snprintf(buf + at, len - at, "%s%lld", i ? ", " : "", (long long) shape[i]);
	if (at < len)
		snprintf(buf + at, len - at, "]");
	return buf;
}

dl_status
weights_check(const st_set *set, const dl_tensor_map *e, const char *dir, const char *type,
			  const st_tensor **out, dl_error *err)
{
	const st_tensor *t = st_find(set, e->name);
	char		got[96],
				want[96];

	if (t == NULL)
	{
		dl_fail(err, DL_EFORMAT, "model \"%s\" has no tensor \"%s\"", dir, e->name);
		return dl_hint(err, "The weight files do not hold a complete %s checkpoint.", type);
	}
	if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16)
		return dl_fail(err, DL_EUNSUPPORTED, "tensor \"%s\" in \"%s\" has dtype %s; only F32, F16 and BF16 are supported",
					   e->name, set->paths[t->file], st_dtype_name(t->dtype));
	if (t->ndim != e->ndim || t->shape[0] != e->shape[0] ||
		(e->ndim == 2 && t->shape[1] != e->shape[1]))
	{
		dl_fail(err, DL_EFORMAT, "tensor \"%s\" in \"%s\" has shape %s, expected %s",
				e->name, set->paths[t->file], shape_str(got, sizeof(got), t->ndim, t->shape),
				shape_str(want, sizeof(want), e->ndim, e->shape));
		return dl_hint(err, "The weights do not match config.json.");
	}
	*out = t;
	return DL_OK;
}

/* Check the hyper-parameters that the shapes and kernels rely on; what names the source. */
static dl_status
check_config(const dl_config *c, const char *what, dl_error *err)
{
	if (c->n_layer < 1 || c->n_head < 1 || c->n_embd < 1 || c->n_inner < 1 ||
		c->head_dim * c->n_head != c->n_embd)
		return dl_fail(err, DL_EFORMAT, "%s: inconsistent sizes (%d layers, %d heads, width %d, head size %d, MLP %d)",
					   what, c->n_layer, c->n_head, c->n_embd, c->head_dim, c->n_inner);
	if (c->rotary_dim < 0 || c->rotary_dim > c->head_dim || c->rotary_dim % 2)
		return dl_fail(err, DL_EFORMAT, "%s: rotary dimension %d is not an even number within the head size %d",
					   what, c->rotary_dim, c->head_dim);
	if (c->max_pos < 1)
		return dl_fail(err, DL_EFORMAT, "%s: maximum position %d is out of range", what, c->max_pos);
	return DL_OK;
}

/*
 * cos | sin of pos * inv_freq[j] for every position, computed as transformers does in
 * float32: inv_freq = 1 / base^(2j/rd), theta = float(pos) * inv_freq, then the
 * correctly rounded cosine and sine of that float32 angle.
 */
static dl_status
build_rope(dl_model *m, dl_error *err)
{
	int			rd = m->cfg.rotary_dim,
				P = m->cfg.max_pos;
	size_t		bytes = (size_t) P * (rd ? rd : 1) * sizeof(float);
	float	   *tab,
			   *inv;
	dl_status	st;

	st = model_alloc(m->be, bytes, (void **) &m->rope, err);
	if (st != DL_OK || rd == 0)
		return st;
	tab = malloc(bytes + rd / 2 * sizeof(float));
	if (tab == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory building the rotary table");
	inv = tab + (size_t) P * rd;
	for (int j = 0; j < rd / 2; j++)
	{
		float		e = (float) (2 * j) / (float) rd;

		inv[j] = 1.0f / (float) pow(m->cfg.rotary_base, e);
	}
	for (int p = 0; p < P; p++)
		for (int j = 0; j < rd / 2; j++)
		{
			float		th = (float) p * inv[j];

			tab[(size_t) p * rd + j] = (float) cos(th);
			tab[(size_t) p * rd + rd / 2 + j] = (float) sin(th);
		}
	st = m->be->upload(m->be, m->rope, tab, bytes, err);
	free(tab);
	return st;
}

/*
 * Build the tensor map of m->cfg, allocate every parameter in one block and point
 * dl_params into it (llm.c's malloc_and_point_parameters).
 */
static dl_status
layout_params(dl_model *m, dl_error *err)
{
	map_builder bld = {.align = m->be->alignment, .wsize = m->be->weight_elem_size};
	map_builder *b = &bld;
	dl_status	st;

	m->p.layers = calloc(m->cfg.n_layer, sizeof(dl_layer_params));
	if (m->p.layers == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory laying out a model of %d layers", m->cfg.n_layer);
	st = m->cfg.arch == DL_ARCH_GPTJ ? map_gptj(b, m, err) : map_neox(b, m, err);
	m->map = bld.map;
	m->nmap = bld.n;
	m->param_bytes = bld.off;
	/* the backend's own hint (the CUDA plugin's) says more than ours */
	if (st == DL_OK && (st = model_alloc(m->be, m->param_bytes, &m->param_mem, err)) != DL_OK &&
		err->hint[0] == '\0')
		dl_hint(err, "The parameters need %zu MB: use a smaller model, or a device with more memory.",
				m->param_bytes >> 20);
	if (st == DL_OK)
	{
		for (int i = 0; i < bld.n; i++)
			if (bld.slots[i])
				*bld.slots[i] = (char *) m->param_mem + bld.map[i].offset;
		if (m->cfg.tie_embeddings)
			m->p.lm_head = m->p.wte;
	}
	free(bld.slots);
	return st;
}

/* The vocabulary is the embedding's rows (Pythia pads its tables): set it in cfg. */
static dl_status
vocab_from_files(dl_config *c, const st_set *set, const char *dir, dl_error *err)
{
	const char *type = config_arch_name(c->arch);
	const char *emb = c->arch == DL_ARCH_GPTJ ? "transformer.wte.weight" : "gpt_neox.embed_in.weight";
	const st_tensor *t = st_find(set, emb);

	if (t == NULL)
	{
		dl_fail(err, DL_EFORMAT, "model \"%s\" has no tensor \"%s\"", dir, emb);
		return dl_hint(err, "The weight files do not hold a %s checkpoint.", type);
	}
	if (t->ndim != 2 || t->shape[1] != c->n_embd || t->shape[0] < 1 || t->shape[0] > INT32_MAX)
	{
		char		got[96];

		return dl_fail(err, DL_EFORMAT, "tensor \"%s\" in \"%s\" has shape %s, expected [vocabulary, %d]",
					   emb, set->paths[t->file], shape_str(got, sizeof(got), t->ndim, t->shape), c->n_embd);
	}
	c->vocab_size = (int) t->shape[0];
	return DL_OK;
}

/*
 * Bytes of a file a load copies before it drops them from its mapping: a tensor larger
 * than this (an embedding) is uploaded a slice of rows at a time, so that the process
 * holds the parameters and at most this much of the file, whatever the model.
 */
#define LOAD_SLICE_BYTES ((size_t) 16 << 20)

/*
 * Upload one tensor of the files to its place in the parameters, then release its pages
 * (st_release). A permuted tensor goes whole, as its rows come from anywhere in it.
 */
static dl_status
load_tensor(dl_backend *be, void *mem, const st_set *set, const dl_tensor_map *e,
			const st_tensor *t, const int32_t *rows, dl_error *err)
{
	/* weights_check made the shape the map's: at least one row of at least one element */
	size_t		row_bytes = t->nbytes / t->shape[0],
				dst_row = (size_t) (e->ndim == 2 ? e->shape[1] : 1) *
		(e->fmt == DL_FMT_WEIGHT ? be->weight_elem_size : sizeof(float));
	int64_t		step = rows ? t->shape[0] : (int64_t) (LOAD_SLICE_BYTES / row_bytes);
	dl_status	st = DL_OK;

	step = step > 0 ? step : 1;

	for (int64_t r = 0; r < t->shape[0] && st == DL_OK; r += step)
	{
		st_tensor	part = st_rows(t, r, t->shape[0] - r < step ? t->shape[0] - r : step);

		st = be->upload_tensor(be, (char *) mem + e->offset + r * dst_row, e->fmt, &part, rows,
							   err);
		st_release(set, &part);
	}
	return st;
}

dl_status
weights_load(dl_backend *be, void *mem, const dl_tensor_map *map, int nmap,
			 const dl_config *c, const st_set *set, const char *dir, const char *type,
			 dl_load_fn watch, void *arg, dl_error *err)
{
	const st_tensor *t;
	dl_status	st = DL_OK;
	int32_t    *rows = NULL;
	int64_t		total = 0,
				done = 0;

	for (int i = 0; i < nmap; i++)
	{
		st = weights_check(set, &map[i], dir, type, &t, err);
		if (st != DL_OK)
			return st;
		total += map[i].shape[0] * (map[i].ndim == 2 ? map[i].shape[1] : 1);
	}
	for (int i = 0; i < nmap && st == DL_OK; i++)
	{
		const dl_tensor_map *e = &map[i];

		if (e->rowmap == DL_ROWS_NEOX_QKV && rows == NULL)
		{
			rows = malloc(3 * sizeof(int32_t) * c->n_embd);
			if (rows == NULL)
				return dl_fail(err, DL_ENOMEM, "out of memory loading \"%s\"", dir);
			for (int r = 0; r < 3 * c->n_embd; r++)
				rows[r] = model_neox_qkv_hf_row(c->n_head, c->head_dim, r);
		}
		st = load_tensor(be, mem, set, e, st_find(set, e->name),
						 e->rowmap == DL_ROWS_NEOX_QKV ? rows : NULL, err);
		done += e->shape[0] * (e->ndim == 2 ? e->shape[1] : 1);
		if (st == DL_OK && watch && watch(arg, done, total))
			st = dl_fail(err, DL_ECANCELLED, "loading \"%s\" was stopped", dir);
	}
	if (st == DL_OK)
		st = be->synchronize(be, err);
	free(rows);
	return st;
}

/* Bytes from the start of param_mem to parameter p. */
static size_t
param_offset(const dl_model *m, const void *p)
{
	return (size_t) ((const char *) p - (const char *) m->param_mem);
}

/* The maps put the embedding first, then each layer from ln_1's weight on, then the head. */
/* Span s of the parameters (model.h's order) into *lo, *hi. */
static void
grad_span(const dl_model *m, int s, size_t *lo, size_t *hi)
{
	int			L = m->cfg.n_layer;
	size_t		head = param_offset(m, m->p.lnf_w);

	if (s == 0)
	{
		*lo = head;
		*hi = m->param_bytes;
	}
	else if (s == L + 1)
	{
		*lo = 0;
		*hi = param_offset(m, m->p.layers[0].ln1_w);
	}
	else
	{
		int			l = L - s;

		*lo = param_offset(m, m->p.layers[l].ln1_w);
		*hi = l + 1 < L ? param_offset(m, m->p.layers[l + 1].ln1_w) : head;
	}
}

/* The spans of the parameters, computed once: see dl_trained. */
static dl_status
build_spans(dl_model *m, dl_error *err)
{
	m->spans = malloc(2 * sizeof(size_t) * DL_GRAD_SPANS(&m->cfg));
	if (m->spans == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating a model");
	for (int s = 0; s < DL_GRAD_SPANS(&m->cfg); s++)
		grad_span(m, s, &m->spans[2 * s], &m->spans[2 * s + 1]);
	return DL_OK;
}

dl_trained
dl_model_trained(const dl_model *m)
{
	return (dl_trained) {m->param_mem, m->param_bytes, m->map, m->nmap, m->spans};
}

/* A model of configuration cfg: map, parameter block (contents undefined), rotary table. */
dl_status
dl_model_create(const dl_config *cfg, dl_backend *be, dl_model **out, dl_error *err)
{
	dl_model   *m;
	dl_status	st;

	*out = NULL;
	if ((st = check_config(cfg, "model configuration", err)) != DL_OK)
		return st;
	if (cfg->vocab_size < 1)
		return dl_fail(err, DL_EINVAL, "vocabulary size %d is out of range", cfg->vocab_size);
	m = calloc(1, sizeof(*m));
	if (m == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating a model");
	m->cfg = *cfg;
	m->be = be;
	st = layout_params(m, err);
	if (st == DL_OK)
		st = build_rope(m, err);
	if (st == DL_OK)
		st = build_spans(m, err);
	if (st != DL_OK)
	{
		dl_model_free(m);
		return st;
	}
	*out = m;
	return DL_OK;
}

dl_status
dl_model_load(const char *dir, dl_backend *be, dl_model **out, dl_error *err)
{
	return dl_model_load_watched(dir, be, NULL, NULL, out, err);
}

dl_status
dl_model_load_watched(const char *dir, dl_backend *be, dl_load_fn watch, void *arg,
					  dl_model **out, dl_error *err)
{
	char		path[4096];
	dl_config	cfg;
	dl_model   *m = NULL;
	st_set	   *set = NULL;
	dl_status	st;

	*out = NULL;
	snprintf(path, sizeof(path), "%s/config.json", dir);
	st = config_load(path, &cfg, err);
	if (st == DL_OK)
		st = check_config(&cfg, path, err);
	if (st == DL_OK)
		st = st_open(dir, &set, err);
	if (st == DL_OK)
		st = vocab_from_files(&cfg, set, dir, err);
	if (st == DL_OK)
		st = dl_model_create(&cfg, be, &m, err);
	if (st == DL_OK)
		st = weights_load(be, m->param_mem, m->map, m->nmap, &m->cfg, set, dir,
						  config_arch_name(cfg.arch), watch, arg, err);
	st_close(set);
	if (st != DL_OK)
	{
		dl_model_free(m);
		return st;
	}
	*out = m;
	return DL_OK;
}

int64_t
dl_model_param_count(const dl_model *m)
{
	int64_t		n = 0;

	for (int i = 0; i < m->nmap; i++)
		n += m->map[i].shape[0] * (m->map[i].ndim == 2 ? m->map[i].shape[1] : 1);
	return n;
}

void
dl_model_free(dl_model *m)
{
	if (m == NULL)
		return;
	m->be->free(m->be, m->param_mem);
	m->be->free(m->be, m->rope);
	free(m->p.layers);
	free(m->map);
	free(m->spans);
	free(m);
}
