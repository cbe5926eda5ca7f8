/*
 * batch_scan.c: Dolly Batch, the executor node that runs the dolly calls of many rows of
 * one statement together.
 *
 * SELECT dolly_generate(instruction) FROM tasks calls the function once per row and waits
 * for each answer, so the model server decodes at batch 1. After planning, the planner
 * hook finds the plan nodes whose target list calls dolly_generate or dolly_generate_raw
 * and puts a Dolly Batch node above each: the node below now computes the calls'
 * arguments (and the rest of its row) instead, and Dolly Batch reads up to
 * dolly.query_batch rows ahead, submits their requests together (this session's own slot
 * and slots borrowed from the pool), and returns the rows in their order, computing the
 * original target list with the answers in it. Submit now, collect later, as postgres_fdw's
 * asynchronous Append does. Each request is the one the call would make, so the results,
 * their order and their count are the per-row plan's.
 *
 * The node below still computes everything else of a row, volatile functions included, one
 * row after the other as before. Where batching could change what the statement does, the
 * plan stays a call per row: a dolly call in another's arguments, in an aggregate, a window
 * function or a subquery, under a volatile or set-returning function, a node whose quals
 * call dolly, the inner side of a merge join, a scrollable cursor, or dolly.query_batch = 1.
 *
 * See docs/ARCHITECTURE.md, the life of a request.
 */
#include "postgres.h"

#include "batch_scan.h"
#include "queue.h"
#include "settings.h"
#include "sql_generate.h"

#include "catalog/pg_proc.h"
#include "commands/explain.h"
#include "executor/executor.h"
#include "miscadmin.h"
#include "nodes/extensible.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/optimizer.h"
#include "optimizer/planner.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"

#define BATCH_NAME "Dolly Batch"

/* One dolly call of a row: submitted, then answered. */
typedef struct BatchCall
{
	bool		submitted;
	bool		answered;
	Datum		answer;
	bool		answer_null;
} BatchCall;

/* A row read ahead: the child's tuple and its calls. */
typedef struct BatchRow
{
	MinimalTuple tuple;
	BatchCall  *calls;			/* [ncalls] */
} BatchRow;

typedef struct BatchState
{
	CustomScanState css;
	PlanState  *child;
	TupleTableSlot *child_slot;	/* to read a row back from its copy */
	int			nchild;			/* the child's columns; the answers follow them */
	int			ncalls;
	DollyCallKind *kind;		/* [ncalls] */
	List	  **args;			/* [ncalls]: the child columns of each call's arguments */
	int			window;
	BatchRow   *rows;			/* a ring of `window` rows, in the child's order */
	int			head;
	int			count;
	bool		child_done;
	MemoryContext rows_cxt;		/* rows read ahead, and their answers */
	BatchRow	returned;		/* the last row returned, freed at the next */
	DollyFlight flight;			/* the calls' requests, tagged with their BatchCall */
	int64		requests;		/* for EXPLAIN ANALYZE */
	int64		tokens;
} BatchState;

static planner_hook_type prev_planner_hook = NULL;
static CustomScanMethods batch_plan_methods;
static CustomExecMethods batch_exec_methods;

/* --- planning --- */

/* Does the expression (or query) call dolly anywhere, aggregates and subqueries included? */
static bool
calls_dolly(Node *node, void *context)
{
	if (node == NULL)
		return false;
	if (IsA(node, FuncExpr) && dolly_call_kind(((FuncExpr *) node)->funcid) != DOLLY_CALL_NONE)
		return true;
	if (IsA(node, Query))
		return query_tree_walker((Query *) node, calls_dolly, context, 0);
	return expression_tree_walker(node, calls_dolly, context);
}

/* check_functions_in_node's callback: is the function volatile? */
static bool
is_volatile(Oid func_id, void *context)
{
	return func_volatile(func_id) == PROVOLATILE_VOLATILE;
}

/*
 * Must the dolly calls of this target entry run one row at a time: one inside an aggregate,
 * a window function or a subplan, in another's arguments, or next to anything else
 * volatile or set-returning around them (which would then run in another order)?
 */
