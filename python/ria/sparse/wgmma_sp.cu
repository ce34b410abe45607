// y = x @ W^T (+ bias) on Hopper: a warp-specialised streaming kernel, for decode (one block
// of up to 64 tokens, the weight streamed once) and, with blocks of up to 256 tokens over the
// grid's third dimension, prefill.
// One producer warp fills RIA_S shared-memory stages with the bulk-copy engine (TMA); the
// consumer warpgroups run wgmma.mma_async.sp m64nNk32 with BOTH operands read from shared
// memory through matrix descriptors. W is read in place from cuSPARSELt's compressed buffer
// (values row-major (N, K/2), then the metadata in cuSPARSELt's tiled order:
// format.cslt_nibble_index), one weight copy.
//
// Plan. A block owns RIA_ROWS = 64 * RIA_R * RIA_WG rows (consumer warpgroup w: 64-row tiles
// w * RIA_R .. + RIA_R - 1), tokens blockIdx.z * RIA_NTOK .. + RIA_NTOK - 1 (RIA_NTOK = 8 *
// RIA_NT; one token block at decode) and, with RIA_SK > 1, one of the RIA_SK blocks of a cluster that
// split the input columns; their fp32 partial sums are added through distributed shared memory
// in a fixed order (deterministic, no atomics). A stage holds RIA_U pairs of k-tiles (64 * U
// input columns):
// - values: U / 2 boxes of RIA_ROWS rows x 128 bytes (64 compressed columns = 4 k-tiles),
//   copied by a 2-D tensor map with the 128-byte swizzle: the canonical K-major layout wgmma
//   reads (8-row atoms of 1024 bytes, the 16-byte chunk c of row r at c ^ (r % 8));
// - tokens: U boxes of 8 * RIA_NT tokens x 128 bytes (64 columns), same swizzle, zero-filled
//   past M and K by the copy engine;
// - metadata: per 64-row tile, the 2U k-tiles' 64-word blocks (contiguous in cuSPARSELt's
//   order), one 1-D bulk copy each.
// Per stage a consumer lane reads one 8-byte metadata pair per tile and k-tile pair and
// converts it to wgmma's register image (meta_image), then its warpgroup issues 2U wgmma per
// 64-row tile (A descriptor: the values atom + 32 bytes per k-tile; B: the tokens box + 64
// bytes per k-tile), commits, waits and releases the stage to the producer (mbarrier pair
// full/empty per stage). The producer runs up to RIA_S stages ahead: up to S x stage bytes in
// flight per SM, which an earlier form of this kernel (the weight loaded from HBM straight into
// wgmma's A registers, one chunk ahead) could not keep: it ran at 0.9-2.0 TB/s, this one at
// 1.7-2.9 (benches/results/decode_kernels_h200_wgmma.json).
//
// Metadata image (16-bit types, k32; the layout the register-fed form was tested with, and the
// tests' `_meta_image` check against format.cslt_nibble_index): with sparsity selector s, lanes 2s and 2s + 1 of each quad supply it; lane
// 2s + j holds the nibbles of groups 4j .. 4j + 3 of the k-tile for row g (bits 0..15, group
// 4j + i at bit 4i) and row g + 8 (bits 16..31). cuSPARSELt's word 2g + b of a 16-row tile holds
// groups 2b, 4 + 2b (bytes 0, 1) and 2b + 1, 5 + 2b (bytes 2, 3), row g in the low nibble of
// each byte and row g + 8 in the high. So lane 2s + j takes bytes (0, 2) of words 2g and 2g + 1
// (j = 0) or bytes (1, 3) (j = 1) of k-tile 2p + s; one register then serves both k-tiles of
// pair p (selectors 0 and 1).
//
// Token multicast (RIA_MC = 2): the two blocks of a pair of row blocks with the same input
// columns form a cluster with their K-split partners (RIA_MC x RIA_SK blocks); each copies half
// of every stage's tokens boxes and the copy engine writes them into both blocks' shared memory
// (same offsets, each block's own `full` barrier), halving the tokens' traffic from L2 (at M = 64
// and 64-row blocks it exceeds the weight's). A stage is then refilled only when the consumers
// of both blocks released it: each consumer warp arrives on the `empty` barrier of both.
//
// RIA_E4M3: e4m3 tokens (quantized per token before: the launch is programmatic, so the
// producer copies the first stage's weight before it waits for that kernel, every other
// thread waits first) and cuSPARSELt's e4m3 buffer, wgmma.sp m64nNk64 .e4m3
// (Hopper's FP8 tensor-core path; its warp-level mma.sp is emulated, see mma_sp.cu). The byte
// geometry is the same: a k-tile is 64 columns, 32 bytes of a row's kept values and 64 of a
// token's, so the boxes and copy coordinates (the host describes both tensors to the copy
// engine as 2-byte elements) do not change; the metadata doubles (128 words per 64-row tile and
// k-tile, cuSPARSELt's e4m3 order, format.cslt_nibble_index(e4m3=True)) and every lane of a
// quad supplies it with selector 0: lane (g, t) of warp q holds row 16q + g + 8 (t % 2),
// groups 8 (t / 2) .. + 7 of the k-tile, a nibble each in order (CUTLASS's ELayout_64x64,
// the PTX ISA's m16n8k64 8-bit figure), i.e. byte 2 (t / 2) + t % 2 of the tile's words
// 4g .. 4g + 3 of warp q's 32 (meta_image_e4m3). The fp32 sums are scaled by the token's and
// the row's power-of-two scales before the bias. Run on an H100 (2026-12-06): the layouts
// are right; the FP8 tensor cores sum with fewer bits than fp32 (up to 7.1e-3 of the largest
// output at K = 4096, as cuSPARSELt's fp8 GEMM), more so the more k-tiles a block sums.
//
// Compile-time settings (prepended by mma_sp.py with the wrapper `wgmma_ss` from
// mma_sp.wgmma_wrapper): RIA_F16, RIA_R, RIA_WG, RIA_U (even), RIA_S, RIA_SK, RIA_MC, RIA_NT,
// RIA_NACC = 4 * RIA_NT and RIA_E4M3.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

