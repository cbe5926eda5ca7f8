# 007_security.pl: what an ordinary role can try, and what stops it.
# - A dolly_trainer member who hijacks an operator (in her session's search_path, or her
#   role's) does not become a superuser through dolly_cancel_job or the job worker.
# - Models have owners: a fine-tuned model is served only to its owner, superusers and the
#   roles it is granted to, is listed only to them, and is no one else's base model;
#   directories an administrator placed are usable once registered and granted;
#   dolly.model is everyone's; the model server refuses a registered model whose directory
#   was replaced; a dropped model's files go at commit.
# - dolly_jobs is a security barrier, dolly_job_progress shows one's own jobs, and both
#   survive DROP ROLE of a job's role.
# - A role that cannot log in cannot leak job slots; a job whose transaction commits after
#   more than a minute still runs, a rolled-back one frees its slot.
# - A save's temporary directory is no model name and is removed at restart.
# - Huge arguments are refused before they are copied.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use DollyTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my ($node, $models) = dolly_cluster('security', models => [ 'gptj-f32', 'neox-par-f32', 'neox-seq-f32' ]);
$node->safe_psql('postgres', q{
CREATE ROLE alice LOGIN IN ROLE dolly_trainer;
CREATE ROLE bob LOGIN IN ROLE dolly_trainer;
CREATE ROLE carol LOGIN IN ROLE dolly_trainer;
CREATE SCHEMA alice AUTHORIZATION alice;
CREATE TABLE alice.records (instruction text, response text);
ALTER TABLE alice.records OWNER TO alice;
INSERT INTO alice.records SELECT 'Say ' || i, 'Number ' || i FROM generate_series(1, 16) i;
CREATE TABLE bob_records (instruction text, response text);
ALTER TABLE bob_records OWNER TO bob;
INSERT INTO bob_records SELECT 'Say ' || i, 'Number ' || i FROM generate_series(1, 16) i;
GRANT SELECT ON bob_records TO dolly_trainer;
});