static bool
unbatchable(Node *node, void *context)
{
	if (node == NULL || !calls_dolly(node, NULL))
		return false;
	if (IsA(node, FuncExpr) && dolly_call_kind(((FuncExpr *) node)->funcid) != DOLLY_CALL_NONE)
		return calls_dolly((Node *) ((FuncExpr *) node)->args, NULL) ||
			expression_returns_set((Node *) ((FuncExpr *) node)->args);
	if (IsA(node, Aggref) || IsA(node, WindowFunc) || IsA(node, SubPlan) ||
		IsA(node, AlternativeSubPlan) || IsA(node, SubLink) ||
		check_functions_in_node(node, is_volatile, NULL) ||
		(IsA(node, FuncExpr) && ((FuncExpr *) node)->funcretset) ||
		(IsA(node, OpExpr) && ((OpExpr *) node)->opretset))
		return true;
	return expression_tree_walker(node, unbatchable, context);
}

/* What a plan node's rewrite collects: the child's columns and the calls. */
typedef struct Rewrite
{
	List	   *child_tlist;	/* the child's new target list */
	List	   *calls;			/* FuncExpr of each call, its args made child columns */
	List	   *call_args;		/* per call: integer list of child columns */
} Rewrite;

/* The child column computing expr (added if new), as a Var over the scan tuple. */
static Var *
child_column(Rewrite *rw, Expr *expr)
{
	ListCell   *lc;
	int			attno = 0;

	foreach(lc, rw->child_tlist)
	{
		TargetEntry *tle = lfirst(lc);

		if (equal(tle->expr, expr))
		{
			attno = tle->resno;
			break;
		}
	}
	if (attno == 0)
	{
		attno = list_length(rw->child_tlist) + 1;
		rw->child_tlist = lappend(rw->child_tlist, makeTargetEntry(expr, attno, NULL, false));
	}
	return makeVar(INDEX_VAR, attno, exprType((Node *) expr), exprTypmod((Node *) expr),
				   exprCollation((Node *) expr), 0);
}

/*
 * The target entry's expression as Dolly Batch computes it: each call becomes its answer
 * column (numbered after the child's, fixed up once the child's width is known: see
 * make_batch), every part without a call a child column.
 */
static Node *
rewrite_expr(Node *node, Rewrite *rw)
{
	if (node == NULL)
		return NULL;
	if (!IsA(node, List) && !calls_dolly(node, NULL))
		return (Node *) child_column(rw, (Expr *) node);
	if (IsA(node, FuncExpr) && dolly_call_kind(((FuncExpr *) node)->funcid) != DOLLY_CALL_NONE)
	{
		FuncExpr   *call = (FuncExpr *) node;
		List	   *cols = NIL;
		ListCell   *lc;

		foreach(lc, call->args)
			cols = lappend_int(cols, child_column(rw, lfirst(lc))->varattno);
		rw->calls = lappend(rw->calls, call);
		rw->call_args = lappend(rw->call_args, cols);
		/* varattno -k: the k-th call's answer, renumbered in make_batch */
		return (Node *) makeVar(INDEX_VAR, -list_length(rw->calls), call->funcresulttype, -1,
								call->funccollid, 0);
	}
	return expression_tree_mutator(node, rewrite_expr, rw);
}

/* Renumber answer references (varattno -k) to come after the child's nchild columns. */
static Node *
number_answers(Node *node, void *nchild)
{
	if (node == NULL)
		return NULL;
	if (IsA(node, Var) && ((Var *) node)->varno == INDEX_VAR && ((Var *) node)->varattno < 0)
	{
		Var		   *v = copyObject((Var *) node);

		v->varattno = *(int *) nchild - v->varattno;
		return (Node *) v;
	}
	return expression_tree_mutator(node, number_answers, nchild);
}

/* A Var reading the child's column (for the scan tuple's description and EXPLAIN). */
static Expr *
outer_var(TargetEntry *child_tle)
{
	return (Expr *) makeVar(OUTER_VAR, child_tle->resno, exprType((Node *) child_tle->expr),
							exprTypmod((Node *) child_tle->expr),
							exprCollation((Node *) child_tle->expr), 0);
}

