/*
 * lora_merge.c: an adapter merged into its base as a new model directory, as PEFT's
 * merge_and_unload (dolly-cli merge). The base's files are streamed to the new directory
 * tensor by tensor (model_dir_write), and each target's weight W is replaced on its way
 * by W + scale B A. No model is loaded on a backend: the process holds one target's
 * weight and its A and B in float32 at a time, whatever the size of the model.
 *
 * All of it is in the files' row order: B's rows in a PEFT file are already the
 * checkpoint's (GPT-NeoX's query_key_value interleaved per head, as its W), so the
 * product needs no permutation. An adapter's token rows replace those rows of the
 * embedding and the output layer (a copy of each table at a time, in its dtype), and
 * its tokenizer, which has their tokens, replaces the base's.
 */
#include "lora.h"

#include "bf16.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What the write hook needs: the adapter and its tensors, and the base's. */
typedef struct merge_ctx
{
	const dl_lora *a;
	const st_set *base;
	const st_set *ad;
	int			npairs;			/* the adapter's A, B pairs */
	dl_tensor_map *weights;		/* [npairs]: the base's weight of each */
	const char *tables[2];		/* the base's embedding and output layer (token rows) */
	float	   *w,				/* float32 work, sized for the largest target */
			   *A,
			   *B,
			   *acc,
			   *rows;			/* [ntok, E] an adapter's token rows */
	unsigned char *table;		/* a copy of the larger table, in its dtype */
} merge_ctx;

/*
 * n floats of w as dtype (BF16 or F16) in place: element i's two bytes land within
 * floats already read, so no second buffer is needed.
 */
static void
pack16(float *w, size_t n, st_dtype dtype)
{
	unsigned char *out = (unsigned char *) w;

	for (size_t i = 0; i < n; i++)
	{
		uint16_t	h = dtype == ST_BF16 ? float_to_bf16(w[i]) : float_to_f16(w[i]);

		memcpy(out + 2 * i, &h, sizeof(h));
	}
}

/* Table tbl (0 embedding, 1 output) with the adapter's token rows in place of the base's. */
static dl_status
merge_rows(merge_ctx *x, int tbl, const st_write_tensor *t, const void **data, dl_error *err)
{
	const dl_lora *a = x->a;
	const st_tensor *base = st_find(x->base, t->name);
	int64_t		E = base->shape[1];
	size_t		es = st_dtype_size(t->dtype);
	unsigned char *at = x->table + (size_t) a->tok0 * E * es;
	dl_status	st = st_to_f32(st_find(x->ad, a->map[2 * x->npairs + tbl].name), x->rows, err);

	if (st != DL_OK)
		return st;
	memcpy(x->table, base->data, base->nbytes);
	if (t->dtype != ST_F32)
		pack16(x->rows, (size_t) a->ntok * E, t->dtype);
	memcpy(at, x->rows, (size_t) a->ntok * E * es);
	*data = x->table;
	return DL_OK;
}

/*
 * The st_write_hook of the merge: a target's weight as W + scale (B A), the product
 * summed over the rank in float32 as torch's B @ A and then scaled, as PEFT's
 * get_delta_weight; the sum rounded once to W's dtype; a table of token rows with the
 * adapter's. Any other tensor goes as it is.
 */
static dl_status
merge_tensor(void *arg, const st_write_tensor *t, const void **data, dl_error *err)
{
	merge_ctx  *x = arg;
	const dl_lora *a = x->a;
	int			k = 0;
	int64_t		n_out,
				n_in;
	dl_status	st;

	for (int tbl = 0; a->ntok && tbl < 2; tbl++)
		if (strcmp(x->tables[tbl], t->name) == 0)
			return merge_rows(x, tbl, t, data, err);
	while (k < x->npairs && strcmp(x->weights[k].name, t->name) != 0)
		k++;
	if (k == x->npairs)
		return DL_OK;
	n_out = x->weights[k].shape[0];
	n_in = x->weights[k].shape[1];
	st = st_to_f32(st_find(x->base, t->name), x->w, err);
	if (st == DL_OK)
		st = st_to_f32(st_find(x->ad, a->map[2 * k].name), x->A, err);
	if (st == DL_OK)
		st = st_to_f32(st_find(x->ad, a->map[2 * k + 1].name), x->B, err);
	if (st != DL_OK)
		return st;
	for (int64_t o = 0; o < n_out; o++)
	{
		float	   *row = x->w + o * n_in;

		memset(x->acc, 0, n_in * sizeof(float));
		for (int j = 0; j < a->r; j++)
		{
			const float *Aj = x->A + (int64_t) j * n_in;
			float		b = x->B[o * a->r + j];

			for (int64_t i = 0; i < n_in; i++)
				x->acc[i] += b * Aj[i];
		}
		for (int64_t i = 0; i < n_in; i++)
			row[i] += x->acc[i] * a->scale;
	}
	if (t->dtype != ST_F32)
		pack16(x->w, (size_t) (n_out * n_in), t->dtype);
	*data = x->w;
	return DL_OK;
}

/*
 * Check every target's weight in the base and its A and B in the adapter (presence,
 * dtype, shape) before anything is written, then size the work buffers.
 */
