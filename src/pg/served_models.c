/*
 * served_models.c: the models a model server holds for its batcher (batcher.c), and
 * loading them.
 *
 * Up to dolly.max_loaded_models models stay loaded; when another is needed the least
 * recently used idle one is unloaded. Over each, up to dolly.max_loaded_adapters LoRA
 * adapters, the same way: an adapter is small, loaded as its first request is admitted,
 * and its sequences share the model's batch with everyone else's. Every device's server loads its own copy of the
 * models, on the backend dolly.device, dolly.threads and dolly.cpu_weights ask for. A
 * request names its model, and the name is resolved to a directory at every request: a
 * directory that no longer has the identity the catalog registered is refused. How many
 * loads a role may cause is limited (dolly.max_model_loads). Tokenizer requests need only
 * the model's tokenizer, never its weights: tokenizers of models that are not loaded are
 * kept in a small cache. Each loaded model has a row of the dolly_server view.
 *
 * Engine failures come back as dl_error, which names the model, never its directory
 * (paths are for superusers and the log).
 *
 * See docs/ARCHITECTURE.md, the life of a request.
 */
#include "postgres.h"

#include "dolly_pg.h"
#include "devices.h"
#include "errors.h"
#include "served_models.h"
#include "settings.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "portability/instr_time.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "lora.h"
#include "prompt.h"

/*
 * Tokens one forward pass may carry: bounds the activations and the prefill chunks; a
 * decode pass of every sequence at once needs dolly.max_batch of them.
 */
#define MAX_TOKENS_PER_PASS 512

/* Tokenizers kept for models that are not loaded (dolly_tokenize, dolly_detokenize). */
#define CACHED_TOKENIZERS 4

ServedModel *dolly_served;

static int	server;				/* which device: the CPU or GPU 0 for 0, GPU `server` else */
static dl_backend *backend;
static int	backend_threads;		/* its CPU threads; -1 for the GPU */
static int	backend_weights;		/* dolly.cpu_weights it was made with (CPU) */
static uint64 use_clock;

typedef struct CachedTokenizer
{
	char		path[MAXPGPATH];
	DollyModelIdent ident;
	dl_pipeline *pipe;			/* its tokenizer alone; NULL: a free entry */
	uint64		last_used;
} CachedTokenizer;

static CachedTokenizer tokenizers[CACHED_TOKENIZERS];

/* A model load a role caused, for dolly.max_model_loads. */
typedef struct LoadCharge
{
	Oid			role;
	TimestampTz at;
} LoadCharge;

static LoadCharge *charges;		/* of the last minute, in TopMemoryContext */
static int	ncharges;
static int	maxcharges;

/* Publish a loaded model's row of dolly_server, or clear it (m->pipe == NULL). */
static void
publish_model(ServedModel *m, double load_seconds)
{
	DollyModelStatus row;

	memset(&row, 0, sizeof(row));
	if (m->pipe != NULL)
	{
		const dl_model *model = m->pipe->model;

		row.in_use = true;
		strlcpy(row.path, m->path, sizeof(row.path));
		strlcpy(row.arch, config_arch_name(model->cfg.arch), sizeof(row.arch));
		strlcpy(row.device, backend->name, sizeof(row.device));
		row.loaded_at = GetCurrentTimestamp();
		row.load_seconds = load_seconds;
		row.param_bytes = model->param_bytes;
		row.params = dl_model_param_count(model);
		row.cache_bytes = 2 * m->cache->layer_stride * model->cfg.n_layer;
		row.max_batch = m->max_seq;
		row.max_context = m->cache->max_ctx;
	}
	SpinLockAcquire(&dolly_shared->mutex);
	dolly_shared->servers[server].models[m->status] = row;
	SpinLockRelease(&dolly_shared->mutex);
}

/* Unload an adapter (no sequence runs it). */
static void
unload_adapter(ServedAdapter *a)
{
	elog(LOG, "dolly: unloading adapter \"%s\"", a->path);
	dl_lora_free(a->lora);
	pipeline_close(a->pipe);
	memset(a, 0, sizeof(*a));
}

void
dolly_served_unload(ServedModel *m)
{
	elog(LOG, "dolly: unloading model \"%s\"", m->path);
	for (int i = 0; i < DOLLY_MAX_ADAPTERS; i++)
		if (m->adapters[i].lora)
			unload_adapter(&m->adapters[i]);
	gen_free(m->gen);
	dl_kv_cache_free(m->cache);
	pipeline_close(m->pipe);
	pfree(m->seq);
	m->gen = NULL;
	m->cache = NULL;
	m->pipe = NULL;
	publish_model(m, 0);
}

