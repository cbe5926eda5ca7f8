# 011_soak.pl: many sessions at once, for long: 64 clients, each sending its requests one
# after another (greedy, 32 distinct prompts), and every answer must equal that prompt's
# answer alone: none lost, none swapped, none changed by its batch. DOLLY_SOAK_REQUESTS
# requests a client (1000 by default).
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use DollyTest;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $clients = 64;
my $requests = $ENV{DOLLY_SOAK_REQUESTS} || 1000;
my $prompts = 32;

my ($node) = dolly_cluster('soak', conf => "dolly.model = 'neox-par-f32'\ndolly.max_batch = 16\n");

sub request { return "SELECT $_[0] || ':' || dolly_generate_raw('Soak prompt number $_[0] says', max_new_tokens => 12, do_sample => false);\n" }

# a psql client running a script; answers are separated by NUL bytes (they hold newlines)
sub client
{
	my ($script, $out, $err) = @_;
	return IPC::Run::start(
		[ 'psql', '-X', '-A', '-t', '-q', '-0', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres') ],
		'<', \$script, '>', $out, '2>', $err);
}

# every prompt alone, one after the other
my ($alone_out, $alone_err) = ('', '');
client(join('', map { request($_) } 0 .. $prompts - 1), \$alone_out, \$alone_err)->finish;
my @alone = split /\0/, $alone_out;
is(scalar(@alone), $prompts, 'every prompt is answered alone') or diag($alone_err);

my $start = time;
my (@h, @out, @err);
for my $c (0 .. $clients - 1)
{
	($out[$c], $err[$c]) = ('', '');
	push @h, client(join('', map { request(($c * 7 + $_) % $prompts) } 1 .. $requests), \$out[$c], \$err[$c]);
}
$_->finish for @h;
my $seconds = time - $start;

my ($answers, $same, $errors) = (0, 0, 0);
for my $c (0 .. $clients - 1)
{
	$errors++ if $err[$c] ne '';
	my @answers = split /\0/, $out[$c];
	for my $i (0 .. $#answers)
	{
		$answers++;
		$same++ if $answers[$i] eq $alone[($c * 7 + $i + 1) % $prompts];
	}
}
my $total = $clients * $requests;
is($errors, 0, 'no client got an error');
is($answers, $total, "every one of the $total requests was answered");
is($same, $total, 'every answer equals its prompt\'s answer alone');
diag("$total requests from $clients clients in $seconds s");

done_testing();
