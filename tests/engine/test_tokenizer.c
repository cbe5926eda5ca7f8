/*
 * test_tokenizer.c: the tokenizer against ids that Hugging Face `tokenizers` computed
 * (tests/fixtures/tokenizer, made by tests/make_fixtures.py), plus saving and bad input.
 */
#include "harness.h"
#include "tokenizer.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <json.h>

/* Read a whole fixture file into a NUL-terminated malloc'd buffer; NULL if unreadable. */
static char *
read_fixture(const char *rel, size_t *len)
{
	FILE	   *f = fopen(fixture_path(rel), "rb");
	char	   *buf = NULL;
	long		n;

	if (f == NULL)
		return NULL;
	if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
		(buf = malloc((size_t) n + 1)) != NULL)
	{
		if (fread(buf, 1, (size_t) n, f) != (size_t) n)
		{
			free(buf);
			buf = NULL;
		}
		else
		{
			buf[n] = '\0';
			if (len)
				*len = (size_t) n;
		}
	}
	fclose(f);
	return buf;
}

/* Print ids for a failure report. */
static void
print_ids(const char *label, const int32_t *ids, int n)
{
	fprintf(stderr, "    %s (%d):", label, n);
	for (int i = 0; i < n; i++)
		fprintf(stderr, " %d", ids[i]);
	fputc('\n', stderr);
}

/*
 * Encode text and compare with want[0..nwant); on a mismatch describe it (with what, the
 * line or document) and return false. Also checks that decoding gives the text back.
 */
static bool
encode_matches(const dl_tokenizer *tok, const char *what, const char *text, size_t len,
			   const int32_t *want, int nwant)
{
	dl_error	err = {0};
	int32_t    *ids;
	int			n,
				same;
	char	   *back;

	if (tok_encode(tok, text, len, &ids, &n, &err) != DL_OK)
	{
		fprintf(stderr, "  %s: encode failed: %s\n", what, err.msg);
		return false;
	}
	same = n == nwant && memcmp(ids, want, (size_t) n * sizeof(int32_t)) == 0;
	if (!same)
	{
		fprintf(stderr, "  %s: ids differ for text \"%.*s\"\n", what, (int) len, text);
		print_ids("expected", want, nwant);
		print_ids("got     ", ids, n);
		free(ids);
		return false;
	}
	if (tok_decode(tok, ids, n, 0, &back, &err) != DL_OK)
	{
		fprintf(stderr, "  %s: decode failed: %s\n", what, err.msg);
		free(ids);
		return false;
	}
	free(ids);
	same = strlen(back) == len && memcmp(back, text, len) == 0;
	if (!same)
		fprintf(stderr, "  %s: decode(encode(x)) != x for \"%.*s\": \"%s\"\n", what, (int) len, text, back);
	free(back);
	return same;
}

/* Parse the space-separated ids in s[0..len) into ids (capacity cap); returns the count. */
static int
parse_id_line(const char *s, size_t len, int32_t *ids, int cap)
{
	int			n = 0;
	size_t		i = 0;

	while (i < len && n < cap)
	{
		char	   *end;

		while (i < len && s[i] == ' ')
			i++;
		if (i == len)
			break;
		ids[n++] = (int32_t) strtol(s + i, &end, 10);
		i = end - s;
	}
	return n;
}

/* Load the fixture tokenizer rel (a tokenizer.json, or a directory as models have), or NULL. */
static dl_tokenizer *
load_fixture(const char *rel)
{
	dl_error	err = {0};
	dl_tokenizer *tok = NULL;
	struct stat sb;
	const char *path = fixture_path(rel);

	if ((stat(path, &sb) == 0 && S_ISDIR(sb.st_mode) ? tok_load_dir(path, &tok, &err) :
		 tok_load(path, &tok, &err)) != DL_OK)
		fprintf(stderr, "  %s: %s\n", rel, err.msg);
	return tok;
}

/*
 * Check every line of corpus.txt against corpus_ids.txt with tok (called tokfile in reports);
 * returns the number of lines checked, or -1 after reporting the first mismatch.
 */
