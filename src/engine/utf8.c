/*
 * utf8.c: UTF-8 as Unicode defines it (no overlongs, no surrogates, nothing above
 * U+10FFFF), for every reader of text from files (safetensors headers, tokenizers, pickles);
 * see utf8.h.
 */
#include "utf8.h"

size_t
utf8_char(const unsigned char *s, size_t n, uint32_t *cp, size_t *bad)
{
	unsigned char c = s[0];
	unsigned char lo = 0x80,
				hi = 0xBF;
	size_t		need;
	uint32_t	v;

	if (c < 0x80)
	{
		*cp = c;
		return 1;
	}
	if (c >= 0xC2 && c <= 0xDF)
	{
		need = 1;
		v = c & 0x1F;
	}
	else if (c >= 0xE0 && c <= 0xEF)
	{
		need = 2;
		v = c & 0x0F;
		if (c == 0xE0)
			lo = 0xA0;			/* overlong */
		else if (c == 0xED)
			hi = 0x9F;			/* surrogates */
	}
	else if (c >= 0xF0 && c <= 0xF4)
	{
		need = 3;
		v = c & 0x07;
		if (c == 0xF0)
			lo = 0x90;			/* overlong */
		else if (c == 0xF4)
			hi = 0x8F;			/* above U+10FFFF */
	}
	else
	{
		*bad = 1;
		return 0;
	}
	for (size_t i = 1; i <= need; i++)
	{
		if (i >= n || s[i] < lo || s[i] > hi)
		{
			*bad = i;
			return 0;
		}
		v = (v << 6) | (s[i] & 0x3F);
		lo = 0x80;
		hi = 0xBF;
	}
	*cp = v;
	return need + 1;
}

size_t
utf8_invalid_at(const char *s, size_t n)
{
	size_t		i = 0,
				bad,
				len;
	uint32_t	cp;

	while (i < n)
	{
		if ((unsigned char) s[i] < 0x80)
		{
			i++;
			continue;
		}
		len = utf8_char((const unsigned char *) s + i, n - i, &cp, &bad);
		if (len == 0)
			return i;
		i += len;
	}
	return n;
}
