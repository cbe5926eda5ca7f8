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
