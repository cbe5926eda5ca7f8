/* batch_scan.h: Dolly Batch, the executor node that runs many rows' dolly calls together (batch_scan.c). */
#ifndef DOLLY_BATCH_SCAN_H
#define DOLLY_BATCH_SCAN_H

/* Install the planner hook and the node's methods (from _PG_init). */
extern void dolly_batch_init(void);

#endif
