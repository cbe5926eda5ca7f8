-- dolly_batch_scan: the Dolly Batch node runs the dolly calls of a statement's rows
-- together; every statement shape gives exactly the per-row plan's results (SET
-- dolly.query_batch = 1), greedy and seeded alike, in the same order and number.
CREATE TABLE scan_tasks AS
SELECT i AS id, 'Say the number ' || i AS q, CASE WHEN i % 4 = 0 THEN 'ctx ' || i END AS ctx,
	   i % 3 AS grp
  FROM generate_series(1, 30) i;
CREATE SEQUENCE scan_seq;
CREATE TABLE scan_groups AS SELECT g AS grp, 'group ' || g AS label FROM generate_series(0, 2) g;

-- run a statement with the node and without: the rows that differ, by position (none should)
CREATE FUNCTION both_ways(sql text) RETURNS TABLE (n bigint, per_row text, batched text)
LANGUAGE plpgsql AS $$
DECLARE
	a text[];
	b text[];
BEGIN
	SET LOCAL dolly.query_batch = 1;
	EXECUTE 'SELECT array_agg(r::text) FROM (' || sql || ') r' INTO a;
	SET LOCAL dolly.query_batch = 0;
	EXECUTE 'SELECT array_agg(r::text) FROM (' || sql || ') r' INTO b;
	IF a IS NULL THEN
		RAISE EXCEPTION 'the statement returned no rows';
	END IF;
	RETURN QUERY SELECT coalesce(x.n, y.n), x.v, y.v
	  FROM unnest(a) WITH ORDINALITY x(v, n) FULL JOIN unnest(b) WITH ORDINALITY y(v, n) ON x.n = y.n
	 WHERE x.v IS DISTINCT FROM y.v;
END $$;

-- SELECT with WHERE, ORDER BY, a join, a subquery, two calls, seeded sampling
SELECT * FROM both_ways($$
	SELECT id, dolly_generate(q, ctx, max_new_tokens => 8, do_sample => false) FROM scan_tasks
	 WHERE id % 2 = 0 ORDER BY id DESC$$);
SELECT * FROM both_ways($$
	SELECT t.id, g.label, dolly_generate_raw(t.q || ' in ' || g.label, model => 'neox-par-f32',
											 max_new_tokens => 8, seed => t.id)
	  FROM scan_tasks t JOIN scan_groups g USING (grp) ORDER BY t.id$$);
SELECT * FROM both_ways($$
	SELECT s.id, upper(s.a), length(s.b) FROM (
		SELECT id, dolly_generate(q, max_new_tokens => 6, do_sample => false) AS a,
			   dolly_generate_raw(q, max_new_tokens => 6, seed => 3) AS b
		  FROM scan_tasks ORDER BY id) s WHERE s.id < 20$$);
-- not batched, and still the same: a call in WHERE, a call over a call
SELECT * FROM both_ways($$
	SELECT id FROM scan_tasks
	 WHERE length(dolly_generate(q, max_new_tokens => 4, do_sample => false)) > 0 ORDER BY id$$);
SELECT * FROM both_ways($$
	SELECT id, dolly_generate(dolly_generate(q, max_new_tokens => 4, do_sample => false),
							  max_new_tokens => 4, do_sample => false) FROM scan_tasks ORDER BY id$$);

-- per-row calls below a batch whose requests are in flight, and two batches in one plan
SELECT * FROM both_ways($$
	SELECT s.id, dolly_generate(s.q, max_new_tokens => 4, do_sample => false) FROM (
		SELECT id, q FROM scan_tasks WHERE dolly_generate(q, max_new_tokens => 2, do_sample => false) IS NOT NULL
		 ORDER BY id LIMIT 12) s$$);
SELECT * FROM both_ways($$
	SELECT s.id, dolly_generate(s.a, max_new_tokens => 4, do_sample => false) FROM (
		SELECT id, dolly_generate_raw(q, max_new_tokens => 4, seed => id) AS a FROM scan_tasks
		 ORDER BY id LIMIT 12) s$$);

