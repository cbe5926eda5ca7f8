/*
 * model_save.c: models that do not come from a checkpoint and models that go back to one:
 * random initialisation, growing the vocabulary for Dolly's special tokens, and saving
 * as a Hugging Face directory; and a model directory's weights rewritten as safetensors
 * (model_convert, dolly-cli convert), or with an adapter merged (model_dir_write, for
 * lora_merge.c).
 *
 * The first three walk the model's tensor map (model.h) and move each tensor between the
 * device and the host as float32 through the backend (download, upload_tensor), so they
 * work on any backend whatever its weight format. The converter never loads a model: it
 * writes the checkpoint's tensors from the mapping as they are. Both write the directory
 * aside and rename it into place when complete.
 */
#define _GNU_SOURCE				/* sendfile's and O_DIRECTORY's declarations */

#include "files.h"
#include "lora.h"
#include "prompt.h"
#include "safetensors.h"
#include "sampler.h"
#include "train.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

#include <json.h>

/* Elements of a map entry. */
static size_t
entry_numel(const dl_tensor_map *e)
{
	return (size_t) e->shape[0] * (e->ndim == 2 ? (size_t) e->shape[1] : 1);
}

/* Map entry e of the tensors at mem as float32 on the host (our row order), at dst. */
static dl_status
tensor_read(dl_backend *be, const void *mem, const dl_tensor_map *e, float *dst, dl_error *err)
{
	const char *src = (const char *) mem + e->offset;
	size_t		numel = entry_numel(e);
	size_t		esize = e->fmt == DL_FMT_WEIGHT ? be->weight_elem_size : sizeof(float);
	st_tensor	t = {.name = (char *) e->name, .dtype = ST_BF16, .ndim = 1,
	.shape = {(int64_t) numel}, .numel = (int64_t) numel, .nbytes = numel * 2};
	void	   *tmp;
	dl_status	st;

	if (esize == sizeof(float))
		return be->download(be, dst, src, numel * sizeof(float), err);
	/* the only narrower weight format is bfloat16 (backend.h) */
	if (esize != 2)
		return dl_fail(err, DL_EUNSUPPORTED, "cannot read tensor \"%s\": weights of %zu bytes per element",
					   e->name, esize);
	tmp = malloc(numel * 2);
	if (tmp == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory reading tensor \"%s\"", e->name);
	st = be->download(be, tmp, src, numel * 2, err);
	t.data = tmp;
	if (st == DL_OK)
		st = st_to_f32(&t, dst, err);
	free(tmp);
	return st;
}

/* Set map entry e of m from float32 values on the host (our row order). */
static dl_status
tensor_write(dl_model *m, const dl_tensor_map *e, const float *src, dl_error *err)
{
	st_tensor	t = {.name = (char *) e->name, .dtype = ST_F32, .ndim = e->ndim,
	.shape = {e->shape[0], e->shape[1]}, .numel = (int64_t) entry_numel(e),
	.nbytes = entry_numel(e) * sizeof(float), .data = (const uint8_t *) src};

	return m->be->upload_tensor(m->be, (char *) m->param_mem + e->offset, e->fmt, &t, NULL, err);
}

/* Largest element count over a map's entries. */
static size_t
largest_entry(const dl_tensor_map *map, int nmap)
{
	size_t		n = 0;

	for (int i = 0; i < nmap; i++)
		if (entry_numel(&map[i]) > n)
			n = entry_numel(&map[i]);
	return n;
}

/* Whether s ends with suffix. */
static int
ends_with(const char *s, const char *suffix)
{
	size_t		n = strlen(s),
				k = strlen(suffix);

	return n >= k && strcmp(s + n - k, suffix) == 0;
}

/*
 * normal(0, 0.02) for every matrix and embedding, 1 for layer-norm gains (the only 1-D
 * tensors named ".weight"), 0 for biases: what transformers' _init_weights gives these
 * models with initializer_range 0.02. Normals by Box-Muller over our xoshiro stream,
 * tensor by tensor in map order, so a seed gives the same model on every backend.
 */
