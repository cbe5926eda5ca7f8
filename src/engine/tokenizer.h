/*
 * tokenizer.h: GPT-2 byte-level BPE as stored in a Hugging Face tokenizer.json (or, in older
 * repositories, vocab.json and merges.txt).
 *
 * Added tokens are split out of the text first (longest match, honouring lstrip/rstrip);
 * the rest is pre-tokenised with GPT-2's regex (PCRE2, Unicode), mapped to the byte-level
 * alphabet and merged by rank. Decoding maps back to bytes; invalid UTF-8 in the output
 * is replaced by U+FFFD. Results must equal Hugging Face `tokenizers` exactly.
 */
#ifndef DOLLY_TOKENIZER_H
#define DOLLY_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef struct dl_tokenizer dl_tokenizer;

/* Load tokenizer.json from path. */
dl_status	tok_load(const char *path, dl_tokenizer **out, dl_error *err);

/*
 * Load the tokenizer of the model directory dir: its tokenizer.json, or where it has none
 * the older vocab.json and merges.txt (with added_tokens.json, special_tokens_map.json and
 * tokenizer_config.json), read as transformers' GPT2Tokenizer reads them.
 */
dl_status	tok_load_dir(const char *dir, dl_tokenizer **out, dl_error *err);

/* Load from JSON text in memory (len bytes); used by tok_load and the fuzzer. */
dl_status	tok_parse(const char *json, size_t len, dl_tokenizer **out, dl_error *err);

void		tok_free(dl_tokenizer *tok);

/*
 * Encode len bytes of UTF-8 text. *ids is malloc'd (caller frees), *n its length.
 * Invalid UTF-8 in the input is an error (DL_EINVAL).
 */
dl_status	tok_encode(const dl_tokenizer *tok, const char *text, size_t len,
					   int32_t **ids, int *n, dl_error *err);

/*
 * Decode n ids to a malloc'd NUL-terminated UTF-8 string (caller frees), with invalid
 * sequences replaced by U+FFFD. Ids the tokenizer does not know (padded embedding rows)
 * decode to nothing, as in `tokenizers`; negative ids are an error. With skip_special,
 * added tokens marked special are left out (as transformers' skip_special_tokens).
 */
dl_status	tok_decode(const dl_tokenizer *tok, const int32_t *ids, int n, int skip_special,
					   char **text, dl_error *err);

/* tok_decode, also giving the text's length: it contains a NUL where a token decodes to byte 0. */
dl_status	tok_decode_len(const dl_tokenizer *tok, const int32_t *ids, int n, int skip_special,
						   char **text, size_t *text_len, dl_error *err);

/* Id of a token given its exact content (vocabulary entry or added token); -1 if none. */
int32_t		tok_token_id(const dl_tokenizer *tok, const char *content);

/* Number of ids the tokenizer knows (max id + 1 over vocabulary and added tokens). */
int			tok_vocab_size(const dl_tokenizer *tok);

/*
 * Add a special token (as tokenizer.add_special_tokens does) if not present; its id is
 * the next free id. Returns the id in *id. Used by fine-tuning (Dolly's three keys).
 */
dl_status	tok_add_special(dl_tokenizer *tok, const char *content, int32_t *id, dl_error *err);

/* Write the tokenizer (with any added tokens) back as tokenizer.json at path. */
dl_status	tok_save(const dl_tokenizer *tok, const char *path, dl_error *err);

#endif
