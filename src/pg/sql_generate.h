/*
 * sql_generate.h: the dolly calls whose requests an executor node submits itself (Dolly
 * Batch, batch_scan.c), each the request the SQL function would make (sql_generate.c).
 */
#ifndef DOLLY_SQL_GENERATE_H
#define DOLLY_SQL_GENERATE_H

#include "fmgr.h"

#include "queue.h"

typedef enum DollyCallKind
{
	DOLLY_CALL_NONE = 0,
	DOLLY_CALL_GENERATE,		/* dolly_generate(instruction, context, model, ...) */
	DOLLY_CALL_GENERATE_RAW		/* dolly_generate_raw(prompt, model, ...) */
} DollyCallKind;

/* Which dolly call (if any) the function funcid is. */
extern DollyCallKind dolly_call_kind(Oid funcid);
/* ERROR, as the call would, when a text argument is too long for a request. */
extern void dolly_call_check(DollyCallKind kind, FunctionCallInfo fcinfo);
/*
 * Check the call's arguments (fcinfo's, all of them, as the function gets them) and submit
 * its request in the FREE slot req; false, with nothing submitted, when the call returns
 * NULL (a NULL instruction or prompt).
 */
extern bool dolly_call_submit(DollyCallKind kind, FunctionCallInfo fcinfo, DollyRequest *req);
/* The call's answer: waits for req, reads its text, releases the slot. */
extern text *dolly_call_answer(DollyRequest *req);

#endif
