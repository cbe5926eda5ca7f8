# 001_model_server.pl: the model server worker's life cycle, and loading without preload.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

# Wait until the model server's pid differs from $old (or appears), return it.
sub server_pid
{
	my ($node, $old) = @_;
	$old //= '';
	for (1 .. 100)
	{
		my $pid = $node->safe_psql('postgres',
			"SELECT pid FROM pg_stat_activity WHERE backend_type = 'dolly model server'");
		return $pid if $pid ne '' && $pid ne $old;
		select(undef, undef, undef, 0.1);
	}
	return '';
}

my $node = PostgreSQL::Test::Cluster->new('preloaded');
$node->init;
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'dolly'\ndolly.threads = 1\n");
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION dolly');

my $pid = server_pid($node);
isnt($pid, '', 'model server shows in pg_stat_activity');
is($node->safe_psql('postgres', "SELECT count(*) FROM dolly_backends()"), '2',
	'dolly_backends lists cpu and cuda');
is($node->safe_psql('postgres', "SELECT devices FROM dolly_backends() WHERE backend = 'cpu'"),
	'1', 'cpu backend uses dolly.threads');

# SIGTERM: the worker exits, the postmaster starts a new one, the server keeps serving
kill 'TERM', $pid;
my $newpid = server_pid($node, $pid);
isnt($newpid, '', 'model server restarted after SIGTERM');
isnt($newpid, $pid, 'with a new pid');
is($node->safe_psql('postgres', "SELECT count(*) FROM dolly_backends()"), '2',
	'restarted server answers');
ok($node->log_contains('terminating background worker "dolly model server" due to administrator command'),
	'SIGTERM logged as a clean termination');

# reload changes dolly.threads without a restart
$node->append_conf('postgresql.conf', "dolly.threads = 2\n");
$node->reload;
my $threads;
for (1 .. 50)
{
	$threads = $node->safe_psql('postgres', "SELECT devices FROM dolly_backends() WHERE backend = 'cpu'");
	last if $threads eq '2';
	select(undef, undef, undef, 0.1);
}
is($threads, '2', 'dolly.threads follows a configuration reload');

# a clean shutdown with the worker running, and no crash along the way
$node->stop('fast');
ok(!$node->log_contains('terminated by signal'), 'no process crashed');
ok(!$node->log_contains('was terminated by'), 'no abnormal termination');
$node->start;
isnt(server_pid($node), '', 'model server comes back after a restart');
$node->stop;

# without shared_preload_libraries, dolly refuses to load with a hint
my $plain = PostgreSQL::Test::Cluster->new('plain');
$plain->init;
$plain->start;
my ($ret, $stdout, $stderr) = $plain->psql('postgres', 'CREATE EXTENSION dolly');
isnt($ret, 0, 'CREATE EXTENSION fails without preload');
like($stderr, qr/dolly must be loaded via shared_preload_libraries/, 'with a clear message');
like($stderr, qr/HINT:  Add dolly to shared_preload_libraries/, 'and a hint');
$plain->stop;

done_testing();
