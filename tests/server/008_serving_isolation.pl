# 008_serving_isolation.pl: one session cannot hurt the others through the model server.
# The server's memory does not grow with the requests it answers; a request whose model is
# full does not hold up the requests behind it, and tokenizing needs no weights; loading a
# large model does not stop the serving of the loaded ones, and dolly.max_model_loads limits
# the loads one role may cause; errors show no server paths; a token that decodes to byte 0
# does not cut the text short.
use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $fixtures = abs_path(dirname(__FILE__) . '/../fixtures');
my $models = PostgreSQL::Test::Utils::tempdir();
symlink("$fixtures/$_", "$models/$_") or die "symlink $_"
  for qw(gptj-f32 gptj-bf16 neox-par-f32 neox-par-bf16 neox-seq-f32);

sub slurp
{
	my ($path) = @_;
	open(my $f, '<', $path) or die "$path: $!";
	local $/;
	return <$f>;
}

sub spew
{
	my ($path, $text) = @_;
	open(my $f, '>', $path) or die "$path: $!";
	print $f $text;
	close $f;
}

# gptj-f32 with a context long enough for a 750-character instruction
mkdir "$models/gptj-long" or die;
system('cp', glob("$fixtures/gptj-f32/*"), "$models/gptj-long/") == 0 or die 'cp';
my $cfg = slurp("$models/gptj-long/config.json");
$cfg =~ s/"n_positions": *\d+/"n_positions": 2048/;
spew("$models/gptj-long/config.json", $cfg);

# A GPT-NeoX model of the fixture's tokenizer whose weights are all zero (BF16), hidden
# wide and `layers` deep: every logit is 0, so greedy decoding emits token 0 for ever (its
# end-of-text is set to token 1). Written as 002_serving.pl writes its huge model.
sub write_zero_model
{
	my ($name, $hidden, $layers, $positions) = @_;
	my $dir = "$models/$name";
	my $vocab = 536;
	mkdir $dir or die;
	system('cp', "$fixtures/neox-par-f32/tokenizer.json", "$dir/") == 0 or die 'cp';
	my $c = slurp("$fixtures/neox-par-f32/config.json");
	$c =~ s/"hidden_size": *\d+/"hidden_size": $hidden/;
	$c =~ s/"intermediate_size": *\d+/"intermediate_size": @{[4 * $hidden]}/;
	$c =~ s/"num_attention_heads": *\d+/"num_attention_heads": @{[$hidden \/ 64]}/;
	$c =~ s/"num_hidden_layers": *\d+/"num_hidden_layers": $layers/;
	$c =~ s/"max_position_embeddings": *\d+/"max_position_embeddings": $positions/;
	$c =~ s/"eos_token_id": *\d+/"eos_token_id": 1/;
	spew("$dir/config.json", $c);
	my @tensors = (
		[ 'gpt_neox.embed_in.weight', $vocab, $hidden ],
		[ 'embed_out.weight', $vocab, $hidden ],
		[ 'gpt_neox.final_layer_norm.weight', $hidden ],
		[ 'gpt_neox.final_layer_norm.bias', $hidden ]);
	for my $l (0 .. $layers - 1)
	{
		my $p = "gpt_neox.layers.$l";
		push @tensors,
		  [ "$p.input_layernorm.weight", $hidden ], [ "$p.input_layernorm.bias", $hidden ],
		  [ "$p.post_attention_layernorm.weight", $hidden ],
		  [ "$p.post_attention_layernorm.bias", $hidden ],
		  [ "$p.attention.query_key_value.weight", 3 * $hidden, $hidden ],
		  [ "$p.attention.query_key_value.bias", 3 * $hidden ],
		  [ "$p.attention.dense.weight", $hidden, $hidden ],
		  [ "$p.attention.dense.bias", $hidden ],
		  [ "$p.mlp.dense_h_to_4h.weight", 4 * $hidden, $hidden ],
		  [ "$p.mlp.dense_h_to_4h.bias", 4 * $hidden ],
		  [ "$p.mlp.dense_4h_to_h.weight", $hidden, 4 * $hidden ],
		  [ "$p.mlp.dense_4h_to_h.bias", $hidden ];
	}
	my ($offset, @entries) = (0);
	for my $t (@tensors)
	{
		my ($tname, @shape) = @$t;
		my $bytes = 2;
		$bytes *= $_ for @shape;
		push @entries, sprintf('"%s":{"dtype":"BF16","shape":[%s],"data_offsets":[%d,%d]}',
			$tname, join(',', @shape), $offset, $offset + $bytes);
		$offset += $bytes;
	}
	my $header = '{' . join(',', @entries) . '}';
	open(my $sf, '>:raw', "$dir/model.safetensors") or die;
	print $sf pack('Q<', length($header)), $header;
	my $chunk = "\0" x (1 << 20);
	for (my $left = $offset; $left > 0; $left -= length($chunk))
	{
		print $sf ($left >= length($chunk) ? $chunk : substr($chunk, 0, $left));
	}
	close $sf or die;
	return $offset;
}
# decodes for seconds: 50M parameters a token
write_zero_model('slow', 1024, 4, 2048);
# loads for seconds: 0.8 GB of BF16 in 100 tensors
my $big_bytes = write_zero_model('big', 2048, 8, 64);

