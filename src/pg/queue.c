/*
 * queue.c: the request slots between sessions and the model server; see queue.h, and
 * docs/ARCHITECTURE.md, the life of a request.
 */
#include "postgres.h"

#include "dolly_pg.h"
#include "errors.h"
#include "queue.h"
#include "settings.h"

#include "access/xact.h"
#include "libpq/libpq.h"
#include "miscadmin.h"
#include "storage/backendid.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

/* How long a client waits for a model server that is not running before giving up. */
#define SERVER_GONE_MS 5000
/* How often a waiting client checks that its connection and the server are alive. */
#define POLL_MS 100

static DollyQueue *queue;
static pid_t *borrower;			/* [nslots]: who borrowed a pool slot; 0: nobody */
static DollyRequest *slots;
static bool exit_callback_registered = false;

/* The pool slots this backend borrowed (abandoned with its own at exit or on an ERROR). */
static int *borrowed;
static int	nborrowed;
static bool own_in_use;			/* this backend's own slot holds a request of its own */
static bool unannounced;		/* requests queued since the servers were last woken */

#define QUEUE_TRANCHE "dolly queue"

/* One slot per backend that can run SQL (MaxBackends is known in shmem_request_hook), then the pool. */
static int
total_slots(void)
{
	return MaxBackends + dolly_request_slots;
}

static Size
borrowers_offset(int nslots)
{
	return MAXALIGN(offsetof(DollyQueue, state) + nslots * sizeof(DollySlotState));
}

static Size
slots_offset(int nslots)
{
	return borrowers_offset(nslots) + MAXALIGN(nslots * sizeof(pid_t));
}

Size
dolly_queue_shmem_size(void)
{
	return add_size(slots_offset(total_slots()), mul_size(total_slots(), sizeof(DollyRequest)));
}

void
dolly_queue_request_lock(void)
{
	RequestNamedLWLockTranche(QUEUE_TRANCHE, 1);
}

void
dolly_queue_shmem_init(void)
{
	bool		found;

	queue = ShmemInitStruct("dolly queue", dolly_queue_shmem_size(), &found);
	borrower = (pid_t *) ((char *) queue + borrowers_offset(total_slots()));
	slots = (DollyRequest *) ((char *) queue + slots_offset(total_slots()));
	if (!found)
	{
		queue->lock = &(GetNamedLWLockTranche(QUEUE_TRANCHE))->lock;
		queue->next_seqno = 0;
		queue->nslots = total_slots();
		queue->nown = MaxBackends;
		memset(queue->taking, 0, sizeof(queue->taking));
		memset(queue->state, 0, total_slots() * sizeof(DollySlotState));
		memset(borrower, 0, total_slots() * sizeof(pid_t));
	}
}

static int
slot_index(const DollyRequest *req)
{
	return req - slots;
}

/* The slot's state, read under the lock. */
static DollySlotState
slot_state(const DollyRequest *req)
{
	DollySlotState s;

	LWLockAcquire(queue->lock, LW_SHARED);
	s = queue->state[slot_index(req)];
	LWLockRelease(queue->lock);
	return s;
}

/* Wake every model server: one of them takes the request, or drops it. */
static void
wake_servers(void)
{
	Latch	   *latches[DOLLY_MAX_SERVERS];

	SpinLockAcquire(&dolly_shared->mutex);
	for (int i = 0; i < DOLLY_MAX_SERVERS; i++)
		latches[i] = dolly_shared->servers[i].latch;
	SpinLockRelease(&dolly_shared->mutex);
	for (int i = 0; i < DOLLY_MAX_SERVERS; i++)
		if (latches[i])
			SetLatch(latches[i]);
}

/* Slot i is FREE again; a pool slot goes back to the pool (the queue's lock is held). */
static void
set_free(int i)
{
	queue->state[i] = SLOT_FREE;
	if (i >= queue->nown)
		borrower[i] = 0;
}

/* Give up a request: the server drops it if it is running; a pool slot is returned. */
static void
abandon(DollyRequest *req)
{
	int			i = slot_index(req);

	LWLockAcquire(queue->lock, LW_EXCLUSIVE);
	switch (queue->state[i])
	{
		case SLOT_QUEUED:
		case SLOT_DONE:
		case SLOT_FAILED:
		case SLOT_FREE:
			set_free(i);
			break;
		case SLOT_RUNNING:
			queue->state[i] = SLOT_ABANDONED;
			break;
		case SLOT_ABANDONED:
			break;
	}
	LWLockRelease(queue->lock);
	for (int b = 0; b < nborrowed; b++)
		if (borrowed[b] == i)
			borrowed[b] = borrowed[--nborrowed];
	if (i < queue->nown)
		own_in_use = false;
}

/* Give up every request this backend has in flight; the servers drop them at their next step. */
static void
abandon_all(void)
{
	if (nborrowed == 0 &&
		(MyBackendId == InvalidBackendId || MyBackendId > queue->nown ||
		 slot_state(&slots[MyBackendId - 1]) == SLOT_FREE))
	{
		own_in_use = false;
		return;
	}
	while (nborrowed > 0)
		abandon(&slots[borrowed[0]]);
	if (MyBackendId != InvalidBackendId && MyBackendId <= queue->nown)
		abandon(&slots[MyBackendId - 1]);
	wake_servers();
}

