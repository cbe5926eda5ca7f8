/*
 * tokenizer.c: encoding and decoding with GPT-2 byte-level BPE, as Hugging Face `tokenizers` does.
 *
 * Encoding follows tokenizers' pipeline step by step, since the ids must be identical:
 * added tokens that are not normalized are split out of the raw text (leftmost-longest,
 * AddedVocabulary::find_matches); each remaining segment is normalized (NFC and friends
 * through ICU) and split on the normalized added tokens; the pre-tokenizers (Split, ByteLevel
 * with GPT-2's regex through PCRE2, prefix space) cut the rest into pieces; each piece's bytes
 * become byte-level symbols that are merged by rank (the heap of tokenizers' Word::merge_all,
 * so long pieces stay O(n log n)). The post-processor is not applied: GPT tokenizers add
 * nothing there, and callers place special tokens themselves.
 *
 * Decoding is tokenizers' ByteLevel decoder: each token maps back to bytes when all its
 * characters are byte-level symbols, otherwise it contributes its own UTF-8; the result is
 * made valid as Rust's String::from_utf8_lossy does.
 *
 * The tables it reads (tokenizer_int.h) are built by tokenizer_json.c and
 * tokenizer_tables.c.
 */
#include "tokenizer_int.h"
#include "utf8.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <unicode/uchar.h>
#include <unicode/ustring.h>

/* One BPE symbol of the piece being merged: a doubly-linked list in an array. */
typedef struct tok_sym
{
	int32_t		id;
	int32_t		prev;
	int32_t		next;
	bool		alive;
} tok_sym;

/* A candidate merge in the heap: lowest rank first, then leftmost. */
typedef struct tok_cand
{
	int32_t		rank;
	int32_t		pos;
	int32_t		new_id;
} tok_cand;

/* State of one tok_encode call; the tokenizer itself is never written, so threads can share it. */
typedef struct tok_enc
{
	const dl_tokenizer *tok;
	dl_error   *err;
	pcre2_match_data *md;
	int32_t    *out;
	size_t		nout;
	size_t		out_cap;
	tok_sym    *sym;
	tok_cand   *heap;
	size_t		sym_cap;
	char	   *prefixed;		/* a piece with ByteLevel's prefix space */
	size_t		prefixed_cap;
	char	   *symbols;		/* a piece as byte-level symbols, for ignore_merges */
	size_t		symbols_cap;
} tok_enc;

typedef dl_status (*tok_text_fn) (tok_enc *e, const char *s, size_t n);

/* Code point of the first character of valid UTF-8 s[0..n), n > 0; its length in *len. */
static uint32_t
utf8_first_char(const char *s, size_t n, size_t *len)
{
	size_t		bad,
				l;
	uint32_t	cp = 0;

	l = utf8_char((const unsigned char *) s, n, &cp, &bad);
	if (len)
		*len = l;
	return cp;
}

/* Code point of the last character of valid UTF-8 s[0..n), n > 0; its length in *len. */
static uint32_t
utf8_last_char(const char *s, size_t n, size_t *len)
{
	size_t		i = n - 1;

	while (i > 0 && ((unsigned char) s[i] & 0xC0) == 0x80)
		i--;
	return utf8_first_char(s + i, n - i, len);
}

/* Rust regex's Unicode \w (what single_word tests): Alphabetic, M, Nd, Pc, Join_Control. */
static bool
cp_is_word(uint32_t c)
{
	int8_t		t = u_charType((UChar32) c);

	return u_hasBinaryProperty((UChar32) c, UCHAR_ALPHABETIC) ||
		u_hasBinaryProperty((UChar32) c, UCHAR_JOIN_CONTROL) ||
		t == U_NON_SPACING_MARK || t == U_ENCLOSING_MARK || t == U_COMBINING_SPACING_MARK ||
		t == U_DECIMAL_DIGIT_NUMBER || t == U_CONNECTOR_PUNCTUATION;
}

/* Append an id to the output. */
static dl_status
enc_emit(tok_enc *e, int32_t id)
{
	void	   *p = e->out;

	if (!tok_grow(&p, &e->out_cap, e->nout + 1, sizeof(int32_t)))
		return dl_fail(e->err, DL_ENOMEM, "out of memory encoding text");
	e->out = p;
	e->out[e->nout++] = id;
	return DL_OK;
}