dl_status
dolly_served_backend(dl_error *err)
{
	/* -1: the GPU; only server 0 runs on the CPU */
	int			threads = server > 0 || dolly_want_cuda() ? -1 : dolly_cpu_threads();
	char		plugin[MAXPGPATH];

	if (backend != NULL && backend_threads == threads &&
		(threads < 0 || backend_weights == dolly_cpu_weights))
		return DL_OK;
	/* another backend: the models on the old one go first */
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (dolly_served[i].pipe && dolly_served[i].nseq == 0)
			dolly_served_unload(&dolly_served[i]);
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (dolly_served[i].pipe)
			return DL_OK;		/* busy: switch once they are done */
	if (backend)
		backend->destroy(backend);
	backend = NULL;
	dolly_cuda_plugin_path(plugin, sizeof(plugin));
	/* dolly.cuda_devices picks the GPUs; server g uses the g-th it sees */
	if ((threads < 0 ? backend_cuda_create(plugin, server, DL_CUDA_BF16, &backend, err)
		 : backend_cpu_create(threads, dolly_cpu_weights == DOLLY_WEIGHTS_BFLOAT16, &backend, err)) != DL_OK)
	{
		elog(LOG, "dolly: %s", err->msg);
		dolly_hide_path(err, plugin, DL_CUDA_PLUGIN_FILE);
		return err->code;
	}
	backend_threads = threads;
	backend_weights = dolly_cpu_weights;
	return DL_OK;
}

/*
 * m's KV cache for dolly.max_batch sequences, or for as many as the device has memory for
 * (halving down to one, with a LOG): a large model on a small machine then serves fewer
 * sequences at once rather than none. Sets m->max_seq.
 */
static dl_status
create_cache(ServedModel *m, const char *path, int max_ctx, dl_error *err)
{
	int			slots = dolly_max_batch;

	while (dl_kv_cache_create(m->pipe->model, slots, max_ctx, Max(MAX_TOKENS_PER_PASS, slots), &m->cache,
							  err) != DL_OK)
	{
		if (err->code != DL_ENOMEM)
			return err->code;
		if (slots == 1)
			return dl_hint(err, "Not even one sequence of %d tokens fits: lower dolly.max_context "
						   "(0 is the model's limit), or free memory.", max_ctx);
		slots /= 2;
	}
	if (slots < dolly_max_batch)
		elog(LOG, "dolly: model \"%s\": the KV cache holds %d sequences of %d tokens, not dolly.max_batch (%d): "
			 "there is no memory for more", path, slots, max_ctx, dolly_max_batch);
	m->max_seq = slots;
	return DL_OK;
}

