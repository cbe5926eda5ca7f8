/* error.c: filling dl_error records; see error.h. */
#include "error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

dl_status
dl_fail(dl_error *err, dl_status code, const char *fmt,...)
{
	va_list		ap;

	if (err == NULL)
		return code;
	err->code = code;
	va_start(ap, fmt);
	vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
	va_end(ap);
	err->hint[0] = '\0';
	return code;
}

dl_status
dl_hint(dl_error *err, const char *fmt,...)
{
	va_list		ap;

	if (err == NULL)
		return DL_OK;
	va_start(ap, fmt);
	vsnprintf(err->hint, sizeof(err->hint), fmt, ap);
	va_end(ap);
	return err->code;
}

const char *
dl_shown(char *out, size_t outlen, const void *s, size_t len)
{
	const unsigned char *b = (const unsigned char *) s;
	size_t		k = 0;

	if (outlen == 0)
		return out;
	for (size_t i = 0; i < len && i < 120 && k + 4 < outlen; i++)
		out[k++] = b[i] >= 0x20 && b[i] < 0x7f ? (char) b[i] : '?';
	if (len > 120 && k + 4 < outlen)
	{
		memcpy(out + k, "...", 3);
		k += 3;
	}
	out[k] = '\0';
	return out;
}

const char *
dl_status_name(dl_status code)
{
	switch (code)
	{
		case DL_OK:
			return "ok";
		case DL_EIO:
			return "i/o error";
		case DL_EFORMAT:
			return "malformed input";
		case DL_EUNSUPPORTED:
			return "unsupported";
		case DL_ENOMEM:
			return "out of memory";
		case DL_EINVAL:
			return "invalid argument";
		case DL_EBACKEND:
			return "backend error";
		case DL_ECANCELLED:
			return "cancelled";
	}
	return "unknown error";
}
