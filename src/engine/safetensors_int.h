/*
 * safetensors_int.h: what safetensors.c (the file format) and weights.c (a model
 * directory's weight files) share; not part of the engine's API.
 */
#ifndef DOLLY_SAFETENSORS_INT_H
#define DOLLY_SAFETENSORS_INT_H

#include <json-c/json.h>

#include "safetensors.h"

/*
 * Parse len bytes of JSON as one object, strictly: valid UTF-8, nothing after the object
 * but JSON whitespace; a file's header and a sharded model's index are read so. fname and
 * what (the "header", the "index") name the text in messages.
 */
dl_status	st_json_object(const char *text, size_t len, const char *fname, const char *what,
						   json_object **out, dl_error *err);

#endif
