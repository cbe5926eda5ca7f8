/*
 * lora_save.c: an adapter written as PEFT's directory (dl_lora_save): adapter_config.json
 * as LoraConfig writes it, and the tensors under PEFT's names through model_save.c's
 * weights_write, aside and renamed. Apart from lora.c so that what only loads and runs
 * adapters (the GPU tests, tests/gpu/run.sh) needs no tokenizer or saving code.
 */
#include "files.h"
#include "lora.h"
#include "tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json.h>

/* A JSON number written as the float f reads in decimal (0.05, not 0.0500000007). */
static json_object *
json_float(float f)
{
	char		text[32];

	snprintf(text, sizeof(text), "%.7g", (double) f);
	return json_object_new_double_s(strtod(text, NULL), text);
}

/* adapter_config.json of a, as PEFT's LoraConfig writes it, at path. */
static dl_status
write_config(const dl_lora *a, const char *base_name, const char *path, dl_error *err)
{
	json_object *cfg = json_object_new_object(),
			   *targets = json_object_new_array();
	const char *text;
	dl_file_out f;
	dl_status	st;

	for (int i = 0; i < a->ntargets; i++)
		json_object_array_add(targets, json_object_new_string(a->targets[i].module));
	json_object_object_add(cfg, "peft_type", json_object_new_string("LORA"));
	json_object_object_add(cfg, "task_type", json_object_new_string("CAUSAL_LM"));
	json_object_object_add(cfg, "base_model_name_or_path", json_object_new_string(base_name));
	json_object_object_add(cfg, "r", json_object_new_int(a->r));
	json_object_object_add(cfg, "lora_alpha", json_float(a->alpha));
	json_object_object_add(cfg, "lora_dropout", json_float(a->dropout));
	json_object_object_add(cfg, "target_modules", targets);
	json_object_object_add(cfg, "bias", json_object_new_string("none"));
	json_object_object_add(cfg, "fan_in_fan_out", json_object_new_boolean(0));
	json_object_object_add(cfg, "use_rslora", json_object_new_boolean(a->rslora));
	json_object_object_add(cfg, "use_dora", json_object_new_boolean(0));
	json_object_object_add(cfg, "modules_to_save", NULL);
	json_object_object_add(cfg, "inference_mode", json_object_new_boolean(1));
	json_object_object_add(cfg, "init_lora_weights", json_object_new_boolean(1));
	if (a->ntok)
	{
		/* PEFT's form naming both tables: its default, a bare list, trains the embedding's alone */
		json_object *rows = json_object_new_object();

		for (int k = 0; k < 2; k++)
		{
			json_object *ids = json_object_new_array();

			for (int i = 0; i < a->ntok; i++)
				json_object_array_add(ids, json_object_new_int(a->tok0 + i));
			json_object_object_add(rows, k ? DL_LORA_TOKEN_HEAD : lora_token_module(&a->model->cfg), ids);
		}
		json_object_object_add(cfg, "trainable_token_indices", rows);
	}
	text = json_object_to_json_string_ext(cfg, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
										  JSON_C_TO_STRING_NOSLASHESCAPE);
	st = file_create(path, &f, err);
	if (st == DL_OK)
		st = file_commit(&f, file_write(&f, text, strlen(text), err), err);
	json_object_put(cfg);
	return st;
}

dl_status
dl_lora_save(const dl_lora *a, const char *base_name, const dl_tokenizer *tok, const char *dir,
			 dl_error *err)
{
	dl_dir_aside d;
	char		path[4300];
	dl_status	st;

	if (a->ntok && tok == NULL)
		return dl_fail(err, DL_EINVAL, "an adapter with token rows is saved with its tokenizer");
	st = dir_aside_begin(dir, &d, err);
	if (st != DL_OK)
		return st;
	snprintf(path, sizeof(path), "%s/tokenizer.json", d.tmp);
	if (a->ntok)
		st = tok_save(tok, path, err);
	snprintf(path, sizeof(path), "%s/adapter_config.json", d.tmp);
	if (st == DL_OK)
		st = write_config(a, base_name, path, err);
	snprintf(path, sizeof(path), "%s/adapter_model.safetensors", d.tmp);
	if (st == DL_OK)
		st = weights_write(a->model->be, a->mem, a->map, a->nmap, &a->model->cfg, path, err);
	return dir_aside_end(&d, st, err);
}
