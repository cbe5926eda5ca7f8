# 005_data_parallel.pl: a fine-tuning job split over two worker processes (dolly.train_workers)
# coordinated through shared memory trains the same model as one process, and stops cleanly.
use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $root = abs_path(dirname(__FILE__) . '/../..');
my $models = PostgreSQL::Test::Utils::tempdir();
mkdir "$models/base";
system('cp', glob("$root/tests/fixtures/neox-par-f32/*"), "$models/base/") == 0 or die 'cp';

my $node = PostgreSQL::Test::Cluster->new('dp');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'dolly'
dolly.model_dir = '$models'
dolly.threads = 2
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION dolly;
CREATE TABLE records AS
SELECT 'Spell the number ' || i AS instruction, 'It is ' || i || '.' AS response
  FROM generate_series(1, 64) i;
});

# run a job to its end; returns "state|step|total|eval_loss"
sub job
{
	my ($out, $checkpointing) = @_;
	$checkpointing //= 'false';
	my $id = $node->safe_psql('postgres',
		"SELECT dolly_finetune('records', '$out', base_model => 'base', epochs => 2, batch_size => 8, "
		  . "learning_rate => 1e-3, warmup_steps => 2, eval_fraction => 0.125, "
		  . "checkpointing => $checkpointing)");
	$node->poll_query_until('postgres',
		"SELECT state NOT IN ('queued', 'running') FROM dolly_jobs WHERE id = $id")
	  or die "job $id did not finish";
	return ($id, $node->safe_psql('postgres',
		"SELECT state, step, total_steps, eval_loss FROM dolly_jobs WHERE id = $id"));
}

my ($id1, $one) = job('one');
my ($s1, $step1, $total1, $loss1) = split /\|/, $one;
is($s1, 'succeeded', 'one worker: the job succeeds');

$node->append_conf('postgresql.conf', "dolly.train_workers = 2\n");
$node->reload;
my ($id2, $two) = job('two');
my ($s2, $step2, $total2, $loss2) = split /\|/, $two;
is($s2, 'succeeded', 'two workers: the job succeeds');
ok($node->log_contains("fine-tuning job $id2: rank 1 of 2 started"), 'a second worker process trained');
ok(!$node->log_contains("fine-tuning job $id1: rank 1"), 'and none for the one-worker job');
is("$step2/$total2", "$step1/$total1", 'the same number of optimizer steps');
cmp_ok(abs($loss2 - $loss1), '<', 1e-3 * abs($loss1),
	"the same evaluation loss as one worker ($loss2 vs $loss1)");
ok(-f "$models/two/model.safetensors", 'rank 0 saved the model');

# activation checkpointing recomputes what it does not keep: the same run, the same loss
my ($id3, $three) = job('three', 'true');
my ($s3, $step3, $total3, $loss3) = split /\|/, $three;
is($s3, 'succeeded', 'two workers with checkpointing: the job succeeds');
is($loss3, $loss2, "checkpointing gives the evaluation loss of the run without ($loss3)");
is($node->safe_psql('postgres', "SELECT options->>'checkpointing' FROM dolly_jobs WHERE id = $id3"),
	'true', 'the job records the option');

# a cancel reaches both ranks; neither is left behind
my $id = $node->safe_psql('postgres',
	"SELECT dolly_finetune('records', 'stopped', base_model => 'base', epochs => 10000, batch_size => 2)");
$node->poll_query_until('postgres', "SELECT state = 'running' AND step > 0 FROM dolly_jobs WHERE id = $id")
  or die 'job did not start';
$node->safe_psql('postgres', "SELECT dolly_cancel_job($id)");
$node->poll_query_until('postgres', "SELECT state = 'cancelled' FROM dolly_jobs WHERE id = $id")
  or die 'job not cancelled';
$node->poll_query_until('postgres',
	"SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'dolly fine-tuning job'")
  or die 'a rank was left running';
pass('cancelling stops every rank');
ok(!-e "$models/stopped", 'and no model is written');

$node->stop;
done_testing();
