/* model_server.h: the model servers' background workers (model_server.c). */
#ifndef DOLLY_MODEL_SERVER_H
#define DOLLY_MODEL_SERVER_H

#include "fmgr.h"

/* Register model server 0 (from _PG_init); it starts the servers of further GPUs. */
extern void dolly_model_server_register(void);

/* A model server's entry point; arg is its device: 0 for the CPU or GPU 0, g for GPU g. */
PGDLLEXPORT void dolly_model_server_main(Datum arg);

#endif
