# 013_torch_checkpoints.pl: model directories as PyTorch checkpoints (pytorch_model.bin, or
# shards through pytorch_model.bin.index.json) serve as their safetensors twins do; a
# damaged or malicious .bin is an ERROR that says why, runs nothing, and the model server
# serves on.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use DollyTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my ($node, $models) = dolly_cluster('torch',
	models => [ 'neox-par-f32', 'neox-par-f32-bin', 'gptj-bf16', 'gptj-bf16-bin' ],
	conf => "dolly.model = 'neox-par-f32-bin'\n");

sub generate
{
	my ($model) = @_;
	my $m = $model ? ", model => '$model'" : '';
	return "SELECT dolly_generate('Name three primary colors.'$m, max_new_tokens => 24, do_sample => false)";
}

# the default model is a .bin directory; sharded .bin with GPT-J's old buffers by name
my $twin = $node->safe_psql('postgres', generate('neox-par-f32'));
isnt($twin, '', 'the safetensors model answers');
is($node->safe_psql('postgres', generate()), $twin, 'dolly.model as pytorch_model.bin answers as its safetensors twin');
is($node->safe_psql('postgres', generate('gptj-bf16-bin')), $node->safe_psql('postgres', generate('gptj-bf16')),
	'a sharded .bin model (pytorch_model.bin.index.json) answers as its twin');
my $server = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'dolly model server'");

# damaged and malicious checkpoints, each in a directory of its own beside the good ones
sub bad_model
{
	my ($name, $bin) = @_;
	mkdir "$models/$name";
	system('cp', glob("$fixtures/neox-par-f32-bin/*.json"), "$models/$name/") == 0 or die 'cp';
	system('cp', $bin, "$models/$name/pytorch_model.bin") == 0 or die 'cp';
}
bad_model('evil', "$fixtures/torch-ckpt/os_system.bin");
bad_model('numpy', "$fixtures/torch-ckpt/numpy_global.bin");
bad_model('short', "$fixtures/torch-ckpt/short_storage.bin");
bad_model('cut', "$fixtures/neox-par-f32-bin/pytorch_model.bin");
truncate("$models/cut/pytorch_model.bin", 100000) or die "truncate: $!";

my ($ret, $out, $err) = $node->psql('postgres', generate('evil'));
like($err, qr/ERROR:  .*evil\/pytorch_model\.bin: data\.pkl, byte \d+: the pickle refers to the global posix\.system, which is not one a state dict of tensors needs/,
	'a pickle that calls os.system is an ERROR naming the global');
like($err, qr/HINT:  .*collections\.OrderedDict, torch\._utils\._rebuild_tensor_v2/, 'with a hint');
unlike($err, qr/\Q$models\E/, 'which does not show the server\'s paths');
ok(!$node->log_contains('this checkpoint ran a command'), 'and nothing in it was run');
($ret, $out, $err) = $node->psql('postgres', generate('numpy'));
like($err, qr/ERROR:  .*numpy\/pytorch_model\.bin: .*global numpy\._core\.multiarray\._reconstruct/,
	'a global outside the list is an ERROR naming it');
($ret, $out, $err) = $node->psql('postgres', generate('short'));
like($err, qr/ERROR:  .*short\/pytorch_model\.bin: .*storage "0" holds 8 bytes, but 4 F32 elements need 16/,
	'a storage shorter than its tensor is an ERROR');
($ret, $out, $err) = $node->psql('postgres', generate('cut'));
like($err, qr/ERROR:  .*cut\/pytorch_model\.bin: not a zip archive.*\n.*HINT:  The file is damaged or was not written by torch\.save/,
	'a truncated checkpoint is an ERROR with a hint');

is($node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'dolly model server'"),
	$server, 'the model server was not restarted');
is($node->safe_psql('postgres', generate()), $twin, 'and serves on');

done_testing();
