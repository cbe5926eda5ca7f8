/* step_trace.h: the model server's trace of its passes, dolly.step_trace (step_trace.c). */
#ifndef DOLLY_STEP_TRACE_H
#define DOLLY_STEP_TRACE_H

/* One pass of one model, as dolly.step_trace records it; times in seconds. */
typedef struct DollyPassTrace
{
	double		start;			/* sys_now_s(): the monotonic clock */
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

/* At start and after a reload; after each pass; when the server goes idle (step_trace.c). */
extern void dolly_trace_configure(void);
extern void dolly_trace_pass(int server, const DollyPassTrace *t);
extern void dolly_trace_flush(void);

#endif