/* Make the scratch buffer *buf (of *cap bytes) hold n bytes. */
static dl_status
enc_buf(tok_enc *e, char **buf, size_t *cap, size_t n)
{
	void	   *p = *buf;

	if (!tok_grow(&p, cap, n, 1))
		return dl_fail(e->err, DL_ENOMEM, "out of memory encoding text");
	*buf = p;
	return DL_OK;
}

/* Push a candidate merge on the min-heap of n entries. */
static void
heap_push(tok_cand *h, size_t *n, tok_cand c)
{
	size_t		i = (*n)++;

	while (i > 0)
	{
		size_t		parent = (i - 1) / 2;

		if (h[parent].rank < c.rank || (h[parent].rank == c.rank && h[parent].pos < c.pos))
			break;
		h[i] = h[parent];
		i = parent;
	}
	h[i] = c;
}

/* Pop the lowest-rank, leftmost candidate. */
static tok_cand
heap_pop(tok_cand *h, size_t *n)
{
	tok_cand	top = h[0],
				last = h[--(*n)];
	size_t		i = 0;

	for (;;)
	{
		size_t		c = 2 * i + 1;

		if (c >= *n)
			break;
		if (c + 1 < *n && (h[c + 1].rank < h[c].rank ||
						   (h[c + 1].rank == h[c].rank && h[c + 1].pos < h[c].pos)))
			c++;
		if (last.rank < h[c].rank || (last.rank == h[c].rank && last.pos < h[c].pos))
			break;
		h[i] = h[c];
		i = c;
	}
	h[i] = last;
	return top;
}

/* Push the merge of the symbols at pos and sym[pos].next, if there is one. */
static void
enc_candidate(tok_enc *e, size_t *nheap, int32_t pos)
{
	const tok_merge *m;
	tok_cand	c;
	int32_t		next = e->sym[pos].next;

	if (next < 0 || (m = tok_merge_get(e->tok, e->sym[pos].id, e->sym[next].id)) == NULL)
		return;
	c.rank = m->rank;
	c.pos = pos;
	c.new_id = m->new_id;
	heap_push(e->heap, nheap, c);
}

/* BPE-encode one pre-tokenized piece (tokenizers' BPE::tokenize and Word::merge_all). */
static dl_status
enc_bpe(tok_enc *e, const char *s, size_t n)
{
	const dl_tokenizer *tok = e->tok;
	size_t		nheap = 0;
	dl_status	st;

	if (n > INT32_MAX)
		return dl_fail(e->err, DL_EINVAL, "a piece of %zu bytes is too long to encode", n);
	if (n == 1)
		return enc_emit(e, tok->byte_id[(unsigned char) s[0]]);
	if (tok->ignore_merges)
	{
		size_t		len = 0;
		int32_t		id;

		if ((st = enc_buf(e, &e->symbols, &e->symbols_cap, 2 * n)) != DL_OK)
			return st;
		for (size_t i = 0; i < n; i++)
		{
			unsigned char b = (unsigned char) s[i];

			memcpy(e->symbols + len, tok->byte_utf8[b], tok->byte_utf8_len[b]);
			len += tok->byte_utf8_len[b];
		}
		id = tok_map_get(tok, e->symbols, len);
		if (id >= 0 && (tok->ids[id].flags & TOK_IN_VOCAB))
			return enc_emit(e, id);
	}
	{
		void	   *p = e->sym;
		size_t		cap = e->sym_cap;

		if (!tok_grow(&p, &cap, n, sizeof(tok_sym)))
			return dl_fail(e->err, DL_ENOMEM, "out of memory encoding text");
		e->sym = p;
		if (cap != e->sym_cap)
		{
			/* n - 1 initial candidates, and each merge adds at most one more */
			p = realloc(e->heap, 2 * cap * sizeof(tok_cand));
			if (p == NULL)
				return dl_fail(e->err, DL_ENOMEM, "out of memory encoding text");
			e->heap = p;
			e->sym_cap = cap;
		}
	}
	for (size_t i = 0; i < n; i++)
	{
		e->sym[i].id = tok->byte_id[(unsigned char) s[i]];
		e->sym[i].prev = (int32_t) i - 1;
		e->sym[i].next = i + 1 < n ? (int32_t) i + 1 : -1;
		e->sym[i].alive = true;
	}
	for (size_t i = 0; i + 1 < n; i++)
		enc_candidate(e, &nheap, (int32_t) i);

	/*
	 * Stale candidates are recognised as tokenizers does: the pair now at pos no longer
	 * merges into the candidate's id.
	 */
	while (nheap > 0)
	{
		tok_cand	c = heap_pop(e->heap, &nheap);
		tok_sym    *sym = &e->sym[c.pos];
		const tok_merge *m;
		int32_t		next = sym->next;

		if (!sym->alive || next < 0)
			continue;
		m = tok_merge_get(tok, sym->id, e->sym[next].id);
		if (m == NULL || m->new_id != c.new_id)
			continue;
		sym->id = c.new_id;
		e->sym[next].alive = false;
		sym->next = e->sym[next].next;
		if (sym->next >= 0)
			e->sym[sym->next].prev = c.pos;
		if (sym->prev >= 0)
			enc_candidate(e, &nheap, sym->prev);
		enc_candidate(e, &nheap, c.pos);
	}
	for (int32_t i = 0; i >= 0; i = e->sym[i].next)
		if ((st = enc_emit(e, e->sym[i].id)) != DL_OK)
			return st;
	return DL_OK;
}