dl_status
model_create_random(const dl_config *cfg, dl_backend *be, uint64_t seed, dl_model **out,
					dl_error *err)
{
	dl_model   *m;
	float	   *buf;
	dl_rng		rng;
	dl_status	st;

	*out = NULL;
	if ((st = dl_model_create(cfg, be, &m, err)) != DL_OK)
		return st;
	buf = malloc(largest_entry(m->map, m->nmap) * sizeof(float));
	if (buf == NULL)
	{
		dl_model_free(m);
		return dl_fail(err, DL_ENOMEM, "out of memory initialising a model");
	}
	rng_seed(&rng, seed);
	for (int i = 0; i < m->nmap && st == DL_OK; i++)
	{
		const dl_tensor_map *e = &m->map[i];
		size_t		n = entry_numel(e);

		if (e->ndim == 1)
		{
			float		v = ends_with(e->name, ".weight") ? 1.0f : 0.0f;

			for (size_t j = 0; j < n; j++)
				buf[j] = v;
		}
		else
			for (size_t j = 0; j < n; j += 2)
			{
				/* 1 - u lies in (0, 1]: the logarithm stays finite */
				double		r = sqrt(-2.0 * log(1.0 - rng_uniform(&rng)));
				double		a = 2.0 * M_PI * rng_uniform(&rng);

				buf[j] = (float) (0.02 * r * cos(a));
				if (j + 1 < n)
					buf[j + 1] = (float) (0.02 * r * sin(a));
			}
		st = tensor_write(m, e, buf, err);
	}
	if (st == DL_OK)
		st = be->synchronize(be, err);
	free(buf);
	if (st != DL_OK)
	{
		dl_model_free(m);
		return st;
	}
	*out = m;
	return DL_OK;
}

/* Dolly's special tokens, as train.h lists them. */
static const char *const dolly_keys[] = {DOLLY_END_KEY, DOLLY_INSTRUCTION_KEY, DOLLY_RESPONSE_KEY_NL};

/*
 * The tokens go into the tokenizer in Dolly's order (trainer.py: END_KEY,
 * INSTRUCTION_KEY, RESPONSE_KEY_NL). When the tables lack rows for them, a model with
 * the larger vocabulary is created and every tensor copied over; the rows appended to
 * the embedding, the output matrix and GPT-J's output bias are the mean of the existing
 * rows (in double, in row order), so each new token starts as the average token and
 * the same inputs give the same model. Both models are on the device during the copy.
 */
dl_status
model_add_dolly_tokens(dl_model **mp, dl_tokenizer *tok, dl_error *err)
{
	dl_model   *m = *mp,
			   *g;
	dl_config	cfg = m->cfg;
	float	   *buf;
	double	   *mean = NULL;
	dl_status	st;

	for (int k = 0; k < 3; k++)
	{
		int32_t		id;

		if ((st = tok_add_special(tok, dolly_keys[k], &id, err)) != DL_OK)
			return st;
	}
	if (tok_vocab_size(tok) <= m->cfg.vocab_size)
		return DL_OK;
	cfg.vocab_size = tok_vocab_size(tok);
	if ((st = dl_model_create(&cfg, m->be, &g, err)) != DL_OK)
		return dl_hint(err, "Growing the vocabulary to %d needs a second copy of the model.", cfg.vocab_size);
	buf = malloc(largest_entry(g->map, g->nmap) * sizeof(float));
	mean = calloc(cfg.n_embd, sizeof(double));
	if (buf == NULL || mean == NULL)
		st = dl_fail(err, DL_ENOMEM, "out of memory growing the vocabulary");
	for (int i = 0; i < g->nmap && st == DL_OK; i++)
	{
		const dl_tensor_map *from = &m->map[i],
				   *to = &g->map[i];
		int64_t		rows = from->shape[0],
					cols = from->ndim == 2 ? from->shape[1] : 1;

		if ((st = tensor_read(m->be, m->param_mem, from, buf, err)) != DL_OK)
			break;
		if (to->shape[0] > rows)
		{
			memset(mean, 0, cols * sizeof(double));
			for (int64_t r = 0; r < rows; r++)
				for (int64_t c = 0; c < cols; c++)
					mean[c] += buf[r * cols + c];
			for (int64_t r = rows; r < to->shape[0]; r++)
				for (int64_t c = 0; c < cols; c++)
					buf[r * cols + c] = (float) (mean[c] / rows);
		}
		st = tensor_write(g, to, buf, err);
	}
	if (st == DL_OK)
		st = g->be->synchronize(g->be, err);
	free(buf);
	free(mean);
	if (st != DL_OK)
	{
		dl_model_free(g);
		return st;
	}
	dl_model_free(m);
	*mp = g;
	return DL_OK;
}