-- the plans: the node above what computes the arguments, with its batch size
EXPLAIN (COSTS OFF) SELECT id, dolly_generate(q) FROM scan_tasks WHERE id > 3 ORDER BY id;
EXPLAIN (COSTS OFF) SELECT id FROM scan_tasks WHERE dolly_generate(q) IS NOT NULL;
-- a volatile part beside the call is computed below, row by row as before; one around it is not
EXPLAIN (COSTS OFF) SELECT dolly_generate(q) || random()::text FROM scan_tasks;
EXPLAIN (COSTS OFF) SELECT setseed(length(dolly_generate(q)) / 1000.0) FROM scan_tasks;
EXPLAIN (COSTS OFF) SELECT dolly_generate(q || nextval('scan_seq')) FROM scan_tasks;
EXPLAIN (COSTS OFF, ANALYZE, TIMING OFF, SUMMARY OFF)
	SELECT id, dolly_generate(q, max_new_tokens => 4, do_sample => false) FROM scan_tasks;
SET dolly.query_batch = 1;
EXPLAIN (COSTS OFF) SELECT id, dolly_generate(q) FROM scan_tasks;
RESET dolly.query_batch;

-- INSERT ... SELECT, CREATE TABLE AS, UPDATE: the same rows written either way
CREATE TABLE answers_batched (id int, a text);
CREATE TABLE answers_per_row (id int, a text);
INSERT INTO answers_batched SELECT id, dolly_generate(q, max_new_tokens => 6, do_sample => false) FROM scan_tasks;
SET dolly.query_batch = 1;
INSERT INTO answers_per_row SELECT id, dolly_generate(q, max_new_tokens => 6, do_sample => false) FROM scan_tasks;
CREATE TABLE ctas_per_row AS SELECT id, dolly_generate_raw(q, max_new_tokens => 6, seed => id) AS a FROM scan_tasks;
ALTER TABLE scan_tasks ADD COLUMN answer text;
UPDATE scan_tasks SET answer = dolly_generate(q, max_new_tokens => 6, do_sample => false) WHERE id % 3 <> 0;
CREATE TABLE updated_per_row AS SELECT id, answer FROM scan_tasks;
UPDATE scan_tasks SET answer = NULL;
RESET dolly.query_batch;
CREATE TABLE ctas_batched AS SELECT id, dolly_generate_raw(q, max_new_tokens => 6, seed => id) AS a FROM scan_tasks;
UPDATE scan_tasks SET answer = dolly_generate(q, max_new_tokens => 6, do_sample => false) WHERE id % 3 <> 0;
SELECT (SELECT array_agg(a ORDER BY id) FROM answers_batched) = (SELECT array_agg(a ORDER BY id) FROM answers_per_row) AS insert_same,
	   (SELECT array_agg(a ORDER BY id) FROM ctas_batched) = (SELECT array_agg(a ORDER BY id) FROM ctas_per_row) AS ctas_same,
	   (SELECT array_agg(answer ORDER BY id) FROM scan_tasks) IS NOT DISTINCT FROM
	   (SELECT array_agg(answer ORDER BY id) FROM updated_per_row) AS update_same,
	   (SELECT count(answer) FROM scan_tasks) AS updated;

-- LIMIT and a cursor
SELECT * FROM both_ways($$
	SELECT id, dolly_generate(q, max_new_tokens => 4, do_sample => false) FROM scan_tasks ORDER BY id LIMIT 3$$);
BEGIN;
DECLARE c CURSOR FOR SELECT id, dolly_generate(q, max_new_tokens => 6, do_sample => false) = a AS same
	FROM scan_tasks JOIN answers_per_row USING (id) ORDER BY id;
FETCH 2 FROM c;
FETCH 1 FROM c;
CLOSE c;
COMMIT;

DROP SEQUENCE scan_seq;
DROP TABLE scan_tasks, scan_groups, answers_batched, answers_per_row, ctas_batched, ctas_per_row, updated_per_row;
DROP FUNCTION both_ways;
