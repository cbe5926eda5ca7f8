# 009_upgrade.pl: ALTER EXTENSION dolly UPDATE from 0.1 keeps the jobs, names their roles
# by OID, registers the models that jobs of 0.1 wrote as their roles', and gives the
# objects a fresh install has (names, columns, view definitions, grants, what pg_dump
# dumps; a fresh install runs 0.1's script and the same update today, so this guards the
# day a version gets a full script of its own).
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use DollyTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my ($node, $models) = dolly_cluster('upgrade', models => [ 'gptj-f32' ]);
mkdir "$models/old-model";
system('cp', glob("$fixtures/gptj-f32/*"), "$models/old-model/") == 0 or die 'cp';
$node->safe_psql('postgres', 'CREATE ROLE alice LOGIN; CREATE DATABASE fresh; CREATE DATABASE old');
$node->safe_psql('fresh', 'CREATE EXTENSION dolly');
$node->safe_psql('old', q{
CREATE EXTENSION dolly VERSION '0.1';
INSERT INTO dolly_job (role, source, output_model, options, state)
VALUES ('alice', 'records', 'old-model', '{"base_model": null}', 'succeeded'),
	   ('alice', 'records', 'missing-model', '{"base_model": null}', 'succeeded'),
	   ('alice', 'records', 'failed-model', '{"base_model": null}', 'failed');
});
my ($ret, $out, $err) = $node->psql('old', 'ALTER EXTENSION dolly UPDATE');
is($ret, 0, 'ALTER EXTENSION dolly UPDATE runs');
like($err, qr/the model of job 2 is not registered/, 'a job whose model is gone is named in a warning');
is($node->safe_psql('old', "SELECT extversion FROM pg_extension WHERE extname = 'dolly'"), '0.5', 'to 0.5');

# the same objects as a fresh install
my $objects = q{
SELECT string_agg(d, E'\n' ORDER BY d) FROM (
  SELECT pg_describe_object(classid, objid, objsubid) AS d
	FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
	 AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'dolly')
  UNION ALL
  SELECT c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull
	FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
   WHERE c.relname LIKE 'dolly%' AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT viewname || ' ' || definition FROM pg_views WHERE viewname LIKE 'dolly%'
  UNION ALL
  SELECT proname || '(' || pg_get_function_arguments(oid) || ') ' || coalesce(proacl::text, '')
	FROM pg_proc WHERE proname LIKE 'dolly%'
  UNION ALL
  SELECT c.relname || ' ' || coalesce(c.relacl::text, '') || ' ' || coalesce(c.reloptions::text, '')
	FROM pg_class c WHERE c.relname LIKE 'dolly%'
  UNION ALL
  SELECT 'dumped: ' || (SELECT string_agg(x::regclass::text, ',' ORDER BY x::regclass::text)
						 FROM unnest(extconfig) x) FROM pg_extension WHERE extname = 'dolly'
) o};
is($node->safe_psql('old', $objects), $node->safe_psql('fresh', $objects),
	'the updated extension has the objects, columns, views, grants and dumped tables of a fresh one');

# the jobs stay, their roles by OID, their models registered as the roles'
is($node->safe_psql('old', 'SELECT string_agg(role || \' \' || output_model || \' \' || state, \',\' ORDER BY id) FROM dolly_jobs'),
	'alice old-model succeeded,alice missing-model succeeded,alice failed-model failed', 'the jobs are kept');
is($node->safe_psql('old', 'SELECT string_agg(name || \' \' || owner || \' \' || job, \',\') FROM dolly_models'),
	'old-model alice 1', 'the model a job of 0.1 wrote is registered as its role\'s');
is($node->safe_psql('old', "SELECT length(dolly_generate('Say 1', model => 'old-model', max_new_tokens => 2, do_sample => false)) >= 0"),
	't', 'and served');

done_testing();