/* Backend exit (including FATAL and a lost connection) abandons the requests in flight. */
static void
abandon_at_exit(int code, Datum arg)
{
	abandon_all();
}

/* An ERROR (or a cancel, a timeout) ends the requests of the (sub)transaction's statement. */
static void
abandon_at_abort(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		abandon_all();
}

static void
abandon_at_subabort(SubXactEvent event, SubTransactionId sub, SubTransactionId parent, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
		abandon_all();
}

/* Abandon what this backend has in flight when it exits or its statement fails. */
static void
register_exit_callback(void)
{
	if (!exit_callback_registered)
	{
		borrowed = MemoryContextAlloc(TopMemoryContext, Max(dolly_request_slots, 1) * sizeof(int));
		before_shmem_exit(abandon_at_exit, (Datum) 0);
		RegisterXactCallback(abandon_at_abort, NULL);
		RegisterSubXactCallback(abandon_at_subabort, NULL);
		exit_callback_registered = true;
	}
}


/* This backend's own slot, once the server let go of what it ran there before. */
static DollyRequest *
own_slot(void)
{
	DollyRequest *req;

	if (MyBackendId == InvalidBackendId || MyBackendId > queue->nown)
		elog(ERROR, "dolly: backend id %d has no request slot", MyBackendId);
	req = &slots[MyBackendId - 1];
	/* a request we abandoned may still be in the server's hands until its next step */
	while (slot_state(req) != SLOT_FREE)
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 10L,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	own_in_use = true;
	return req;
}

/* A slot of the pool for this backend, or NULL when none is free. */
static DollyRequest *
borrow(void)
{
	int			i;

	LWLockAcquire(queue->lock, LW_EXCLUSIVE);
	for (i = queue->nown; i < queue->nslots; i++)
		if (queue->state[i] == SLOT_FREE && borrower[i] == 0)
		{
			borrower[i] = MyProcPid;
			break;
		}
	LWLockRelease(queue->lock);
	if (i == queue->nslots)
		return NULL;
	borrowed[nborrowed++] = i;
	return &slots[i];
}

DollyRequest *
dolly_queue_acquire(bool must)
{
	DollyRequest *req;

	register_exit_callback();
	req = own_in_use ? borrow() : own_slot();
	if (req == NULL && must)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("no dolly request slot is free for this session"),
				 errhint("This session's batched statements hold its own slot, and the %d slots of dolly.request_slots are taken; raise it, or lower dolly.query_batch.",
						 dolly_request_slots)));
	if (req)
		memset(req, 0, offsetof(DollyRequest, in));
	return req;
}

void
dolly_flight_init(DollyFlight *f, int cap)
{
	f->reqs = palloc(cap * sizeof(DollyRequest *));
	f->tags = palloc(cap * sizeof(void *));
	f->count = 0;
}

DollyRequest *
dolly_flight_acquire(DollyFlight *f)
{
	return dolly_queue_acquire(f->count == 0);
}

void
dolly_flight_add(DollyFlight *f, DollyRequest *req, void *tag)
{
	f->reqs[f->count] = req;
	f->tags[f->count++] = tag;
}

DollyRequest *
dolly_flight_wait(DollyFlight *f, void **tag)
{
	int			done = dolly_queue_wait_any(f->reqs, f->count);
	DollyRequest *req = f->reqs[done];

	*tag = f->tags[done];
	f->reqs[done] = f->reqs[--f->count];
	f->tags[done] = f->tags[f->count];
	return req;
}

void
dolly_flight_release(DollyFlight *f)
{
	while (f->count > 0)
		dolly_queue_release(f->reqs[--f->count]);
}

int
dolly_queue_wait_any(DollyRequest **reqs, int n)
{
	int			gone_ms = 0;

	if (unannounced)
	{
		unannounced = false;
		wake_servers();
	}
	for (;;)
	{
		bool		server_up;

		for (int i = 0; i < n; i++)
		{
			DollySlotState s = slot_state(reqs[i]);

			if (s == SLOT_DONE)
				return i;
			if (s == SLOT_FAILED)
				dolly_report(ERROR, &reqs[i]->err);
		}

		SpinLockAcquire(&dolly_shared->mutex);
		server_up = false;
		for (int i = 0; i < DOLLY_MAX_SERVERS; i++)
			server_up |= dolly_shared->servers[i].state != DOLLY_SERVER_STOPPED;
		SpinLockRelease(&dolly_shared->mutex);
		gone_ms = server_up ? 0 : gone_ms + POLL_MS;
		if (gone_ms >= SERVER_GONE_MS)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("dolly model server is not running"),
					 errhint("Check the server log for messages from \"dolly model server\".")));

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, POLL_MS,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		/* a client that hung up gets its request dropped now, not when it finishes */
		if (MyProcPort != NULL && !pq_check_connection())
			ereport(FATAL,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("connection to client lost")));
	}
}

