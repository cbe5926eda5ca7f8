# 002_serving.pl: many sessions share one model server: concurrent greedy requests get the
# answers they get alone, and dolly.model can be switched with a reload.
use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $fixtures = abs_path(dirname(__FILE__) . '/../fixtures');
my $clients = 16;

my $node = PostgreSQL::Test::Cluster->new('serving');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'dolly'
dolly.model_dir = '$fixtures'
dolly.model = 'gptj-f32'
dolly.max_batch = $clients
dolly.threads = 2
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION dolly');

sub generate_sql
{
	my ($i, $model) = @_;
	my $m = $model ? ", model => '$model'" : '';
	return "SELECT dolly_generate_raw('Request number $i: tell me something.'$m, "
	  . "max_new_tokens => 40, do_sample => false)";
}

# every prompt alone, one after the other
my @alone = map { $node->safe_psql('postgres', generate_sql($_)) } 1 .. $clients;
is(scalar(grep { $_ ne '' } @alone), $clients, 'every prompt gets an answer alone');

# all together: the clients queue behind an advisory lock that is released at once
my $locker = $node->background_psql('postgres');
$locker->query_safe('SELECT pg_advisory_lock(42)');
my (@h, @out, @err);
for my $i (1 .. $clients)
{
	# the lock is taken when the FROM row is produced, before the function runs
	my $sql = generate_sql($i) . ' FROM (SELECT pg_advisory_lock_shared(42)) AS l';
	push @h, IPC::Run::start(
		[ 'psql', '-X', '-A', '-t', '-q', '-d', $node->connstr('postgres'), '-c', $sql ],
		'>', \$out[$i], '2>', \$err[$i]);
}
# wait until every client waits for the lock, then let them all go
$node->poll_query_until('postgres',
	"SELECT count(*) = $clients FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
  or die 'clients did not reach the lock';
$locker->query_safe('SELECT pg_advisory_unlock(42)');
$_->finish for @h;

my $same = 0;
for my $i (1 .. $clients)
{
	chomp(my $got = $out[$i] // '');
	$same++ if $got eq $alone[$i - 1];
	diag("client $i: $err[$i]") if $err[$i];
}
is($same, $clients, "$clients concurrent clients get exactly their own greedy answers");
cmp_ok($node->safe_psql('postgres', 'SELECT requests FROM dolly_server'), '>=', 2 * $clients,
	'the server counted every request');

# switch dolly.model with a reload: the next call uses the new model, no restart
my $neox = $node->safe_psql('postgres', generate_sql(1, 'neox-par-f32'));
isnt($neox, $alone[0], 'the two models answer differently');
$node->append_conf('postgresql.conf', "dolly.model = 'neox-par-f32'\n");
$node->reload;
$node->poll_query_until('postgres', "SELECT count(*) = 1 FROM dolly_server WHERE model = 'neox-par-f32'")
  or die 'new model not loaded';
is($node->safe_psql('postgres', generate_sql(1)), $neox, 'after a reload, dolly.model serves the new model');
$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM dolly_server WHERE model = 'gptj-f32'")
  or die 'old model still loaded';
pass('the old default model was unloaded');

# a broken dolly.model: the server stays up and says why
$node->append_conf('postgresql.conf', "dolly.model = 'tokenizer'\n");
$node->reload;
my ($ret, $stdout, $stderr);
for (1 .. 50)
{
	($ret, $stdout, $stderr) = $node->psql('postgres', generate_sql(1));
	last if $stderr =~ /config\.json/;
	select(undef, undef, undef, 0.1);
}
like($stderr, qr/cannot open "tokenizer\/config\.json"/, 'a model directory without config.json gets a clear error');
is($node->safe_psql('postgres', generate_sql(1, 'neox-par-f32')), $neox, 'other models still serve');

$node->stop;
done_testing();
