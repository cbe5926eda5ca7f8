/*
 * tokenizer_json.c: a tokenizer from a Hugging Face tokenizer.json, and the file written back.
 *
 * Each section is checked against what tokenizers accepts for a byte-level BPE: the BPE
 * model (vocab, merges as "a b" or ["a", "b"]), added_tokens numbered as tokenizers numbers
 * them, an optional Unicode normalizer (ICU), and pre-tokenizers (ByteLevel, Split) whose
 * Oniguruma regexes are compiled with PCRE2; anything else is refused with a message that
 * names it. The parsed JSON is kept so that tok_save can write back exactly what was read
 * plus the special tokens that fine-tuning adds (tok_add_special). tokenizer_files.c makes
 * such a tree of the older vocab.json + merges.txt files and builds from it with
 * tok_from_json.
 */
#include "tokenizer_int.h"
#include "files.h"
#include "utf8.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* GPT-2's pre-tokenisation regex (tokenizers' pre_tokenizers/byte_level.rs). */
#define TOK_GPT2_REGEX \
	"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

json_object *
tok_json_member(json_object *obj, const char *key)
{
	json_object *v = NULL;

	if (obj == NULL || !json_object_object_get_ex(obj, key, &v))
		return NULL;
	return v;
}

dl_status
tok_json_bool(json_object *obj, const char *key, bool def, bool *out, const char *what, dl_error *err)
{
	json_object *v = tok_json_member(obj, key);

	if (v == NULL)
	{
		*out = def;
		return DL_OK;
	}
	if (!json_object_is_type(v, json_type_boolean))
		return dl_fail(err, DL_EFORMAT, "%s: \"%s\" is not a boolean", what, key);
	*out = json_object_get_boolean(v);
	return DL_OK;
}

dl_status
tok_json_id(json_object *v, int32_t *id, const char *what, const char *content, dl_error *err)
{
	int64_t		x;

	if (v == NULL || !json_object_is_type(v, json_type_int))
		return dl_fail(err, DL_EFORMAT, "%s: the id of \"%s\" is not an integer", what, content);
	x = json_object_get_int64(v);
	if (x < 0 || x >= TOK_MAX_ID)
	{
		dl_fail(err, DL_EFORMAT, "%s: \"%s\" has id %lld, out of range", what, content,
				(long long) x);
		return dl_hint(err, "Token ids must lie in [0, %d).", TOK_MAX_ID);
	}
	*id = (int32_t) x;
	return DL_OK;
}

/* Fill in the vocabulary: model.vocab (called vocab_name), an object of token -> id. */
static dl_status
parse_vocab(dl_tokenizer *tok, json_object *vocab, const char *vocab_name, dl_error *err)
{
	struct json_object_iterator it = json_object_iter_begin(vocab),
				end = json_object_iter_end(vocab);
	dl_status	st;

	for (; !json_object_iter_equal(&it, &end); json_object_iter_next(&it))
	{
		const char *key = json_object_iter_peek_name(&it);
		int32_t		id = -1;

		if ((st = tok_json_id(json_object_iter_peek_value(&it), &id, vocab_name, key, err)) != DL_OK ||
			(st = tok_define_id(tok, id, key, strlen(key), TOK_IN_VOCAB, vocab_name, err)) != DL_OK)
			return st;
	}
	return DL_OK;
}

/* Vocabulary id of merge part s[0..n), or an error naming the merge. */
static dl_status
merge_part(dl_tokenizer *tok, const char *s, size_t n, int32_t rank, int32_t *id, dl_error *err)
{
	*id = tok_map_get(tok, s, n);
	if (*id < 0 || !(tok->ids[*id].flags & TOK_IN_VOCAB))
		return dl_fail(err, DL_EFORMAT, "model.merges[%d] names \"%.*s\", which is not in the vocabulary",
					   rank, (int) n, s);
	return DL_OK;
}