/*
 * Every tensor in F32 under its name, in map order, through one host buffer: GPT-J's
 * q/k/v are separate map entries already; GPT-NeoX's fused qkv (and an adapter's B of it)
 * goes back to its per-head interleaved rows; tied models have no output entry
 * (transformers saves only the input embedding and ties it on load).
 */
dl_status
weights_write(dl_backend *be, const void *mem, const dl_tensor_map *map, int nmap,
			  const dl_config *c, const char *path, dl_error *err)
{
	static const char *const meta[] = {"format", "pt"};
	size_t		total = 0;
	st_write_tensor *wt;
	float	   *data,
			   *at,
			   *scratch;
	dl_status	st = DL_OK;

	for (int i = 0; i < nmap; i++)
		total += entry_numel(&map[i]);
	wt = calloc((unsigned) nmap, sizeof(st_write_tensor));
	data = malloc((total + largest_entry(map, nmap)) * sizeof(float));
	if (wt == NULL || data == NULL)
	{
		free(wt);
		free(data);
		return dl_fail(err, DL_ENOMEM, "out of memory saving a model of %zu MB",
					   total * sizeof(float) >> 20);
	}
	at = data;
	scratch = data + total;
	for (int i = 0; i < nmap && st == DL_OK; i++)
	{
		const dl_tensor_map *e = &map[i];
		size_t		cols = e->ndim == 2 ? (size_t) e->shape[1] : 1;

		wt[i] = (st_write_tensor) {e->name, ST_F32, e->ndim, {e->shape[0], e->shape[1]}, at};
		if (e->rowmap == DL_ROWS_SAME)
			st = tensor_read(be, mem, e, at, err);
		else if ((st = tensor_read(be, mem, e, scratch, err)) == DL_OK)
			for (int r = 0; r < e->shape[0]; r++)
				memcpy(at + model_neox_qkv_hf_row(c->n_head, c->head_dim, r) * cols,
					   scratch + r * cols, cols * sizeof(float));
		at += entry_numel(e);
	}
	if (st == DL_OK)
		st = st_write(path, wt, nmap, meta, 1, err);
	free(wt);
	free(data);
	return st;
}

/* Save as a Hugging Face directory, written aside and renamed into place; see train.h. */
dl_status
model_save(const dl_model *m, const dl_tokenizer *tok, const char *base_config,
		   const char *dir, dl_error *err)
{
	dl_dir_aside d;
	char		path[4300];
	dl_status	st = dir_aside_begin(dir, &d, err);

	if (st != DL_OK)
		return st;
	snprintf(path, sizeof(path), "%s/config.json", d.tmp);
	st = config_write(&m->cfg, base_config, path, err);
	if (st == DL_OK)
		st = file_fsync(path, O_RDONLY, err);
	snprintf(path, sizeof(path), "%s/tokenizer.json", d.tmp);
	if (st == DL_OK)
		st = tok_save(tok, path, err);
	snprintf(path, sizeof(path), "%s/model.safetensors", d.tmp);
	if (st == DL_OK)
		st = weights_write(m->be, m->param_mem, m->map, m->nmap, &m->cfg, path, err);
	return dir_aside_end(&d, st, err);
}

/*
 * Buffers that PyTorch checkpoints of these models carry and transformers neither loads
 * nor saves (its _keys_to_ignore_on_load_unexpected for GPT-J and GPT-NeoX): the causal
 * masks, GPT-J's masked-bias constant and GPT-NeoX's rotary frequencies.
 */
static const char *const ignored_buffers[] = {
	".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
	".attention.rotary_emb.inv_freq",
};

/* The files of a model directory besides its weights: configuration and tokenizer. */
static const char *const model_files[] = {
	"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
	"special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
};

