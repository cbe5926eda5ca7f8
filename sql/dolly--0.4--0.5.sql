-- dolly--0.4--0.5.sql: LoRA adapters. dolly_finetune(method => 'lora', ...) trains an
-- adapter of the base model (PEFT's format), registered with its base; dolly_generate serves
-- an adapter on its base, adapters and the base in one batch; dolly_register_model records
-- an adapter directory's base; dolly_merge_adapter writes base + adapter as a model.
\echo Use "ALTER EXTENSION dolly UPDATE TO '0.5'" to load this file. \quit

-- Every query here qualifies its operators and functions: an extension script runs with
-- the installing superuser's rights, and the schema it runs in may hold others' objects.

-- Whether the directory is a LoRA adapter (adapter_config.json) that runs on base_model.
ALTER TABLE dolly_model ADD COLUMN adapter boolean NOT NULL DEFAULT false;

DROP VIEW dolly_models;
CREATE VIEW dolly_models WITH (security_barrier) AS
SELECT m.name, pg_catalog.pg_get_userbyid(m.owner) AS owner, m.base_model, m.adapter, m.job,
	   m.created, m.size_bytes,
	   CASE WHEN pg_catalog.pg_has_role(m.owner, 'USAGE')
			THEN ARRAY(SELECT CASE WHEN u OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
								   ELSE pg_catalog.pg_get_userbyid(u)::text END
						 FROM pg_catalog.unnest(m.users) u) END AS granted_to
  FROM dolly_model m
 WHERE pg_catalog.pg_has_role(m.owner, 'USAGE')
	OR EXISTS (SELECT FROM pg_catalog.unnest(m.users) u
				WHERE CASE WHEN u OPERATOR(pg_catalog.=) 0 THEN true
						   ELSE pg_catalog.pg_has_role(u, 'USAGE') END);
GRANT SELECT ON dolly_models TO PUBLIC;

-- method: 'full' (every parameter) or 'lora' (an adapter of rank lora_rank over the frozen
-- base: lora_alpha, lora_dropout, lora_targets as PEFT's LoraConfig; NULL targets: PEFT's
-- default for the architecture, the attention's query and value projections).
DROP FUNCTION dolly_finetune(regclass, text, text, name, name, name, integer, double precision,
							 integer, integer, integer, text, double precision, double precision,
							 bigint, boolean, integer, boolean);
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
	bf16_communication boolean DEFAULT false,
	method text DEFAULT 'full',
	lora_rank integer DEFAULT 8,
	lora_alpha double precision DEFAULT 16,
	lora_dropout double precision DEFAULT 0.05,
	lora_targets text[] DEFAULT NULL)
	RETURNS bigint
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION dolly_finetune FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dolly_finetune TO dolly_trainer;

-- base_model: the model an adapter directory runs on (default: the registered model its
-- adapter_config.json names).
DROP FUNCTION dolly_register_model(text, regrole);
CREATE FUNCTION dolly_register_model(model text, owner regrole DEFAULT NULL, base_model text DEFAULT NULL)
	RETURNS void
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION dolly_register_model FROM PUBLIC;

-- Write an adapter merged into its base (W + scale B A) as a new model, the caller's, in
-- the dtypes of the base: served without the adapter's extra products.
CREATE FUNCTION dolly_merge_adapter(adapter text, output_model text) RETURNS void
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION dolly_merge_adapter FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dolly_merge_adapter TO dolly_trainer;