/* Put Dolly Batch above plan, whose target list has batchable dolly calls. */
static Plan *
make_batch(Plan *plan)
{
	Rewrite		rw = {NIL, NIL, NIL};
	CustomScan *cscan = makeNode(CustomScan);
	List	   *tlist = NIL;
	List	   *scan_tlist = NIL;
	List	   *private = NIL;
	ListCell   *lc;
	int			nchild;
	int			k = 0;

	foreach(lc, plan->targetlist)
	{
		TargetEntry *tle = flatCopyTargetEntry(lfirst(lc));

		tle->expr = (Expr *) rewrite_expr((Node *) tle->expr, &rw);
		tlist = lappend(tlist, tle);
	}
	nchild = list_length(rw.child_tlist);
	foreach(lc, tlist)
	{
		TargetEntry *tle = lfirst(lc);

		tle->expr = (Expr *) number_answers((Node *) tle->expr, &nchild);
	}
	/* the scan tuple: the child's columns, then the answers */
	foreach(lc, rw.child_tlist)
		scan_tlist = lappend(scan_tlist, makeTargetEntry(outer_var(lfirst(lc)), list_length(scan_tlist) + 1,
														 NULL, false));
	foreach(lc, rw.calls)
	{
		FuncExpr   *call = copyObject((FuncExpr *) lfirst(lc));
		List	   *cols = list_nth(rw.call_args, k++);
		List	   *args = NIL;
		ListCell   *c;

		/* shown by EXPLAIN VERBOSE as the call over the child's columns */
		foreach(c, cols)
			args = lappend(args, outer_var(list_nth(rw.child_tlist, lfirst_int(c) - 1)));
		call->args = args;
		scan_tlist = lappend(scan_tlist, makeTargetEntry((Expr *) call, list_length(scan_tlist) + 1,
														 NULL, false));
		private = lappend(private, lcons_int(dolly_call_kind(call->funcid), cols));
	}

	plan->targetlist = rw.child_tlist;
	cscan->scan.plan.targetlist = tlist;
	cscan->scan.plan.startup_cost = plan->startup_cost;
	cscan->scan.plan.total_cost = plan->total_cost;
	cscan->scan.plan.plan_rows = plan->plan_rows;
	cscan->scan.plan.plan_width = plan->plan_width;
	cscan->scan.plan.lefttree = plan;	/* what EXPLAIN VERBOSE resolves OUTER_VAR against */
	cscan->scan.scanrelid = 0;
	cscan->custom_plans = list_make1(plan);
	cscan->custom_scan_tlist = scan_tlist;
	cscan->custom_private = private;
	cscan->methods = &batch_plan_methods;
	return &cscan->scan.plan;
}

/* Could plan's own target list run its dolly calls in a batch? */
static bool
plan_batchable(Plan *plan)
{
	bool		any = false;
	ListCell   *lc;

	/* one row (SELECT dolly_generate('...'), PL/pgSQL's simple expressions): nothing to batch */
	if (IsA(plan, Result) && plan->lefttree == NULL)
		return false;
	switch (nodeTag(plan))
	{
		case T_ModifyTable:
		case T_ProjectSet:
		case T_CustomScan:
		case T_Gather:
		case T_GatherMerge:
			return false;
		default:
			break;
	}
	if (calls_dolly((Node *) plan->qual, NULL) ||
		((IsA(plan, NestLoop) || IsA(plan, MergeJoin) || IsA(plan, HashJoin)) &&
		 calls_dolly((Node *) ((Join *) plan)->joinqual, NULL)) ||
		(IsA(plan, Result) && calls_dolly(((Result *) plan)->resconstantqual, NULL)))
		return false;
	foreach(lc, plan->targetlist)
	{
		Node	   *expr = (Node *) ((TargetEntry *) lfirst(lc))->expr;

		if (!calls_dolly(expr, NULL))
			continue;
		if (unbatchable(expr, NULL))
			return false;
		any = true;
	}
	return any;
}

