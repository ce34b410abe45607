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
// f16 mma.sp; the fp32 sums are then scaled by the token's and the row's scales). No
// headers: NVRTC needs no CUDA include path.

// With one token tile, the batch's B fragments are loaded together with A (their latency
// then overlaps the weight's); with more, each k-step loads its own (measured faster: the
// registers go to more warps in flight).
#ifndef RIA_E4M3
#define RIA_E4M3 0
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

// B fragments of one k-step for the RIA_NT token tiles: lane (g, t) holds token 8j + g at
// columns k0 + 8i + {0, 1}, i = 0..3, with k0 = 32s + 2t (through `order` if given).
__device__ __forceinline__ void load_b(u32 (&b)[RIA_NT][4], const x_t* __restrict__ x, int ldx,
                                       const index_t* __restrict__ order, int g, int M, int K,
                                       int k0) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int k = k0 + 8 * i;
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
        a[r][2 * u] = widen(vals[(tile * steps + 2 * p) * 32 + lane]);
        a[r][2 * u + 1] = widen(vals[(tile * steps + 2 * p + 1) * 32 + lane]);
        e[r][u] = meta[(tile * pairs + p) * 32 + lane];
      }
    }
    // B of k-step q of the batch (q = 2u + h): pair min(p0 + u, pe - 1), half h.
#if RIA_PREFETCH_B
    u32 b[2 * RIA_U][RIA_NT][4];  // the whole batch's B, loaded together with A
#pragma unroll
    for (int q = 0; q < 2 * RIA_U; ++q)
      load_b(b[q], x, ldx, order, g, M, K, 64 * min(p0 + q / 2, pe - 1) + 32 * (q % 2) + 2 * t);
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
        load_b(bq, x, ldx, order, g, M, K, 64 * (p0 + u) + 32 * h + 2 * t);
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