sub as
{
	my ($role, $sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', $sql, extra_params => [ '-U', $role ]);
	return ($out, $err);
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
is(wait_job($node, $job), 'succeeded', 'her job runs');
is(is_superuser('alice'), 'f', 'the job worker does not run her operator as a superuser');

# the session variant: dolly_cancel_job with her operator first in search_path
$node->safe_psql('postgres', 'ALTER ROLE alice NOSUPERUSER');
as('alice', "SET search_path = alice, pg_catalog; SELECT public.dolly_cancel_job($job)");
is(is_superuser('alice'), 'f', 'dolly_cancel_job does not run her operator as a superuser');

$node->safe_psql('postgres', 'ALTER ROLE alice RESET search_path');

# --- models have owners and grants
my $gen = "SELECT dolly_generate('Say 3', max_new_tokens => 4, do_sample => false";
is($node->safe_psql('postgres', "SELECT owner || ' ' || job || ' ' || (size_bytes > 0) FROM dolly_models WHERE name = 'alice-model'",
		extra_params => [ '-U', 'alice' ]),
	"alice $job true", 'her fine-tuned model is registered as hers, with its job and size');
my ($out, $e) = as('bob', "$gen, model => 'alice-model')");
like($e, qr/model "alice-model" is not registered, or the current role may not use it/, 'bob may not generate with it');
($out, $e) = as('bob', "SELECT dolly_tokenize('Say 3', model => 'alice-model')");
like($e, qr/may not use it/, 'nor tokenize with it');
($out, $e) = as('bob', "SELECT dolly_finetune('bob_records', 'bob-model', base_model => 'alice-model')");
like($e, qr/may not use it/, 'nor fine-tune it further');
is((as('bob', "SELECT count(*) FROM dolly_models WHERE name = 'alice-model'"))[0], '0', 'nor see it in dolly_models');
($out, $e) = as('bob', "SELECT dolly_grant_model('alice-model', 'bob')");
like($e, qr/may not use it/, 'nor grant it to himself');
($out, $e) = as('bob', "SELECT dolly_drop_model('alice-model')");
like($e, qr/may not use it/, 'nor drop it');
($out, $e) = as('alice', "$gen, model => 'alice-model')");
is($e, '', 'alice generates with her model');
($out, $e) = as('alice', "SELECT count(*) FROM dolly_server WHERE model = 'alice-model'");
is($out, '1', 'and sees it loaded') or diag($e);
is((as('bob', "SELECT string_agg(model, ',') FROM dolly_server"))[0], 'gptj-f32', 'bob sees only dolly.model loaded');

# grants
as('alice', "SELECT dolly_grant_model('alice-model', 'bob')");
($out, $e) = as('bob', "$gen, model => 'alice-model')");
is($e, '', 'granted, bob may use it');
is((as('bob', "SELECT owner || ' ' || (granted_to IS NULL) FROM dolly_models WHERE name = 'alice-model'"))[0],
	'alice true', 'and sees it, but not to whom it is granted');
is((as('alice', "SELECT granted_to FROM dolly_models WHERE name = 'alice-model'"))[0], '{bob}', 'its owner sees the grants');
($out, $e) = as('bob', "SELECT dolly_grant_model('alice-model', 'carol')");
like($e, qr/permission denied to grant model "alice-model"/, 'a grantee may not grant it on');
as('alice', "SELECT dolly_revoke_model('alice-model', 'bob')");
($out, $e) = as('bob', "$gen, model => 'alice-model')");
like($e, qr/may not use it/, 'revoked, bob may not use it again');

# directories an administrator placed, and dolly.model
($out, $e) = as('bob', "$gen, model => 'neox-par-f32')");
like($e, qr/model "neox-par-f32" is not registered/, 'an unregistered directory is not served to ordinary roles');
($out, $e) = as('bob', "SELECT dolly_register_model('neox-par-f32')");
like($e, qr/permission denied for function dolly_register_model/, 'ordinary roles may not register models');
$node->safe_psql('postgres', "SELECT dolly_register_model('neox-par-f32'); SELECT dolly_grant_model('neox-par-f32', 'public')");
($out, $e) = as('bob', "$gen, model => 'neox-par-f32')");
is($e, '', 'registered and granted to PUBLIC, every role may use it');
($out, $e) = as('bob', "$gen)");
is($e, '', 'dolly.model is everyone\'s');
($out, $e) = as('bob', "$gen, model => 'gptj-f32')");
is($e, '', 'also by its name');

# the server does not trust a name: a registered directory replaced on disk is refused
$node->safe_psql('postgres', "SELECT dolly_register_model('neox-seq-f32'); SELECT dolly_grant_model('neox-seq-f32', 'public')");
($out, $e) = as('bob', "$gen, model => 'neox-seq-f32')");
is($e, '', 'a registered model is served');
rename("$models/neox-seq-f32", "$models/neox-seq-old") or die;
system('cp', '-r', "$models/neox-seq-old", "$models/neox-seq-f32") == 0 or die;
($out, $e) = as('bob', "$gen, model => 'neox-seq-f32')");
like($e, qr/model "neox-seq-f32" has changed since it was registered.*\n.*HINT:  A superuser registers it again/,
	'its directory replaced, the model server refuses it');
$node->safe_psql('postgres', "SELECT dolly_register_model('neox-seq-f32')");
($out, $e) = as('bob', "$gen, model => 'neox-seq-f32')");
is($e, '', 'registered again, it is served again, with its grants');

# dropping
($out, $e) = as('alice', "BEGIN; SELECT dolly_drop_model('alice-model'); ROLLBACK");
ok(-d "$models/alice-model", 'a drop rolled back keeps the model');
as('alice', "SELECT dolly_drop_model('alice-model')");
ok(!-e "$models/alice-model", 'a dropped fine-tuned model loses its files');
is((as('alice', "SELECT count(*) FROM dolly_models WHERE name = 'alice-model'"))[0], '0', 'and its entry');
$node->safe_psql('postgres', "SELECT dolly_drop_model('neox-par-f32')");
ok(-d "$models/neox-par-f32", 'a dropped base model keeps the administrator\'s files');

# --- jobs: a security barrier, one's own progress, and DROP ROLE
my ($running) = as('alice', "SELECT dolly_finetune('alice.records', 'long-model', epochs => 10000, batch_size => 1)");
$node->poll_query_until('postgres', "SELECT phase = 'training' FROM dolly_job_progress() WHERE id = $running")
  or die 'the long job does not train';
$node->safe_psql('postgres', 'CREATE SCHEMA bob AUTHORIZATION bob');
as('bob', q{CREATE FUNCTION bob.leak(text) RETURNS boolean LANGUAGE plpgsql COST 0.0000001 AS $$
BEGIN RAISE NOTICE 'leaked %', $1; RETURN true; END $$});
($out, $e) = as('bob', 'SELECT count(*) FROM dolly_jobs WHERE bob.leak(source) AND bob.leak(options::text)');
unlike($e, qr/alice\.records|long-model/, 'a cheap function in WHERE sees no other role\'s job');
is($out, '0', 'bob sees none of alice\'s jobs');
is((as('bob', 'SELECT count(*) FROM dolly_job_progress()'))[0], '0', 'nor their progress');
is((as('alice', "SELECT count(*) FROM dolly_job_progress() WHERE id = $running"))[0], '1', 'alice sees hers');
as('alice', "SELECT dolly_cancel_job($running)");
is(wait_job($node, $running), 'cancelled', 'the long job is cancelled');

$node->safe_psql('postgres', q{CREATE TABLE carol_records (instruction text, response text);
	INSERT INTO carol_records VALUES ('Say 1', 'One'), ('Say 2', 'Two');
	ALTER TABLE carol_records OWNER TO carol});
my ($carols) = as('carol', "SELECT dolly_finetune('carol_records', 'carol-model', epochs => 1, eval_fraction => 0)");
is(wait_job($node, $carols), 'succeeded', 'carol\'s job runs');
$node->safe_psql('postgres', 'DROP OWNED BY carol; DROP ROLE carol');
like($node->safe_psql('postgres', "SELECT role FROM dolly_jobs WHERE id = $carols"), qr/^unknown \(OID=\d+\)$/,
	'dolly_jobs still reads after DROP ROLE of a job\'s role');

# --- job slots: a role that cannot log in, a late commit, a rollback
$node->safe_psql('postgres', 'GRANT USAGE ON SCHEMA alice TO dolly_trainer; GRANT SELECT ON alice.records TO dolly_trainer');
my $refused = 0;
for (1 .. 9)
{
	($out, $e) = as('alice', "SET ROLE dolly_trainer; SELECT dolly_finetune('alice.records', 'nologin-model')");
	$refused++ if $e =~ /role "dolly_trainer" cannot log in, so a fine-tuning job cannot run as it/;
}
is($refused, 9, 'a role that cannot log in is refused at submission');
$node->safe_psql('postgres', 'CREATE DATABASE closed');
$node->safe_psql('closed', q{CREATE EXTENSION dolly;
	CREATE TABLE records (instruction text, response text); ALTER TABLE records OWNER TO alice});
my $inside = $node->background_psql('closed', extra_params => [ '-U', 'alice' ]);
$node->safe_psql('postgres', 'ALTER DATABASE closed ALLOW_CONNECTIONS false');
$inside->{stdin} .= "\\set ON_ERROR_STOP 0\nSELECT dolly_finetune('records', 'closed-model');\nSELECT 'after';\n";
$inside->{run}->pump until $inside->{stdout} =~ /after/ || $inside->{timeout}->is_expired;
like($inside->{stderr}, qr/database "closed" does not allow connections, so a fine-tuning job cannot run in it/,
	'nor a job in a database that no longer allows connections');
$inside->quit;
my $slow = $node->background_psql('postgres', extra_params => [ '-U', 'alice' ]);
$slow->query_safe('BEGIN');
my $late = $slow->query_safe("SELECT dolly_finetune('alice.records', 'late-model', epochs => 1, batch_size => 4)");
my $late_start = time;
like($late, qr/^\d+$/, 'a job is submitted in a transaction left open, after nine refusals');
my $rolled = $node->background_psql('postgres', extra_params => [ '-U', 'alice' ]);
$rolled->query_safe('BEGIN');
my $gone = $rolled->query_safe("SELECT dolly_finetune('alice.records', 'never-model')");
$rolled->query_safe('ROLLBACK');
$rolled->quit;
$node->poll_query_until('postgres', "SELECT count(*) = 1 FROM dolly_job_progress()")
  or die "the rolled-back job's slot is not freed";
pass('a rolled-back job frees its slot');

# --- a save's temporary directory
mkdir "$models/.half.tmp-4242";
open(my $fh, '>', "$models/.half.tmp-4242/config.json") or die;
close $fh;
($out, $e) = as('alice', "$gen, model => '.half.tmp-4242')");
like($e, qr/invalid model name/, 'a save\'s temporary directory is no model name');

# --- huge arguments are refused before they are copied
my $big = $node->background_psql('postgres', extra_params => [ '-U', 'bob' ]);
my $pid = $big->query_safe('SELECT pg_backend_pid()');
# the backend's peak memory: the two 300 MB arguments are the executor's; dolly adds no copy
sub peak_kb { open(my $f, '<', "/proc/$_[0]/status") or die; my ($kb) = map { /^VmHWM:\s+(\d+)/ ? $1 : () } <$f>; return $kb; }
my $before = peak_kb($pid);
my ($stdout, $stderr);
$big->{stdin} .= "\\set ON_ERROR_STOP 0\nSELECT dolly_generate(repeat('a', 300000000), repeat('b', 300000000));\nSELECT 'after';\n";
$big->{run}->pump until $big->{stdout} =~ /after/ || $big->{timeout}->is_expired;
like($big->{stderr}, qr/instruction of 300000000 bytes is longer than the 65536 bytes a request may carry/,
	'a huge instruction is refused, naming the limit');
my $grown = peak_kb($pid) - $before;
cmp_ok($grown, '<', 900000, 'and is not copied (it was three times: 2.3 GB more)') or diag("peak grew by $grown kB");
$big->quit;

# the late transaction commits more than a minute after its job was submitted
sleep(1) while time - $late_start < 65;
$slow->query_safe('COMMIT');
$slow->quit;
is(wait_job($node, $late), 'succeeded', 'a job whose transaction commits after more than a minute runs');

$node->restart;
ok(!-e "$models/.half.tmp-4242", 'a save\'s temporary directory is removed at restart');

# receiving a model from another node (Citus): superusers only; file names cannot leave the
# model's directory; a piece whose SHA-256 does not match is not written
($out, $e) = as('alice', "SELECT dolly_receive_model_begin('stolen')");
like($e, qr/permission denied for function dolly_receive_model_begin/, 'a role cannot receive a model');
($out, $e) = as('alice', "SELECT * FROM dolly_copy_model_to_workers('gptj-f32')");
like($e, qr/permission denied for function dolly_copy_model_to_workers/, 'nor send one');
$node->safe_psql('postgres', "SELECT dolly_receive_model_begin('arriving')");
for my $file ('../../escape', '.hidden', 'a/b')
{
	(undef, $out, $e) = $node->psql('postgres',
		"SELECT dolly_receive_model_part('arriving', '$file', 0, 'x'::bytea, sha256('x'::bytea))");
	like($e, qr/is not a file name of a model directory/, "a piece for \"$file\" is refused");
}
(undef, $out, $e) = $node->psql('postgres',
	"SELECT dolly_receive_model_part('arriving', 'config.json', 0, 'x'::bytea, sha256('y'::bytea))");
like($e, qr/does not match its SHA-256/, 'a piece that does not match its digest is refused');
ok(!-e "$models/.arriving.incoming/config.json", 'and not written');
(undef, $out, $e) = $node->psql('postgres',
	"SELECT dolly_receive_model_done('arriving', 'alice', NULL, '{config.json}', '{10}')");
like($e, qr/arrived with 0 bytes of 10/, 'a model whose files did not all arrive is not installed');
ok(!-e "$models/arriving", 'and nothing is in place');

done_testing();
