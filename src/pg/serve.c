/*
 * serve.c: the model server's work: the models it holds and the requests it runs on them.
 *
 * Continuous batching: at every tick the server takes the requests that were queued,
 * admits them into their model's generator (prefill happens in the next pass, in chunks),
 * drops the sequences whose clients gave up, runs ONE forward pass per model with work,
 * and answers the sequences that finished. A long request never keeps a short one from
 * starting. Up to dolly.max_loaded_models models stay loaded; when another is needed the
 * least recently used idle one is unloaded. Every device's server runs this code on its
 * own device, and loads its own copy of the models.
 *
 * A request that cannot start now (its model has no free sequence) keeps its place in the
 * queue and does not hold up the requests behind it. Tokenizer requests need only the
 * model's tokenizer, never its weights. Loading a model takes seconds to minutes: between
 * two of its tensors the loaded models run a pass (serve_between_tensors), so a load stalls
 * no one; how many loads a role may cause is limited (dolly.max_model_loads).
 *
 * Everything here runs in the worker's main thread; the engine's compute threads never
 * call PostgreSQL. Engine failures come back as dl_error and become the request's ERROR,
 * which names the model, never its directory (paths are for superusers and the log).
 */
#include "dolly_pg.h"
#include "queue.h"

#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "portability/instr_time.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "generate.h"
#include "model.h"
#include "prompt.h"
#include "tokenizer.h"

/* How long a server whose device cannot hold a model leaves the requests to the others. */
#define BACKOFF_MS 10000

/*
 * Tokens one forward pass may carry: bounds the activations and the prefill chunks; a
 * decode pass of every sequence at once needs dolly.max_batch of them.
 */
#define MAX_TOKENS_PER_PASS 512

/* Tokenizers kept for models that are not loaded (dolly_tokenize, dolly_detokenize). */
#define CACHED_TOKENIZERS 4

/* Where a request's model is, and what sessions call it. */
typedef struct ModelRef
{
	char		path[MAXPGPATH];
	char		name[DOLLY_MODEL_NAME_MAX];	/* dolly_model_display_name */
	bool		is_default;		/* dolly.model */
	DollyModelIdent ident;		/* of the directory now */
} ModelRef;

typedef struct Sequence
{
	DollyRequest *req;
	int			id;				/* in the model's generator */
	int			prompt_tokens;	/* for the statistics, once req is handed back */
} Sequence;

typedef struct ServedModel
{
	char		path[MAXPGPATH];
	char		name[DOLLY_MODEL_NAME_MAX];	/* for messages */
	DollyModelIdent ident;		/* of the directory when it was loaded */
	bool		is_default;		/* loaded as dolly.model */
	uint64		last_used;
	dl_model   *model;
	dl_kv_cache *cache;
	dl_generator *gen;
	dl_tokenizer *tok;
	int32		end_id;			/* "### End", else the config's eos, else -1 */
	int32		eos_id;
	int			status;			/* index in dolly_shared->models */
	int			nseq;
	Sequence   *seq;			/* [dolly.max_batch at load] */
	int			max_seq;
} ServedModel;

static int	server;				/* which device: the CPU or GPU 0 for 0, GPU `server` else */
static bool retiring;			/* a GPU's server that dolly.device no longer wants */
static TimestampTz backoff_until;	/* takes no requests until then */
static dl_backend *backend;
static int	backend_threads;		/* its CPU threads; -1 for the GPU */
static int	backend_weights;		/* dolly.cpu_weights it was made with (CPU) */
static ServedModel *models;		/* [DOLLY_MAX_MODELS] */
static uint64 use_clock;
static bool loading;			/* a load is under way: start no other */

