/*
 * harness.c: runs the registered engine tests and prints "N passed, N failed"; the
 * fixtures' paths and the tests' scratch directories.
 */
#define _GNU_SOURCE				/* nftw's FTW_DEPTH */

#include "harness.h"

#include <ftw.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_TESTS 1024

static struct
{
	const char *name;
	test_fn		fn;
}			tests[MAX_TESTS];
static int	ntests;

void
harness_register(const char *name, test_fn fn)
{
	if (ntests == MAX_TESTS)
	{
		fprintf(stderr, "harness: more than %d tests\n", MAX_TESTS);
		exit(2);
	}
	tests[ntests].name = name;
	tests[ntests].fn = fn;
	ntests++;
}

const char *
fixture_dir(void)
{
	const char *dir = getenv("DOLLY_FIXTURES");

	return dir ? dir : "tests/fixtures";
}

const char *
fixture_path(const char *rel)
{
	static char buf[4096];

	snprintf(buf, sizeof(buf), "%s/%s", fixture_dir(), rel);
	return buf;
}

const char *
scratch_dir(char *buf, size_t len)
{
	snprintf(buf, len, "/tmp/dolly-test-XXXXXX");
	return mkdtemp(buf);
}

/* nftw callback removing one entry (children first). */
static int
remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void) sb;
	(void) flag;
	(void) ftw;
	return remove(path);
}

void
scratch_done(const char *dir)
{
	nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static int
by_name(const void *a, const void *b)
{
	return strcmp(((const typeof(tests[0]) *) a)->name, ((const typeof(tests[0]) *) b)->name);
}

int
main(int argc, char **argv)
{
	const char *filter = argc > 1 ? argv[1] : NULL;
	int			passed = 0,
				failed = 0,
				skipped = 0;

	/* constructors run in link order; sort so output is stable */
	qsort(tests, ntests, sizeof(tests[0]), by_name);
	for (int i = 0; i < ntests; i++)
	{
		int			result = 0;
		struct timespec t0,
					t1;

		if (filter && !strstr(tests[i].name, filter))
			continue;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		tests[i].fn(&result);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		printf("%-4s %s (%.0f ms)\n", result > 0 ? "FAIL" : result < 0 ? "SKIP" : "ok",
			   tests[i].name,
			   (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6);
		fflush(stdout);
		if (result > 0)
			failed++;
		else if (result < 0)
			skipped++;
		else
			passed++;
	}
	printf("%d passed, %d failed", passed, failed);
	if (skipped)
		printf(", %d skipped", skipped);
	printf("\n");
	return failed ? 1 : 0;
}
