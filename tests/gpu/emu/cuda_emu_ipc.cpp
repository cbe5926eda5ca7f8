/*
 * cuda_emu_ipc.cpp: the emulation's device memory, and CUDA IPC between processes.
 *
 * Every allocation is a memfd mapped shared, so that cudaIpcGetMemHandle can name it by
 * process and descriptor, and another process of the same user map the same pages through
 * /proc/<pid>/fd/<fd>: the ranks of a fine-tuning job, separate PostgreSQL processes, then
 * read each other's emulated GPU memory as they read each other's real one. As on a GPU, a
 * process cannot open its own handles.
 *
 * $EMU_NO_IPC=FILE: while FILE exists, nothing can be exported (a GPU or driver without
 * IPC). $EMU_NO_PEER=FILE: while FILE exists, the emulated GPUs have no peer access to each
 * other. Mappings are counted: a process says on stderr when it closes its last one, and
 * when it exits with some still open (the server tests read both).
 */
#include "cuda_emu.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
#include <map>

namespace
{
	struct allocation
	{
		int			fd;
		size_t		bytes;
		int			device;
	};

	/* what a cudaIpcMemHandle_t holds here */
	struct handle
	{
		uint32_t	magic;
		int32_t		pid;
		int32_t		fd;
		int32_t		device;
		uint64_t	bytes;
	};

	const uint32_t HANDLE_MAGIC = 0xd011c0de;
	std::map<void *, allocation> allocations;
	std::map<void *, size_t> mappings;

	/* Does the file that $name names exist? */
	bool
	switched_on(const char *name)
	{
		const char *path = getenv(name);

		return path && access(path, F_OK) == 0;
	}

	void
	report_open_at_exit(void)
	{
		if (!mappings.empty())
			fprintf(stderr, "cuda_emu: process %d exits with %zu IPC mappings open\n", (int) getpid(),
					mappings.size());
	}
}

/* A memfd of whole pages, mapped shared: what another process can map by its descriptor. */
void *
emu_device_memory(size_t bytes)
{
	size_t		page = (size_t) sysconf(_SC_PAGESIZE),
				len = bytes ? (bytes + page - 1) / page * page : page;
	int			fd = memfd_create("cuda_emu device memory", MFD_CLOEXEC);
	void	   *p = MAP_FAILED;

	if (fd >= 0 && ftruncate(fd, (off_t) len) == 0)
		p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
	{
		if (fd >= 0)
			close(fd);
		return NULL;
	}
	allocations[p] = {fd, len, emu_current_device()};
	return p;
}

/* Unmap and close an allocation; the pages live on while another process maps them. */
void
emu_device_release(void *p)
{
	auto		it = allocations.find(p);

	if (it == allocations.end())
		return;
	munmap(p, it->second.bytes);
	close(it->second.fd);
	allocations.erase(it);
}

/* {pid, fd, device, bytes} of an allocation made here, unless $EMU_NO_IPC's file exists. */
cudaError_t
cudaIpcGetMemHandle(cudaIpcMemHandle_t *h, void *p)
{
	auto		it = allocations.find(p);
	handle		x;

	if (switched_on("EMU_NO_IPC"))
		return cudaErrorNotSupported;
	if (it == allocations.end())
		return cudaErrorInvalidValue;
	x = {HANDLE_MAGIC, (int32_t) getpid(), it->second.fd, it->second.device, it->second.bytes};
	memset(h, 0, sizeof(*h));
	memcpy(h->reserved, &x, sizeof(x));
	return cudaSuccess;
}

/* Map another process's allocation through /proc/<pid>/fd/<fd>. */
cudaError_t
cudaIpcOpenMemHandle(void **p, cudaIpcMemHandle_t h, unsigned)
{
	handle		x;
	char		path[64];
	int			fd;

	memcpy(&x, h.reserved, sizeof(x));
	if (x.magic != HANDLE_MAGIC || x.pid == (int32_t) getpid())
		return cudaErrorInvalidValue;
	if (x.device != emu_current_device() && switched_on("EMU_NO_PEER"))
		return cudaErrorPeerAccessUnsupported;
	snprintf(path, sizeof(path), "/proc/%d/fd/%d", (int) x.pid, (int) x.fd);
	if ((fd = open(path, O_RDWR | O_CLOEXEC)) < 0)
		return cudaErrorMapBufferObjectFailed;
	*p = mmap(NULL, x.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (*p == MAP_FAILED)
	{
		*p = NULL;
		return cudaErrorMapBufferObjectFailed;
	}
	if (mappings.empty())
	{
		static bool registered;

		if (!registered)
			atexit(report_open_at_exit);
		registered = true;
	}
	mappings[*p] = x.bytes;
	return cudaSuccess;
}

cudaError_t
cudaIpcCloseMemHandle(void *p)
{
	auto		it = mappings.find(p);

	if (it == mappings.end())
		return cudaErrorInvalidValue;
	munmap(p, it->second);
	mappings.erase(it);
	if (mappings.empty())
		fprintf(stderr, "cuda_emu: process %d closed its last IPC mapping\n", (int) getpid());
	return cudaSuccess;
}

cudaError_t
cudaDeviceCanAccessPeer(int *can, int dev, int peer)
{
	*can = dev != peer && !switched_on("EMU_NO_PEER");
	return cudaSuccess;
}
