/*
 * attention.cu: causal attention of a batch of sequences over one layer's KV cache
 * (kv format: bfloat16, or float32 in the backend's fp32 mode).
 *
 * Spans of one token (decode) and of several (prefill, with or without a cached prefix)
 * take different kernels, each launched only when some span needs it; a kernel's blocks
 * whose span is of the other kind return at once.
 *  - decode: a block per (span, head, split of the keys). Its warps walk the keys with
 *    FlashAttention's online softmax (running max, sum and unnormalised output), lanes in
 *    groups of G splitting one key's head_dim in 16-byte pieces. The split that holds the
 *    new position first stores that token's k and v. When few sequences decode, the keys
 *    are split over several blocks (FlashDecoding) so that the GPU fills up: each split
 *    leaves its max, sum and output in the workspace and a combine kernel merges them.
 *  - prefill: the new tokens' k and v are stored first (kv_store), then FlashAttention:
 *    a block per (span, head, tile of PF_BQ queries) walks tiles of keys through shared
 *    memory with the online softmax, so no T x T score matrix exists in global memory.
 * Scores are kept in base 2 (q scaled by scale * log2(e)), so each exponential is an exp2f.
 */
#include "common.cuh"

#define DEC_WARPS 4
#define DEC_THREADS (DEC_WARPS * 32)
#define DEC_UNROLL 4			/* keys a lane group has in flight */
#define DEC_MIN_KEYS 64			/* fewest keys worth a split of their own */
#define MAX_HEAD_DIM 256
#define ATTN_WS_BYTES ((size_t) 8 << 20)	/* split partials; fewer splits when short */
#define PF_BQ 32				/* queries per prefill block: 2 rows for each of 16 thread rows */
#define PF_THREADS 128
#define LOG2E 1.4426950408889634f
#define FULL_MASK 0xffffffffu

/* The factor that moves a softmax state of max m to a larger max mnew: 0 for an empty state. */
static __device__ __forceinline__ float
rescale(float m, float mnew)
{
	return m == -INFINITY ? 0.0f : exp2f(m - mnew);
}

/*
 * One decode query against keys [k0, k1) of its slot, k0 = split * chunk. Lane gl of
 * group grp owns the 16-byte pieces gl, gl + G, ... of head_dim (NV of them, VEC
 * elements each) and the keys t0 + u * (32 / G) + grp of each step. part is NULL with a
 * single split (the output is final), else it receives [max, sum, output[D]] per split.
 */
