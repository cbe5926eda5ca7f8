/*
 * tokenizer_tables.c: the tables a tokenizer is made of (tokenizer_int.h) and their upkeep.
 *
 * All strings sit in one arena addressed by 32-bit offsets; ids index an array of their
 * contents and what they decode to; contents and merged pairs are found through open
 * addressing tables (linear probing, grown at half full); added tokens are matched through
 * a list ordered by first byte and length. tokenizer_json.c fills the tables (and
 * tok_add_special adds to them), tokenizer.c only reads them.
 */
#include "tokenizer_int.h"
#include "utf8.h"

#include <stdlib.h>
#include <string.h>

/* FNV-1a over bytes, mixed. */
static uint64_t
hash_bytes(const char *s, size_t n)
{
	uint64_t	h = 0xcbf29ce484222325ULL;

	for (size_t i = 0; i < n; i++)
		h = (h ^ (unsigned char) s[i]) * 0x100000001b3ULL;
	return tok_hash_mix(h);
}

bool
tok_grow(void **p, size_t *cap, size_t need, size_t elem)
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

dl_status
tok_arena_add(dl_tokenizer *tok, const char *s, size_t n, uint32_t *off, dl_error *err)
{
	void	   *p = tok->arena;

	if (tok->arena_len + n > UINT32_MAX)
		return dl_fail(err, DL_EUNSUPPORTED, "tokenizer strings exceed 4 GiB");
	/* + 1: the arena exists even when the first string is empty ("" can be a vocab key) */
	if (!tok_grow(&p, &tok->arena_cap, tok->arena_len + n + 1, 1))
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

int32_t
tok_map_get(const dl_tokenizer *tok, const char *s, size_t n)
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

void
tok_merge_put(dl_tokenizer *tok, int32_t a, int32_t b, int32_t rank, int32_t new_id)
{
	uint64_t	key = (uint64_t) a << 32 | (uint32_t) b;
	uint64_t	i;

	for (i = tok_hash_mix(key) & tok->merge_mask;
		 tok->merges[i].key != TOK_EMPTY_KEY && tok->merges[i].key != key;
		 i = (i + 1) & tok->merge_mask)
		;
	tok->merges[i].key = key;
	tok->merges[i].rank = rank;
	tok->merges[i].new_id = new_id;
}

dl_status
tok_ids_reserve(dl_tokenizer *tok, int32_t n, dl_error *err)
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

dl_status
tok_define_id(dl_tokenizer *tok, int32_t id, const char *s, size_t n, uint8_t flags,
		  const char *what, dl_error *err)
{
	int32_t		other;
	dl_status	st;

	if (utf8_invalid_at(s, n) < n)
		return dl_fail(err, DL_EFORMAT, "%s: token %d is not valid UTF-8", what, id);
	if (tok->ids[id].flags & TOK_PRESENT)
		return dl_fail(err, DL_EFORMAT, "%s: duplicate id %d (\"%.*s\" and \"%.*s\")", what, id,
					   (int) n, s, (int) tok->ids[id].len, id_content(tok, id));
	if ((other = tok_map_get(tok, s, n)) >= 0)
		return dl_fail(err, DL_EFORMAT, "%s: \"%.*s\" has ids %d and %d", what, (int) n, s,
					   other, id);
	if ((st = tok_arena_add(tok, s, n, &tok->ids[id].off, err)) != DL_OK)
		return st;
	tok->ids[id].len = (uint32_t) n;
	tok->ids[id].flags = TOK_PRESENT | flags;
	return map_put(tok, id, err);
}

int32_t
tok_next_added_id(const dl_tokenizer *tok)
{
	int32_t		id = tok->vocab_count;

	for (int32_t k = 0; k < tok->nadded; k++)
		if (tok->added[k].id >= id)
			id = tok->added[k].id + 1;
	return id;
}

dl_status
tok_set_decoding(dl_tokenizer *tok, int32_t id, uint32_t off, uint32_t slen, dl_error *err)
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
		st = tok_arena_add(tok, bytes, n, &info->dec_off, err);
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

dl_status
tok_matcher_build(dl_tokenizer *tok, tok_matcher *m, bool normalized, dl_error *err)
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

int32_t
tok_matcher_find(const dl_tokenizer *tok, const tok_matcher *m, const char *s, size_t from, size_t n,
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

dl_status
tok_setup_bytes(dl_tokenizer *tok, const char *vocab_name, dl_error *err)
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
		id = tok_map_get(tok, (const char *) tok->byte_utf8[b], tok->byte_utf8_len[b]);
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

int32_t
tok_token_id(const dl_tokenizer *tok, const char *content)
{
	return tok_map_get(tok, content, strlen(content));
}

int
tok_vocab_size(const dl_tokenizer *tok)
{
	return tok->nids;
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
