/*
 * batcher.c: a model server's serving work: the requests it takes and the passes it runs
 * on its models (served_models.c holds them). The worker's loop (model_server.c) calls it
 * once a tick.
 *
 * Continuous batching: at every tick the server takes the requests that were queued,
 * admits them into their model's generator (prefill happens in the next pass, in chunks),
 * drops the sequences whose clients gave up, runs ONE forward pass per model with work,
 * and answers the sequences that finished. A long request never keeps a short one from
 * starting. Every device's server runs this code on its own device.
 *
 * A request that cannot start now (its model has no free sequence) keeps its place in the
 * queue and does not hold up the requests behind it. Tokenizer requests are answered at
 * once. Loading a model takes seconds to minutes: between two of its tensors the loaded
 * models run a pass (between_tensors), so a load stalls no one.
 *
 * Everything here runs in the worker's main thread; the engine's compute threads never
 * call PostgreSQL. Engine failures come back as dl_error and become the request's ERROR.
 *
 * See docs/ARCHITECTURE.md, the life of a request.
 */
#include "postgres.h"

#include "dolly_pg.h"
#include "batcher.h"
#include "devices.h"
#include "queue.h"
#include "served_models.h"
#include "settings.h"
#include "step_trace.h"

#include "lib/stringinfo.h"
#include "utils/timestamp.h"

#include "prompt.h"
#include "sysinfo.h"

/* How long a server whose device cannot hold a model leaves the requests to the others. */
#define BACKOFF_MS 10000

static int	server;				/* which device: the CPU or GPU 0 for 0, GPU `server` else */
static bool retiring;			/* a GPU's server that dolly.device no longer wants */
static TimestampTz backoff_until;	/* takes no requests until then */
static bool loading;			/* a load is under way: start no other */

static bool serve_pass(bool take);

/* Does this server take requests now? */
static bool
taking_now(void)
{
	return !retiring && GetCurrentTimestamp() >= backoff_until;
}

/*
 * Between two tensors of a load (its stop callback): one pass of the loaded models,
 * admitting the queued requests they can take, so that a multi-GB load proceeds in slices
 * between decode steps and stalls no one. The pass is the tick's own (serve_pass); what
 * keeps it re-entrancy-safe: `loading` makes take_requests start no other load (a request
 * that needs one keeps its place), and the model being loaded is invisible until it is
 * complete (its entry has no model yet, the engine hands it over at the end). Nothing here
 * unwinds through the engine: an ERROR in a background worker ends the process.
 */
static bool
between_tensors(void *arg)
{
	(void) serve_pass(taking_now());
	return false;
}

/*
 * Load ref's model, running passes between its tensors; the other servers take the requests
 * that come meanwhile.
 */
static dl_status
load(const ModelRef *ref, ServedModel **out, dl_error *err)
{
	dl_status	st;

	dolly_queue_taking(server, false);
	loading = true;
	st = dolly_served_load(ref, between_tensors, out, err);
	loading = false;
	dolly_queue_taking(server, taking_now());
	return st;
}

/* Load dolly.model unless it is loaded, so that the first request does not wait for it. */
static dl_status
load_default(dl_error *err)
{
	ModelRef	ref;
	ServedModel *m;

	if (dolly_served_resolve("", NULL, &ref, err) != DL_OK)
		return err->code;
	if (dolly_served_find(&ref, NULL) != NULL)
		return DL_OK;
	return load(&ref, &m, err);
}

