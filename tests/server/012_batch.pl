# 012_batch.pl: statements with many requests in flight (dolly_generate over an array, and
# the Dolly Batch node). A cancel or statement_timeout in the middle leaves no sequence
# running in the server, every borrowed slot back in the pool, and (for a batched UPDATE)
# no row changed; LIMIT 3 generates at most 3 answers more than the look-ahead; two
# sessions batching at once each get their own answers; a pool smaller than the batch
# only narrows it. The server's trace (dolly.step_trace) shows one statement's rows decoding
# in the same passes.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use DollyTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my ($node) = dolly_cluster('batch', conf => "dolly.max_batch = 8\ndolly.request_slots = 6\n");

sub batch_sql
{
	my ($from, $to, $tokens) = @_;
	return "SELECT dolly_generate(array_agg('Say the number ' || i ORDER BY i), "
	  . "max_new_tokens => $tokens, do_sample => false) FROM generate_series($from, $to) i";
}
my $one_by_one = "SELECT array_agg(dolly_generate('Say the number ' || i, max_new_tokens => 6, do_sample => false) ORDER BY i) "
  . "FROM generate_series(1, 24) i";
my $alone = $node->safe_psql('postgres', $one_by_one);

# a long batch, cancelled while its requests run
my $long = $node->background_psql('postgres');
my $pid = $long->query_safe('SELECT pg_backend_pid()');
$long->{stdin} .= "\\set ON_ERROR_STOP 0\n" . batch_sql(1, 200, 1000) . ";\nSELECT 'after';\n";
$long->{run}->pump_nb;
$node->poll_query_until('postgres', 'SELECT coalesce(sum(active_requests), 0) >= 7 FROM dolly_server')
  or die 'the batch never had its requests in flight';
pass('a batch keeps several requests in flight');
$node->safe_psql('postgres', "SELECT pg_cancel_backend($pid)");
$long->{run}->pump until $long->{stdout} =~ /after/ || $long->{timeout}->is_expired;
like($long->{stderr}, qr/canceling statement due to user request/, 'the batch is cancelled');
$node->poll_query_until('postgres', 'SELECT coalesce(sum(active_requests), 0) = 0 FROM dolly_server')
  or die 'sequences keep running';
pass('and the server runs none of its sequences any more');

# statement_timeout in the same session: the pool came back, the batch is full again
$long->{stderr} = '';
$long->{stdin} .= "SET statement_timeout = '500ms';\n" . batch_sql(1, 5000, 1000) . ";\nRESET statement_timeout;\nSELECT 'again';\n";
$long->{run}->pump until $long->{stdout} =~ /again/ || $long->{timeout}->is_expired;
like($long->{stderr}, qr/canceling statement due to statement timeout/, 'statement_timeout stops a batch');
$node->poll_query_until('postgres', 'SELECT coalesce(sum(active_requests), 0) = 0 FROM dolly_server')
  or die 'sequences keep running after the timeout';
pass('and leaves no sequence running');
$long->quit;

# a batched UPDATE, cancelled in the middle, changes no row
$node->safe_psql('postgres', "CREATE TABLE tasks AS SELECT i AS id, 'Say the number ' || i AS q, NULL::text AS answer "
	  . "FROM generate_series(1, 1000) i");
my $upd = $node->background_psql('postgres');
$pid = $upd->query_safe('SELECT pg_backend_pid()');
$upd->{stdin} .= "\\set ON_ERROR_STOP 0\nUPDATE tasks SET answer = dolly_generate(q, max_new_tokens => 1000, do_sample => false);\nSELECT 'after';\n";
$upd->{run}->pump_nb;
$node->poll_query_until('postgres', 'SELECT coalesce(sum(active_requests), 0) >= 7 FROM dolly_server')
  or die 'the UPDATE never had its requests in flight';
$node->safe_psql('postgres', "SELECT pg_cancel_backend($pid)");
$upd->{run}->pump until $upd->{stdout} =~ /after/ || $upd->{timeout}->is_expired;
like($upd->{stderr}, qr/canceling statement due to user request/, 'a batched UPDATE is cancelled');
$upd->quit;
$node->poll_query_until('postgres', 'SELECT coalesce(sum(active_requests), 0) = 0 FROM dolly_server')
  or die 'sequences keep running after the UPDATE';
is($node->safe_psql('postgres', 'SELECT count(answer) FROM tasks'), '0', 'and changes no row, leaving no sequence running');

# LIMIT 3 over 1,000 rows: at most the look-ahead (dolly.max_batch = 8) more answers
my $before = $node->safe_psql('postgres', 'SELECT coalesce(sum(requests), 0) FROM dolly_server');
is($node->safe_psql('postgres', 'SELECT count(*) FROM (SELECT dolly_generate(q, max_new_tokens => 4, do_sample => false) '
	  . 'FROM tasks ORDER BY id LIMIT 3) s'), '3', 'LIMIT 3 returns 3 rows');
cmp_ok($node->safe_psql('postgres', "SELECT coalesce(sum(requests), 0) - $before FROM dolly_server"), '<=', 3 + 8,
	'and generates at most 3 + the look-ahead answers');

# two sessions at once, each batching more than the pool (6 slots for both) holds
my @s = map { $node->background_psql('postgres') } 1 .. 2;
$_->{stdin} .= batch_sql(1, 24, 6) . ";\nSELECT 'done';\n" for @s;
for my $h (@s)
{
	$h->{run}->pump until $h->{stdout} =~ /done/ || $h->{timeout}->is_expired;
}
for my $i (0 .. 1)
{
	my ($answers) = split /\n/, $s[$i]->{stdout};
	is($answers, $alone, "session $i gets its own answers, in order, from a shared pool");
	$s[$i]->quit;
}
is($node->safe_psql('postgres', batch_sql(1, 24, 6)), $alone, 'and so does a batch after them');

# the server's per-pass trace: one batched statement's rows decode together
my $trace = $node->data_dir . '/step_trace.csv';
$node->safe_psql('postgres', "ALTER SYSTEM SET dolly.step_trace = 'step_trace.csv'; SELECT pg_reload_conf()");
$node->poll_query_until('postgres', "SELECT (pg_stat_file('step_trace.csv', true)).size IS NOT NULL")
  or die 'the model server did not open the trace';
$node->safe_psql('postgres', "CREATE TABLE traced AS SELECT dolly_generate('Say the number ' || i, max_new_tokens => 6, "
	  . "do_sample => false) FROM generate_series(1, 6) i");
$node->safe_psql('postgres', "ALTER SYSTEM RESET dolly.step_trace; SELECT pg_reload_conf()");
# the server writes what it holds when it goes idle
my ($header, $decode, $answered);
for (1 .. 600)
{
	my @lines = split /\n/, slurp_file($trace);
	($header, $decode, $answered) = (shift @lines, 0, 0);
	for (@lines)
	{
		my @f = split /,/;
		$decode = $f[6] if $f[6] > $decode;
		$answered += $f[10];
	}
	last if $answered >= 6;
	usleep(100_000);
}
is($header, 'server,start_s,model,gap_ms,take_ms,sequences,decode_rows,prefill_tokens,step_ms,answer_ms,answered',
	'the trace starts with its header');
is($decode, 6, 'a pass of the statement decodes its 6 rows together');
is($answered, 6, 'and the trace counts its 6 answers');

done_testing();
