# 016_lora.pl: LoRA adapters through SQL. dolly_finetune(method => 'lora') trains an adapter
# (on two ranks, at ZeRO stages 0 and 2) and registers it with its base; PEFT adapters are
# registered with theirs; dolly_generate serves adapters on the base without copying it, 16
# sessions over 4 adapters and the base at once each getting its answer alone, with fewer
# adapters loaded than asked for; dolly_merge_adapter writes one as a model that answers
# alike; over a base whose tokenizer lacks Dolly's tokens, the adapter owns their rows and
# carries the tokenizer that has them, which serving uses; an adapter of another base, an adapter whose base the role may not use, bad
# options and an adapter as a base are refused with clear errors.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use DollyTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my ($node, $models) = dolly_cluster('lora',
	models => [ 'gptj-f32', 'neox-par-f32', 'gptj-f32-lora-qv', 'gptj-f32-lora-all', 'neox-par-f32-lora-qkv',
		'tokenizer-legacy' ],
	conf => "dolly.max_batch = 16\ndolly.max_loaded_adapters = 2\ndolly.train_workers = 2\n");
mkdir "$models/misfit";
system('cp', glob("$models/neox-par-f32-lora-qkv/*"), "$models/misfit/") == 0 or die 'cp';
# a corrupt adapter: its tensors file cut short
mkdir "$models/corrupt";
system('cp', glob("$models/gptj-f32-lora-qv/*"), "$models/corrupt/") == 0 or die 'cp';
truncate("$models/corrupt/adapter_model.safetensors", 1000) or die 'truncate';
# a base as Pythia comes: tables of 528 rows, a tokenizer of 512 without Dolly's tokens
mkdir "$models/plain";
system('cp', "$models/neox-par-f32/config.json", "$models/neox-par-f32/model.safetensors",
	"$models/tokenizer-legacy/vocab.json", "$models/tokenizer-legacy/merges.txt", "$models/plain/") == 0
  or die 'cp';

$node->safe_psql('postgres', q{
CREATE ROLE alice LOGIN IN ROLE dolly_trainer;
CREATE ROLE bob LOGIN;
CREATE TABLE records AS
SELECT 'Say the number ' || i AS instruction, NULL::text AS context, 'The number is ' || i AS response
  FROM generate_series(1, 40) i;
GRANT SELECT ON records TO alice;
SELECT dolly_register_model('neox-par-f32');
SELECT dolly_register_model('gptj-f32-lora-qv');
SELECT dolly_register_model('gptj-f32-lora-all', base_model => 'gptj-f32');
SELECT dolly_register_model('neox-par-f32-lora-qkv');
SELECT dolly_register_model('misfit', base_model => 'gptj-f32');
SELECT dolly_register_model('corrupt');
SELECT dolly_register_model('plain');
SELECT dolly_grant_model(m, 'PUBLIC') FROM unnest('{gptj-f32-lora-qv,gptj-f32-lora-all,neox-par-f32-lora-qkv,misfit,corrupt,plain}'::text[]) m;
});

is($node->safe_psql('postgres', "SELECT name, base_model, adapter FROM dolly_models ORDER BY name"),
	"corrupt|gptj-f32|t\ngptj-f32-lora-all|gptj-f32|t\ngptj-f32-lora-qv|gptj-f32|t\nmisfit|gptj-f32|t\nneox-par-f32|" . '|f'
	  . "\nneox-par-f32-lora-qkv|neox-par-f32|t\nplain||f",
	'adapters are registered with their base: given, or the one adapter_config.json names');

# A LoRA job of alice's with more options; its state and error once it has ended.
sub lora_job
{
	my ($output, $options) = @_;
	my $id = $node->safe_psql('postgres',
		"SELECT dolly_finetune('records', '$output', method => 'lora', lora_rank => 4, epochs => 3, "
		  . "batch_size => 4, learning_rate => 1e-2, warmup_steps => 0, eval_fraction => 0$options)",
		extra_params => [ '-U', 'alice' ]);
	return wait_job($node, $id, "state, coalesce(error, '')");
}

# two adapters trained through SQL, on two ranks
is(lora_job('alice-lora', ''), 'succeeded|', 'a LoRA job succeeds');
is(lora_job('alice-lora-mlp', ", lora_targets => '{fc_in,fc_out}', zero_stage => 2"), 'succeeded|',
	'and one of the MLP at ZeRO stage 2');
