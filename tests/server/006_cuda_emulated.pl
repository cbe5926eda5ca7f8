# 006_cuda_emulated.pl: the GPU paths of the server through PostgreSQL, with the CUDA
# plugin's kernels emulated on the CPU (tests/gpu/emu; $DOLLY_CUDA_PLUGIN points the server
# at it, $EMU_GPUS makes two GPUs). Serving: each emulated GPU gets its own model server,
# which serves the greedy text the CPU serves (a statement's rows too, decoded together by
# Dolly Batch); concurrent requests are spread over both;
# while one GPU's server restarts the other serves; after a crash (a server killed) there
# is again exactly one server a GPU; after a kernel faults ($EMU_FAIL_ONCE) the request gets
# an ERROR and a new server serves again; a GPU without room for the model ($EMU_GPU_FULL)
# leaves the requests to the other. Fine-tuning: a job trains on a GPU in mixed
# precision and saves a model the CPU then serves; two ranks on two GPUs, summing on the
# GPUs from each other's memory (CUDA IPC, emulated between processes), train the model one
# GPU trains, and at ZeRO stages 0, 1 and 2, in float32 and with bfloat16 communication,
# the very bits of the ranks summing through host memory ($EMU_NO_IPC); GPUs without peer
# access fall back to host memory and say why; a rank stopped mid-step or a cancelled job
# ends every rank, publishes nothing and leaves no IPC mapping open. When dolly.device goes
# back to cpu the second GPU's server stops; two ranks on one GPU map each other's memory
# too; without a GPU, dolly.device = cuda is an ERROR.
# Skipped, visibly, when the emulated plugin was not built.
use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Compare qw(compare);
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $root = abs_path(dirname(__FILE__) . '/../..');
my $plugin = "$root/build/gpu-emu/dolly_cuda_emu.so";
plan skip_all => "no emulated CUDA plugin: run make emutest (or make build/gpu-emu/dolly_cuda_emu.so) first" unless -f $plugin;

my $models = PostgreSQL::Test::Utils::tempdir();
mkdir "$models/base";
system('cp', glob("$root/tests/fixtures/neox-par-f32/*"), "$models/base/") == 0 or die 'cp';

my $fault = "$models/fail-once";
my $switches = PostgreSQL::Test::Utils::tempdir();
my $no_ipc = "$switches/no-ipc";
my $no_peer = "$switches/no-peer";
$ENV{DOLLY_CUDA_PLUGIN} = $plugin;
$ENV{EMU_GPUS} = 2;
$ENV{EMU_FAIL_ONCE} = $fault;
$ENV{EMU_NO_IPC} = $no_ipc;
$ENV{EMU_NO_PEER} = $no_peer;

# create or remove a switch file of the emulator
sub switch
{
	my ($file, $on) = @_;
	if ($on)
	{
		open(my $fh, '>', $file) or die "cannot create $file";
		close $fh;
	}
	else
	{
		unlink $file;
	}
}

# a started cluster serving $models/base on dolly.device $device, dolly installed
sub cluster
{
	my ($name, $device) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'dolly'
dolly.model_dir = '$models'
dolly.model = 'base'
dolly.device = '$device'
dolly.threads = 2
restart_after_crash = on
});
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION dolly');
	return $node;
}

my $node = cluster('cuda_emu', 'cpu');
$node->safe_psql('postgres', q{
CREATE TABLE records AS
SELECT 'Spell the number ' || i AS instruction, 'It is ' || i || '.' AS response
  FROM generate_series(1, 16) i;
});

like($node->safe_psql('postgres', "SELECT available, devices FROM dolly_backends() WHERE backend = 'cuda'"),
	qr/^t\|2$/, 'the server sees two (emulated) GPUs that passed the self-test');

