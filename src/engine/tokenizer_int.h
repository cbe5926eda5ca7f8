/*
 * tokenizer_int.h: what the tokenizer's source files share; not part of the engine's API.
 *
 * A tokenizer is the tables below (struct dl_tokenizer). tokenizer_tables.c keeps them: it
 * stores strings and ids, indexes contents and merges, and finds added tokens.
 * tokenizer_json.c fills them from a tokenizer.json tree and writes the tree back;
 * tokenizer_files.c reads the older files (vocab.json, merges.txt and the rest) into such a
 * tree, as transformers converts them, so that both kinds of directory end in the same
 * tokenizer. tokenizer.c encodes and decodes with the tables, never writing them, so threads
 * share a tokenizer. The fuzzers call the in-memory entries.
 */
#ifndef DOLLY_TOKENIZER_INT_H
#define DOLLY_TOKENIZER_INT_H

#include <stdbool.h>

#include <json.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/unorm2.h>

#include "tokenizer.h"

/* Ids are array indexes; this bounds what a hostile file can make us allocate. */
#define TOK_MAX_ID			(1 << 24)

/* Byte-level symbols are code points below 256 + 68. */
#define TOK_BYTE_CP_END		324

#define TOK_PRESENT			0x01	/* the id names a token */
#define TOK_IN_VOCAB		0x02	/* ... of the BPE model's vocabulary */
#define TOK_SPECIAL			0x04	/* it is a special added token */

/* Where an id's strings live in the arena. */
typedef struct tok_idinfo
{
	uint32_t	off;			/* content: vocabulary string or added token content */
	uint32_t	len;
	uint32_t	dec_off;		/* the bytes it decodes to */
	uint32_t	dec_len;
	uint8_t		flags;
} tok_idinfo;

/* An added token (tokenizers' AddedToken with its id). */
typedef struct tok_added
{
	int32_t		id;
	uint32_t	pat_off;		/* what is matched: the content, normalized if the token is */
	uint32_t	pat_len;
	bool		special;
	bool		lstrip;
	bool		rstrip;
	bool		single_word;
	bool		normalized;
} tok_added;

/*
 * The added tokens of one kind (normalized or not), ordered by first byte and then longest
 * first, so the first hit at a position is the longest match there.
 */
typedef struct tok_matcher
{
	int32_t    *order;			/* indexes into added[] */
	int32_t		first[257];		/* order[first[b] .. first[b+1]) start with byte b */
} tok_matcher;

/* One merge: the pair (a, b) becomes new_id, with priority rank. */
typedef struct tok_merge
{
	uint64_t	key;			/* a << 32 | b; TOK_EMPTY_KEY when the slot is free */
	int32_t		rank;
	int32_t		new_id;
} tok_merge;

#define TOK_EMPTY_KEY		UINT64_MAX

typedef enum tok_step_kind
{
	TOK_STEP_SPLIT,				/* cut at regex matches, keeping matches and gaps */
	TOK_STEP_PREFIX_SPACE		/* ByteLevel's add_prefix_space */
} tok_step_kind;

typedef struct tok_step
{
	tok_step_kind kind;
	pcre2_code *re;
} tok_step;

struct dl_tokenizer
{
	json_object *root;			/* the parsed file, updated by tok_add_special */

	char	   *arena;			/* all strings, addressed by offset */
	size_t		arena_len;
	size_t		arena_cap;

	tok_idinfo *ids;			/* indexed by id, nids entries */
	int32_t		nids;

	int32_t    *map;			/* content -> id, open addressing; -1 free */
	uint32_t	map_mask;
	uint32_t	map_count;

	tok_merge  *merges;
	uint64_t	merge_mask;

	int32_t		vocab_count;	/* entries in model.vocab */
	tok_added  *added;
	int32_t		nadded;
	tok_matcher match_raw;		/* added tokens with normalized false */
	tok_matcher match_norm;		/* ... and true */

