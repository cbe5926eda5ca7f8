/*
 * model_save.c: models that do not come from a checkpoint and models that go back to one:
 * random initialisation, growing the vocabulary for Dolly's special tokens, and saving
 * as a Hugging Face directory.
 *
 * All three walk the model's tensor map (model.h) and move each tensor between the
 * device and the host as float32 through the backend (download, upload_tensor), so they
 * work on any backend whatever its weight format.
 */
#define _GNU_SOURCE				/* renameat2 */

#include "prompt.h"
#include "safetensors.h"
#include "sampler.h"
#include "train.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Elements of a map entry. */
static size_t
entry_numel(const dl_tensor_map *e)
{
	return (size_t) e->shape[0] * (e->ndim == 2 ? (size_t) e->shape[1] : 1);
}

/* Map entry e of m as float32 on the host (our row order), numel floats at dst. */
static dl_status
tensor_read(const dl_model *m, const dl_tensor_map *e, float *dst, dl_error *err)
{
	const char *src = (const char *) m->param_mem + e->offset;
	size_t		numel = entry_numel(e);
	size_t		esize = e->fmt == DL_FMT_WEIGHT ? m->be->weight_elem_size : sizeof(float);
	st_tensor	t = {.name = (char *) e->name, .dtype = ST_BF16, .ndim = 1,
	.shape = {(int64_t) numel}, .numel = (int64_t) numel, .nbytes = numel * 2};
	void	   *tmp;
	dl_status	st;

	if (esize == sizeof(float))
		return m->be->download(m->be, dst, src, numel * sizeof(float), err);
	/* the only narrower weight format is bfloat16 (backend.h) */
	if (esize != 2)
		return dl_fail(err, DL_EUNSUPPORTED, "cannot read tensor \"%s\": weights of %zu bytes per element",
					   e->name, esize);
	tmp = malloc(numel * 2);
	if (tmp == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory reading tensor \"%s\"", e->name);
	st = m->be->download(m->be, tmp, src, numel * 2, err);
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

/* Largest element count over the map's entries. */
static size_t
largest_entry(const dl_model *m)
{
	size_t		n = 0;

	for (int i = 0; i < m->nmap; i++)
		if (entry_numel(&m->map[i]) > n)
			n = entry_numel(&m->map[i]);
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
	buf = malloc(largest_entry(m) * sizeof(float));
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
	static const char *const keys[] = {DOLLY_END_KEY, DOLLY_INSTRUCTION_KEY, DOLLY_RESPONSE_KEY_NL};
	dl_model   *m = *mp,
			   *g;
	dl_config	cfg = m->cfg;
	float	   *buf;
	double	   *mean = NULL;
	dl_status	st;

	for (int k = 0; k < 3; k++)
	{
		int32_t		id;

		if ((st = tok_add_special(tok, keys[k], &id, err)) != DL_OK)
			return st;
	}
	if (tok_vocab_size(tok) <= m->cfg.vocab_size)
		return DL_OK;
	cfg.vocab_size = tok_vocab_size(tok);
	if ((st = dl_model_create(&cfg, m->be, &g, err)) != DL_OK)
		return dl_hint(err, "Growing the vocabulary to %d needs a second copy of the model.", cfg.vocab_size);
	buf = malloc(largest_entry(g) * sizeof(float));
	mean = calloc(cfg.n_embd, sizeof(double));
	if (buf == NULL || mean == NULL)
		st = dl_fail(err, DL_ENOMEM, "out of memory growing the vocabulary");
	for (int i = 0; i < g->nmap && st == DL_OK; i++)
	{
		const dl_tensor_map *from = &m->map[i],
				   *to = &g->map[i];
		int64_t		rows = from->shape[0],
					cols = from->ndim == 2 ? from->shape[1] : 1;

		if ((st = tensor_read(m, from, buf, err)) != DL_OK)
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

/* fsync a file or directory by path. */
static dl_status
fsync_path(const char *path, int flags, dl_error *err)
{
	int			fd = open(path, flags | O_CLOEXEC);
	dl_status	st = DL_OK;

	if (fd < 0)
		return dl_fail(err, DL_EIO, "cannot open \"%s\": %s", path, strerror(errno));
	if (fsync(fd) != 0)
		st = dl_fail(err, DL_EIO, "cannot fsync \"%s\": %s", path, strerror(errno));
	close(fd);
	return st;
}

/*
 * Every tensor in F32 under its Hugging Face name, in map order, into one host buffer:
 * GPT-J's q/k/v are separate map entries already; GPT-NeoX's fused qkv goes back to
 * its per-head interleaved rows; tied models have no output entry (transformers saves
 * only the input embedding and ties it on load).
 */
static dl_status
write_tensors(const dl_model *m, const char *path, dl_error *err)
{
	const dl_config *c = &m->cfg;
	static const char *const meta[] = {"format", "pt"};
	size_t		total = 0;
	st_write_tensor *wt;
	float	   *data,
			   *at,
			   *scratch;
	dl_status	st = DL_OK;

	for (int i = 0; i < m->nmap; i++)
		total += entry_numel(&m->map[i]);
	wt = calloc((unsigned) m->nmap, sizeof(st_write_tensor));
	data = malloc((total + largest_entry(m)) * sizeof(float));
	if (wt == NULL || data == NULL)
	{
		free(wt);
		free(data);
		return dl_fail(err, DL_ENOMEM, "out of memory saving a model of %zu MB",
					   total * sizeof(float) >> 20);
	}
	at = data;
	scratch = data + total;
	for (int i = 0; i < m->nmap && st == DL_OK; i++)
	{
		const dl_tensor_map *e = &m->map[i];
		size_t		cols = e->ndim == 2 ? (size_t) e->shape[1] : 1;

		wt[i] = (st_write_tensor) {e->name, ST_F32, e->ndim, {e->shape[0], e->shape[1]}, at};
		if (e->rowmap == DL_ROWS_SAME)
			st = tensor_read(m, e, at, err);
		else if ((st = tensor_read(m, e, scratch, err)) == DL_OK)
			for (int r = 0; r < e->shape[0]; r++)
				memcpy(at + model_neox_qkv_hf_row(c->n_head, c->head_dim, r) * cols,
					   scratch + r * cols, cols * sizeof(float));
		at += entry_numel(e);
	}
	if (st == DL_OK)
		st = st_write(path, wt, m->nmap, meta, 1, err);
	free(wt);
	free(data);
	return st;
}

/* Remove what model_save may have written into its temporary directory, and the directory. */
static void
remove_partial(const char *tmp)
{
	static const char *const names[] = {
		"config.json", "tokenizer.json", "tokenizer.json.tmp", "model.safetensors",
		"model.safetensors.tmp"
	};
	char		path[4300];

	for (int i = 0; i < 5; i++)
	{
		snprintf(path, sizeof(path), "%s/%s", tmp, names[i]);
		unlink(path);
	}
	rmdir(tmp);
}

/* Save as a Hugging Face directory, written aside and renamed into place; see train.h. */
dl_status
model_save(const dl_model *m, const dl_tokenizer *tok, const char *base_config,
		   const char *dir, dl_error *err)
{
	char		final[4096],
				tmp[4200],
				path[4300],
				parent[4096];
	size_t		len = strlen(dir);
	struct stat sb;
	dl_status	st;
	const char *slash;

	/* "out/" must not become "out/.tmp-<pid>" inside the directory it names */
	while (len > 1 && dir[len - 1] == '/')
		len--;
	if (len == 0 || len >= sizeof(final))
		return dl_fail(err, DL_EINVAL, "model directory \"%s\" is empty or too long", dir);
	memcpy(final, dir, len);
	final[len] = '\0';
	if (lstat(final, &sb) == 0)
	{
		dl_fail(err, DL_EINVAL, "model directory \"%s\" already exists", final);
		return dl_hint(err, "Choose another name, or remove the old model first.");
	}
	/* beside it, hidden: ".<name>" + DL_SAVE_TMP_MARK + "<pid>" */
	slash = strrchr(final, '/');
	snprintf(tmp, sizeof(tmp), "%.*s.%s%s%ld", slash ? (int) (slash - final + 1) : 0, final,
			 slash ? slash + 1 : final, DL_SAVE_TMP_MARK, (long) getpid());
	if (mkdir(tmp, 0755) != 0)
		return dl_fail(err, DL_EIO, "cannot create \"%s\": %s", tmp, strerror(errno));

	snprintf(path, sizeof(path), "%s/config.json", tmp);
	st = config_write(&m->cfg, base_config, path, err);
	if (st == DL_OK)
		st = fsync_path(path, O_RDONLY, err);
	snprintf(path, sizeof(path), "%s/tokenizer.json", tmp);
	if (st == DL_OK)
		st = tok_save(tok, path, err);
	snprintf(path, sizeof(path), "%s/model.safetensors", tmp);
	if (st == DL_OK)
		st = write_tensors(m, path, err);
	if (st == DL_OK)
		st = fsync_path(tmp, O_RDONLY | O_DIRECTORY, err);
	/* RENAME_NOREPLACE: a directory made meanwhile under the name is not replaced */
	if (st == DL_OK && renameat2(AT_FDCWD, tmp, AT_FDCWD, final, RENAME_NOREPLACE) != 0)
	{
		st = dl_fail(err, DL_EIO, "cannot rename \"%s\" to \"%s\": %s", tmp, final, strerror(errno));
		if (errno == EEXIST)
			dl_hint(err, "Another process created \"%s\" meanwhile.", final);
	}
	if (st != DL_OK)
	{
		remove_partial(tmp);
		return st;
	}
	memcpy(parent, final, len + 1);
	return fsync_path(dirname(parent), O_RDONLY | O_DIRECTORY, err);
}
