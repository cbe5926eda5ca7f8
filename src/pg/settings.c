/* settings.c: the dolly.* configuration parameters, all declared here, then the prefix reserved. */
#include "postgres.h"

#include "dolly_pg.h"
#include "settings.h"
#include "jobs.h"

#include "utils/guc.h"

int			dolly_device = DOLLY_DEVICE_AUTO;
int			dolly_threads = 0;
int			dolly_cpu_weights = DOLLY_WEIGHTS_FLOAT32;
char	   *dolly_cuda_devices = NULL;
char	   *dolly_model = NULL;
char	   *dolly_model_dir = NULL;
int			dolly_max_batch = 16;
int			dolly_max_context = 0;
int			dolly_max_new_tokens = 1024;
int			dolly_max_loaded_models = 2;
int			dolly_max_loaded_adapters = 8;
int			dolly_max_model_loads = 10;
int			dolly_train_workers = 1;
int			dolly_request_slots = 64;
int			dolly_query_batch = 0;
char	   *dolly_step_trace = NULL;

static const struct config_enum_entry device_options[] = {
	{"cpu", DOLLY_DEVICE_CPU, false},
	{"cuda", DOLLY_DEVICE_CUDA, false},
	{"auto", DOLLY_DEVICE_AUTO, false},
	{NULL, 0, false}
};

static const struct config_enum_entry weights_options[] = {
	{"float32", DOLLY_WEIGHTS_FLOAT32, false},
	{"bfloat16", DOLLY_WEIGHTS_BFLOAT16, false},
	{NULL, 0, false}
};

void
dolly_settings_init(void)
{
	DefineCustomEnumVariable("dolly.device",
							 "Where the model server runs models: cpu, cuda or auto.",
							 "auto uses a GPU when the CUDA plugin is installed and sees one, else the CPU.",
							 &dolly_device, DOLLY_DEVICE_AUTO, device_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("dolly.threads",
							"Threads the CPU backend uses for one model.",
							"0 means one per CPU available to the server.",
							&dolly_threads, 0, 0, 1024,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomEnumVariable("dolly.cpu_weights",
							 "How the CPU backend holds the models' matrices: float32 or bfloat16.",
							 "bfloat16 takes half the memory and decodes about twice as fast; float32 "
							 "computes exactly what transformers does in float32.",
							 &dolly_cpu_weights, DOLLY_WEIGHTS_FLOAT32, weights_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("dolly.cuda_devices",
							   "GPUs the model servers and fine-tuning ranks may use (CUDA_VISIBLE_DEVICES), empty for all.",
							   NULL,
							   &dolly_cuda_devices, "",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("dolly.model",
							   "The model the model server serves by default.",
							   "A Hugging Face model directory (config.json, the tokenizer files, the weights): "
							   "an absolute path, or the name of a directory under dolly.model_dir.",
							   &dolly_model, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("dolly.model_dir",
							   "Directory holding the models that dolly_generate(model => name) may name.",
							   "Fine-tuned models are written there too.",
							   &dolly_model_dir, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomIntVariable("dolly.max_batch",
							"Sequences the model server decodes together, per model.",
							"Also the number of KV-cache slots each loaded model reserves.",
							&dolly_max_batch, 16, 1, 1024,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("dolly.max_context",
							"Longest sequence (prompt and generated tokens) the server accepts.",
							"0 means the model's own limit (max_position_embeddings).",
							&dolly_max_context, 0, 0, 1048576,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("dolly.max_new_tokens",
							"Upper bound for the max_new_tokens argument of dolly_generate.",
							NULL,
							&dolly_max_new_tokens, 1024, 1, 1048576,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("dolly.max_loaded_models",
							"Models the model server keeps loaded at once.",
							"When another is needed, the least recently used idle one is unloaded.",
							&dolly_max_loaded_models, 2, 1, 64,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("dolly.max_loaded_adapters",
							"LoRA adapters the model server keeps loaded over each loaded model.",
							"Requests for different adapters of one model are decoded in one batch; when another "
							"is needed, the least recently used idle one is unloaded.",
							&dolly_max_loaded_adapters, 8, 1, DOLLY_MAX_ADAPTERS,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("dolly.max_model_loads",
							"Model loads per minute that one role may cause; 0 means no limit.",
							"Loading a model stalls the device for everyone; loads of dolly.model, "
							"and requests of superusers, do not count.",
							&dolly_max_model_loads, 10, 0, 1000000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("dolly.train_workers",
							"Worker processes (data-parallel ranks) per fine-tuning job.",
							"Each rank trains on its share of every batch; gradients are summed through shared memory. "
							"The CPU threads of dolly.threads are divided among them.",
							&dolly_train_workers, 1, 1, DOLLY_MAX_RANKS,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("dolly.request_slots",
							"Request slots that sessions borrow to have several requests in flight.",
							"Every session has one slot of its own; a batched call (an array of instructions) "
							"borrows more from this pool, and runs with fewer when it is empty.",
							&dolly_request_slots, 64, 0, 65536,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("dolly.query_batch",
							"Requests one call keeps in flight at once; 0 means dolly.max_batch.",
							"1 sends them one at a time.",
							&dolly_query_batch, 0, 0, 65536,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("dolly.step_trace",
							   "File to which the model servers append one CSV line per pass of a model, empty for none.",
							   "For finding where a server's time goes (tests/bench/bench_serving.py reads it); "
							   "a relative path is in the data directory.",
							   &dolly_step_trace, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	MarkGUCPrefixReserved("dolly");
}