static int
check_corpus(const dl_tokenizer *tok, const char *tokfile)
{
	size_t		tlen,
				ilen;
	char	   *text = read_fixture("tokenizer/corpus.txt", &tlen);
	char	   *idtext = read_fixture("tokenizer/corpus_ids.txt", &ilen);
	const char *t,
			   *d;
	int			line = 0;
	int32_t    *want = malloc(65536 * sizeof(int32_t));

	if (text == NULL || idtext == NULL || want == NULL || tok == NULL)
	{
		fprintf(stderr, "  cannot read the corpus fixtures or %s\n", tokfile);
		line = -1;
		goto out;
	}
	t = text;
	d = idtext;
	while (t < text + tlen && line >= 0)
	{
		const char *te = memchr(t, '\n', text + tlen - t);
		const char *de = memchr(d, '\n', idtext + ilen - d);
		char		what[64];
		int			nwant;

		if (te == NULL || de == NULL)
		{
			fprintf(stderr, "  corpus.txt and corpus_ids.txt differ in length at line %d\n", line + 1);
			line = -1;
			break;
		}
		nwant = parse_id_line(d, de - d, want, 65536);
		snprintf(what, sizeof(what), "%s line %d", tokfile, line + 1);
		if (!encode_matches(tok, what, t, te - t, want, nwant))
			line = -1;
		else
			line++;
		t = te + 1;
		d = de + 1;
	}
out:
	free(text);
	free(idtext);
	free(want);
	return line;
}

/* check_corpus with the fixture tokenizer tokfile. */
static int
check_corpus_of(const char *tokfile)
{
	dl_tokenizer *tok = load_fixture(tokfile);
	int			lines = tok ? check_corpus(tok, tokfile) : -1;

	tok_free(tok);
	return lines;
}

TEST(tokenizer_corpus)
{
	CHECK(check_corpus_of("tokenizer/tokenizer.json") >= 2000);
}

TEST(tokenizer_legacy_merges)
{
	CHECK(check_corpus_of("tokenizer/tokenizer_legacy_merges.json") >= 2000);
}

/* Whether the fixture tokenizer tokfile encodes tokenizer/multi_line.json's documents to their ids. */
static bool
check_multi_line(const char *tokfile)
{
	dl_tokenizer *tok = load_fixture(tokfile);
	char	   *text = read_fixture("tokenizer/multi_line.json", NULL);
	json_object *root = text ? json_tokener_parse(text) : NULL;
	json_object *docs = NULL,
			   *ids = NULL;
	bool		ok;

	free(text);
	ok = tok != NULL && root != NULL &&
		json_object_object_get_ex(root, "docs", &docs) && json_object_object_get_ex(root, "ids", &ids) &&
		json_object_array_length(docs) == json_object_array_length(ids) &&
		json_object_array_length(docs) > 0;
	if (!ok)
		fprintf(stderr, "  cannot read tokenizer/multi_line.json or %s\n", tokfile);
	for (size_t i = 0; ok && i < json_object_array_length(docs); i++)
	{
		json_object *doc = json_object_array_get_idx(docs, i);
		json_object *want = json_object_array_get_idx(ids, i);
		int			n = (int) json_object_array_length(want);
		int32_t    *w = malloc(((size_t) n + 1) * sizeof(int32_t));
		char		what[64];

		for (int k = 0; k < n; k++)
			w[k] = json_object_get_int(json_object_array_get_idx(want, k));
		snprintf(what, sizeof(what), "%s: multi_line doc %zu", tokfile, i);
		ok = encode_matches(tok, what, json_object_get_string(doc),
							(size_t) json_object_get_string_len(doc), w, n);
		free(w);
	}
	json_object_put(root);
	tok_free(tok);
	return ok;
}

TEST(tokenizer_multi_line)
{
	CHECK(check_multi_line("tokenizer/tokenizer.json"));
}