template <typename KV, int VEC, int NV>
__global__ static void __launch_bounds__(DEC_THREADS)
attn_decode_kernel(float *out, float *part, const float *qkv, KV *kc, KV *vc,
				   const dl_span *spans, int max_ctx, int H, int D, int G, float qscale,
				   int chunk, int splits)
{
	__shared__ float s_acc[DEC_WARPS][MAX_HEAD_DIM];
	__shared__ float s_m[DEC_WARPS],
				s_l[DEC_WARPS];
	dl_span		sp = spans[blockIdx.z];
	int			h = blockIdx.y,
				split = blockIdx.x;
	int			C = H * D,
				nv = D / VEC;
	int			k0 = split * chunk,
				k1 = min(k0 + chunk, sp.pos + 1);
	int			lane = threadIdx.x & 31,
				warp = threadIdx.x >> 5;
	int			grp = lane / G,
				gl = lane % G,
				kpw = 32 / G;
	const float *q_row = qkv + (size_t) sp.first * 3 * C + (size_t) h * D;
	size_t		head0 = (size_t) sp.slot * max_ctx * C + (size_t) h * D;
	float		q[NV][VEC],
				acc[NV][VEC];
	float		m = -INFINITY,
				l = 0.0f,
				big = -INFINITY,
				sum = 0.0f;

	if (sp.len != 1 || k0 >= k1)
		return;
	if (sp.pos < k1)
	{
		/* this split holds the new position: its k and v (this head) join the cache */
		size_t		at = head0 + (size_t) sp.pos * C;

		for (int d = threadIdx.x; d < D; d += DEC_THREADS)
		{
			kc[at + d] = from_f32<KV>(q_row[C + d]);
			vc[at + d] = from_f32<KV>(q_row[2 * C + d]);
		}
		__syncthreads();
	}
#pragma unroll
	for (int i = 0; i < NV; i++)
#pragma unroll
		for (int e = 0; e < VEC; e++)
		{
			int			vi = gl + i * G;

			q[i][e] = vi < nv ? q_row[vi * VEC + e] * qscale : 0.0f;
			acc[i][e] = 0.0f;
		}

	for (int t0 = k0 + warp * kpw * DEC_UNROLL; t0 < k1; t0 += DEC_WARPS * kpw * DEC_UNROLL)
	{
		float		kf[DEC_UNROLL][NV][VEC],
					vf[DEC_UNROLL][NV][VEC],
					s[DEC_UNROLL],
					mx = m;

		/* every load of the step first, so that they are in flight together */
#pragma unroll
		for (int u = 0; u < DEC_UNROLL; u++)
		{
			int			key = t0 + u * kpw + grp;

#pragma unroll
			for (int i = 0; i < NV; i++)
			{
				int			vi = gl + i * G;

				if (key < k1 && vi < nv)
				{
					size_t		at = head0 + (size_t) key * C + (size_t) vi * VEC;

					load_vec<KV, VEC>(kc + at, kf[u][i]);
					load_vec<KV, VEC>(vc + at, vf[u][i]);
				}
				else
#pragma unroll
					for (int e = 0; e < VEC; e++)
						kf[u][i][e] = vf[u][i][e] = 0.0f;
			}
		}
#pragma unroll
		for (int u = 0; u < DEC_UNROLL; u++)
		{
			float		p = 0.0f;

#pragma unroll
			for (int i = 0; i < NV; i++)
#pragma unroll
				for (int e = 0; e < VEC; e++)
					p = fmaf(q[i][e], kf[u][i][e], p);
			for (int off = G / 2; off > 0; off >>= 1)
				p += __shfl_xor_sync(FULL_MASK, p, off);
			s[u] = t0 + u * kpw + grp < k1 ? p : -INFINITY;
			mx = fmaxf(mx, s[u]);
		}
		if (mx == -INFINITY)
			continue;			/* this group has seen no key yet */
		{
			float		c = rescale(m, mx);

			l *= c;
#pragma unroll
			for (int i = 0; i < NV; i++)
#pragma unroll
				for (int e = 0; e < VEC; e++)
					acc[i][e] *= c;
#pragma unroll
			for (int u = 0; u < DEC_UNROLL; u++)
			{
				float		p = exp2f(s[u] - mx);

				l += p;
#pragma unroll
				for (int i = 0; i < NV; i++)
#pragma unroll
					for (int e = 0; e < VEC; e++)
						acc[i][e] = fmaf(p, vf[u][i][e], acc[i][e]);
			}
			m = mx;
		}
	}

	/* merge the groups of the warp (lanes gl + k G hold the same dims) */
	for (int off = G; off < 32; off <<= 1)
	{
		float		mo = __shfl_xor_sync(FULL_MASK, m, off),
					lo = __shfl_xor_sync(FULL_MASK, l, off);
		float		mn = fmaxf(m, mo),
					a = rescale(m, mn),
					b = rescale(mo, mn);

		l = l * a + lo * b;
#pragma unroll
		for (int i = 0; i < NV; i++)
#pragma unroll
			for (int e = 0; e < VEC; e++)
				acc[i][e] = acc[i][e] * a + __shfl_xor_sync(FULL_MASK, acc[i][e], off) * b;
		m = mn;
	}
	/* then the warps of the block, through shared memory */
	if (lane < G)
#pragma unroll
		for (int i = 0; i < NV; i++)
		{
			int			vi = gl + i * G;

			if (vi < nv)
#pragma unroll
				for (int e = 0; e < VEC; e++)
					s_acc[warp][vi * VEC + e] = acc[i][e];
		}
	if (lane == 0)
	{
		s_m[warp] = m;
		s_l[warp] = l;
	}
	__syncthreads();
	for (int w = 0; w < DEC_WARPS; w++)
		big = fmaxf(big, s_m[w]);
	for (int w = 0; w < DEC_WARPS; w++)
		sum += s_l[w] * rescale(s_m[w], big);
	{
		float	   *p = part ? part + (((size_t) blockIdx.z * H + h) * splits + split) * (D + 2)
			: NULL;

		for (int d = threadIdx.x; d < D; d += DEC_THREADS)
		{
			float		o = 0.0f;

			for (int w = 0; w < DEC_WARPS; w++)
				o += s_acc[w][d] * rescale(s_m[w], big);
			if (p)
				p[2 + d] = o;
			else
				out[(size_t) sp.first * C + (size_t) h * D + d] = o / sum;
		}
		if (p && threadIdx.x == 0)
		{
			p[0] = big;
			p[1] = sum;
		}
	}
}

