/*
 * catalog.c: the extension's own tables (dolly_job, dolly_model) and the one safe way to
 * query them with more rights than the caller's.
 *
 * Users cannot write those tables; dolly writes them as the tables' owner (the role that
 * created the extension, usually a superuser). A query run with those rights must not run
 * anything the caller can define: the owner scope switches the user id with
 * SECURITY_RESTRICTED_OPERATION and pins search_path to pg_catalog, pg_temp in a GUC nest
 * level of its own, and every query run inside it qualifies its operators and functions
 * (OPERATOR(pg_catalog.=), pg_catalog.now()), as PostgreSQL's guidance for security
 * definer functions and extension scripts asks.
 */
#include "postgres.h"

#include "catalog.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/pg_class.h"
#include "catalog/pg_extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"

/* The schema dolly is installed in (get_extension_schema is not exported before PG 16). */
static Oid
extension_schema(void)
{
	Relation	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;
	Oid			nsp = InvalidOid;

	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber, F_NAMEEQ,
				CStringGetDatum("dolly"));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	if (HeapTupleIsValid(tup = systable_getnext(scan)))
		nsp = ((Form_pg_extension) GETSTRUCT(tup))->extnamespace;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	if (!OidIsValid(nsp))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("extension \"dolly\" is not installed in this database"),
				 errhint("Run CREATE EXTENSION dolly.")));
	return nsp;
}

/* The owner of the dolly_job table in schema nsp: the identity that writes dolly's tables. */
static Oid
tables_owner(Oid nsp)
{
	Oid			relid = get_relname_relid("dolly_job", nsp);
	HeapTuple	tup;
	Oid			owner;

	if (!OidIsValid(relid))
		elog(ERROR, "dolly: table dolly_job is missing");
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	return owner;
}

/*
 * Switch to the tables' owner with SECURITY_RESTRICTED_OPERATION and search_path pinned to
 * pg_catalog, pg_temp in a GUC nest level of its own. Scopes nest; an ERROR inside one is
 * undone by the transaction's abort.
 */
static void
owner_begin(DollyOwnerScope *scope, Oid owner)
{
	GetUserIdAndSecContext(&scope->saved_user, &scope->saved_sec);
	SetUserIdAndSecContext(owner, scope->saved_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	scope->guc_level = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
}

static void
owner_end(const DollyOwnerScope *scope)
{
	AtEOXact_GUC(true, scope->guc_level);
	SetUserIdAndSecContext(scope->saved_user, scope->saved_sec);
}

void
dolly_owner_query(DollyOwnerScope *scope, const char *sql, const char *table, int nargs,
				  Oid *types, Datum *values, const char *nulls, int expect)
{
	Oid			nsp = extension_schema();
	char	   *query = psprintf(sql, quote_qualified_identifier(get_namespace_name(nsp), table));

	owner_begin(scope, tables_owner(nsp));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute_with_args(query, nargs, types, values, nulls, expect == SPI_OK_SELECT, 0) != expect)
		elog(ERROR, "dolly: a query of %s failed", table);
}

void
dolly_owner_query_end(const DollyOwnerScope *scope)
{
	SPI_finish();
	owner_end(scope);
}
