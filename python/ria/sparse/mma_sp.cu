// y = x[:, order] @ W^T (+ bias) for M <= 64 tokens on sparse tensor cores (mma.sp m16n8k32).
//
// W is the sparse operand A, packed by ria.sparse.format.pack_mma24 into the exact register
// fragments of mma.sp: per lane and k-step one 16-byte load of values, per lane and pair of
// k-steps one 4-byte metadata word (sparsity selector 0 for the even step, 1 for the odd).
// The tokens are the operand B (N = 8 per mma, zero-padded), read straight from x (through
// `order` when RIA_ORDER: a fused gather, no extra pass over memory).
//
// A block owns RIA_R row tiles of 16 rows; its RIA_W warps split the input columns in whole
// pairs of k-steps, each warp issuing all weight loads of RIA_U pairs before their mma.sp
// (the weight streams from HBM once, so loads in flight set the speed), then the warps'
// partial sums are added through shared memory and written with the bias in the output
// dtype. Measured on an H200 (benches/decode_kernels.py): splitting rows over warps of a
// block (x shared in L1) and double-buffering B were slower than this.
//
// Compile-time settings (prepended by mma_sp.py): RIA_F16 (1: fp16, 0: bf16 output, bias
// and, without RIA_E4M3, operands), RIA_R, RIA_W, RIA_U, RIA_NT (8-token tiles,
// ceil(M / 8)), RIA_ORDER (0: none, 32 / 64: index bits), RIA_E4M3 (1: weight values and
// tokens in e4m3, half the bytes per fragment, widened exactly to fp16 in registers for an
// f16 mma.sp; the fp32 sums are then scaled by the token's and the row's scales), RIA_CSLT
// (1: W is read in place from cuSPARSELt's compressed buffer instead, see below). No
// headers: NVRTC needs no CUDA include path.
//
// RIA_CSLT: `vals` is the buffer's values region, row-major (N, K/2), and `meta` its
// metadata in cuSPARSELt's tiled order (format.cslt_nibble_index: per 64-row block and
// 32-column k-tile, 64 words; 16-row tile q of the block owns words 16q..16q+15, word
// 2 * (r % 8) + j holding rows r % 8 and r % 8 + 8 of groups 2j, 2j + 4, 2j + 1, 2j + 5,
// one byte each, row r % 8 in the low nibble). mma.sp may visit the 2:4 groups of a pair of
// k-steps (64 columns, 16 groups) in any order if B and the metadata follow it, so lane
// (g, t) takes the contiguous groups 4t..4t+3 of rows g and g + 8: one 16-byte load per
// row, k-step h using groups 4t + 2h (as the fragment's group t) and 4t + 2h + 1 (as
// group t + 4). The metadata of fragment group 4 * (t % 2) + q of step t / 2 is then that of
// group t + 4q of the pair: bytes 2 * (t % 2) and 2 * (t % 2) + 1 of word 2g + t / 2 in both
// k-tiles, whose nibbles are unshuffled in registers into the fragment's word (row g low,
// row g + 8 high). B reads the token columns of the same groups (b_col).

// With one token tile, the batch's B fragments are loaded together with A (their latency
// then overlaps the weight's); with more, each k-step loads its own (measured faster: the
// registers go to more warps in flight).
#ifndef RIA_E4M3
#define RIA_E4M3 0
#endif
#ifndef RIA_CSLT
#define RIA_CSLT 0
#endif
#if RIA_CSLT && RIA_E4M3
#error "cuSPARSELt's buffer holds fp16/bf16 values: RIA_CSLT excludes RIA_E4M3"
#endif

#define RIA_PREFETCH_B (RIA_NT == 1 && RIA_U <= 4)

typedef unsigned int u32;
typedef unsigned short u16;

#if RIA_ORDER == 64
typedef long long index_t;
#else
typedef int index_t;
#endif

#if RIA_F16 || RIA_E4M3
#define RIA_AB "f16"
#else
#define RIA_AB "bf16"
#endif

#if RIA_E4M3
typedef unsigned char x_t;  // one e4m3 token value
typedef uint2 frag_t;       // a lane's 8 kept e4m3 values of one k-step
#else
typedef u16 x_t;
typedef uint4 frag_t;  // a lane's 8 kept fp16/bf16 values of one k-step
#endif

// The device primitives: tests/mma_sp_host.h stands in for them (RIA_HOST_EMULATION) to run
// this kernel's indexing on a CPU against the PTX fragment rules.
#ifndef RIA_HOST_EMULATION
__device__ __forceinline__ float to_f32(u16 v) {
#if RIA_F16
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
#else
  float f;  // bf16 is the high half of an fp32
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"(((u32)v) << 16));
  return f;
#endif
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

template <int SEL>
__device__ __forceinline__ void mma_sp(float* d, const uint4& a, const u32* b, u32 e) {
  asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." RIA_AB "." RIA_AB
      ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
        "r"(e), "n"(SEL));
}