/* Merge the splits of each decode query (span blockIdx.y, head blockIdx.x). */
__global__ static void
attn_combine_kernel(float *out, const float *part, const dl_span *spans, int H, int D,
					int chunk, int splits)
{
	dl_span		sp = spans[blockIdx.y];
	int			h = blockIdx.x;
	int			ns = (sp.pos + chunk) / chunk;	/* splits that had keys: ceil((pos+1)/chunk) */
	const float *p = part + ((size_t) blockIdx.y * H + h) * splits * (D + 2);
	float		big = -INFINITY,
				sum = 0.0f;

	if (sp.len != 1)
		return;
	for (int s = 0; s < ns; s++)
		big = fmaxf(big, p[(size_t) s * (D + 2)]);
	for (int s = 0; s < ns; s++)
		sum += p[(size_t) s * (D + 2) + 1] * exp2f(p[(size_t) s * (D + 2)] - big);
	for (int d = threadIdx.x; d < D; d += blockDim.x)
	{
		float		o = 0.0f;

		for (int s = 0; s < ns; s++)
			o += p[(size_t) s * (D + 2) + 2 + d] * exp2f(p[(size_t) s * (D + 2)] - big);
		out[(size_t) sp.first * H * D + (size_t) h * D + d] = o / sum;
	}
}

/* k and v of the new tokens of prefill spans into the cache (decode spans store their own). */
template <typename KV>
__global__ static void
kv_store_kernel(KV *kc, KV *vc, const float *qkv, const dl_span *spans, int max_ctx, int C)
{
	dl_span		sp = spans[blockIdx.y];

	if (sp.len == 1)
		return;
	for (int i = blockIdx.x; i < sp.len; i += gridDim.x)
	{
		const float *row = qkv + (size_t) (sp.first + i) * 3 * C;
		size_t		at = ((size_t) sp.slot * max_ctx + sp.pos + i) * C;

		for (int c = threadIdx.x; c < C; c += blockDim.x)
		{
			kc[at + c] = from_f32<KV>(row[C + c]);
			vc[at + c] = from_f32<KV>(row[2 * C + c]);
		}
	}
}

/* Keys per prefill tile: fewer for wide heads, so that shared memory stays under 99 KB. */
template <int DMAX>
static __host__ __device__ constexpr int
prefill_bk(void)
{
	return DMAX > 128 ? 16 : 32;
}

/* Shared memory of a prefill block: Q tile, K and V tiles (rows padded to D + 1), P tile. */
template <int DMAX>
static size_t
prefill_smem(int D)
{
	constexpr int BK = prefill_bk<DMAX>();

	return ((size_t) PF_BQ * (D + 1) + 2 * (size_t) BK * (D + 1) + PF_BQ * (BK + 1)) * sizeof(float);
}