my $node = PostgreSQL::Test::Cluster->new('isolation');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'dolly'
dolly.model_dir = '$models'
dolly.model = 'gptj-long'
dolly.max_batch = 1
dolly.max_loaded_models = 3
dolly.max_model_loads = 2
dolly.threads = 2
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION dolly');
$node->safe_psql('postgres', 'CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN');
# the models ordinary roles name below, usable by every role
$node->safe_psql('postgres', "SELECT dolly_register_model('$_'); SELECT dolly_grant_model('$_', 'public')")
  for qw(neox-seq-f32 gptj-bf16 neox-par-bf16);

# --- a token that decodes to byte 0 ("Ā", id 189 in the fixture tokenizer) between "a" and "b"
is($node->safe_psql('postgres',
		"SELECT dolly_detokenize(ARRAY[65, 189, 66], model => 'gptj-f32') = 'a' || U&'\\FFFD' || 'b'"),
	't', 'a byte-0 token decodes to U+FFFD, and the text after it is kept');

# --- memory: 9,000 more requests after the first 1,000 leave the server's RSS where it was
my $server = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'dolly model server'");

sub rss_kb
{
	my ($line) = grep { /^VmRSS:/ } split /\n/, slurp("/proc/$server/status");
	return ($line =~ /(\d+)/)[0];
}
my $instruction = join(' ', map { "Item $_ of the list is the one to describe." } 1 .. 18);
$instruction = substr($instruction, 0, 750);
my $many = sub {
	my ($n) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(dolly_generate('$instruction', max_new_tokens => 2, do_sample => false)) "
		  . "FROM generate_series(1, $n)");
};
is($many->(1000), 1000, '1,000 requests with a 750-character instruction answered');
my $rss_first = rss_kb();
$many->(3000) for 1 .. 3;
my $rss_last = rss_kb();
cmp_ok($rss_last - $rss_first, '<', 4096,
	"the server's RSS after 10,000 requests is within 4 MB of its RSS after 1,000 ($rss_first kB, then $rss_last kB)");

# --- head-of-line: with one sequence a model, a long generation runs on "slow" and a second
# request for it waits; a request on another model and a tokenizer call pass it
sub start_client
{
	my ($name, $sql) = @_;
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[ 'psql', '-X', '-A', '-t', '-q', '-d', $node->connstr('postgres') . " application_name=$name", '-c', $sql ],
		'>', \$out, '2>', \$err);
	return { h => $h, out => \$out, err => \$err };
}
my $long_sql = "SELECT dolly_generate_raw('Once upon a time', model => 'slow', max_new_tokens => 1000, do_sample => false)";
my $long = start_client('long', $long_sql);
$node->poll_query_until('postgres', "SELECT active_requests = 1 FROM dolly_server WHERE model = 'slow'")
  or die 'the long generation did not start';
my $second = start_client('second', $long_sql);
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'second' AND wait_event = 'Extension'")
  or die 'the second request did not queue';
my ($ret, $stdout, $stderr) = $node->psql('postgres',
	"SET statement_timeout = '20s'; "
	  . "SELECT dolly_generate_raw('Hello', model => 'neox-par-f32', max_new_tokens => 5, do_sample => false)");
