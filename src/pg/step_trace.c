/*
 * step_trace.c: the model server's trace of its passes (dolly.step_trace), one CSV line a
 * pass of a model, to see where a server's time goes when it serves less than the engine
 * decodes: between passes (the loop, waiting for requests), taking requests (tokenizing,
 * admitting), the forward pass, and answering (decoding text, waking clients). The batch's
 * shape is there too: rows that decoded a token, prompt tokens prefilled in the same pass.
 * tests/bench/bench_serving.py reads it. Off (empty) by default; a server writes only its
 * own lines, appended in writes of whole lines, so the servers of several devices may share
 * a file.
 */
#include "postgres.h"

#include "settings.h"
#include "step_trace.h"

#include <fcntl.h>
#include <unistd.h>

#include "lib/stringinfo.h"
#include "common/file_perm.h"
#include "storage/ipc.h"
#include "utils/memutils.h"

static int	trace_fd = -1;
static char *trace_path;		/* what trace_fd was opened for */
static StringInfoData pending;	/* lines not yet written */

#define TRACE_HEADER "server,start_s,model,gap_ms,take_ms,sequences,decode_rows,prefill_tokens,step_ms,answer_ms,answered\n"

/* Write what is pending (once the server goes idle, and when it is full). */
void
dolly_trace_flush(void)
{
	if (trace_fd >= 0 && pending.len > 0 && write(trace_fd, pending.data, pending.len) != pending.len)
		elog(LOG, "dolly: could not write to dolly.step_trace \"%s\": %m", trace_path);
	if (pending.data)
		resetStringInfo(&pending);
}

static void
trace_at_exit(int code, Datum arg)
{
	dolly_trace_flush();
}

/* Open (or close) the trace that dolly.step_trace names now: at start and after a reload. */
void
dolly_trace_configure(void)
{
	const char *want = dolly_step_trace ? dolly_step_trace : "";

	if (trace_path && strcmp(trace_path, want) == 0)
		return;
	dolly_trace_flush();
	if (trace_fd >= 0)
		close(trace_fd);
	trace_fd = -1;
	if (trace_path)
		pfree(trace_path);
	trace_path = MemoryContextStrdup(TopMemoryContext, want);
	if (want[0] == '\0')
		return;
	if (pending.data == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		initStringInfo(&pending);
		MemoryContextSwitchTo(old);
		/* a server stopped while busy writes its last passes too */
		on_proc_exit(trace_at_exit, (Datum) 0);
	}
	/* relative to the data directory, as the server log's files are */
	trace_fd = open(want, O_WRONLY | O_CREAT | O_APPEND | PG_BINARY, pg_file_create_mode);
	if (trace_fd < 0)
		elog(LOG, "dolly: could not open dolly.step_trace \"%s\": %m", want);
	else if (lseek(trace_fd, 0, SEEK_END) == 0)
		appendStringInfoString(&pending, TRACE_HEADER);
}

/* One pass of one model (the times in seconds). */
void
dolly_trace_pass(int server, const DollyPassTrace *t)
{
	if (trace_fd < 0)
		return;
	appendStringInfo(&pending, "%d,%.6f,%s,%.3f,%.3f,%d,%d,%d,%.3f,%.3f,%d\n",
					 server, t->start, t->model, 1000 * t->gap, 1000 * t->take, t->sequences,
					 t->decode_rows, t->prefill_tokens, 1000 * t->step, 1000 * t->answer, t->answered);
	if (pending.len > 64 * 1024)
		dolly_trace_flush();
}