struct __align__(64) TmaMap {
  u64 opaque[16];
};

#define RIA_THREADS (128 * RIA_WG + 32)  // consumer warpgroups, then the producer warp
#define RIA_ROWS (64 * RIA_R * RIA_WG)
#define RIA_NTOK (8 * RIA_NT)
#ifndef RIA_E4M3
#define RIA_E4M3 0
#endif
#define RIA_KT (2 * RIA_U)                     // k-tiles (32 columns; e4m3 64) per stage
#define RIA_A_BOX (RIA_ROWS * 128)             // one values box: 4 k-tiles
#define RIA_X_BOX (RIA_NTOK * 128)             // one tokens box: 2 k-tiles
#define RIA_META_KT (RIA_E4M3 ? 512 : 256)     // metadata bytes of a 64-row tile per k-tile
#define RIA_META_TILE (RIA_KT * RIA_META_KT)   // metadata of one 64-row tile per stage
#define RIA_EW (RIA_E4M3 ? RIA_KT : RIA_U)     // metadata registers per tile and stage
#define RIA_A_BYTES (RIA_U / 2 * RIA_A_BOX)
#define RIA_X_BYTES (RIA_U * RIA_X_BOX)
#define RIA_STAGE_BYTES (RIA_A_BYTES + RIA_X_BYTES + RIA_ROWS / 64 * RIA_META_TILE)
#define RIA_PITCH (RIA_ROWS + 4)  // floats per token of the partial sums (+4: no bank conflicts)
#ifndef RIA_MC
#define RIA_MC 1
#endif
#if RIA_U % 2 || RIA_S < 2 || RIA_SK < 1 || RIA_MC < 1 || RIA_SK * RIA_MC > 8 || RIA_ROWS > 256 || \
    RIA_NT > 32
#error "wgmma_sp needs an even RIA_U, RIA_S >= 2, clusters of at most 8, at most 256 rows and 256 tokens"
#endif
#define RIA_CLUSTERED (RIA_SK * RIA_MC > 1)
#if RIA_CLUSTERED
#define RIA_CLUSTER __cluster_dims__(RIA_MC, RIA_SK, 1)
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

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// As mbar_wait, ordered after the arrivals of other blocks of the cluster (the consumers of
// both blocks of a multicast pair release a stage).
__device__ __forceinline__ void mbar_wait_cluster(u32 bar, u32 parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// Arrives on the barrier at this block's offset `bar` in the cluster's block `rank`.
__device__ __forceinline__ void mbar_arrive_remote(u32 bar, int rank) {
  u32 a;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(bar), "r"(rank));
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(a) : "memory");
}

