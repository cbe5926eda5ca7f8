/* settings.h: the dolly.* configuration parameters (settings.c). */
#ifndef DOLLY_SETTINGS_H
#define DOLLY_SETTINGS_H

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
extern int	dolly_max_loaded_adapters;
extern int	dolly_max_model_loads;
extern int	dolly_train_workers;
extern int	dolly_request_slots;
extern int	dolly_query_batch;
extern char *dolly_step_trace;

/* Define them all, then reserve the prefix (from _PG_init). */
extern void dolly_settings_init(void);

#endif
