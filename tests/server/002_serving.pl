# 002_serving.pl: many sessions share one model server: concurrent greedy requests get the
# answers they get alone, and dolly.model can be switched with a reload; a broken model, or
# one larger than the memory left, is an ERROR and the server serves on; dolly.cpu_weights
# switches the matrices to bfloat16 with a reload.
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
like($stderr, qr/could not open model configuration "tokenizer\/config\.json"/, 'a model directory without config.json gets a clear error');
is($node->safe_psql('postgres', generate_sql(1, 'neox-par-f32')), $neox, 'other models still serve');

# a model far larger than the host's memory: refused before it is touched (no OOM killer),
# with the figures, and the server stays up. Its config is GPT-NeoX at 32768 wide and 100
# layers (5 TB of float32); its one tensor, the embedding, is 8 rows of bf16 zeros.
my $huge = PostgreSQL::Test::Utils::tempdir();
system('cp', "$fixtures/neox-par-f32/tokenizer.json", "$huge/") == 0 or die 'cp';
my $config = do { local $/; open(my $f, '<', "$fixtures/neox-par-f32/config.json") or die; <$f> };
$config =~ s/"hidden_size": *\d+/"hidden_size": 32768/;
$config =~ s/"intermediate_size": *\d+/"intermediate_size": 131072/;
$config =~ s/"num_attention_heads": *\d+/"num_attention_heads": 32/;
$config =~ s/"num_hidden_layers": *\d+/"num_hidden_layers": 100/;
open(my $cf, '>', "$huge/config.json") or die;
print $cf $config;
close $cf;
my $header = '{"gpt_neox.embed_in.weight":{"dtype":"BF16","shape":[8,32768],"data_offsets":[0,524288]}}';
open(my $sf, '>:raw', "$huge/model.safetensors") or die;
print $sf pack('Q<', length($header)), $header, "\0" x 524288;
close $sf;
my $server = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'dolly model server'");
$node->append_conf('postgresql.conf', "dolly.model = '$huge'\n");
$node->reload;
for (1 .. 50)
{
	($ret, $stdout, $stderr) = $node->psql('postgres', generate_sql(1));
	last if $stderr =~ /MB needed/;
	select(undef, undef, undef, 0.1);
}
like($stderr, qr/out of memory on the CPU: [\d.]+ MB needed, [\d.]+ MB available.*\n.*HINT:  The parameters need .*dolly.cpu_weights = 'bfloat16' needs half/,
	'a model larger than the memory left is refused, with the figures and a hint');
is($node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'dolly model server'"),
	$server, 'by the same model server, which was not killed');
is($node->safe_psql('postgres', generate_sql(1, 'neox-par-f32')), $neox, 'and still serves the others');

# a model whose KV cache for dolly.max_batch (16) sequences is 2.7 times the memory left:
# served with fewer sequences (the largest power-of-two share that fits), and said so. Its
# context is sized from MemAvailable: a sixth of it per sequence.
my ($avail_kb) = do { local @ARGV = ('/proc/meminfo'); map { /^MemAvailable:\s+(\d+)/ ? $1 : () } <> };
my $positions = int($avail_kb * 1024 / 6 / (2 * 2 * 32 * 4));	# 2 layers, K and V of width 32
SKIP:
{
	skip "MemAvailable is missing, or so large that the context would pass the config's limit", 3
	  unless $avail_kb && $positions < (1 << 24);
	my $long = PostgreSQL::Test::Utils::tempdir();
	system('cp', glob("$fixtures/gptj-f32/*"), "$long/") == 0 or die 'cp';
	my $cfg = do { local $/; open(my $f, '<', "$long/config.json") or die; <$f> };
	$cfg =~ s/"n_positions": *\d+/"n_positions": $positions/;
	open(my $cf, '>', "$long/config.json") or die;
	print $cf $cfg;
	close $cf;
	$node->append_conf('postgresql.conf', "dolly.model = '$long'\n");
	$node->reload;
	$node->poll_query_until('postgres', "SELECT count(*) = 1 FROM dolly_server WHERE max_context = $positions")
	  or die 'the long-context model was not loaded';
	is($node->safe_psql('postgres', generate_sql(1)), $alone[0], 'a model whose KV cache does not fit serves');
	cmp_ok($node->safe_psql('postgres', "SELECT max_batch FROM dolly_server WHERE max_context = $positions"),
		'<', $clients, 'with fewer sequences at once than dolly.max_batch');
	ok($node->log_contains("the KV cache holds \\d+ sequences of $positions tokens, not dolly.max_batch \\($clients\\)"),
		'and the log says so');
}

# dolly.cpu_weights = bfloat16 with a reload: the models come back with half the weight
# bytes, and a bfloat16 checkpoint (no rounding) answers what it answered in float32
my $bf16_f32 = $node->safe_psql('postgres', generate_sql(1, 'gptj-bf16'));
my $bytes = "SELECT weight_bytes FROM dolly_server WHERE model = 'gptj-bf16'";
my $f32_bytes = $node->safe_psql('postgres', $bytes);
$node->append_conf('postgresql.conf', "dolly.cpu_weights = 'bfloat16'\n");
$node->reload;
$node->poll_query_until('postgres', "SELECT current_setting('dolly.cpu_weights') = 'bfloat16'")
  or die 'dolly.cpu_weights not reloaded';
is($node->safe_psql('postgres', generate_sql(1, 'gptj-bf16')), $bf16_f32,
	'with bfloat16 matrices a bfloat16 checkpoint answers as in float32');
cmp_ok($node->safe_psql('postgres', $bytes), '<', 0.6 * $f32_bytes,
	"in about half the memory ($f32_bytes bytes before)");

$node->stop;
done_testing();