dl_status
dolly_served_load(const ModelRef *ref, bool (*between_tensors) (void *arg), ServedModel **out,
				  dl_error *err)
{
	ServedModel *m = NULL;
	int			loaded = 0;
	instr_time	start,
				elapsed;
	int			max_ctx;
	char	   *activity;

	if (dolly_served_backend(err) != DL_OK)
		return err->code;
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (dolly_served[i].pipe)
			loaded++;
	if (loaded >= dolly_max_loaded_models)
	{
		ServedModel *lru = NULL;

		for (int i = 0; i < DOLLY_MAX_MODELS; i++)
			if (dolly_served[i].pipe && dolly_served[i].nseq == 0 &&
				(lru == NULL || dolly_served[i].last_used < lru->last_used))
				lru = &dolly_served[i];
		if (lru == NULL)
		{
			dl_fail(err, DL_EINVAL, "all %d loaded models are busy, so \"%s\" cannot be loaded",
					loaded, ref->name);
			return dl_hint(err, "Raise dolly.max_loaded_models, or retry when requests finish.");
		}
		dolly_served_unload(lru);
	}
	for (int i = 0; i < DOLLY_MAX_MODELS && m == NULL; i++)
		if (dolly_served[i].pipe == NULL)
			m = &dolly_served[i];

	activity = psprintf("loading model %s", ref->path);
	pgstat_report_activity(STATE_RUNNING, activity);
	elog(LOG, "dolly: loading model \"%s\"", ref->path);
	INSTR_TIME_SET_CURRENT(start);
	if (dolly_open_model(ref->path, backend, activity, between_tensors, NULL, &m->pipe, err) != DL_OK)
	{
		if (err->code == DL_ENOMEM && backend->host_memory && dolly_cpu_weights == DOLLY_WEIGHTS_FLOAT32)
		{
			char		hint[sizeof(err->hint)];

			strlcpy(hint, err->hint, sizeof(hint));
			dl_hint(err, "%s%sdolly.cpu_weights = 'bfloat16' needs half as much.", hint, hint[0] ? " " : "");
		}
		goto fail;
	}
	max_ctx = m->pipe->model->cfg.max_pos;
	if (dolly_max_context > 0 && dolly_max_context < max_ctx)
		max_ctx = dolly_max_context;
	if (create_cache(m, ref->path, max_ctx, err) != DL_OK ||
		gen_create(m->pipe->model, m->cache, &m->gen, err) != DL_OK)
		goto fail;
	INSTR_TIME_SET_CURRENT(elapsed);
	INSTR_TIME_SUBTRACT(elapsed, start);

	strlcpy(m->path, ref->path, sizeof(m->path));
	strlcpy(m->name, ref->name, sizeof(m->name));
	m->ident = ref->ident;
	m->is_default = ref->is_default;
	dolly_served_touch(m);
	m->seq = MemoryContextAllocZero(TopMemoryContext, m->max_seq * sizeof(Sequence));
	m->nseq = 0;
	if (!m->pipe->dolly_tokens)
		elog(LOG, "dolly: model \"%s\" lacks Dolly's special tokens; dolly_generate stops at its end-of-text token", ref->path);
	m->status = m - dolly_served;
	publish_model(m, INSTR_TIME_GET_DOUBLE(elapsed));
	elog(LOG, "dolly: model \"%s\" loaded in %.2f s (%s, %d layers, %zu MB of weights, %d x %d KV cache)",
		 ref->path, INSTR_TIME_GET_DOUBLE(elapsed), config_arch_name(m->pipe->model->cfg.arch),
		 m->pipe->model->cfg.n_layer, m->pipe->model->param_bytes >> 20, m->max_seq, max_ctx);
	*out = m;
	return DL_OK;

fail:
	elog(LOG, "dolly: cannot load model \"%s\": %s", ref->path, err->msg);
	dolly_hide_path(err, ref->path, ref->name);
	dolly_relative_paths(err);
	gen_free(m->gen);
	dl_kv_cache_free(m->cache);
	pipeline_close(m->pipe);
	memset(m, 0, sizeof(*m));
	return err->code;
}

void
dolly_served_touch(ServedModel *m)
{
	m->last_used = ++use_clock;
}

/* Do a and b identify the same directory? */
static bool
ident_equal(const DollyModelIdent *a, const DollyModelIdent *b)
{
	return a->dev == b->dev && a->ino == b->ino;
}

/* Does a request carry a registered identity ({0,0} and NULL: no check)? */
static bool
ident_given(const DollyModelIdent *id)
{
	return id != NULL && (id->dev != 0 || id->ino != 0);
}

dl_status
dolly_served_adapter(ServedModel *m, const ModelRef *aref, const DollyModelIdent *want,
					 ServedAdapter **out, dl_error *err)
{
	ServedAdapter *free_entry = NULL,
			   *lru = NULL;
	int			loaded = 0;

	*out = NULL;
	for (int i = 0; i < DOLLY_MAX_ADAPTERS; i++)
	{
		ServedAdapter *a = &m->adapters[i];

		if (a->lora == NULL)
		{
			free_entry = free_entry ? free_entry : a;
			continue;
		}
		if (strcmp(a->path, aref->path) == 0 &&
			(!ident_given(want) || ident_equal(&a->ident, &aref->ident)))
		{
			a->last_used = ++use_clock;
			*out = a;
			return DL_OK;
		}
		loaded++;
		if (a->nseq == 0 && (lru == NULL || a->last_used < lru->last_used))
			lru = a;
	}
	if (loaded >= dolly_max_loaded_adapters || free_entry == NULL)
	{
		if (lru == NULL)
			return DL_OK;		/* every adapter busy: wait for one */
		unload_adapter(lru);
		free_entry = lru;
	}
	elog(LOG, "dolly: loading adapter \"%s\" over model \"%s\"", aref->path, m->path);
	if (dl_lora_load(m->pipe->model, aref->path, &free_entry->lora, err) != DL_OK ||
		(free_entry->lora->ntok &&
		 dolly_open_model(aref->path, NULL, NULL, NULL, NULL, &free_entry->pipe, err) != DL_OK))
	{
		dl_lora_free(free_entry->lora);
		free_entry->lora = NULL;
		elog(LOG, "dolly: cannot load adapter \"%s\": %s", aref->path, err->msg);
		dolly_hide_path(err, aref->path, aref->name);
		dolly_relative_paths(err);
		return err->code;
	}
	strlcpy(free_entry->path, aref->path, sizeof(free_entry->path));
	strlcpy(free_entry->name, aref->name, sizeof(free_entry->name));
	free_entry->ident = aref->ident;
	free_entry->nseq = 0;
	free_entry->last_used = ++use_clock;
	*out = free_entry;
	return DL_OK;
}