// Box (c0, c1) of the 2-D tensor map `map` into shared memory at `dst`, completing on `bar`.
__device__ __forceinline__ void tma_2d(u32 dst, const TmaMap* map, int c0, int c1, u32 bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// As tma_2d, written at the same offset into the shared memory of every block of the
// cluster in `mask` (bit = rank), each completing on its own barrier at offset `bar`.
__device__ __forceinline__ void tma_2d_multicast(u32 dst, const TmaMap* map, int c0, int c1,
                                                 u32 bar, u16 mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(bar), "h"(mask)
      : "memory");
}

// `bytes` (a multiple of 16) contiguous bytes global -> shared, completing on `bar`.
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// Under a programmatic launch (e4m3: after the token quantization, mma_sp.py) this waits for
// the kernel ahead to finish and for its writes; a no-op for a plain launch.
__device__ __forceinline__ void wait_for_prior_grid() {
#if RIA_E4M3
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// The producer's copies of stage i (k-tiles (cb + i) * RIA_KT ..) into buffer i % RIA_S, in
// two parts: the weight's (values and metadata; it arms the stage's `full` barrier for all of
// the stage's bytes) and then the tokens'.
struct StageCopies {
  const TmaMap* xmap;
  const TmaMap* wmap;
  const u32* meta;
  u32 bars, smem0;
  int cb, kt_total, row0, N, mx, tok0;

  __device__ __forceinline__ u32 full(int i) const { return bars + 8 * (i % RIA_S); }
  __device__ __forceinline__ u32 stage(int i) const {
    return smem0 + (i % RIA_S) * RIA_STAGE_BYTES;
  }
  __device__ __forceinline__ int kt0(int i) const { return (cb + i) * RIA_KT; }
  __device__ __forceinline__ int kts(int i) const { return min(RIA_KT, kt_total - kt0(i)); }

  // Whole boxes even where K ends inside the stage: the copy engine fills the columns past K
  // with zeros, so every stage runs all its wgmma (a wgmma under a branch is serialized by
  // ptxas, C7519) and the k-tiles past K add 0.
  __device__ __forceinline__ void weight(int i) const {
    const int k0 = kt0(i), n_kt = kts(i);
    // (a block past N, there to complete a multicast pair, copies only its partner's tokens)
    const int aboxes = row0 < N ? RIA_U / 2 : 0;
    const int blocks64 = (N + 63) >> 6;  // 64-row blocks of the metadata
    int tiles = 0;
#pragma unroll
    for (int r = 0; r < RIA_ROWS / 64; ++r) tiles += (row0 >> 6) + r < blocks64;
    const int meta_bytes = tiles * n_kt * RIA_META_KT;
    mbar_expect_tx(full(i), aboxes * RIA_A_BOX + RIA_X_BYTES + meta_bytes);
    for (int a = 0; a < aboxes; ++a)
      tma_2d(stage(i) + a * RIA_A_BOX, wmap, 16 * k0 + 64 * a, row0, full(i));
    for (int r = 0; r < tiles; ++r)
      bulk_copy(stage(i) + RIA_A_BYTES + RIA_X_BYTES + r * RIA_META_TILE,
                meta + RIA_META_KT / 4 * ((long long)((row0 >> 6) + r) * kt_total + k0),
                n_kt * RIA_META_KT, full(i));
  }

  __device__ __forceinline__ void tokens(int i) const {
    const int k0 = kt0(i);
#if RIA_MC > 1
    const u16 pair = (u16)(((1u << RIA_MC) - 1) << (RIA_MC * blockIdx.y));  // cluster ranks
    for (int b = mx; b < RIA_U; b += RIA_MC)
      tma_2d_multicast(stage(i) + RIA_A_BYTES + b * RIA_X_BOX, xmap, 32 * k0 + 64 * b, tok0,
                       full(i), pair);
#else
    for (int b = 0; b < RIA_U; ++b)
      tma_2d(stage(i) + RIA_A_BYTES + b * RIA_X_BOX, xmap, 32 * k0 + 64 * b, tok0, full(i));
#endif
  }
};

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

#if RIA_CLUSTERED
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

// Shared-memory matrix descriptor, K-major with the 128-byte swizzle: start address, leading
// offset 1 (unused by swizzled K-major layouts), stride 1024 bytes between 8-row atoms.
__device__ __forceinline__ u64 sw128_desc(u32 addr) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

// wgmma's metadata register for lane quad position t from cuSPARSELt's words w0 = 2g and
// w1 = 2g + 1 of one k-tile (see the header): bytes (0, 2) or (1, 3) of each, row g's nibbles
// to bits 0..15 and row g + 8's to 16..31 (tests/test_wgmma_sp.py mirrors it in Python).
__device__ __forceinline__ u32 meta_image(u32 w0, u32 w1, int t) {
  u32 v;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(v) : "r"(w0), "r"(w1), "r"(0x6420 + 0x1111 * (t & 1)));
  u32 lo = v & 0x0F0F0F0Fu, hi = (v >> 4) & 0x0F0F0F0Fu;
  lo = (lo | (lo >> 4)) & 0x00FF00FFu;
  hi = (hi | (hi >> 4)) & 0x00FF00FFu;
  lo = (lo | (lo >> 8)) & 0xFFFFu;
  hi = (hi | (hi >> 8)) & 0xFFFFu;
  return lo | (hi << 16);
}

