/*
 * tokenizer.c: GPT-2 byte-level BPE from a Hugging Face tokenizer.json, as `tokenizers` runs it.
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
 * The parsed JSON is kept so that tok_save can write back exactly what was read plus the
 * special tokens that fine-tuning adds. tokenizer_files.c makes such a tree of the older
 * vocab.json + merges.txt files and builds from it with tok_from_json.
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
#include <sys/stat.h>
#include <unistd.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/uchar.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

/* GPT-2's pre-tokenisation regex (tokenizers' pre_tokenizers/byte_level.rs). */
#define TOK_GPT2_REGEX \
	"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

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

/* 64-bit finaliser (MurmurHash3's fmix64). */
static inline uint64_t
hash_mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

/* FNV-1a over bytes, mixed. */
static uint64_t
hash_bytes(const char *s, size_t n)
{
	uint64_t	h = 0xcbf29ce484222325ULL;

	for (size_t i = 0; i < n; i++)
		h = (h ^ (unsigned char) s[i]) * 0x100000001b3ULL;
	return hash_mix(h);
}

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

/* Grow *p (of *cap elements of size elem) to hold at least need elements. */
static bool
grow(void **p, size_t *cap, size_t need, size_t elem)
{
	size_t		ncap = *cap ? *cap : 16;
	void	   *np;

	if (need <= *cap)
		return true;
	while (ncap < need)
		ncap *= 2;
	np = realloc(*p, ncap * elem);
	if (np == NULL)
		return false;
	*p = np;
	*cap = ncap;
	return true;
}

/* Append n bytes to the string arena; their offset goes to *off. */
static dl_status
arena_add(dl_tokenizer *tok, const char *s, size_t n, uint32_t *off, dl_error *err)
{
	void	   *p = tok->arena;

	if (tok->arena_len + n > UINT32_MAX)
		return dl_fail(err, DL_EUNSUPPORTED, "tokenizer strings exceed 4 GiB");
	/* + 1: the arena exists even when the first string is empty ("" can be a vocab key) */
	if (!grow(&p, &tok->arena_cap, tok->arena_len + n + 1, 1))
		return dl_fail(err, DL_ENOMEM, "out of memory storing tokenizer strings");
	tok->arena = p;
	memcpy(tok->arena + tok->arena_len, s, n);
	*off = (uint32_t) tok->arena_len;
	tok->arena_len += n;
	return DL_OK;
}

/* The content string of an id. */
static inline const char *
id_content(const dl_tokenizer *tok, int32_t id)
{
	return tok->arena + tok->ids[id].off;
}

/* Id whose content is s[0..n), or -1. */
static int32_t
map_get(const dl_tokenizer *tok, const char *s, size_t n)
{
	uint32_t	i;

	if (tok->map == NULL)
		return -1;
	for (i = (uint32_t) hash_bytes(s, n) & tok->map_mask;; i = (i + 1) & tok->map_mask)
	{
		int32_t		id = tok->map[i];

		if (id < 0)
			return -1;
		if (tok->ids[id].len == n && memcmp(id_content(tok, id), s, n) == 0)
			return id;
	}
}

/* Index id by its content (which must not be indexed yet), growing the table at half full. */
static dl_status
map_put(dl_tokenizer *tok, int32_t id, dl_error *err)
{
	uint32_t	i;

	if ((tok->map_count + 1) * 2 > tok->map_mask + 1 || tok->map == NULL)
	{
		uint32_t	ncap = tok->map ? (tok->map_mask + 1) * 2 : 1024;
		int32_t    *old = tok->map;
		uint32_t	oldcap = old ? tok->map_mask + 1 : 0;

		while (ncap < (tok->map_count + 1) * 2)
			ncap *= 2;
		tok->map = malloc(ncap * sizeof(int32_t));
		if (tok->map == NULL)
		{
			tok->map = old;
			return dl_fail(err, DL_ENOMEM, "out of memory indexing the vocabulary");
		}
		memset(tok->map, 0xFF, ncap * sizeof(int32_t));
		tok->map_mask = ncap - 1;
		for (uint32_t j = 0; j < oldcap; j++)
		{
			if (old[j] < 0)
				continue;
			for (i = (uint32_t) hash_bytes(id_content(tok, old[j]), tok->ids[old[j]].len) & tok->map_mask;
				 tok->map[i] >= 0; i = (i + 1) & tok->map_mask)
				;
			tok->map[i] = old[j];
		}
		free(old);
	}
	for (i = (uint32_t) hash_bytes(id_content(tok, id), tok->ids[id].len) & tok->map_mask;
		 tok->map[i] >= 0; i = (i + 1) & tok->map_mask)
		;
	tok->map[i] = id;
	tok->map_count++;
	return DL_OK;
}

