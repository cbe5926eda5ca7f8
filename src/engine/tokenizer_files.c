/*
 * tokenizer_files.c: a model directory's tokenizer: tokenizer.json when there is one, else the
 * older files that GPT-2 style repositories shipped (vocab.json, merges.txt, added_tokens.json,
 * special_tokens_map.json, tokenizer_config.json), read as transformers 5's GPT2Tokenizer
 * reads them.
 *
 * transformers makes a byte-level BPE of vocab.json and merges.txt (tokenizers'
 * BPE::read_file), then adds tokens in this order (TokenizersBackend.__init__): the ones that
 * tokenizer_config.json's added_tokens_decoder lists or, in files saved before that existed,
 * added_tokens.json, ordered by their ids there; then each named special token (bos, eos,
 * unk, sep, pad, cls, mask; GPT2Tokenizer makes bos, eos and unk <|endoftext|>) and each
 * extra special token whose content is not added yet. tokenizers numbers them itself: an id
 * in the files only places a token in that order. The files become the tokenizer.json tree
 * of that tokenizer, and tokenizer_json.c builds the tokenizer from it, so encoding, decoding
 * and tok_save are those of a tokenizer.json.
 *
 * Where transformers makes something of a damaged file, this refuses it with a message that
 * names the file: ids that are not integers in vocab.json (tokenizers skips them) or in
 * added_tokens.json, and two tokens with one id.
 */
#include "tokenizer_int.h"
#include "files.h"
#include "utf8.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

const char *const tok_file_names[TOK_NFILES] = {
	"vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json",
	"tokenizer_config.json"
};

/* GPT2Tokenizer's bos, eos and unk unless the files say otherwise. */
#define GPT2_EOT			"<|endoftext|>"

/* transformers' special token attributes, in the order it adds their tokens, with defaults. */
static const struct
{
	const char *key;
	const char *gpt2_default;
}			named_keys[] = {
	{"bos_token", GPT2_EOT}, {"eos_token", GPT2_EOT}, {"unk_token", GPT2_EOT}, {"sep_token", NULL},
	{"pad_token", NULL}, {"cls_token", NULL}, {"mask_token", NULL}
};

#define NSTANDARD			(int) (sizeof(named_keys) / sizeof(named_keys[0]))

/* Which keys read_named takes: transformers gathers a model's own "*_token" keys in passes. */
#define NAMED_STANDARD		0x01	/* those of named_keys */
#define NAMED_OTHER_OBJECTS 0x02	/* other "*_token" keys whose value is an AddedToken */
#define NAMED_OTHER_STRINGS 0x04	/* ... or a string */

/* What tok_parse_files fills in with the vocabulary, merges, added tokens and prefix space. */
static const char tokenizer_json[] =
	"{\"version\": \"1.0\", \"truncation\": null, \"padding\": null, \"added_tokens\": [],"
	" \"normalizer\": null,"
	" \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true,"
	" \"use_regex\": true},"
	" \"post_processor\": null,"
	" \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true,"
	" \"use_regex\": true},"
	" \"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null,"
	" \"continuing_subword_prefix\": \"\", \"end_of_word_suffix\": \"\", \"fuse_unk\": false,"
	" \"byte_fallback\": false, \"ignore_merges\": false}}";

/* A token as transformers' AddedToken holds it. */
typedef struct legacy_token
{
	const char *content;		/* owned by a parsed file, or GPT2_EOT */
	int64_t		index;			/* its id in the files: where it comes in the order of adding */
	int			seq;			/* its place in the files, to break ties of index */
	bool		special;
	bool		normalized;
	bool		lstrip;
	bool		rstrip;
	bool		single_word;
} legacy_token;

/* A special token attribute: one of named_keys, or a model's own such as "image_token". */
typedef struct legacy_named
{
	const char *key;			/* owned by a parsed file, or named_keys */
	legacy_token token;
	bool		has;			/* false: none (null, or no default) */
	bool		in_files;		/* set by a file rather than by GPT2Tokenizer's default */
} legacy_named;