/* The tokenizer of fixture directory dir decodes the ids of its decode_cases.json to their texts. */
static void
check_decode_cases(const char *dir, int *failed_)
{
	dl_tokenizer *tok = load_fixture(dir);
	char		rel[256];
	char	   *text;
	json_object *cases;
	bool		ok = true;

	snprintf(rel, sizeof(rel), "%s/decode_cases.json", dir);
	text = read_fixture(rel, NULL);
	cases = text ? json_tokener_parse(text) : NULL;
	free(text);
	CHECK(tok != NULL && cases != NULL && json_object_array_length(cases) > 0);
	for (size_t i = 0; i < json_object_array_length(cases) && ok; i++)
	{
		json_object *c = json_object_array_get_idx(cases, i);
		json_object *name,
				   *ids,
				   *want,
				   *want_skip;
		int32_t		buf[256];
		int			n;
		char	   *got,
				   *got_skip;
		dl_error	err = {0};

		ok = json_object_object_get_ex(c, "name", &name) && json_object_object_get_ex(c, "ids", &ids) &&
			json_object_object_get_ex(c, "text", &want) &&
			json_object_object_get_ex(c, "text_skip_special", &want_skip) &&
			json_object_array_length(ids) <= 256;
		CHECK(ok);
		n = (int) json_object_array_length(ids);
		for (int k = 0; k < n; k++)
			buf[k] = json_object_get_int(json_object_array_get_idx(ids, k));
		CHECK_OK(tok_decode(tok, buf, n, 0, &got, &err), &err);
		CHECK_OK(tok_decode(tok, buf, n, 1, &got_skip, &err), &err);
		ok = strcmp(got, json_object_get_string(want)) == 0 &&
			strcmp(got_skip, json_object_get_string(want_skip)) == 0;
		if (!ok)
			fprintf(stderr, "  %s %s: got \"%s\" / \"%s\", expected \"%s\" / \"%s\"\n",
					dir, json_object_get_string(name), got, got_skip,
					json_object_get_string(want), json_object_get_string(want_skip));
		free(got);
		free(got_skip);
	}
	json_object_put(cases);
	tok_free(tok);
	CHECK(ok);
}

TEST(tokenizer_decode_cases)
{
	check_decode_cases("tokenizer", failed_);
}

/* Encode s and check that it gives exactly the ids want[0..n). */
static bool
encodes_to(const dl_tokenizer *tok, const char *s, const int32_t *want, int n)
{
	return encode_matches(tok, "inline text", s, strlen(s), want, n);
}

/* Dolly's keys and <|endoftext|> are one token each in the fixture tokenizer rel. */
static void
check_special_tokens(const char *rel, int *failed_)
{
	dl_tokenizer *tok = load_fixture(rel);
	const char *specials[] = {"<|endoftext|>", "### End", "### Instruction:", "### Response:\n"};
	int32_t		sid[4];
	int32_t    *ids;
	int			n;
	dl_error	err = {0};
	const char *prompt = "Intro.\n\n### Instruction:\nSay hi.\n\n### Response:\nhi\n\n### End";

	CHECK(tok != NULL);
	for (int i = 0; i < 4; i++)
	{
		sid[i] = tok_token_id(tok, specials[i]);
		CHECKF(sid[i] >= 0 && sid[i] < tok_vocab_size(tok), "%s has id %d", specials[i], sid[i]);
		CHECKF(encodes_to(tok, specials[i], &sid[i], 1), "%s is not one token", specials[i]);
	}
	CHECK(tok_token_id(tok, "no such token") == -1);

	/* without its newline the response key is ordinary text */
	CHECK_OK(tok_encode(tok, "### Response:", 13, &ids, &n, &err), &err);
	CHECK(n > 1);
	free(ids);

	/* in a Dolly prompt each key is one id, in order */
	CHECK_OK(tok_encode(tok, prompt, strlen(prompt), &ids, &n, &err), &err);
	{
		const int32_t order[] = {sid[2], sid[3], sid[1]};
		int			found = 0;

		for (int i = 0; i < n; i++)
			if (found < 3 && ids[i] == order[found])
				found++;
		free(ids);
		CHECKF(found == 3, "found %d of the three Dolly keys in order", found);
	}
	tok_free(tok);
}

