-- dolly_batch: dolly_generate over an array of instructions gives, in order, exactly the
-- answers of one call per instruction (greedy, and seeded sampling), with NULL for NULL,
-- whatever dolly.query_batch keeps in flight.
CREATE TABLE batch_tasks AS
SELECT i, 'Say the number ' || i AS instruction,
	   CASE WHEN i % 3 = 0 THEN 'context ' || i END AS context
  FROM generate_series(1, 40) i;

CREATE TABLE one_by_one AS
SELECT i, dolly_generate(instruction, context, max_new_tokens => 12, do_sample => false) AS greedy,
	   dolly_generate(instruction, context, model => 'neox-par-f32', max_new_tokens => 12, seed => 7) AS seeded
  FROM batch_tasks;

-- the default window (dolly.max_batch, 4 here), one at a time, and more than the pool
SET dolly.query_batch = 0;
SELECT dolly_generate(array_agg(instruction ORDER BY i), array_agg(context ORDER BY i),
					  max_new_tokens => 12, do_sample => false)
	 = (SELECT array_agg(greedy ORDER BY i) FROM one_by_one) AS greedy_same
  FROM batch_tasks;
SET dolly.query_batch = 1;
SELECT dolly_generate(array_agg(instruction ORDER BY i), array_agg(context ORDER BY i),
					  model => 'neox-par-f32', max_new_tokens => 12, seed => 7)
	 = (SELECT array_agg(seeded ORDER BY i) FROM one_by_one) AS seeded_same_one_at_a_time
  FROM batch_tasks;
SET dolly.query_batch = 1000;
SELECT dolly_generate(array_agg(instruction ORDER BY i), array_agg(context ORDER BY i),
					  model => 'neox-par-f32', max_new_tokens => 12, seed => 7)
	 = (SELECT array_agg(seeded ORDER BY i) FROM one_by_one) AS seeded_same_all_at_once
  FROM batch_tasks;
RESET dolly.query_batch;

-- NULL elements, an empty array, a NULL array; contexts must match
SELECT dolly_generate(ARRAY['Say 1', NULL, 'Say 2'], max_new_tokens => 4, do_sample => false)
	 = ARRAY[dolly_generate('Say 1', max_new_tokens => 4, do_sample => false), NULL,
			 dolly_generate('Say 2', max_new_tokens => 4, do_sample => false)] AS nulls_kept;
SELECT dolly_generate(ARRAY[]::text[]) AS empty, dolly_generate(NULL::text[]) IS NULL AS null_array;
SELECT dolly_generate(ARRAY['a', 'b'], ARRAY['c']);
SELECT dolly_generate(ARRAY[['a'], ['b']]);
SELECT dolly_generate(ARRAY['a'], max_new_tokens => 0);

-- a scalar call still resolves to the scalar function
SELECT pg_typeof(dolly_generate('Say 1', max_new_tokens => 2, do_sample => false)) AS scalar_type;
DROP TABLE batch_tasks, one_by_one;
