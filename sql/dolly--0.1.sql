-- dolly--0.1.sql: the SQL API of dolly 0.1.
\echo Use "CREATE EXTENSION dolly" to load this file. \quit

-- The extension's version.
CREATE FUNCTION dolly_version() RETURNS text
	AS 'MODULE_PATHNAME' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- The compute backends this server can use: CPU threads, CUDA and its GPUs (or why not).
CREATE FUNCTION dolly_backends(
	OUT backend text, OUT available boolean, OUT devices integer, OUT detail text)
	RETURNS SETOF record
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;

-- Dolly's answer to an instruction (optionally with a context), with Dolly's prompt template
-- and generation defaults; the model is dolly.model unless a model under dolly.model_dir is named.
CREATE FUNCTION dolly_generate(
	instruction text,
	context text DEFAULT NULL,
	model text DEFAULT NULL,
	max_new_tokens integer DEFAULT 256,
	temperature double precision DEFAULT 1.0,
	top_p double precision DEFAULT 0.92,
	top_k integer DEFAULT 0,
	do_sample boolean DEFAULT true,
	seed bigint DEFAULT NULL)
	RETURNS text
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL RESTRICTED;

-- The model's continuation of a prompt, without Dolly's template.
CREATE FUNCTION dolly_generate_raw(
	prompt text,
	model text DEFAULT NULL,
	max_new_tokens integer DEFAULT 256,
	temperature double precision DEFAULT 1.0,
	top_p double precision DEFAULT 0.92,
	top_k integer DEFAULT 0,
	do_sample boolean DEFAULT true,
	seed bigint DEFAULT NULL)
	RETURNS text
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL RESTRICTED;

-- The token ids the model's tokenizer gives for a text.
CREATE FUNCTION dolly_tokenize(input text, model text DEFAULT NULL) RETURNS integer[]
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL RESTRICTED;

-- The text of token ids.
CREATE FUNCTION dolly_detokenize(ids integer[], model text DEFAULT NULL) RETURNS text
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL RESTRICTED;

-- The models the model server holds (by directory name), with load time, memory and throughput.
CREATE FUNCTION dolly_server_status(
	OUT server_pid integer, OUT model text, OUT architecture text, OUT device text,
	OUT loaded_at timestamptz, OUT load_seconds double precision,
	OUT parameters bigint, OUT weight_bytes bigint, OUT kv_cache_bytes bigint,
	OUT max_batch integer, OUT max_context integer,
	OUT active_requests integer, OUT requests bigint,
	OUT prompt_tokens bigint, OUT generated_tokens bigint, OUT tokens_per_second double precision)
	RETURNS SETOF record
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;

CREATE VIEW dolly_server AS SELECT * FROM dolly_server_status();