is($ret, 0, 'a request on another model is answered while the first in line waits') or diag($stderr);
($ret, $stdout, $stderr) = $node->psql('postgres',
	"SET statement_timeout = '20s'; SELECT cardinality(dolly_tokenize('Hello', model => 'neox-seq-f32')) > 0");
is($stdout, 't', 'so is a tokenizer call') or diag($stderr);
is($node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE application_name = 'long' AND state = 'active'"),
	'1', 'both before the long generation ended');
is($node->safe_psql('postgres', "SELECT count(*) FROM dolly_server WHERE model = 'neox-seq-f32'"),
	'0', 'tokenizing loads no weights');
$node->safe_psql('postgres',
	"SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name IN ('long', 'second')");
$_->{h}->finish for $long, $second;

# --- a load in slices: while "big" loads, the loaded models serve. The loop counts the small
# requests answered before big's row appears in dolly_server (at the end of its load).
my $big = start_client('big',
	"SELECT dolly_generate_raw('Hi', model => 'big', max_new_tokens => 1, do_sample => false) IS NOT NULL");
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'dolly model server' AND query LIKE 'loading model %big%'")
  or die 'the big model is not loading';
my $served = $node->safe_psql('postgres', q{
CREATE TABLE served(n int);
DO $$
DECLARE
	n int := 0;
BEGIN
	WHILE n < 5000 AND NOT EXISTS (SELECT 1 FROM dolly_server WHERE model = 'big') LOOP
		PERFORM dolly_generate_raw('Hi', model => 'neox-par-f32', max_new_tokens => 2, do_sample => false);
		n := n + 1;
	END LOOP;
	INSERT INTO served VALUES (n);
END $$;
SELECT n FROM served;
});
$big->{h}->finish;
is(${ $big->{out} }, "t\n", 'the big model loaded and answered') or diag(${ $big->{err} });
cmp_ok($served, '>=', 3, "requests to a loaded model are answered while a model of $big_bytes bytes loads ($served were)");

# --- dolly.max_model_loads = 2: a role's third load within the minute is refused; another
# role still loads, and superusers are not limited. alice and bob name models never loaded;
# the superuser cycles over four models, more than dolly.max_loaded_models (3) holds, so
# that from the second round every request is a load.
sub generate_as
{
	my ($role, $model) = @_;
	return $node->psql('postgres',
		"SET ROLE $role; SELECT dolly_generate_raw('Hi', model => '$model', max_new_tokens => 1, do_sample => false)");
}
is((generate_as('alice', 'neox-seq-f32'))[0], 0, "alice's first load");
is((generate_as('alice', 'gptj-bf16'))[0], 0, "alice's second load");
($ret, $stdout, $stderr) = generate_as('alice', 'neox-par-bf16');
like($stderr, qr/ERROR:  model "neox-par-bf16" is not loaded, and this role has caused 2 model loads in the last minute.*\n.*HINT:  dolly.max_model_loads/,
	"alice's third load within the minute is refused, with a hint naming dolly.max_model_loads");
is((generate_as('bob', 'neox-par-bf16'))[0], 0, 'bob still loads');
my @cycle = qw(gptj-f32 neox-seq-f32 gptj-bf16 neox-par-bf16);
my $super_ok = 0;
$super_ok += (generate_as('NONE', $cycle[$_ % 4]))[0] == 0 for 0 .. 7;
is($super_ok, 8, 'a superuser is not limited');

# --- paths: a failing load of dolly.model given as an absolute path does not show the path
my $broken = PostgreSQL::Test::Utils::tempdir();
system('cp', "$fixtures/neox-par-f32/tokenizer.json", "$broken/") == 0 or die 'cp';
$node->append_conf('postgresql.conf', "dolly.model = '$broken'\n");
$node->reload;
for (1 .. 50)
{
	($ret, $stdout, $stderr) = $node->psql('postgres',
		"SET ROLE alice; SELECT dolly_generate_raw('Hi', max_new_tokens => 1)");
	last if $stderr =~ /config\.json/;
	select(undef, undef, undef, 0.1);
}
like($stderr, qr/could not open model configuration "dolly\.model\/config\.json"/, 'a broken dolly.model is an error naming "dolly.model"');
unlike($stderr, qr/\Q$broken\E/, 'which does not show its path');

$node->stop;
done_testing();