my $sql = "SELECT dolly_generate_raw('Tell me about tables.', max_new_tokens => 12, do_sample => false)";
my $cpu = $node->safe_psql('postgres', $sql);
is($node->safe_psql('postgres', "SELECT device FROM dolly_server"), 'cpu', 'served on the CPU first');
# ten rows of one statement: a call per row on the CPU, through Dolly Batch on the GPUs below
my $rows_sql = "SELECT string_agg(a, '|' ORDER BY i) FROM (SELECT i, dolly_generate_raw('Row ' || i || ' says', "
  . "max_new_tokens => 8, do_sample => false) AS a FROM generate_series(1, 10) i) s";
my $cpu_rows = $node->safe_psql('postgres', "SET dolly.query_batch = 1; $rows_sql");

$node->append_conf('postgresql.conf', "dolly.device = 'cuda'\n");
$node->reload;
$node->poll_query_until('postgres', "SELECT string_agg(device, ',' ORDER BY device) FROM dolly_server",
	'cuda:0,cuda:1')
  or die 'the model did not move to the GPUs';
is($node->safe_psql('postgres', $sql), $cpu, 'the GPU serves the greedy text the CPU serves');
is($node->safe_psql('postgres', $rows_sql), $cpu_rows,
	'a statement through Dolly Batch gets from the GPUs, its rows decoded together, what a call per row gets on the CPU');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'dolly model server'"),
	2, 'one model server a GPU');

# Run $sql in four clients at once on $node (released together from an advisory lock),
# calling $between after they wait and before they go; returns how many got $want.
sub four_at_once
{
	my ($node, $sql, $want, $between) = @_;
	my $locker = $node->background_psql('postgres');
	$locker->query_safe('SELECT pg_advisory_lock(42)');
	my (@h, @out, @err);
	for my $i (0 .. 3)
	{
		push @h, IPC::Run::start(
			[ 'psql', '-X', '-A', '-t', '-q', '-d', $node->connstr('postgres'),
			  '-c', "$sql FROM (SELECT pg_advisory_lock_shared(42)) AS l" ],
			'>', \$out[$i], '2>', \$err[$i]);
	}
	$node->poll_query_until('postgres',
		"SELECT count(*) = 4 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
	  or die 'clients did not reach the lock';
	$between->() if $between;
	$locker->query_safe('SELECT pg_advisory_unlock(42)');
	$_->finish for @h;
	$locker->quit;
	chomp @out;
	diag("client: $_") for grep { $_ } @err;
	return scalar(grep { $_ eq $want } @out);
}

# four clients at once: each gets the greedy text, and each GPU's server answers some
my $requests = "SELECT string_agg(requests::text, ',' ORDER BY device) FROM dolly_server";
my @before;
is(four_at_once($node, $sql, $cpu, sub { @before = split /,/, $node->safe_psql('postgres', $requests) }),
	4, 'four concurrent clients get the greedy text');
my @after = split /,/, $node->safe_psql('postgres', $requests);
my @answered = map { $after[$_] - $before[$_] } 0 .. 1;
ok($answered[0] > 0 && $answered[1] > 0 && $answered[0] + $answered[1] == 4,
	"and both GPUs' servers answer some of them (@answered)");

# one GPU's server dies: the other serves meanwhile, and the postmaster starts it again
my $pid1 = $node->safe_psql('postgres', "SELECT server_pid FROM dolly_server WHERE device = 'cuda:1'");
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid1)");
$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $pid1")
  or die "GPU 1's server did not stop";
is($node->safe_psql('postgres', $sql), $cpu, "while GPU 1's server is down, GPU 0's serves");
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM dolly_server WHERE device = 'cuda:1' AND server_pid <> $pid1")
  or die "GPU 1's server did not come back";
pass("GPU 1's server comes back, with the model loaded");

# one that is killed: the postmaster reinitialises everything, and there is again exactly
# one server a GPU (GPU 1's worker, restarted by the postmaster or started anew by server 0)
$pid1 = $node->safe_psql('postgres', "SELECT server_pid FROM dolly_server WHERE device = 'cuda:1'");
kill 'KILL', $pid1;
$node->poll_query_until('postgres', "SELECT string_agg(device, ',' ORDER BY device) FROM dolly_server",
	'cuda:0,cuda:1')
  or die 'the GPUs are not served again after a crash';