/*
 * FlashAttention over the cache for queries [i0, i0 + PF_BQ) of a prefill span: thread
 * (ty, tx) owns query rows 2ty and 2ty + 1, key columns tx + 8j of each tile (scores) and
 * output dims tx + 8i (its share of P V). Row maxima and sums meet across the 8 lanes of
 * a row by shuffles. Query i (position pos + i) sees keys 0 .. pos + i; keys past the
 * last query's position are never loaded, and their tile slots hold zeros.
 */
template <typename KV, int DMAX>
__global__ static void __launch_bounds__(PF_THREADS)
attn_prefill_kernel(float *out, const float *qkv, const KV *kc, const KV *vc,
					const dl_span *spans, int max_ctx, int H, int D, float qscale)
{
	constexpr int BK = prefill_bk<DMAX>();
	constexpr int KPT = BK / 8;
	constexpr int DPT = DMAX / 8;
	extern __shared__ float smem[];
	dl_span		sp = spans[blockIdx.z];
	int			h = blockIdx.y,
				i0 = blockIdx.x * PF_BQ;
	int			C = H * D,
				DP = D + 1;
	int			tid = threadIdx.x,
				tx = tid % 8,
				r0 = 2 * (tid / 8),
				r1 = r0 + 1;
	float	   *Qs = smem,
			   *Ks = Qs + PF_BQ * DP,
			   *Vs = Ks + BK * DP,
			   *Ps = Vs + BK * DP;
	size_t		head0 = (size_t) sp.slot * max_ctx * C + (size_t) h * D;
	float		m0 = -INFINITY,
				m1 = -INFINITY,
				l0 = 0.0f,
				l1 = 0.0f,
				o0[DPT],
				o1[DPT];
	int			nq,
				nkeys,
				qp0,
				qp1;

	if (sp.len == 1 || i0 >= sp.len)
		return;
	nq = min(PF_BQ, sp.len - i0);
	nkeys = sp.pos + i0 + nq;
	qp0 = sp.pos + i0 + r0;
	qp1 = qp0 + 1;
#pragma unroll
	for (int i = 0; i < DPT; i++)
		o0[i] = o1[i] = 0.0f;
	for (int idx = tid; idx < PF_BQ * D; idx += PF_THREADS)
	{
		int			r = idx / D,
					d = idx - r * D;

		Qs[r * DP + d] = r < nq ?
			qkv[(size_t) (sp.first + i0 + r) * 3 * C + (size_t) h * D + d] * qscale : 0.0f;
	}

	for (int kb = 0; kb < nkeys; kb += BK)
	{
		float		s0[KPT],
					s1[KPT],
					mx0 = -INFINITY,
					mx1 = -INFINITY,
					ps0 = 0.0f,
					ps1 = 0.0f,
					c0,
					c1;

		__syncthreads();		/* Q is in; the previous tile is no longer read */
		for (int idx = tid; idx < BK * D; idx += PF_THREADS)
		{
			int			c = idx / D,
						d = idx - c * D;
			float		kx = 0.0f,
						vx = 0.0f;

			if (kb + c < nkeys)
			{
				size_t		at = head0 + (size_t) (kb + c) * C + d;

				kx = to_f32(kc[at]);
				vx = to_f32(vc[at]);
			}
			Ks[c * DP + d] = kx;
			Vs[c * DP + d] = vx;
		}
		__syncthreads();

#pragma unroll
		for (int j = 0; j < KPT; j++)
			s0[j] = s1[j] = 0.0f;
		for (int d = 0; d < D; d++)
		{
			float		a = Qs[r0 * DP + d],
						b = Qs[r1 * DP + d];

#pragma unroll
			for (int j = 0; j < KPT; j++)
			{
				float		k = Ks[(tx + 8 * j) * DP + d];

				s0[j] = fmaf(a, k, s0[j]);
				s1[j] = fmaf(b, k, s1[j]);
			}
		}
#pragma unroll
		for (int j = 0; j < KPT; j++)
		{
			int			key = kb + tx + 8 * j;

			if (key > qp0 || key >= nkeys)
				s0[j] = -INFINITY;
			if (key > qp1 || key >= nkeys)
				s1[j] = -INFINITY;
			mx0 = fmaxf(mx0, s0[j]);
			mx1 = fmaxf(mx1, s1[j]);
		}
		for (int off = 1; off < 8; off <<= 1)
		{
			mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, off));
			mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, off));
		}
		/* key 0 is in every row's first tile, so the new maxima are finite */
		mx0 = fmaxf(m0, mx0);
		mx1 = fmaxf(m1, mx1);
		c0 = rescale(m0, mx0);
		c1 = rescale(m1, mx1);
