-- records.sql: synthetic instruction records whose answers can be checked exactly.
-- Each record asks for one of three operations on a short list of letters: repeat it,
-- reverse it, or sort it (four letters each). The letters are those the demo's tokenizer spells as one token
-- with a leading space, so a small model sees one token per letter. Usage (psql):
--   \set n 20000  \set seed 0.42  \i records.sql   -> table :"table" (instruction, response)
SELECT setseed(:seed) \gset
CREATE TABLE :"table" AS
WITH lists AS (
	SELECT i,
		   (ARRAY['repeat', 'reverse', 'sort'])[1 + (i % 3)] AS task,
		   ARRAY(SELECT (ARRAY['a','b','c','d','e','f','g','h','j','k','m','o','p','r','s','t','v','w'])
						[1 + floor(random() * 18)::int]
				   FROM generate_series(1, 4) WHERE i > 0) AS letters
	  FROM generate_series(1, :n) i
)
SELECT i AS id,
	   initcap(task) || ' the letters: ' || array_to_string(letters, ' ') AS instruction,
	   CASE task
		   WHEN 'repeat' THEN array_to_string(letters, ' ')
		   WHEN 'reverse' THEN (SELECT string_agg(l, ' ' ORDER BY o DESC)
								  FROM unnest(letters) WITH ORDINALITY AS u(l, o))
		   ELSE (SELECT string_agg(l, ' ' ORDER BY l COLLATE "C") FROM unnest(letters) AS u(l))
	   END AS response,
	   task
  FROM lists;
