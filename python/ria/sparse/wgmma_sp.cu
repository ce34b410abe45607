// y = x @ W^T (+ bias) for M = 9..64 tokens on Hopper's warpgroup sparse tensor cores
// (wgmma.mma_async.sp m64nNk32, sm_90a), W read in place from cuSPARSELt's compressed
// buffer (values row-major (N, K/2), metadata in cuSPARSELt's tiled order: see
// format.cslt_nibble_index and mma_sp.cu's RIA_CSLT notes).
//
// Plan. A block has RIA_WG warpgroups; warpgroup w owns RIA_R tiles of 64 rows (block rows:
// RIA_ROWS = 64 * RIA_R * RIA_WG, whole 64-row blocks of the metadata) and, with RIA_SK > 1,
// the RIA_SK blocks of a thread-block cluster split the input columns and add their fp32
// partial sums through distributed shared memory in a fixed order (deterministic, no
// atomics). Per chunk of RIA_KC = 64 * RIA_U columns:
// - the tokens (operand B, N = 8 * RIA_NT, zero-padded) are copied by cp.async into shared
//   memory in wgmma's no-swizzle K-major layout (8 tokens x 16 bytes per core matrix),
//   RIA_S chunks in flight;
// - the weight (operand A, sparse) goes straight from HBM to registers, one chunk ahead:
//   lane (g, t) of warp q of a 64-row tile loads 16 bytes (groups 4t..4t+3 of 64 columns)
//   of rows g and g + 8 of the warp's 16 rows, as mma_sp.cu's RIA_CSLT kernel does;
//   each wgmma then takes 32 of the 64 columns;
// - each warpgroup issues 2 * RIA_U wgmma per 64-row tile, all in one commit group.
//
// Group order. A lane's A fragment of one k-step holds fragment groups t and t + 4 of rows
// g and g + 8 (compressed columns 2t, 2t+1 and 2t+8, 2t+9, as mma.sp m16n8k32), and B
// is read by the tensor cores as core matrices of 8 consecutive k (2 groups): fragment
// groups 2c, 2c+1 must be two adjacent groups (one 16-byte copy of x). Lanes t and t ^ 1
// therefore swap two of their four groups (lane t then holds local groups s, s+2, s+4, s+6
// of the 8 groups of lanes 2(t/2), +1, s = t % 2), and k-step h of a 64-column pair takes
// q_{2h} as fragment group t and q_{2h+1} as group t + 4. Fragment group f of step h is
// then pair group G(h, f) = 8 * ((f / 2) % 2) + 4h + 2 * (f / 4) + f % 2, so core matrix
// c of step h is the 8-column chunk 4 * (c % 2) + 2h + c / 2 of the pair: the copies of x
// put chunk ch at slot 4 * ((ch / 2) % 2) + 2 * (ch % 2) + ch / 4 of the pair, and step h
// reads slots 4h..4h+3. Lane t's metadata word (selector t / 2: lanes 0, 1 step 0, lanes
// 2, 3 step 1) covers pair groups 2t, 2t+1, 2t+8, 2t+9, bytes t / 2 and t / 2 + 2 of
// cuSPARSELt's word 2g + t % 2 in both k-tiles of the pair (wgmma_meta).
//
// Compile-time settings (prepended by mma_sp.py with the wgmma wrapper `wgmma_sp`):
// RIA_F16 (1: fp16, 0: bf16), RIA_R, RIA_WG, RIA_U, RIA_S, RIA_SK, RIA_NT (token tiles of
// 8; RIA_NACC = 4 * RIA_NT fp32 accumulators per thread and tile). K % 32 == 0 (the
// buffer's), N % 16 == 0; rows past N are clamped on load and never written. The small
// device primitives repeat mma_sp.cu's (NVRTC has no include path for a shared header).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define RIA_THREADS (128 * RIA_WG)
#define RIA_ROWS (64 * RIA_R * RIA_WG)
#define RIA_KC (64 * RIA_U)
#define RIA_NTOK (8 * RIA_NT)
#define RIA_LBO (RIA_NT * 128)  // bytes between k-adjacent core matrices (one per 8 tokens)
#define RIA_SBO 128             // bytes between token-adjacent core matrices
#define RIA_STAGE_BYTES (8 * RIA_U * RIA_LBO)
#define RIA_PITCH (RIA_ROWS + 4)  // floats per token of the partial sums (+4: no bank conflicts)
#ifndef RIA_PF
#define RIA_PF 2  // chunks ahead whose weight rows are prefetched into L2 (0: none)
#endif
#if RIA_S < 2 || RIA_SK < 1 || RIA_SK > 8
#error "wgmma_sp needs RIA_S >= 2 and 1 <= RIA_SK <= 8"
#endif
#if RIA_SK > 1
#define RIA_CLUSTER __cluster_dims__(1, RIA_SK, 1)
#else
#define RIA_CLUSTER
#endif