ok(-f "$models/alice-lora/adapter_config.json" && -f "$models/alice-lora/adapter_model.safetensors"
	  && !-e "$models/alice-lora/model.safetensors" && !-e "$models/alice-lora/config.json",
	'a LoRA job writes a PEFT adapter directory, without the base');
like(slurp_file("$models/alice-lora-mlp/adapter_config.json"), qr/"fc_in",\s*"fc_out"/s,
	'with the targets asked for');
is($node->safe_psql('postgres', "SELECT owner, base_model, adapter FROM dolly_models WHERE name = 'alice-lora'"),
	'alice|gptj-f32|t', "registered as alice's, with its base");
ok(-s "$models/alice-lora/adapter_model.safetensors" < 100000, 'an adapter is small (' .
	  (-s "$models/alice-lora/adapter_model.safetensors") . ' bytes)');

# the adapter changes the answers
my @prompts = map { "Say the number $_" } (3, 17, 25);

# Of @prompts, how many models x and y (SQL expressions) answer differently, greedily, as alice.
sub differing
{
	my ($x, $y) = @_;
	my $n = 0;
	for my $p (@prompts)
	{
		my ($ax, $ay) = map {
			$node->safe_psql('postgres',
				"SELECT dolly_generate('$p', model => $_, max_new_tokens => 8, do_sample => false)",
				extra_params => [ '-U', 'alice' ])
		} ($x, $y);
		$n++ if $ax ne $ay;
	}
	return $n;
}
my $differ = differing('NULL', "'alice-lora'");
ok($differ > 0, "the trained adapter changes the base's answers ($differ of 3 prompts)");

