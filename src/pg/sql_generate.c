/*
 * sql_generate.c: the SQL functions that talk to the model server: dolly_generate,
 * dolly_generate_raw, dolly_tokenize, dolly_detokenize. Arguments are checked here, in the
 * session, so that a mistake gets an ERROR naming the parameter before anything is queued.
 *
 * See docs/ARCHITECTURE.md, the life of a request.
 */
#include "postgres.h"

#include "catalog.h"
#include "errors.h"
#include "queue.h"
#include "settings.h"
#include "sql_generate.h"

#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "fmgr.h"
#include "access/detoast.h"
#include "catalog/namespace.h"
#include "access/htup_details.h"
#include "catalog/pg_language.h"
#include "catalog/pg_proc.h"
#include "utils/syscache.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "prompt.h"
#include "sampler.h"

PG_FUNCTION_INFO_V1(dolly_generate);
PG_FUNCTION_INFO_V1(dolly_generate_raw);
PG_FUNCTION_INFO_V1(dolly_generate_array);
PG_FUNCTION_INFO_V1(dolly_tokenize);
PG_FUNCTION_INFO_V1(dolly_detokenize);

/* Dolly's generation defaults (training/generate.py), used where an argument is NULL. */
#define DEFAULT_MAX_NEW_TOKENS 256
#define DEFAULT_TEMPERATURE 1.0
#define DEFAULT_TOP_P 0.92
#define DEFAULT_TOP_K 0

/* The model of a request, and the LoRA adapter of it to run. */
typedef struct RequestModel
{
	char		model[DOLLY_MODEL_NAME_MAX];	/* "" = dolly.model */
	DollyModelIdent ident;
	char		adapter[DOLLY_MODEL_NAME_MAX];	/* "": none */
	DollyModelIdent adapter_ident;
} RequestModel;

/*
 * The optional model argument at position argno, with the identities the server must
 * find, once the model catalog says the current role may use it; "" (dolly.model) when
 * the argument is absent or NULL. A LoRA adapter runs on its base: the base is the
 * request's model (tokenizing uses its tokenizer), the adapter what generation adds.
 */
static void
set_model(RequestModel *rm, FunctionCallInfo fcinfo, int argno)
{
	char	   *name;
	char		base[DOLLY_MODEL_NAME_MAX];
	DollyModelIdent ident,
				base_ident;

	memset(rm, 0, sizeof(*rm));
	if (PG_NARGS() <= argno || PG_ARGISNULL(argno))
		return;
	name = text_to_cstring(PG_GETARG_TEXT_PP(argno));
	dolly_check_model_request(name, &ident, base, &base_ident);
	if (base[0] == '\0')
	{
		strlcpy(rm->model, name, DOLLY_MODEL_NAME_MAX);
		rm->ident = ident;
		return;
	}
	strlcpy(rm->model, base, DOLLY_MODEL_NAME_MAX);
	rm->ident = base_ident;
	strlcpy(rm->adapter, name, DOLLY_MODEL_NAME_MAX);
	rm->adapter_ident = ident;
}

/* Put a request's model into its slot. */
static void
request_model(DollyRequest *req, const RequestModel *rm)
{
	strlcpy(req->model, rm->model, sizeof(req->model));
	req->ident = rm->ident;
	strlcpy(req->adapter, rm->adapter, sizeof(req->adapter));
	req->adapter_ident = rm->adapter_ident;
}

/* ERROR unless len bytes fit in a request. */
static void
check_length(const char *what, size_t len)
{
	if (len > DOLLY_TEXT_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("%s of %zu bytes is longer than the %d bytes a request may carry",
						what, len, DOLLY_TEXT_MAX)));
}

/* A text argument, its length checked before anything is copied or converted. */
static char *
text_arg(FunctionCallInfo fcinfo, int argno, const char *what)
{
	text	   *t = PG_GETARG_TEXT_PP(argno);

	check_length(what, VARSIZE_ANY_EXHDR(t));
	return text_to_cstring(t);
}

/* Copy bytes into the request's input buffer, or fail clearly if they do not fit. */
static void
set_input(DollyRequest *req, const char *what, const char *data, size_t len)
{
	check_length(what, len);
	memcpy(req->in, data, len);
	req->in_len = (int) len;
}

/* Copy text, converted to UTF-8 (what tokenizers read), into the request. */
static void
set_input_text(DollyRequest *req, const char *what, const char *text, size_t len)
{
	char	   *utf8;

	check_length(what, len);
	utf8 = pg_server_to_any(text, (int) len, PG_UTF8);
	set_input(req, what, utf8, utf8 == text ? len : strlen(utf8));
}

/*
 * The request's UTF-8 result as a text datum in the database encoding. A character the
 * database encoding cannot hold (a LATIN1 database, say) becomes "?", as a model's answer
 * is text to read, not data to fail on; a SQL_ASCII database takes the UTF-8 as it is.
 */