// e4m3: wgmma's metadata register for lane quad position t from the tile's cuSPARSELt words
// 4g .. 4g + 3 of its warp (`w`): byte 2 (t / 2) + t % 2 of each (rows g | g + 8, groups
// 2j, 2j + 1 | 2j + 8, 2j + 9 of word j, the even group low), in word order.
__device__ __forceinline__ u32 meta_image_e4m3(uint4 w, int t) {
  const u32 b = 2 * (t >> 1) + (t & 1), pick = b | ((b + 4) << 4);
  u32 lo, hi, v;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(lo) : "r"(w.x), "r"(w.y), "r"(pick));
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(hi) : "r"(w.z), "r"(w.w), "r"(pick));
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(v) : "r"(lo), "r"(hi), "r"(0x5410));
  return v;
}

// Metadata register `i` of the stage (a k-tile pair for 16-bit types, a k-tile for e4m3)
// for k-tile kt, and its sparsity selector.
#define RIA_E_OF(kt) (RIA_E4M3 ? (kt) : (kt) >> 1)

// The wgmma of one stage for this warpgroup's tiles: all 2U k-tiles, without branches
// (a stage cut short by K holds zeros past it).
__device__ __forceinline__ void issue_stage(float (&acc)[RIA_R][RIA_NACC], const u32 (&e)[RIA_R][RIA_EW],
                                            u32 stage, int wg) {
#pragma unroll
  for (int p = 0; p < RIA_U; ++p) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int kt = 2 * p + h;
      const u64 db = sw128_desc(stage + RIA_A_BYTES + (kt >> 1) * RIA_X_BOX + (kt & 1) * 64);
#pragma unroll
      for (int r = 0; r < RIA_R; ++r) {
        const u32 aa = stage + (kt >> 2) * RIA_A_BOX + (wg * RIA_R + r) * 8192 + (kt & 3) * 32;
        if (h == 0 || RIA_E4M3)  // (e4m3: selector 0 only)
          wgmma_ss<0>(acc[r], sw128_desc(aa), db, e[r][RIA_E_OF(kt)]);
        else
          wgmma_ss<1>(acc[r], sw128_desc(aa), db, e[r][RIA_E_OF(kt)]);
      }
    }
  }
}