__device__ __forceinline__ float to_f32(u16 v) {
  float f;
#if RIA_F16
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
#else
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"(((u32)v) << 16));
#endif
  return f;
}

__device__ __forceinline__ u16 from_f32(float f) {
  u16 v;
#if RIA_F16
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
#endif
  return v;
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

// 16 bytes global -> shared, asynchronously; only the first `bytes` (0 or 16) are read.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Orders this thread's completed cp.async writes (generic proxy) before the tensor cores'
// reads of shared memory (async proxy) that follow the next barrier.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}

// Keeps the compiler from moving accumulator accesses across the asynchronous wgmma.
__device__ __forceinline__ void fence_acc(float (&d)[RIA_NACC]) {
#pragma unroll
  for (int i = 0; i < RIA_NACC; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#if RIA_SK > 1
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;\n" ::
                   : "memory");
}

// The 4 floats at `local`'s offset in the shared memory of the cluster's block `rank`.
__device__ __forceinline__ float4 cluster_load4(const float* local, int rank) {
  u32 a;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(a) : "r"(smem_addr(local)), "r"(rank));
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(a)
               : "memory");
  return v;
}
#endif

// Shared-memory matrix descriptor (no swizzle): start address, leading (k-direction) and
// stride (token-direction) byte offsets, each in 16-byte units.
__device__ __forceinline__ u64 b_desc(u32 addr) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(RIA_LBO >> 4) << 16) | ((u64)(RIA_SBO >> 4) << 32);
}

// Copies of chunk `chunk` of x (RIA_NTOK tokens x RIA_KC columns, zero past M and K) into
// `stage`: 8-column pieces, 8 consecutive threads on 8 tokens of one piece (128 bytes in a
// row of shared memory), piece ch of a pair at slot 4 * ((ch / 2) % 2) + 2 * (ch % 2) + ch / 4.
__device__ __forceinline__ void load_x(char* stage, const u16* __restrict__ x, int ldx, int M,
                                       int K, int chunk) {
  constexpr int COPIES = 8 * RIA_U * RIA_NTOK;
  const int k0 = RIA_KC * chunk;
#pragma unroll
  for (int i = 0; i < (COPIES + RIA_THREADS - 1) / RIA_THREADS; ++i) {
    const int id = threadIdx.x + i * RIA_THREADS;
    if (COPIES % RIA_THREADS == 0 || id < COPIES) {
      const int tok8 = id & 7, rest = id >> 3;
      const int n8 = rest % RIA_NT, ch = rest / RIA_NT;
      const int c7 = ch & 7;
      const int slot = (ch & ~7) + 4 * ((c7 >> 1) & 1) + 2 * (c7 & 1) + (c7 >> 2);
      const int token = 8 * n8 + tok8, col = k0 + 8 * ch;
      const bool ok = token < M && col < K;
      cp_async16(stage + slot * RIA_LBO + n8 * 128 + tok8 * 16,
                 ok ? x + (long long)token * ldx + col : x, ok ? 16 : 0);
    }
  }
}

// One lane's raw weight of one 64-row tile and pair of k-steps: 16 bytes of rows g and
// g + 8 and cuSPARSELt's metadata words of both k-tiles.
struct Raw {
  uint4 lo, hi;
  u32 m0, m1;
};