/* The tokens to add, and what the files say about special tokens, as transformers merges it. */
typedef struct legacy_tokens
{
	legacy_token *list;			/* added tokens first, then named and extra ones to add */
	int			n;
	int			cap;
	legacy_named *named;		/* named_keys first, then the others in transformers' order */
	int			nnamed;
	legacy_token *extra;		/* extra special tokens */
	int			nextra;
	int			extra_cap;
	bool		has_extra;		/* a file lists extra special tokens (maybe none) */
} legacy_tokens;

/* Append t to the array *list of *n entries (*cap allocated). */
static dl_status
push_token(legacy_token **list, int *n, int *cap, const legacy_token *t, dl_error *err)
{
	if (*n == *cap)
	{
		int			ncap = *cap ? 2 * *cap : 16;
		legacy_token *p = realloc(*list, (size_t) ncap * sizeof(legacy_token));

		if (p == NULL)
			return dl_fail(err, DL_ENOMEM, "out of memory reading added tokens");
		*list = p;
		*cap = ncap;
	}
	(*list)[(*n)++] = *t;
	return DL_OK;
}

/*
 * Read token key of file as transformers does: a string is a special token that is not
 * normalized (AddedToken(s, special=True)); an object is AddedToken(**object), whose special
 * is forced (special_tokens_map.json's) or read, and whose normalized defaults to !special.
 */
static dl_status
read_token(json_object *v, bool force_special, const char *file, const char *key, legacy_token *t,
		   dl_error *err)
{
	json_object *c = tok_json_member(v, "content");
	dl_status	st;

	memset(t, 0, sizeof(*t));
	if (json_object_is_type(v, json_type_string))
	{
		t->content = json_object_get_string(v);
		t->special = true;
		return DL_OK;
	}
	if (!json_object_is_type(v, json_type_object) || c == NULL || !json_object_is_type(c, json_type_string))
		return dl_fail(err, DL_EFORMAT, "%s: %s is neither a string nor an object with a \"content\" string",
					   file, key);
	t->content = json_object_get_string(c);
	if (force_special)
		t->special = true;
	else if ((st = tok_json_bool(v, "special", false, &t->special, file, err)) != DL_OK)
		return st;
	if ((st = tok_json_bool(v, "normalized", !t->special, &t->normalized, file, err)) != DL_OK ||
		(st = tok_json_bool(v, "lstrip", false, &t->lstrip, file, err)) != DL_OK ||
		(st = tok_json_bool(v, "rstrip", false, &t->rstrip, file, err)) != DL_OK ||
		(st = tok_json_bool(v, "single_word", false, &t->single_word, file, err)) != DL_OK)
		return st;
	return DL_OK;
}

/* Append the tokens of array member key of obj (absent or null: nothing) to the extra tokens. */
static dl_status
read_extra(legacy_tokens *lt, json_object *obj, const char *key, bool force_special, const char *file,
		   dl_error *err)
{
	json_object *arr = tok_json_member(obj, key);
	dl_status	st;

	if (arr == NULL)
		return DL_OK;
	if (!json_object_is_type(arr, json_type_array))
		return dl_fail(err, DL_EFORMAT, "%s: \"%s\" is not an array", file, key);
	lt->has_extra = true;
	for (size_t i = 0; i < json_object_array_length(arr); i++)
	{
		legacy_token t;

		if ((st = read_token(json_object_array_get_idx(arr, i), force_special, file, key, &t, err)) != DL_OK ||
			(st = push_token(&lt->extra, &lt->nextra, &lt->extra_cap, &t, err)) != DL_OK)
			return st;
	}
	return DL_OK;
}

/*
 * Read the special token attributes of obj (a file) that which selects; a null one is none.
 * A key read again keeps its place and takes the new value.
 */