TEST(tokenizer_special_tokens)
{
	check_special_tokens("tokenizer/tokenizer.json", failed_);
}

/* The fixture tokenizer.json with text `insert` put right after the first `after`. */
static char *
edited_fixture(const char *after, const char *insert, size_t *len)
{
	size_t		n;
	char	   *src = read_fixture("tokenizer/tokenizer.json", &n);
	char	   *at = src ? strstr(src, after) : NULL;
	char	   *out;
	size_t		head;

	if (at == NULL)
	{
		free(src);
		return NULL;
	}
	head = at + strlen(after) - src;
	out = malloc(n + strlen(insert) + 1);
	memcpy(out, src, head);
	memcpy(out + head, insert, strlen(insert));
	memcpy(out + head + strlen(insert), src + head, n - head + 1);
	*len = n + strlen(insert);
	free(src);
	return out;
}

/*
 * Fine-tuning's tok_add_special on the fixture tokenizer rel, saved as tokenizer.json and
 * loaded again.
 */
static void
check_add_special_save_reload(const char *rel, int *failed_)
{
	dl_tokenizer *tok = load_fixture(rel);
	dl_tokenizer *back = NULL;
	dl_error	err = {0};
	char		dir[] = "/tmp/dolly_tok_XXXXXX";
	char		path[64];
	int32_t		end_id,
				pad_id,
				again,
				pad_back;
	int			size;
	int32_t    *ids;
	int			n;
	char	   *text;
	const char *s = "a<|pad|>b";

	CHECK(tok != NULL);
	CHECK(mkdtemp(dir) != NULL);
	snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
	size = tok_vocab_size(tok);

	/* present already: same id, nothing added */
	CHECK_OK(tok_add_special(tok, "### End", &end_id, &err), &err);
	CHECK(end_id == tok_token_id(tok, "### End") && tok_vocab_size(tok) == size);

	/* new: the next id, split out of text, skipped when decoding with skip_special */
	CHECK_OK(tok_add_special(tok, "<|pad|>", &pad_id, &err), &err);
	CHECK(pad_id == size && tok_vocab_size(tok) == size + 1);
	CHECK_OK(tok_add_special(tok, "<|pad|>", &again, &err), &err);
	CHECK(again == pad_id && tok_vocab_size(tok) == size + 1);
	CHECK_OK(tok_encode(tok, s, strlen(s), &ids, &n, &err), &err);
	CHECK(n == 3 && ids[1] == pad_id);
	free(ids);

	CHECK_OK(tok_save(tok, path, &err), &err);
	CHECK_OK(tok_load(path, &back, &err), &err);
	pad_back = tok_token_id(back, "<|pad|>");
	CHECKF(pad_back == pad_id, "reloaded <|pad|> has id %d", pad_back);
	CHECK(tok_vocab_size(back) == size + 1);
	CHECK_OK(tok_encode(back, s, strlen(s), &ids, &n, &err), &err);
	CHECK(n == 3 && ids[1] == pad_id);
	CHECK_OK(tok_decode(back, ids, n, 1, &text, &err), &err);
	CHECK(strcmp(text, "ab") == 0);
	free(text);
	CHECK_OK(tok_decode(back, ids, n, 0, &text, &err), &err);
	CHECK(strcmp(text, s) == 0);
	free(text);
	free(ids);

	/* the saved file still encodes the corpus as before */
	CHECK(check_corpus(back, path) >= 2000);
	tok_free(back);
	tok_free(tok);
	{
		char		cmp[96];

		snprintf(cmp, sizeof(cmp), "%s/tokenizer.json.tmp", dir);
		CHECK(access(cmp, F_OK) != 0);
	}
	unlink(path);
	rmdir(dir);
}

TEST(tokenizer_add_special_save_reload)
{
	check_add_special_save_reload("tokenizer/tokenizer.json", failed_);
}