/* Write text (UTF-8, from the pipeline) as a request's result, or fail it when it does not fit. */
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
run_tokenizer(const dl_pipeline *p, DollyRequest *req)
{
	dl_error	err;
	int32_t    *ids = NULL;
	char	   *text;
	int			n;

	if (req->kind == REQ_TOKENIZE)
	{
		if (tok_encode(p->tok, req->in, req->in_len, &ids, &n, &err) != DL_OK)
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
	else if (pipeline_decode(p, (const int32 *) req->in, req->in_len / sizeof(int32), &text, &err) != DL_OK)
		dolly_queue_finish(req, &err);
	else
	{
		finish_text(req, text);
		free(text);
	}
}

/* The tokenizer and stop tokens of a sequence of m with adapter a (or NULL). */
static const dl_pipeline *
pipeline_of(const ServedModel *m, const ServedAdapter *a)
{
	return a && a->pipe ? a->pipe : m->pipe;
}

/* Admit a generation request into its model's generator, with its adapter (or NULL). */
static void
admit(ServedModel *m, DollyRequest *req, ServedAdapter *adapter)
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
	/* the session formatted the prompt (Dolly's template, prompt_format) */
	if (tok_encode(pipeline_of(m, adapter)->tok, req->in, req->in_len, &ids, &n, &err) != DL_OK)
	{
		dolly_queue_finish(req, &err);
		return;
	}
	memset(&gr, 0, sizeof(gr));
	gr.prompt = ids;
	gr.n_prompt = n;
	gr.max_new_tokens = req->gen.max_new_tokens;
	gr.end_id = pipeline_stop_id(pipeline_of(m, adapter), !req->gen.extract_response);
	gr.sampling.do_sample = req->gen.do_sample;
	gr.sampling.temperature = (float) req->gen.temperature;
	gr.sampling.top_k = req->gen.top_k;
	gr.sampling.top_p = (float) req->gen.top_p;
	gr.seed = req->gen.seed;
	gr.lora = adapter ? adapter->lora : NULL;
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
		m->seq[m->nseq].adapter = adapter;
		if (adapter)
			adapter->nseq++;
		m->nseq++;
	}
	free(ids);
}

/* Answer a finished sequence: its raw continuation, or Dolly's response read out of it. */
static void
answer(ServedModel *m, Sequence *s)
{
	DollyRequest *req = s->req;
	dl_error	err;
	const int32_t *seq;
	int			n_prompt,
				n;
	char	   *text;

	seq = gen_prompt(m->gen, s->id, &n_prompt);
	(void) gen_tokens(m->gen, s->id, &n);
	req->new_tokens = n;
	if (pipeline_answer(pipeline_of(m, s->adapter), seq, n_prompt, n, !req->gen.extract_response,
						&text, &err) != DL_OK)
	{
		dolly_queue_finish(req, &err);
		return;
	}
	finish_text(req, text);
	free(text);
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
	if (m->seq[i].adapter)
		m->seq[i].adapter->nseq--;
	m->seq[i] = m->seq[--m->nseq];
}

/* One pass of model m: drop abandoned sequences, step, answer finished ones (timed in t). */
static void
step_model(ServedModel *m, DollyPassTrace *t)
{
	dl_error	err;
	int			before = 0,
				after = 0;
	double		start,
				stepped;

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
	start = sys_now_s();
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
		if (err.code == DL_EBACKEND && !m->pipe->model->be->host_memory)
			ereport(FATAL,
					(errmsg("dolly model server: %s failed; restarting with a new GPU context", m->pipe->model->be->name),
					 errdetail("%s", err.msg)));
		return;
	}
	t->sequences = m->nseq;
	gen_last_step(m->gen, &t->decode_rows, &t->prefill_tokens);
	stepped = sys_now_s();
	t->step = stepped - start;

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
			t->answered++;
		}
	}
	t->answer = sys_now_s() - stepped;
	account(m, NULL, after - before, t->step);
}

