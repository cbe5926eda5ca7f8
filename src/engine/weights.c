/*
 * weights.c: the weight files of a model directory, opened as one table of tensors (st_set).
 *
 * A directory holds model.safetensors, or model.safetensors.index.json naming its shards;
 * failing those, PyTorch's pytorch_model.bin or pytorch_model.bin.index.json, whose .bin
 * files torch_ckpt.c reads. Each file is mapped read-only and private and checked whole
 * by its reader (st_parse, torch_ckpt_parse); an index's shards must be plain files of the
 * directory, and every tensor it lists must be in the shard it names. The tensors point
 * into the mappings, so the weights are never copied; st_release drops a tensor's pages
 * from the mapping once a load has copied them.
 */
#include "safetensors_int.h"
#include "torch_ckpt.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The weights a model directory may hold, in the order transformers prefers them. */
static const struct
{
	const char *name;
	bool		index;			/* names the shards in its weight_map */
}			weight_files[] = {
	{"model.safetensors", false}, {"model.safetensors.index.json", true},
	{"pytorch_model.bin", false}, {"pytorch_model.bin.index.json", true},
};

/* Map path read-only (MAP_PRIVATE); empty files are refused. */
static dl_status
map_file(const char *path, void **map, size_t *size, dl_error *err)
{
	struct stat sb;
	int			fd = open(path, O_RDONLY | O_CLOEXEC);
	void	   *p;

	if (fd < 0)
		return dl_fail(err, DL_EIO, "cannot open \"%s\": %s", path, strerror(errno));
	if (fstat(fd, &sb) != 0)
	{
		int			e = errno;

		close(fd);
		return dl_fail(err, DL_EIO, "cannot stat \"%s\": %s", path, strerror(e));
	}
	if (!S_ISREG(sb.st_mode))
	{
		close(fd);
		return dl_fail(err, DL_EIO, "\"%s\" is not a regular file", path);
	}
	if (sb.st_size == 0)
	{
		close(fd);
		return dl_fail(err, DL_EFORMAT, "%s: file is empty", path);
	}
	p = mmap(NULL, (size_t) sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (p == MAP_FAILED)
	{
		int			e = errno;

		close(fd);
		return dl_fail(err, e == ENOMEM ? DL_ENOMEM : DL_EIO, "cannot map \"%s\": %s", path,
					   strerror(e));
	}
	close(fd);
	*map = p;
	*size = (size_t) sb.st_size;
	return DL_OK;
}

/* "dir/name" in a new allocation (NULL when out of memory). */
static char *
path_join(const char *dir, const char *name)
{
	size_t		len = strlen(dir) + strlen(name) + 2;
	char	   *p = malloc(len);

	if (p)
		snprintf(p, len, "%s/%s", dir, name);
	return p;
}

/* An empty set with room for nfiles shards. */
static st_set *
set_new(int nfiles)
{
	st_set	   *set = calloc(1, sizeof(*set));

	if (set == NULL)
		return NULL;
	set->paths = calloc(nfiles, sizeof(*set->paths));
	set->maps = calloc(nfiles, sizeof(*set->maps));
	set->sizes = calloc(nfiles, sizeof(*set->sizes));
	if (set->paths == NULL || set->maps == NULL || set->sizes == NULL)
	{
		st_close(set);
		return NULL;
	}
	return set;
}

/*
 * Map and validate shard number idx of set from path, a PyTorch checkpoint if its name
 * ends in ".bin", else a safetensors file; its tensors go to *tensors, *n.
 */
static dl_status
set_load_shard(st_set *set, int idx, const char *path, st_tensor **tensors, int *n, dl_error *err)
{
	size_t		len = strlen(path);
	bool		torch = len > 4 && strcmp(path + len - 4, ".bin") == 0;
	dl_status	st;

	set->paths[idx] = strdup(path);
	if (set->paths[idx] == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory opening \"%s\"", path);
	set->nfiles = idx + 1;		/* st_close frees the path, and the map once there is one */
	st = map_file(path, &set->maps[idx], &set->sizes[idx], err);
	if (st != DL_OK)
		return st;
	st = (torch ? torch_ckpt_parse : st_parse) (set->maps[idx], set->sizes[idx], path, tensors, n, err);
	if (st == DL_EFORMAT)
		dl_hint(err, torch ? "The file is damaged or was not written by torch.save: download the model again." :
				"The file is damaged or not a safetensors file: download or save the model again.");
	for (int i = 0; st == DL_OK && i < *n; i++)
		(*tensors)[i].file = idx;
	return st;
}

/* Map and validate one weights file (safetensors, or .bin) as a one-shard set. */
dl_status
st_open_file(const char *path, st_set **out, dl_error *err)
{
	st_set	   *set = set_new(1);
	dl_status	st;

	if (set == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory opening \"%s\"", path);
	st = set_load_shard(set, 0, path, &set->tensors, &set->ntensors, err);
	if (st != DL_OK)
	{
		st_close(set);
		return st;
	}
	*out = set;
	return DL_OK;
}

/* Whether path exists (or exists but cannot be examined: then opening it reports why). */
static bool
path_exists(const char *path)
{
	struct stat sb;

	return stat(path, &sb) == 0 || errno != ENOENT;
}

/* A shard name from the index must be a plain file name inside the model directory. */
static bool
plain_file_name(const char *name, int len)
{
	return len > 0 && strlen(name) == (size_t) len && strchr(name, '/') == NULL &&
		strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
}

/* qsort: C strings. */
static int
cstr_cmp(const void *a, const void *b)
{
	return strcmp(*(const char *const *) a, *(const char *const *) b);
}

/* Find name in tensors[0..n) sorted by name; NULL if absent. */
static const st_tensor *
find_sorted(const st_tensor *tensors, int n, const char *name)
{
	int			lo = 0,
				hi = n - 1;

	while (lo <= hi)
	{
		int			mid = lo + (hi - lo) / 2;
		int			c = strcmp(name, tensors[mid].name);

		if (c == 0)
			return &tensors[mid];
		if (c < 0)
			hi = mid - 1;
		else
			lo = mid + 1;
	}
	return NULL;
}

/*
 * Read the index's weight_map: check its shard names and return the distinct shard
 * names, sorted (pointers into the json-c objects, valid while index lives).
 */
static dl_status
index_shards(json_object *index, const char *ipath, json_object **wmap, const char ***shards,
			 int *nshards, dl_error *err)
{
	const char **names;
	int			n = 0,
				nd = 0;

	if (!json_object_object_get_ex(index, "weight_map", wmap) ||
		!json_object_is_type(*wmap, json_type_object) || json_object_object_length(*wmap) == 0)
		return dl_fail(err, DL_EFORMAT, "%s: no weight_map object naming the shards", ipath);
	names = malloc(json_object_object_length(*wmap) * sizeof(*names));
	if (names == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory reading \"%s\"", ipath);
	json_object_object_foreach(*wmap, tname, file)
	{
		if (!json_object_is_type(file, json_type_string))
		{
			free(names);
			return dl_fail(err, DL_EFORMAT, "%s: weight_map entry of tensor \"%s\" is not a file name",
						   ipath, tname);
		}
		if (!plain_file_name(json_object_get_string(file), json_object_get_string_len(file)))
		{
			dl_fail(err, DL_EFORMAT, "%s: shard \"%s\" of tensor \"%s\" is not a plain file name",
					ipath, json_object_get_string(file), tname);
			free(names);
			return dl_hint(err, "Shards must be files in the model directory itself.");
		}
		names[n++] = json_object_get_string(file);
	}
	qsort(names, n, sizeof(*names), cstr_cmp);
	for (int i = 0; i < n; i++)
		if (nd == 0 || strcmp(names[nd - 1], names[i]) != 0)
			names[nd++] = names[i];
	*shards = names;
	*nshards = nd;
	return DL_OK;
}

/* Merge the shards' tensors into set, sorted by name, refusing names found twice. */
static dl_status
set_merge(st_set *set, st_tensor **per, int *nper, dl_error *err)
{
	int			total = 0,
				k = 0,
				dup;

	for (int i = 0; i < set->nfiles; i++)
		total += nper[i];
	set->tensors = malloc((total ? total : 1) * sizeof(*set->tensors));
	if (set->tensors == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory merging shards");
	for (int i = 0; i < set->nfiles; i++)
	{
		memcpy(set->tensors + k, per[i], nper[i] * sizeof(*per[i]));
		k += nper[i];
		free(per[i]);			/* the names now belong to set->tensors */
		per[i] = NULL;
		nper[i] = 0;
	}
	set->ntensors = total;
	if ((dup = st_sort_by_name(set->tensors, total)) > 0)
		return dl_fail(err, DL_EFORMAT, "tensor \"%s\" is in two shards: \"%s\" and \"%s\"",
					   set->tensors[dup].name, set->paths[set->tensors[dup - 1].file],
					   set->paths[set->tensors[dup].file]);
	return DL_OK;
}

/* Open a sharded model through its index file. */
static dl_status
open_sharded(const char *dir, const char *ipath, st_set **out, dl_error *err)
{
	void	   *imap = NULL;
	size_t		isize = 0;
	json_object *index = NULL,
			   *wmap;
	const char **shards = NULL;
	int			nshards = 0;
	st_tensor **per = NULL;
	int		   *nper = NULL;
	st_set	   *set = NULL;
	dl_status	st;

	st = map_file(ipath, &imap, &isize, err);
	if (st != DL_OK)
		return st;
	st = st_json_object(imap, isize, ipath, "index", &index, err);
	munmap(imap, isize);
	if (st == DL_OK)
		st = index_shards(index, ipath, &wmap, &shards, &nshards, err);
	if (st != DL_OK)
		goto done;
	set = set_new(nshards);
	per = calloc(nshards, sizeof(*per));
	nper = calloc(nshards, sizeof(*nper));
	if (set == NULL || per == NULL || nper == NULL)
	{
		st = dl_fail(err, DL_ENOMEM, "out of memory opening \"%s\"", ipath);
		goto done;
	}
	for (int i = 0; i < nshards && st == DL_OK; i++)
	{
		char	   *spath = path_join(dir, shards[i]);

		st = spath ? set_load_shard(set, i, spath, &per[i], &nper[i], err) :
			dl_fail(err, DL_ENOMEM, "out of memory opening \"%s\"", ipath);
		free(spath);
	}
	if (st != DL_OK)
		goto done;
	{
		json_object_object_foreach(wmap, tname, file)
		{
			const char *fname = json_object_get_string(file);
			const char **hit = bsearch(&fname, shards, nshards, sizeof(*shards), cstr_cmp);
			int			f = (int) (hit - shards);

			if (find_sorted(per[f], nper[f], tname) == NULL)
			{
				st = dl_fail(err, DL_EFORMAT, "%s: tensor \"%s\" is listed in shard \"%s\", which does not contain it",
							 ipath, tname, fname);
				goto done;
			}
		}
	}
	st = set_merge(set, per, nper, err);

done:
	for (int i = 0; per && i < nshards; i++)
		st_free_tensors(per[i], nper[i]);
	free(per);
	free(nper);
	free(shards);
	json_object_put(index);
	if (st != DL_OK)
	{
		st_close(set);
		return st;
	}
	*out = set;
	return DL_OK;
}

/* Open a model directory through the first of weight_files it holds. */
dl_status
st_open(const char *dir, st_set **out, dl_error *err)
{
	struct stat sb;

	for (size_t i = 0; i < sizeof(weight_files) / sizeof(weight_files[0]); i++)
	{
		char	   *path = path_join(dir, weight_files[i].name);
		dl_status	st;

		if (path == NULL)
			return dl_fail(err, DL_ENOMEM, "out of memory opening \"%s\"", dir);
		if (!path_exists(path))
		{
			free(path);
			continue;
		}
		st = weight_files[i].index ? open_sharded(dir, path, out, err) : st_open_file(path, out, err);
		free(path);
		return st;
	}
	if (stat(dir, &sb) != 0)
		return dl_fail(err, DL_EIO, "cannot open model directory \"%s\": %s", dir, strerror(errno));
	if (!S_ISDIR(sb.st_mode))
		return dl_fail(err, DL_EIO, "model path \"%s\" is not a directory", dir);
	dl_fail(err, DL_EIO, "model directory \"%s\" has no weights", dir);
	return dl_hint(err, "A Hugging Face model directory holds %s, %s (safetensors), %s or %s (PyTorch), as save_pretrained writes them.",
				   weight_files[0].name, weight_files[1].name, weight_files[2].name, weight_files[3].name);
}

/* Binary search of the set's tensors, which are sorted by name. */
const st_tensor *
st_find(const st_set *set, const char *name)
{
	return find_sorted(set->tensors, set->ntensors, name);
}

void
st_release(const st_set *set, const st_tensor *t)
{
	const uint8_t *map;
	uintptr_t	page = (uintptr_t) sysconf(_SC_PAGESIZE),
				lo,
				hi;

	if (t->file < 0 || t->file >= set->nfiles || t->nbytes == 0)
		return;
	map = set->maps[t->file];
	if (map == NULL || t->data < map || t->data + t->nbytes > map + set->sizes[t->file])
		return;
	/* whole pages, rounded outward: a neighbour on a shared page reads it again from the cache */
	lo = (uintptr_t) t->data & ~(page - 1);
	hi = ((uintptr_t) (t->data + t->nbytes) + page - 1) & ~(page - 1);
	madvise((void *) lo, hi - lo, MADV_DONTNEED);
}

/* Unmap the shards and free the set. */
void
st_close(st_set *set)
{
	if (set == NULL)
		return;
	for (int i = 0; i < set->nfiles; i++)
		if (set->maps[i])
			munmap(set->maps[i], set->sizes[i]);
	for (int i = 0; i < set->nfiles; i++)
		free(set->paths[i]);
	free(set->paths);
	free(set->maps);
	free(set->sizes);
	st_free_tensors(set->tensors, set->ntensors);
	free(set);
}
