/*
 * queue.h: requests from sessions to the model server, through slots in shared memory.
 *
 * Each backend owns one slot (indexed by its BackendId), so submitting never waits for a
 * free slot; a call that keeps several requests in flight (an array of instructions)
 * borrows more from a shared pool (dolly.request_slots), each with its borrower. A slot moves FREE -> QUEUED (client) -> RUNNING (server) -> DONE or FAILED
 * (server) -> FREE (client); a client that stops waiting (cancel, timeout, exit) turns
 * QUEUED into FREE itself and RUNNING into ABANDONED, which the server frees when it drops
 * the sequence. Whoever owns the current state owns the slot's contents; state changes
 * happen under the queue's LWLock, which also orders the writes around them (an LWLock, not
 * a spinlock: taking a request scans every slot).
 *
 * With several model servers (one per GPU) every server takes from the one queue, and a
 * request goes to the server running the fewest sequences of its model, so that concurrent
 * requests spread over the GPUs.
 */
#ifndef DOLLY_QUEUE_H
#define DOLLY_QUEUE_H

#include "storage/latch.h"
#include "storage/lwlock.h"

#include "dolly_pg.h"
#include "error.h"
#include "paths.h"

#define DOLLY_TEXT_MAX 65536		/* bytes of request text and of result */

typedef enum DollySlotState
{
	SLOT_FREE = 0,
	SLOT_QUEUED,
	SLOT_RUNNING,
	SLOT_DONE,
	SLOT_FAILED,
	SLOT_ABANDONED
} DollySlotState;

typedef enum DollyRequestKind
{
	REQ_GENERATE,				/* continue the prompt; optionally extract Dolly's response */
	REQ_TOKENIZE,				/* text -> int32 ids in out */
	REQ_DETOKENIZE				/* int32 ids in `in` -> text */
} DollyRequestKind;

/* How a generation request generates. */
typedef struct DollyGenParams
{
	bool		extract_response;	/* Dolly's response out of prompt + generation */
	int			max_new_tokens;
	double		temperature;
	double		top_p;
	int			top_k;
	bool		do_sample;
	uint64		seed;
} DollyGenParams;

typedef struct DollyRequest
{
	/* written by the client before QUEUED */
	DollyRequestKind kind;
	Latch	   *client_latch;
	pid_t		client_pid;
	Oid			client_role;
	bool		client_superuser;	/* loads it causes are not limited */
	uint64		seqno;			/* submission order, for FIFO admission */
	char		model[DOLLY_MODEL_NAME_MAX];	/* "" = dolly.model */
	DollyModelIdent ident;		/* its directory's, from the catalog; {0, 0}: unchecked */
	char		adapter[DOLLY_MODEL_NAME_MAX];	/* a LoRA adapter of model to run; "": none */
	DollyModelIdent adapter_ident;
	DollyGenParams gen;			/* REQ_GENERATE */
	int			in_len;
	char		in[DOLLY_TEXT_MAX];

	/* written by the server while RUNNING */
	int			server;			/* which model server runs it */
	int			prompt_tokens;
	int			new_tokens;
	int			out_len;
	dl_error	err;			/* a failure's, reported in the client's session */
	char		out[DOLLY_TEXT_MAX];
} DollyRequest;

typedef struct DollyQueue
{
	LWLock	   *lock;			/* the slots' states, next_seqno and taking */
	uint64		next_seqno;
	int			nslots;			/* every backend's own slot, then the pool */
	int			nown;			/* MaxBackends: slot BackendId - 1 is that backend's */
	bool		taking[DOLLY_MAX_SERVERS];	/* which servers take requests now */
	DollySlotState state[FLEXIBLE_ARRAY_MEMBER];	/* slots follow, MAXALIGN'd */
} DollyQueue;

/* Shared memory the queue needs, and its lock (asked for in shmem_request_hook). */
extern Size dolly_queue_shmem_size(void);
extern void dolly_queue_request_lock(void);
/* Create or attach in shmem_startup_hook. */
extern void dolly_queue_shmem_init(void);

/* --- client side --- */

/*
 * A FREE slot for one more request of this backend, ready to fill: its own slot when no
 * request of its own is there, else one borrowed from the shared pool (dolly.request_slots).
 * When none is free: NULL, or an ERROR with `must` (a caller with nothing in flight to
 * wait for). It goes back with dolly_queue_release.
 */
extern DollyRequest *dolly_queue_acquire(bool must);
/*
 * Queue the filled slot. The servers are woken when the backend first waits, so that the
 * requests a statement submits together reach the server's next pass together.
 */
extern void dolly_queue_submit(DollyRequest *req);
/*
 * Wait (interruptibly) for a submitted slot's answer. On return the slot is DONE (FAILED
 * raises the server's ERROR); call dolly_queue_release. An ERROR, a cancel or a timeout
 * abandons every request this backend has in flight (at the (sub)transaction's abort), and
 * so does the backend's exit.
 */
extern void dolly_queue_wait(DollyRequest *req);
/* The same for n submitted slots: the index of one that is DONE (any FAILED raises). */
extern int	dolly_queue_wait_any(DollyRequest **reqs, int n);
/* Free the slot after reading the result (a borrowed one goes back to the pool). */
extern void dolly_queue_release(DollyRequest *req);

/*
 * A caller's requests in flight, each with a tag of the caller's (what its answer is for),
 * answered in whichever order they finish: the array form and Dolly Batch keep theirs so.
 */
typedef struct DollyFlight
{
	DollyRequest **reqs;
	void	  **tags;
	int			count;
} DollyFlight;

/* An empty set for up to cap requests (in the current memory context). */
extern void dolly_flight_init(DollyFlight *f, int cap);
/* A slot for one more request (dolly_queue_acquire); it must be found when none is in flight. */
extern DollyRequest *dolly_flight_acquire(DollyFlight *f);
/* Add a submitted request and its tag. */
extern void dolly_flight_add(DollyFlight *f, DollyRequest *req, void *tag);
/* Wait for one answer: its request (DONE, to read and release) leaves the set, *tag its tag. */
extern DollyRequest *dolly_flight_wait(DollyFlight *f, void **tag);
/* Release every request of the set (a statement that stops early). */
extern void dolly_flight_release(DollyFlight *f);

/* --- server side --- */

/* Server `server` starts (true) or stops (false) taking requests. */
extern void dolly_queue_taking(int server, bool taking);
/* Does a server other than `server` take requests now? */
extern bool dolly_queue_others_taking(int server);
/*
 * Take the oldest QUEUED request submitted after seqno `after` (0: any) that server `server`
 * should run, marking it RUNNING; NULL when there is none. A request is left to another
 * server that takes requests and runs fewer sequences of its model.
 */
extern DollyRequest *dolly_queue_take(int server, uint64 after);
/* Put a taken request back in the queue (it keeps its place: its seqno). */
extern void dolly_queue_requeue(DollyRequest *req);
/* Is req abandoned by its client (so the server should drop it)? Frees it if so. */
extern bool dolly_queue_abandoned(DollyRequest *req);
/* Publish the result (DONE) or an error (FAILED, with err set) and wake the client. */
extern void dolly_queue_finish(DollyRequest *req, const dl_error *err);
/* At a server's start or exit: fail every RUNNING request it took (it is gone), free its
 * ABANDONED ones. QUEUED requests stay for the other servers and the next one. */
extern void dolly_queue_fail_running(int server, const char *why);

#endif