static dl_status
read_named(legacy_tokens *lt, json_object *obj, bool force_special, const char *file, int which,
		   dl_error *err)
{
	if (obj == NULL)
		return DL_OK;
	json_object_object_foreach(obj, key, v)
	{
		legacy_named *nm = NULL;
		size_t		len = strlen(key);
		dl_status	st;

		for (int k = 0; k < lt->nnamed && nm == NULL; k++)
			if (strcmp(lt->named[k].key, key) == 0)
				nm = &lt->named[k];
		if (nm != NULL && nm < lt->named + NSTANDARD)
		{
			if (!(which & NAMED_STANDARD))
				continue;
		}
		else if (len < 6 || strcmp(key + len - 6, "_token") != 0 ||
				 !(json_object_is_type(v, json_type_string) ? which & NAMED_OTHER_STRINGS :
				   tok_json_member(v, "content") != NULL && (which & NAMED_OTHER_OBJECTS)))
			continue;
		if (nm == NULL)
		{
			nm = &lt->named[lt->nnamed++];
			nm->key = key;
		}
		nm->in_files = true;
		nm->has = v != NULL;
		if (v != NULL && (st = read_token(v, force_special, file, key, &nm->token, err)) != DL_OK)
			return st;
	}
	return DL_OK;
}

/* Order tokens by their index, then by their place in the files. */
static int
token_cmp(const void *pa, const void *pb)
{
	const legacy_token *a = pa,
			   *b = pb;

	if (a->index != b->index)
		return a->index < b->index ? -1 : 1;
	return a->seq < b->seq ? -1 : a->seq > b->seq;
}

/*
 * Sort the added tokens by index; of several with one index the last in the files stays, as
 * in the dict that transformers reads them into.
 */
static void
sort_added(legacy_tokens *lt)
{
	int			n = 0;

	qsort(lt->list, lt->n, sizeof(legacy_token), token_cmp);
	for (int i = 0; i < lt->n; i++)
	{
		if (n > 0 && lt->list[n - 1].index == lt->list[i].index)
			n--;
		lt->list[n++] = lt->list[i];
	}
	lt->n = n;
}

/* tokenizer_config.json's added_tokens_decoder: {"id": AddedToken, ...}. */
static dl_status
read_decoder(legacy_tokens *lt, json_object *decoder, dl_error *err)
{
	const char *file = tok_file_names[TOK_CONFIG];

	json_object_object_foreach(decoder, key, v)
	{
		legacy_token t;
		char	   *end;
		long long	index;
		dl_status	st;

		errno = 0;
		index = strtoll(key, &end, 10);
		if (end == key || *end != '\0' || errno != 0)
			return dl_fail(err, DL_EFORMAT, "%s: added_tokens_decoder key \"%s\" is not an id", file, key);
		if ((st = read_token(v, false, file, "an added_tokens_decoder entry", &t, err)) != DL_OK)
			return st;
		t.index = index;
		t.seq = lt->n;
		if ((st = push_token(&lt->list, &lt->n, &lt->cap, &t, err)) != DL_OK)
			return st;
	}
	sort_added(lt);
	return DL_OK;
}

/* Whether content names a special token in the files (transformers' test for added_tokens.json). */
static bool
named_in_files(const legacy_tokens *lt, const char *content)
{
	for (int k = 0; k < NSTANDARD; k++)
		if (lt->named[k].in_files && lt->named[k].has && strcmp(lt->named[k].token.content, content) == 0)
			return true;
	for (int i = 0; i < lt->nextra; i++)
		if (strcmp(lt->extra[i].content, content) == 0)
			return true;
	return false;
}

/*
 * added_tokens.json: {content: id, ...}. A token is special, and then not normalized, when
 * the files name it a special token.
 */
static dl_status
read_added_file(legacy_tokens *lt, json_object *added, dl_error *err)
{
	const char *file = tok_file_names[TOK_ADDED];

	if (!json_object_is_type(added, json_type_object))
		return dl_fail(err, DL_EFORMAT, "%s is not an object of token and id", file);
	json_object_object_foreach(added, key, v)
	{
		legacy_token t = {0};
		int32_t		id;
		dl_status	st;

		if ((st = tok_json_id(v, &id, file, key, err)) != DL_OK)
			return st;
		t.content = key;
		t.index = id;
		t.seq = lt->n;
		t.special = named_in_files(lt, key);
		t.normalized = !t.special;
		if ((st = push_token(&lt->list, &lt->n, &lt->cap, &t, err)) != DL_OK)
			return st;
	}
	sort_added(lt);
	return DL_OK;
}

