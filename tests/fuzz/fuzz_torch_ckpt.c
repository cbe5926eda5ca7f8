/*
 * fuzz_torch_ckpt.c: libFuzzer target for torch_ckpt_parse (a PyTorch checkpoint: the
 * zip directory and the pickle) and st_to_f32 on every tensor of what parses.
 *
 * An input is either a whole archive (first byte 0) or, to reach the pickle machine with
 * pickles of any length, a pickle that the target wraps into an archive of its own
 * (first byte 1, then a count k <= 8 of storages and k little-endian u16 sizes, then
 * data.pkl; the storages are entries a/data/0 .. a/data/<k-1> of those sizes). Built
 * with FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION, the reader skips data.pkl's CRC-32,
 * which mutations could never match. Build, seed and run from the repository root:
 *
 *   make build/fuzz/fuzz_torch_ckpt
 *   mkdir -p /tmp/tc_corpus && python3 -c "
 *   import sys, zipfile, struct
 *   for f in sys.argv[1:]:
 *       name = f.replace('/', '_')
 *       data = open(f, 'rb').read()
 *       open('/tmp/tc_corpus/' + name, 'wb').write(b'\0' + data)
 *       if not zipfile.is_zipfile(f):
 *           continue
 *       z = zipfile.ZipFile(f)
 *       pkl = [n for n in z.namelist() if n.endswith('/data.pkl')][0]
 *       st = sorted((int(n.rsplit('/', 1)[1]), z.getinfo(n).file_size)
 *                   for n in z.namelist() if '/data/' in n)
 *       if len(st) <= 8 and all(k == i and s < 65536 for i, (k, s) in enumerate(st)):
 *           open('/tmp/tc_corpus/pkl_' + name, 'wb').write(bytes([1, len(st)]) +
 *               b''.join(struct.pack('<H', s) for _, s in st) + z.read(pkl))
 *   " $(find tests/fixtures -name '*.bin')
 *   build/fuzz/fuzz_torch_ckpt -max_total_time=900 -max_len=262144 /tmp/tc_corpus
 *
 * Beyond "no crash, no sanitizer report", it checks what torch_ckpt_parse promises:
 * every error names the file, and what parses keeps fuzz_tensors.h's promises.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_tensors.h"
#include "torch_ckpt.h"

#define MAX_STORAGES 8

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Append v as n little-endian bytes (zeros beyond the eighth). */
static uint8_t *
put(uint8_t *p, uint64_t v, int n)
{
	for (int i = 0; i < n; i++)
		*p++ = i < 8 ? (uint8_t) (v >> (8 * i)) : 0;
	return p;
}

/*
 * A stored zip archive of the given entries (names and contents) as torch's folder "a/"
 * would hold them, without data descriptors; *len: its size. The CRCs are 0.
 */
static uint8_t *
make_archive(const char *const *names, const uint8_t *const *bodies, const size_t *sizes, int n,
			 size_t *len)
{
	size_t		total = 22,
				at = 0;
	uint8_t    *buf,
			   *p;
	size_t		headers[MAX_STORAGES + 1];

	for (int i = 0; i < n; i++)
		total += 30 + 46 + 2 * strlen(names[i]) + sizes[i];
	buf = malloc(total);
	p = buf;
	for (int i = 0; i < n; i++)
	{
		size_t		nl = strlen(names[i]);

		headers[i] = (size_t) (p - buf);
		p = put(p, 0x04034b50, 4);
		p = put(p, 20, 2);
		p = put(p, 0, 2 + 2 + 4 + 4);	/* flags, method, time and date, CRC */
		p = put(p, sizes[i], 4);
		p = put(p, sizes[i], 4);
		p = put(p, nl, 2);
		p = put(p, 0, 2);
		memcpy(p, names[i], nl);
		p += nl;
		if (sizes[i])
			memcpy(p, bodies[i], sizes[i]);
		p += sizes[i];
	}
	at = (size_t) (p - buf);
	for (int i = 0; i < n; i++)
	{
		size_t		nl = strlen(names[i]);

		p = put(p, 0x02014b50, 4);
		p = put(p, 20, 2);
		p = put(p, 20, 2);
		p = put(p, 0, 2 + 2 + 4 + 4);
		p = put(p, sizes[i], 4);
		p = put(p, sizes[i], 4);
		p = put(p, nl, 2);
		p = put(p, 0, 2 + 2 + 2 + 2 + 4);	/* extra, comment, disk, attributes */
		p = put(p, headers[i], 4);
		memcpy(p, names[i], nl);
		p += nl;
	}
	p = put(p, 0x06054b50, 4);
	p = put(p, 0, 4);
	p = put(p, n, 2);
	p = put(p, n, 2);
	p = put(p, (size_t) (p - buf) - 12 - at, 4);	/* the directory's size */
	p = put(p, at, 4);
	p = put(p, 0, 2);
	*len = (size_t) (p - buf);
	return buf;
}

/* Parse one image and check the promises; abort() on a broken one. */
static void
check(const uint8_t *buf, size_t size)
{
	st_tensor  *t;
	int			n;
	dl_error	err;

	if (torch_ckpt_parse(buf, size, "fuzz.bin", &t, &n, &err) == DL_OK)
		fuzz_check_tensors(t, n, buf, size);
	else if (strstr(err.msg, "fuzz.bin") == NULL)
		abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const char *const names[] = {"a/data.pkl", "a/data/0", "a/data/1", "a/data/2",
	"a/data/3", "a/data/4", "a/data/5", "a/data/6", "a/data/7"};
	static uint8_t pattern[65536];
	const uint8_t *bodies[MAX_STORAGES + 1];
	size_t		sizes[MAX_STORAGES + 1],
				len;
	uint8_t    *archive;
	int			k;

	if (size < 1)
		return 0;
	if (data[0] == 0)
	{
		/* a copy of exactly the input, so that reading past it is caught */
		uint8_t    *copy = malloc(size > 1 ? size - 1 : 1);

		memcpy(copy, data + 1, size - 1);
		check(copy, size - 1);
		free(copy);
		return 0;
	}
	if (size < 2 || (k = data[1]) > MAX_STORAGES || size < 2 + 2 * (size_t) k)
		return 0;
	if (pattern[0] == 0)
		for (size_t i = 0; i < sizeof(pattern); i++)
			pattern[i] = (uint8_t) (i * 37 + 11);
	for (int i = 0; i < k; i++)
	{
		sizes[1 + i] = data[2 + 2 * i] | (size_t) data[3 + 2 * i] << 8;
		bodies[1 + i] = pattern;
	}
	bodies[0] = data + 2 + 2 * k;
	sizes[0] = size - 2 - 2 * (size_t) k;
	archive = make_archive(names, bodies, sizes, 1 + k, &len);
	check(archive, len);
	free(archive);
	return 0;
}