extern "C" __global__ void RIA_CLUSTER __launch_bounds__(RIA_THREADS, 1)
    ria_mma_sp24(const __grid_constant__ TmaMap xmap, const __grid_constant__ TmaMap wmap,
                 const u32* __restrict__ meta, const u16* __restrict__ bias, int has_bias,
                 u16* __restrict__ y, int ldy, int M, int N, int K,
                 const float* __restrict__ x_scale, const float* __restrict__ w_scale) {
  extern __shared__ uint4 smem_words[];
  // Swizzled boxes need 1024-byte aligned atoms: the host asks for 1024 bytes more.
  const u32 raw0 = smem_addr(smem_words);
  const u32 smem0 = (raw0 + 1023) & ~1023u;
  char* smem = (char*)smem_words + (smem0 - raw0);
  const u32 bars = smem0 + RIA_S * RIA_STAGE_BYTES;  // full[S], then empty[S]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kt_total = K >> (RIA_E4M3 ? 6 : 5);
  const int chunks = (kt_total + RIA_KT - 1) / RIA_KT;
  const int cb = (int)((long long)chunks * blockIdx.y / RIA_SK);
  const int ce = (int)((long long)chunks * (blockIdx.y + 1) / RIA_SK);
  const int n = ce - cb;
  const int row0 = blockIdx.x * RIA_ROWS;
  const int tok0 = blockIdx.z * RIA_NTOK;
  const int mx = blockIdx.x % RIA_MC;  // this block's place in its multicast pair
  static_assert(RIA_NTOK * RIA_PITCH * 4 <= RIA_S * RIA_STAGE_BYTES, "the sums reuse the stages");
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < RIA_S; ++s) {
      mbar_init(bars + 8 * s, 1);
      mbar_init(bars + 8 * (RIA_S + s), 4 * RIA_WG * RIA_MC);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
#if RIA_MC > 1
  cluster_sync();  // the partner's barriers exist before its first copy or arrival
#else
  __syncthreads();
#endif
  const int producer = warp == 4 * RIA_WG;
  if (!producer) wait_for_prior_grid();

  float acc[RIA_R][RIA_NACC];
#pragma unroll
  for (int r = 0; r < RIA_R; ++r)
#pragma unroll
    for (int i = 0; i < RIA_NACC; ++i) acc[r][i] = 0.f;

  if (producer) {
    const StageCopies copies{&xmap, &wmap, meta, bars, smem0, cb, kt_total, row0, N, mx, tok0};
    // e4m3 (launched programmatically after the token quantization): the first stage's
    // weight, the kernel's own input, streams in while that kernel still runs, the tokens
    // after its end. (The weight of every first stage ahead, or an L2 prefetch of it, was
    // slower: the first tokens then queue behind it. H100, 2026-12-06.)
    const bool early = RIA_E4M3 && n > 0;  // stage 0's weight copied before the wait
    if (lane == 0 && early) copies.weight(0);
    __syncwarp();
    wait_for_prior_grid();
    if (lane == 0)
      for (int i = 0; i < n; ++i) {
        if (i >= RIA_S) mbar_wait_cluster(bars + 8 * (RIA_S + i % RIA_S), ((i / RIA_S) - 1) & 1);
        if (i > 0 || !early) copies.weight(i);
        copies.tokens(i);
      }
    __syncwarp();
  } else {  // consumer warpgroup wg: warp q = rows 16q .. 16q + 15 of each of its tiles
    const int wg = warp >> 2, q = warp & 3, g = lane >> 2, t = lane & 3;
    // Stage `s` is free again (its wgmma done), here and with multicast in the partner.
    const auto release = [&](int s) {
      __syncwarp();
#if RIA_MC > 1
      if (lane < RIA_MC) mbar_arrive_remote(bars + 8 * (RIA_S + s), lane + RIA_MC * blockIdx.y);
#else
      if (lane == 0) mbar_arrive(bars + 8 * (RIA_S + s));
#endif
    };
    // Stage i's metadata registers, from its shared memory (a default past K).
    const auto load_meta = [&](int i, u32 (&e)[RIA_R][RIA_EW]) {
      const char* mstage = smem + (i % RIA_S) * RIA_STAGE_BYTES + RIA_A_BYTES + RIA_X_BYTES;
      const int kts = min(RIA_KT, kt_total - (cb + i) * RIA_KT);
#pragma unroll
      for (int r = 0; r < RIA_R; ++r) {
        const int tile = wg * RIA_R + r;
#if RIA_E4M3
#pragma unroll
        for (int kt = 0; kt < RIA_KT; ++kt) {
          const uint4 w = kt < kts ? *reinterpret_cast<const uint4*>(
                                         mstage + tile * RIA_META_TILE + kt * 512 + (32 * q + 4 * g) * 4)
                                   : uint4{0x44444444u, 0x44444444u, 0x44444444u, 0x44444444u};
          e[r][kt] = meta_image_e4m3(w, t);
        }
#else
#pragma unroll
        for (int p = 0; p < RIA_U; ++p) {
          const int kt = 2 * p + (t >> 1);
          const uint2 w = kt < kts ? *reinterpret_cast<const uint2*>(
                                         mstage + tile * RIA_META_TILE + kt * 256 + (16 * q + 2 * g) * 4)
                                   : uint2{0x44444444u, 0x44444444u};
          e[r][p] = meta_image(w.x, w.y, t);
        }
#endif
      }
    };
    // Waits for stage i's copies, then issues its wgmma as one group.
    const auto issue = [&](int i, u32 (&e)[RIA_R][RIA_EW]) {
      mbar_wait(bars + 8 * (i % RIA_S), (i / RIA_S) & 1);
      load_meta(i, e);
      wgmma_fence();
      issue_stage(acc, e, smem0 + (i % RIA_S) * RIA_STAGE_BYTES, wg);
      wgmma_commit();
    };
    for (int i = 0; i < n; ++i) {
      u32 e[RIA_R][RIA_EW];
#pragma unroll
      for (int r = 0; r < RIA_R; ++r) fence_acc(acc[r]);
      issue(i, e);
      wgmma_wait_all();
#pragma unroll
      for (int r = 0; r < RIA_R; ++r) fence_acc(acc[r]);
      release(i % RIA_S);
    }
  }
  __syncthreads();  // every stage is read and every copy landed: the sums reuse the memory

  // Accumulator fragment (per warp as mma.sp's, per token tile j): acc[4j + c] is row
  // 16q + g + 8 * (c / 2) of the tile, token 8j + 2t + c % 2. Stored as part[token][row].
  float* part = (float*)smem;
  if (warp < 4 * RIA_WG) {
    const int wg = warp >> 2, q = warp & 3, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < RIA_R; ++r)
#pragma unroll
      for (int j = 0; j < RIA_NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int row = 64 * (wg * RIA_R + r) + 16 * q + g + 8 * (c >> 1);
          part[(8 * j + 2 * t + (c & 1)) * RIA_PITCH + row] = acc[r][4 * j + c];
        }
  }