/* Whether the first n entries of list hold content. */
static bool
listed(const legacy_token *list, int n, const char *content)
{
	for (int i = 0; i < n; i++)
		if (strcmp(list[i].content, content) == 0)
			return true;
	return false;
}

/*
 * Gather the tokens to add from the config (cfg), special_tokens_map.json (map) and
 * added_tokens.json (added), any of them NULL when absent.
 */
static dl_status
gather_tokens(legacy_tokens *lt, json_object *cfg, json_object *map, json_object *added, dl_error *err)
{
	const char *cfg_name = tok_file_names[TOK_CONFIG],
			   *map_name = tok_file_names[TOK_SPECIAL_MAP];
	json_object *decoder = tok_json_member(cfg, "added_tokens_decoder");
	int			nadded;
	dl_status	st;

	/* room for named_keys and every key of the two files */
	lt->named = calloc(NSTANDARD + (cfg ? json_object_object_length(cfg) : 0) +
					   (map ? json_object_object_length(map) : 0), sizeof(legacy_named));
	if (lt->named == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory reading special tokens");
	for (lt->nnamed = 0; lt->nnamed < NSTANDARD; lt->nnamed++)
		lt->named[lt->nnamed].key = named_keys[lt->nnamed].key;

	/* transformers 5 reads additional_special_tokens as extra_special_tokens */
	if ((st = read_named(lt, cfg, false, cfg_name, NAMED_STANDARD | NAMED_OTHER_OBJECTS, err)) != DL_OK ||
		(st = read_extra(lt, cfg, "extra_special_tokens", false, cfg_name, err)) != DL_OK ||
		(!lt->has_extra &&
		 (st = read_extra(lt, cfg, "additional_special_tokens", false, cfg_name, err)) != DL_OK))
		return st;
	if (decoder != NULL)
	{
		/* transformers >= 4.34 saved the added tokens here, and then the older files are not read */
		if (!json_object_is_type(decoder, json_type_object))
			return dl_fail(err, DL_EFORMAT, "%s: \"added_tokens_decoder\" is not an object", cfg_name);
		if ((st = read_decoder(lt, decoder, err)) != DL_OK)
			return st;
	}
	else
	{
		/*
		 * special_tokens_map.json's special tokens replace the config's. Its
		 * additional_special_tokens count only where no file lists extra ones, and only
		 * after added_tokens.json is read, so they do not make its tokens special.
		 */
		if (map != NULL && !json_object_is_type(map, json_type_object))
			return dl_fail(err, DL_EFORMAT, "%s is not an object", map_name);
		if ((st = read_named(lt, map, true, map_name,
							 NAMED_STANDARD | NAMED_OTHER_OBJECTS | NAMED_OTHER_STRINGS, err)) != DL_OK ||
			(st = read_extra(lt, map, "extra_special_tokens", true, map_name, err)) != DL_OK ||
			(added != NULL && (st = read_added_file(lt, added, err)) != DL_OK) ||
			(!lt->has_extra &&
			 (st = read_extra(lt, map, "additional_special_tokens", true, map_name, err)) != DL_OK))
			return st;
	}
	if ((st = read_named(lt, cfg, false, cfg_name, NAMED_OTHER_STRINGS, err)) != DL_OK)
		return st;

	/* then the named and extra special tokens that are not added yet */
	nadded = lt->n;
	for (int k = 0; k < lt->nnamed; k++)
	{
		legacy_named *nm = &lt->named[k];

		if (!nm->in_files && k < NSTANDARD && named_keys[k].gpt2_default != NULL)
		{
			nm->token = (legacy_token) {.content = named_keys[k].gpt2_default,.special = true};
			nm->has = true;
		}
		if (nm->has && !listed(lt->list, nadded, nm->token.content) &&
			(st = push_token(&lt->list, &lt->n, &lt->cap, &nm->token, err)) != DL_OK)
			return st;
	}
	for (int i = 0; i < lt->nextra; i++)
		if (!listed(lt->list, nadded, lt->extra[i].content) &&
			(st = push_token(&lt->list, &lt->n, &lt->cap, &lt->extra[i], err)) != DL_OK)
			return st;

	/* any token with a named token's content is special */
	for (int i = 0; i < lt->n; i++)
		for (int k = 0; k < lt->nnamed; k++)
			if (lt->named[k].has && strcmp(lt->list[i].content, lt->named[k].token.content) == 0)
				lt->list[i].special = true;
	return DL_OK;
}

/* Whether vocab has the key s, of n bytes (a NUL in them: no key). */
static bool
in_vocab(json_object *vocab, const char *s, size_t n)
{
	return strlen(s) == n && json_object_object_get_ex(vocab, s, NULL);
}

/*
 * merges.txt as tokenizers' BPE::read_file reads it: lines end with \n or \r\n (the last one
 * maybe with neither); lines that start with "#version" are skipped; every other line is two
 * tokens separated by one space, ranked in file order, and both tokens and their
 * concatenation must be in vocab. The merges become "a b" strings in *out.
 */
static dl_status
read_merges(const char *text, size_t len, json_object *vocab, json_object **out, dl_error *err)
{
	const char *file = tok_file_names[TOK_MERGES];
	size_t		bad = utf8_invalid_at(text, len),
				pos = 0;
	char	   *parts = malloc(2 * len + 1);	/* "a\0b\0ab\0" of a line */
	json_object *merges = json_object_new_array();
	dl_status	st = DL_OK;

	if (parts == NULL || merges == NULL)
		st = dl_fail(err, DL_ENOMEM, "out of memory reading %s", file);
	for (int line = 1; st == DL_OK && pos < len; line++)
	{
		const char *s = text + pos;
		const char *nl = memchr(s, '\n', len - pos);
		size_t		n = nl ? (size_t) (nl - s) : len - pos;
		const char *sp;
		char	   *a = parts,
				   *b,
				   *ab,
				   *missing;
		size_t		alen,
					blen;
		json_object *m;

		if (bad < pos + n)
		{
			st = dl_fail(err, DL_EFORMAT, "%s is not valid UTF-8 at line %d", file, line);
			break;
		}
		pos += n + (nl != NULL);
		if (nl != NULL && n > 0 && s[n - 1] == '\r')
			n--;
		if (n >= 8 && memcmp(s, "#version", 8) == 0)
			continue;
		sp = memchr(s, ' ', n);
		if (sp == NULL || memchr(sp + 1, ' ', n - (sp + 1 - s)) != NULL)
		{
			st = dl_fail(err, DL_EFORMAT, "%s line %d (\"%.*s\") is not two tokens separated by one space",
						 file, line, (int) n, s);
			break;
		}
		alen = sp - s;
		blen = n - alen - 1;
		b = a + alen + 1;
		ab = b + blen + 1;
		memcpy(a, s, alen);
		memcpy(b, sp + 1, blen);
		memcpy(ab, s, alen);
		memcpy(ab + alen, sp + 1, blen);
		a[alen] = b[blen] = ab[alen + blen] = '\0';
		missing = !in_vocab(vocab, a, alen) ? a : !in_vocab(vocab, b, blen) ? b :
			!in_vocab(vocab, ab, alen + blen) ? ab : NULL;
		if (missing != NULL)
		{
			st = dl_fail(err, DL_EFORMAT, "%s line %d (\"%s %s\") needs \"%s\", which %s does not have",
						 file, line, a, b, missing, tok_file_names[TOK_VOCAB]);
			dl_hint(err, "The files merges.txt and vocab.json must come from the same tokenizer; download both again from the model's repository.");
			break;
		}
		m = json_object_new_string_len(s, (int) n);
		if (m == NULL || json_object_array_add(merges, m) != 0)
		{
			json_object_put(m);
			st = dl_fail(err, DL_ENOMEM, "out of memory reading %s", file);
		}
	}
	free(parts);
	if (st != DL_OK)
	{
		json_object_put(merges);
		merges = NULL;
	}
	*out = merges;
	return st;
}

/* vocab.json: an object of token and id. */
static dl_status
check_vocab(json_object *vocab, dl_error *err)
{
	const char *file = tok_file_names[TOK_VOCAB];

	if (!json_object_is_type(vocab, json_type_object))
		return dl_fail(err, DL_EFORMAT, "%s is not an object of token and id", file);
	json_object_object_foreach(vocab, key, v)
	{
		int32_t		id;
		dl_status	st = tok_json_id(v, &id, file, key, err);

		if (st != DL_OK)
			return st;
	}
	return DL_OK;
}

/* Append t to the added_tokens array as tokenizers writes it; tok_from_json numbers it. */
static dl_status
add_token_json(json_object *arr, const legacy_token *t, dl_error *err)
{
	json_object *o = json_object_new_object();

	if (o == NULL ||
		json_object_object_add(o, "id", json_object_new_int(0)) != 0 ||
		json_object_object_add(o, "content", json_object_new_string(t->content)) != 0 ||
		json_object_object_add(o, "single_word", json_object_new_boolean(t->single_word)) != 0 ||
		json_object_object_add(o, "lstrip", json_object_new_boolean(t->lstrip)) != 0 ||
		json_object_object_add(o, "rstrip", json_object_new_boolean(t->rstrip)) != 0 ||
		json_object_object_add(o, "normalized", json_object_new_boolean(t->normalized)) != 0 ||
		json_object_object_add(o, "special", json_object_new_boolean(t->special)) != 0 ||
		json_object_array_add(arr, o) != 0)
	{
		json_object_put(o);
		return dl_fail(err, DL_ENOMEM, "out of memory reading added tokens");
	}
	return DL_OK;
}

/* Parse the JSON file f of files (absent: *out NULL), naming it in errors. */
static dl_status
parse_file(const tok_files *files, tok_file f, json_object **out, dl_error *err)
{
	dl_status	st;

	*out = NULL;
	if (files->text[f] == NULL)
		return DL_OK;
	if ((st = tok_json_parse(files->text[f], files->len[f], out, err)) != DL_OK)
		return tok_fail_in(err, st, "%s", tok_file_names[f]);
	return DL_OK;
}

dl_status
tok_parse_files(const tok_files *files, dl_tokenizer **out, dl_error *err)
{
	const char *cfg_name = tok_file_names[TOK_CONFIG];
	json_object *json[TOK_NFILES] = {0};
	json_object *root = NULL,
			   *merges = NULL;
	legacy_tokens lt = {0};
	bool		prefix = false,
				split_special = false;
	dl_status	st = DL_OK;

	*out = NULL;
	if (files->text[TOK_VOCAB] == NULL || files->text[TOK_MERGES] == NULL)
		return dl_fail(err, DL_EIO, "a tokenizer without tokenizer.json needs both %s and %s",
					   tok_file_names[TOK_VOCAB], tok_file_names[TOK_MERGES]);
	for (int f = 0; f < TOK_NFILES && st == DL_OK; f++)
		if (f != TOK_MERGES)
			st = parse_file(files, f, &json[f], err);
	if (st == DL_OK && json[TOK_CONFIG] != NULL && !json_object_is_type(json[TOK_CONFIG], json_type_object))
		st = dl_fail(err, DL_EFORMAT, "%s is not an object", cfg_name);
	if (st == DL_OK &&
		(st = tok_json_bool(json[TOK_CONFIG], "add_prefix_space", false, &prefix, cfg_name, err)) == DL_OK &&
		(st = tok_json_bool(json[TOK_CONFIG], "split_special_tokens", false, &split_special, cfg_name,
							err)) == DL_OK && split_special)
	{
		/* special tokens would be encoded as text, which tok_encode does not do */
		dl_fail(err, DL_EUNSUPPORTED, "%s: split_special_tokens is not supported", cfg_name);
		st = dl_hint(err, "Remove split_special_tokens from %s; dolly always reads a special token in the text as that token.", cfg_name);
	}
	if (st == DL_OK &&
		(st = check_vocab(json[TOK_VOCAB], err)) == DL_OK &&
		(st = read_merges(files->text[TOK_MERGES], files->len[TOK_MERGES], json[TOK_VOCAB], &merges,
						  err)) == DL_OK &&
		(st = gather_tokens(&lt, json[TOK_CONFIG], json[TOK_SPECIAL_MAP], json[TOK_ADDED], err)) == DL_OK &&
		(st = tok_json_parse(tokenizer_json, sizeof(tokenizer_json) - 1, &root, err)) == DL_OK)
	{
		json_object *model = tok_json_member(root, "model");
		json_object *added = tok_json_member(root, "added_tokens");

		/* the tree takes merges over, and a reference to the vocabulary */
		if (json_object_object_add(model, "vocab", json_object_get(json[TOK_VOCAB])) != 0 ||
			json_object_object_add(model, "merges", merges) != 0 ||
			json_object_object_add(tok_json_member(root, "pre_tokenizer"), "add_prefix_space",
								   json_object_new_boolean(prefix)) != 0)
			st = dl_fail(err, DL_ENOMEM, "out of memory reading the tokenizer");
		merges = NULL;
		for (int i = 0; i < lt.n && st == DL_OK; i++)
			st = add_token_json(added, &lt.list[i], err);
	}
	json_object_put(merges);
	for (int f = 0; f < TOK_NFILES; f++)
		json_object_put(json[f]);
	free(lt.list);
	free(lt.extra);
	free(lt.named);
	if (st != DL_OK)
	{
		json_object_put(root);
		return st;
	}
	return tok_from_json(root, tok_file_names[TOK_VOCAB], out, err);
}

dl_status
tok_load_dir(const char *dir, dl_tokenizer **out, dl_error *err)
{
	char		path[4096];
	char	   *buf[TOK_NFILES] = {0};
	tok_files	files = {0};
	struct stat sb;
	dl_status	st = DL_OK;

	*out = NULL;
	if ((size_t) snprintf(path, sizeof(path), "%s/tokenizer.json", dir) >= sizeof(path))
		return dl_fail(err, DL_EINVAL, "model directory \"%s\" is too long a path", dir);

	/* transformers too prefers tokenizer.json where both are present */
	if (stat(path, &sb) == 0)
		return tok_load(path, out, err);
	for (int f = 0; f < TOK_NFILES && st == DL_OK; f++)
	{
		snprintf(path, sizeof(path), "%s/%s", dir, tok_file_names[f]);
		st = file_read(path, "tokenizer file", 0, &buf[f], &files.len[f], err);
		if (st == DL_EIO && errno == ENOENT)
			st = DL_OK;
		files.text[f] = buf[f];
	}
	if (st == DL_OK && (files.text[TOK_VOCAB] == NULL || files.text[TOK_MERGES] == NULL))
	{
		st = dl_fail(err, DL_EIO, "model directory \"%s\" has no tokenizer: no tokenizer.json, %s",
					 dir, files.text[TOK_VOCAB] ? "and no merges.txt beside vocab.json" :
					 files.text[TOK_MERGES] ? "and no vocab.json beside merges.txt" :
					 "and no vocab.json and merges.txt");
		dl_hint(err, "A model directory holds its tokenizer as tokenizer.json, or as vocab.json and merges.txt (with added_tokens.json, special_tokens_map.json and tokenizer_config.json) as older Hugging Face repositories do.");
	}
	else if (st == DL_OK && (st = tok_parse_files(&files, out, err)) != DL_OK)
	{
		tok_fail_in(err, st, "tokenizer in \"%s\"", dir);
		if (err != NULL && err->hint[0] == '\0' && st == DL_EFORMAT)
			dl_hint(err, "The tokenizer files must be those of the model's repository, as transformers saved them; download them again.");
	}
	for (int f = 0; f < TOK_NFILES; f++)
		free(buf[f]);
	return st;
}
