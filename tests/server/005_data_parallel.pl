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
	my ($out, $checkpointing, $more) = @_;
	$checkpointing //= 'false';
	$more //= '';
	my $id = $node->safe_psql('postgres',
		"SELECT dolly_finetune('records', '$out', base_model => 'base', epochs => 2, batch_size => 8, "
		  . "learning_rate => 1e-3, warmup_steps => 2, eval_fraction => 0.125, "
		  . "checkpointing => $checkpointing$more)");
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

# ZeRO: the stage a job runs is shown; stages 1 and 2 shard AdamW's state (and stage 2 the
# gradients) over the ranks and train the same model bit for bit (the sums and the norm
# are taken in rank order at every stage; one micro-batch a rank a step here)
is($node->safe_psql('postgres', "SELECT zero_stage FROM dolly_jobs WHERE id = $id1"), '0', 'one worker runs stage 0');
is($node->safe_psql('postgres', "SELECT zero_stage FROM dolly_jobs WHERE id = $id2"), '0',
	'two workers pick stage 0 when everything fits');
ok($node->log_contains("fine-tuning job $id2: ZeRO stage 0 \\(the smallest stage that fits\\)"), 'and log why');
ok($node->log_contains("fine-tuning job $id2: the ranks sum from each other's gradient buffers"),
	'CPU ranks that keep every gradient sum from each other\'s buffers in shared memory');
for my $stage (1, 2)
{
	my ($id, $res) = job("zero$stage", 'false', ", zero_stage => $stage");
	my ($s, $step, $total, $loss) = split /\|/, $res;
	is($s, 'succeeded', "stage $stage: the job succeeds");
	is($loss, $loss2, "stage $stage gives stage 0's evaluation loss ($loss)");
	is($node->safe_psql('postgres', "SELECT zero_stage FROM dolly_jobs WHERE id = $id"), $stage, "dolly_jobs shows stage $stage");
	ok($node->log_contains("fine-tuning job $id: ZeRO stage $stage \\(asked for\\)"), "the log names stage $stage");
}
my ($idb, $bf16) = job('zero-bf16', 'false', ', zero_stage => 2, bf16_communication => true');
my ($sb, $stepb, $totalb, $lossb) = split /\|/, $bf16;
is($sb, 'succeeded', 'bfloat16 communication: the job succeeds');
cmp_ok(abs($lossb - $loss2), '<', 1e-2 * abs($loss2), "with about the same evaluation loss ($lossb vs $loss2)");
my ($ret, $out, $err) = $node->psql('postgres', "SELECT dolly_finetune('records', 'x', zero_stage => 3)");
like($err, qr/zero_stage/, 'a stage that does not exist is refused');

# a rank stopped mid-training ends the whole group: the job ends, nothing is published,
# and no rank is left running
my $idk = $node->safe_psql('postgres',
	"SELECT dolly_finetune('records', 'killed', base_model => 'base', epochs => 10000, batch_size => 2, zero_stage => 2)");
$node->poll_query_until('postgres', "SELECT state = 'running' AND step > 0 FROM dolly_jobs WHERE id = $idk")
  or die 'job did not start';
$node->safe_psql('postgres',
	"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'dolly fine-tuning job $idk rank 1'");
$node->poll_query_until('postgres', "SELECT state IN ('failed', 'cancelled') FROM dolly_jobs WHERE id = $idk")
  or die 'the job did not end';
$node->poll_query_until('postgres',
	"SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'dolly fine-tuning job'")
  or die 'a rank was left running';
pass('stopping one rank ends every rank of the job');
ok(!-e "$models/killed", 'and no model is written');

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
