-- dolly--0.3--0.4.sql: dolly on a Citus cluster: dolly_generate_greedy, which Citus runs in an
-- UPDATE of a distributed table; copying a model to every worker.
\echo Use "ALTER EXTENSION dolly UPDATE TO '0.4'" to load this file. \quit

-- Every query here qualifies its operators and functions: an extension script runs with
-- the installing superuser's rights, and the schema it runs in may hold others' objects.

-- dolly_generate with do_sample => false. Declared IMMUTABLE because Citus runs only
-- non-volatile functions in an UPDATE of a distributed table (greedy decoding of a given
-- model is deterministic); do not use it in an index or a generated column, whose values
-- would outlive a change of the model.
CREATE FUNCTION dolly_generate_greedy(
	instruction text,
	context text DEFAULT NULL,
	model text DEFAULT NULL,
	max_new_tokens integer DEFAULT 256)
	RETURNS text
	AS 'MODULE_PATHNAME', 'dolly_generate' LANGUAGE C IMMUTABLE PARALLEL RESTRICTED;

-- A model's files arriving from another node (dolly_copy_model_to_workers): superusers only.
CREATE FUNCTION dolly_receive_model_begin(model text) RETURNS void
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL UNSAFE;
CREATE FUNCTION dolly_receive_model_part(model text, file text, "offset" bigint, data bytea, digest bytea)
	RETURNS bigint
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL UNSAFE;
CREATE FUNCTION dolly_receive_model_done(model text, owner name, base_model text, files text[], sizes bigint[])
	RETURNS text
	AS 'MODULE_PATHNAME' LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION dolly_receive_model_begin, dolly_receive_model_part, dolly_receive_model_done
	FROM PUBLIC;

-- On a Citus coordinator, as a superuser: copy a model of the catalog to every worker
-- (through Citus's connections, a megabyte at a time, each piece checked by its SHA-256
-- and each file by its size), where it is registered with the same owner and base model.
-- Returns each worker's account. The grants are the owner's to give on each node.
CREATE FUNCTION dolly_copy_model_to_workers(model text)
	RETURNS TABLE (node text, result text)
	LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	m record;
	dir text;
	f record;
	done bigint;
	piece bytea;
	files text[] := '{}';
	sizes bigint[] := '{}';
	r record;
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension e WHERE e.extname OPERATOR(pg_catalog.=) 'citus') THEN
		RAISE EXCEPTION 'Citus is not installed in this database'
			USING HINT = 'dolly_copy_model_to_workers copies a model to the workers of a Citus cluster; run it on the coordinator.';
	END IF;
	SELECT d.name, pg_catalog.pg_get_userbyid(d.owner) AS owner, d.base_model INTO m
	  FROM @extschema@.dolly_model d WHERE d.name OPERATOR(pg_catalog.=) model;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'model "%" is not in this node''s catalog', model
			USING HINT = 'SELECT name FROM dolly_models lists the models; dolly_register_model adds a directory.';
	END IF;
	dir := pg_catalog.current_setting('dolly.model_dir') OPERATOR(pg_catalog.||) '/' OPERATOR(pg_catalog.||) model;
	FOR r IN SELECT * FROM pg_catalog.run_command_on_workers(
			pg_catalog.format('SELECT @extschema@.dolly_receive_model_begin(%L)', model)) LOOP
		IF NOT r.success THEN
			RAISE EXCEPTION 'cannot copy model "%" to node %:%: %', model, r.nodename, r.nodeport, r.result;
		END IF;
	END LOOP;
	FOR f IN SELECT n AS name, (pg_catalog.pg_stat_file(dir OPERATOR(pg_catalog.||) '/' OPERATOR(pg_catalog.||) n)).*
			   FROM pg_catalog.pg_ls_dir(dir) n WHERE n OPERATOR(pg_catalog.!~~) '.%' ORDER BY n LOOP
		IF f.isdir THEN
			RAISE EXCEPTION 'model "%" has a subdirectory "%", which is not copied', model, f.name;
		END IF;
		done := 0;
		WHILE done OPERATOR(pg_catalog.<) f.size LOOP
			piece := pg_catalog.pg_read_binary_file(dir OPERATOR(pg_catalog.||) '/' OPERATOR(pg_catalog.||) f.name,
													done, 1048576);
			FOR r IN SELECT * FROM pg_catalog.run_command_on_workers(pg_catalog.format(
					'SELECT @extschema@.dolly_receive_model_part(%L, %L, %s, %L::bytea, %L::bytea)',
					model, f.name, done, piece, pg_catalog.sha256(piece))) LOOP
				IF NOT r.success THEN
					RAISE EXCEPTION 'cannot copy model "%" to node %:%: %', model, r.nodename, r.nodeport, r.result;
				END IF;
			END LOOP;
			done := done OPERATOR(pg_catalog.+) pg_catalog.length(piece);
		END LOOP;
		files := files OPERATOR(pg_catalog.||) f.name;
		sizes := sizes OPERATOR(pg_catalog.||) f.size;
	END LOOP;
	FOR r IN SELECT * FROM pg_catalog.run_command_on_workers(pg_catalog.format(
			'SELECT @extschema@.dolly_receive_model_done(%L, %L, %L, %L::text[], %L::bigint[])',
			model, m.owner, m.base_model, files, sizes)) LOOP
		IF NOT r.success THEN
			RAISE EXCEPTION 'cannot copy model "%" to node %:%: %', model, r.nodename, r.nodeport, r.result;
		END IF;
		node := r.nodename OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) r.nodeport;
		result := r.result;
		RETURN NEXT;
	END LOOP;
END
$$;
REVOKE ALL ON FUNCTION dolly_copy_model_to_workers FROM PUBLIC;
