# 007_security.pl: what an ordinary role can try, and what stops it. A dolly_trainer member
# who hijacks an operator (in her session's search_path, or her role's) does not become a
# superuser through dolly_cancel_job or the job worker.
use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $root = abs_path(dirname(__FILE__) . '/../..');
my $models = PostgreSQL::Test::Utils::tempdir();
for my $m ('gptj-f32', 'neox-par-f32')
{
	mkdir "$models/$m";
	system('cp', glob("$root/tests/fixtures/$m/*"), "$models/$m/") == 0 or die "cp $m";
}

my $node = PostgreSQL::Test::Cluster->new('security');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'dolly'
dolly.model_dir = '$models'
dolly.model = 'gptj-f32'
dolly.threads = 2
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION dolly;
CREATE ROLE alice LOGIN IN ROLE dolly_trainer;
CREATE ROLE bob LOGIN;
CREATE SCHEMA alice AUTHORIZATION alice;
CREATE TABLE alice.records (instruction text, response text);
ALTER TABLE alice.records OWNER TO alice;
INSERT INTO alice.records SELECT 'Say ' || i, 'Number ' || i FROM generate_series(1, 16) i;
});

sub as
{
	my ($role, $sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', $sql, extra_params => [ '-U', $role ]);
	return ($out, $err);
}

sub wait_job
{
	my ($id) = @_;
	$node->poll_query_until('postgres',
		"SELECT state NOT IN ('queued', 'running') FROM dolly_jobs WHERE id = $id")
	  or die "job $id did not finish";
	return $node->safe_psql('postgres', "SELECT state FROM dolly_jobs WHERE id = $id");
}

sub is_superuser
{
	return $node->safe_psql('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = '$_[0]'");
}

# alice's own = on bigint and now(), which make her a superuser when a superuser runs them
as('alice', q{
CREATE FUNCTION alice.escalate(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
	ALTER ROLE alice SUPERUSER;
	RETURN $1 OPERATOR(pg_catalog.=) $2;
EXCEPTION WHEN insufficient_privilege THEN RETURN $1 OPERATOR(pg_catalog.=) $2;
END $$;
CREATE OPERATOR alice.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = alice.escalate);
CREATE FUNCTION alice.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN
	ALTER ROLE alice SUPERUSER;
	RETURN pg_catalog.now();
EXCEPTION WHEN insufficient_privilege THEN RETURN pg_catalog.now();
END $$;
});

# the worker variant: alice's role-level search_path is what the job's worker connects with
$node->safe_psql('postgres', 'ALTER ROLE alice SET search_path = alice, pg_catalog');
my ($job, $err) = as('alice', "SELECT public.dolly_finetune('alice.records', 'alice-model', epochs => 1, batch_size => 4)");
like($job, qr/^\d+$/, 'alice submits a job') or diag($err);
is(wait_job($job), 'succeeded', 'her job runs');
is(is_superuser('alice'), 'f', 'the job worker does not run her operator as a superuser');

# the session variant: dolly_cancel_job with her operator first in search_path
$node->safe_psql('postgres', 'ALTER ROLE alice NOSUPERUSER');
as('alice', "SET search_path = alice, pg_catalog; SELECT public.dolly_cancel_job($job)");
is(is_superuser('alice'), 'f', 'dolly_cancel_job does not run her operator as a superuser');

done_testing();