/* Whether adapter directory path carries a tokenizer: it has token rows (lora.h). */
static bool
carries_tokenizer(const char *path)
{
	char		file[MAXPGPATH + 32];

	snprintf(file, sizeof(file), "%s/tokenizer.json", path);
	return access(file, F_OK) == 0;
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
		ModelRef	ref,
					aref;
		ServedModel *m;
		ServedAdapter *adapter;
		const dl_pipeline *tokenizing = NULL;
		dl_error	err;

		if (dolly_served_resolve(req->model, &req->ident, &ref, &err) != DL_OK)
		{
			dolly_queue_finish(req, &err);
			continue;
		}
		m = dolly_served_find(&ref, &req->ident);
		if (req->kind != REQ_GENERATE)
		{
			const ModelRef *tref = &ref;

			if (req->adapter[0])
			{
				if (dolly_served_resolve(req->adapter, &req->adapter_ident, &aref, &err) != DL_OK)
				{
					dolly_queue_finish(req, &err);
					continue;
				}
				/* an adapter with token rows tokenizes with its own tokenizer (lora.h) */
				if (carries_tokenizer(aref.path))
				{
					tref = &aref;
					m = NULL;
				}
			}
			if (dolly_served_tokenizer(tref, m, &tokenizing, &err) != DL_OK)
				dolly_queue_finish(req, &err);
			else
				run_tokenizer(tokenizing, req);
			continue;
		}
		if (m == NULL && !loading)
		{
			if (dolly_served_charge_load(req, &ref, &err) != DL_OK)
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
		adapter = NULL;
		if (m != NULL && m->nseq < m->max_seq && req->adapter[0] &&
			(dolly_served_resolve(req->adapter, &req->adapter_ident, &aref, &err) != DL_OK ||
			 dolly_served_adapter(m, &aref, &req->adapter_ident, &adapter, &err) != DL_OK))
		{
			dolly_queue_finish(req, &err);
			continue;
		}
		if (m == NULL || m->nseq == m->max_seq || (req->adapter[0] && adapter == NULL))
		{
			/* it waits, keeping its place, for the load, a sequence or an adapter of its model */
			skipped = req->seqno;	/* read first: once queued, the slot is its client's */
			dolly_queue_requeue(req);
			continue;
		}
		dolly_served_touch(m);
		admit(m, req, adapter);
	}
}

/*
 * Take requests (when take) and run one pass of every model with work; true if there was
 * work. Each model's pass is a line of dolly.step_trace: the time since the previous pass
 * and the taking go to the first.
 */
static bool
serve_pass(bool take)
{
	static double last_end;		/* of the previous pass that had work */
	double		begin = sys_now_s(),
				taken;
	bool		busy = false;

	if (take)
		take_requests();
	taken = sys_now_s();
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (dolly_served[i].pipe && dolly_served[i].nseq > 0)
		{
			DollyPassTrace t = {.start = begin, .model = dolly_served[i].name};

			if (!busy)
			{
				t.gap = last_end > 0 ? begin - last_end : 0;
				t.take = taken - begin;
			}
			step_model(&dolly_served[i], &t);
			dolly_trace_pass(server, &t);
			busy = true;
		}
	if (busy)
		last_end = sys_now_s();
	return busy;
}

/*
 * After a configuration reload: unload an idle model that is no longer dolly.model, move
 * to the backend dolly.device and dolly.threads now ask for, and load dolly.model. A GPU's
 * server that dolly.device no longer wants takes no more requests, and finishes its own.
 */
void
dolly_batcher_reconfigure(void)
{
	char		path[MAXPGPATH];
	bool		is_default;
	dl_error	err;
	bool		have_path = dolly_model[0] != '\0' && dolly_model_path("", path, &is_default, &err) == DL_OK;

	dolly_trace_configure();
	retiring = server > 0 && !dolly_want_cuda();
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (dolly_served[i].pipe && dolly_served[i].nseq == 0 &&
			(retiring || (dolly_served[i].is_default && (!have_path || strcmp(dolly_served[i].path, path) != 0))))
			dolly_served_unload(&dolly_served[i]);
	if (retiring)
		return;
	/* dolly.device or dolly.threads changed: idle models leave the old backend now (it logs why not) */
	(void) dolly_served_backend(&err);
	if (have_path)
		(void) load_default(&err);
}

void
dolly_batcher_init(int server_index)
{
	dl_error	err;

	server = server_index;
	dolly_trace_configure();
	dolly_served_init(server);
	if (dolly_model[0] != '\0' && load_default(&err) != DL_OK)
		elog(LOG, "dolly: the model server runs without a model: %s", err.msg);
}

bool
dolly_batcher_tick(void)
{
	bool		take = taking_now();

	dolly_queue_taking(server, take);
	return serve_pass(take);
}

bool
dolly_batcher_retired(void)
{
	if (!retiring)
		return false;
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		if (dolly_served[i].pipe && dolly_served[i].nseq > 0)
			return false;
	return true;
}