/* The plan with Dolly Batch above every node that can use one. */
static Plan *
batch_tree(Plan *plan)
{
	ListCell   *lc;

	if (plan == NULL)
		return NULL;
	plan->lefttree = batch_tree(plan->lefttree);
	/* a merge join may mark and restore its inner side, which Dolly Batch cannot */
	if (!IsA(plan, MergeJoin))
		plan->righttree = batch_tree(plan->righttree);
	if (IsA(plan, Append))
		foreach(lc, ((Append *) plan)->appendplans)
			lfirst(lc) = batch_tree(lfirst(lc));
	else if (IsA(plan, MergeAppend))
		foreach(lc, ((MergeAppend *) plan)->mergeplans)
			lfirst(lc) = batch_tree(lfirst(lc));
	else if (IsA(plan, SubqueryScan))
		((SubqueryScan *) plan)->subplan = batch_tree(((SubqueryScan *) plan)->subplan);
	return plan_batchable(plan) ? make_batch(plan) : plan;
}

/*
 * Citus refuses volatile functions in UPDATE on a distributed table: where the query
 * calls dolly_generate, say what Citus accepts (a hint added to its ERROR).
 */
static void
hint_citus_update(Query *parse, MemoryContext cxt)
{
	ErrorData  *e;

	MemoryContextSwitchTo(cxt);
	e = CopyErrorData();
	if (e->sqlerrcode != ERRCODE_FEATURE_NOT_SUPPORTED || e->hint != NULL ||
		strstr(e->message, "must not be VOLATILE") == NULL || parse->commandType != CMD_UPDATE ||
		!calls_dolly((Node *) parse, NULL))
	{
		FreeErrorData(e);
		return;
	}
	FlushErrorState();
	e->hint = pstrdup("Citus runs only non-volatile functions in an UPDATE of a distributed table: "
					  "dolly_generate_greedy(instruction, context, model, max_new_tokens) is dolly_generate "
					  "with do_sample => false, declared IMMUTABLE, which Citus runs on the workers: "
					  "UPDATE tasks SET answer = dolly_generate_greedy(instruction).");
	ReThrowError(e);
}

static PlannedStmt *
batch_planner(Query *parse, const char *query_string, int cursor_options, ParamListInfo params)
{
	MemoryContext cxt = CurrentMemoryContext;
	PlannedStmt *volatile stmt = NULL;
	ListCell   *lc;

	PG_TRY();
	{
		stmt = prev_planner_hook
			? prev_planner_hook(parse, query_string, cursor_options, params)
			: standard_planner(parse, query_string, cursor_options, params);
	}
	PG_CATCH();
	{
		hint_citus_update(parse, cxt);
		PG_RE_THROW();
	}
	PG_END_TRY();

	/* a scrollable cursor needs backward scans, which Dolly Batch does not do */
	if (dolly_query_batch == 1 || (cursor_options & CURSOR_OPT_SCROLL))
		return stmt;
	stmt->planTree = batch_tree(stmt->planTree);
	foreach(lc, stmt->subplans)
		lfirst(lc) = batch_tree(lfirst(lc));
	return stmt;
}

/* --- execution --- */

static Node *
create_batch_state(CustomScan *cscan)
{
	BatchState *bs = palloc0(sizeof(BatchState));

	NodeSetTag(bs, T_CustomScanState);
	bs->css.methods = &batch_exec_methods;
	return (Node *) bs;
}

static void
batch_begin(CustomScanState *node, EState *estate, int eflags)
{
	BatchState *bs = (BatchState *) node;
	CustomScan *cscan = (CustomScan *) node->ss.ps.plan;
	ListCell   *lc;
	int			i = 0;
	MemoryContext old;

	bs->child = ExecInitNode(linitial(cscan->custom_plans), estate, eflags);
	node->custom_ps = list_make1(bs->child);
	bs->child_slot = MakeSingleTupleTableSlot(ExecGetResultType(bs->child), &TTSOpsMinimalTuple);
	bs->nchild = ExecGetResultType(bs->child)->natts;
	bs->ncalls = list_length(cscan->custom_private);
	bs->kind = palloc(bs->ncalls * sizeof(DollyCallKind));
	bs->args = palloc(bs->ncalls * sizeof(List *));
	foreach(lc, cscan->custom_private)
	{
		bs->kind[i] = linitial_int(lfirst(lc));
		bs->args[i++] = list_delete_first(list_copy(lfirst(lc)));
	}
	bs->window = dolly_query_batch > 0 ? dolly_query_batch : dolly_max_batch;
	bs->rows_cxt = AllocSetContextCreate(estate->es_query_cxt, "Dolly Batch rows", ALLOCSET_DEFAULT_SIZES);
	bs->rows = MemoryContextAllocZero(estate->es_query_cxt, bs->window * sizeof(BatchRow));
	old = MemoryContextSwitchTo(estate->es_query_cxt);
	dolly_flight_init(&bs->flight, bs->window * bs->ncalls);
	MemoryContextSwitchTo(old);
}