__device__ __forceinline__ Raw load_raw(const uint4* __restrict__ vals, const u32* __restrict__ meta,
                                        int N, int K, int tile64, int q, int g, int t, int p) {
  Raw r;
  const int row = tile64 * 64 + 16 * q + g;
  const long long row_q = K >> 4;  // 16-byte pieces per row of values
  const int ra = min(row, N - 1), rb = min(row + 8, N - 1);
  const bool whole = 64 * p + 32 < K;  // else K % 64 == 32 and this pair has one k-tile
  const long long blk = min(tile64, (N - 1) >> 6);
  const long long w0 = 64 * (blk * (K >> 5) + 2 * p) + 16 * q + 2 * g + (t & 1);
  if (whole || t < 2) {
    r.lo = vals[ra * row_q + 4 * p + t];
    r.hi = vals[rb * row_q + 4 * p + t];
  } else {
    r.lo = uint4{0, 0, 0, 0};
    r.hi = uint4{0, 0, 0, 0};
  }
  // (0, 1) indices where there is no weight (the values there are zeros or never written):
  // past K in a one-k-tile pair, and rows past N (N % 16 == 0: rows g, g + 8 alike).
  r.m0 = row < N ? meta[w0] : 0x44444444u;
  r.m1 = whole && row < N ? meta[w0 + 64] : 0x44444444u;
  return r;
}

// The metadata word of lane quad position t (step t / 2): pair groups 2t, 2t+1 (k-tile
// word m0) and 2t+8, 2t+9 (m1): bytes t / 2 and t / 2 + 2 of each, row g in the low nibble
// and row g + 8 in the high; wgmma wants row g's four nibbles in bits 0..15, row g + 8's in
// 16..31.
__device__ __forceinline__ u32 wgmma_meta(u32 m0, u32 m1, int t) {
  u32 v;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(v) : "r"(m0), "r"(m1), "r"(0x6420 + 0x1111 * (t >> 1)));
  u32 lo = v & 0x0F0F0F0Fu, hi = (v >> 4) & 0x0F0F0F0Fu;
  lo = (lo | (lo >> 4)) & 0x00FF00FFu;
  hi = (hi | (hi >> 4)) & 0x00FF00FFu;
  lo = (lo | (lo >> 8)) & 0xFFFFu;
  hi = (hi | (hi >> 8)) & 0xFFFFu;
  return lo | (hi << 16);
}

// Lane t keeps local groups s, s+2 of its 16 bytes and takes s+4, s+6 (s = 0) or s, s+2
// (s = 1) from lane t ^ 1: returns groups (s, s+2, s+4, s+6) of the lane pair.
__device__ __forceinline__ uint4 swap_groups(const uint4& v, int t) {
  const bool s = t & 1;
  const u32 ra = __shfl_xor_sync(0xFFFFFFFFu, s ? v.x : v.y, 1);
  const u32 rb = __shfl_xor_sync(0xFFFFFFFFu, s ? v.z : v.w, 1);
  return s ? uint4{ra, rb, v.y, v.w} : uint4{v.x, v.z, ra, rb};
}

__device__ __forceinline__ void load_chunk(Raw (&buf)[RIA_R][RIA_U], const uint4* __restrict__ vals,
                                           const u32* __restrict__ meta, int N, int K, int pairs,
                                           int tile0, int q, int g, int t, int chunk) {
#pragma unroll
  for (int r = 0; r < RIA_R; ++r)
#pragma unroll
    for (int u = 0; u < RIA_U; ++u)
      buf[r][u] = load_raw(vals, meta, N, K, tile0 + r, q, g, t, min(RIA_U * chunk + u, pairs - 1));
}