/* Fill in the merge table from model.merges ("a b" strings or ["a", "b"] pairs). */
static dl_status
parse_merges(dl_tokenizer *tok, json_object *merges, dl_error *err)
{
	size_t		n = json_object_array_length(merges),
				cap = 16;
	void	   *joined = NULL;
	size_t		joined_cap = 0;
	dl_status	st = DL_OK;

	if (n > INT32_MAX / 4)
		return dl_fail(err, DL_EUNSUPPORTED, "model.merges has %zu entries, too many", n);
	while (cap < 2 * n)
		cap *= 2;
	tok->merges = malloc(cap * sizeof(tok_merge));
	if (tok->merges == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory for %zu merges", n);
	memset(tok->merges, 0xFF, cap * sizeof(tok_merge));
	tok->merge_mask = cap - 1;
	for (size_t r = 0; r < n && st == DL_OK; r++)
	{
		json_object *m = json_object_array_get_idx(merges, r);
		const char *a,
				   *b;
		size_t		alen,
					blen;
		int32_t		aid,
					bid,
					nid;

		if (m != NULL && json_object_is_type(m, json_type_string))
		{
			const char *s = json_object_get_string(m);
			size_t		len = (size_t) json_object_get_string_len(m);
			const char *sp = memchr(s, ' ', len);

			/* tokenizers splits on ' ' and wants exactly two parts */
			if (sp == NULL || memchr(sp + 1, ' ', len - (sp + 1 - s)) != NULL)
			{
				st = dl_fail(err, DL_EFORMAT, "model.merges[%zu] \"%s\" is not two tokens separated by one space",
							 r, s);
				break;
			}
			a = s;
			alen = sp - s;
			b = sp + 1;
			blen = len - alen - 1;
		}
		else if (m != NULL && json_object_is_type(m, json_type_array) &&
				 json_object_array_length(m) == 2 &&
				 json_object_is_type(json_object_array_get_idx(m, 0), json_type_string) &&
				 json_object_is_type(json_object_array_get_idx(m, 1), json_type_string))
		{
			a = json_object_get_string(json_object_array_get_idx(m, 0));
			alen = (size_t) json_object_get_string_len(json_object_array_get_idx(m, 0));
			b = json_object_get_string(json_object_array_get_idx(m, 1));
			blen = (size_t) json_object_get_string_len(json_object_array_get_idx(m, 1));
		}
		else
		{
			st = dl_fail(err, DL_EFORMAT, "model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", r);
			break;
		}
		if (!tok_grow(&joined, &joined_cap, alen + blen, 1))
		{
			st = dl_fail(err, DL_ENOMEM, "out of memory reading merges");
			break;
		}
		memcpy(joined, a, alen);
		memcpy((char *) joined + alen, b, blen);
		if ((st = merge_part(tok, a, alen, (int32_t) r, &aid, err)) == DL_OK &&
			(st = merge_part(tok, b, blen, (int32_t) r, &bid, err)) == DL_OK &&
			(st = merge_part(tok, joined, alen + blen, (int32_t) r, &nid, err)) == DL_OK)
			tok_merge_put(tok, aid, bid, (int32_t) r, nid);
	}
	free(joined);
	return st;
}

/*
 * Read added_tokens ([{id, content, single_word, lstrip, rstrip, normalized, special}]) as
 * tokenizers does: the ids in the file are not used; content already known (a vocabulary
 * entry, an earlier added token) keeps its id, with the flags of its last entry, and other
 * content gets tok_next_added_id, in file order. Files that tokenizers wrote list exactly these
 * ids; where an entry says another, it is corrected so that tok_save writes the id in use.
 */
static dl_status
parse_added(dl_tokenizer *tok, json_object *arr, dl_error *err)
{
	size_t		n = json_object_array_length(arr);

	tok->added = calloc(n + 1, sizeof(tok_added));
	if (tok->added == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory for %zu added tokens", n);
	for (size_t k = 0; k < n; k++)
	{
		json_object *t = json_object_array_get_idx(arr, k);
		json_object *c = tok_json_member(t, "content");
		json_object *id = tok_json_member(t, "id");
		tok_added	f = {0};
		tok_added  *a = NULL;
		const char *content;
		size_t		len;
		dl_status	st;

		if (!json_object_is_type(t, json_type_object) || c == NULL ||
			!json_object_is_type(c, json_type_string))
			return dl_fail(err, DL_EFORMAT, "added_tokens[%zu] has no \"content\" string", k);
		content = json_object_get_string(c);
		len = (size_t) json_object_get_string_len(c);
		if ((st = tok_json_bool(t, "special", false, &f.special, "added_tokens", err)) != DL_OK ||
			(st = tok_json_bool(t, "single_word", false, &f.single_word, "added_tokens", err)) != DL_OK ||
			(st = tok_json_bool(t, "lstrip", false, &f.lstrip, "added_tokens", err)) != DL_OK ||
			(st = tok_json_bool(t, "rstrip", false, &f.rstrip, "added_tokens", err)) != DL_OK ||
			(st = tok_json_bool(t, "normalized", !f.special, &f.normalized, "added_tokens", err)) != DL_OK)
			return st;
		if (len == 0)
			continue;			/* tokenizers ignores empty tokens */
		f.id = tok_map_get(tok, content, len);
		if (f.id < 0)
		{
			f.id = tok_next_added_id(tok);
			if (f.id >= TOK_MAX_ID)
				return dl_fail(err, DL_EUNSUPPORTED, "tokenizer has more than %d ids", TOK_MAX_ID);
			if ((st = tok_ids_reserve(tok, f.id + 1, err)) != DL_OK ||
				(st = tok_define_id(tok, f.id, content, len, 0, "added_tokens", err)) != DL_OK)
				return st;
		}
		if (id == NULL || !json_object_is_type(id, json_type_int) || json_object_get_int64(id) != f.id)
		{
			json_object *v = json_object_new_int(f.id);

			if (v == NULL || json_object_object_add(t, "id", v) != 0)
			{
				json_object_put(v);
				return dl_fail(err, DL_ENOMEM, "out of memory for %zu added tokens", n);
			}
		}
		for (int32_t j = 0; j < tok->nadded; j++)
			if (tok->added[j].id == f.id)
				a = &tok->added[j];
		if (a == NULL)
			a = &tok->added[tok->nadded++];
		*a = f;
		a->pat_off = tok->ids[f.id].off;
		a->pat_len = (uint32_t) len;
	}
	return DL_OK;
}

/* Compile a pre-tokenizer regex written for Oniguruma (tokenizers' engine) with PCRE2. */
static dl_status
compile_regex(const char *pattern, size_t len, bool literal, pcre2_code **re, dl_error *err)
{
	/*
	 * Oniguruma's \s is the White_Space property; PCRE2's (UCP) also matches U+180E. Rewrite
	 * \s and \S so that both engines cut the same text.
	 */
	char	   *p = malloc(len * 8 + 1);
	size_t		n = 0;
	int			code;
	PCRE2_SIZE	off;

	if (p == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory compiling the pre-tokenizer regex");
	for (size_t i = 0; i < len; i++)
	{
		if (!literal && pattern[i] == '\\' && i + 1 < len &&
			(pattern[i + 1] == 's' || pattern[i + 1] == 'S'))
		{
			n += sprintf(p + n, "\\%c{White_Space}", pattern[i + 1] == 's' ? 'p' : 'P');
			i++;
		}
		else if (!literal && pattern[i] == '\\' && i + 1 < len)
		{
			p[n++] = pattern[i++];
			p[n++] = pattern[i];
		}
		else
			p[n++] = pattern[i];
	}
	*re = pcre2_compile((PCRE2_SPTR) p, n, literal ? PCRE2_LITERAL | PCRE2_UTF : PCRE2_UTF | PCRE2_UCP,
						&code, &off, NULL);
	free(p);
	if (*re == NULL)
	{
		PCRE2_UCHAR msg[256];

		pcre2_get_error_message(code, msg, sizeof(msg));
		return dl_fail(err, DL_EUNSUPPORTED, "pre-tokenizer regex \"%.*s\" does not compile: %s",
					   (int) len, pattern, (const char *) msg);
	}
	/* the interpreter gives the same matches when JIT is unavailable */
	pcre2_jit_compile(*re, PCRE2_JIT_COMPLETE);
	return DL_OK;
}

/* Append a pre-tokenizer step. */
static dl_status
add_step(dl_tokenizer *tok, tok_step_kind kind, const char *pattern, size_t len, bool literal,
		 dl_error *err)
{
	tok_step   *p = realloc(tok->steps, (tok->nsteps + 1) * sizeof(tok_step));

	if (p == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory reading the pre-tokenizer");
	tok->steps = p;
	p[tok->nsteps].kind = kind;
	p[tok->nsteps].re = NULL;
	tok->nsteps++;
	if (kind == TOK_STEP_SPLIT)
		return compile_regex(pattern, len, literal, &p[tok->nsteps - 1].re, err);
	return DL_OK;
}

/* Read one pre-tokenizer (ByteLevel or Split) into steps; *byte_level says a ByteLevel was seen. */
static dl_status
parse_pretok_one(dl_tokenizer *tok, json_object *pt, bool *byte_level, dl_error *err)
{
	json_object *type = tok_json_member(pt, "type");
	const char *name = type ? json_object_get_string(type) : "";
	dl_status	st;

	if (!json_object_is_type(pt, json_type_object) || type == NULL ||
		!json_object_is_type(type, json_type_string))
		return dl_fail(err, DL_EFORMAT, "pre_tokenizer has no \"type\"");
	if (*byte_level)
		return dl_fail(err, DL_EUNSUPPORTED, "pre_tokenizer %s after ByteLevel is not supported", name);
	if (strcmp(name, "ByteLevel") == 0)
	{
		bool		prefix = false,
					use_regex = false;

		if ((st = tok_json_bool(pt, "add_prefix_space", true, &prefix, "pre_tokenizer", err)) != DL_OK ||
			(st = tok_json_bool(pt, "use_regex", true, &use_regex, "pre_tokenizer", err)) != DL_OK)
			return st;
		if (prefix && (st = add_step(tok, TOK_STEP_PREFIX_SPACE, NULL, 0, false, err)) != DL_OK)
			return st;
		if (use_regex &&
			(st = add_step(tok, TOK_STEP_SPLIT, TOK_GPT2_REGEX, strlen(TOK_GPT2_REGEX), false, err)) != DL_OK)
			return st;
		*byte_level = true;
		return DL_OK;
	}
	if (strcmp(name, "Split") == 0)
	{
		json_object *pat = tok_json_member(pt, "pattern");
		json_object *behavior = tok_json_member(pt, "behavior");
		json_object *re = tok_json_member(pat, "Regex");
		json_object *lit = tok_json_member(pat, "String");
		json_object *s = re ? re : lit;
		bool		invert = false;

		if ((st = tok_json_bool(pt, "invert", false, &invert, "pre_tokenizer Split", err)) != DL_OK)
			return st;
		if (s == NULL || !json_object_is_type(s, json_type_string))
			return dl_fail(err, DL_EFORMAT, "pre_tokenizer Split has no \"pattern\" Regex or String");
		if (behavior == NULL || strcmp(json_object_get_string(behavior), "Isolated") != 0 || invert)
			return dl_fail(err, DL_EUNSUPPORTED,
						   "pre_tokenizer Split is supported with behavior Isolated and invert false only");
		return add_step(tok, TOK_STEP_SPLIT, json_object_get_string(s),
						(size_t) json_object_get_string_len(s), re == NULL, err);
	}
	return dl_fail(err, DL_EUNSUPPORTED, "pre_tokenizer %s is not supported", name);
}

/* Read pre_tokenizer: ByteLevel, or a Sequence of Split ... ByteLevel. */
static dl_status
parse_pretok(dl_tokenizer *tok, json_object *pt, dl_error *err)
{
	json_object *type = tok_json_member(pt, "type");
	bool		byte_level = false;
	dl_status	st;

	if (pt == NULL)
		return dl_fail(err, DL_EUNSUPPORTED, "tokenizer has no pre_tokenizer; byte-level BPE needs ByteLevel");
	if (type != NULL && json_object_is_type(type, json_type_string) &&
		strcmp(json_object_get_string(type), "Sequence") == 0)
	{
		json_object *list = tok_json_member(pt, "pretokenizers");

		if (list == NULL || !json_object_is_type(list, json_type_array))
			return dl_fail(err, DL_EFORMAT, "pre_tokenizer Sequence has no \"pretokenizers\" array");
		for (size_t i = 0; i < json_object_array_length(list); i++)
			if ((st = parse_pretok_one(tok, json_object_array_get_idx(list, i), &byte_level, err)) != DL_OK)
				return st;
	}
	else if ((st = parse_pretok_one(tok, pt, &byte_level, err)) != DL_OK)
		return st;
	if (!byte_level)
		return dl_fail(err, DL_EUNSUPPORTED, "pre_tokenizer has no ByteLevel step; only byte-level BPE is supported");
	return DL_OK;
}

/* Read normalizer: none, or one of the Unicode normal forms. */
static dl_status
parse_normalizer(dl_tokenizer *tok, json_object *nz, dl_error *err)
{
	static const struct
	{
		const char *type;
		const char *icu_name;
		UNormalization2Mode mode;
	}			forms[] = {
		{"NFC", "nfc", UNORM2_COMPOSE},
		{"NFD", "nfc", UNORM2_DECOMPOSE},
		{"NFKC", "nfkc", UNORM2_COMPOSE},
		{"NFKD", "nfkc", UNORM2_DECOMPOSE},
	};
	json_object *type = tok_json_member(nz, "type");
	const char *name = type ? json_object_get_string(type) : "(no type)";

	if (nz == NULL)
		return DL_OK;
	for (size_t i = 0; i < sizeof(forms) / sizeof(forms[0]); i++)
	{
		UErrorCode	ue = U_ZERO_ERROR;

		if (strcmp(name, forms[i].type) != 0)
			continue;
		tok->norm = unorm2_getInstance(NULL, forms[i].icu_name, forms[i].mode, &ue);
		if (U_FAILURE(ue))
			return dl_fail(err, DL_EUNSUPPORTED, "ICU has no %s normalizer: %s", name, u_errorName(ue));
		return DL_OK;
	}
	return dl_fail(err, DL_EUNSUPPORTED, "normalizer %s is not supported", name);
}

/* Patterns of normalized added tokens are their normalized content, as tokenizers matches them. */
static dl_status
normalize_added(dl_tokenizer *tok, dl_error *err)
{
	for (int32_t k = 0; k < tok->nadded && tok->norm; k++)
	{
		tok_added  *a = &tok->added[k];
		char	   *s;
		size_t		n;
		dl_status	st;

		if (!a->normalized)
			continue;
		if ((st = tok_normalize(tok, tok->arena + a->pat_off, a->pat_len, &s, &n, err)) != DL_OK)
			return st;
		st = tok_arena_add(tok, s, n, &a->pat_off, err);
		a->pat_len = (uint32_t) n;
		free(s);
		if (st != DL_OK)
			return st;
	}
	return DL_OK;
}

/*
 * Check the model section, size the id table and read vocab (called vocab_name in messages),
 * added tokens and merges.
 */
static dl_status
parse_model(dl_tokenizer *tok, const char *vocab_name, dl_error *err)
{
	json_object *model = tok_json_member(tok->root, "model");
	json_object *type = tok_json_member(model, "type");
	json_object *vocab = tok_json_member(model, "vocab");
	json_object *merges = tok_json_member(model, "merges");
	json_object *added = tok_json_member(tok->root, "added_tokens");
	json_object *v;
	int64_t		maxid = -1;
	dl_status	st;

	if (model == NULL || !json_object_is_type(model, json_type_object))
		return dl_fail(err, DL_EFORMAT, "no \"model\" object");
	if (type != NULL && (!json_object_is_type(type, json_type_string) ||
						 strcmp(json_object_get_string(type), "BPE") != 0))
		return dl_fail(err, DL_EUNSUPPORTED, "model type %s is not supported; only BPE is",
					   json_object_get_string(type));
	if (vocab == NULL || !json_object_is_type(vocab, json_type_object))
		return dl_fail(err, DL_EFORMAT, "model has no \"vocab\" object");
	if (merges == NULL || !json_object_is_type(merges, json_type_array))
		return dl_fail(err, DL_EFORMAT, "model has no \"merges\" array");
	if (added != NULL && !json_object_is_type(added, json_type_array))
		return dl_fail(err, DL_EFORMAT, "\"added_tokens\" is not an array");
	if ((v = tok_json_member(model, "dropout")) != NULL && json_object_get_double(v) != 0.0)
		return dl_fail(err, DL_EUNSUPPORTED, "BPE dropout is not supported");
	if (((v = tok_json_member(model, "continuing_subword_prefix")) != NULL && json_object_get_string_len(v) > 0) ||
		((v = tok_json_member(model, "end_of_word_suffix")) != NULL && json_object_get_string_len(v) > 0))
		return dl_fail(err, DL_EUNSUPPORTED, "BPE with subword prefixes or suffixes is not supported");
	if ((st = tok_json_bool(model, "ignore_merges", false, &tok->ignore_merges, "model", err)) != DL_OK)
		return st;

	/* the id table spans the vocabulary and the ids that added tokens can take */
	{
		struct json_object_iterator it = json_object_iter_begin(vocab),
					end = json_object_iter_end(vocab);

		for (; !json_object_iter_equal(&it, &end); json_object_iter_next(&it))
		{
			json_object *id = json_object_iter_peek_value(&it);

			if (json_object_is_type(id, json_type_int) && json_object_get_int64(id) > maxid &&
				json_object_get_int64(id) < TOK_MAX_ID)
				maxid = json_object_get_int64(id);
		}
		/* added tokens get ids from the vocabulary's size on (parse_added) */
		tok->vocab_count = json_object_object_length(vocab);
		if (added && tok->vocab_count + (int64_t) json_object_array_length(added) > maxid + 1)
			maxid = tok->vocab_count + (int64_t) json_object_array_length(added) - 1;
		if (maxid >= TOK_MAX_ID)
			return dl_fail(err, DL_EUNSUPPORTED, "tokenizer has more than %d ids", TOK_MAX_ID);
	}
	if ((st = tok_ids_reserve(tok, (int32_t) (maxid + 1), err)) != DL_OK ||
		(st = parse_vocab(tok, vocab, vocab_name, err)) != DL_OK ||
		(st = parse_merges(tok, merges, err)) != DL_OK)
		return st;
	if (added != NULL)
		st = parse_added(tok, added, err);
	else if ((tok->added = calloc(1, sizeof(tok_added))) == NULL)
		st = dl_fail(err, DL_ENOMEM, "out of memory for added tokens");

	/* added content already in the vocabulary took no new id */
	while (tok->nids > 0 && !(tok->ids[tok->nids - 1].flags & TOK_PRESENT))
		tok->nids--;
	return st;
}

dl_status
tok_json_parse(const char *text, size_t len, json_object **out, dl_error *err)
{
	json_tokener *jt;
	json_object *root;
	size_t		end;
	dl_status	st;

	*out = NULL;
	if (len > INT_MAX)
		return dl_fail(err, DL_EUNSUPPORTED, "JSON of %zu bytes is too large", len);
	jt = json_tokener_new();
	if (jt == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory parsing JSON");
	json_tokener_set_flags(jt, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
	root = json_tokener_parse_ex(jt, text, (int) len);
	end = root ? json_tokener_get_parse_end(jt) : 0;
	while (end < len && strchr(" \t\r\n", text[end]) != NULL && text[end] != '\0')
		end++;
	if (root != NULL && end == len)
	{
		json_tokener_free(jt);
		*out = root;
		return DL_OK;
	}
	{
		enum json_tokener_error je = json_tokener_get_error(jt);
		size_t		at = root ? end : json_tokener_get_parse_end(jt);

		if (je == json_tokener_continue)
			st = dl_fail(err, DL_EFORMAT, "malformed JSON: unexpected end of input at byte %zu", at);
		else if (je != json_tokener_success)
			st = dl_fail(err, DL_EFORMAT, "malformed JSON at byte %zu: %s", at,
						 json_tokener_error_desc(je));
		else
			st = dl_fail(err, DL_EFORMAT, "malformed JSON: data after the end at byte %zu", at);
	}
	json_object_put(root);
	json_tokener_free(jt);
	return st;
}

dl_status
tok_from_json(json_object *root, const char *vocab_name, dl_tokenizer **out, dl_error *err)
{
	dl_tokenizer *tok = calloc(1, sizeof(dl_tokenizer));
	dl_status	st;

	*out = NULL;
	if (tok == NULL)
	{
		json_object_put(root);
		return dl_fail(err, DL_ENOMEM, "out of memory loading the tokenizer");
	}
	tok->root = root;
	if (!json_object_is_type(tok->root, json_type_object))
		st = dl_fail(err, DL_EFORMAT, "tokenizer JSON is not an object");
	else if ((st = parse_model(tok, vocab_name, err)) == DL_OK &&
			 (st = tok_setup_bytes(tok, vocab_name, err)) == DL_OK &&
			 (st = parse_normalizer(tok, tok_json_member(tok->root, "normalizer"), err)) == DL_OK &&
			 (st = parse_pretok(tok, tok_json_member(tok->root, "pre_tokenizer"), err)) == DL_OK &&
			 (st = normalize_added(tok, err)) == DL_OK &&
			 (st = tok_matcher_build(tok, &tok->match_raw, false, err)) == DL_OK &&
			 (st = tok_matcher_build(tok, &tok->match_norm, true, err)) == DL_OK)
	{
		for (int32_t id = 0; id < tok->nids && st == DL_OK; id++)
			if (tok->ids[id].flags & TOK_PRESENT)
				st = tok_set_decoding(tok, id, tok->ids[id].off, tok->ids[id].len, err);

		/*
		 * ids are unique per content, so skipping special content is skipping these ids;
		 * normalized added tokens decode from their normalized form, as tokenizers >= 0.23
		 */
		for (int32_t k = 0; k < tok->nadded && st == DL_OK; k++)
		{
			const tok_added *a = &tok->added[k];

			if (a->special)
				tok->ids[a->id].flags |= TOK_SPECIAL;
			if (a->normalized)
				st = tok_set_decoding(tok, a->id, a->pat_off, a->pat_len, err);
		}
	}
	if (st != DL_OK)
	{
		tok_free(tok);
		return st;
	}
	*out = tok;
	return DL_OK;
}

dl_status
tok_parse(const char *json, size_t len, dl_tokenizer **out, dl_error *err)
{
	json_object *root;
	dl_status	st = tok_json_parse(json, len, &root, err);

	*out = NULL;
	if (st != DL_OK)
		return st;
	return tok_from_json(root, "model.vocab", out, err);
}

dl_status
tok_fail_in(dl_error *err, dl_status st, const char *fmt,...)
{
	dl_error	inner;
	char		prefix[DL_ERRMSG_LEN];
	va_list		ap;

	if (err == NULL)
		return st;
	inner = *err;
	va_start(ap, fmt);
	vsnprintf(prefix, sizeof(prefix), fmt, ap);
	va_end(ap);
	/* dl_fail clears the hint, so keep it */
	dl_fail(err, st, "%s: %s", prefix, inner.msg);
	memcpy(err->hint, inner.hint, sizeof(err->hint));
	return st;
}

dl_status
tok_load(const char *path, dl_tokenizer **out, dl_error *err)
{
	char	   *buf;
	size_t		len;
	dl_status	st;

	*out = NULL;
	if ((st = file_read(path, "tokenizer file", 0, &buf, &len, err)) != DL_OK)
		return st == DL_EIO && errno == ENOENT ?
			dl_hint(err, "A Hugging Face model directory has tokenizer.json beside config.json.") : st;
	st = tok_parse(buf, len, out, err);
	free(buf);
	if (st != DL_OK)
		return tok_fail_in(err, st, "tokenizer \"%s\"", path);
	return DL_OK;
}

/* The added_tokens entry that transformers' add_special_tokens writes. */
static json_object *
added_json(const char *content, int32_t id)
{
	json_object *o = json_object_new_object();

	if (o == NULL ||
		json_object_object_add(o, "id", json_object_new_int(id)) != 0 ||
		json_object_object_add(o, "content", json_object_new_string(content)) != 0 ||
		json_object_object_add(o, "single_word", json_object_new_boolean(0)) != 0 ||
		json_object_object_add(o, "lstrip", json_object_new_boolean(0)) != 0 ||
		json_object_object_add(o, "rstrip", json_object_new_boolean(0)) != 0 ||
		json_object_object_add(o, "normalized", json_object_new_boolean(0)) != 0 ||
		json_object_object_add(o, "special", json_object_new_boolean(1)) != 0)
	{
		json_object_put(o);
		return NULL;
	}
	return o;
}

dl_status
tok_add_special(dl_tokenizer *tok, const char *content, int32_t *id, dl_error *err)
{
	size_t		len = strlen(content);
	int32_t		tid = tok_map_get(tok, content, len);
	json_object *arr = tok_json_member(tok->root, "added_tokens");
	json_object *o;
	tok_added  *a = NULL;
	size_t		at;
	dl_status	st;

	*id = -1;
	if (len == 0 || utf8_invalid_at(content, len) < len)
		return dl_fail(err, DL_EINVAL, "special token \"%s\" is empty or not valid UTF-8", content);
	for (int32_t k = 0; k < tok->nadded; k++)
		if (tok->added[k].id == tid)
			a = &tok->added[k];
	if (a != NULL && a->special && !a->normalized && !a->lstrip && !a->rstrip && !a->single_word)
	{
		*id = tid;
		return DL_OK;
	}
	if (arr == NULL)
	{
		arr = json_object_new_array();
		if (arr == NULL || json_object_object_add(tok->root, "added_tokens", arr) != 0)
		{
			json_object_put(arr);
			return dl_fail(err, DL_ENOMEM, "out of memory adding special token \"%s\"", content);
		}
	}
	if (a == NULL)
	{
		void	   *p;

		/* a vocabulary entry keeps its id; new content gets the next, as tokenizers counts */
		if (tid < 0)
		{
			tid = tok_next_added_id(tok);
			if (tid >= TOK_MAX_ID)
				return dl_fail(err, DL_EUNSUPPORTED, "no id left for special token \"%s\"", content);
			if ((st = tok_ids_reserve(tok, tid + 1, err)) != DL_OK ||
				(st = tok_define_id(tok, tid, content, len, 0, "special token", err)) != DL_OK)
				return st;
		}
		p = realloc(tok->added, ((size_t) tok->nadded + 1) * sizeof(tok_added));
		if (p == NULL)
			return dl_fail(err, DL_ENOMEM, "out of memory adding special token \"%s\"", content);
		tok->added = p;
		a = &tok->added[tok->nadded++];
		a->id = tid;
		at = json_object_array_length(arr);
	}
	else
	{
		/* an added token that differs is replaced, as tokenizers' add_tokens does */
		for (at = 0; at < json_object_array_length(arr); at++)
		{
			json_object *t = tok_json_member(json_object_array_get_idx(arr, at), "id");

			if (t != NULL && json_object_get_int64(t) == tid)
				break;
		}
	}

	/* transformers adds special tokens as AddedToken(special=True, normalized=False) */
	a->pat_off = tok->ids[tid].off;
	a->pat_len = (uint32_t) len;
	a->special = true;
	a->normalized = a->lstrip = a->rstrip = a->single_word = false;
	tok->ids[tid].flags |= TOK_SPECIAL;
	o = added_json(content, tid);
	if (o == NULL || json_object_array_put_idx(arr, at, o) != 0)
	{
		json_object_put(o);
		return dl_fail(err, DL_ENOMEM, "out of memory adding special token \"%s\"", content);
	}
	if ((st = tok_set_decoding(tok, tid, a->pat_off, a->pat_len, err)) != DL_OK ||
		(st = tok_matcher_build(tok, &tok->match_raw, false, err)) != DL_OK ||
		(st = tok_matcher_build(tok, &tok->match_norm, true, err)) != DL_OK)
		return st;
	*id = tid;
	return DL_OK;
}

dl_status
tok_save(const dl_tokenizer *tok, const char *path, dl_error *err)
{
	const char *text = json_object_to_json_string_ext(tok->root,
													   JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
													   JSON_C_TO_STRING_NOSLASHESCAPE);
	dl_file_out out;
	dl_status	st;

	if (text == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory writing tokenizer \"%s\"", path);
	if ((st = file_create(path, &out, err)) != DL_OK)
		return st;
	st = file_write(&out, text, strlen(text), err);
	if (st == DL_OK)
		st = file_write(&out, "\n", 1, err);
	return file_commit(&out, st, err);
}