#pragma unroll
		for (int j = 0; j < KPT; j++)
		{
			float		p0 = exp2f(s0[j] - mx0),
						p1 = exp2f(s1[j] - mx1);

			ps0 += p0;
			ps1 += p1;
			Ps[r0 * (BK + 1) + tx + 8 * j] = p0;
			Ps[r1 * (BK + 1) + tx + 8 * j] = p1;
		}
		for (int off = 1; off < 8; off <<= 1)
		{
			ps0 += __shfl_xor_sync(FULL_MASK, ps0, off);
			ps1 += __shfl_xor_sync(FULL_MASK, ps1, off);
		}
		l0 = l0 * c0 + ps0;
		l1 = l1 * c1 + ps1;
		m0 = mx0;
		m1 = mx1;
#pragma unroll
		for (int i = 0; i < DPT; i++)
		{
			o0[i] *= c0;
			o1[i] *= c1;
		}
		__syncthreads();		/* every row of P is written */
		for (int c = 0; c < BK; c++)
		{
			float		a = Ps[r0 * (BK + 1) + c],
						b = Ps[r1 * (BK + 1) + c];

#pragma unroll
			for (int i = 0; i < DPT; i++)
			{
				int			d = tx + 8 * i;

				if (d < D)
				{
					float		v = Vs[c * DP + d];

					o0[i] = fmaf(a, v, o0[i]);
					o1[i] = fmaf(b, v, o1[i]);
				}
			}
		}
	}

#pragma unroll
	for (int i = 0; i < DPT; i++)
	{
		int			d = tx + 8 * i;
		float	   *o = out + (size_t) (sp.first + i0) * C + (size_t) h * D + d;

		if (d < D && r0 < nq)
			o[(size_t) r0 * C] = o0[i] / l0;
		if (d < D && r1 < nq)
			o[(size_t) r1 * C] = o1[i] / l1;
	}
}

/* Whether p is 16-byte aligned. */
static inline int
aligned16(const void *p)
{
	return ((uintptr_t) p & 15) == 0;
}

/* Launch the decode kernel with the widest loads that head_dim and the cache allow. */
template <typename KV>
static void
decode_launch(cuda_backend *cb, dim3 grid, float *out, float *part, const float *qkv,
			  KV *kc, KV *vc, const dl_span *spans, int max_ctx, int H, int D, float qscale,
			  int chunk, int splits)
{
	constexpr int VW = 16 / sizeof(KV);
	int			wide = D % VW == 0 && aligned16(kc) && aligned16(vc);
	int			nvec = wide ? D / VW : D;
	int			G = 1;

	while (G < nvec && G < 32)
		G *= 2;
#define DECODE(VEC, NV) attn_decode_kernel<KV, VEC, NV><<<grid, DEC_THREADS, 0, cb->stream>>>( \
		out, part, qkv, kc, vc, spans, max_ctx, H, D, G, qscale, chunk, splits)
	if (wide && nvec > 32)
	{
		/* only float32 pieces (4 elements) can need two per lane, for head_dim up to 256 */
		if constexpr (VW == 4)
			DECODE(VW, 2);
	}
	else if (wide)
		DECODE(VW, 1);
	else if (nvec <= 32)
		DECODE(1, 1);
	else if (nvec <= 64)
		DECODE(1, 2);
	else if (nvec <= 128)
		DECODE(1, 4);
	else
		DECODE(1, 8);