// Chunk cb + i: wait for its tokens, start the copies of chunk i + S - 1 and the loads of
// chunk i + 1's weight into `nxt`, then multiply the weight in `cur`.
__device__ __forceinline__ void chunk_step(float (&acc)[RIA_R][RIA_NACC], Raw (&cur)[RIA_R][RIA_U],
                                           Raw (&nxt)[RIA_R][RIA_U], char* smem, u32 smem0,
                                           const u16* __restrict__ x, int ldx,
                                           const uint4* __restrict__ vals,
                                           const u32* __restrict__ meta, int M, int N, int K,
                                           int pairs, int tile0, int q, int g, int t, int cb,
                                           int ce, int i) {
  const int n = ce - cb;
  cp_async_wait<RIA_S - 2>();  // chunk i has landed (this thread's copies) ...
  fence_proxy_async();
  __syncthreads();  // ... everyone's, and stage (i - 1) % S is free again
  if (i + RIA_S - 1 < n)
    load_x(smem + (i + RIA_S - 1) % RIA_S * RIA_STAGE_BYTES, x, ldx, M, K, cb + i + RIA_S - 1);
  cp_async_commit();
  load_chunk(nxt, vals, meta, N, K, pairs, tile0, q, g, t, min(cb + i + 1, ce - 1));
#if RIA_PF
  // More bytes in flight than the registers hold: lane t asks L2 for the t-th quarter of
  // rows g and g + 8 of chunk i + RIA_PF (one 128-byte line serves several lanes).
  if (i + RIA_PF < n) {
    const long long off = (long long)RIA_KC * (cb + i + RIA_PF) + 16 * RIA_U * t;
#pragma unroll
    for (int r = 0; r < RIA_R; ++r) {
      const int row = (tile0 + r) * 64 + 16 * q + g;
      const char* base = (const char*)vals + off;
      asm volatile("prefetch.global.L2 [%0];" ::"l"(base + (long long)min(row, N - 1) * K));
      asm volatile("prefetch.global.L2 [%0];" ::"l"(base + (long long)min(row + 8, N - 1) * K));
    }
  }
#endif
  u32 a[RIA_R][RIA_U][2][4], e[RIA_R][RIA_U];
#pragma unroll
  for (int r = 0; r < RIA_R; ++r)
#pragma unroll
    for (int u = 0; u < RIA_U; ++u) {
      const uint4 lo = swap_groups(cur[r][u].lo, t), hi = swap_groups(cur[r][u].hi, t);
      a[r][u][0][0] = lo.x, a[r][u][0][1] = hi.x, a[r][u][0][2] = lo.y, a[r][u][0][3] = hi.y;
      a[r][u][1][0] = lo.z, a[r][u][1][1] = hi.z, a[r][u][1][2] = lo.w, a[r][u][1][3] = hi.w;
      e[r][u] = wgmma_meta(cur[r][u].m0, cur[r][u].m1, t);
    }
  const u32 stage = smem0 + (u32)(i % RIA_S * RIA_STAGE_BYTES);
  const int c = cb + i;
#pragma unroll
  for (int r = 0; r < RIA_R; ++r) fence_acc(acc[r]);
  wgmma_fence();
#pragma unroll
  for (int u = 0; u < RIA_U; ++u) {
    if (RIA_U * c + u < pairs) {
      const u64 d0 = b_desc(stage + (8 * u) * RIA_LBO);
      const u64 d1 = b_desc(stage + (8 * u + 4) * RIA_LBO);
#pragma unroll
      for (int r = 0; r < RIA_R; ++r) {
        wgmma_sp<0>(acc[r], a[r][u][0], d0, e[r][u]);
        wgmma_sp<1>(acc[r], a[r][u][1], d1, e[r][u]);
      }
    }
  }
  wgmma_commit();
  wgmma_wait_all();
#pragma unroll
  for (int r = 0; r < RIA_R; ++r) fence_acc(acc[r]);
}

