/*
 * tokenizer_int.h: what the tokenizer's source files share; not part of the engine's API.
 *
 * tokenizer.c builds a tokenizer from a tokenizer.json tree. tokenizer_files.c reads the
 * older files (vocab.json, merges.txt and the rest) into such a tree, as transformers
 * converts them, so that both kinds of directory end in the same tokenizer and the same
 * encoder. The fuzzers call the in-memory entries.
 */
#ifndef DOLLY_TOKENIZER_INT_H
#define DOLLY_TOKENIZER_INT_H

#include <stdbool.h>

#include <json.h>

#include "tokenizer.h"

/* Ids are array indexes; this bounds what a hostile file can make us allocate. */
#define TOK_MAX_ID			(1 << 24)


/* Parse len bytes of JSON strictly: valid UTF-8, one value, nothing but spaces after it. */
dl_status	tok_json_parse(const char *text, size_t len, json_object **out, dl_error *err);

/* Member key of object obj, or NULL when absent or JSON null. */
json_object *tok_json_member(json_object *obj, const char *key);

/* Read boolean member key of obj into *out (def when absent); what names obj in messages. */
dl_status	tok_json_bool(json_object *obj, const char *key, bool def, bool *out, const char *what,
						  dl_error *err);

/* Read a token id (an integer in [0, TOK_MAX_ID)) from v, the id of content in what. */
dl_status	tok_json_id(json_object *v, int32_t *id, const char *what, const char *content,
						dl_error *err);


/* Put "<prefix>: " before the message of the failure st in err, keeping its hint. */
dl_status	tok_fail_in(dl_error *err, dl_status st, const char *fmt,...)
			__attribute__((format(printf, 3, 4)));

/*
 * Build a tokenizer from a parsed tokenizer.json, which it takes over (and frees on failure).
 * vocab_name is what messages call the vocabulary ("model.vocab", "vocab.json").
 */
dl_status	tok_from_json(json_object *root, const char *vocab_name, dl_tokenizer **out,
						  dl_error *err);

/* The older tokenizer files of a model directory, in the order tok_file_names lists them. */
typedef enum tok_file
{
	TOK_VOCAB,					/* vocab.json: token -> id */
	TOK_MERGES,					/* merges.txt: "a b" per line, by rank */
	TOK_ADDED,					/* added_tokens.json: content -> id */
	TOK_SPECIAL_MAP,			/* special_tokens_map.json */
	TOK_CONFIG,					/* tokenizer_config.json */
	TOK_NFILES
} tok_file;

extern const char *const tok_file_names[TOK_NFILES];

/* Their contents: text[f] of len[f] bytes, NULL when the file is absent. */
typedef struct tok_files
{
	const char *text[TOK_NFILES];
	size_t		len[TOK_NFILES];
} tok_files;

/* Build the tokenizer that transformers' GPT2Tokenizer makes of those files. */
dl_status	tok_parse_files(const tok_files *files, dl_tokenizer **out, dl_error *err);

#endif
