/*
 * paths.h: model names, the directories they stand for, and loading them (paths.c).
 */
#ifndef DOLLY_PATHS_H
#define DOLLY_PATHS_H

#include "error.h"
#include "pipeline.h"

#define DOLLY_MODEL_NAME_MAX 256

/* Can name be a directory under dolly.model_dir (no separators, no "..")? */
extern bool dolly_model_name_ok(const char *name);

/* ERROR unless name can name a directory under dolly.model_dir (no separators, no ".."). */
extern void dolly_check_model_name(const char *name);

/*
 * The directory a model name stands for: "" is dolly.model (an absolute path, or a name
 * under dolly.model_dir), anything else a name under dolly.model_dir. *is_default says
 * which. DL_EIO (with a message that shows no path) when the directory does not exist.
 */
extern dl_status dolly_model_path(const char *name, char *path, bool *is_default, dl_error *err);

/*
 * The name sessions know a request's model by, for messages: its name under
 * dolly.model_dir, or "dolly.model" for a default given as a path (paths are for superusers).
 */
extern const char *dolly_model_display_name(const char *name);

/*
 * What identifies a model directory beyond its name: the file system's device and inode.
 * The catalog records it when a model is registered; the server loads a named model only
 * when its directory still has it, so a name dropped and reused (or a directory swapped
 * in) is never served on the strength of the old entry's grants.
 */
typedef struct DollyModelIdent
{
	uint64		dev;
	uint64		ino;
} DollyModelIdent;

/* Is the model directory at path a LoRA adapter (PEFT's adapter_config.json)? */
extern bool dolly_is_adapter(const char *path);

/* The identity of directory path; false (errno set) when it cannot be read. */
extern bool dolly_model_ident(const char *path, DollyModelIdent *out);

/*
 * Read the identity of model `name`'s directory at path into *have; DL_OK when want is
 * NULL or {0, 0} (not checked) or the directory still has it.
 */
extern dl_status dolly_model_ident_check(const char *name, const char *path,
										 const DollyModelIdent *want, DollyModelIdent *have,
										 dl_error *err);

/*
 * Open the model directory path through the engine's Dolly pipeline: its tokenizer, and
 * (unless be is NULL) its model on be, showing "<activity>: N%" in pg_stat_activity as it
 * loads. The load stops (DL_ECANCELLED) when this process is asked to die, or when
 * stop(arg) (unless NULL) says so; the caller's CHECK_FOR_INTERRUPTS then ends the process.
 */
extern dl_status dolly_open_model(const char *path, dl_backend *be, const char *activity,
								  bool (*stop) (void *arg), void *arg, dl_pipeline **out, dl_error *err);

/*
 * Remove the temporary directories of models being saved (see model_save) from
 * dolly.model_dir: at postmaster start and after a crash, when no job can be saving.
 */
extern void dolly_remove_partial_models(void);

#endif