/* The merge of the pair (a, b), or NULL. */
static inline const tok_merge *
merge_get(const dl_tokenizer *tok, int32_t a, int32_t b)
{
	uint64_t	key = (uint64_t) a << 32 | (uint32_t) b;

	for (uint64_t i = hash_mix(key) & tok->merge_mask;; i = (i + 1) & tok->merge_mask)
	{
		if (tok->merges[i].key == key)
			return &tok->merges[i];
		if (tok->merges[i].key == TOK_EMPTY_KEY)
			return NULL;
	}
}

/* Record a merge; a pair listed twice keeps its last rank, as tokenizers' HashMap does. */
static void
merge_put(dl_tokenizer *tok, int32_t a, int32_t b, int32_t rank, int32_t new_id)
{
	uint64_t	key = (uint64_t) a << 32 | (uint32_t) b;
	uint64_t	i;

	for (i = hash_mix(key) & tok->merge_mask;
		 tok->merges[i].key != TOK_EMPTY_KEY && tok->merges[i].key != key;
		 i = (i + 1) & tok->merge_mask)
		;
	tok->merges[i].key = key;
	tok->merges[i].rank = rank;
	tok->merges[i].new_id = new_id;
}

/* Make sure ids[0 .. n) exist, new entries empty. */
static dl_status
ids_reserve(dl_tokenizer *tok, int32_t n, dl_error *err)
{
	tok_idinfo *p;

	if (n <= tok->nids)
		return DL_OK;
	p = realloc(tok->ids, (size_t) n * sizeof(tok_idinfo));
	if (p == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory for %d token ids", n);
	memset(p + tok->nids, 0, (size_t) (n - tok->nids) * sizeof(tok_idinfo));
	tok->ids = p;
	tok->nids = n;
	return DL_OK;
}

/*
 * Set what id decodes to from its string arena[off..off+len) (tokenizers' ByteLevel decoder):
 * the bytes behind its byte-level symbols when every character is one, else the string.
 */
static dl_status
set_decoding(dl_tokenizer *tok, int32_t id, uint32_t off, uint32_t slen, dl_error *err)
{
	tok_idinfo *info = &tok->ids[id];
	char		small[256];
	char	   *bytes = slen <= sizeof(small) ? small : malloc(slen);
	size_t		n = 0,
				i = 0,
				bad,
				len;
	uint32_t	cp;
	dl_status	st = DL_OK;

	if (bytes == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory decoding the vocabulary");
	while (i < slen)
	{
		len = utf8_char((const unsigned char *) tok->arena + off + i, slen - i, &cp, &bad);
		if (len == 0 || cp >= TOK_BYTE_CP_END || tok->cp_byte[cp] < 0)
			break;
		bytes[n++] = (char) tok->cp_byte[cp];
		i += len;
	}
	if (i < slen)
	{
		info->dec_off = off;
		info->dec_len = slen;
	}
	else
	{
		st = arena_add(tok, bytes, n, &info->dec_off, err);
		info->dec_len = (uint32_t) n;
	}
	if (bytes != small)
		free(bytes);
	return st;
}

/* A sort key for building a tok_matcher. */
typedef struct tok_matchkey
{
	unsigned char first;
	uint32_t	len;
	int32_t		index;
} tok_matchkey;

/* Order by first byte, then longest first, then file order. */
static int
matchkey_cmp(const void *pa, const void *pb)
{
	const tok_matchkey *a = pa,
			   *b = pb;

	if (a->first != b->first)
		return a->first < b->first ? -1 : 1;
	if (a->len != b->len)
		return a->len > b->len ? -1 : 1;
	return a->index < b->index ? -1 : a->index > b->index;
}

/* (Re)build the matcher for the added tokens whose normalized flag is normalized. */
static dl_status
matcher_build(dl_tokenizer *tok, tok_matcher *m, bool normalized, dl_error *err)
{
	tok_matchkey *keys = malloc(((size_t) tok->nadded + 1) * sizeof(tok_matchkey));
	int32_t    *order = malloc(((size_t) tok->nadded + 1) * sizeof(int32_t));
	int32_t		n = 0;

	if (keys == NULL || order == NULL)
	{
		free(keys);
		free(order);
		return dl_fail(err, DL_ENOMEM, "out of memory indexing added tokens");
	}
	for (int32_t k = 0; k < tok->nadded; k++)
	{
		if (tok->added[k].normalized != normalized || tok->added[k].pat_len == 0)
			continue;
		keys[n].first = (unsigned char) tok->arena[tok->added[k].pat_off];
		keys[n].len = tok->added[k].pat_len;
		keys[n].index = k;
		n++;
	}
	qsort(keys, n, sizeof(tok_matchkey), matchkey_cmp);
	memset(m->first, 0, sizeof(m->first));
	for (int32_t i = 0; i < n; i++)
	{
		order[i] = keys[i].index;
		m->first[keys[i].first + 1]++;
	}
	for (int b = 0; b < 256; b++)
		m->first[b + 1] += m->first[b];
	free(keys);
	free(m->order);
	m->order = order;
	return DL_OK;
}

/* Leftmost-longest added token in s[from..n): its index in added[] (its start in *at), or -1. */
static int32_t
matcher_find(const dl_tokenizer *tok, const tok_matcher *m, const char *s, size_t from, size_t n,
			 size_t *at)
{
	if (m->first[256] == 0)
		return -1;
	for (size_t p = from; p < n; p++)
	{
		unsigned char c = (unsigned char) s[p];

		for (int32_t i = m->first[c]; i < m->first[c + 1]; i++)
		{
			const tok_added *a = &tok->added[m->order[i]];

			if (a->pat_len <= n - p && memcmp(tok->arena + a->pat_off, s + p, a->pat_len) == 0)
			{
				*at = p;
				return m->order[i];
			}
		}
	}
	return -1;
}

/* Append an id to the output. */
static dl_status
enc_emit(tok_enc *e, int32_t id)
{
	void	   *p = e->out;

	if (!grow(&p, &e->out_cap, e->nout + 1, sizeof(int32_t)))
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

	if (!grow(&p, cap, n, 1))
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

	if (next < 0 || (m = merge_get(e->tok, e->sym[pos].id, e->sym[next].id)) == NULL)
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
		id = map_get(tok, e->symbols, len);
		if (id >= 0 && (tok->ids[id].flags & TOK_IN_VOCAB))
			return enc_emit(e, id);
	}
	{
		void	   *p = e->sym;
		size_t		cap = e->sym_cap;

		if (!grow(&p, &cap, n, sizeof(tok_sym)))
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
		m = merge_get(tok, sym->id, e->sym[next].id);
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

	while ((k = matcher_find(tok, m, s, from, n, &at)) >= 0)
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

/* Normalize valid UTF-8 s[0..n) through ICU into a malloc'd *out of *outn bytes. */
static dl_status
normalize_text(tok_enc *e, const char *s, size_t n, char **out, size_t *outn)
{
	UErrorCode	ue = U_ZERO_ERROR;
	UChar	   *u = NULL,
			   *v = NULL;
	int32_t		ulen,
				vlen,
				olen;

	*out = NULL;
	if (n >= INT32_MAX / 4)
		return dl_fail(e->err, DL_EINVAL, "text of %zu bytes is too long to normalize", n);
	u = malloc((n + 1) * sizeof(UChar));	/* UTF-16 never needs more units than UTF-8 bytes */
	if (u == NULL)
		goto oom;
	u_strFromUTF8(u, (int32_t) n + 1, &ulen, s, (int32_t) n, &ue);
	vlen = unorm2_normalize(e->tok->norm, u, ulen, NULL, 0, &ue);
	if (ue == U_BUFFER_OVERFLOW_ERROR)
		ue = U_ZERO_ERROR;
	if (U_FAILURE(ue))
		goto fail;
	v = malloc(((size_t) vlen + 1) * sizeof(UChar));
	if (v == NULL)
		goto oom;
	unorm2_normalize(e->tok->norm, u, ulen, v, vlen + 1, &ue);
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
	return dl_fail(e->err, DL_EINVAL, "unicode normalization failed: %s", u_errorName(ue));
oom:
	free(u);
	free(v);
	return dl_fail(e->err, DL_ENOMEM, "out of memory normalizing text");
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
		if (!ascii && (st = normalize_text(e, s, n, &norm, &nn)) != DL_OK)
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

int32_t
tok_token_id(const dl_tokenizer *tok, const char *content)
{
	return map_get(tok, content, strlen(content));
}

int
tok_vocab_size(const dl_tokenizer *tok)
{
	return tok->nids;
}

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

/* Give id the content s[0..n); it must not have one and s must not name another id. */
static dl_status
define_id(dl_tokenizer *tok, int32_t id, const char *s, size_t n, uint8_t flags,
		  const char *what, dl_error *err)
{
	int32_t		other;
	dl_status	st;

	if (utf8_invalid_at(s, n) < n)
		return dl_fail(err, DL_EFORMAT, "%s: token %d is not valid UTF-8", what, id);
	if (tok->ids[id].flags & TOK_PRESENT)
		return dl_fail(err, DL_EFORMAT, "%s: duplicate id %d (\"%.*s\" and \"%.*s\")", what, id,
					   (int) n, s, (int) tok->ids[id].len, id_content(tok, id));
	if ((other = map_get(tok, s, n)) >= 0)
		return dl_fail(err, DL_EFORMAT, "%s: \"%.*s\" has ids %d and %d", what, (int) n, s,
					   other, id);
	if ((st = arena_add(tok, s, n, &tok->ids[id].off, err)) != DL_OK)
		return st;
	tok->ids[id].len = (uint32_t) n;
	tok->ids[id].flags = TOK_PRESENT | flags;
	return map_put(tok, id, err);
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
			(st = define_id(tok, id, key, strlen(key), TOK_IN_VOCAB, vocab_name, err)) != DL_OK)
			return st;
	}
	return DL_OK;
}

/* Vocabulary id of merge part s[0..n), or an error naming the merge. */
static dl_status
merge_part(dl_tokenizer *tok, const char *s, size_t n, int32_t rank, int32_t *id, dl_error *err)
{
	*id = map_get(tok, s, n);
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
		if (!grow(&joined, &joined_cap, alen + blen, 1))
		{
			st = dl_fail(err, DL_ENOMEM, "out of memory reading merges");
			break;
		}
		memcpy(joined, a, alen);
		memcpy((char *) joined + alen, b, blen);
		if ((st = merge_part(tok, a, alen, (int32_t) r, &aid, err)) == DL_OK &&
			(st = merge_part(tok, b, blen, (int32_t) r, &bid, err)) == DL_OK &&
			(st = merge_part(tok, joined, alen + blen, (int32_t) r, &nid, err)) == DL_OK)
			merge_put(tok, aid, bid, (int32_t) r, nid);
	}
	free(joined);
	return st;
}

/*
 * The id that tokenizers gives new added content (AddedVocabulary::add_tokens): the vocabulary's
 * size, or one past the highest added id when that is higher.
 */
static int32_t
next_added_id(const dl_tokenizer *tok)
{
	int32_t		id = tok->vocab_count;

	for (int32_t k = 0; k < tok->nadded; k++)
		if (tok->added[k].id >= id)
			id = tok->added[k].id + 1;
	return id;
}

/*
 * Read added_tokens ([{id, content, single_word, lstrip, rstrip, normalized, special}]) as
 * tokenizers does: the ids in the file are not used; content already known (a vocabulary
 * entry, an earlier added token) keeps its id, with the flags of its last entry, and other
 * content gets next_added_id, in file order. Files that tokenizers wrote list exactly these
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
		f.id = map_get(tok, content, len);
		if (f.id < 0)
		{
			f.id = next_added_id(tok);
			if (f.id >= TOK_MAX_ID)
				return dl_fail(err, DL_EUNSUPPORTED, "tokenizer has more than %d ids", TOK_MAX_ID);
			if ((st = ids_reserve(tok, f.id + 1, err)) != DL_OK ||
				(st = define_id(tok, f.id, content, len, 0, "added_tokens", err)) != DL_OK)
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
	tok_enc		e = {.tok = tok,.err = err};

	for (int32_t k = 0; k < tok->nadded && tok->norm; k++)
	{
		tok_added  *a = &tok->added[k];
		char	   *s;
		size_t		n;
		dl_status	st;

		if (!a->normalized)
			continue;
		if ((st = normalize_text(&e, tok->arena + a->pat_off, a->pat_len, &s, &n)) != DL_OK)
			return st;
		st = arena_add(tok, s, n, &a->pat_off, err);
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
	if ((st = ids_reserve(tok, (int32_t) (maxid + 1), err)) != DL_OK ||
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

/* The byte-level alphabet (MODEL_SPEC.md section 7) and each byte's id in vocab_name. */
static dl_status
setup_bytes(dl_tokenizer *tok, const char *vocab_name, dl_error *err)
{
	int			shifted = 0;

	memset(tok->cp_byte, 0xFF, sizeof(tok->cp_byte));
	for (int b = 0; b < 256; b++)
	{
		bool		printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
		uint32_t	cp = printable ? (uint32_t) b : (uint32_t) (256 + shifted++);
		int32_t		id;

		tok->cp_byte[cp] = (int16_t) b;
		if (cp < 0x80)
		{
			tok->byte_utf8[b][0] = (uint8_t) cp;
			tok->byte_utf8_len[b] = 1;
		}
		else
		{
			tok->byte_utf8[b][0] = (uint8_t) (0xC0 | (cp >> 6));
			tok->byte_utf8[b][1] = (uint8_t) (0x80 | (cp & 0x3F));
			tok->byte_utf8_len[b] = 2;
		}
		id = map_get(tok, (const char *) tok->byte_utf8[b], tok->byte_utf8_len[b]);
		if (id < 0 || !(tok->ids[id].flags & TOK_IN_VOCAB))
		{
			dl_fail(err, DL_EFORMAT, "%s has no symbol \"%.*s\" for byte 0x%02x", vocab_name,
					tok->byte_utf8_len[b], (const char *) tok->byte_utf8[b], b);
			return dl_hint(err, "A byte-level BPE vocabulary holds the symbols of all 256 bytes.");
		}
		tok->byte_id[b] = id;
	}
	return DL_OK;
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
			 (st = setup_bytes(tok, vocab_name, err)) == DL_OK &&
			 (st = parse_normalizer(tok, tok_json_member(tok->root, "normalizer"), err)) == DL_OK &&
			 (st = parse_pretok(tok, tok_json_member(tok->root, "pre_tokenizer"), err)) == DL_OK &&
			 (st = normalize_added(tok, err)) == DL_OK &&
			 (st = matcher_build(tok, &tok->match_raw, false, err)) == DL_OK &&
			 (st = matcher_build(tok, &tok->match_norm, true, err)) == DL_OK)
	{
		for (int32_t id = 0; id < tok->nids && st == DL_OK; id++)
			if (tok->ids[id].flags & TOK_PRESENT)
				st = set_decoding(tok, id, tok->ids[id].off, tok->ids[id].len, err);

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
				st = set_decoding(tok, a->id, a->pat_off, a->pat_len, err);
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

void
tok_free(dl_tokenizer *tok)
{
	if (tok == NULL)
		return;
	for (int i = 0; i < tok->nsteps; i++)
		pcre2_code_free(tok->steps[i].re);
	free(tok->steps);
	free(tok->match_raw.order);
	free(tok->match_norm.order);
	free(tok->added);
	free(tok->merges);
	free(tok->map);
	free(tok->ids);
	free(tok->arena);
	json_object_put(tok->root);
	free(tok);
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
	int32_t		tid = map_get(tok, content, len);
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
			tid = next_added_id(tok);
			if (tid >= TOK_MAX_ID)
				return dl_fail(err, DL_EUNSUPPORTED, "no id left for special token \"%s\"", content);
			if ((st = ids_reserve(tok, tid + 1, err)) != DL_OK ||
				(st = define_id(tok, tid, content, len, 0, "special token", err)) != DL_OK)
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
	if ((st = set_decoding(tok, tid, a->pat_off, a->pat_len, err)) != DL_OK ||
		(st = matcher_build(tok, &tok->match_raw, false, err)) != DL_OK ||
		(st = matcher_build(tok, &tok->match_norm, true, err)) != DL_OK)
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