#undef DECODE
}

/*
 * The kernels take a span per gridDim.y or .z index, which stops at 65,535: batches of
 * more sequences launch in groups of spans (the kernels index spans[blockIdx], so a
 * group is the spans from its first on).
 */
#define MAX_GRID_SPANS 65535

/* Prefill: store the new k and v, then FlashAttention for every tile of queries. */
template <typename KV>
static void
prefill_launch(cuda_backend *cb, float *out, const float *qkv, KV *kc, KV *vc,
			   const dl_spans *spans, int max_ctx, int H, int D, float qscale, int max_len)
{
	for (int s0 = 0; s0 < spans->n; s0 += MAX_GRID_SPANS)
	{
		int			n = spans->n - s0 < MAX_GRID_SPANS ? spans->n - s0 : MAX_GRID_SPANS;
		const dl_span *sp = spans->dev + s0;
		dim3		store_grid(max_len < 1024 ? max_len : 1024, n);
		dim3		grid((max_len + PF_BQ - 1) / PF_BQ, H, n);

		kv_store_kernel<<<store_grid, DL_BLOCK, 0, cb->stream>>>(kc, vc, qkv, sp, max_ctx, H * D);
		cuda_check_launch(cb, "attention_forward (storing k and v)");
		if (D <= 64)
			attn_prefill_kernel<KV, 64><<<grid, PF_THREADS, prefill_smem<64>(D), cb->stream>>>(
				out, qkv, kc, vc, sp, max_ctx, H, D, qscale);
		else if (D <= 128)
			attn_prefill_kernel<KV, 128><<<grid, PF_THREADS, prefill_smem<128>(D), cb->stream>>>(
				out, qkv, kc, vc, sp, max_ctx, H, D, qscale);
		else
			attn_prefill_kernel<KV, 256><<<grid, PF_THREADS, prefill_smem<256>(D), cb->stream>>>(
				out, qkv, kc, vc, sp, max_ctx, H, D, qscale);
		cuda_check_launch(cb, "attention_forward (prefill)");
	}
}

/*
 * Decode: splits of the keys so that about two blocks per multiprocessor run, none with
 * fewer than DEC_MIN_KEYS keys, within the workspace; merged by the combine kernel.
 */
template <typename KV>
static void
decode_run(cuda_backend *cb, float *out, const float *qkv, KV *kc, KV *vc,
		   const dl_spans *spans, int max_ctx, int H, int D, float qscale, float *workspace,
		   int n_dec, int max_keys)
{
	int			blocks = n_dec * H,
				target = 2 * cb->sm_count,
				splits = 1,
				chunk;

	if (blocks < target && max_keys >= 2 * DEC_MIN_KEYS)
	{
		size_t		cap = ATTN_WS_BYTES / sizeof(float) / ((size_t) spans->n * H * (D + 2));

		splits = (target + blocks - 1) / blocks;
		splits = splits < max_keys / DEC_MIN_KEYS ? splits : max_keys / DEC_MIN_KEYS;
		splits = (size_t) splits < cap ? splits : (int) cap;
	}
	splits = splits > 1 ? splits : 1;
	chunk = (max_keys + splits - 1) / splits;
	splits = (max_keys + chunk - 1) / chunk;
	for (int s0 = 0; s0 < spans->n; s0 += MAX_GRID_SPANS)
	{
		int			n = spans->n - s0 < MAX_GRID_SPANS ? spans->n - s0 : MAX_GRID_SPANS;
		float	   *part = splits > 1 ? workspace + (size_t) s0 * H * splits * (D + 2) : NULL;

		decode_launch(cb, dim3(splits, H, n), out, part, qkv, kc, vc, spans->dev + s0, max_ctx, H, D,
					  qscale, chunk, splits);
		cuda_check_launch(cb, "attention_forward (decode)");
		if (splits == 1)
			continue;
		attn_combine_kernel<<<dim3(H, n), 128, 0, cb->stream>>>(out, part, spans->dev + s0, H, D, chunk,
																splits);
		cuda_check_launch(cb, "attention_forward (combining splits)");
	}
}