void
dolly_queue_submit(DollyRequest *req)
{
	req->client_latch = MyLatch;
	req->client_pid = MyProcPid;
	req->client_role = GetUserId();
	req->client_superuser = superuser();
	LWLockAcquire(queue->lock, LW_EXCLUSIVE);
	req->seqno = ++queue->next_seqno;
	queue->state[slot_index(req)] = SLOT_QUEUED;
	LWLockRelease(queue->lock);
	unannounced = true;
}

void
dolly_queue_wait(DollyRequest *req)
{
	(void) dolly_queue_wait_any(&req, 1);
}
void
dolly_queue_release(DollyRequest *req)
{
	abandon(req);
}

void
dolly_queue_taking(int server, bool taking)
{
	LWLockAcquire(queue->lock, LW_EXCLUSIVE);
	queue->taking[server] = taking;
	LWLockRelease(queue->lock);
}

bool
dolly_queue_others_taking(int server)
{
	bool		others = false;

	LWLockAcquire(queue->lock, LW_SHARED);
	for (int s = 0; s < DOLLY_MAX_SERVERS; s++)
		others |= s != server && queue->taking[s];
	LWLockRelease(queue->lock);
	return others;
}

/* Sequences of the model `model` each server runs (the queue's lock is held). */
static void
loads_of(const char *model, int *load)
{
	memset(load, 0, DOLLY_MAX_SERVERS * sizeof(int));
	for (int i = 0; i < queue->nslots; i++)
		if ((queue->state[i] == SLOT_RUNNING || queue->state[i] == SLOT_ABANDONED) &&
			strcmp(slots[i].model, model) == 0)
			load[slots[i].server]++;
}

/* The oldest QUEUED slot submitted after seqno `after`, or -1 (the queue's lock is held). */
static int
oldest_after(uint64 after)
{
	int			oldest = -1;

	for (int i = 0; i < queue->nslots; i++)
		if (queue->state[i] == SLOT_QUEUED && slots[i].seqno > after &&
			(oldest < 0 || slots[i].seqno < slots[oldest].seqno))
			oldest = i;
	return oldest;
}

/* Does a server other than `server`, taking requests, run fewer sequences of slot i's model? */
static bool
less_busy_elsewhere(int server, int i)
{
	int			load[DOLLY_MAX_SERVERS];

	loads_of(slots[i].model, load);
	for (int s = 0; s < DOLLY_MAX_SERVERS; s++)
		if (s != server && queue->taking[s] && load[s] < load[server])
			return true;
	return false;
}

DollyRequest *
dolly_queue_take(int server, uint64 after)
{
	int			i;

	LWLockAcquire(queue->lock, LW_EXCLUSIVE);
	while ((i = oldest_after(after)) >= 0 && less_busy_elsewhere(server, i))
		after = slots[i].seqno;
	if (i >= 0)
	{
		queue->state[i] = SLOT_RUNNING;
		slots[i].server = server;
	}
	LWLockRelease(queue->lock);
	return i >= 0 ? &slots[i] : NULL;
}

void
dolly_queue_requeue(DollyRequest *req)
{
	int			i = slot_index(req);

	LWLockAcquire(queue->lock, LW_EXCLUSIVE);
	if (queue->state[i] == SLOT_RUNNING)
		queue->state[i] = SLOT_QUEUED;
	else if (queue->state[i] == SLOT_ABANDONED)
		set_free(i);
	LWLockRelease(queue->lock);
}

bool
dolly_queue_abandoned(DollyRequest *req)
{
	bool		abandoned;
	int			i = slot_index(req);

	LWLockAcquire(queue->lock, LW_EXCLUSIVE);
	abandoned = queue->state[i] == SLOT_ABANDONED;
	if (abandoned)
		set_free(i);
	LWLockRelease(queue->lock);
	return abandoned;
}

void
dolly_queue_finish(DollyRequest *req, const dl_error *err)
{
	int			i = slot_index(req);
	Latch	   *latch = NULL;

	if (err)
		req->err = *err;
	LWLockAcquire(queue->lock, LW_EXCLUSIVE);
	if (queue->state[i] == SLOT_RUNNING)
	{
		/* read before the slot is handed back: its client may reuse it at once */
		latch = req->client_latch;
		queue->state[i] = err ? SLOT_FAILED : SLOT_DONE;
	}
	else if (queue->state[i] == SLOT_ABANDONED)
		set_free(i);
	LWLockRelease(queue->lock);
	if (latch)
		SetLatch(latch);
}

void
dolly_queue_fail_running(int server, const char *why)
{
	dl_error	err;

	dl_fail(&err, DL_EBACKEND, "%s", why);
	dl_hint(&err, "Run the statement again; the model server restarts by itself.");
	for (int i = 0; i < queue->nslots; i++)
	{
		DollySlotState s;

		LWLockAcquire(queue->lock, LW_EXCLUSIVE);
		s = slots[i].server == server ? queue->state[i] : SLOT_FREE;
		if (s == SLOT_ABANDONED)
			set_free(i);
		LWLockRelease(queue->lock);
		if (s == SLOT_RUNNING)
			dolly_queue_finish(&slots[i], &err);
	}
}
