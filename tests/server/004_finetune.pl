# 004_finetune.pl: dolly_finetune from a table: who may run it, what it reads (the caller's
# privileges and row-level security), bad tables and options, the job's life (progress,
# success, the model served afterwards, cancellation, a restart in the middle).
use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use FindBin;
use lib $FindBin::Bin;
use DollyTest;
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

my $node = PostgreSQL::Test::Cluster->new('finetune');
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
CREATE ROLE mallory LOGIN;
CREATE TABLE records (id int, owner text, instruction text, context text, response text);
INSERT INTO records
SELECT i, CASE WHEN i % 4 = 0 THEN 'bob' ELSE 'alice' END,
	   'Say the number ' || i, CASE WHEN i % 2 = 0 THEN 'even' END, 'The number is ' || i
  FROM generate_series(1, 40) i;
INSERT INTO records VALUES (100, 'alice', NULL, NULL, 'no instruction'),
						   (101, 'alice', 'no response', NULL, '');
ALTER TABLE records ENABLE ROW LEVEL SECURITY;
CREATE POLICY mine ON records FOR SELECT USING (owner = current_user);
GRANT SELECT ON records TO alice;
CREATE TABLE secret (instruction text, response text);
CREATE TABLE numbers (instruction int, response text);
GRANT SELECT ON numbers TO alice;
});

# who may fine-tune
my ($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_finetune('records', 'm1')", extra_params => [ '-U', 'mallory' ]);
like($err, qr/permission denied for function dolly_finetune/, 'a role outside dolly_trainer may not fine-tune');

# what the table must be
($ret, $out, $err) = $node->psql('postgres', "SELECT dolly_finetune('nope', 'm1')", extra_params => [ '-U', 'alice' ]);
like($err, qr/relation "nope" does not exist/, 'a missing table');
($ret, $out, $err) = $node->psql('postgres', "SELECT dolly_finetune('secret', 'm1')", extra_params => [ '-U', 'alice' ]);
like($err, qr/permission denied for column "instruction"/, 'a table the caller may not read');
($ret, $out, $err) = $node->psql('postgres', "SELECT dolly_finetune('numbers', 'm1')", extra_params => [ '-U', 'alice' ]);
like($err, qr/instruction column "instruction" has type integer, not text/, 'a column of the wrong type');
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_finetune('records', 'm1', response_column => 'answer')", extra_params => [ '-U', 'alice' ]);
like($err, qr/column "answer" of relation "records" does not exist/, 'a missing column');
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_finetune('records', '../evil')", extra_params => [ '-U', 'alice' ]);
like($err, qr/invalid model name/, 'an output name with a path is refused');
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_finetune('records', 'gptj-f32')", extra_params => [ '-U', 'alice' ]);
like($err, qr/model "gptj-f32" already exists/, 'an existing model is never overwritten');
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_finetune('records', 'm1', epochs => 0)", extra_params => [ '-U', 'alice' ]);
like($err, qr/epochs must be between 1 and 10000/, 'absurd options get an error naming them');
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_finetune('records', 'm1', learning_rate => -1)", extra_params => [ '-U', 'alice' ]);
like($err, qr/learning_rate must be between/, 'a negative learning rate');

# a job: alice sees her rows only (row-level security), bad records are skipped and counted
my $id = $node->safe_psql('postgres',
	"SELECT dolly_finetune('records', 'alice-model', epochs => 2, batch_size => 4, learning_rate => 1e-3, warmup_steps => 2)",
	extra_params => [ '-U', 'alice' ]);
like($id, qr/^\d+$/, 'dolly_finetune returns a job id at once');
is(wait_job($node, $id, "state, records, skipped, coalesce(error, '')"), 'succeeded|30|2|', 'the job read the 30 rows alice may see and skipped the 2 bad ones');
ok(-f "$models/alice-model/model.safetensors" && -f "$models/alice-model/tokenizer.json"
	  && -f "$models/alice-model/config.json", 'the model was written as a Hugging Face directory');
ok(!glob("$models/alice-model.tmp*"), 'and nothing half-written is left beside it');
my ($loss, $steps) = split /\|/, $node->safe_psql('postgres',
	"SELECT train_loss IS NOT NULL AND eval_loss IS NOT NULL, step = total_steps FROM dolly_jobs WHERE id = $id");
is("$loss|$steps", 't|t', 'the job reports its losses and finished every step');
is($node->safe_psql('postgres', "SELECT count(*) FROM dolly_jobs", extra_params => [ '-U', 'mallory' ]),
	'0', "others do not see alice's jobs");
$node->safe_psql('postgres',
	"SELECT dolly_generate('Say the number 7', model => 'alice-model', do_sample => false, max_new_tokens => 8)",
	extra_params => [ '-U', 'alice' ]);
is($node->safe_psql('postgres', "SELECT requests FROM dolly_server WHERE model = 'alice-model'"), '1',
	'the fine-tuned model is served by dolly_generate');

# cancellation of a running job: no model appears
$id = $node->safe_psql('postgres',
	"SELECT dolly_finetune('records', 'cancelled-model', epochs => 10000, batch_size => 1, learning_rate => 1e-4)",
	extra_params => [ '-U', 'alice' ]);
$node->poll_query_until('postgres', "SELECT state = 'running' AND step > 0 FROM dolly_jobs WHERE id = $id")
  or die 'job did not start';
is($node->safe_psql('postgres', "SELECT dolly_cancel_job($id)", extra_params => [ '-U', 'alice' ]),
	't', 'dolly_cancel_job asks the job to stop');
like(wait_job($node, $id, "state, records, skipped, coalesce(error, '')"), qr/^cancelled/, 'the job ends as cancelled');
ok(!-e "$models/cancelled-model", 'and writes no model');
($ret, $out, $err) = $node->psql('postgres', "SELECT dolly_cancel_job($id)", extra_params => [ '-U', 'mallory' ]);
like($err, qr/permission denied/, "others may not cancel alice's jobs");

# a restart while a job runs: it shows as failed, never as running
$id = $node->safe_psql('postgres',
	"SELECT dolly_finetune('records', 'restarted-model', epochs => 10000, batch_size => 1)",
	extra_params => [ '-U', 'alice' ]);
$node->poll_query_until('postgres', "SELECT state = 'running' AND step > 0 FROM dolly_jobs WHERE id = $id")
  or die 'job did not start';
$node->restart;
is($node->safe_psql('postgres', "SELECT state FROM dolly_jobs WHERE id = $id"), 'failed',
	'after a restart the job shows as failed');
ok(!-e "$models/restarted-model", 'and left no model');

$node->stop;
done_testing();
