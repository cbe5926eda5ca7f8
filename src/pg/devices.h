/*
 * devices.h: the compute devices: what the machine offers, which model server 0 probes and
 * publishes, and which of them a process computes on (devices.c).
 */
#ifndef DOLLY_DEVICES_H
#define DOLLY_DEVICES_H

/* Publish the CPU backend's facts (threads, BLAS) for dolly_backends(). */
extern void dolly_probe_cpu(void);

/*
 * Load the CUDA plugin, count GPUs and, unless dolly.device = cpu, run its self-test on
 * the first GPU. Publishes what it found, or why CUDA cannot be used.
 */
extern void dolly_probe_cuda(void);

/* Number of threads the CPU backend uses: dolly.threads, or every CPU when it is 0. */
extern int	dolly_cpu_threads(void);

/*
 * The GPUs the CUDA plugin sees from this process, described in gpus (DL_MAX_GPUS of
 * room), *ngpus of them; the plugin, or NULL (with err) where it cannot be loaded or asked.
 */
struct dl_gpu_info;
struct dl_cuda_plugin;
struct dl_error;
extern const struct dl_cuda_plugin *dolly_cuda_gpus(struct dl_gpu_info *gpus, int *ngpus,
													struct dl_error *err);

/* Does dolly.device ask for the GPU (cuda, or auto with a GPU that passed the self-test)? */
extern bool dolly_want_cuda(void);

/* Path of the CUDA plugin: $DOLLY_CUDA_PLUGIN of the postmaster's environment, else in $libdir. */
extern void dolly_cuda_plugin_path(char *buf, size_t len);

/* Let this process's CUDA see only dolly.cuda_devices; before its first CUDA call. */
extern void dolly_cuda_restrict(void);

#endif
