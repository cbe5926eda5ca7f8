/* batcher.h: a model server's serving work, which its main loop drives (batcher.c). */
#ifndef DOLLY_BATCHER_H
#define DOLLY_BATCHER_H

/* The serving work of model server number `server`: loads dolly.model. */
extern void dolly_batcher_init(int server);
/* Take queued requests and run one pass of every model with work; true if there was work. */
extern bool dolly_batcher_tick(void);
/* Apply a configuration reload (dolly.model, dolly.device or dolly.threads changed). */
extern void dolly_batcher_reconfigure(void);
/* Has this GPU's server no more work, now that dolly.device no longer asks for GPUs? */
extern bool dolly_batcher_retired(void);

#endif