/* Whether a checkpoint's tensor is one of ignored_buffers. */
static bool
ignored_buffer(const char *name)
{
	for (size_t i = 0; i < sizeof(ignored_buffers) / sizeof(ignored_buffers[0]); i++)
		if (ends_with(name, ignored_buffers[i]))
			return true;
	return false;
}

/* Copy dir/name into tmp, fsync'd; a missing file is skipped unless required. */
static dl_status
copy_model_file(const char *dir, const char *tmp, const char *name, bool required, dl_error *err)
{
	char		src[4300],
				dst[4300];
	int			in,
				out;
	ssize_t		n;
	dl_status	st = DL_OK;

	snprintf(src, sizeof(src), "%s/%s", dir, name);
	snprintf(dst, sizeof(dst), "%s/%s", tmp, name);
	if ((in = open(src, O_RDONLY | O_CLOEXEC)) < 0)
		return errno == ENOENT && !required ? DL_OK :
			dl_fail(err, DL_EIO, "cannot open \"%s\": %s", src, strerror(errno));
	if ((out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644)) < 0)
	{
		st = dl_fail(err, DL_EIO, "cannot create \"%s\": %s", dst, strerror(errno));
		close(in);
		return st;
	}
	/* in the kernel, from the current offset until the end */
	while ((n = sendfile(out, in, NULL, 1 << 30)) != 0)
		if (n < 0 && errno != EINTR)
		{
			st = dl_fail(err, DL_EIO, "cannot copy \"%s\" to \"%s\": %s", src, dst, strerror(errno));
			break;
		}
	if (st == DL_OK && fsync(out) != 0)
		st = dl_fail(err, DL_EIO, "cannot fsync \"%s\": %s", dst, strerror(errno));
	close(in);
	if (close(out) != 0 && st == DL_OK)
		st = dl_fail(err, DL_EIO, "cannot close \"%s\": %s", dst, strerror(errno));
	return st;
}

/* The file name of a converted shard. */
typedef char shard_name[48];

/*
 * model.safetensors.index.json as save_pretrained writes it: the tensors' total size and,
 * name by name, the shard (shards[file]) that holds each of set's tensors kept.
 */
static dl_status
write_index(const st_set *set, const shard_name *shards, const char *path, dl_error *err)
{
	json_object *root = json_object_new_object(),
			   *meta = json_object_new_object(),
			   *map = json_object_new_object();
	int64_t		total = 0;
	dl_status	st = DL_OK;

	for (int i = 0; i < set->ntensors; i++)
		if (!ignored_buffer(set->tensors[i].name))
		{
			json_object_object_add(map, set->tensors[i].name,
								   json_object_new_string(shards[set->tensors[i].file]));
			total += (int64_t) set->tensors[i].nbytes;
		}
	json_object_object_add(meta, "total_size", json_object_new_int64(total));
	json_object_object_add(root, "metadata", meta);
	json_object_object_add(root, "weight_map", map);
	if (json_object_to_file_ext(path, root, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_NOSLASHESCAPE) != 0)
		st = dl_fail(err, DL_EIO, "cannot write \"%s\": %s", path, json_util_get_last_err());
	json_object_put(root);
	return st == DL_OK ? file_fsync(path, O_RDONLY, err) : st;
}

/*
 * Write the weights of set into tmp as safetensors, the file of shard f holding what
 * set's file f held (less the ignored buffers), with the same names and dtypes, the
 * bytes hook gives.
 */