#if RIA_CLUSTERED
  cluster_sync();
#else
  __syncthreads();
#endif
  // Block b of the cluster adds 4 rows x 1 token at a time over the cluster's blocks in
  // rank order, and writes them with the bias.
  constexpr int Q4 = RIA_ROWS / 4;
  for (int idx = threadIdx.x + RIA_THREADS * blockIdx.y; idx < RIA_NTOK * Q4;
       idx += RIA_THREADS * RIA_SK) {
    const int token = idx / Q4, r4 = idx % Q4, tok = tok0 + token;
    const float* src = part + token * RIA_PITCH + 4 * r4;
#if RIA_SK > 1
    float4 sum = cluster_load4(src, mx);
#pragma unroll
    for (int b = 1; b < RIA_SK; ++b) {  // (the K-split partners: cluster ranks mx + MC * b)
      const float4 v = cluster_load4(src, mx + RIA_MC * b);
      sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
#else
    const float4 sum = *reinterpret_cast<const float4*>(src);
#endif
    const int row = row0 + 4 * r4;
    if (tok < M) {
      const float sv[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
      for (int e4 = 0; e4 < 4; ++e4)
        if (row + e4 < N) {
          float v = sv[e4];
#if RIA_E4M3
          v = v * x_scale[tok] * w_scale[row + e4];  // powers of two: exact
#endif
          if (has_bias) v += to_f32(bias[row + e4]);
          y[(long long)tok * ldy + row + e4] = from_f32(v);
        }
    }
  }
#if RIA_CLUSTERED
  cluster_sync();  // no block leaves while another still reads or signals its shared memory
#endif
}
