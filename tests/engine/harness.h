/*
 * harness.h: a minimal unit-test harness for the engine.
 *
 * Each test_*.c file defines tests with TEST(name) { ... } and checks with CHECK(...);
 * tests register themselves at load time, so adding a file needs no central list.
 * run_tests [filter] runs every test whose name contains filter and ends with
 * "N passed, N failed". A failed CHECK fails the current test and returns from it.
 */
#ifndef DOLLY_HARNESS_H
#define DOLLY_HARNESS_H

#include <stddef.h>
#include <stdio.h>

typedef void (*test_fn) (int *failed);

void		harness_register(const char *name, test_fn fn);

/* Directory of committed fixtures (tests/fixtures), from $DOLLY_FIXTURES or the default. */
const char *fixture_dir(void);

/* Build "<fixture_dir>/<rel>" into a static buffer (valid until the next call). */
const char *fixture_path(const char *rel);

/* A fresh temporary directory for one test, in buf (NULL on failure); see scratch_done. */
const char *scratch_dir(char *buf, size_t len);

/* Remove a scratch directory and everything under it. */
void		scratch_done(const char *dir);

#define TEST(name) \
	static void test_##name(int *failed_); \
	__attribute__((constructor)) static void register_##name(void) \
	{ harness_register(#name, test_##name); } \
	static void test_##name(int *failed_)

#define CHECK(cond) do { \
	if (!(cond)) { \
		fprintf(stderr, "  %s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
		*failed_ = 1; return; \
	} } while (0)

/* CHECK with a printf-style explanation printed on failure. */
#define CHECKF(cond, ...) do { \
	if (!(cond)) { \
		fprintf(stderr, "  %s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
		fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); \
		*failed_ = 1; return; \
	} } while (0)

/* Check that an engine call returned DL_OK, printing its error message otherwise. */
#define CHECK_OK(call, errp) CHECKF((call) == DL_OK, "%s", (errp)->msg)

/* Mark the current test as skipped (with a reason) and return. */
#define SKIP(...) do { \
	fprintf(stderr, "  skipped: "); fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); \
	*failed_ = -1; return; } while (0)

#endif
