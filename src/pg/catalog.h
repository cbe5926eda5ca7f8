/*
 * catalog.h: dolly's tables, queried with their owner's rights (catalog.c), and the model
 * catalog: who owns a model and who may use it (models.c).
 */
#ifndef DOLLY_CATALOG_H
#define DOLLY_CATALOG_H

#include "fmgr.h"
#include "paths.h"

/*
 * Queries on dolly's tables with their owner's rights: in a scope that runs with
 * SECURITY_RESTRICTED_OPERATION and search_path pinned to pg_catalog, pg_temp, and whose
 * queries still qualify every operator and function.
 */
typedef struct DollyOwnerScope
{
	Oid			saved_user;
	int			saved_sec;
	int			guc_level;
} DollyOwnerScope;

/*
 * Run sql (its "%s" the schema-qualified, quoted name of dolly's table `table`; ERROR if
 * dolly is not installed in this database) with SPI's arguments in the owner scope; ERROR unless SPI answers `expect` (SPI_OK_SELECT: a read-only query). The
 * result is in SPI_tuptable, in memory that dolly_owner_query_end frees (copy what you
 * keep with SPI_palloc), which must follow.
 */
extern void dolly_owner_query(DollyOwnerScope *scope, const char *sql, const char *table,
							  int nargs, Oid *types, Datum *values, const char *nulls,
							  int expect);
extern void dolly_owner_query_end(const DollyOwnerScope *scope);

/*
 * ERROR unless the current role may use the model `name` (a name under dolly.model_dir):
 * dolly.model is everyone's; any other model must be registered in this database's catalog
 * and owned by, or granted to, the role (or PUBLIC); superusers may name any directory
 * under dolly.model_dir, registered or not. Sets *ident to the identity the server must
 * find ({0, 0}: not checked, as for dolly.model).
 */
extern void dolly_check_model_use(const char *name, DollyModelIdent *ident);

/*
 * A request's model `name`, checked as dolly_check_model_use. When it is a LoRA adapter (a
 * directory with adapter_config.json) it runs on its base model, which the catalog
 * records and which the role must be allowed to use as well: *base gets the base's name
 * and *base_ident its identity; otherwise *base is "".
 */
extern void dolly_check_model_request(const char *name, DollyModelIdent *ident, char *base,
									  DollyModelIdent *base_ident);

/*
 * Register the model a job wrote at path as `name`, owned by `owner` (the job's role), with
 * its base model and job; inside the job's transaction, so that the model is registered
 * exactly when the job is recorded as succeeded.
 */
extern void dolly_register_output(const char *name, Oid owner, const char *base, int64 job,
								  const char *path);

/*
 * The directory a new model `name` is to be written to under dolly.model_dir: ERROR when
 * the name is not one, is registered, or its directory exists (a model is never
 * overwritten), or when dolly.model_dir is not set.
 */
extern char *dolly_check_new_model(const char *name);

/* The model name in argument 0 of a SQL call: not NULL, and a name (else ERROR). */
extern char *dolly_model_arg(FunctionCallInfo fcinfo);

/* Register a model copied from another node, with that node's owner and base model. */
extern void dolly_register_copy(const char *name, Oid owner, const char *base, const char *path);

/* May the current role see the loaded model at path (in dolly_server)? */
extern bool dolly_model_visible(const char *path);

/* Is `name` registered in this database's catalog (whoever owns it)? */
extern bool dolly_model_registered(const char *name);

#endif