TEST(tokenizer_add_special_existing)
{
	size_t		len;
	char	   *json = edited_fixture("\"added_tokens\": [",
									  "{\"id\": 600, \"content\": \"zq\", \"single_word\": false, "
									  "\"lstrip\": true, \"rstrip\": false, \"normalized\": true, "
									  "\"special\": false},", &len);
	dl_tokenizer *tok = NULL;
	dl_error	err = {0};
	int32_t		zq,
				vocab_id,
				got;
	const int32_t x = 0;
	char	   *text;

	CHECK(json != NULL);
	CHECK_OK(tok_parse(json, len, &tok, &err), &err);
	free(json);

	/*
	 * tokenizers numbers added tokens itself, in file order after the vocabulary, whatever
	 * ids the file says: zq takes the 512 of "### End", which moves up one
	 */
	zq = tok_token_id(tok, "zq");
	CHECK(zq == 512 && tok_token_id(tok, "### End") == 513 && tok_vocab_size(tok) == 516);

	/* a plain added token: lstrip takes the space before it, decoding keeps it */
	{
		int32_t    *ids;
		int			n;

		CHECK_OK(tok_encode(tok, "a zq", 4, &ids, &n, &err), &err);
		CHECK(n == 2 && ids[0] == tok_token_id(tok, "a") && ids[1] == zq);
		free(ids);
	}
	CHECK_OK(tok_decode(tok, &zq, 1, 1, &text, &err), &err);
	CHECK(strcmp(text, "zq") == 0);
	free(text);

	/* made special: same id, no lstrip any more, skipped with skip_special */
	CHECK_OK(tok_add_special(tok, "zq", &got, &err), &err);
	CHECK(got == zq && tok_vocab_size(tok) == 516);
	CHECK_OK(tok_decode(tok, &zq, 1, 1, &text, &err), &err);
	CHECK(text[0] == '\0');
	free(text);

	/* a vocabulary entry keeps its id and becomes one token, skipped when asked */
	vocab_id = tok_token_id(tok, "Ġa");
	CHECK(vocab_id >= 0);
	CHECK_OK(tok_add_special(tok, "Ġa", &got, &err), &err);
	CHECK(got == vocab_id && tok_vocab_size(tok) == 516);
	{
		int32_t    *ids;
		int			n;

		CHECK_OK(tok_encode(tok, "Ġa", strlen("Ġa"), &ids, &n, &err), &err);
		CHECK(n == 1 && ids[0] == vocab_id);
		free(ids);
	}
	CHECK_OK(tok_decode(tok, (const int32_t[]) {x, vocab_id}, 2, 1, &text, &err), &err);
	CHECK(text[0] == '\0');
	free(text);
	tok_free(tok);
}

/* Parse JSON text that must fail with code, its message containing needle. */
static bool
parse_fails(const char *json, size_t len, dl_status code, const char *needle)
{
	dl_error	err = {0};
	dl_tokenizer *tok = NULL;
	dl_status	st = tok_parse(json, len, &tok, &err);

	if (st == code && tok == NULL && strstr(err.msg, needle) != NULL)
		return true;
	fprintf(stderr, "  expected %s with \"%s\", got %s: %s\n", dl_status_name(code), needle,
			dl_status_name(st), err.msg);
	tok_free(tok);
	return false;
}

