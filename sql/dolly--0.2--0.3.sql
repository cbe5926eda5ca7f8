-- dolly--0.2--0.3.sql: data-parallel fine-tuning with ZeRO stages: dolly_finetune takes
-- zero_stage and bf16_communication, and jobs record the stage they ran.
\echo Use "ALTER EXTENSION dolly UPDATE TO '0.3'" to load this file. \quit

-- Every query here qualifies its operators and functions: an extension script runs with
-- the installing superuser's rights, and the schema it runs in may hold others' objects.

-- The ZeRO stage a job's ranks ran (0 with one rank); NULL until it starts training.
ALTER TABLE dolly_job ADD COLUMN zero_stage integer;

DROP VIEW dolly_jobs;
CREATE VIEW dolly_jobs WITH (security_barrier) AS
SELECT j.id, pg_catalog.pg_get_userbyid(j.role) AS role, j.source, j.output_model,
	   CASE WHEN j.state OPERATOR(pg_catalog.=) ANY ('{queued,running}') AND p.id IS NULL
			THEN 'failed' ELSE j.state END AS state,
	   p.phase,
	   COALESCE(p.epoch, j.epoch) AS epoch,
	   COALESCE(p.step, j.step) AS step,
	   COALESCE(p.total_steps, j.total_steps) AS total_steps,
	   COALESCE(p.train_loss, j.train_loss) AS train_loss,
	   COALESCE(p.eval_loss, j.eval_loss) AS eval_loss,
	   COALESCE(p.tokens_per_second, j.tokens_per_second) AS tokens_per_second,
	   COALESCE(p.records, j.records) AS records,
	   COALESCE(p.skipped, j.skipped) AS skipped,
	   j.zero_stage,
	   j.submitted, j.started, j.finished,
	   CASE WHEN j.state OPERATOR(pg_catalog.=) 'running' AND p.id IS NULL
			THEN 'the server stopped while the job ran'
			WHEN j.state OPERATOR(pg_catalog.=) 'queued' AND p.id IS NULL
			THEN 'the job''s worker could not start (see the server log)'
			ELSE j.error END AS error,
	   j.options
  FROM dolly_job j LEFT JOIN dolly_job_progress() p ON p.id OPERATOR(pg_catalog.=) j.id
 WHERE pg_catalog.pg_has_role(j.role, 'USAGE');
GRANT SELECT ON dolly_jobs TO PUBLIC;

-- zero_stage: NULL picks the smallest stage whose state fits each rank's memory;
-- bf16_communication: gradients cross between ranks as bfloat16 (sums stay float32).
DROP FUNCTION dolly_finetune(regclass, text, text, name, name, name, integer, double precision,
							 integer, integer, integer, text, double precision, double precision,
							 bigint, boolean);
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
	checkpointing boolean DEFAULT false,
	zero_stage integer DEFAULT NULL,
	bf16_communication boolean DEFAULT false)
	RETURNS bigint
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION dolly_finetune FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dolly_finetune TO dolly_trainer;