static dl_status
merge_prepare(merge_ctx *x, const dl_config *c, const char *base_dir, const char *adapter_dir,
			  dl_error *err)
{
	const dl_lora *a = x->a;
	size_t		w = 0,
				in = 0,
				out = 0;
	dl_status	st = DL_OK;

	size_t		table = 0;

	x->npairs = a->ntargets * c->n_layer;
	x->weights = calloc(x->npairs, sizeof(dl_tensor_map));
	if (x->weights == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory merging an adapter");
	x->tables[0] = c->arch == DL_ARCH_GPTJ ? "transformer.wte.weight" : "gpt_neox.embed_in.weight";
	x->tables[1] = c->arch == DL_ARCH_GPTJ ? "lm_head.weight" : "embed_out.weight";
	for (int tbl = 0; a->ntok && tbl < 2 && st == DL_OK; tbl++)
	{
		const st_tensor *t = st_find(x->base, x->tables[tbl]),
				   *found;

		if (t == NULL || t->ndim != 2 || t->shape[1] != c->n_embd || t->shape[0] < a->tok0 + a->ntok ||
			st_dtype_size(t->dtype) > sizeof(float))
		{
			dl_fail(err, DL_EFORMAT, "the base \"%s\" has no table \"%s\" of %d columns with rows %d .. %d",
					base_dir, x->tables[tbl], c->n_embd, a->tok0, a->tok0 + a->ntok - 1);
			return dl_hint(err, "An adapter merges only into the base model it was trained from.");
		}
		table = t->nbytes > table ? t->nbytes : table;
		st = weights_check(x->ad, &a->map[2 * x->npairs + tbl], adapter_dir, "LoRA adapter", &found, err);
	}
	for (int k = 0; k < x->npairs && st == DL_OK; k++)
	{
		const dl_lora_target *t = &a->targets[k % a->ntargets];
		dl_tensor_map *e = &x->weights[k];
		const st_tensor *found;
		char		path[96];

		lora_module_path(c, k / a->ntargets, t, path, sizeof(path));
		snprintf(e->name, sizeof(e->name), "%s.weight", path);
		e->ndim = 2;
		e->shape[0] = t->n_out;
		e->shape[1] = t->n_in;
		st = weights_check(x->base, e, base_dir, config_arch_name(c->arch), &found, err);
		for (int ab = 0; ab < 2 && st == DL_OK; ab++)
			st = weights_check(x->ad, &a->map[2 * k + ab], adapter_dir, "LoRA adapter", &found, err);
		w = (size_t) t->n_out * t->n_in > w ? (size_t) t->n_out * t->n_in : w;
		in = (size_t) t->n_in > in ? (size_t) t->n_in : in;
		out = (size_t) t->n_out > out ? (size_t) t->n_out : out;
	}
	if (st != DL_OK)
		return st;
	x->w = malloc(w * sizeof(float));
	x->A = malloc((size_t) a->r * in * sizeof(float));
	x->B = malloc(out * a->r * sizeof(float));
	x->acc = malloc(in * sizeof(float));
	x->rows = malloc((size_t) a->ntok * c->n_embd * sizeof(float) + 1);
	x->table = malloc(table + 1);
	if (x->w == NULL || x->A == NULL || x->B == NULL || x->acc == NULL || x->rows == NULL ||
		x->table == NULL)
	{
		dl_fail(err, DL_ENOMEM, "out of memory merging an adapter");
		return dl_hint(err, "Merging needs one target's weight in float32, %zu MB.",
					   w * sizeof(float) >> 20);
	}
	return DL_OK;
}

/* The merge of lora.h: checked, then written as model_convert writes a model. */
dl_status
lora_merge(const char *base_dir, const char *adapter_dir, const char *out_dir, dl_error *err)
{
	char		path[4200];
	dl_config	c;
	st_set	   *base = NULL,
			   *ad = NULL;
	dl_lora    *a = NULL;
	merge_ctx	x = {0};
	dl_status	st;

	snprintf(path, sizeof(path), "%s/config.json", base_dir);
	st = config_load(path, &c, err);
	if (st != DL_OK && err->hint[0] == '\0')
		dl_hint(err, "The base is a model directory as transformers' save_pretrained writes it.");
	if (st == DL_OK)
		st = st_open(base_dir, &base, err);
	if (st == DL_OK)
		st = lora_read(adapter_dir, &c, 1, &a, err);
	if (st == DL_OK)
		st = lora_open_tensors(adapter_dir, &ad, err);
	if (st == DL_OK)
	{
		x = (merge_ctx) {.a = a, .base = base, .ad = ad};
		st = merge_prepare(&x, &c, base_dir, adapter_dir, err);
	}
	if (st == DL_OK)
		st = model_dir_write(base_dir, base, a->ntok ? adapter_dir : NULL, out_dir, merge_tensor, &x,
							 err);
	free(x.weights);
	free(x.rows);
	free(x.table);
	free(x.w);
	free(x.A);
	free(x.B);
	free(x.acc);
	st_close(ad);
	dl_lora_free(a);
	st_close(base);
	return st;
}
