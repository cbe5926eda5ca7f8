/*
 * reduce.cu: sums over rows and over whole buffers, in a fixed order so that the same
 * inputs give the same bits on every run (data-parallel ranks must agree): column sums
 * (a bias's gradient, layer-norm parameters' gradients) and the sum of squares of the
 * gradient (its norm, for clipping). Each runs as per-block partial sums into the
 * partial-sum scratch, then one pass that adds them up.
 */
#include "common.cuh"

/* Column sums are computed by blocks of COLS columns x ROW_LANES threads down the rows. */
#define COLS 32
#define ROW_LANES 8
#define MAX_CHUNKS 128

/*
 * partial[y, n] = sum of x[r, n] over the rows r of chunk y (x [M, N]): thread (lane, g)
 * of a block sums column blockIdx.x * COLS + lane over rows g, g + ROW_LANES, ... of the
 * chunk, then the block adds its ROW_LANES sums of each column.
 */
__global__ static void
column_partial_kernel(float *partial, const float *x, int M, int N, int rows_per_chunk)
{
	__shared__ float red[ROW_LANES][COLS];
	int			lane = threadIdx.x % COLS,
				g = threadIdx.x / COLS,
				n = blockIdx.x * COLS + lane,
				r1 = min(M, (int) (blockIdx.y + 1) * rows_per_chunk);
	float		s = 0.0f;

	if (n < N)
		for (int r = blockIdx.y * rows_per_chunk + g; r < r1; r += ROW_LANES)
			s += x[(size_t) r * N + n];
	red[g][lane] = s;
	__syncthreads();
	if (g == 0 && n < N)
	{
		for (int k = 1; k < ROW_LANES; k++)
			s += red[k][lane];
		partial[(size_t) blockIdx.y * N + n] = s;
	}
}

/* out[n] += sum over y < chunks of partial[y * ld + n], n < N. */
__global__ static void
add_partials_kernel(float *out, const float *partial, int chunks, int N, int ld)
{
	int			n = blockIdx.x * blockDim.x + threadIdx.x;
	float		s = 0.0f;

	if (n >= N)
		return;
	for (int y = 0; y < chunks; y++)
		s += partial[(size_t) y * ld + n];
	out[n] += s;
}

void
cuda_add_partials(cuda_backend *cb, float *out, const float *partial, int chunks, int N, int ld,
				  const char *op)
{
	add_partials_kernel<<<(N + DL_BLOCK - 1) / DL_BLOCK, DL_BLOCK, 0, cb->stream>>>(out, partial,
																				   chunks, N, ld);
	cuda_check_launch(cb, op);
}

void
cuda_add_column_sums(cuda_backend *cb, float *out, const float *x, int M, int N, const char *op)
{
	int			chunks = (M + 255) / 256 < MAX_CHUNKS ? (M + 255) / 256 : MAX_CHUNKS;
	dim3		grid((N + COLS - 1) / COLS, chunks);
	float	   *partial;

	if (M <= 0 || N <= 0)
		return;
	partial = (float *) cuda_scratch(cb, SCRATCH_PARTIAL, (size_t) chunks * N * sizeof(float), op);
	if (partial == NULL)
		return;
	column_partial_kernel<<<grid, COLS * ROW_LANES, 0, cb->stream>>>(partial, x, M, N,
																	 (M + chunks - 1) / chunks);
	cuda_check_launch(cb, op);
	cuda_add_partials(cb, out, partial, chunks, N, N, op);
}

/* partial[b] = sum of x[i]^2 over block b's grid-stride share, in double. */
__global__ static void
sum_squares_kernel(double *partial, const float *x, size_t n)
{
	__shared__ double red[DL_BLOCK / 32];
	double		s = 0.0;

	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n;
		 i += (size_t) gridDim.x * blockDim.x)
		s += (double) x[i] * x[i];
	s = block_reduce(s, red, add<double>);
	if (threadIdx.x == 0)
		partial[blockIdx.x] = s;
}

/* *out = the sum of partial[0 .. n), n <= DL_BLOCK, in one block. */
__global__ static void
sum_partials_kernel(double *out, const double *partial, int n)
{
	__shared__ double red[DL_BLOCK / 32];
	double		s = block_reduce((int) threadIdx.x < n ? partial[threadIdx.x] : 0.0, red, add<double>);

	if (threadIdx.x == 0)
		*out = s;
}

dl_status
cuda_sum_squares(dl_backend *be, const float *x, size_t n, double *out, dl_error *err)
{
	cuda_backend *cb = cuda_enter(be);
	unsigned	blocks = grid_for(n) < DL_BLOCK ? grid_for(n) : DL_BLOCK;
	double	   *partial = (double *) cuda_scratch(cb, SCRATCH_PARTIAL, (DL_BLOCK + 1) * sizeof(double),
												  "sum_squares");

	*out = 0.0;
	if (partial != NULL && n > 0)
	{
		sum_squares_kernel<<<blocks, DL_BLOCK, 0, cb->stream>>>(partial + 1, x, n);
		sum_partials_kernel<<<1, DL_BLOCK, 0, cb->stream>>>(partial, partial + 1, (int) blocks);
		cuda_check_launch(cb, "sum_squares");
		return cuda_download(be, out, partial, sizeof(double), err);
	}
	return cuda_synchronize(be, err);
}