TEST(tokenizer_bad_files)
{
	dl_error	err = {0};
	dl_tokenizer *tok = NULL;
	size_t		len;
	char	   *json;

	CHECK(tok_load("/nonexistent/tokenizer.json", &tok, &err) == DL_EIO && tok == NULL);
	CHECK(strstr(err.msg, "/nonexistent/tokenizer.json") != NULL && err.hint[0] != '\0');

	json = read_fixture("tokenizer/tokenizer.json", &len);
	CHECK(json != NULL);
	CHECK(parse_fails(json, len / 2, DL_EFORMAT, "unexpected end"));
	CHECK(parse_fails("{\"model\": [1, 2,, 3]}", 21, DL_EFORMAT, "at byte"));
	CHECK(parse_fails("[]", 2, DL_EFORMAT, "not an object"));
	CHECK(parse_fails("{}", 2, DL_EFORMAT, "model"));
	free(json);

	json = edited_fixture("\"type\": \"BPE", "x", &len);
	CHECK(json != NULL);
	CHECK(parse_fails(json, len, DL_EUNSUPPORTED, "BPEx"));
	free(json);

	json = edited_fixture("\"merges\": [", "[\"nope\", \"a\"],", &len);
	CHECK(json != NULL);
	CHECK(parse_fails(json, len, DL_EFORMAT, "\"nope\""));
	free(json);

	json = edited_fixture("\"merges\": [", "\"a b c\",", &len);
	CHECK(json != NULL);
	CHECK(parse_fails(json, len, DL_EFORMAT, "model.merges[0]"));
	free(json);

	json = edited_fixture("\"vocab\": {", "\"zz-dup\": 5,", &len);
	CHECK(json != NULL);
	CHECK(parse_fails(json, len, DL_EFORMAT, "duplicate id 5"));
	free(json);

	json = edited_fixture("\"vocab\": {", "\"zz-neg\": -1,", &len);
	CHECK(json != NULL);
	CHECK(parse_fails(json, len, DL_EFORMAT, "zz-neg"));
	free(json);

	json = edited_fixture("\"pre_tokenizer\": {", "\"type\": \"Whitespace\"}, \"x\": {", &len);
	CHECK(json != NULL);
	CHECK(parse_fails(json, len, DL_EUNSUPPORTED, "Whitespace"));
	free(json);
}

TEST(tokenizer_bad_input)
{
	dl_tokenizer *tok = load_fixture("tokenizer/tokenizer.json");
	dl_error	err = {0};
	int32_t    *ids;
	int			n;
	char	   *text;
	const int32_t neg[] = {5, -1};
	const int32_t beyond[] = {tok ? tok_vocab_size(tok) : 0, 100000};

	CHECK(tok != NULL);
	CHECK(tok_encode(tok, "ok \xC3", 4, &ids, &n, &err) == DL_EINVAL);
	CHECK(strstr(err.msg, "UTF-8") != NULL && strstr(err.msg, "byte 3") != NULL);
	CHECK(tok_encode(tok, "\xED\xA0\x80", 3, &ids, &n, &err) == DL_EINVAL);
	CHECK(tok_decode(tok, neg, 2, 0, &text, &err) == DL_EINVAL);
	CHECK(strstr(err.msg, "-1") != NULL);

	/* ids past the tokenizer (padded embedding rows) decode to nothing */
	CHECK_OK(tok_decode(tok, beyond, 2, 0, &text, &err), &err);
	CHECK(text[0] == '\0');
	free(text);

	/* empty text: no ids */
	CHECK_OK(tok_encode(tok, "", 0, &ids, &n, &err), &err);
	CHECK(n == 0);
	free(ids);
	tok_free(tok);
}

/* A token that decodes to byte 0 ("\u0100" in the byte-level alphabet): the length counts past it. */
TEST(tokenizer_decode_byte_zero)
{
	dl_tokenizer *tok = load_fixture("tokenizer/tokenizer.json");
	dl_error	err = {0};
	int32_t		ids[3];
	char	   *text;
	size_t		len;

	CHECK(tok != NULL);
	ids[0] = tok_token_id(tok, "a");
	ids[1] = tok_token_id(tok, "\xC4\x80");
	ids[2] = tok_token_id(tok, "b");
	CHECK(ids[0] >= 0 && ids[1] >= 0 && ids[2] >= 0);
	CHECK_OK(tok_decode_len(tok, ids, 3, 0, &text, &len, &err), &err);
	CHECK(len == 3 && memcmp(text, "a\0b", 4) == 0);
	free(text);
	tok_free(tok);
}

