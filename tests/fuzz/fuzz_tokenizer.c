/*
 * fuzz_tokenizer.c: libFuzzer target for the tokenizer readers (tokenizer.json, and the older
 * vocab.json + merges.txt files), and for encoding and decoding with whatever loads.
 *
 * An input holding the byte 0x1e is the older files, split at it in the order of
 * tok_file_names (vocab.json, merges.txt, added_tokens.json, special_tokens_map.json,
 * tokenizer_config.json; files past the last part are absent); any other input is a
 * tokenizer.json, in which that byte cannot stand.
 *
 * Build and run from the repository root (seeds: the fixture tokenizers):
 *
 *   make build/fuzz/fuzz_tokenizer
 *   mkdir -p /tmp/fuzz_tok_corpus && cp tests/fixtures/tokenizer/tokenizer*.json /tmp/fuzz_tok_corpus/
 *   for d in tests/fixtures/tokenizer-legacy*; do
 *       for f in vocab.json merges.txt added_tokens.json special_tokens_map.json \
 *           tokenizer_config.json; do cat $d/$f; printf ''; done > /tmp/fuzz_tok_corpus/$(basename $d)
 *   done
 *   build/fuzz/fuzz_tokenizer -max_len=65536 -max_total_time=300 -timeout=10 /tmp/fuzz_tok_corpus
 */
#include "tokenizer_int.h"

#include <stdlib.h>
#include <string.h>

/* Texts that reach the added-token, regex and normalization paths of most tokenizers. */
static const char *const texts[] = {
	"Hello world, it's 2024!  \n\n\t  ### Instruction:\nx\n\n### Response:\n",
	"e\xCC\x81t\xC3\xA9 \xE2\x80\x83 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80\xE1\xA0\x8E<|endoftext|>",
	"   ",
};

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Load the input as a tokenizer.json, or as the older files where it holds 0x1e. */
static dl_status
parse_input(const uint8_t *data, size_t size, dl_tokenizer **tok, dl_error *err)
{
	tok_files	files = {0};
	const char *s = (const char *) data,
			   *end = s + size;

	if (memchr(data, 0x1e, size) == NULL)
		return tok_parse(s, size, tok, err);
	for (int f = 0; f < TOK_NFILES && s <= end; f++)
	{
		const char *sep = memchr(s, 0x1e, end - s);

		files.text[f] = s;
		files.len[f] = sep ? (size_t) (sep - s) : (size_t) (end - s);
		s += files.len[f] + 1;
	}
	return tok_parse_files(&files, tok, err);
}

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

	if (parse_input(data, size, &tok, &err) != DL_OK)
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