sleep 2;
is($node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'dolly model server'"),
	2, 'after a crash, again one model server a GPU');
is($node->safe_psql('postgres', $sql), $cpu, 'which serve');

# a kernel that faults: that request gets an ERROR, the server starts again with a new
# GPU context, and serves the next one
open(my $fh, '>', $fault) or die "cannot create $fault";
close $fh;
my ($ret, $out, $err) = $node->psql('postgres', $sql);
isnt($ret, 0, 'a request whose pass faults on the GPU fails');
like($err, qr/CUDA .* failed on cuda:\d/, 'with an ERROR that says what failed');
$node->poll_query_until('postgres', $sql, $cpu) or die 'the server did not come back';
ok($node->log_contains('restarting with a new GPU context'), 'the model server restarted, and serves again');

# run a job to its end; returns (id, "state|eval_loss|error")
sub job
{
	my ($out, $more) = @_;
	$more //= '';
	my $id = $node->safe_psql('postgres',
		"SELECT dolly_finetune('records', '$out', base_model => 'base', epochs => 1, batch_size => 8, "
		  . "learning_rate => 1e-3, warmup_steps => 0, eval_fraction => 0.125$more)");
	$node->poll_query_until('postgres',
		"SELECT state NOT IN ('queued', 'running') FROM dolly_jobs WHERE id = $id")
	  or die "job $id did not finish";
	return ($id, $node->safe_psql('postgres', "SELECT state, eval_loss, error FROM dolly_jobs WHERE id = $id"));
}

# a job on the GPU: rank 0 on cuda:0 in mixed mode; its model then served by the CPU
my ($id1, $one) = job('tuned');
my ($state, $loss1, $err1) = split /\|/, $one;
is($state, 'succeeded', 'a fine-tuning job succeeds with dolly.device = cuda' . ($err1 ? ": $err1" : ''));
ok($node->log_contains('fine-tuning rank 0 of 1 trains on cuda:0'), 'and trains on the GPU');
cmp_ok($loss1, '>', 0, "with a finite evaluation loss ($loss1)");
ok(-f "$models/tuned/model.safetensors", 'and saves the model');

# two ranks, one a GPU: each sums its part on its GPU, reading the other's memory
$node->append_conf('postgresql.conf', "dolly.train_workers = 2\n");
$node->reload;
my ($id2, $two) = job('tuned2');
my ($state2, $loss2, $err2) = split /\|/, $two;
is($state2, 'succeeded', 'a job of two ranks on two GPUs succeeds' . ($err2 ? ": $err2" : ''));
ok($node->log_contains('fine-tuning rank 1 of 2 trains on cuda:1'), 'rank 1 trains on the second GPU');
my $ipc_line = 'the ranks sum on the devices, each reading the others. memory directly';
my $host_line = 'the ranks sum through host memory: not every rank can map the others. device memory';
ok($node->log_contains("fine-tuning job $id2: $ipc_line"), 'the ranks sum on the GPUs through IPC, and the log says so');
cmp_ok(abs($loss2 - $loss1), '<', 1e-2 * abs($loss1),
	"the evaluation loss of one GPU's run, within bfloat16 rounding ($loss2 vs $loss1)");
is($node->safe_psql('postgres', "SELECT zero_stage FROM dolly_jobs WHERE id = $id2"), '0',
	'stage 0 fits the emulated GPUs');

# ZeRO stages 1 and 2 on the two GPUs: each GPU keeps its part of AdamW's state (and of the
# gradients); the sums and the norm are taken in the same order, so the same loss
for my $stage (1, 2)
{
	my ($id, $res) = job("tuned-zero$stage", ", zero_stage => $stage");
	my ($s, $loss, $e) = split /\|/, $res;
	is($s, 'succeeded', "two GPUs at ZeRO stage $stage: the job succeeds" . ($e ? ": $e" : ''));
	is($loss, $loss2, "with stage 0's evaluation loss ($loss)");
}