TEST(tokenizer_long_input)
{
	dl_tokenizer *tok = load_fixture("tokenizer/tokenizer.json");
	const size_t len = 1 << 20;
	const char *fill[] = {"a", "é", ".,;", " ", "7"};
	char	   *s = malloc(len + 1);
	dl_error	err = {0};

	CHECK(tok != NULL && s != NULL);

	/* 1 MiB pieces without a break must merge in O(n log n), and round-trip */
	for (int f = 0; f < 5; f++)
	{
		size_t		flen = strlen(fill[f]),
					used = 0;
		int32_t    *ids;
		int			n;
		char	   *back;

		while (used + flen <= len)
		{
			memcpy(s + used, fill[f], flen);
			used += flen;
		}
		CHECK_OK(tok_encode(tok, s, used, &ids, &n, &err), &err);
		CHECK(n > 0 && (size_t) n <= used);
		CHECK_OK(tok_decode(tok, ids, n, 0, &back, &err), &err);
		CHECKF(strlen(back) == used && memcmp(back, s, used) == 0, "fill \"%s\"", fill[f]);
		free(back);
		free(ids);
	}
	free(s);
	tok_free(tok);
}

/* The fixture tokenizer in the older files, with and without added_tokens_decoder. */
static const char *const older_dirs[] = {"tokenizer-legacy", "tokenizer-legacy-decoder"};

TEST(tokenizer_files_corpus)
{
	for (int i = 0; i < 2; i++)
	{
		CHECKF(check_corpus_of(older_dirs[i]) >= 2000, "%s", older_dirs[i]);
		CHECKF(check_multi_line(older_dirs[i]), "%s", older_dirs[i]);
	}
}

/* transformers 5 makes Dolly's keys special only where tokenizer_config.json says so */
TEST(tokenizer_files_decode_cases)
{
	for (int i = 0; i < 2; i++)
	{
		check_decode_cases(older_dirs[i], failed_);
		check_special_tokens(older_dirs[i], failed_);
		check_add_special_save_reload(older_dirs[i], failed_);
	}
}

/* Write text (NULL: remove the file) as dir/name. */
static bool
put_file(const char *dir, const char *name, const char *text)
{
	char		path[256];
	FILE	   *f;
	bool		ok;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	if (text == NULL)
		return unlink(path) == 0 || errno == ENOENT;
	if ((f = fopen(path, "wb")) == NULL)
		return false;
	ok = fwrite(text, 1, strlen(text), f) == strlen(text);
	return fclose(f) == 0 && ok;
}

/*
 * In dir, which holds tokenizer-legacy's files, replace file name by text (NULL: remove it),
 * expect tok_load_dir to fail with code, a message containing needle and a hint that is a
 * sentence; then put the fixture's file back.
 */
static bool
older_files_fail(const char *dir, const char *name, const char *text, dl_status code,
				 const char *needle)
{
	char		rel[128];
	char	   *orig;
	dl_error	err = {0};
	dl_tokenizer *tok = NULL;
	dl_status	st;
	size_t		h;
	bool		ok;

	snprintf(rel, sizeof(rel), "tokenizer-legacy/%s", name);
	orig = read_fixture(rel, NULL);
	if (!put_file(dir, name, text))
		return false;
	st = tok_load_dir(dir, &tok, &err);
	h = strlen(err.hint);
	ok = st == code && tok == NULL && strstr(err.msg, needle) != NULL &&
		h > 1 && err.hint[0] >= 'A' && err.hint[0] <= 'Z' && err.hint[h - 1] == '.';
	if (!ok)
		fprintf(stderr, "  %s: expected %s with \"%s\", got %s: %s (hint: %s)\n", name,
				dl_status_name(code), needle, dl_status_name(st), err.msg, err.hint);
	tok_free(tok);
	ok = put_file(dir, name, orig) && ok;
	free(orig);
	return ok;
}

/* A broken file (text NULL: a missing one) in a directory of older tokenizer files. */
typedef struct older_files_case
{
	const char *file;
	const char *text;
	dl_status	code;
	const char *needle;			/* in the message */
} older_files_case;

