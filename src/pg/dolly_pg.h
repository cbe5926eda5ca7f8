/*
 * dolly_pg.h: what the files of the PostgreSQL glue share: configuration variables, the
 * shared-memory state of the model server, and the per-module init functions _PG_init calls.
 */
#ifndef DOLLY_PG_H
#define DOLLY_PG_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "storage/latch.h"
#include "storage/spin.h"

#include "cuda_plugin.h"
#include "error.h"
#include "model.h"

/* dolly.device */
typedef enum DollyDevice
{
	DOLLY_DEVICE_CPU,
	DOLLY_DEVICE_CUDA,
	DOLLY_DEVICE_AUTO
} DollyDevice;

/* dolly.cpu_weights */
typedef enum DollyWeights
{
	DOLLY_WEIGHTS_FLOAT32,
	DOLLY_WEIGHTS_BFLOAT16
} DollyWeights;

/* GUCs (guc.c) */
extern int	dolly_device;
extern int	dolly_threads;
extern int	dolly_cpu_weights;
extern char *dolly_cuda_devices;
extern char *dolly_model;
extern char *dolly_model_dir;
extern int	dolly_max_batch;
extern int	dolly_max_context;
extern int	dolly_max_new_tokens;
extern int	dolly_max_loaded_models;
extern int	dolly_max_model_loads;
extern int	dolly_train_workers;
extern int	dolly_request_slots;
extern int	dolly_query_batch;
extern char *dolly_step_trace;

/* What the model server found out about the machine; written by it, read by SQL functions. */
typedef enum DollyServerState
{
	DOLLY_SERVER_STOPPED = 0,	/* not started yet, or exited */
	DOLLY_SERVER_STARTING,		/* started, probing backends */
	DOLLY_SERVER_READY			/* serving */
} DollyServerState;

/* Models the server may hold at once (the bound of dolly.max_loaded_models). */
#define DOLLY_MAX_MODELS 64

/* One loaded model's row of the dolly_server view. */
typedef struct DollyModelStatus
{
	bool		in_use;
	char		path[MAXPGPATH];
	char		arch[16];
	char		device[32];
	TimestampTz loaded_at;
	double		load_seconds;
	int64		params;
	int64		param_bytes;
	int64		cache_bytes;
	int			max_batch;
	int			max_context;
	int			active;			/* sequences in flight */
	int64		requests;		/* answered */
	int64		prompt_tokens;
	int64		generated_tokens;
	double		tokens_per_second;	/* moving average over recent passes */
} DollyModelStatus;

/*
 * One model server per device: server 0 probes the machine and serves on the CPU or on
 * GPU 0; when dolly.device asks for GPUs it starts server g for each further GPU g.
 */
#define DOLLY_MAX_SERVERS DL_MAX_GPUS

typedef struct DollyServer
{
	DollyServerState state;
	pid_t		pid;			/* 0: none runs for this device */
	Latch	   *latch;			/* set it to wake the server: a request is queued */
	DollyModelStatus models[DOLLY_MAX_MODELS];
} DollyServer;

typedef struct DollyShared
{
	slock_t		mutex;			/* protects everything below */
	int			cpu_threads;
	char		cpu_detail[256];
	bool		cuda_available;
	int			cuda_ngpus;
	char		cuda_detail[1024];	/* GPUs seen, or why CUDA cannot be used */
	DollyServer servers[DOLLY_MAX_SERVERS];
} DollyShared;

extern DollyShared *dolly_shared;

/* Per-module initialisation, called from _PG_init in this order. */
extern void dolly_guc_init(void);
extern void dolly_shmem_init(void);
extern void dolly_server_register(void);
extern void dolly_batch_init(void);

/* Number of threads the CPU backend uses: dolly.threads, or every CPU when it is 0. */
extern int	dolly_cpu_threads(void);

/* The SQLSTATE for an engine status code. */
extern int	dolly_errcode(dl_status code);

/* Report an engine failure as an ERROR (or another elevel) with its hint. */
extern void dolly_report(int elevel, const dl_error *err);

/* Can name be a directory under dolly.model_dir (no separators, no "..")? */
extern bool dolly_model_name_ok(const char *name);

/* ERROR unless name can name a directory under dolly.model_dir (no separators, no ".."). */
extern void dolly_check_model_name(const char *name);

/*
 * Load the model in directory path onto be, showing "<activity>: N%" in pg_stat_activity as
 * it goes. It stops (DL_ECANCELLED) when this process is asked to die, or when stop(arg)
 * (unless NULL) says so; the caller's CHECK_FOR_INTERRUPTS then ends the process.
 */
extern dl_status dolly_load_model(const char *path, dl_backend *be, const char *activity,
								  bool (*stop) (void *arg), void *arg, dl_model **out, dl_error *err);

/* One pass of one model, as dolly.step_trace records it (step_trace.c); times in seconds. */
typedef struct DollyPassTrace
{
	double		start;			/* since the epoch */
	const char *model;
	double		gap;			/* since the end of the server's previous pass */
	double		take;			/* taking requests before it */
	int			sequences;		/* in the model's batch */
	int			decode_rows;
	int			prefill_tokens;
	double		step;			/* the forward pass and sampling */
	double		answer;			/* answering the sequences that finished */
	int			answered;
} DollyPassTrace;

extern void dolly_trace_configure(void);
extern void dolly_trace_pass(int server, const DollyPassTrace *t);
extern void dolly_trace_flush(void);

/* The serving work of model server number `server` (serve.c). */
extern void dolly_serve_init(int server);
/* Take queued requests and run one pass of every model with work; true if there was work. */
extern bool dolly_serve_tick(void);
/* Apply a configuration reload (dolly.model, dolly.device or dolly.threads changed). */
extern void dolly_serve_reconfigure(void);
/* Has this GPU's server no more work, now that dolly.device no longer asks for GPUs? */
extern bool dolly_serve_retired(void);

/*
 * The directory a model name stands for: "" is dolly.model (an absolute path, or a name
 * under dolly.model_dir), anything else a name under dolly.model_dir. *is_default says
 * which. DL_EIO (with a message that shows no path) when the directory does not exist.
 */
extern dl_status dolly_model_path(const char *name, char *path, bool *is_default, dl_error *err);

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
 * Remove the temporary directories of models being saved (see model_save) from
 * dolly.model_dir: at postmaster start and after a crash, when no job can be saving.
 */
extern void dolly_remove_partial_models(void);

/* Rewrite full paths under dolly.model_dir in err's message as paths relative to it. */
extern void dolly_relative_paths(dl_error *err);

/*
 * The name sessions know a request's model by, for messages: its name under
 * dolly.model_dir, or "dolly.model" for a default given as a path (paths are for superusers).
 */
extern const char *dolly_model_display_name(const char *name);

/* Replace path by name in err's message and hint (the full path belongs in the log). */
extern void dolly_hide_path(dl_error *err, const char *path, const char *name);

/* Path of the CUDA plugin: $DOLLY_CUDA_PLUGIN of the postmaster's environment, else in $libdir. */
extern void dolly_cuda_plugin_path(char *buf, size_t len);

/* Does dolly.device ask for the GPU (cuda, or auto with a GPU that passed the self-test)? */
extern bool dolly_want_cuda(void);

/* Let this process's CUDA see only dolly.cuda_devices; before its first CUDA call. */
extern void dolly_cuda_restrict(void);

#endif