	const UNormalizer2 *norm;	/* NULL: no normalizer */
	tok_step   *steps;
	int			nsteps;
	bool		ignore_merges;

	int32_t		byte_id[256];	/* id of each byte's byte-level symbol */
	uint8_t		byte_utf8[256][2];	/* that symbol in UTF-8 */
	uint8_t		byte_utf8_len[256];
	int16_t		cp_byte[TOK_BYTE_CP_END];	/* byte-level symbol -> byte, -1 if none */
};

/* 64-bit finaliser (MurmurHash3's fmix64). */
static inline uint64_t
tok_hash_mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

/* The merge of the pair (a, b), or NULL; inline, as BPE asks it of every pair of neighbours. */
static inline const tok_merge *
tok_merge_get(const dl_tokenizer *tok, int32_t a, int32_t b)
{
	uint64_t	key = (uint64_t) a << 32 | (uint32_t) b;

	for (uint64_t i = tok_hash_mix(key) & tok->merge_mask;; i = (i + 1) & tok->merge_mask)
	{
		if (tok->merges[i].key == key)
			return &tok->merges[i];
		if (tok->merges[i].key == TOK_EMPTY_KEY)
			return NULL;
	}
}

/* tokenizer_tables.c */

/* Grow *p (of *cap elements of size elem) to hold at least need elements; false when out of memory. */
bool		tok_grow(void **p, size_t *cap, size_t need, size_t elem);

/* Append n bytes to the string arena; their offset goes to *off. */
dl_status	tok_arena_add(dl_tokenizer *tok, const char *s, size_t n, uint32_t *off, dl_error *err);

/* Make sure ids[0 .. n) exist, new entries empty. */
dl_status	tok_ids_reserve(dl_tokenizer *tok, int32_t n, dl_error *err);

/* Id whose content is s[0..n), or -1. */
int32_t		tok_map_get(const dl_tokenizer *tok, const char *s, size_t n);

/*
 * Give id the content s[0..n) with flags (beside TOK_PRESENT); it must not have one and s
 * must not name another id. what names the source in messages.
 */
dl_status	tok_define_id(dl_tokenizer *tok, int32_t id, const char *s, size_t n, uint8_t flags,
						  const char *what, dl_error *err);

/* Record a merge; a pair listed twice keeps its last rank, as tokenizers' HashMap does. */
void		tok_merge_put(dl_tokenizer *tok, int32_t a, int32_t b, int32_t rank, int32_t new_id);

/*
 * The id that tokenizers gives new added content (AddedVocabulary::add_tokens): the vocabulary's
 * size, or one past the highest added id when that is higher.
 */
int32_t		tok_next_added_id(const dl_tokenizer *tok);

/*
 * Set what id decodes to from its string arena[off..off+len) (tokenizers' ByteLevel decoder):
 * the bytes behind its byte-level symbols when every character is one, else the string.
 */
dl_status	tok_set_decoding(dl_tokenizer *tok, int32_t id, uint32_t off, uint32_t slen, dl_error *err);

/* (Re)build the matcher m for the added tokens whose normalized flag is normalized. */
dl_status	tok_matcher_build(dl_tokenizer *tok, tok_matcher *m, bool normalized, dl_error *err);

/* Leftmost-longest added token of m in s[from..n): its index in added[] (its start in *at), or -1. */
int32_t		tok_matcher_find(const dl_tokenizer *tok, const tok_matcher *m, const char *s, size_t from,
							 size_t n, size_t *at);

/* The byte-level alphabet (MODEL_SPEC.md section 7) and each byte's id in vocab_name. */
dl_status	tok_setup_bytes(dl_tokenizer *tok, const char *vocab_name, dl_error *err);

/* tokenizer.c */

/* Normalize valid UTF-8 s[0..n) by tok's normalizer into a malloc'd *out of *outn bytes. */
dl_status	tok_normalize(const dl_tokenizer *tok, const char *s, size_t n, char **out, size_t *outn,
						  dl_error *err);

/* tokenizer_json.c */

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

/* tokenizer_files.c */

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