static dl_status
write_shards(const st_set *set, const char *tmp, st_write_hook hook, void *arg, dl_error *err)
{
	static const char *const meta[] = {"format", "pt"};
	st_write_tensor *w = calloc(set->ntensors ? set->ntensors : 1, sizeof(*w));
	shard_name *shards = calloc(set->nfiles, sizeof(*shards));
	char		path[4300];
	int			nshards = 0,
				k = 0;
	dl_status	st = DL_OK;

	if (w == NULL || shards == NULL)
		st = dl_fail(err, DL_ENOMEM, "out of memory converting a model of %d tensors", set->ntensors);
	/* shards that hold only ignored buffers vanish; the rest keep their order */
	for (int f = 0; st == DL_OK && f < set->nfiles; f++)
		for (int i = 0; i < set->ntensors; i++)
			if (set->tensors[i].file == f && !ignored_buffer(set->tensors[i].name))
			{
				nshards++;
				break;
			}
	if (st == DL_OK && nshards == 0)
		st = dl_fail(err, DL_EFORMAT, "the model holds no tensors but buffers to convert");
	for (int f = 0, s = 0; st == DL_OK && f < set->nfiles; f++)
	{
		int			n = 0;

		for (int i = 0; i < set->ntensors; i++)
		{
			const st_tensor *t = &set->tensors[i];

			if (t->file != f || ignored_buffer(t->name))
				continue;
			w[k + n] = (st_write_tensor) {t->name, t->dtype, t->ndim, {0}, t->data};
			memcpy(w[k + n].shape, t->shape, sizeof(t->shape));
			n++;
		}
		if (n == 0)
			continue;
		if (nshards == 1)
			snprintf(shards[f], sizeof(shards[f]), "model.safetensors");
		else
			snprintf(shards[f], sizeof(shards[f]), "model-%05d-of-%05d.safetensors", ++s, nshards);
		snprintf(path, sizeof(path), "%s/%s", tmp, shards[f]);
		st = st_write_hooked(path, w + k, n, meta, 1, hook, arg, err);
		k += n;
	}
	if (st == DL_OK && nshards > 1)
	{
		snprintf(path, sizeof(path), "%s/model.safetensors.index.json", tmp);
		st = write_index(set, shards, path, err);
	}
	free(shards);
	free(w);
	return st;
}

/* A model directory's files and weights written as a new one; see model.h. */
dl_status
model_dir_write(const char *src, const st_set *set, const char *tok_src, const char *dst,
				st_write_hook hook, void *arg, dl_error *err)
{
	dl_dir_aside d;
	char		path[4300];
	const char *tok_dir = src;
	dl_status	st = dir_aside_begin(dst, &d, err);

	if (st != DL_OK)
		return st;
	snprintf(path, sizeof(path), "%s/tokenizer.json", tok_src ? tok_src : src);
	if (tok_src && access(path, F_OK) == 0)
		tok_dir = tok_src;
	for (size_t i = 0; i < sizeof(model_files) / sizeof(model_files[0]) && st == DL_OK; i++)
		st = copy_model_file(strcmp(model_files[i], "tokenizer.json") == 0 ? tok_dir : src,
							 d.tmp, model_files[i], i == 0, err);
	if (st == DL_OK)
		st = write_shards(set, d.tmp, hook, arg, err);
	return dir_aside_end(&d, st, err);
}

/* A model directory's weights rewritten as safetensors beside its files; see train.h. */
dl_status
model_convert(const char *src, const char *dst, dl_error *err)
{
	st_set	   *set = NULL;
	dl_status	st = st_open(src, &set, err);

	if (st == DL_OK)
		st = model_dir_write(src, set, NULL, dst, NULL, NULL, err);
	st_close(set);
	return st;
}

dl_status
lora_dolly_tokens(const dl_model *m, dl_tokenizer *tok, dl_lora_config *cfg, dl_error *err)
{
	int32_t		first = -1,
				last = -1;

	cfg->tok0 = cfg->ntok = 0;
	for (int i = 0; i < 3; i++)
	{
		int32_t		id = tok_token_id(tok, dolly_keys[i]);
		dl_status	st;

		if (id >= 0)
			continue;
		if ((st = tok_add_special(tok, dolly_keys[i], &id, err)) != DL_OK)
			return st;
		first = first < 0 ? id : first;
		last = id;
	}
	for (int i = 0; i < 3; i++)
	{
		int32_t		id = tok_token_id(tok, dolly_keys[i]);

		if (id >= m->cfg.vocab_size)
		{
			dl_fail(err, DL_EUNSUPPORTED, "Dolly's special token \"%s\" (id %d) has no row in the base's tables of %d rows",
					dolly_keys[i], id, m->cfg.vocab_size);
			return dl_hint(err, "A frozen base cannot grow its tables: fine-tune the whole model once (it adds them), or start from a Dolly model (databricks/dolly-v2-*).");
		}
	}
	/* tok_add_special gives consecutive ids */
	cfg->tok0 = first < 0 ? 0 : first;
	cfg->ntok = first < 0 ? 0 : last - first + 1;
	return DL_OK;
}