/* Attention of a batch: prefill spans and decode spans, each by its kernels. */
void
cuda_attention_forward(dl_backend *be, float *out, const float *qkv, void *k_cache,
					   void *v_cache, int max_ctx, const dl_spans *spans, int n_head,
					   int head_dim, float scale, void *workspace)
{
	cuda_backend *cb = cuda_enter(be);
	float		qscale = scale * LOG2E;
	int			n_dec = 0,
				max_keys = 0,
				max_len = 0;

	if (head_dim < 1 || head_dim > MAX_HEAD_DIM)
	{
		cuda_fail(cb, DL_EUNSUPPORTED, "attention_forward", "head_dim must be 1 to 256");
		return;
	}
	for (int s = 0; s < spans->n; s++)
	{
		const dl_span *sp = &spans->host[s];

		if (sp->len == 1)
		{
			n_dec++;
			max_keys = sp->pos + 1 > max_keys ? sp->pos + 1 : max_keys;
		}
		else if (sp->len > max_len)
			max_len = sp->len;
	}
	if (max_len > 0 && cb->fp32)
		prefill_launch(cb, out, qkv, (float *) k_cache, (float *) v_cache, spans, max_ctx, n_head,
					   head_dim, qscale, max_len);
	else if (max_len > 0)
		prefill_launch(cb, out, qkv, (__nv_bfloat16 *) k_cache, (__nv_bfloat16 *) v_cache, spans,
					   max_ctx, n_head, head_dim, qscale, max_len);
	if (n_dec > 0 && cb->fp32)
		decode_run(cb, out, qkv, (float *) k_cache, (float *) v_cache, spans, max_ctx, n_head,
				   head_dim, qscale, (float *) workspace, n_dec, max_keys);
	else if (n_dec > 0)
		decode_run(cb, out, qkv, (__nv_bfloat16 *) k_cache, (__nv_bfloat16 *) v_cache, spans,
				   max_ctx, n_head, head_dim, qscale, (float *) workspace, n_dec, max_keys);
}

/* A fixed workspace: the decode splits adapt to it. */
size_t
cuda_attention_workspace(dl_backend *be, int max_ctx)
{
	(void) be;
	(void) max_ctx;
	return ATTN_WS_BYTES;
}

/* Raise the prefill kernels' dynamic shared memory limit to what each needs at its widest. */
template <typename KV>
static dl_status
prefill_init(cuda_backend *cb, dl_error *err)
{
	/* 66 KB at the widest: within every supported GPU's opt-in (99 KB and up) */
	if ((int) prefill_smem<256>(256) > cb->smem_optin)
		return dl_fail(err, DL_EUNSUPPORTED, "prefill attention needs %d bytes of shared memory a block; %s allows %d",
					   (int) prefill_smem<256>(256), cb->name, cb->smem_optin);
	CUDA_TRY(cudaFuncSetAttribute(attn_prefill_kernel<KV, 64>,
								  cudaFuncAttributeMaxDynamicSharedMemorySize,
								  (int) prefill_smem<64>(64)), err);
	CUDA_TRY(cudaFuncSetAttribute(attn_prefill_kernel<KV, 128>,
								  cudaFuncAttributeMaxDynamicSharedMemorySize,
								  (int) prefill_smem<128>(128)), err);
	CUDA_TRY(cudaFuncSetAttribute(attn_prefill_kernel<KV, 256>,
								  cudaFuncAttributeMaxDynamicSharedMemorySize,
								  (int) prefill_smem<256>(256)), err);
	return DL_OK;
}

dl_status
cuda_attention_init(cuda_backend *cb, dl_error *err)
{
	return cb->fp32 ? prefill_init<float>(cb, err) : prefill_init<__nv_bfloat16>(cb, err);
}