TEST(tokenizer_files_errors)
{
	static const char *const names[] = {"vocab.json", "merges.txt", "added_tokens.json",
	"special_tokens_map.json", "tokenizer_config.json"};
	static const older_files_case cases[] = {
		{"merges.txt", NULL, DL_EIO, "no merges.txt beside vocab.json"},
		{"vocab.json", "{\"a\": 1, ", DL_EFORMAT, "vocab.json: malformed JSON: unexpected end"},
		{"vocab.json", "[1, 2]", DL_EFORMAT, "vocab.json is not an object"},
		{"vocab.json", "{\"a\": \"1\"}", DL_EFORMAT, "vocab.json: the id of \"a\" is not an integer"},
		{"merges.txt", "#version: 0.2\na b\nzq b\n", DL_EFORMAT,
		"merges.txt line 3 (\"zq b\") needs \"zq\", which vocab.json does not have"},
		{"merges.txt", "#version: 0.2\na b\n\n", DL_EFORMAT, "merges.txt line 3 (\"\") is not two tokens"},
		{"merges.txt", "#version: 0.2\na b\nh \xC3\n", DL_EFORMAT, "merges.txt is not valid UTF-8 at line 3"},
		{"added_tokens.json", "[\"### End\"]", DL_EFORMAT, "added_tokens.json is not an object"},
		{"special_tokens_map.json", "{\"eos_token\": 5}", DL_EFORMAT,
		"special_tokens_map.json: eos_token is neither a string nor an object"},
		{"tokenizer_config.json", "{\"split_special_tokens\": true}", DL_EUNSUPPORTED,
		"split_special_tokens is not supported"},
		{"tokenizer_config.json", "{\"added_tokens_decoder\": {\"x\": {}}}", DL_EFORMAT,
		"added_tokens_decoder key \"x\" is not an id"},
	};
	char		dir[] = "/tmp/dolly_tokfiles_XXXXXX";
	dl_tokenizer *tok = NULL;
	dl_error	err = {0};
	char	   *vocab,
			   *text;
	const char *at;

	CHECK(mkdtemp(dir) != NULL);
	CHECK(older_files_fail(dir, "vocab.json", NULL, DL_EIO, "no tokenizer.json, and no vocab.json"));
	for (int i = 0; i < 5; i++)
	{
		char		rel[128];

		snprintf(rel, sizeof(rel), "tokenizer-legacy/%s", names[i]);
		text = read_fixture(rel, NULL);
		CHECK(text != NULL && put_file(dir, names[i], text));
		free(text);
	}
	CHECK_OK(tok_load_dir(dir, &tok, &err), &err);
	tok_free(tok);

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		CHECK(older_files_fail(dir, cases[i].file, cases[i].text, cases[i].code, cases[i].needle));

	/* a byte-level vocabulary holds all 256 byte symbols: rename "!" (byte 0x21), keeping its id */
	vocab = read_fixture("tokenizer-legacy/vocab.json", NULL);
	CHECK(vocab != NULL && (at = strstr(vocab, "\n  \"!\": ")) != NULL);
	text = malloc(strlen(vocab) + 8);
	sprintf(text, "%.*s\n  \"!?!\"%s", (int) (at - vocab), vocab, at + 6);
	CHECK(older_files_fail(dir, "vocab.json", text, DL_EFORMAT, "vocab.json has no symbol \"!\""));
	free(text);
	free(vocab);

	/* tokenizer.json comes first, as transformers reads it: the broken vocab.json is not read */
	text = read_fixture("tokenizer/tokenizer.json", NULL);
	CHECK(text != NULL && put_file(dir, "tokenizer.json", text) && put_file(dir, "vocab.json", "{"));
	free(text);
	CHECK_OK(tok_load_dir(dir, &tok, &err), &err);
	CHECK(tok_vocab_size(tok) == 515);
	tok_free(tok);
	CHECK(put_file(dir, "tokenizer.json", NULL));
	for (int i = 0; i < 5; i++)
		CHECK(put_file(dir, names[i], NULL));
	CHECK(rmdir(dir) == 0);
}
