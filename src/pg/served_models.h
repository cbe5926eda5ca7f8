/*
 * served_models.h: the models a model server holds, for its batcher (served_models.c).
 * Only batcher.c and served_models.c include it.
 */
#ifndef DOLLY_SERVED_MODELS_H
#define DOLLY_SERVED_MODELS_H

#include "generate.h"
#include "lora.h"
#include "pipeline.h"

#include "paths.h"
#include "queue.h"

/* Where a request's model is, and what sessions call it. */
typedef struct ModelRef
{
	char		path[MAXPGPATH];
	char		name[DOLLY_MODEL_NAME_MAX];	/* dolly_model_display_name */
	bool		is_default;		/* dolly.model */
	DollyModelIdent ident;		/* of the directory now */
} ModelRef;

/* A LoRA adapter loaded over a served model, shared by the sequences that run it. */
typedef struct ServedAdapter
{
	char		path[MAXPGPATH];
	char		name[DOLLY_MODEL_NAME_MAX];
	DollyModelIdent ident;		/* of the directory when it was loaded */
	dl_lora    *lora;			/* NULL: a free entry */
	dl_pipeline *pipe;			/* its tokenizer, which has its token rows' tokens (lora.h);
								 * NULL: it has none, and runs with the model's */
	int			nseq;			/* sequences running it: it stays while any does */
	uint64		last_used;
} ServedAdapter;

/* A request the batcher runs on a model: one sequence of its generator. */
typedef struct Sequence
{
	DollyRequest *req;
	int			id;				/* in the model's generator */
	int			prompt_tokens;	/* for the statistics, once req is handed back */
	ServedAdapter *adapter;		/* the adapter it runs with; NULL: none */
} Sequence;

typedef struct ServedModel
{
	char		path[MAXPGPATH];
	char		name[DOLLY_MODEL_NAME_MAX];	/* for messages */
	DollyModelIdent ident;		/* of the directory when it was loaded */
	bool		is_default;		/* loaded as dolly.model */
	uint64		last_used;
	dl_pipeline *pipe;			/* model, tokenizer and stop tokens; NULL: a free entry */
	dl_kv_cache *cache;
	dl_generator *gen;
	int			status;			/* index in dolly_shared->models */
	int			nseq;
	Sequence   *seq;			/* [dolly.max_batch at load] */
	int			max_seq;
	ServedAdapter adapters[DOLLY_MAX_ADAPTERS];	/* its adapters (dolly.max_loaded_adapters) */
} ServedModel;

/* [DOLLY_MAX_MODELS]: the loaded models; an entry without a pipeline is free. */
extern ServedModel *dolly_served;

/* For model server `server`, before anything else here. */
extern void dolly_served_init(int server);

/*
 * The directory model name `name` stands for now. want (unless NULL or {0, 0}) is the
 * identity the catalog registered for it: a directory that no longer has it (dropped and
 * replaced, swapped in) is refused, whatever the name says.
 */
extern dl_status dolly_served_resolve(const char *name, const DollyModelIdent *want, ModelRef *ref,
									  dl_error *err);

/*
 * The loaded copy of ref's model, or NULL. With a registered identity (want, which
 * resolving found the directory has), a copy of another directory once at that path is not
 * it: that one was replaced, and LRU evicts it.
 */
extern ServedModel *dolly_served_find(const ModelRef *ref, const DollyModelIdent *want);

/*
 * May req cause one more model load? Loading stalls the device for everyone, so a role may
 * cause dolly.max_model_loads a minute (on each device: every model server counts its own);
 * loads of dolly.model and superusers' requests are free. Counts this one when it may.
 */
extern dl_status dolly_served_charge_load(const DollyRequest *req, const ModelRef *ref, dl_error *err);

/*
 * Load the model ref names into a free entry (evicting the least recently used idle one).
 * between_tensors(NULL) runs between two of its tensors; the load stops when it says so.
 */
extern dl_status dolly_served_load(const ModelRef *ref, bool (*between_tensors) (void *arg),
								   ServedModel **out, dl_error *err);

/*
 * The adapter aref names, loaded over m (in *out): already loaded, or loaded now, the
 * least recently used idle adapter of m unloaded to stay within dolly.max_loaded_adapters.
 * *out is NULL (and DL_OK) when every adapter is busy: the request waits.
 */
extern dl_status dolly_served_adapter(ServedModel *m, const ModelRef *aref, const DollyModelIdent *want,
									  ServedAdapter **out, dl_error *err);

/* Unload a model (it must have no sequences). */
extern void dolly_served_unload(ServedModel *m);

/* Mark m used now (least recently used idle models are evicted first). */
extern void dolly_served_touch(ServedModel *m);

/*
 * Make sure the backend dolly.device, dolly.threads and dolly.cpu_weights ask for exists:
 * idle models leave the old one at once, busy ones once they are done.
 */
extern dl_status dolly_served_backend(dl_error *err);

/*
 * The pipeline of ref's model for tokenizing: the loaded model's (m, unless NULL), else one
 * opened for its tokenizer alone, kept in a small cache: tokenizing needs no weights.
 */
extern dl_status dolly_served_tokenizer(const ModelRef *ref, ServedModel *m, const dl_pipeline **out,
										dl_error *err);

#endif