# the same jobs summing through host memory (the emulator refuses IPC): the same bits,
# the loss and every parameter, at every stage, and with bfloat16 communication (rounded
# and summed on the GPUs through IPC, on the host otherwise)
sub same_bits
{
	my ($name, $more) = @_;
	switch($no_ipc, 0);
	my ($id_ipc, $ipc) = job("$name-ipc", $more);
	switch($no_ipc, 1);
	my ($id_host, $host) = job("$name-host", $more);
	switch($no_ipc, 0);
	like($ipc, qr/^succeeded\|/, "$name through IPC: the job succeeds ($ipc)");
	ok($node->log_contains("fine-tuning job $id_ipc: $ipc_line")
		  && $node->log_contains("fine-tuning job $id_host: $host_line")
		  && $node->log_contains("fine-tuning job $id_host: rank 0 cannot map the other ranks' device memory: "
			  . "cudaIpcGetMemHandle on cuda:0 failed"),
		"$name: one job sums through IPC, the other through host memory, and says why");
	is($host, $ipc, "$name: the evaluation loss through host memory is IPC's, bit for bit");
	is(compare("$models/$name-ipc/model.safetensors", "$models/$name-host/model.safetensors"), 0,
		"$name: and so is every parameter");
	return ($id_ipc, $ipc);
}
same_bits('stage0', ', zero_stage => 0');
same_bits('stage1', ', zero_stage => 1');
same_bits('stage2', ', zero_stage => 2');
same_bits('bf16-stage0', ', zero_stage => 0, bf16_communication => true');
same_bits('bf16-stage2', ', zero_stage => 2, bf16_communication => true');

# GPUs without peer access: the ranks cannot map each other's memory, and sum through the host
switch($no_peer, 1);
my ($idp, $nopeer) = job('no-peer');
switch($no_peer, 0);
is($nopeer, $two, 'GPUs without peer access: the job sums through host memory, with the same loss');
ok($node->log_contains("fine-tuning job $idp: $host_line")
	  && $node->log_contains("fine-tuning job $idp: rank [01] cannot map the other ranks' device memory: "
		  . "cuda:[01] has no peer access to cuda:[01]"),
	'and the log says which way and why');

# Stop rank 1 mid-step, or cancel the job, while the ranks map each other's memory: every
# rank ends, nothing is published, and every rank's process closed each mapping it opened
sub stopped_job
{
	my ($name, $how) = @_;
	my $id = $node->safe_psql('postgres',
		"SELECT dolly_finetune('records', '$name', base_model => 'base', epochs => 10000, batch_size => 2, zero_stage => 2)");
	$node->poll_query_until('postgres', "SELECT state = 'running' AND step > 1 FROM dolly_jobs WHERE id = $id")
	  or die "job $id did not start";
	my @pids = split /\n/, $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'dolly fine-tuning job' ORDER BY pid");
	if ($how eq 'cancel')
	{
		$node->safe_psql('postgres', "SELECT dolly_cancel_job($id)");
	}
	else
	{
		$node->safe_psql('postgres', "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
			  . "WHERE application_name = 'dolly fine-tuning job $id rank 1'");
	}
	$node->poll_query_until('postgres', "SELECT state IN ('failed', 'cancelled') FROM dolly_jobs WHERE id = $id")
	  or die "job $id did not end";
	$node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'dolly fine-tuning job'")
	  or die 'a rank was left running';
	ok($node->log_contains("fine-tuning job $id: $ipc_line"), "$how: the ranks summed through IPC");
	is(scalar(@pids), 2, "$how: two ranks ran");
	ok(!-e "$models/$name", "$how: every rank ended, and no model is written");
	my @closed = grep { $node->log_contains("cuda_emu: process $_ closed its last IPC mapping") } @pids;
	my @open = grep { $node->log_contains("cuda_emu: process $_ exits with") } @pids;
	is("@closed|@open", "@pids|", "$how: each rank closed every IPC mapping it opened");
	ok(!$node->log_contains("fine-tuning job $id: rank \\d frees its device memory after"),
		"$how: before any rank freed the memory the others mapped, at once (the rank that stopped stopped the others)");
}
stopped_job('killed-ipc', 'terminate');
stopped_job('cancelled-ipc', 'cancel');