extern "C" __global__ void RIA_CLUSTER __launch_bounds__(RIA_THREADS, 1)
    ria_mma_sp24(const u16* __restrict__ x, int ldx, const uint4* __restrict__ vals,
                 const u32* __restrict__ meta, const void* order, const u16* __restrict__ bias,
                 int has_bias, u16* __restrict__ y, int ldy, int M, int N, int K, int tiles,
                 int pairs, const float* x_scale, const float* w_scale) {
  extern __shared__ uint4 smem_words[];  // 16-byte aligned
  char* smem = (char*)smem_words;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wg = warp >> 2, q = warp & 3;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * RIA_ROWS;
  const int tile0 = blockIdx.x * RIA_R * RIA_WG + wg * RIA_R;  // this warpgroup's 64-row tiles
  const int chunks = (pairs + RIA_U - 1) / RIA_U;
  const int cb = (int)((long long)chunks * blockIdx.y / RIA_SK);
  const int ce = (int)((long long)chunks * (blockIdx.y + 1) / RIA_SK);
  const int n = ce - cb;
  const u32 smem0 = smem_addr(smem);

  float acc[RIA_R][RIA_NACC];
#pragma unroll
  for (int r = 0; r < RIA_R; ++r)
#pragma unroll
    for (int i = 0; i < RIA_NACC; ++i) acc[r][i] = 0.f;

#pragma unroll
  for (int s = 0; s < RIA_S - 1; ++s) {
    if (s < n) load_x(smem + s * RIA_STAGE_BYTES, x, ldx, M, K, cb + s);
    cp_async_commit();  // empty groups too: the wait below counts groups
  }
  // Two register buffers take turns (chunk i in one, i + 1 loading into the other): a copy
  // from the loading buffer at the end of each chunk would wait for its loads to land.
  Raw buf0[RIA_R][RIA_U], buf1[RIA_R][RIA_U];
  load_chunk(buf0, vals, meta, N, K, pairs, tile0, q, g, t, cb);
  int i = 0;
  for (; i + 1 < n; i += 2) {
    chunk_step(acc, buf0, buf1, smem, smem0, x, ldx, vals, meta, M, N, K, pairs, tile0, q, g, t,
               cb, ce, i);
    chunk_step(acc, buf1, buf0, smem, smem0, x, ldx, vals, meta, M, N, K, pairs, tile0, q, g, t,
               cb, ce, i + 1);
  }
  if (i < n)
    chunk_step(acc, buf0, buf1, smem, smem0, x, ldx, vals, meta, M, N, K, pairs, tile0, q, g, t,
               cb, ce, i);
  cp_async_wait<0>();
  __syncthreads();  // every stage is read: the partial sums reuse the memory

  // Accumulator fragment (per warp as mma.sp's, per token tile j): acc[4j + c] is row
  // 16q + g + 8 * (c / 2) of the tile, token 8j + 2t + c % 2. Stored as part[token][row].
  float* part = (float*)smem;
#pragma unroll
  for (int r = 0; r < RIA_R; ++r)
#pragma unroll
    for (int j = 0; j < RIA_NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int row = 64 * (wg * RIA_R + r) + 16 * q + g + 8 * (c >> 1);
        part[(8 * j + 2 * t + (c & 1)) * RIA_PITCH + row] = acc[r][4 * j + c];
      }
#if RIA_SK > 1
  cluster_sync();
#else
  __syncthreads();
#endif
  // Block b of the cluster adds 4 rows x 1 token at a time over the cluster's blocks in
  // rank order, and writes them with the bias.
  constexpr int Q4 = RIA_ROWS / 4;
  for (int idx = threadIdx.x + RIA_THREADS * blockIdx.y; idx < RIA_NTOK * Q4;
       idx += RIA_THREADS * RIA_SK) {
    const int token = idx / Q4, r4 = idx % Q4;
    const float* src = part + token * RIA_PITCH + 4 * r4;
#if RIA_SK > 1
    float4 s = cluster_load4(src, 0);
#pragma unroll
    for (int b = 1; b < RIA_SK; ++b) {
      const float4 v = cluster_load4(src, b);
      s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
    }
#else
    const float4 s = *reinterpret_cast<const float4*>(src);
#endif
    const int row = row0 + 4 * r4;
    if (token < M) {
      const float sv[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
      for (int e4 = 0; e4 < 4; ++e4)
        if (row + e4 < N) {
          float v = sv[e4];
          if (has_bias) v += to_f32(bias[row + e4]);
          y[(long long)token * ldy + row + e4] = from_f32(v);
        }
    }
  }
#if RIA_SK > 1
  cluster_sync();  // no block leaves while another still reads its shared memory
#endif
}
