/*
 * prompt.c: Dolly's prompt template and the pipeline's response extraction; see prompt.h.
 *
 * The pipeline works on tokens first (between the "### Response:\n" and "### End"
 * special tokens) and falls back to regexes on the decoded text. Both special tokens
 * are split out of any text that contains them, so the same search on decoded text
 * finds the same span. The regexes run in PCRE2 with Python's whitespace spelled out,
 * so that \s and strip() mean what they mean in Python.
 */
#define _GNU_SOURCE				/* asprintf */
#include "prompt.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

/*
 * Python's \s (str.isspace) as UTF-8 byte sequences. The patterns match bytes, so that
 * invalid UTF-8 is carried along as Python carries U+FFFD; on valid UTF-8 a match
 * still starts and ends on character boundaries ('#' and these sequences are whole).
 */
#define PY_SPACE \
	"(?:[\\t-\\r\\x1c-\\x20]|\\xc2[\\x85\\xa0]|\\xe1\\x9a\\x80|" \
	"\\xe2\\x80[\\x80-\\x8a\\xa8\\xa9\\xaf]|\\xe2\\x81\\x9f|\\xe3\\x80\\x80)"

/* The pipeline's fallbacks, in the order it tries them. */
static const char *const response_patterns[] = {
	"#+" PY_SPACE "*Response:" PY_SPACE "*(.+?)#+" PY_SPACE "*End",
	"#+" PY_SPACE "*Response:" PY_SPACE "*(.+)",
};

/* The generation prompt, with the context under "Input:" when there is one. */
char *
prompt_format(const char *instruction, const char *context)
{
	char	   *s;
	int			rc;

	if (context && context[0])
		rc = asprintf(&s, DOLLY_INTRO_BLURB "\n\n" DOLLY_INSTRUCTION_KEY "\n%s\n\n"
					  DOLLY_INPUT_KEY "\n%s\n\n" DOLLY_RESPONSE_KEY_NL,
					  instruction ? instruction : "", context);
	else
		rc = asprintf(&s, DOLLY_INTRO_BLURB "\n\n" DOLLY_INSTRUCTION_KEY "\n%s\n\n"
					  DOLLY_RESPONSE_KEY_NL,
					  instruction ? instruction : "");
	return rc < 0 ? NULL : s;
}

/* The generation prompt followed by the response and the end key. */
char *
prompt_format_record(const char *instruction, const char *context, const char *response)
{
	char	   *prompt = prompt_format(instruction, context);
	char	   *s;
	int			rc;

	if (!prompt)
		return NULL;
	rc = asprintf(&s, "%s%s\n\n" DOLLY_END_KEY, prompt, response ? response : "");
	free(prompt);
	return rc < 0 ? NULL : s;
}

/* Byte length of the character at s (n bytes left) if Python's isspace() holds, else 0. */
static size_t
space_len(const unsigned char *s, size_t n)
{
	if (n >= 1 && s[0] < 0x80)
		return (s[0] >= 0x09 && s[0] <= 0x0D) || (s[0] >= 0x1C && s[0] <= 0x20);
	if (n >= 2 && s[0] == 0xC2)
		return s[1] == 0x85 || s[1] == 0xA0 ? 2 : 0;
	if (n >= 3 && s[0] >= 0xE1 && s[0] <= 0xE3 &&
		(s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80)
	{
		uint32_t	c = (uint32_t) (s[0] & 0x0F) << 12 | (s[1] & 0x3F) << 6 | (s[2] & 0x3F);

		if (c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
			c == 0x202F || c == 0x205F || c == 0x3000)
			return 3;
	}
	return 0;
}

/* A malloc'd copy of s[0, n) without leading and trailing whitespace (Python's strip()). */
static char *
strip_dup(const char *s, size_t n)
{
	const unsigned char *b = (const unsigned char *) s,
			   *e = b + n;
	size_t		k;
	char	   *out;

	while (b < e && (k = space_len(b, e - b)) > 0)
		b += k;
	while (e > b)
	{
		const unsigned char *c = e - 1;

		/* back to the lead byte of the last character (at most 3 bytes matter) */
		while (c > b && (*c & 0xC0) == 0x80 && e - c < 3)
			c--;
		if (space_len(c, e - c) != (size_t) (e - c))
			break;
		e = c;
	}
	out = malloc(e - b + 1);
	if (out)
	{
		memcpy(out, b, e - b);
		out[e - b] = '\0';
	}
	return out;
}

/*
 * Search text for pattern (DOTALL); on a match set *out to its group 1, stripped
 * (malloc'd), else to NULL. Returns false only when out of memory.
 */
static bool
regex_group(const char *pattern, const char *text, char **out)
{
	pcre2_code *re;
	pcre2_match_data *md;
	int			errcode;
	PCRE2_SIZE	erroff;
	bool		ok = true;

	*out = NULL;
	/* the patterns are constants: compiling fails only for want of memory */
	re = pcre2_compile((PCRE2_SPTR) pattern, PCRE2_ZERO_TERMINATED, PCRE2_DOTALL,
					   &errcode, &erroff, NULL);
	if (!re)
		return false;
	md = pcre2_match_data_create_from_pattern(re, NULL);
	if (!md)
		ok = false;
	else if (pcre2_match(re, (PCRE2_SPTR) text, strlen(text), 0, 0, md, NULL) > 1)
	{
		PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);

		*out = strip_dup(text + ov[2], ov[3] - ov[2]);
		ok = *out != NULL;
	}
	pcre2_match_data_free(md);
	pcre2_code_free(re);
	return ok;
}

/* The response span, then the regex fallbacks, then the whole text; see prompt.h. */
char *
prompt_extract_response(const char *text)
{
	const char *key = strstr(text, DOLLY_RESPONSE_KEY_NL);
	char	   *r;

	if (key)
	{
		const char *start = key + strlen(DOLLY_RESPONSE_KEY_NL);
		const char *end = strstr(text, DOLLY_END_KEY);

		if (!end)
			end = start + strlen(start);
		/* as the pipeline's slice, an end before the start gives nothing */
		if (end > start)
		{
			r = strip_dup(start, end - start);
			if (!r || r[0])
				return r;
			free(r);
		}
	}
	for (size_t i = 0; i < sizeof(response_patterns) / sizeof(response_patterns[0]); i++)
	{
		if (!regex_group(response_patterns[i], text, &r))
			return NULL;
		if (r)
			return r;
	}
	return strip_dup(text, strlen(text));
}