# over a base without Dolly's tokens: the adapter owns their rows and brings its tokenizer
is(lora_job('plain-lora', ", base_model => 'plain'"), 'succeeded|', 'a LoRA job over a base without Dolly\'s tokens succeeds');
like(slurp_file("$models/plain-lora/adapter_config.json"),
	qr/"trainable_token_indices":\s*\{\s*"embed_in":\s*\[\s*512,\s*513,\s*514\s*\],\s*"lm_head":/s,
	"the adapter owns their rows, as PEFT's trainable_token_indices");
like(slurp_file("$models/plain-lora/tokenizer.json"), qr/### End/, 'and carries the tokenizer that has them');
is($node->safe_psql('postgres', "SELECT dolly_tokenize('### End', model => 'plain')") . ' '
	  . $node->safe_psql('postgres', "SELECT dolly_tokenize('### End', model => 'plain-lora')",
		extra_params => [ '-U', 'alice' ]),
	'{282,360} {512}', "the base's tokenizer spells Dolly's end key in pieces, the adapter's as its token");
my $plain_differ = differing("'plain'", "'plain-lora'");
ok($plain_differ > 0, "it answers otherwise than its base ($plain_differ of 3 prompts)");

# 16 sessions over 4 adapters and the base at once, two adapters loaded at a time
my @models = ('NULL', "'gptj-f32-lora-qv'", "'gptj-f32-lora-all'", "'alice-lora'", "'alice-lora-mlp'");
my (@sql, @solo);
for my $i (0 .. 15)
{
	$sql[$i] = "SELECT dolly_generate('Say the number $i', model => $models[$i % 5], max_new_tokens => 8, do_sample => false)";
	$solo[$i] = $node->safe_psql('postgres', $sql[$i], extra_params => [ '-U', 'alice' ]);
}
my @sessions = map { $node->background_psql('postgres', extra_params => [ '-U', 'alice' ]) } (0 .. 15);
for my $i (0 .. 15)
{
	$sessions[$i]->{stdin} .= "$sql[$i];\n" x 3 . "SELECT 'done';\n";
	$sessions[$i]->{run}->pump_nb;
}
my $same = 0;
for my $i (0 .. 15)
{
	my $s = $sessions[$i];
	$s->{run}->pump until $s->{stdout} =~ /done/ || $s->{timeout}->is_expired;
	my @got = grep { $_ ne 'done' } split /\n/, $s->{stdout};
	$same++ if @got == 3 && !grep { $_ ne $solo[$i] } @got;
	$s->quit;
}
is($same, 16, 'each of 16 sessions over 4 adapters and the base gets its answer alone, three times');
my $log = slurp_file($node->logfile);
ok($log =~ /unloading adapter/, 'with more adapters asked for than dolly.max_loaded_adapters, idle ones are unloaded');
ok($log !~ /loading model "[^"]*(lora|misfit)/, 'an adapter is never loaded as a model of its own');

# merged into its base: a model of alice's that answers as the adapter does
$node->safe_psql('postgres', "SELECT dolly_merge_adapter('alice-lora', 'alice-merged')", extra_params => [ '-U', 'alice' ]);
is($node->safe_psql('postgres', "SELECT owner, base_model, adapter FROM dolly_models WHERE name = 'alice-merged'"),
	'alice|gptj-f32|f', "dolly_merge_adapter writes a model of the caller's, based on the adapter's base");
ok(-f "$models/alice-merged/model.safetensors" && -f "$models/alice-merged/config.json"
	  && -f "$models/alice-merged/tokenizer.json", 'as a Hugging Face model directory');
my $same_merged = 3 - differing("'alice-merged'", "'alice-lora'");
is($same_merged, 3, 'the merged model answers as the adapter on its base');

# refusals
my ($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_merge_adapter('alice-lora', 'bobs')", extra_params => [ '-U', 'bob' ]);
like($err, qr/permission denied for function dolly_merge_adapter/, 'merging is for dolly_trainer');
($ret, $out, $err) = $node->psql('postgres', "SELECT dolly_merge_adapter('neox-par-f32', 'x')");
like($err, qr/model "neox-par-f32" is not a LoRA adapter/, 'only an adapter merges');
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_merge_adapter('alice-lora', 'alice-merged')", extra_params => [ '-U', 'alice' ]);
like($err, qr/model "alice-merged" already exists/, 'a merge never overwrites a model');
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_generate('hi', model => 'misfit', do_sample => false)");
like($err, qr/LoRA adapter \(of "neox-par-f32"\) does not fit this model/, 'an adapter of another base is refused');
like($err, qr/HINT:  An adapter runs only on the base model it was trained from/, 'with a hint');
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_generate('hi', model => 'corrupt', do_sample => false)");
like($err, qr/ERROR:  .*adapter_model\.safetensors/, 'a corrupt adapter file is an ERROR naming the file');
unlike($err, qr{\Q$models\E|does not fit}, 'without the directory, and not as another base\'s adapter');
is($node->safe_psql('postgres', "SELECT dolly_generate('hi', model => 'gptj-f32-lora-qv', max_new_tokens => 2, do_sample => false) IS NOT NULL"),
	't', 'and the server serves on');
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_generate('hi', model => 'neox-par-f32-lora-qkv', do_sample => false)", extra_params => [ '-U', 'bob' ]);
like($err, qr/is a LoRA adapter of "neox-par-f32", which the current role may not use/,
	'an adapter is served only to roles that may use its base too');
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_generate('hi', model => 'alice-lora', do_sample => false)", extra_params => [ '-U', 'bob' ]);
like($err, qr/model "alice-lora" is not registered, or the current role may not use it/,
	"alice's adapter is hers until she grants it");
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_finetune('records', 'x', method => 'qlora')", extra_params => [ '-U', 'alice' ]);
like($err, qr/method must be "full" or "lora"/, 'an unknown method');
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_finetune('records', 'x', method => 'lora', lora_rank => 0)", extra_params => [ '-U', 'alice' ]);
like($err, qr/lora_rank must be between 1 and 256/, 'a rank out of range');
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_finetune('records', 'x', method => 'lora', lora_targets => '{\"../x\"}')", extra_params => [ '-U', 'alice' ]);
like($err, qr/is not a module name/, 'a target that is not a module name');
($ret, $out, $err) = $node->psql('postgres',
	"SELECT dolly_finetune('records', 'x', base_model => 'gptj-f32-lora-qv', method => 'lora')", extra_params => [ '-U', 'alice' ]);
like($err, qr/base model "gptj-f32-lora-qv" is a LoRA adapter/, 'an adapter is not a base');
like(lora_job('bad-targets', ", lora_targets => '{c_attn}'"),
	qr/^failed\|.*has no module "c_attn" for LoRA/, 'a module the architecture lacks fails the job, naming it');
ok(!-e "$models/bad-targets", 'and writes nothing');
($ret, $out, $err) = $node->psql('postgres', "SELECT dolly_register_model('misfit', base_model => 'nope')");
like($err, qr/base model of LoRA adapter "misfit" is not a registered model \("nope"\)/,
	'registering an adapter on an unknown base');
($ret, $out, $err) = $node->psql('postgres', "SELECT dolly_register_model('neox-par-f32', base_model => 'gptj-f32')");
like($err, qr/is not a LoRA adapter: only an adapter takes a base_model/, 'a model takes no base');

$node->stop;
done_testing();
