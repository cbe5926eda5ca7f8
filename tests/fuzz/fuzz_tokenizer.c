/*
 * fuzz_tokenizer.c: libFuzzer target for the tokenizer.json loader, and for encoding and
 * decoding with whatever loads.
 *
 * Build and run from the repository root (seeds: the fixture tokenizers):
 *
 *   make build/fuzz/fuzz_tokenizer
 *   mkdir -p /tmp/fuzz_tok_corpus && cp tests/fixtures/tokenizer/tokenizer*.json /tmp/fuzz_tok_corpus/
 *   build/fuzz/fuzz_tokenizer -max_len=65536 -max_total_time=300 -timeout=10 /tmp/fuzz_tok_corpus
 */
#include "tokenizer.h"

#include <stdlib.h>
#include <string.h>

/* Texts that reach the added-token, regex and normalization paths of most tokenizers. */
static const char *const texts[] = {
	"Hello world, it's 2024!  \n\n\t  ### Instruction:\nx\n\n### Response:\n",
	"e\xCC\x81t\xC3\xA9 \xE2\x80\x83 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80\xE1\xA0\x8E<|endoftext|>",
	"   ",
};

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	dl_tokenizer *tok;
	dl_error	err;
	int32_t    *ids;
	int			n;
	char	   *text;
	int32_t		raw[64];
	int32_t		id;
	int			nraw = 0;

	if (tok_parse((const char *) data, size, &tok, &err) != DL_OK)
		return 0;

	/* the file itself is text that uses its own vocabulary; it may be invalid UTF-8 */
	if (tok_encode(tok, (const char *) data, size, &ids, &n, &err) == DL_OK)
	{
		if (tok_decode(tok, ids, n, 1, &text, &err) == DL_OK)
			free(text);
		free(ids);
	}
	for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++)
	{
		dl_status	st = tok_encode(tok, texts[i], strlen(texts[i]), &ids, &n, &err);

		/* valid UTF-8 always encodes, unless a regex from the file gives up on it */
		if (st == DL_EUNSUPPORTED)
			continue;
		if (st != DL_OK || tok_decode(tok, ids, n, 0, &text, &err) != DL_OK)
			abort();
		free(text);
		free(ids);
	}

	/* ids from the input's bytes: in range, out of range and negative */
	for (size_t i = 0; i + 1 < size && nraw < 64; i += 2)
		raw[nraw++] = (int32_t) (((data[i] << 8) | data[i + 1]) % (tok_vocab_size(tok) + 16)) - 1;
	if (tok_decode(tok, raw, nraw, nraw & 1, &text, &err) == DL_OK)
		free(text);

	if (tok_add_special(tok, "### End", &id, &err) == DL_OK &&
		tok_encode(tok, "a### Endb", 9, &ids, &n, &err) == DL_OK)
		free(ids);
	tok_free(tok);
	return 0;
}
