# 010_encodings.pl: databases that are not UTF-8. In SQL_ASCII a record that is not UTF-8
# is skipped and counted, not the end of the job; in LATIN1 an answer's characters that
# LATIN1 lacks become "?" instead of failing the call.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use DollyTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my ($node) = dolly_cluster('encodings', models => [ 'gptj-f32' ]);
$node->safe_psql('postgres', q{
CREATE DATABASE ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;
CREATE DATABASE latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;
});

# SQL_ASCII: one record of Latin-1 bytes among UTF-8 ones
$node->safe_psql('ascii', q{
CREATE EXTENSION dolly;
CREATE TABLE records (instruction text, response text);
INSERT INTO records SELECT 'Say ' || i, 'Number ' || i FROM generate_series(1, 8) i;
INSERT INTO records VALUES (E'Caf\351 in Latin-1', 'not UTF-8');
});
my $job = $node->safe_psql('ascii', "SELECT dolly_finetune('records', 'ascii-model', epochs => 1, eval_fraction => 0)");
$node->poll_query_until('ascii', "SELECT state NOT IN ('queued', 'running') FROM dolly_jobs WHERE id = $job")
  or die 'the job did not finish';
is($node->safe_psql('ascii', "SELECT state || ' ' || records || ' ' || skipped || ' ' || coalesce(error, '') FROM dolly_jobs WHERE id = $job"),
	'succeeded 8 1 ', 'in SQL_ASCII a record that is not UTF-8 is skipped and counted');

# LATIN1: the tokens of "a€b" (from a UTF-8 database) decode to "a?b"
my $ids = $node->safe_psql('postgres', "SELECT dolly_tokenize('a€b')");
$node->safe_psql('latin1', 'CREATE EXTENSION dolly');
is($node->safe_psql('latin1', "SELECT dolly_detokenize('$ids')"), 'a?b',
	'in LATIN1 a character LATIN1 lacks becomes "?"');
is($node->safe_psql('latin1', "SELECT convert_to(dolly_detokenize(dolly_tokenize('caf' || chr(233))), 'LATIN1')"),
	'\\x636166e9', 'and one it has is kept');
my ($ret, $out, $err) = $node->psql('latin1',
	"SELECT dolly_generate('Say 3', max_new_tokens => 16, do_sample => false) IS NOT NULL");
is($out, 't', 'generation answers in LATIN1');

done_testing();