/* Run pre-tokenizer steps from step on s[0..n), then BPE on each resulting piece. */
static dl_status
enc_pretok(tok_enc *e, int step, const char *s, size_t n)
{
	const tok_step *st;
	size_t		prev = 0,
				start = 0;
	dl_status	rc;

	if (n == 0)
		return DL_OK;
	if (step == e->tok->nsteps)
		return enc_bpe(e, s, n);
	st = &e->tok->steps[step];
	if (st->kind == TOK_STEP_PREFIX_SPACE)
	{
		/* only the one ByteLevel makes this step, so the buffer is not in use */
		if (s[0] == ' ')
			return enc_pretok(e, step + 1, s, n);
		if ((rc = enc_buf(e, &e->prefixed, &e->prefixed_cap, n + 1)) != DL_OK)
			return rc;
		e->prefixed[0] = ' ';
		memcpy(e->prefixed + 1, s, n);
		return enc_pretok(e, step + 1, e->prefixed, n + 1);
	}

	/* Split with behaviour Isolated: matches and the gaps between them are pieces. */
	while (start < n)
	{
		int			m = pcre2_match(st->re, (PCRE2_SPTR) s, n, start, PCRE2_NO_UTF_CHECK,
									e->md, NULL);
		PCRE2_SIZE *ov;
		size_t		ms,
					me;

		if (m == PCRE2_ERROR_NOMATCH)
			break;
		if (m < 0)
		{
			PCRE2_UCHAR msg[256];

			pcre2_get_error_message(m, msg, sizeof(msg));
			return dl_fail(e->err, DL_EUNSUPPORTED, "pre-tokenizer regex failed at byte %zu: %s",
						   start, (const char *) msg);
		}
		ov = pcre2_get_ovector_pointer(e->md);
		ms = ov[0];
		me = ov[1];
		if (me == ms)
		{
			/* empty matches make no piece; look again one character on */
			size_t		bad;
			uint32_t	cp;

			if (ms >= n)
				break;
			start = ms + utf8_char((const unsigned char *) s + ms, n - ms, &cp, &bad);
			continue;
		}
		if (prev < ms && (rc = enc_pretok(e, step + 1, s + prev, ms - prev)) != DL_OK)
			return rc;
		if ((rc = enc_pretok(e, step + 1, s + ms, me - ms)) != DL_OK)
			return rc;
		prev = start = me;
	}
	return enc_pretok(e, step + 1, s + prev, n - prev);
}

/* Text left between normalized added tokens: pre-tokenize and merge. */
static dl_status
enc_pieces(tok_enc *e, const char *s, size_t n)
{
	return enc_pretok(e, 0, s, n);
}

