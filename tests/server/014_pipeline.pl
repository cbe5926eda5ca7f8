# 014_pipeline.pl: one Dolly pipeline. dolly-cli, the model server and the fine-tuning ranks
# open a model directory through the same engine entry (pipeline.h), and the first two answer
# through it: they give the same answer, templated or raw, with Dolly's special tokens in the
# tokenizer and without them (then generation stops at end-of-text and the response is read
# out of the text). 004_finetune.pl serves what the ranks trained.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use DollyTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $cli = "$FindBin::Bin/../../build/dolly-cli";
plan skip_all => "no $cli: run make first" unless -x $cli;

my ($node, $dir) = dolly_cluster('pipeline', models => [ 'gptj-f32', 'neox-par-f32' ]);

# a copy of gptj-f32 whose tokenizer lacks Dolly's special tokens
mkdir "$dir/gptj-plain";
system('cp', glob("$dir/gptj-f32/*"), "$dir/gptj-plain/") == 0 or die 'cannot copy gptj-f32';
my $json = slurp_file("$dir/gptj-plain/tokenizer.json");
my $removed = ($json =~ s/\{[^{}]*"content":\s*"### (?:End|Instruction:|Response:\\n)"[^{}]*\},?//g);
$json =~ s/,(\s*\])/$1/g;
is($removed, 3, "the plain copy's tokenizer lost Dolly's three special tokens");
open(my $fh, '>', "$dir/gptj-plain/tokenizer.json") or die $!;
print $fh $json;
close $fh;

sub cli
{
	my ($model, $raw, $text) = @_;
	my ($out, $err);
	IPC::Run::run([ $cli, 'generate', '--model', "$dir/$model", '--threads', '1', '--greedy',
			'--max-new-tokens', '24', ($raw ? ('--raw') : ()), $text ], '>', \$out, '2>', \$err)
	  or die "dolly-cli failed: $err";
	chomp $out;
	return $out;
}

for my $model ('gptj-f32', 'neox-par-f32', 'gptj-plain')
{
	for my $text ('Name three primary colors.', "Write a haiku about tables.\nKeep it short.")
	{
		(my $lit = $text) =~ s/'/''/g;
		my $sql = $node->safe_psql('postgres', "SELECT dolly_generate(E'" . ($lit =~ s/\n/\\n/gr)
			  . "', model => '$model', max_new_tokens => 24, do_sample => false)");
		is($sql, cli($model, 0, $text), "$model: dolly-cli and dolly_generate give the same answer to \"$text\"");
		my $raw = $node->safe_psql('postgres', "SELECT dolly_generate_raw(E'" . ($lit =~ s/\n/\\n/gr)
			  . "', model => '$model', max_new_tokens => 24, do_sample => false)");
		is($raw, cli($model, 1, $text), "$model: and the same raw continuation");
	}
}

done_testing();