static text *
result_text(DollyRequest *req)
{
	int			enc = GetDatabaseEncoding();
	Oid			proc;
	StringInfoData buf;
	const unsigned char *src = (const unsigned char *) req->out;
	int			left = req->out_len;

	if (enc == PG_UTF8)
		(void) pg_verify_mbstr(PG_UTF8, req->out, req->out_len, false);
	if (enc == PG_UTF8 || enc == PG_SQL_ASCII)
		return cstring_to_text_with_len(req->out, req->out_len);
	proc = FindDefaultConversionProc(PG_UTF8, enc);
	if (!OidIsValid(proc))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("no conversion from UTF8 to %s", GetDatabaseEncodingName())));
	initStringInfo(&buf);
	while (left > 0)
	{
		/* convert up to the first character the target lacks; the output may be 4x longer */
		char	   *dst;
		int			done;

		enlargeStringInfo(&buf, (size_t) left * MAX_CONVERSION_GROWTH + 1);
		dst = buf.data + buf.len;
		done = pg_do_encoding_conversion_buf(proc, PG_UTF8, enc, (unsigned char *) src, left,
											 (unsigned char *) dst, buf.maxlen - buf.len, true);
		buf.len += strlen(dst);
		src += done;
		left -= done;
		if (left > 0)
		{
			int			skip = Min(pg_utf_mblen(src), left);

			appendStringInfoChar(&buf, '?');
			src += skip;
			left -= skip;
		}
	}
	return cstring_to_text_with_len(buf.data, buf.len);
}

/* A generation call's options, read and checked once for all its requests. */
typedef struct GenOptions
{
	RequestModel model;
	DollyGenParams gen;
	bool		seeded;			/* else every request draws its own seed */
} GenOptions;

/*
 * Read the generation arguments that follow the prompt (model, max_new_tokens,
 * temperature, top_p, top_k, do_sample, seed, starting at argument first) and check them.
 */
static void
read_options(FunctionCallInfo fcinfo, int first, bool extract_response, GenOptions *o)
{
	dl_sampling sp;
	dl_error	err;

	memset(o, 0, sizeof(*o));
	/* dolly_generate_greedy is dolly_generate without the sampling arguments */
#define HAS(n) (PG_NARGS() > first + (n))
#define ARG_OR(n, get, dflt) (!HAS(n) || PG_ARGISNULL(first + (n)) ? (dflt) : get(first + (n)))
	set_model(&o->model, fcinfo, first);
	o->gen.extract_response = extract_response;
	o->gen.max_new_tokens = ARG_OR(1, PG_GETARG_INT32, DEFAULT_MAX_NEW_TOKENS);
	o->gen.temperature = ARG_OR(2, PG_GETARG_FLOAT8, DEFAULT_TEMPERATURE);
	o->gen.top_p = ARG_OR(3, PG_GETARG_FLOAT8, DEFAULT_TOP_P);
	o->gen.top_k = ARG_OR(4, PG_GETARG_INT32, DEFAULT_TOP_K);
	/* sampling by default, greedy where the form has no do_sample */
	o->gen.do_sample = ARG_OR(5, PG_GETARG_BOOL, HAS(5));
	o->seeded = HAS(6) && !PG_ARGISNULL(first + 6);
	o->gen.seed = o->seeded ? (uint64) PG_GETARG_INT64(first + 6) : 0;
#undef ARG_OR
#undef HAS

	if (o->gen.max_new_tokens < 1 || o->gen.max_new_tokens > dolly_max_new_tokens)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_new_tokens must be between 1 and %d", dolly_max_new_tokens),
				 errhint("The upper bound is the server setting dolly.max_new_tokens.")));
	sp.do_sample = o->gen.do_sample;
	sp.temperature = (float) o->gen.temperature;
	sp.top_k = o->gen.top_k;
	sp.top_p = (float) o->gen.top_p;
	if (sampling_check(&sp, &err) != DL_OK)
		dolly_report(ERROR, &err);
}

/* Fill a FREE slot with the request to continue prompt, and queue it. */
static void
submit_generate(DollyRequest *req, const GenOptions *o, const char *prompt)
{
	request_model(req, &o->model);
	req->kind = REQ_GENERATE;
	req->gen = o->gen;
	/* no seed: a fresh one per request, as an unseeded sampler would draw */
	if (!o->seeded)
		req->gen.seed = pg_prng_uint64(&pg_global_prng_state);
	set_input_text(req, "prompt", prompt, strlen(prompt));
	dolly_queue_submit(req);
}

/* The answer of a submitted request, as text; its slot is released. */
static text *
collect(DollyRequest *req)
{
	text	   *result;

	dolly_queue_wait(req);
	result = result_text(req);
	dolly_queue_release(req);
	return result;
}