// Two e4m3 (low byte first) as an f16x2 (low half first): exact, fp16 holds every e4m3.
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u16 v) {
  u32 r;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(v));
  return r;
}
#endif

#if RIA_E4M3
__device__ __forceinline__ uint4 widen(const uint2& v) {
  uint4 r;
  r.x = e4m3x2_to_f16x2((u16)(v.x & 0xFFFF));
  r.y = e4m3x2_to_f16x2((u16)(v.x >> 16));
  r.z = e4m3x2_to_f16x2((u16)(v.y & 0xFFFF));
  r.w = e4m3x2_to_f16x2((u16)(v.y >> 16));
  return r;
}
#else
__device__ __forceinline__ uint4 widen(const uint4& v) { return v; }
#endif

// Input column of B register i (of 4) of lane quad position t in k-step h of pair p (the
// register holds it and the next column): the fragment's rows 2t + 8i (+ 1) in the group
// order the weight is read in.
__device__ __forceinline__ int b_col(int p, int h, int t, int i) {
#if RIA_CSLT  // fragment group t / 2 + 2i is pair group 4 * (t / 2 + 2 * (i % 2)) + 2h + i / 2
  return 64 * p + 16 * (t >> 1) + 32 * (i & 1) + 4 * (i >> 1) + 8 * h + 2 * (t & 1);
#else
  return 64 * p + 32 * h + 2 * t + 8 * i;
#endif
}

// B fragments of k-step h of pair p for the RIA_NT token tiles: lane (g, t) holds token
// 8j + g at columns b_col(p, h, t, i) + {0, 1}, i = 0..3 (through `order` if given).
__device__ __forceinline__ void load_b(u32 (&b)[RIA_NT][4], const x_t* __restrict__ x, int ldx,
                                       const index_t* __restrict__ order, int g, int t, int M,
                                       int K, int p, int h) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int k = b_col(p, h, t, i);
    const bool in_k = k < K;  // K % 4 == 0 and k even: k + 1 < K too
#if RIA_ORDER
    const long long c0 = in_k ? (long long)order[k] : 0;
    const long long c1 = in_k ? (long long)order[k + 1] : 0;
#endif
#pragma unroll
    for (int j = 0; j < RIA_NT; ++j) {
      const int token = 8 * j + g;
      u32 v = 0;
      if (token < M && in_k) {
        const x_t* row = x + (long long)token * ldx;
#if RIA_E4M3
        v = e4m3x2_to_f16x2(*reinterpret_cast<const u16*>(row + k));  // no order: see mma_sp.py
#elif RIA_ORDER
        v = (u32)row[c0] | ((u32)row[c1] << 16);
#else
        v = *reinterpret_cast<const u32*>(row + k);
#endif
      }
      b[j][i] = v;
    }
  }
}

#if RIA_CSLT
// The fragment's metadata word of lane quad position t from cuSPARSELt's words `lo` and `hi`
// (same word index in the pair's two k-tiles): their bytes 2 * (t % 2), +1 hold groups t,
// t + 4 (lo) and t + 8, t + 12 (hi) with row g in the low nibble and row g + 8 in the high;
// mma.sp wants row g's four nibbles in bits 0..15 and row g + 8's in 16..31.
__device__ __forceinline__ u32 cslt_meta(u32 lo, u32 hi, int t) {
  u32 v = (t & 1) ? (lo >> 16) | (hi & 0xFFFF0000u) : (lo & 0xFFFFu) | (hi << 16);
  u32 s = (v ^ (v >> 4)) & 0x00F000F0u;  // swap nibbles 1 <-> 2 and 5 <-> 6
  v ^= s ^ (s << 4);
  s = (v ^ (v >> 8)) & 0x0000FF00u;  // swap bytes 1 <-> 2
  return v ^ s ^ (s << 8);
}
#endif