dl_status
dolly_served_resolve(const char *name, const DollyModelIdent *want, ModelRef *ref, dl_error *err)
{
	if (dolly_model_path(name, ref->path, &ref->is_default, err) != DL_OK)
		return err->code;
	strlcpy(ref->name, dolly_model_display_name(name), sizeof(ref->name));
	return dolly_model_ident_check(ref->name, ref->path, want, &ref->ident, err);
}

ServedModel *
dolly_served_find(const ModelRef *ref, const DollyModelIdent *want)
{
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (dolly_served[i].pipe && strcmp(dolly_served[i].path, ref->path) == 0 &&
			(!ident_given(want) || ident_equal(&dolly_served[i].ident, &ref->ident)))
			return &dolly_served[i];
	return NULL;
}

dl_status
dolly_served_charge_load(const DollyRequest *req, const ModelRef *ref, dl_error *err)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz minute_ago = TimestampTzPlusMilliseconds(now, -60 * 1000);
	int			kept = 0,
				used = 0;

	if (ref->is_default || req->client_superuser || dolly_max_model_loads == 0)
		return DL_OK;
	for (int i = 0; i < ncharges; i++)
		if (charges[i].at > minute_ago)
		{
			used += charges[i].role == req->client_role;
			charges[kept++] = charges[i];
		}
	ncharges = kept;
	if (used >= dolly_max_model_loads)
	{
		dl_fail(err, DL_EINVAL, "model \"%s\" is not loaded, and this role has caused %d model loads in the last minute",
				ref->name, used);
		return dl_hint(err, "dolly.max_model_loads limits the model loads one role may cause per minute: "
					   "retry later, or ask an administrator to raise it.");
	}
	if (ncharges == maxcharges)
	{
		maxcharges = Max(16, 2 * maxcharges);
		charges = charges ? repalloc(charges, maxcharges * sizeof(LoadCharge))
			: MemoryContextAlloc(TopMemoryContext, maxcharges * sizeof(LoadCharge));
	}
	charges[ncharges].role = req->client_role;
	charges[ncharges].at = now;
	ncharges++;
	return DL_OK;
}

dl_status
dolly_served_tokenizer(const ModelRef *ref, ServedModel *m, const dl_pipeline **out, dl_error *err)
{
	CachedTokenizer *c = NULL;

	if (m != NULL)
	{
		*out = m->pipe;
		return DL_OK;
	}
	for (int i = 0; i < CACHED_TOKENIZERS; i++)
		if (tokenizers[i].pipe && strcmp(tokenizers[i].path, ref->path) == 0 &&
			ident_equal(&tokenizers[i].ident, &ref->ident))
			c = &tokenizers[i];
	if (c == NULL)
	{
		/* a free entry, else the least recently used */
		c = &tokenizers[0];
		for (int i = 1; i < CACHED_TOKENIZERS && c->pipe; i++)
			if (tokenizers[i].pipe == NULL || tokenizers[i].last_used < c->last_used)
				c = &tokenizers[i];
		pipeline_close(c->pipe);
		c->pipe = NULL;
		if (dolly_open_model(ref->path, NULL, NULL, NULL, NULL, &c->pipe, err) != DL_OK)
		{
			elog(LOG, "dolly: cannot load the tokenizer of \"%s\": %s", ref->path, err->msg);
			dolly_hide_path(err, ref->path, ref->name);
			dolly_relative_paths(err);
			return err->code;
		}
		strlcpy(c->path, ref->path, sizeof(c->path));
		c->ident = ref->ident;
	}
	c->last_used = ++use_clock;
	*out = c->pipe;
	return DL_OK;
}

void
dolly_served_init(int server_index)
{
	server = server_index;
	dolly_served = MemoryContextAllocZero(TopMemoryContext, DOLLY_MAX_MODELS * sizeof(ServedModel));
}