/* Give up every request still in flight (a LIMIT satisfied, a rescan, the end). */
static void
batch_drop(BatchState *bs)
{
	dolly_flight_release(&bs->flight);
	bs->head = bs->count = 0;
	bs->returned.tuple = NULL;
	MemoryContextReset(bs->rows_cxt);
}

/* The arguments of call c of the child's row in slot, as the function would get them. */
static void
call_args(BatchState *bs, int c, TupleTableSlot *slot, FunctionCallInfo fcinfo)
{
	ListCell   *lc;
	int			a = 0;

	InitFunctionCallInfoData(*fcinfo, NULL, list_length(bs->args[c]), InvalidOid, NULL, NULL);
	foreach(lc, bs->args[c])
	{
		fcinfo->args[a].value = slot_getattr(slot, lfirst_int(lc), &fcinfo->args[a].isnull);
		a++;
	}
}

/* Read rows ahead while the window has room. */
static void
read_ahead(BatchState *bs)
{
	while (!bs->child_done && bs->count < bs->window)
	{
		TupleTableSlot *slot = ExecProcNode(bs->child);
		BatchRow   *row;
		MemoryContext old;
		LOCAL_FCINFO(fcinfo, FUNC_MAX_ARGS);

		if (TupIsNull(slot))
		{
			bs->child_done = true;
			break;
		}
		/* an argument too long for a request fails before the row is copied */
		for (int c = 0; c < bs->ncalls; c++)
		{
			call_args(bs, c, slot, fcinfo);
			dolly_call_check(bs->kind[c], fcinfo);
		}
		row = &bs->rows[(bs->head + bs->count++) % bs->window];
		old = MemoryContextSwitchTo(bs->rows_cxt);
		row->tuple = ExecCopySlotMinimalTuple(slot);
		row->calls = palloc0(bs->ncalls * sizeof(BatchCall));
		MemoryContextSwitchTo(old);
	}
}

/* Are all of the row's calls answered? */
static bool
row_answered(BatchState *bs, BatchRow *row)
{
	for (int c = 0; c < bs->ncalls; c++)
		if (!row->calls[c].answered)
			return false;
	return true;
}

/* Submit the calls of the rows read ahead, in order, while there are slots. */
static void
submit_ahead(BatchState *bs)
{
	for (int r = 0; r < bs->count; r++)
	{
		BatchRow   *row = &bs->rows[(bs->head + r) % bs->window];

		for (int c = 0; c < bs->ncalls; c++)
		{
			BatchCall  *call = &row->calls[c];
			LOCAL_FCINFO(fcinfo, FUNC_MAX_ARGS);
			DollyRequest *req;

			if (call->submitted)
				continue;
			if ((req = dolly_flight_acquire(&bs->flight)) == NULL)
				return;
			call_args(bs, c, ExecStoreMinimalTuple(row->tuple, bs->child_slot, false), fcinfo);
			call->submitted = true;
			if (dolly_call_submit(bs->kind[c], fcinfo, req))
			{
				dolly_flight_add(&bs->flight, req, call);
				bs->requests++;
			}
			else
			{
				/* a NULL instruction: NULL, as the call returns */
				dolly_queue_release(req);
				call->answer_null = true;
				call->answered = true;
			}
		}
	}
}

/* Wait for one answer of the calls in flight and keep it with its call. */
static void
collect_one(BatchState *bs)
{
	void	   *tag;
	DollyRequest *req = dolly_flight_wait(&bs->flight, &tag);
	BatchCall  *call = tag;
	MemoryContext old;

	bs->tokens += req->new_tokens;
	old = MemoryContextSwitchTo(bs->rows_cxt);
	call->answer = PointerGetDatum(dolly_call_answer(req));
	MemoryContextSwitchTo(old);
	call->answered = true;
}

