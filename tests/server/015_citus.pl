# 015_citus.pl: dolly on a Citus cluster, a coordinator and two workers on this machine, each
# with its own model server: statements over a table distributed in 8 shards run their dolly
# calls on the workers that hold the shards (batched there by Dolly Batch) and answer as one
# node does; UPDATE runs through dolly_generate_greedy (and dolly_generate's refusal says
# so); a model fine-tuned on the coordinator from the distributed table serves on every
# worker after dolly_copy_model_to_workers. Skipped, visibly, where Citus is not installed
# (../shared/vendor/build-citus.sh builds it).
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use DollyTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $probe = PostgreSQL::Test::Cluster->new('probe');
my $libdir = $probe->config_data('--pkglibdir');
plan skip_all => "Citus is not installed in $libdir (bash ../shared/vendor/build-citus.sh builds it)"
  unless -f "$libdir/citus.so";

my %conf = (preload => 'citus,dolly', models => [ 'neox-par-f32' ],
	conf => "dolly.model = 'neox-par-f32'\nmax_worker_processes = 32\n");
my ($coord, $cdir) = dolly_cluster('coordinator', %conf);
my @workers = map { (dolly_cluster("worker$_", %conf))[0] } (1, 2);
for my $n ($coord, @workers)
{
	$n->safe_psql('postgres', 'CREATE EXTENSION citus');
}
$coord->safe_psql('postgres', sprintf("SELECT citus_set_coordinator_host('%s', %d)", $coord->host, $coord->port));
$coord->safe_psql('postgres', sprintf("SELECT citus_add_node('%s', %d)", $_->host, $_->port)) for @workers;
is($coord->safe_psql('postgres', 'SELECT count(*) FROM citus_get_active_worker_nodes()'), '2', 'two workers');

$coord->safe_psql('postgres', q{
CREATE TABLE tasks (id int PRIMARY KEY, instruction text, response text, answer text);
SET citus.shard_count = 8;
SELECT create_distributed_table('tasks', 'id');
INSERT INTO tasks SELECT i, 'Spell the number ' || i, 'It is ' || i || '.' FROM generate_series(1, 64) i;
CREATE TABLE tasks_here AS SELECT * FROM tasks;
CREATE TABLE answers (id int PRIMARY KEY, answer text);
SELECT create_distributed_table('answers', 'id', colocate_with => 'tasks');
});
is($coord->safe_psql('postgres', "SELECT count(DISTINCT nodeport) FROM citus_shards WHERE table_name = 'tasks'::regclass"),
	'2', 'tasks lies in shards on both workers');

my $call = "dolly_generate(instruction, do_sample => false, max_new_tokens => 8)";
my $one_node = $coord->safe_psql('postgres', "SELECT string_agg(id || ':' || $call, '|' ORDER BY id) FROM tasks_here");
my $requests = sub { [ map { $_->safe_psql('postgres', 'SELECT coalesce(sum(requests), 0) FROM dolly_server') } @workers ] };
my $before = $requests->();
is($coord->safe_psql('postgres', "SELECT string_agg(id || ':' || a, '|' ORDER BY id) FROM (SELECT id, $call AS a FROM tasks) t"),
	$one_node, 'SELECT over the distributed table: the one-node answers');
my $after = $requests->();
ok($after->[0] > $before->[0] && $after->[1] > $before->[1],
	"both workers' model servers answered ($before->[0] -> $after->[0], $before->[1] -> $after->[1])");
like($coord->safe_psql('postgres', "EXPLAIN (COSTS OFF) SELECT id, $call FROM tasks"),
	qr/Custom Scan \(Citus Adaptive\).*Dolly Batch/s, "EXPLAIN: the shard queries' dolly calls run in Dolly Batch on the workers");

$coord->safe_psql('postgres', "INSERT INTO answers SELECT id, $call FROM tasks");
is($coord->safe_psql('postgres', "SELECT string_agg(id || ':' || answer, '|' ORDER BY id) FROM answers"),
	$one_node, 'INSERT ... SELECT into a co-located table: the one-node answers');