/* Dolly's prompt for an instruction and its context (NULL: none), its lengths checked first. */
static char *
dolly_prompt(text *instruction, text *context)
{
	char	   *prompt;
	char	   *copy;

	check_length("instruction", VARSIZE_ANY_EXHDR(instruction));
	if (context)
		check_length("context", VARSIZE_ANY_EXHDR(context));
	prompt = prompt_format(text_to_cstring(instruction), context ? text_to_cstring(context) : NULL);
	if (prompt == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	copy = pstrdup(prompt);
	free(prompt);
	return copy;
}

DollyCallKind
dolly_call_kind(Oid funcid)
{
	HeapTuple	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(funcid));
	DollyCallKind kind = DOLLY_CALL_NONE;

	if (!HeapTupleIsValid(tup))
		return DOLLY_CALL_NONE;
	/* a C function of this library named so; other libraries' functions are not loaded */
	if (((Form_pg_proc) GETSTRUCT(tup))->prolang == ClanguageId)
	{
		bool		isnull;
		Datum		bin = SysCacheGetAttr(PROCOID, tup, Anum_pg_proc_probin, &isnull);

		if (!isnull && strcmp(TextDatumGetCString(bin), "$libdir/dolly") == 0)
		{
			char	   *src = TextDatumGetCString(SysCacheGetAttr(PROCOID, tup, Anum_pg_proc_prosrc, &isnull));

			kind = strcmp(src, "dolly_generate") == 0 ? DOLLY_CALL_GENERATE
				: strcmp(src, "dolly_generate_raw") == 0 ? DOLLY_CALL_GENERATE_RAW : DOLLY_CALL_NONE;
		}
	}
	ReleaseSysCache(tup);
	return kind;
}

void
dolly_call_check(DollyCallKind kind, FunctionCallInfo fcinfo)
{
	if (PG_ARGISNULL(0))
		return;
	if (kind == DOLLY_CALL_GENERATE)
	{
		check_length("instruction", toast_raw_datum_size(PG_GETARG_DATUM(0)) - VARHDRSZ);
		if (!PG_ARGISNULL(1))
			check_length("context", toast_raw_datum_size(PG_GETARG_DATUM(1)) - VARHDRSZ);
	}
	else
		check_length("prompt", toast_raw_datum_size(PG_GETARG_DATUM(0)) - VARHDRSZ);
}

bool
dolly_call_submit(DollyCallKind kind, FunctionCallInfo fcinfo, DollyRequest *req)
{
	GenOptions	o;

	if (PG_ARGISNULL(0))
		return false;
	if (kind == DOLLY_CALL_GENERATE)
	{
		read_options(fcinfo, 2, true, &o);
		submit_generate(req, &o, dolly_prompt(PG_GETARG_TEXT_PP(0),
											  PG_ARGISNULL(1) ? NULL : PG_GETARG_TEXT_PP(1)));
	}
	else
	{
		read_options(fcinfo, 1, false, &o);
		submit_generate(req, &o, text_arg(fcinfo, 0, "prompt"));
	}
	return true;
}

text *
dolly_call_answer(DollyRequest *req)
{
	return collect(req);
}

/* One request: the answer to prompt. */
static text *
generate_one(FunctionCallInfo fcinfo, const char *prompt, bool extract_response, int first)
{
	GenOptions	o;
	DollyRequest *req;

	read_options(fcinfo, first, extract_response, &o);
	req = dolly_queue_acquire(true);
	submit_generate(req, &o, prompt);
	return collect(req);
}

/*
 * dolly_generate(instruction, context, model, max_new_tokens, temperature, top_p, top_k,
 * do_sample, seed): Dolly's answer to an instruction (its prompt template, stopped at
 * "### End", the response extracted). NULL instruction gives NULL. Also
 * dolly_generate_greedy(instruction, context, model, max_new_tokens).
 */
Datum
dolly_generate(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(generate_one(fcinfo, dolly_prompt(PG_GETARG_TEXT_PP(0),
													   PG_ARGISNULL(1) ? NULL : PG_GETARG_TEXT_PP(1)),
								  true, 2));
}

/* dolly_generate_raw(prompt, model, ...): the model's continuation of prompt, no template. */
Datum
dolly_generate_raw(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(generate_one(fcinfo, text_arg(fcinfo, 0, "prompt"), false, 1));
}

/* The elements of a one-dimensional text array argument (NULL elements flagged). */
static int
text_elements(FunctionCallInfo fcinfo, int argno, const char *what, Datum **elems, bool **nulls)
{
	ArrayType  *arr = PG_GETARG_ARRAYTYPE_P(argno);
	int			n;

	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("%s must be a one-dimensional array", what)));
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, elems, nulls, &n);
	return n;
}