/*
 * Split s[0..n) on the added tokens of matcher m (tokenizers' AddedVocabulary::find_matches):
 * emit their ids and pass the text between them to text. Matches are found as the
 * Aho-Corasick iterator finds them, before single_word can discard one.
 */
static dl_status
enc_split_added(tok_enc *e, const tok_matcher *m, const char *s, size_t n, tok_text_fn text)
{
	const dl_tokenizer *tok = e->tok;
	size_t		done = 0,
				from = 0,
				at;
	int32_t		k;
	dl_status	st;

	while ((k = tok_matcher_find(tok, m, s, from, n, &at)) >= 0)
	{
		const tok_added *a = &tok->added[k];
		size_t		start = at,
					stop = at + a->pat_len;

		from = stop;
		if (a->single_word &&
			((start > 0 && cp_is_word(utf8_last_char(s, start, NULL))) ||
			 (stop < n && cp_is_word(utf8_first_char(s + stop, n - stop, NULL)))))
			continue;
		if (a->lstrip)
		{
			size_t		clen;

			/* never back into what the previous match took */
			if (start < done)
				start = done;
			while (start > done && u_isUWhiteSpace((UChar32) utf8_last_char(s, start, &clen)))
				start -= clen;
		}
		if (a->rstrip)
		{
			size_t		clen;

			while (stop < n && u_isUWhiteSpace((UChar32) utf8_first_char(s + stop, n - stop, &clen)))
				stop += clen;
		}
		if (done < start && (st = text(e, s + done, start - done)) != DL_OK)
			return st;

		/* stripping can leave a match nothing to cover; tokenizers drops empty splits */
		if (start < stop && (st = enc_emit(e, a->id)) != DL_OK)
			return st;
		done = stop;
	}
	return done < n ? text(e, s + done, n - done) : DL_OK;
}

dl_status
tok_normalize(const dl_tokenizer *tok, const char *s, size_t n, char **out, size_t *outn,
			  dl_error *err)
{
	UErrorCode	ue = U_ZERO_ERROR;
	UChar	   *u = NULL,
			   *v = NULL;
	int32_t		ulen,
				vlen,
				olen;

	*out = NULL;
	if (n >= INT32_MAX / 4)
		return dl_fail(err, DL_EINVAL, "text of %zu bytes is too long to normalize", n);
	u = malloc((n + 1) * sizeof(UChar));	/* UTF-16 never needs more units than UTF-8 bytes */
	if (u == NULL)
		goto oom;
	u_strFromUTF8(u, (int32_t) n + 1, &ulen, s, (int32_t) n, &ue);
	vlen = unorm2_normalize(tok->norm, u, ulen, NULL, 0, &ue);
	if (ue == U_BUFFER_OVERFLOW_ERROR)
		ue = U_ZERO_ERROR;
	if (U_FAILURE(ue))
		goto fail;
	v = malloc(((size_t) vlen + 1) * sizeof(UChar));
	if (v == NULL)
		goto oom;
	unorm2_normalize(tok->norm, u, ulen, v, vlen + 1, &ue);
	u_strToUTF8(NULL, 0, &olen, v, vlen, &ue);
	if (ue == U_BUFFER_OVERFLOW_ERROR)
		ue = U_ZERO_ERROR;
	if (U_FAILURE(ue))
		goto fail;
	*out = malloc((size_t) olen + 1);
	if (*out == NULL)
		goto oom;
	u_strToUTF8(*out, olen + 1, NULL, v, vlen, &ue);
	if (U_FAILURE(ue))
		goto fail;
	*outn = (size_t) olen;
	free(u);
	free(v);
	return DL_OK;

fail:
	free(u);
	free(v);
	free(*out);
	*out = NULL;
	return dl_fail(err, DL_EINVAL, "unicode normalization failed: %s", u_errorName(ue));
oom:
	free(u);
	free(v);
	return dl_fail(err, DL_ENOMEM, "out of memory normalizing text");
}