/* Free what the row returned last held (its tuple, its answers). */
static void
free_returned(BatchState *bs)
{
	if (bs->returned.tuple == NULL)
		return;
	pfree(bs->returned.tuple);
	for (int c = 0; c < bs->ncalls; c++)
		if (!bs->returned.calls[c].answer_null)
			pfree(DatumGetPointer(bs->returned.calls[c].answer));
	pfree(bs->returned.calls);
	bs->returned.tuple = NULL;
}

static TupleTableSlot *
batch_exec(CustomScanState *node)
{
	BatchState *bs = (BatchState *) node;
	TupleTableSlot *scan = node->ss.ss_ScanTupleSlot;
	BatchRow   *row;

	free_returned(bs);
	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		read_ahead(bs);
		if (bs->count == 0)
			return NULL;
		submit_ahead(bs);
		row = &bs->rows[bs->head];
		if (row_answered(bs, row))
			break;
		collect_one(bs);
	}

	/* the oldest row is answered: the child's columns, then the answers */
	ExecClearTuple(scan);
	ExecStoreMinimalTuple(row->tuple, bs->child_slot, false);
	slot_getallattrs(bs->child_slot);
	memcpy(scan->tts_values, bs->child_slot->tts_values, bs->nchild * sizeof(Datum));
	memcpy(scan->tts_isnull, bs->child_slot->tts_isnull, bs->nchild * sizeof(bool));
	for (int c = 0; c < bs->ncalls; c++)
	{
		scan->tts_values[bs->nchild + c] = row->calls[c].answer;
		scan->tts_isnull[bs->nchild + c] = row->calls[c].answer_null;
	}
	ExecStoreVirtualTuple(scan);
	bs->returned = *row;
	bs->head = (bs->head + 1) % bs->window;
	bs->count--;
	if (node->ss.ps.ps_ProjInfo == NULL)
		return scan;
	ResetExprContext(node->ss.ps.ps_ExprContext);
	node->ss.ps.ps_ExprContext->ecxt_scantuple = scan;
	return ExecProject(node->ss.ps.ps_ProjInfo);
}

static void
batch_end(CustomScanState *node)
{
	BatchState *bs = (BatchState *) node;

	batch_drop(bs);
	ExecDropSingleTupleTableSlot(bs->child_slot);
	ExecEndNode(bs->child);
}

static void
batch_rescan(CustomScanState *node)
{
	BatchState *bs = (BatchState *) node;

	batch_drop(bs);
	bs->child_done = false;
	if (node->ss.ps.chgParam != NULL)
		UpdateChangedParamSet(bs->child, node->ss.ps.chgParam);
	/* a child with changed parameters rescans at its next ExecProcNode */
	if (bs->child->chgParam == NULL)
		ExecReScan(bs->child);
}

static void
batch_explain(CustomScanState *node, List *ancestors, ExplainState *es)
{
	BatchState *bs = (BatchState *) node;

	ExplainPropertyInteger("Batch Size", NULL, bs->window, es);
	if (es->analyze)
	{
		ExplainPropertyInteger("Requests", NULL, bs->requests, es);
		ExplainPropertyInteger("Generated Tokens", NULL, bs->tokens, es);
	}
}

void
dolly_batch_init(void)
{
	batch_plan_methods.CustomName = BATCH_NAME;
	batch_plan_methods.CreateCustomScanState = create_batch_state;
	RegisterCustomScanMethods(&batch_plan_methods);
	batch_exec_methods.CustomName = BATCH_NAME;
	batch_exec_methods.BeginCustomScan = batch_begin;
	batch_exec_methods.ExecCustomScan = batch_exec;
	batch_exec_methods.EndCustomScan = batch_end;
	batch_exec_methods.ReScanCustomScan = batch_rescan;
	batch_exec_methods.ExplainCustomScan = batch_explain;
	prev_planner_hook = planner_hook;
	planner_hook = batch_planner;
}
