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

-- Fine-tuning jobs: one row per dolly_finetune call. Written by dolly only; users read the
-- dolly_jobs view, which adds the live progress of running jobs.
CREATE TABLE dolly_job (
	id bigserial PRIMARY KEY,
	role name NOT NULL,
	source text NOT NULL,
	output_model text NOT NULL,
	options jsonb NOT NULL,
	state text NOT NULL DEFAULT 'queued'
		CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
	epoch integer,
	step integer,
	total_steps integer,
	train_loss double precision,
	eval_loss double precision,
	tokens_per_second double precision,
	records integer,
	skipped integer,
	submitted timestamptz NOT NULL DEFAULT now(),
	started timestamptz,
	finished timestamptz,
	error text
);
REVOKE ALL ON dolly_job FROM PUBLIC;
REVOKE ALL ON SEQUENCE dolly_job_id_seq FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('dolly_job', '');
SELECT pg_catalog.pg_extension_config_dump('dolly_job_id_seq', '');

-- Members of dolly_trainer (and superusers) may fine-tune.
DO $$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'dolly_trainer') THEN
		CREATE ROLE dolly_trainer NOLOGIN;
	END IF;
END
$$;

-- Start fine-tuning a model on the instruction records of a table; returns the job's id at
-- once. The records are read with the caller's privileges and row-level security.
CREATE FUNCTION dolly_finetune(
	source regclass,
	output_model text,
	base_model text DEFAULT NULL,
	instruction_column name DEFAULT 'instruction',
	context_column name DEFAULT 'context',
	response_column name DEFAULT 'response',
	epochs integer DEFAULT 2,
	learning_rate double precision DEFAULT NULL,
	batch_size integer DEFAULT 8,
	max_length integer DEFAULT NULL,
	warmup_steps integer DEFAULT 50,
	lr_schedule text DEFAULT 'constant',
	weight_decay double precision DEFAULT 0,
	eval_fraction double precision DEFAULT 0.05,
	seed bigint DEFAULT 42,
	checkpointing boolean DEFAULT false)
	RETURNS bigint
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION dolly_finetune FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dolly_finetune TO dolly_trainer;

-- Ask a queued or running job to stop; true if it was asked.
CREATE FUNCTION dolly_cancel_job(job_id bigint) RETURNS boolean
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION dolly_cancel_job FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dolly_cancel_job TO dolly_trainer;

-- The live progress of the jobs running now.
CREATE FUNCTION dolly_job_progress(
	OUT id bigint, OUT pid integer, OUT phase text, OUT epoch integer, OUT step integer,
	OUT total_steps integer, OUT train_loss double precision, OUT eval_loss double precision,
	OUT tokens_per_second double precision, OUT records integer, OUT skipped integer)
	RETURNS SETOF record
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;

-- Jobs the current role may see (its own, or all for superusers), with live progress.
-- A job recorded as running whose worker is gone (the server restarted) shows as failed.
CREATE VIEW dolly_jobs AS
SELECT j.id, j.role, j.source, j.output_model,
	   CASE WHEN j.state OPERATOR(pg_catalog.=) 'running' AND p.id IS NULL THEN 'failed' ELSE j.state END AS state,
	   p.phase,
	   coalesce(p.epoch, j.epoch) AS epoch,
	   coalesce(p.step, j.step) AS step,
	   coalesce(p.total_steps, j.total_steps) AS total_steps,
	   coalesce(p.train_loss, j.train_loss) AS train_loss,
	   coalesce(p.eval_loss, j.eval_loss) AS eval_loss,
	   coalesce(p.tokens_per_second, j.tokens_per_second) AS tokens_per_second,
	   coalesce(p.records, j.records) AS records,
	   coalesce(p.skipped, j.skipped) AS skipped,
	   j.submitted, j.started, j.finished,
	   CASE WHEN j.state OPERATOR(pg_catalog.=) 'running' AND p.id IS NULL
			THEN 'the server stopped while the job ran' ELSE j.error END AS error,
	   j.options
  FROM dolly_job j LEFT JOIN dolly_job_progress() p ON p.id OPERATOR(pg_catalog.=) j.id
 WHERE pg_catalog.pg_has_role(current_user, j.role, 'MEMBER');
GRANT SELECT ON dolly_jobs TO PUBLIC;