/* Text left between raw added tokens: normalize, then split on the normalized added tokens. */
static dl_status
enc_segment(tok_enc *e, const char *s, size_t n)
{
	char	   *norm = NULL;
	size_t		nn = n;
	bool		ascii = true;
	dl_status	st;

	if (e->tok->norm != NULL)
	{
		/* the Unicode normal forms leave ASCII as it is */
		for (size_t i = 0; i < n && ascii; i++)
			ascii = (unsigned char) s[i] < 0x80;
		if (!ascii && (st = tok_normalize(e->tok, s, n, &norm, &nn, e->err)) != DL_OK)
			return st;
	}
	st = enc_split_added(e, &e->tok->match_norm, norm ? norm : s, nn, enc_pieces);
	free(norm);
	return st;
}

dl_status
tok_encode(const dl_tokenizer *tok, const char *text, size_t len,
		   int32_t **ids, int *n, dl_error *err)
{
	tok_enc		e = {.tok = tok,.err = err};
	size_t		bad = utf8_invalid_at(text, len);
	dl_status	st;

	*ids = NULL;
	*n = 0;
	if (bad < len)
		return dl_fail(err, DL_EINVAL, "text to encode is not valid UTF-8 at byte %zu", bad);
	e.md = pcre2_match_data_create(1, NULL);
	if (e.md == NULL)
		st = dl_fail(err, DL_ENOMEM, "out of memory encoding text");
	else
		st = enc_split_added(&e, &tok->match_raw, text, len, enc_segment);
	if (st == DL_OK && e.nout > INT_MAX)
		st = dl_fail(err, DL_EINVAL, "text encodes to more than %d tokens", INT_MAX);
	if (st == DL_OK && e.out == NULL && (e.out = malloc(sizeof(int32_t))) == NULL)
		st = dl_fail(err, DL_ENOMEM, "out of memory encoding text");
	pcre2_match_data_free(e.md);
	free(e.sym);
	free(e.heap);
	free(e.prefixed);
	free(e.symbols);
	if (st != DL_OK)
	{
		free(e.out);
		return st;
	}
	*ids = e.out;
	*n = (int) e.nout;
	return DL_OK;
}

dl_status
tok_decode_len(const dl_tokenizer *tok, const int32_t *ids, int n, int skip_special,
			   char **text, size_t *text_len, dl_error *err)
{
	size_t		total = 0,
				len = 0,
				i = 0;
	char	   *bytes,
			   *out;

	*text = NULL;
	for (int k = 0; k < n; k++)
	{
		if (ids[k] < 0)
			return dl_fail(err, DL_EINVAL, "token id %d at position %d is negative", ids[k], k);
		if (ids[k] < tok->nids)
			total += tok->ids[ids[k]].dec_len;
	}
	bytes = malloc(total + 1);
	out = malloc(3 * total + 1);	/* each invalid byte can become U+FFFD, 3 bytes */
	if (bytes == NULL || out == NULL)
	{
		free(bytes);
		free(out);
		return dl_fail(err, DL_ENOMEM, "out of memory decoding %d tokens", n);
	}
	for (int k = 0; k < n; k++)
	{
		const tok_idinfo *info;

		/* ids past the vocabulary (padded embedding rows) decode to nothing */
		if (ids[k] >= tok->nids)
			continue;
		info = &tok->ids[ids[k]];
		if (!(info->flags & TOK_PRESENT) || (skip_special && (info->flags & TOK_SPECIAL)))
			continue;
		memcpy(bytes + len, tok->arena + info->dec_off, info->dec_len);
		len += info->dec_len;
	}
	total = 0;
	while (i < len)
	{
		size_t		bad,
					clen;
		uint32_t	cp;

		clen = utf8_char((const unsigned char *) bytes + i, len - i, &cp, &bad);
		if (clen > 0)
		{
			memcpy(out + total, bytes + i, clen);
			total += clen;
			i += clen;
		}
		else
		{
			memcpy(out + total, "\xEF\xBF\xBD", 3);
			total += 3;
			i += bad;
		}
	}
	out[total] = '\0';
	free(bytes);
	*text = out;
	*text_len = total;
	return DL_OK;
}

dl_status
tok_decode(const dl_tokenizer *tok, const int32_t *ids, int n, int skip_special,
		   char **text, dl_error *err)
{
	size_t		len;

	return tok_decode_len(tok, ids, n, skip_special, text, &len, err);
}