/*
 * dolly_generate(instructions text[], contexts text[], model, ...): Dolly's answers to many
 * instructions, in their order; NULL elements give NULL. Up to dolly.query_batch requests
 * are in flight at once (this session's own slot and slots borrowed from the pool, fewer
 * when the pool is empty), so the server decodes them together, and a finished one makes
 * room for the next at once; each is the request dolly_generate(instruction, context, ...)
 * makes, so the answers are the same.
 */
Datum
dolly_generate_array(PG_FUNCTION_ARGS)
{
	Datum	   *instr,
			   *ctx = NULL;
	bool	   *instr_null,
			   *ctx_null = NULL;
	int			n;
	GenOptions	o;
	int			window = dolly_query_batch > 0 ? dolly_query_batch : dolly_max_batch;
	DollyFlight flight;			/* tagged with their answers' places */
	int			next = 0;
	Datum	   *answers;
	bool	   *answer_null;
	int			dims[1],
				lbs[1] = {1};

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	n = text_elements(fcinfo, 0, "instructions", &instr, &instr_null);
	if (!PG_ARGISNULL(1) && text_elements(fcinfo, 1, "contexts", &ctx, &ctx_null) != n)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("contexts must have as many elements as instructions (%d)", n)));
	read_options(fcinfo, 2, true, &o);
	if (n == 0)
		PG_RETURN_ARRAYTYPE_P(construct_empty_array(TEXTOID));

	dolly_flight_init(&flight, window);
	answers = palloc0(n * sizeof(Datum));
	answer_null = palloc(n * sizeof(bool));
	while (next < n || flight.count > 0)
	{
		DollyRequest *req;
		void	   *answer;

		/* submit what the window and the free slots allow */
		while (next < n && flight.count < window)
		{
			answer_null[next] = instr_null[next];
			if (instr_null[next])
			{
				next++;
				continue;
			}
			if ((req = dolly_flight_acquire(&flight)) == NULL)
				break;
			submit_generate(req, &o, dolly_prompt(DatumGetTextPP(instr[next]),
												  ctx && !ctx_null[next] ? DatumGetTextPP(ctx[next]) : NULL));
			dolly_flight_add(&flight, req, &answers[next++]);
		}
		if (flight.count == 0)
			continue;
		/* whichever answer comes first; each goes to its element */
		req = dolly_flight_wait(&flight, &answer);
		*(Datum *) answer = PointerGetDatum(collect(req));
	}
	dims[0] = n;
	PG_RETURN_ARRAYTYPE_P(construct_md_array(answers, answer_null, 1, dims, lbs, TEXTOID, -1, false,
											 TYPALIGN_INT));
}

/* dolly_tokenize(text, model): the model tokenizer's ids for text. */
Datum
dolly_tokenize(PG_FUNCTION_ARGS)
{
	text	   *t;
	DollyRequest *req;
	RequestModel rm;
	int			n;
	Datum	   *elems;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	t = PG_GETARG_TEXT_PP(0);
	set_model(&rm, fcinfo, 1);
	req = dolly_queue_acquire(true);
	request_model(req, &rm);
	req->kind = REQ_TOKENIZE;
	set_input_text(req, "text", VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
	dolly_queue_submit(req);
	dolly_queue_wait(req);
	n = req->out_len / sizeof(int32);
	elems = palloc(Max(n, 1) * sizeof(Datum));
	for (int i = 0; i < n; i++)
		elems[i] = Int32GetDatum(((int32 *) req->out)[i]);
	dolly_queue_release(req);
	PG_RETURN_ARRAYTYPE_P(construct_array(elems, n, INT4OID, sizeof(int32), true, TYPALIGN_INT));
}

/* dolly_detokenize(ids, model): the text of token ids (special tokens included). */
Datum
dolly_detokenize(PG_FUNCTION_ARGS)
{
	ArrayType  *arr;
	DollyRequest *req;
	RequestModel rm;
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	int32	   *ids;
	text	   *result;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	arr = PG_GETARG_ARRAYTYPE_P(0);
	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("token ids must be a one-dimensional array")));
	deconstruct_array(arr, INT4OID, sizeof(int32), true, TYPALIGN_INT, &elems, &nulls, &n);
	ids = palloc(Max(n, 1) * sizeof(int32));
	for (int i = 0; i < n; i++)
	{
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("token ids must not be NULL")));
		ids[i] = DatumGetInt32(elems[i]);
	}
	set_model(&rm, fcinfo, 1);
	req = dolly_queue_acquire(true);
	request_model(req, &rm);
	req->kind = REQ_DETOKENIZE;
	set_input(req, "token array", (const char *) ids, n * sizeof(int32));
	dolly_queue_submit(req);
	dolly_queue_wait(req);
	result = result_text(req);
	dolly_queue_release(req);
	PG_RETURN_TEXT_P(result);
}