# more ranks than GPUs: ranks share them (rank r on GPU r mod 2), and map each other's
# memory on one GPU and across; with four ranks the order of the sums shows in their bits
$node->append_conf('postgresql.conf', "dolly.train_workers = 4\n");
$node->reload;
my ($id4, $four) = same_bits('four', ', zero_stage => 1');
my ($state4, $loss4, $err4) = split /\|/, $four;
ok($node->log_contains('fine-tuning rank 3 of 4 trains on cuda:1')
	  && $node->log_contains('fine-tuning rank 2 of 4 trains on cuda:0'), 'two ranks on each GPU');
cmp_ok(abs($loss4 - $loss2), '<', 1e-2 * abs($loss2), "the evaluation loss of two ranks' run ($loss4 vs $loss2)");
$node->append_conf('postgresql.conf', "dolly.train_workers = 2\n");
$node->reload;

$node->append_conf('postgresql.conf', "dolly.device = 'cpu'\n");
$node->reload;
$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM dolly_server WHERE device <> 'cpu'")
  or die 'the models did not move back to the CPU';
is($node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'dolly model server'"),
	1, "and GPU 1's server stopped");
isnt($node->safe_psql('postgres',
		"SELECT dolly_generate('Spell the number 3', model => 'tuned', max_new_tokens => 8, do_sample => false)"),
	undef, 'the CPU serves the model the GPU trained');

$node->stop;

# GPU 1 has no memory left: its server cannot load the model, and leaves the requests it
# took to GPU 0's, which answers them all
$ENV{EMU_GPU_FULL} = 1;
my $full = cluster('gpu1_full', 'cuda');
$full->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM pg_stat_activity WHERE backend_type = 'dolly model server'")
  or die 'no second model server';
is($full->safe_psql('postgres', "SELECT string_agg(device, ',') FROM dolly_server"), 'cuda:0',
	'a GPU without room for the model holds none');
is(four_at_once($full, $sql, $cpu), 4, 'four concurrent clients get the greedy text from the other GPU');
ok($full->log_contains('out of GPU memory on cuda:1: .* MB needed, .* MB free')
	  && $full->log_contains('the other model servers take this one.s requests'),
	'the full GPU says how much it lacked, and hands its requests over');
$full->stop;
delete $ENV{EMU_GPU_FULL};

# one GPU, two ranks on it: they map each other's memory too (no peer access needed), and
# train what they train through host memory
$ENV{EMU_GPUS} = 1;
$node = cluster('one_gpu', 'cuda');
$node->append_conf('postgresql.conf', "dolly.train_workers = 2\n");
$node->reload;
$node->safe_psql('postgres', q{
CREATE TABLE records AS
SELECT 'Spell the number ' || i AS instruction, 'It is ' || i || '.' AS response
  FROM generate_series(1, 16) i;
});
switch($no_peer, 1);
same_bits('one-gpu', ', zero_stage => 1');
switch($no_peer, 0);
ok($node->log_contains('fine-tuning rank 1 of 2 trains on cuda:0'), 'both ranks train on the one GPU');
$node->stop;

# no GPU at all: dolly.device = cuda is an ERROR with a hint, and the CPU still serves
$ENV{EMU_GPUS} = 0;
my $nogpu = cluster('no_gpu', 'cuda');
($ret, $out, $err) = $nogpu->psql('postgres', $sql);
like($err, qr/no CUDA GPU is visible/, 'without a GPU, dolly.device = cuda says so');
$nogpu->append_conf('postgresql.conf', "dolly.device = 'cpu'\n");
$nogpu->reload;
$nogpu->poll_query_until('postgres', $sql, $cpu) or die 'the CPU did not take over';
pass('and the CPU serves once dolly.device = cpu');
$nogpu->stop;
done_testing();
