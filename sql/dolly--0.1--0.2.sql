-- dolly--0.1--0.2.sql: models with owners and grants; jobs that record their role by OID
-- and show only to it; dolly_generate over an array of instructions.
\echo Use "ALTER EXTENSION dolly UPDATE TO '0.2'" to load this file. \quit

-- Every query here qualifies its operators and functions: an extension script runs with
-- the installing superuser's rights, and the schema it runs in may hold others' objects.

-- Jobs record their role by OID: dropping a role no longer breaks dolly_jobs.
DROP VIEW dolly_jobs;
ALTER TABLE dolly_job ADD COLUMN role_id oid;
UPDATE dolly_job j SET role_id = COALESCE(
	(SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) j.role), 0::oid);
ALTER TABLE dolly_job DROP COLUMN role;
ALTER TABLE dolly_job RENAME COLUMN role_id TO role;
ALTER TABLE dolly_job ALTER COLUMN role SET NOT NULL;

-- dolly_server shows a role the loaded models it may use, so every role may read it.
GRANT SELECT ON dolly_server TO PUBLIC;

-- The live progress of the current role's jobs (superusers: all).
COMMENT ON FUNCTION dolly_job_progress() IS 'the live progress of the current role''s running fine-tuning jobs';

-- Jobs the current role may see (its own, or all for superusers), with live progress. A
-- security barrier: a cheap function of the caller's in WHERE sees no other role's rows.
-- A job recorded as queued or running without a live worker (the server restarted, or the
-- worker could not start) shows as failed.
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

-- The model catalog: one row a model this database knows, with its owner and the roles it
-- is granted to (0 for PUBLIC). Written by dolly only; users read dolly_models.
CREATE TABLE dolly_model (
	name text PRIMARY KEY,
	owner oid NOT NULL,
	base_model text,
	job bigint,
	created timestamptz NOT NULL DEFAULT pg_catalog.now(),
	size_bytes bigint NOT NULL,
	users oid[] NOT NULL DEFAULT '{}',
	-- the directory's device and inode when it was registered: the server loads the model
	-- only while its directory has them
	dir_dev bigint NOT NULL,
	dir_ino bigint NOT NULL
);
REVOKE ALL ON dolly_model FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('dolly_model', '');

-- Register a model directory under dolly.model_dir (superusers), or register it again after
-- its directory was replaced.
CREATE FUNCTION dolly_register_model(model text, owner regrole DEFAULT NULL) RETURNS void
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION dolly_register_model FROM PUBLIC;

-- Let a role (or PUBLIC) use a model, or take that back: its owner or a superuser.
CREATE FUNCTION dolly_grant_model(model text, grantee text) RETURNS void
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL UNSAFE;
CREATE FUNCTION dolly_revoke_model(model text, grantee text) RETURNS void
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- Remove a model from the catalog (its owner or a superuser); a fine-tuned model's
-- directory is removed when the transaction commits.
CREATE FUNCTION dolly_drop_model(model text) RETURNS void
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- The models the current role may use. Grantees are shown to the model's owner only.
CREATE VIEW dolly_models WITH (security_barrier) AS
SELECT m.name, pg_catalog.pg_get_userbyid(m.owner) AS owner, m.base_model, m.job, m.created,
	   m.size_bytes,
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

-- The models that jobs of 0.1 wrote become their roles', where their directories remain.
DO $$
DECLARE
	j record;
BEGIN
	FOR j IN SELECT id, role, output_model, options OPERATOR(pg_catalog.->>) 'base_model' AS base
			   FROM @extschema@.dolly_job WHERE state OPERATOR(pg_catalog.=) 'succeeded' AND role OPERATOR(pg_catalog.<>) 0
	LOOP
		BEGIN
			PERFORM @extschema@.dolly_register_model(j.output_model, j.role::regrole);
			UPDATE @extschema@.dolly_model SET job = j.id, base_model = j.base
			 WHERE name OPERATOR(pg_catalog.=) j.output_model;
		EXCEPTION WHEN OTHERS THEN
			RAISE WARNING 'dolly: the model of job % is not registered: %', j.id, SQLERRM;
		END;
	END LOOP;
END
$$;

-- Dolly's answers to many instructions at once, in their order (NULL elements give NULL):
-- up to dolly.query_batch of them are decoded together.
CREATE FUNCTION dolly_generate(
	instructions text[],
	contexts text[] DEFAULT NULL,
	model text DEFAULT NULL,
	max_new_tokens integer DEFAULT 256,
	temperature double precision DEFAULT 1.0,
	top_p double precision DEFAULT 0.92,
	top_k integer DEFAULT 0,
	do_sample boolean DEFAULT true,
	seed bigint DEFAULT NULL)
	RETURNS text[]
	AS 'MODULE_PATHNAME', 'dolly_generate_array' LANGUAGE C VOLATILE PARALLEL RESTRICTED;
