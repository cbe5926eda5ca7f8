/*
 * test_prompt.c: Dolly's templates byte for byte (MODEL_SPEC.md section 1, dolly's
 * training/consts.py) and the pipeline's response extraction. The expected responses
 * are what dolly's postprocess (token search, then Python's re and str.strip) gives.
 */
#include "harness.h"
#include "../../src/engine/prompt.h"

#include <stdlib.h>
#include <string.h>

#define BLURB "Below is an instruction that describes a task. Write a response that " \
	"appropriately completes the request."
#define PROMPT BLURB "\n\n### Instruction:\nName a city.\n\n### Response:\n"

TEST(prompt_constants)
{
	CHECK(strcmp(DOLLY_INTRO_BLURB, BLURB) == 0);
	CHECK(strcmp(DOLLY_INSTRUCTION_KEY, "### Instruction:") == 0);
	CHECK(strcmp(DOLLY_INPUT_KEY, "Input:") == 0);
	CHECK(strcmp(DOLLY_RESPONSE_KEY, "### Response:") == 0);
	CHECK(strcmp(DOLLY_END_KEY, "### End") == 0);
	CHECK(strcmp(DOLLY_RESPONSE_KEY_NL, "### Response:\n") == 0);
}

TEST(prompt_templates)
{
	static const struct
	{
		const char *instruction,
				   *context,
				   *response,
				   *prompt,
				   *record;
	}			cases[] = {
		{"Name a city.", NULL, "Paris.", PROMPT, PROMPT "Paris.\n\n### End"},
		{"Name a city.", "", "Paris.", PROMPT, PROMPT "Paris.\n\n### End"},
		{"Summarise.", "Cats sleep.\nA lot.", "They sleep.",
			BLURB "\n\n### Instruction:\nSummarise.\n\nInput:\nCats sleep.\nA lot.\n\n### Response:\n",
		BLURB "\n\n### Instruction:\nSummarise.\n\nInput:\nCats sleep.\nA lot.\n\n### Response:\n"
		"They sleep.\n\n### End"},
		/* user text is data, never a format */
		{"100% %s sure", "%d", "%n",
			BLURB "\n\n### Instruction:\n100% %s sure\n\nInput:\n%d\n\n### Response:\n",
		BLURB "\n\n### Instruction:\n100% %s sure\n\nInput:\n%d\n\n### Response:\n%n\n\n### End"},
		{NULL, NULL, NULL, BLURB "\n\n### Instruction:\n\n\n### Response:\n",
		BLURB "\n\n### Instruction:\n\n\n### Response:\n\n\n### End"},
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
	{
		char	   *p = prompt_format(cases[i].instruction, cases[i].context);
		char	   *r = prompt_format_record(cases[i].instruction, cases[i].context,
											 cases[i].response);
		int			same_p = p && strcmp(p, cases[i].prompt) == 0,
					same_r = r && strcmp(r, cases[i].record) == 0;

		free(p);
		free(r);
		CHECKF(same_p && same_r, "case %zu: prompt %s, record %s", i,
			   same_p ? "ok" : "differs", same_r ? "ok" : "differs");
	}
}

TEST(prompt_extract_response_cases)
{
	static const struct
	{
		const char *text,
				   *response;
	}			cases[] = {
		/* between the keys */
		{PROMPT "Paris is the capital.\n\n### End", "Paris is the capital."},
		{PROMPT "Paris is the capital.\n\n### End<|endoftext|>junk", "Paris is the capital."},
		/* no end: everything after the key */
		{PROMPT "  Paris\n", "Paris"},
		{PROMPT "Line one.\n### Response:\nnot a second key\n### End",
		"Line one.\n### Response:\nnot a second key"},
		/* an end before the key leaves the span empty: the first regex */
		{"say ### End\n\n### Response:\nok\n\n### End", "ok"},
		/* no exact key: the regexes */
		{"## Response: hello world #End trailing", "hello world"},
		{"#Response:x#End", "x"},
		{"#Response:\tfoo\nbar  ", "foo\nbar"},
		/* an empty response: the first regex then takes a '#', as the pipeline does */
		{PROMPT "   \n### End", "#"},
		{PROMPT "### End", "#"},
		{"#### Response:\n\n#### End", "#"},
		/* nothing to find: the whole text, stripped */
		{"", ""},
		{"  just text \n", "just text"},
		/* Python's whitespace: no-break and ideographic spaces, separators, \x1c-\x1f */
		{PROMPT "\u00a0Hi\u3000\u2028\n### End", "Hi"},
		{"### Response:\n\x1c\x1fspaced\x1d ### End", "spaced"},
		{"### Response:\n\u00e9t\u00e9\u2003", "\u00e9t\u00e9"},
		/* invalid UTF-8 is carried along (Python would see U+FFFD there) */
		{"### Response:\nab\xff\xfe\n", "ab\xff\xfe"},
		{"## Response: \xc3(\xff #End", "\xc3(\xff"},
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
	{
		char	   *r = prompt_extract_response(cases[i].text);
		int			same = r && strcmp(r, cases[i].response) == 0;

		CHECKF(same, "case %zu: got \"%s\", want \"%s\"", i, r ? r : "(null)",
			   cases[i].response);
		free(r);
	}
}
