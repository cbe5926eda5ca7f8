/*
 * torch_ckpt_int.h: what torch_pickle.c (the restricted pickle machine) and torch_ckpt.c
 * (the checkpoint around it) share; not part of the engine's API.
 *
 * The machine runs data.pkl's opcodes over values of a few kinds. What the values mean is
 * left to torch_ckpt.c, as Python's Unpickler leaves find_class and persistent_load to
 * torch's loader: which globals exist (GLOBAL, STACK_GLOBAL: tc_push_global), what a
 * persistent id names (BINPERSID: tc_persistent_load) and what calling a global builds
 * (REDUCE: tc_reduce).
 */
#ifndef DOLLY_TORCH_CKPT_INT_H
#define DOLLY_TORCH_CKPT_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "error.h"
#include "safetensors.h"
#include "zip.h"

typedef enum pk_kind
{
	PK_NONE, PK_BOOL, PK_INT, PK_STR, PK_TUPLE, PK_DICT, PK_GLOBAL, PK_STORAGE, PK_TENSOR
} pk_kind;

/*
 * A value: BOOL, INT: a; STR: a = offset in the pickle, b = length; TUPLE: a = first of
 * its b items in kids[]; DICT, STORAGE, TENSOR: a = index in dicts[], storages[],
 * tensors[]; GLOBAL: a = index in torch_ckpt.c's allowed[].
 */
typedef struct pk_value
{
	int64_t		a;
	uint32_t	b;
	uint8_t		kind;
} pk_value;

/* A dict's items are chained in insertion order. */
typedef struct pk_dict
{
	int32_t		first;			/* item, or -1 */
	int32_t		last;
	int32_t		count;
} pk_dict;

typedef struct pk_item
{
	int32_t		key;			/* values */
	int32_t		value;
	int32_t		next;			/* item, or -1 */
} pk_item;

/* A storage: one archive entry read as an array of numel elements of dtype. */
typedef struct pk_storage
{
	const zip_entry *entry;
	st_dtype	dtype;
	int64_t		numel;
} pk_storage;

/* A tensor: a contiguous view of a storage. */
typedef struct pk_tensor
{
	int32_t		storage;
	int			ndim;
	int64_t		offset;			/* in elements */
	int64_t		shape[ST_MAX_DIMS];
	int64_t		numel;
} pk_tensor;

/* The machine: the pickle, the archive it names storages in, and its arrays. */
typedef struct pk_machine
{
	const uint8_t *p;			/* data.pkl */
	size_t		len;
	size_t		op;				/* offset of the opcode running, for messages */
	const uint8_t *buf;			/* the archive */
	zip_dir    *zip;
	const char *fname;
	dl_error   *err;

	pk_value   *v;
	int32_t		nv,
				capv;
	int32_t    *stack;
	int32_t		nstack,
				capstack;
	int32_t    *marks;			/* stack heights at each MARK */
	int32_t		nmarks,
				capmarks;
	int32_t    *memo;			/* value, or -1 */
	int32_t		nmemo,
				capmemo,
				memo_count;		/* entries set, as len(memo) */
	int32_t    *kids;
	int32_t		nkids,
				capkids;
	pk_dict    *dicts;
	int32_t		ndicts,
				capdicts;
	pk_item    *items;
	int32_t		nitems,
				capitems;
	pk_storage *storages;
	int32_t		nstorages,
				capstorages;
	int32_t    *entry_storage;	/* per archive entry: its storage, or -1 */
	const uint8_t *folder;		/* "<folder>/", which every entry's name starts with */
	size_t		folder_len;
	char	   *name;			/* tc_find's buffer */
	size_t		name_cap;
	pk_tensor  *tensors;
	int32_t		ntensors,
				captensors;
} pk_machine;

/* torch_pickle.c */

/* What messages call a value of each kind ("a tuple"), by pk_kind. */
extern const char *const pk_kind_names[];

/* Fail with a message that names the file and where in data.pkl the machine stands. */
dl_status	pk_fail(pk_machine *m, dl_status code, const char *fmt,...)
			__attribute__((format(printf, 3, 4)));

/* Room for one more element in *arr (n used of *cap, each sz bytes); false when out of memory. */
bool		pk_grow(void **arr, int32_t n, int32_t *cap, size_t sz);

/* pk_grow on the array arr of m (counted by n, allocated cap), failing with DL_ENOMEM. */
#define PK_GROW(m, arr, n, cap) \
	(pk_grow((void **) &(m)->arr, (m)->n, &(m)->cap, sizeof(*(m)->arr)) ? DL_OK : \
	 dl_fail((m)->err, DL_ENOMEM, "out of memory reading %s", (m)->fname))

/* Make a new value and push it. */
dl_status	pk_push_new(pk_machine *m, pk_kind kind, int64_t a, uint32_t b);

/* Pop the top value into *out. */
dl_status	pk_pop(pk_machine *m, int32_t *out);

/* Push a new empty dict. */
dl_status	pk_push_dict(pk_machine *m);

/* Run the pickle m->p[0..len) to its STOP; *result: the value it returns. */
dl_status	pk_run(pk_machine *m, int32_t *result);

/* Free the machine's arrays. */
void		pk_free(pk_machine *m);

/* The bytes of string value i. */
static inline const uint8_t *
pk_str(const pk_machine *m, int32_t i)
{
	return m->p + m->v[i].a;
}

/* Whether value i is the string s. */
static inline bool
pk_str_is(const pk_machine *m, int32_t i, const char *s)
{
	return m->v[i].kind == PK_STR && (size_t) m->v[i].b == strlen(s) &&
		memcmp(pk_str(m, i), s, m->v[i].b) == 0;
}

/* torch_ckpt.c: what the values mean */

/*
 * GLOBAL, STACK_GLOBAL: push the global module.name if it is one the machine knows (a state
 * dict of tensors needs them); any other is refused.
 */
dl_status	tc_push_global(pk_machine *m, const uint8_t *module, size_t mlen, const uint8_t *name,
						   size_t nlen);

/*
 * BINPERSID: the persistent id ('storage', <storage type>, key, location, numel) names
 * the entry data/<key>, which must be stored and hold exactly numel elements. A key seen
 * again is the same storage, and must be declared alike.
 */
dl_status	tc_persistent_load(pk_machine *m, int32_t pid);

/* REDUCE: call a known global with a tuple of arguments. */
dl_status	tc_reduce(pk_machine *m);

#endif
