# 003_cancel.pl: a session that stops waiting (statement_timeout, pg_cancel_backend, a closed
# connection) gets its ERROR at once and the server drops its sequence; the others finish
# with their own answers. A model server killed while clients wait gives them errors, not
# hangs, and serves again after its restart.
use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use IPC::Run;
use Time::HiRes qw(time sleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $root = abs_path(dirname(__FILE__) . '/../..');
my $model = PostgreSQL::Test::Utils::tempdir() . '/slow-model';

# a random model big enough that 4000 tokens take many seconds on the CPU
system("$root/build/dolly-cli", 'init', '--arch', 'gpt_neox', '--layers', '8', '--hidden', '512',
	'--heads', '8', '--context', '4096', '--tokenizer', "$root/tests/fixtures/tokenizer/tokenizer.json",
	'--seed', '7', '--out', $model) == 0
  or BAIL_OUT('dolly-cli init failed');

my $node = PostgreSQL::Test::Cluster->new('cancel');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'dolly'
dolly.model = '$model'
dolly.max_new_tokens = 4000
dolly.max_batch = 8
dolly.threads = 2
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION dolly');

my $long = "SELECT dolly_generate_raw('long story', max_new_tokens => 4000, do_sample => false)";
sub short_sql { "SELECT dolly_generate_raw('short $_[0]', max_new_tokens => 8, do_sample => false)" }
my @short_alone = map { $node->safe_psql('postgres', short_sql($_)) } 1 .. 3;

# start psql running $sql in the background; returns the harness and refs to its output
sub start_psql
{
	my ($sql) = @_;
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start([ 'psql', '-X', '-A', '-t', '-d', $node->connstr('postgres'), '-c', $sql ],
		'>', \$out, '2>', \$err);
	return ($h, \$out, \$err);
}

# wait until n generations are active in the server
sub wait_active
{
	my ($n) = @_;
	$node->poll_query_until('postgres',
		"SELECT coalesce(sum(active_requests), 0) >= $n FROM dolly_server")
	  or die "never reached $n active requests";
}

# statement_timeout ends a long generation with the usual error, in time
my $t0 = time;
my ($ret, $stdout, $stderr) = $node->psql('postgres', "SET statement_timeout = '1s'; $long");
my $took = time - $t0;
like($stderr, qr/canceling statement due to statement timeout/, 'statement_timeout cancels a generation');
cmp_ok($took, '<', 3, "and returns at once (${took}s for a 1 s timeout)");
$node->poll_query_until('postgres', "SELECT sum(active_requests) = 0 FROM dolly_server")
  or die 'timed-out request still active';
pass('the server dropped the timed-out sequence');

# pg_cancel_backend on a long generation while short ones run beside it
my ($lh, $lout, $lerr) = start_psql($long);
wait_active(1);
my @short = map { [ start_psql(short_sql($_)) ] } 1 .. 3;
my $pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE query LIKE '%long story%' AND pid <> pg_backend_pid()");
$t0 = time;
$node->safe_psql('postgres', "SELECT pg_cancel_backend($pid)");
$lh->finish;
$took = time - $t0;
like($$lerr, qr/canceling statement due to user request/, 'pg_cancel_backend cancels a generation');
cmp_ok($took, '<', 1, "within a second (${took}s)");
my $same = 0;
for my $i (0 .. 2)
{
	my ($h, $out) = @{ $short[$i] };
	$h->finish;
	chomp(my $got = $$out);
	$same++ if $got eq $short_alone[$i];
}
is($same, 3, 'the other sessions finish with their own answers');

# a client that disappears: its sequence is dropped, not decoded to the end
($lh, $lout, $lerr) = start_psql($long);
wait_active(1);
$lh->kill_kill;
$node->poll_query_until('postgres', "SELECT sum(active_requests) = 0 FROM dolly_server")
  or die 'abandoned request still active';
pass('a closed connection drops its sequence');

# the model server dies (SIGTERM) while clients wait: errors within seconds, then service again
my @waiting = map { [ start_psql($long) ] } 1 .. 3;
wait_active(3);
my $server = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'dolly model server'");
$t0 = time;
kill 'TERM', $server;
my $errors = 0;
for my $w (@waiting)
{
	my ($h, $out, $err) = @$w;
	$h->finish;
	$errors++ if $$err =~ /dolly model server stopped while the request ran/;
}
$took = time - $t0;
is($errors, 3, 'every waiting client gets an error when the model server dies');
cmp_ok($took, '<', 3, "within seconds (${took}s)");
# the postmaster restarts the worker after bgw_restart_time; on a loaded machine that took
# 4.9 s once, about a waiting client's 5 s grace: ask once it is there
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'dolly model server' AND pid <> $server")
  or die 'the model server did not restart';
is($node->safe_psql('postgres', short_sql(1)), $short_alone[0], 'the restarted server answers');

$node->stop;
done_testing();