my ($ret, $out, $err) = $coord->psql('postgres', "UPDATE tasks SET answer = $call");
isnt($ret, 0, 'UPDATE with dolly_generate: Citus refuses a volatile function');
like($err, qr/HINT:.*dolly_generate_greedy/, 'and the hint shows the statement Citus runs');
$coord->safe_psql('postgres', "UPDATE tasks SET answer = dolly_generate_greedy(instruction, max_new_tokens => 8)");
is($coord->safe_psql('postgres', "SELECT string_agg(id || ':' || answer, '|' ORDER BY id) FROM tasks"),
	$one_node, 'UPDATE tasks SET answer = dolly_generate_greedy(instruction): the one-node answers');

# fine-tuning on the coordinator reads every shard's rows through Citus
my $job = $coord->safe_psql('postgres', q{
SELECT dolly_finetune('tasks', 'tuned', base_model => 'neox-par-f32', epochs => 1, batch_size => 8,
					  learning_rate => 1e-3, warmup_steps => 0, eval_fraction => 0)});
$coord->poll_query_until('postgres', "SELECT state NOT IN ('queued', 'running') FROM dolly_jobs WHERE id = $job")
  or die 'the job did not finish';
is($coord->safe_psql('postgres', "SELECT state || ' ' || records FROM dolly_jobs WHERE id = $job"), 'succeeded 64',
	'a job fine-tunes on all 64 rows of the distributed table');

# as a role, through row-level security on the distributed table (Citus propagates the
# role, the grant and the policy to the workers)
$coord->safe_psql('postgres', q{
CREATE ROLE alice LOGIN;
GRANT dolly_trainer TO alice;
GRANT SELECT ON tasks TO alice;
ALTER TABLE tasks ENABLE ROW LEVEL SECURITY;
CREATE POLICY firsthalf ON tasks FOR SELECT TO alice USING (id <= 32);
});
my $ajob = $coord->safe_psql('postgres', q{
SELECT dolly_finetune('tasks', 'alice-tuned', epochs => 1, batch_size => 8, learning_rate => 1e-3,
					  warmup_steps => 0, eval_fraction => 0)}, extra_params => [ '-U', 'alice' ]);
$coord->poll_query_until('postgres', "SELECT state NOT IN ('queued', 'running') FROM dolly_jobs WHERE id = $ajob")
  or die 'the job did not finish';
is($coord->safe_psql('postgres', "SELECT state || ' ' || records FROM dolly_jobs WHERE id = $ajob"), 'succeeded 32',
	"a role's job reads only the rows its policy shows it, on every shard");
$coord->safe_psql('postgres', 'ALTER TABLE tasks DISABLE ROW LEVEL SECURITY');

# the model is the coordinator's only: a distributed call names the worker that lacks it
my $tuned = "dolly_generate(instruction, model => 'tuned', do_sample => false, max_new_tokens => 8)";
($ret, $out, $err) = $coord->psql('postgres', "SELECT $tuned FROM tasks");
isnt($ret, 0, 'a model missing on the workers: the statement fails');
like($err, qr/tuned.*(localhost|\/).*:\d+|on (host|node) .*\d+/s, "with an ERROR that names the node ($err)");

my $copied = $coord->safe_psql('postgres', "SELECT string_agg(result, '; ' ORDER BY node) FROM dolly_copy_model_to_workers('tuned')");
like($copied, qr/^model "tuned": \d+ files, \d+ bytes; model "tuned": \d+ files, \d+ bytes$/,
	"dolly_copy_model_to_workers copies it to both workers ($copied)");
$coord->safe_psql('postgres', 'CREATE TABLE tuned_here AS SELECT * FROM tasks');
is($coord->safe_psql('postgres', "SELECT string_agg(id || ':' || a, '|' ORDER BY id) FROM (SELECT id, $tuned AS a FROM tasks) t"),
	$coord->safe_psql('postgres', "SELECT string_agg(id || ':' || $tuned, '|' ORDER BY id) FROM tuned_here"),
	'and the workers serve it: the coordinator\'s answers');
is($workers[0]->safe_psql('postgres', "SELECT owner FROM dolly_models WHERE name = 'tuned'"),
	$coord->safe_psql('postgres', "SELECT owner FROM dolly_models WHERE name = 'tuned'"), 'owned by the same role');
($ret, $out, $err) = $coord->psql('postgres', "SELECT * FROM dolly_copy_model_to_workers('tuned')");
like($err, qr/already exists on this node/, 'copying it again is refused, naming the model');

$_->stop for ($coord, @workers);
done_testing();
