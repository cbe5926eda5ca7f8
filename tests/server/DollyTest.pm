# DollyTest.pm: what the server tests share: a started cluster with dolly preloaded, its
# extension created, serving the fixture models or copies of some in a directory of its own.
package DollyTest;
use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use Exporter 'import';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;

our @EXPORT = qw(dolly_cluster wait_job $fixtures);
our $fixtures = abs_path(dirname(__FILE__) . '/../fixtures');

# dolly_cluster(name, models => [fixture names], conf => lines, preload => libraries): the
# node and its dolly.model_dir: copies of the named fixtures in a new directory (which the
# test may write), or tests/fixtures itself without `models`. dolly.model is gptj-f32
# unless conf sets it; conf's lines come last; shared_preload_libraries is preload
# ('dolly' by default).
sub dolly_cluster
{
	my ($name, %opt) = @_;
	my $dir = $fixtures;
	if ($opt{models})
	{
		$dir = PostgreSQL::Test::Utils::tempdir();
		for my $m (@{ $opt{models} })
		{
			mkdir "$dir/$m";
			system('cp', glob("$fixtures/$m/*"), "$dir/$m/") == 0 or die "cannot copy $m";
		}
	}
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', "shared_preload_libraries = '" . ($opt{preload} // 'dolly') . "'\n"
		  . "dolly.model_dir = '$dir'\ndolly.model = 'gptj-f32'\ndolly.threads = 2\n"
		  . ($opt{conf} // ''));
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION dolly');
	return ($node, $dir);
}

# wait_job(node, id, columns): wait until fine-tuning job id has ended; then its columns
# of dolly_jobs (an SQL select list, 'state' by default), '|'-separated.
sub wait_job
{
	my ($node, $id, $columns) = @_;
	$node->poll_query_until('postgres',
		"SELECT state NOT IN ('queued', 'running') FROM dolly_jobs WHERE id = $id")
	  or die "job $id did not finish";
	return $node->safe_psql('postgres', 'SELECT ' . ($columns // 'state') . " FROM dolly_jobs WHERE id = $id");
}

1;