extern "C" __global__ void __launch_bounds__(RIA_W * 32)
    ria_mma_sp24(const x_t* __restrict__ x, int ldx, const frag_t* __restrict__ vals,
                 const u32* __restrict__ meta, const index_t* __restrict__ order,
                 const u16* __restrict__ bias, int has_bias, u16* __restrict__ y, int ldy,
                 int M, int N, int K, int tiles, int pairs, const float* __restrict__ x_scale,
                 const float* __restrict__ w_scale) {
#ifdef RIA_HOST_EMULATION
  float* partial = ria_host_shared();
#else
  extern __shared__ float partial[];
#endif
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile0 = blockIdx.x * RIA_R;
  const int steps = 2 * pairs;
  const int pb = (int)(((long long)pairs * warp) / RIA_W);
  const int pe = (int)(((long long)pairs * (warp + 1)) / RIA_W);

  float acc[RIA_R][RIA_NT][4];
#pragma unroll
  for (int r = 0; r < RIA_R; ++r)
#pragma unroll
    for (int j = 0; j < RIA_NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][j][c] = 0.f;

  for (int p0 = pb; p0 < pe; p0 += RIA_U) {
    uint4 a[RIA_R][2 * RIA_U];
    u32 e[RIA_R][RIA_U];
    // All loads first, unconditionally (clamped indices re-read valid data; their products
    // are skipped or land in rows that are never written).
#pragma unroll
    for (int r = 0; r < RIA_R; ++r) {
      const long long tile = min(tile0 + r, tiles - 1);
#pragma unroll
      for (int u = 0; u < RIA_U; ++u) {
        const int p = min(p0 + u, pe - 1);
#if RIA_CSLT
        // K % 64 == 32: the last pair has one k-tile; its other half reads as zero weights
        // with valid (0, 1) indices.
        const bool whole = 64 * p + 32 < K;
        const long long row_q = K >> 4;  // 16-byte chunks per row of values
        const long long v0 = (tile * 16 + g) * row_q + 4 * p + t;
        uint4 lo = {0, 0, 0, 0}, hi = {0, 0, 0, 0};
        if (whole || t < 2) {
          lo = vals[v0];
          hi = vals[v0 + 8 * row_q];
        }
        a[r][2 * u] = uint4{lo.x, hi.x, lo.y, hi.y};
        a[r][2 * u + 1] = uint4{lo.z, hi.z, lo.w, hi.w};
        const long long w0 =
            16 * ((tile >> 2) * 4 * (long long)(K >> 5) + (tile & 3)) + 128 * p + 2 * g + (t >> 1);
        e[r][u] = cslt_meta(meta[w0], whole ? meta[w0 + 64] : 0x44444444u, t);
#else
        a[r][2 * u] = widen(vals[(tile * steps + 2 * p) * 32 + lane]);
        a[r][2 * u + 1] = widen(vals[(tile * steps + 2 * p + 1) * 32 + lane]);
        e[r][u] = meta[(tile * pairs + p) * 32 + lane];
#endif
      }
    }
    // B of k-step q of the batch (q = 2u + h): pair min(p0 + u, pe - 1), half h.
#if RIA_PREFETCH_B
    u32 b[2 * RIA_U][RIA_NT][4];  // the whole batch's B, loaded together with A
#pragma unroll
    for (int q = 0; q < 2 * RIA_U; ++q)
      load_b(b[q], x, ldx, order, g, t, M, K, min(p0 + q / 2, pe - 1), q % 2);
#endif
#pragma unroll
    for (int q = 0; q < 2 * RIA_U; ++q) {
      const int u = q / 2, h = q % 2;
#if RIA_PREFETCH_B
      const u32(&bq)[RIA_NT][4] = b[q];
#endif
      if (p0 + u < pe) {
#if !RIA_PREFETCH_B
        u32 bq[RIA_NT][4];
        load_b(bq, x, ldx, order, g, t, M, K, p0 + u, h);
#endif
#pragma unroll
        for (int r = 0; r < RIA_R; ++r)
#pragma unroll
          for (int j = 0; j < RIA_NT; ++j) {
            if (h == 0)
              mma_sp<0>(acc[r][j], a[r][2 * u], bq[j], e[r][u]);
            else
              mma_sp<1>(acc[r][j], a[r][2 * u + 1], bq[j], e[r][u]);
          }
      }
    }
  }

  // Add the warps' partial sums: partial[warp][entry][lane], entry = (r, j, c).
  constexpr int ENTRIES = RIA_R * RIA_NT * 4;
#pragma unroll
  for (int r = 0; r < RIA_R; ++r)
#pragma unroll
    for (int j = 0; j < RIA_NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        partial[(warp * ENTRIES + (r * RIA_NT + j) * 4 + c) * 32 + lane] = acc[r][j][c];
  __syncthreads();
  for (int idx = threadIdx.x; idx < ENTRIES * 32; idx += RIA_W * 32) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < RIA_W; ++w) s += partial[w * ENTRIES * 32 + idx];
    const int entry = idx >> 5, ln = idx & 31;
    const int c = entry & 3, j = (entry >> 2) % RIA_NT, r = (entry >> 2) / RIA_NT;
    // Accumulator fragment: c0, c1 at row g, tokens 2t, 2t+1; c2, c3 at row g + 8.
    const int row = (tile0 + r) * 16 + (ln >> 2) + 8 * (c >> 1);
    const int token = 8 * j + 2 * (ln & 3) + (c & 1);
    if (row < N && token < M) {
#if RIA_E4M3
      s = s * x_scale[token] * w_scale[row];  // powers of two: exact
#endif
      if (has_bias) s += to_f32(bias[row]);
      y[(long long)token * ldy + row] = from_f32(s);
    }
  }
}
