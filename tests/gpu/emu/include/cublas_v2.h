/* cublas_v2.h: the emulation (cuda_emu.h) under CUDA's name. */
#include "cuda_emu.h"
