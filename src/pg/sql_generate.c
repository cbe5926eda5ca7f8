/*
 * sql_generate.c: the SQL functions that talk to the model server: dolly_generate,
 * dolly_generate_raw, dolly_tokenize, dolly_detokenize. Arguments are checked here, in the
 * session, so that a mistake gets an ERROR naming the parameter before anything is queued.
 */
#include "dolly_pg.h"
#include "catalog.h"
#include "queue.h"

#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "fmgr.h"
#include "catalog/namespace.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "prompt.h"
#include "sampler.h"

PG_FUNCTION_INFO_V1(dolly_generate);
PG_FUNCTION_INFO_V1(dolly_generate_raw);
PG_FUNCTION_INFO_V1(dolly_tokenize);
PG_FUNCTION_INFO_V1(dolly_detokenize);

/* Dolly's generation defaults (training/generate.py), used where an argument is NULL. */
#define DEFAULT_MAX_NEW_TOKENS 256
#define DEFAULT_TEMPERATURE 1.0
#define DEFAULT_TOP_P 0.92
#define DEFAULT_TOP_K 0

/*
 * Copy the optional model argument at position argno into req, with the identity the
 * server must find, once the model catalog says the current role may use it.
 */
static void
set_model(DollyRequest *req, FunctionCallInfo fcinfo, int argno)
{
	char	   *name;

	if (PG_NARGS() <= argno || PG_ARGISNULL(argno))
		return;
	name = text_to_cstring(PG_GETARG_TEXT_PP(argno));
	dolly_check_model_use(name, &req->ident);
	strlcpy(req->model, name, sizeof(req->model));
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

/*
 * Read the generation arguments that follow the prompt (model, max_new_tokens,
 * temperature, top_p, top_k, do_sample, seed, starting at argument first), check them
 * and run the request. Returns the generated text.
 */
static text *
run_generate(FunctionCallInfo fcinfo, const char *prompt, bool extract_response, int first)
{
	DollyRequest *req = dolly_queue_my_slot();
	dl_sampling sp;
	dl_error	err;
	text	   *result;

#define ARG_OR(n, get, dflt) (PG_ARGISNULL(first + (n)) ? (dflt) : get(first + (n)))
	set_model(req, fcinfo, first);
	req->max_new_tokens = ARG_OR(1, PG_GETARG_INT32, DEFAULT_MAX_NEW_TOKENS);
	req->temperature = ARG_OR(2, PG_GETARG_FLOAT8, DEFAULT_TEMPERATURE);
	req->top_p = ARG_OR(3, PG_GETARG_FLOAT8, DEFAULT_TOP_P);
	req->top_k = ARG_OR(4, PG_GETARG_INT32, DEFAULT_TOP_K);
	req->do_sample = ARG_OR(5, PG_GETARG_BOOL, true);
	/* no seed: a fresh one per call, as an unseeded sampler would draw */
	req->seed = PG_ARGISNULL(first + 6) ? pg_prng_uint64(&pg_global_prng_state)
		: (uint64) PG_GETARG_INT64(first + 6);
#undef ARG_OR

	if (req->max_new_tokens < 1 || req->max_new_tokens > dolly_max_new_tokens)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_new_tokens must be between 1 and %d", dolly_max_new_tokens),
				 errhint("The upper bound is the server setting dolly.max_new_tokens.")));
	sp.do_sample = req->do_sample;
	sp.temperature = (float) req->temperature;
	sp.top_k = req->top_k;
	sp.top_p = (float) req->top_p;
	if (sampling_check(&sp, &err) != DL_OK)
		dolly_report(ERROR, &err);

	req->kind = REQ_GENERATE;
	req->extract_response = extract_response;
	set_input_text(req, "prompt", prompt, strlen(prompt));
	dolly_queue_submit_and_wait(req);
	result = result_text(req);
	dolly_queue_release(req);
	return result;
}

/*
 * dolly_generate(instruction, context, model, max_new_tokens, temperature, top_p, top_k,
 * do_sample, seed): Dolly's answer to an instruction (its prompt template, stopped at
 * "### End", the response extracted). NULL instruction gives NULL.
 */
Datum
dolly_generate(PG_FUNCTION_ARGS)
{
	char	   *instruction;
	char	   *prompt;
	char	   *copy;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	instruction = text_arg(fcinfo, 0, "instruction");
	prompt = prompt_format(instruction, PG_ARGISNULL(1) ? NULL : text_arg(fcinfo, 1, "context"));
	if (prompt == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	copy = pstrdup(prompt);
	free(prompt);
	PG_RETURN_TEXT_P(run_generate(fcinfo, copy, true, 2));
}

/* dolly_generate_raw(prompt, model, ...): the model's continuation of prompt, no template. */
Datum
dolly_generate_raw(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(run_generate(fcinfo, text_arg(fcinfo, 0, "prompt"), false, 1));
}

/* dolly_tokenize(text, model): the model tokenizer's ids for text. */
Datum
dolly_tokenize(PG_FUNCTION_ARGS)
{
	text	   *t;
	DollyRequest *req;
	int			n;
	Datum	   *elems;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	t = PG_GETARG_TEXT_PP(0);
	req = dolly_queue_my_slot();
	set_model(req, fcinfo, 1);
	req->kind = REQ_TOKENIZE;
	set_input_text(req, "text", VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
	dolly_queue_submit_and_wait(req);
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
	req = dolly_queue_my_slot();
	set_model(req, fcinfo, 1);
	req->kind = REQ_DETOKENIZE;
	set_input(req, "token array", (const char *) ids, n * sizeof(int32));
	dolly_queue_submit_and_wait(req);
	result = result_text(req);
	dolly_queue_release(req);
	PG_RETURN_TEXT_P(result);
}
