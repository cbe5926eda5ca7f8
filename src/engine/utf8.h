/*
 * utf8.h: decoding and validating UTF-8, the one implementation the engine's readers share.
 */
#ifndef DOLLY_UTF8_H
#define DOLLY_UTF8_H

#include <stddef.h>
#include <stdint.h>

/*
 * Decode the UTF-8 character at s (n >= 1 bytes available): its length, with the code
 * point in *cp, or 0 when invalid, with *bad the length of the maximal invalid subpart
 * (Unicode's "substitution of maximal subparts", which Rust's from_utf8_lossy implements).
 */
size_t		utf8_char(const unsigned char *s, size_t n, uint32_t *cp, size_t *bad);

/* Offset of the first byte of s[0..n) that breaks UTF-8, or n when it is all valid. */
size_t		utf8_invalid_at(const char *s, size_t n);

#endif
