/*
 * torch_ckpt.h: reader of PyTorch checkpoints (pytorch_model.bin) as torch.save has
 * written them since torch 1.6: a zip archive whose entries all sit under one folder,
 * <prefix>/data.pkl (the pickled state dict) and <prefix>/data/<key> (one entry per
 * storage, stored uncompressed, its data aligned to 64 bytes by torch's writer).
 *
 * Nothing in the file is executed: the pickle is interpreted by a small machine that
 * knows only the opcodes and the globals a state dict of tensors needs
 * (collections.OrderedDict, torch._utils._rebuild_tensor_v2, the torch.*Storage types
 * of plain numbers, persistent ids naming storages) and refuses anything else, naming
 * it. The tensors come out as the safetensors reader's st_tensor, their data pointing
 * into the archive, so a directory of .bin files opens as an st_set (safetensors.h)
 * without a copy of the weights.
 */
#ifndef DOLLY_TORCH_CKPT_H
#define DOLLY_TORCH_CKPT_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "safetensors.h"

/*
 * Parse and validate one whole checkpoint image held in memory, as st_parse does a
 * safetensors file: on success *tensors (malloc'd, sorted by name, each name malloc'd,
 * data pointing into buf) and *n are set. fname names the file in error messages. The
 * zip structure is checked (end records, ZIP64 as torch writes archives over 4 GB,
 * every local header against its central entry, data descriptors, entries inside the
 * file and not overlapping); so is every tensor (a contiguous view inside its storage,
 * whose entry holds exactly its declared number of elements).
 */
dl_status	torch_ckpt_parse(const uint8_t *buf, size_t size, const char *fname,
							 st_tensor **tensors, int *n, dl_error *err);

#endif