typedef struct CachedTokenizer
{
	char		path[MAXPGPATH];
	DollyModelIdent ident;
	dl_tokenizer *tok;			/* NULL: a free entry */
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

static bool serve_pass(bool take);

/* Publish a loaded model's row of dolly_server, or clear it (m->model == NULL). */
static void
publish_model(ServedModel *m, double load_seconds)
{
	DollyModelStatus row;

	memset(&row, 0, sizeof(row));
	if (m->model != NULL)
	{
		row.in_use = true;
		strlcpy(row.path, m->path, sizeof(row.path));
		strlcpy(row.arch, m->model->cfg.arch == DL_ARCH_GPTJ ? "gptj" : "gpt_neox", sizeof(row.arch));
		strlcpy(row.device, backend->name, sizeof(row.device));
		row.loaded_at = GetCurrentTimestamp();
		row.load_seconds = load_seconds;
		row.param_bytes = m->model->param_bytes;
		row.params = dl_model_param_count(m->model);
		row.cache_bytes = 2 * m->cache->layer_stride * m->model->cfg.n_layer;
		row.max_batch = m->max_seq;
		row.max_context = m->cache->max_ctx;
	}
	SpinLockAcquire(&dolly_shared->mutex);
	dolly_shared->servers[server].models[m->status] = row;
	SpinLockRelease(&dolly_shared->mutex);
}

/* Unload a model (it must have no sequences). */
static void
unload(ServedModel *m)
{
	elog(LOG, "dolly: unloading model \"%s\"", m->path);
	gen_free(m->gen);
	dl_kv_cache_free(m->cache);
	dl_model_free(m->model);
	tok_free(m->tok);
	pfree(m->seq);
	m->gen = NULL;
	m->cache = NULL;
	m->model = NULL;
	m->tok = NULL;
	publish_model(m, 0);
}

/* Does this server take requests now? */
static bool
taking_now(void)
{
	return !retiring && GetCurrentTimestamp() >= backoff_until;
}

/* Make sure the backend dolly.device, dolly.threads and dolly.cpu_weights ask for exists. */
static dl_status
ensure_backend(dl_error *err)
{
	/* -1: the GPU; only server 0 runs on the CPU */
	int			threads = server > 0 || dolly_want_cuda() ? -1 : dolly_cpu_threads();
	char		plugin[MAXPGPATH];

	if (backend != NULL && backend_threads == threads &&
		(threads < 0 || backend_weights == dolly_cpu_weights))
		return DL_OK;
	/* another backend: the models on the old one go first */
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (models[i].model && models[i].nseq == 0)
			unload(&models[i]);
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (models[i].model)
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

	while (dl_kv_cache_create(m->model, slots, max_ctx, Max(MAX_TOKENS_PER_PASS, slots), &m->cache,
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

/*
 * Between two tensors of a load (dolly_load_model's stop callback): one pass of the loaded
 * models, admitting the queued requests they can take, so that a multi-GB load proceeds in
 * slices between decode steps and stalls no one. The pass is the tick's own (serve_pass);
 * what keeps it re-entrancy-safe: `loading` makes take_requests start no other load (a
 * request that needs one keeps its place), and the model being loaded is invisible until it
 * is complete (its entry has no model yet, the engine hands it over at the end). Nothing
 * here unwinds through the engine: an ERROR in a background worker ends the process.
 */
static bool
serve_between_tensors(void *arg)
{
	(void) serve_pass(taking_now());
	return false;
}

/* Load the model ref names into a free entry (evicting the least recently used idle one). */
static dl_status
load(const ModelRef *ref, ServedModel **out, dl_error *err)
{
	ServedModel *m = NULL;
	int			loaded = 0;
	instr_time	start,
				elapsed;
	int			max_ctx;
	int32		response_id;
	char	   *activity;
	dl_status	st;

	if (ensure_backend(err) != DL_OK)
		return err->code;
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (models[i].model)
			loaded++;
	if (loaded >= dolly_max_loaded_models)
	{
		ServedModel *lru = NULL;

		for (int i = 0; i < DOLLY_MAX_MODELS; i++)
			if (models[i].model && models[i].nseq == 0 &&
				(lru == NULL || models[i].last_used < lru->last_used))
				lru = &models[i];
		if (lru == NULL)
		{
			dl_fail(err, DL_EINVAL, "all %d loaded models are busy, so \"%s\" cannot be loaded",
					loaded, ref->name);
			return dl_hint(err, "Raise dolly.max_loaded_models, or retry when requests finish.");
		}
		unload(lru);
	}
	for (int i = 0; i < DOLLY_MAX_MODELS && m == NULL; i++)
		if (models[i].model == NULL)
			m = &models[i];

	activity = psprintf("loading model %s", ref->path);
	pgstat_report_activity(STATE_RUNNING, activity);
	elog(LOG, "dolly: loading model \"%s\"", ref->path);
	/* the other servers take the requests that come meanwhile */
	dolly_queue_taking(server, false);
	INSTR_TIME_SET_CURRENT(start);
	if (tok_load_dir(ref->path, &m->tok, err) != DL_OK)
		goto fail;
	loading = true;
	st = dolly_load_model(ref->path, backend, activity, serve_between_tensors, NULL, &m->model, err);
	loading = false;
	if (st != DL_OK)
	{
		if (err->code == DL_ENOMEM && backend->host_memory && dolly_cpu_weights == DOLLY_WEIGHTS_FLOAT32)
		{
			char		hint[sizeof(err->hint)];

			strlcpy(hint, err->hint, sizeof(hint));
			dl_hint(err, "%s%sdolly.cpu_weights = 'bfloat16' needs half as much.", hint, hint[0] ? "; " : "");
		}
		goto fail;
	}
	max_ctx = m->model->cfg.max_pos;
	if (dolly_max_context > 0 && dolly_max_context < max_ctx)
		max_ctx = dolly_max_context;
	if (create_cache(m, ref->path, max_ctx, err) != DL_OK ||
		gen_create(m->model, m->cache, &m->gen, err) != DL_OK)
		goto fail;
	INSTR_TIME_SET_CURRENT(elapsed);
	INSTR_TIME_SUBTRACT(elapsed, start);

	strlcpy(m->path, ref->path, sizeof(m->path));
	strlcpy(m->name, ref->name, sizeof(m->name));
	m->ident = ref->ident;
	m->is_default = ref->is_default;
	m->last_used = ++use_clock;
	m->seq = MemoryContextAllocZero(TopMemoryContext, m->max_seq * sizeof(Sequence));
	m->nseq = 0;
	m->eos_id = m->model->cfg.eos_id;
	m->end_id = tok_token_id(m->tok, DOLLY_END_KEY);
	response_id = tok_token_id(m->tok, DOLLY_RESPONSE_KEY_NL);
	if (m->end_id < 0 || response_id < 0)
	{
		elog(LOG, "dolly: model \"%s\" lacks Dolly's special tokens; dolly_generate stops at its end-of-text token", ref->path);
		m->end_id = m->eos_id;
	}
	m->status = m - models;
	publish_model(m, INSTR_TIME_GET_DOUBLE(elapsed));
	elog(LOG, "dolly: model \"%s\" loaded in %.2f s (%s, %d layers, %zu MB of weights, %d x %d KV cache)",
		 ref->path, INSTR_TIME_GET_DOUBLE(elapsed), m->model->cfg.arch == DL_ARCH_GPTJ ? "gptj" : "gpt_neox",
		 m->model->cfg.n_layer, m->model->param_bytes >> 20, m->max_seq, max_ctx);
	dolly_queue_taking(server, taking_now());
	*out = m;
	return DL_OK;

fail:
	elog(LOG, "dolly: cannot load model \"%s\": %s", ref->path, err->msg);
	dolly_hide_path(err, ref->path, ref->name);
	dolly_relative_paths(err);
	gen_free(m->gen);
	dl_kv_cache_free(m->cache);
	dl_model_free(m->model);
	tok_free(m->tok);
	memset(m, 0, sizeof(*m));
	dolly_queue_taking(server, taking_now());
	return err->code;
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

/*
 * The directory model name `name` stands for now. want (unless not ident_given) is the
 * identity the catalog registered for it: a directory that no longer has it (dropped and
 * replaced, swapped in) is refused, whatever the name says.
 */
static dl_status
resolve(const char *name, const DollyModelIdent *want, ModelRef *ref, dl_error *err)
{
	if (dolly_model_path(name, ref->path, &ref->is_default, err) != DL_OK)
		return err->code;
	strlcpy(ref->name, dolly_model_display_name(name), sizeof(ref->name));
	return dolly_model_ident_check(ref->name, ref->path, want, &ref->ident, err);
}

/*
 * The loaded copy of ref's model, or NULL. With a registered identity (want, which resolve
 * found the directory has), a copy of another directory once at that path is not it: that
 * one was replaced, and LRU evicts it.
 */
static ServedModel *
find_loaded(const ModelRef *ref, const DollyModelIdent *want)
{
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (models[i].model && strcmp(models[i].path, ref->path) == 0 &&
			(!ident_given(want) || ident_equal(&models[i].ident, &ref->ident)))
			return &models[i];
	return NULL;
}

/*
 * May req cause one more model load? Loading stalls the device for everyone, so a role may
 * cause dolly.max_model_loads a minute (on each device: every model server counts its own);
 * loads of dolly.model and superusers' requests are free. Counts this one when it may.
 */
static dl_status
charge_load(const DollyRequest *req, const ModelRef *ref, dl_error *err)
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

/* Load dolly.model unless it is loaded, so that the first request does not wait for it. */
static dl_status
load_default(dl_error *err)
{
	ModelRef	ref;
	ServedModel *m;

	if (resolve("", NULL, &ref, err) != DL_OK)
		return err->code;
	if (find_loaded(&ref, NULL) != NULL)
		return DL_OK;
	return load(&ref, &m, err);
}

/*
 * The tokenizer of ref's model: the loaded model's (m, unless NULL), else the tokenizer files
 * alone, kept in a small cache: tokenizing needs no weights.
 */
static dl_status
tokenizer_for(const ModelRef *ref, ServedModel *m, dl_tokenizer **out, dl_error *err)
{
	CachedTokenizer *c = NULL;

	if (m != NULL)
	{
		*out = m->tok;
		return DL_OK;
	}
	for (int i = 0; i < CACHED_TOKENIZERS; i++)
		if (tokenizers[i].tok && strcmp(tokenizers[i].path, ref->path) == 0 &&
			ident_equal(&tokenizers[i].ident, &ref->ident))
			c = &tokenizers[i];
	if (c == NULL)
	{
		/* a free entry, else the least recently used */
		c = &tokenizers[0];
		for (int i = 1; i < CACHED_TOKENIZERS && c->tok; i++)
			if (tokenizers[i].tok == NULL || tokenizers[i].last_used < c->last_used)
				c = &tokenizers[i];
		tok_free(c->tok);
		c->tok = NULL;
		if (tok_load_dir(ref->path, &c->tok, err) != DL_OK)
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
	*out = c->tok;
	return DL_OK;
}

/*
 * Token ids as text (palloc'd). A token that decodes to byte 0 (a model can emit it)
 * becomes U+FFFD, as invalid UTF-8 does: a NUL would cut the text datum short, and the
 * response extraction too.
 */
static dl_status
decode(const dl_tokenizer *tok, const int32 *ids, int n, char **text, dl_error *err)
{
	char	   *raw;
	size_t		len;
	StringInfoData buf;

	if (tok_decode_len(tok, ids, n, 0, &raw, &len, err) != DL_OK)
		return err->code;
	initStringInfo(&buf);
	for (size_t i = 0; i < len; i++)
	{
		size_t		span = strnlen(raw + i, len - i);

		appendBinaryStringInfo(&buf, raw + i, span);
		i += span;
		if (i < len)
			appendBinaryStringInfo(&buf, "\xEF\xBF\xBD", 3);
	}
	free(raw);
	*text = buf.data;
	return DL_OK;
}

/* Write text (UTF-8, from decode) as a request's result, or fail it when it does not fit. */
static void
finish_text(DollyRequest *req, const char *text)
{
	dl_error	err;
	size_t		len = strlen(text);

	if (len > DOLLY_TEXT_MAX)
	{
		dl_fail(&err, DL_EINVAL, "the result of %zu bytes is longer than the %d bytes a request may carry",
				len, DOLLY_TEXT_MAX);
		dolly_queue_finish(req, &err);
		return;
	}
	memcpy(req->out, text, len);
	req->out_len = (int) len;
	dolly_queue_finish(req, NULL);
}

/* Tokenize or detokenize: answered at once. */
static void
run_tokenizer(const dl_tokenizer *tok, DollyRequest *req)
{
	dl_error	err;
	int32_t    *ids = NULL;
	char	   *text;
	int			n;

	if (req->kind == REQ_TOKENIZE)
	{
		if (tok_encode(tok, req->in, req->in_len, &ids, &n, &err) != DL_OK)
			dolly_queue_finish(req, &err);
		else if (n * sizeof(int32) > DOLLY_TEXT_MAX)
		{
			dl_fail(&err, DL_EINVAL, "%d tokens are more than a request may carry", n);
			dolly_queue_finish(req, &err);
		}
		else
		{
			memcpy(req->out, ids, n * sizeof(int32));
			req->out_len = n * sizeof(int32);
			dolly_queue_finish(req, NULL);
		}
		free(ids);
	}
	else if (decode(tok, (const int32 *) req->in, req->in_len / sizeof(int32), &text, &err) != DL_OK)
		dolly_queue_finish(req, &err);
	else
	{
		finish_text(req, text);
		pfree(text);
	}
}

/* Admit a generation request into its model's generator. */
static void
admit(ServedModel *m, DollyRequest *req)
{
	dl_error	err;
	dl_gen_request gr;
	int32_t    *ids = NULL;
	int			n;
	int			id;

	if (m->nseq == m->max_seq)
	{
		/* cannot happen: requests are admitted only while slots are free */
		dl_fail(&err, DL_EINVAL, "model \"%s\" has no free sequence slot", m->name);
		dolly_queue_finish(req, &err);
		return;
	}
	if (tok_encode(m->tok, req->in, req->in_len, &ids, &n, &err) != DL_OK)
	{
		dolly_queue_finish(req, &err);
		return;
	}
	memset(&gr, 0, sizeof(gr));
	gr.prompt = ids;
	gr.n_prompt = n;
	gr.max_new_tokens = req->gen.max_new_tokens;
	gr.end_id = req->gen.extract_response ? m->end_id : m->eos_id;
	gr.sampling.do_sample = req->gen.do_sample;
	gr.sampling.temperature = (float) req->gen.temperature;
	gr.sampling.top_k = req->gen.top_k;
	gr.sampling.top_p = (float) req->gen.top_p;
	gr.seed = req->gen.seed;
	if (gen_add(m->gen, &gr, &id, &err) != DL_OK)
	{
		if (n >= m->cache->max_ctx)
			dl_hint(&err, "The prompt has %d tokens; the server accepts %d (dolly.max_context and the model's max_position_embeddings).",
					n, m->cache->max_ctx);
		dolly_queue_finish(req, &err);
	}
	else
	{
		req->prompt_tokens = n;
		m->seq[m->nseq].req = req;
		m->seq[m->nseq].id = id;
		m->seq[m->nseq].prompt_tokens = n;
		m->nseq++;
	}
	free(ids);
}

/* Answer a finished sequence: decode its tokens (and extract Dolly's response). */
static void
answer(ServedModel *m, Sequence *s)
{
	DollyRequest *req = s->req;
	dl_error	err;
	const int32_t *toks;
	int			n;
	char	   *text;

	toks = gen_tokens(m->gen, s->id, &n);
	req->new_tokens = n;
	/* the end token is not part of the answer */
	if (gen_finished(m->gen, s->id) == DL_FINISH_END)
		n--;
	if (decode(m->tok, toks, n, &text, &err) != DL_OK)
	{
		dolly_queue_finish(req, &err);
		return;
	}
	if (req->gen.extract_response)
	{
		/* Dolly's pipeline reads the response out of prompt + generation */
		char	   *full = psprintf("%.*s%s", req->in_len, req->in, text);
		char	   *response = prompt_extract_response(full);

		if (response == NULL)
			elog(ERROR, "out of memory");
		finish_text(req, response);
		free(response);
		pfree(full);
	}
	else
		finish_text(req, text);
	pfree(text);
}

/*
 * Account in the model's row of dolly_server: the sequences in flight, an answered
 * sequence (unless NULL; its request may belong to its client again), and a pass.
 */
static void
account(ServedModel *m, const Sequence *answered, int ntokens, double seconds)
{
	DollyModelStatus *st = &dolly_shared->servers[server].models[m->status];

	SpinLockAcquire(&dolly_shared->mutex);
	st->active = m->nseq;
	if (answered)
	{
		st->requests++;
		st->prompt_tokens += answered->prompt_tokens;
	}
	if (ntokens > 0 && seconds > 0)
	{
		st->generated_tokens += ntokens;
		/* a moving average over recent passes: what the server does now */
		st->tokens_per_second = st->tokens_per_second == 0 ? ntokens / seconds
			: 0.9 * st->tokens_per_second + 0.1 * (ntokens / seconds);
	}
	SpinLockRelease(&dolly_shared->mutex);
}

/* Remove sequence i of m (swap with the last). */
static void
remove_seq(ServedModel *m, int i)
{
	gen_remove(m->gen, m->seq[i].id);
	m->seq[i] = m->seq[--m->nseq];
}

/* One pass of model m: drop abandoned sequences, step, answer finished ones. */
static void
step_model(ServedModel *m)
{
	dl_error	err;
	instr_time	start,
				elapsed;
	int			before = 0,
				after = 0;

	for (int i = m->nseq - 1; i >= 0; i--)
		if (dolly_queue_abandoned(m->seq[i].req))
		{
			remove_seq(m, i);
			account(m, NULL, 0, 0);
		}
	if (m->nseq == 0)
		return;

	for (int i = 0; i < m->nseq; i++)
	{
		int			n;

		(void) gen_tokens(m->gen, m->seq[i].id, &n);
		before += n;
	}
	INSTR_TIME_SET_CURRENT(start);
	if (gen_step(m->gen, &err) != DL_OK)
	{
		/* a failed pass fails every sequence in it; the model stays loaded */
		while (m->nseq > 0)
		{
			dolly_queue_finish(m->seq[0].req, &err);
			remove_seq(m, 0);
		}
		account(m, NULL, 0, 0);
		/*
		 * A GPU's failure (a kernel fault, a lost device) can leave its context unusable
		 * for good: a new server process, which the postmaster starts within a second,
		 * gets a new one, and serves what is queued.
		 */
		if (err.code == DL_EBACKEND && !backend->host_memory)
			ereport(FATAL,
					(errmsg("dolly model server: %s failed; restarting with a new GPU context", backend->name),
					 errdetail("%s", err.msg)));
		return;
	}
	INSTR_TIME_SET_CURRENT(elapsed);
	INSTR_TIME_SUBTRACT(elapsed, start);

	for (int i = m->nseq - 1; i >= 0; i--)
	{
		int			n;

		(void) gen_tokens(m->gen, m->seq[i].id, &n);
		after += n;
		if (gen_finished(m->gen, m->seq[i].id) != DL_FINISH_NONE)
		{
			Sequence	done = m->seq[i];

			answer(m, &done);
			remove_seq(m, i);
			account(m, &done, 0, 0);
		}
	}
	account(m, NULL, after - before, INSTR_TIME_GET_DOUBLE(elapsed));
}

/*
 * Take queued requests, oldest first. One that cannot start now (its model has no free
 * sequence, or needs loading while another load is under way) is put back, keeping its
 * place, and the requests behind it are taken all the same.
 */
static void
take_requests(void)
{
	DollyRequest *req;
	uint64		skipped = 0;	/* seqno of the last request put back */

	while ((req = dolly_queue_take(server, skipped)) != NULL)
	{
		ModelRef	ref;
		ServedModel *m;
		dl_tokenizer *tok = NULL;
		dl_error	err;

		if (resolve(req->model, &req->ident, &ref, &err) != DL_OK)
		{
			dolly_queue_finish(req, &err);
			continue;
		}
		m = find_loaded(&ref, &req->ident);
		if (req->kind != REQ_GENERATE)
		{
			if (tokenizer_for(&ref, m, &tok, &err) != DL_OK)
				dolly_queue_finish(req, &err);
			else
				run_tokenizer(tok, req);
			continue;
		}
		if (m == NULL && !loading)
		{
			if (charge_load(req, &ref, &err) != DL_OK)
			{
				dolly_queue_finish(req, &err);
				continue;
			}
			if (load(&ref, &m, &err) != DL_OK)
			{
				/* a device without room (or in error) while another serves: it serves them */
				if ((err.code == DL_ENOMEM || err.code == DL_EBACKEND) && dolly_queue_others_taking(server))
				{
					backoff_until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), BACKOFF_MS);
					dolly_queue_taking(server, false);
					dolly_queue_requeue(req);
					elog(LOG, "dolly: %s; for %d s the other model servers take this one's requests",
						 err.msg, BACKOFF_MS / 1000);
					return;
				}
				dolly_queue_finish(req, &err);
				continue;
			}
		}
		if (m == NULL || m->nseq == m->max_seq)
		{
			/* it waits, keeping its place, for the load or for a sequence of its model */
			skipped = req->seqno;	/* read first: once queued, the slot is its client's */
			dolly_queue_requeue(req);
			continue;
		}
		m->last_used = ++use_clock;
		admit(m, req);
	}
}

/* Take requests (when take) and run one pass of every model with work; true if there was work. */
static bool
serve_pass(bool take)
{
	bool		busy = false;

	if (take)
		take_requests();
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (models[i].model && models[i].nseq > 0)
		{
			step_model(&models[i]);
			busy = true;
		}
	return busy;
}

/*
 * After a configuration reload: unload an idle model that is no longer dolly.model, move
 * to the backend dolly.device and dolly.threads now ask for, and load dolly.model. A GPU's
 * server that dolly.device no longer wants takes no more requests, and finishes its own.
 */
void
dolly_serve_reconfigure(void)
{
	char		path[MAXPGPATH];
	bool		is_default;
	dl_error	err;
	bool		have_path = dolly_model[0] != '\0' && dolly_model_path("", path, &is_default, &err) == DL_OK;

	retiring = server > 0 && !dolly_want_cuda();
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (models[i].model && models[i].nseq == 0 &&
			(retiring || (models[i].is_default && (!have_path || strcmp(models[i].path, path) != 0))))
			unload(&models[i]);
	if (retiring)
		return;
	/* dolly.device or dolly.threads changed: idle models leave the old backend now (it logs why not) */
	(void) ensure_backend(&err);
	if (have_path)
		(void) load_default(&err);
}

void
dolly_serve_init(int server_index)
{
	dl_error	err;

	server = server_index;
	models = MemoryContextAllocZero(TopMemoryContext, DOLLY_MAX_MODELS * sizeof(ServedModel));
	if (dolly_model[0] != '\0' && load_default(&err) != DL_OK)
		elog(LOG, "dolly: the model server runs without a model: %s", err.msg);
}

bool
dolly_serve_tick(void)
{
	bool		take = taking_now();

	dolly_queue_taking(server, take);
	return serve_pass(take);
}

bool
dolly_serve_retired(void)
{
	if (!retiring)
		return false;
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (models[i].model && models[i].nseq > 0)
			return false;
	return true;
}
