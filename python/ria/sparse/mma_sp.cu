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
//
// RIA_CSLT with RIA_E4M3: cuSPARSELt's e4m3 buffer, the same values row-major (one byte
// each) and another metadata order (format.cslt_nibble_index(e4m3=True): 128 words per
// 64-row block and 64-column k-chunk; 16-row tile q owns words 32q..32q+31, word
// 4 * (r % 8) + j holding groups 2j, 2j + 1 (rows r % 8, r % 8 + 8) in bytes 0, 1 and
// 2j + 8, 2j + 9 in bytes 2, 3, the even group in the low nibble). The unit of work is four
// k-steps (128 columns, 32 groups, RIA_KSTEPS), so that a lane's share of a row is again
// one 16-byte load: lane t takes groups 8t..8t+7, k-step h using 8t + 2h (as fragment
// group t) and 8t + 2h + 1 (as group t + 4). The metadata of fragment group
// 4 * (t % 2) + q of step 2v + t / 2 is then that of unit group t + 4v + 8q: word
// 4g + t / 2 + 2v of both k-chunks (q = 0, 1: the first; 2, 3: the second), bytes 0, 1
// (q even) or 2, 3 (q odd), nibble t % 2 (cslt_meta_e4m3). Measured on an H200 with 8-byte
// loads per pair instead: 1.2-1.8x slower than the same kernel on its own fragments.
// Needs K % 64 == 0.

// RIA_K64 (with RIA_E4M3; the fragments or cuSPARSELt's e4m3 buffer): the e4m3 operands go
// to mma.sp m16n8k64 .e4m3 as they are, one mma per 64 columns instead of two f16 mma.sp
// after 4 + 4 * RIA_NT widening cvt per 32 (a quarter-rate instruction: at M = 32-64 the
// widening, not the weight's bytes, sets the speed). ptxas 13 makes it one QMMA.SP.16864 on
// sm_89 and sm_120 only; on sm_90 and sm_100 it emulates it with two HMMA.SP.16832, F2FP
// conversions and lane shuffles (more work than the widened form), so mma_sp.py offers it on
// the former. The weight is read exactly as above;
// only which 2:4 group fills which of the k64 fragment's 16 group slots changes (mma.sp
// takes the groups in any order when B and the metadata follow): slot S = 8 * hi + 2 * t + b
// (the fragment: lane quad position t holds slots 2t, 2t + 1 of rows g and g + 8 in
// registers 0 and 1, slots 8 + 2t, 9 + 2t in 2 and 3) is group k64_group(...) below, B's
// register i of lane t holds the 4 columns of slot 4i + t, and lane t supplies the metadata
// of row g + 8 * (t % 2), slots 8 * (t / 2) .. + 7, a nibble each (selector 0: all four
// lanes of a quad; CUTLASS's ELayout_64x64, the PTX ISA's sparse m16n8k64 8-bit figures).
// Not yet run on a GPU: the host emulation (tests/mma_sp_host.h) follows the PTX ISA's
// text for A and B and CUTLASS's metadata layout (on an sm_90 GPU ptxas's emulation of the
// instruction checks the same; tests/test_fp8.py).

// With one token tile, the batch's B fragments are loaded together with A (their latency
// then overlaps the weight's); with more, each k-step loads its own (measured faster: the
// registers go to more warps in flight).
#ifndef RIA_E4M3
#define RIA_E4M3 0
#endif
#ifndef RIA_CSLT
#define RIA_CSLT 0
#endif
#if RIA_TILED && RIA_E4M3
#error "RIA_TILED has no e4m3 form"
#endif
// k-steps per unit of a warp's work: a pair, or four on cuSPARSELt's e4m3 buffer (above)
#define RIA_KSTEPS (RIA_CSLT && RIA_E4M3 ? 4 : 2)
#ifndef RIA_K64
#define RIA_K64 0
#endif
#if RIA_K64 && (!RIA_E4M3 || RIA_TILED || RIA_ORDER)
#error "RIA_K64 is the plain kernel's e4m3 form (no input order)"
#endif
// mma.sp per unit and token tile: one per k-step, or with RIA_K64 one per 64 columns
#define RIA_QSTEPS (RIA_K64 ? RIA_KSTEPS / 2 : RIA_KSTEPS)
#ifndef RIA_TILED
#define RIA_TILED 0
#endif
#ifndef RIA_SK
#define RIA_SK 1
#endif
#if RIA_TILED && (!RIA_CSLT || RIA_ORDER)
#error "RIA_TILED reads cuSPARSELt's fp16/bf16 buffer, without an input order"
#endif

#ifndef RIA_LDH
#define RIA_LDH 0
#endif

#ifndef RIA_PREFETCH_B
#define RIA_PREFETCH_B (RIA_NT == 1 && RIA_U <= 4)
#endif

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

// Shared-memory primitives of the RIA_TILED kernel (shared addresses from generic pointers).
__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

// 16 bytes global -> shared, asynchronously; only the first `bytes` (0 or 16) are read, the
// rest is zero-filled.
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

// Four 8x8 b16 matrices: lane 8i + r gives the address of row r of matrix i; lane (g, t)
// receives in register i the elements 2t, 2t + 1 of row g of matrix i.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row))
               : "memory");
}

#if RIA_SK > 1
// All threads of the cluster (the RIA_SK blocks splitting one row block's input columns).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;\n" ::
                   : "memory");
}

// The float at `local`'s offset in the shared memory of the cluster's block `rank`.
__device__ __forceinline__ float cluster_load(const float* local, int rank) {
  u32 a;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(a) : "r"(smem_addr(local)), "r"(rank));
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(a) : "memory");
  return v;
}
#endif

// Loads of the weight stream (read once per call): RIA_LDH 0 plain; 1 not kept in L1
// (x keeps it); 2 also fetching the whole 256-byte L2 block around the address from HBM
// (the rest of it is the next pairs' data); 3 the L2 hint alone.
#if RIA_LDH == 1
#define RIA_LD_HINT ".nc.L1::no_allocate"
#elif RIA_LDH == 2
#define RIA_LD_HINT ".nc.L1::no_allocate.L2::256B"
#elif RIA_LDH == 3
#define RIA_LD_HINT ".nc.L2::256B"
#endif
#ifdef RIA_LD_HINT
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm("ld.global" RIA_LD_HINT ".v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_stream(const uint2* p) {
  uint2 v;
  asm("ld.global" RIA_LD_HINT ".v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ u32 ld_stream(const u32* p) {
  u32 v;
  asm("ld.global" RIA_LD_HINT ".u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}
#else
template <typename T>
__device__ __forceinline__ T ld_stream(const T* p) {
  return *p;
}
#endif

// Under a programmatic launch (launch.py) the kernel may start while the kernel ahead of it
// (the token quantization, for e4m3) still runs: this waits for that kernel to finish and
// for its writes (a no-op for a plain launch and below sm_90).
__device__ __forceinline__ void wait_for_prior_grid() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Two e4m3 (low byte first) as an f16x2 (low half first): exact, fp16 holds every e4m3.
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u16 v) {
  u32 r;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(v));
  return r;
}

// Bytes of {b, a} (a: 0..3, b: 4..7) picked by the selector's nibbles, low byte first.
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 selector) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
  return r;
}

// d += A B over 64 columns: A's 16 kept e4m3 per lane in `a`, B's 16 in `b`, the metadata
// of the lane's row and 8 groups in `e` (selector 0).
__device__ __forceinline__ void mma_sp64(float* d, const uint4& a, const u32* b, u32 e) {
  asm("mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.f32.e4m3.e4m3.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
        "r"(e));
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

// Input column of B register i (of 4) of lane quad position t in k-step h of unit p (the
// register holds it and the next column): the fragment's rows 2t + 8i (+ 1) in the group
// order the weight is read in.
__device__ __forceinline__ int b_col(int p, int h, int t, int i) {
#if RIA_CSLT && RIA_E4M3  // fragment group t / 2 + 2i is unit group 8 * (t / 2 + 2 * (i % 2)) + 2h + i / 2
  return 128 * p + 32 * (t >> 1) + 64 * (i & 1) + 4 * (i >> 1) + 8 * h + 2 * (t & 1);
#elif RIA_CSLT  // fragment group t / 2 + 2i is pair group 4 * (t / 2 + 2 * (i % 2)) + 2h + i / 2
  return 64 * p + 16 * (t >> 1) + 32 * (i & 1) + 4 * (i >> 1) + 8 * h + 2 * (t & 1);
#else
  return 64 * p + 32 * h + 2 * t + 8 * i;
#endif
}

// B fragments of k-step h of unit p for the RIA_NT token tiles: lane (g, t) holds token
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

#if RIA_K64
// The group (of the unit's, 4 columns each) that fills slot S of k64 step v's fragment: on
// the fragments (a unit: one step) slot 2t + b of each half is group t + 4b of that k-step
// (what lane t holds of it: bytes 0, 1 and 4, 5 of its 8 for row g, 2, 3 and 6, 7 for g + 8);
// on cuSPARSELt's e4m3 buffer (a unit: 128 columns, two steps) slot 2t + b is group
// 8t + 4v + b and 8 + 2t + b is 8t + 4v + 2 + b (lane t's 16 bytes a row hold 8t .. 8t + 7).
__device__ __forceinline__ int k64_group(int v, int slot) {
  const int hi = slot >> 3, t = (slot & 7) >> 1, b = slot & 1;
#if RIA_CSLT
  return 8 * t + 4 * v + 2 * hi + b;
#else
  return 8 * hi + t + 4 * b;
#endif
}

// B of k64 step v of unit p for the RIA_NT token tiles: lane (g, t) holds in register i the
// 4 columns of slot 4i + t of token 8j + g (4 bytes: a group is 4 adjacent columns).
__device__ __forceinline__ void load_b64(u32 (&b)[RIA_NT][4], const x_t* __restrict__ x, int ldx,
                                         int g, int t, int M, int K, int p, int v) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int k = 64 * RIA_KSTEPS / 2 * p + 4 * k64_group(v, 4 * i + t);
    const bool in_k = k < K;  // K % 4 == 0: a group is in or out whole
#pragma unroll
    for (int j = 0; j < RIA_NT; ++j) {
      const int token = 8 * j + g;
      b[j][i] = token < M && in_k ? *reinterpret_cast<const u32*>(x + (long long)token * ldx + k)
                                  : 0u;
    }
  }
}

#if !RIA_CSLT
// A of a pair from its two k-steps' 8-byte fragments (s0, s1): rows g | g + 8 of slots 2t,
// 2t + 1 (groups t, t + 4 of step 0), then of slots 8 + 2t, 9 + 2t (the same of step 1).
__device__ __forceinline__ uint4 k64_a(uint2 s0, uint2 s1) {
  return uint4{prmt(s0.x, s0.y, 0x5410), prmt(s0.x, s0.y, 0x7632), prmt(s1.x, s1.y, 0x5410),
               prmt(s1.x, s1.y, 0x7632)};
}

// Nibbles 0..3 of `v` to nibbles 0, 2, 4, 6.
__device__ __forceinline__ u32 spread_nibbles(u32 v) {
  v = (v | (v << 8)) & 0x00FF00FFu;
  return (v | (v << 4)) & 0x0F0F0F0Fu;
}

// Lane t's k64 metadata from the pair's words of lanes 4g + 2h, 4g + 2h + 1 (h = t / 2: k-step
// h's groups 0..3 and 4..7, row g in bits 0..15, g + 8 in 16..31): row g + 8 * (t % 2)'s
// nibbles with slot 2i + b (group i + 4b) at nibble 2i + b.
__device__ __forceinline__ u32 k64_meta(uint2 w, int t) {
  const int s = 16 * (t & 1);
  return spread_nibbles((w.x >> s) & 0xFFFFu) | (spread_nibbles((w.y >> s) & 0xFFFFu) << 4);
}
#endif
#endif

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

// The same for cuSPARSELt's e4m3 order: the same word of a unit's two k-chunks, `a` (its
// bytes 0..3: rows g, g + 8 of fragment group q = 0, then of q = 1) and `b` (q = 2, 3),
// lane t's nibble at 4 * (t % 2) of each byte.
__device__ __forceinline__ u32 cslt_meta_e4m3(u32 a, u32 b, int t) {
  const int s = 4 * (t & 1);
  a = (a >> s) & 0x0F0F0F0Fu;
  b = (b >> s) & 0x0F0F0F0Fu;
  a |= a >> 12;  // bytes 0, 1: rows g, g + 8 with q = 0 low, q = 1 high
  b |= b >> 12;  // q = 2, 3
  return (a & 0xFFu) | ((b & 0xFFu) << 8) | ((a & 0xFF00u) << 8) | ((b & 0xFF00u) << 16);
}
#endif

#if !RIA_TILED
#ifdef RIA_MINB  // registers capped so that RIA_MINB blocks fit an SM
#define RIA_BOUNDS __launch_bounds__(RIA_W * 32, RIA_MINB)
#else
#define RIA_BOUNDS __launch_bounds__(RIA_W * 32)
#endif
extern "C" __global__ void RIA_BOUNDS
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
  const int units = (pairs + RIA_KSTEPS / 2 - 1) / (RIA_KSTEPS / 2);
  const int pb = (int)(((long long)units * warp) / RIA_W);
  const int pe = (int)(((long long)units * (warp + 1)) / RIA_W);

#if RIA_E4M3
  // e4m3 launches are programmatic (mma_sp.py): the block is resident while the token
  // quantization ahead of it finishes. (Issuing the first weight loads before this wait
  // raised registers and was slower on one shape; an L2 prefetch of the block's rows was no
  // faster: H200, 2026-12-04.)
  wait_for_prior_grid();
#endif

  float acc[RIA_R][RIA_NT][4];
#pragma unroll
  for (int r = 0; r < RIA_R; ++r)
#pragma unroll
    for (int j = 0; j < RIA_NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][j][c] = 0.f;

  for (int p0 = pb; p0 < pe; p0 += RIA_U) {
    uint4 a[RIA_R][RIA_QSTEPS * RIA_U];
    u32 e[RIA_R][RIA_KSTEPS / 2 * RIA_U];
    // All loads first, unconditionally (clamped indices re-read valid data; their products
    // are skipped or land in rows that are never written).
#pragma unroll
    for (int r = 0; r < RIA_R; ++r) {
      const long long tile = min(tile0 + r, tiles - 1);
#pragma unroll
      for (int u = 0; u < RIA_U; ++u) {
        const int p = min(p0 + u, pe - 1);
#if RIA_CSLT && RIA_E4M3
        // K % 128 == 64: the last unit has one k-chunk; its other half reads as zero weights
        // with valid (0, 1) indices.
        const bool whole = 128 * p + 64 < K;
        const long long row_q = K >> 5;  // 16-byte pieces (8 groups' values) per row
        const long long v0 = (tile * 16 + g) * row_q + 4 * p + t;
        const uint4* const vals16 = reinterpret_cast<const uint4*>(vals);
        uint4 lo = {}, hi = {};
        if (whole || t < 2) {
          lo = ld_stream(vals16 + v0);
          hi = ld_stream(vals16 + v0 + 8 * row_q);
        }
#if RIA_K64
        // k64 step v: lane t's groups 8t + 4v .. + 3 of rows g (lo) and g + 8 (hi); the
        // metadata of row g + 8 * (t % 2), slots 2i + b: bytes t % 2 and 2 + t % 2 of word
        // 4g + 2v + t / 2 of both k-chunks (groups 4v + 2h + b and 8 + 4v + 2h + b of each,
        // h = t / 2, row g in bytes 0, 2 and g + 8 in 1, 3).
        a[r][2 * u] = uint4{lo.x, hi.x, lo.y, hi.y};
        a[r][2 * u + 1] = uint4{lo.z, hi.z, lo.w, hi.w};
        const long long w0 = 128 * ((tile >> 2) * (long long)(K >> 6) + 2 * p) +
                             32 * (tile & 3) + 4 * g + (t >> 1);
#pragma unroll
        for (int v = 0; v < 2; ++v)
          e[r][2 * u + v] = prmt(ld_stream(meta + w0 + 2 * v),
                                 whole ? ld_stream(meta + w0 + 128 + 2 * v) : 0x44444444u,
                                 0x6420u + 0x1111u * (t & 1));
#else
#pragma unroll
        for (int half = 0; half < 2; ++half) {  // k-steps 2 * half, 2 * half + 1
          const uint4 wl = widen(half ? uint2{lo.z, lo.w} : uint2{lo.x, lo.y});
          const uint4 wh = widen(half ? uint2{hi.z, hi.w} : uint2{hi.x, hi.y});
          a[r][4 * u + 2 * half] = uint4{wl.x, wh.x, wl.y, wh.y};
          a[r][4 * u + 2 * half + 1] = uint4{wl.z, wh.z, wl.w, wh.w};
        }
        const long long w0 = 128 * ((tile >> 2) * (long long)(K >> 6) + 2 * p) +
                             32 * (tile & 3) + 4 * g + (t >> 1);
#pragma unroll
        for (int v = 0; v < 2; ++v)  // k-steps 2v, 2v + 1
          e[r][2 * u + v] = cslt_meta_e4m3(ld_stream(meta + w0 + 2 * v),
                                           whole ? ld_stream(meta + w0 + 128 + 2 * v) : 0x44444444u, t);
#endif
#elif RIA_CSLT
        // K % 64 == 32: the last pair has one k-tile; its other half reads as zero weights
        // with valid (0, 1) indices.
        const bool whole = 64 * p + 32 < K;
        const long long row_q = K >> 4;  // fragments (4 groups' values) per row
        const long long v0 = (tile * 16 + g) * row_q + 4 * p + t;
        frag_t lo = {}, hi = {};
        if (whole || t < 2) {
          lo = ld_stream(vals + v0);
          hi = ld_stream(vals + v0 + 8 * row_q);
        }
        const uint4 wl = widen(lo), wh = widen(hi);
        a[r][2 * u] = uint4{wl.x, wh.x, wl.y, wh.y};
        a[r][2 * u + 1] = uint4{wl.z, wh.z, wl.w, wh.w};
        const long long w0 =
            16 * ((tile >> 2) * 4 * (long long)(K >> 5) + (tile & 3)) + 128 * p + 2 * g + (t >> 1);
        e[r][u] = cslt_meta(ld_stream(meta + w0), whole ? ld_stream(meta + w0 + 64) : 0x44444444u, t);
#elif RIA_K64
        const long long f0 = (tile * steps + 2 * p) * 32 + lane;
        a[r][u] = k64_a(ld_stream(vals + f0), ld_stream(vals + f0 + 32));
        e[r][u] = k64_meta(
            ld_stream(reinterpret_cast<const uint2*>(meta + (tile * pairs + p) * 32 + 4 * g + 2 * (t >> 1))),
            t);
#else
        a[r][2 * u] = widen(ld_stream(vals + (tile * steps + 2 * p) * 32 + lane));
        a[r][2 * u + 1] = widen(ld_stream(vals + (tile * steps + 2 * p + 1) * 32 + lane));
        e[r][u] = ld_stream(meta + (tile * pairs + p) * 32 + lane);
#endif
      }
    }
    // B of mma step q of the batch (q = RIA_QSTEPS * u + h): unit min(p0 + u, pe - 1), step h.
#if RIA_K64
#define RIA_LOAD_B(b, p, h) load_b64(b, x, ldx, g, t, M, K, p, h)
#else
#define RIA_LOAD_B(b, p, h) load_b(b, x, ldx, order, g, t, M, K, p, h)
#endif
#if RIA_PREFETCH_B
    u32 b[RIA_QSTEPS * RIA_U][RIA_NT][4];  // the whole batch's B, loaded together with A
#pragma unroll
    for (int q = 0; q < RIA_QSTEPS * RIA_U; ++q)
      RIA_LOAD_B(b[q], min(p0 + q / RIA_QSTEPS, pe - 1), q % RIA_QSTEPS);
#endif
#pragma unroll
    for (int q = 0; q < RIA_QSTEPS * RIA_U; ++q) {
      const int u = q / RIA_QSTEPS, h = q % RIA_QSTEPS;
#if RIA_PREFETCH_B
      const u32(&bq)[RIA_NT][4] = b[q];
#endif
      if (p0 + u < pe) {
#if !RIA_PREFETCH_B
        u32 bq[RIA_NT][4];
        RIA_LOAD_B(bq, p0 + u, h);
#endif
#pragma unroll
        for (int r = 0; r < RIA_R; ++r)
#pragma unroll
          for (int j = 0; j < RIA_NT; ++j) {
#if RIA_K64
            mma_sp64(acc[r][j], a[r][q], bq[j], e[r][q]);
#else
            const u32 eq = e[r][q / 2];  // one metadata word per two k-steps
            if (h % 2 == 0)
              mma_sp<0>(acc[r][j], a[r][q], bq[j], eq);
            else
              mma_sp<1>(acc[r][j], a[r][q], bq[j], eq);
#endif
          }
      }
    }
#undef RIA_LOAD_B
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
#endif  // !RIA_TILED

#if RIA_TILED
// RIA_TILED: the kernel for M = 9..64 tokens on cuSPARSELt's buffer, where the plain kernel
// re-reads all of x per 16 rows. A block owns RIA_ROWS = 16 * RIA_R * RIA_W rows (whole
// 64-row blocks of the buffer's metadata) and, with RIA_SK > 1, 1/RIA_SK of the input
// columns: the RIA_SK blocks of a thread-block cluster split them, and add their partial sums
// through distributed shared memory in a fixed order (deterministic, no atomics). Stages
// of RIA_KC = 64 * RIA_U input columns (the rows' values, the tokens' columns and the
// metadata words) are copied into shared memory by cp.async, RIA_S of them in flight, so a
// weight stage is read from HBM once and the tokens once per block. Warp w multiplies row
// tiles w * RIA_R .. + RIA_R - 1 of the block with every token tile: one B fragment
// (ldmatrix) feeds RIA_R mma.sp. Here the 2:4 groups are taken in their natural order (A
// and B by ldmatrix from row-major copies), so each lane rebuilds its metadata word from
// two of cuSPARSELt's words (tiled_meta), and sparsity selector 0 serves every k-step.
// Measured on an H200 (benches/results/decode_kernels_h200_tiled.json): 1.4-1.7x faster than
// the plain kernel at M = 64 and on gate/up at M = 16-32, slower on q/k/v/o and down at
// M = 16-32, and still 0.5-0.6x of dense cuBLAS at M = 64. Without its mma.sp, or without
// its per-stage copies, it takes nearly as long (32-33 of 38 us, 4096x4096, M = 64, 4 warps
// per SM): the time goes to each warp's issue stream (ldmatrix, metadata, addressing, the
// barrier per stage, the cluster's 4-byte remote loads), not to HBM or the tensor cores.
#define RIA_ROWS (16 * RIA_R * RIA_W)
#define RIA_KC (64 * RIA_U)
#define RIA_APITCH (RIA_KC + 16)      // bytes per row of values in a stage (+16: no bank conflicts)
#define RIA_XPITCH (2 * RIA_KC + 16)  // bytes per token in a stage
#define RIA_A_BYTES (RIA_ROWS * RIA_APITCH)
#define RIA_X_BYTES (8 * RIA_NT * RIA_XPITCH)
#define RIA_E_BYTES (RIA_ROWS / 64 * 2 * RIA_U * 256)  // 64 words per 64 rows and 32 columns
#define RIA_STAGE_BYTES (RIA_A_BYTES + RIA_X_BYTES + RIA_E_BYTES)
#if RIA_ROWS % 64
#error "RIA_TILED needs whole 64-row blocks: 16 * RIA_R * RIA_W % 64 == 0"
#endif
#if RIA_S < 2 || (32 * RIA_W) % (8 * RIA_U)
#error "RIA_TILED needs RIA_S >= 2 stages and 8 * RIA_U to divide the block's threads"
#endif
#if RIA_SK > 1 && !defined(RIA_HOST_EMULATION)
#define RIA_CLUSTER __cluster_dims__(1, RIA_SK, 1)
#else
#define RIA_CLUSTER
#endif

// mma.sp's metadata word (groups 0..3 of rows g | g + 8 for t % 2 == 0, groups 4..7 for
// t % 2 == 1) from cuSPARSELt's words w0 = 2g (bytes: groups 0, 4, 1, 5) and w1 = 2g + 1
// (groups 2, 6, 3, 7) of one 32-column k-tile; each byte holds row g in its low nibble.
__device__ __forceinline__ u32 tiled_meta(u32 w0, u32 w1, int t) {
  const int sh = 8 * (t & 1);
  const u32 v = ((w0 >> sh) & 0xFFu) | (((w0 >> (sh + 16)) & 0xFFu) << 8) |
                (((w1 >> sh) & 0xFFu) << 16) | (((w1 >> (sh + 16)) & 0xFFu) << 24);
  u32 lo = v & 0x0F0F0F0Fu, hi = (v >> 4) & 0x0F0F0F0Fu;
  lo = (lo | (lo >> 4)) & 0x00FF00FFu;
  hi = (hi | (hi >> 4)) & 0x00FF00FFu;
  lo = (lo | (lo >> 8)) & 0xFFFFu;
  hi = (hi | (hi >> 8)) & 0xFFFFu;
  return lo | (hi << 16);
}

// Issue the copies of k-chunk `chunk` (columns RIA_KC * chunk ..) into `stage`, 16 bytes
// each, zero-filled past N, K and M. Each thread copies the same 16-byte column of rows
// (tokens, metadata words) a fixed step apart in every stage: no divisions per copy.
__device__ __forceinline__ void load_stage(char* stage, const char* x, int ldx, const char* vals,
                                           const u32* meta, int M, int N, int K, int row0,
                                           int chunk) {
  constexpr int T = RIA_W * 32;
  const int k0 = RIA_KC * chunk;
  {  // values: rows x (RIA_KC / 16) copies of 8 values (16 columns)
    constexpr int Q = RIA_KC / 16, STEP = T / Q;
    const int q = threadIdx.x % Q, r0 = threadIdx.x / Q;
    const bool k_ok = k0 + 16 * (q + 1) <= K;
    const char* src = vals + (long long)(row0 + r0) * K + k0 + 16 * q;
#pragma unroll
    for (int i = 0; i < RIA_ROWS / STEP; ++i) {
      const bool ok = k_ok && row0 + r0 + i * STEP < N;
      cp_async16(stage + (r0 + i * STEP) * RIA_APITCH + 16 * q,
                 ok ? src + (long long)i * STEP * K : vals, ok ? 16 : 0);
    }
  }
  {  // tokens: 8 * RIA_NT rows x (RIA_KC / 8) copies of 8 columns
    constexpr int Q = RIA_KC / 8, STEP = T / Q, ITER = (8 * RIA_NT + STEP - 1) / STEP;
    const int q = threadIdx.x % Q, j0 = threadIdx.x / Q;
    const bool k_ok = k0 + 8 * (q + 1) <= K;
    const char* src = x + 2 * ((long long)j0 * ldx + k0 + 8 * q);
#pragma unroll
    for (int i = 0; i < ITER; ++i) {
      const int j = j0 + i * STEP;
      if (j < 8 * RIA_NT) {
        const bool ok = k_ok && j < M;
        cp_async16(stage + RIA_A_BYTES + j * RIA_XPITCH + 16 * q,
                   ok ? src + 2LL * i * STEP * ldx : x, ok ? 16 : 0);
      }
    }
  }
  {  // metadata: per 64-row block, the stage's 2 * RIA_U k-tiles (256 bytes each) in a row
    constexpr int PER_BLOCK = 32 * RIA_U, TOTAL = RIA_ROWS / 64 * PER_BLOCK;
#pragma unroll
    for (int i = 0; i < (TOTAL + T - 1) / T; ++i) {
      const int c = threadIdx.x + i * T;
      if (c < TOTAL) {
        const int b = c / PER_BLOCK, q = c % PER_BLOCK;
        const int kt = 2 * RIA_U * chunk + q / 16;  // 16 copies per k-tile
        const bool ok = row0 + 64 * b < N && kt < K / 32;
        const u32* src =
            meta + 64 * ((long long)(row0 / 64 + b) * (K / 32) + 2 * RIA_U * chunk) + 4 * q;
        cp_async16(stage + RIA_A_BYTES + RIA_X_BYTES + 256 * (2 * RIA_U * b) + 16 * q,
                   ok ? src : meta, ok ? 16 : 0);
      }
    }
  }
}

extern "C" __global__ void RIA_CLUSTER __launch_bounds__(RIA_W * 32)
    ria_mma_sp24(const x_t* __restrict__ x, int ldx, const frag_t* __restrict__ vals,
                 const u32* __restrict__ meta, const index_t* __restrict__ order,
                 const u16* __restrict__ bias, int has_bias, u16* __restrict__ y, int ldy,
                 int M, int N, int K, int tiles, int pairs, const float* __restrict__ x_scale,
                 const float* __restrict__ w_scale) {
#ifdef RIA_HOST_EMULATION
  char* smem = (char*)ria_host_shared();
#else
  extern __shared__ uint4 smem_words[];  // 16-byte aligned
  char* smem = (char*)smem_words;
#endif
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * RIA_ROWS;
  const int chunks = (K + RIA_KC - 1) / RIA_KC;
  const int cb = (int)((long long)chunks * blockIdx.y / RIA_SK);
  const int ce = (int)((long long)chunks * (blockIdx.y + 1) / RIA_SK);
  const char* xb = (const char*)x;
  const char* vb = (const char*)vals;

  float acc[RIA_R][RIA_NT][4];
#pragma unroll
  for (int r = 0; r < RIA_R; ++r)
#pragma unroll
    for (int j = 0; j < RIA_NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][j][c] = 0.f;

#pragma unroll
  // Iteration i takes chunk cb + (i + rot) % n: row blocks start at different columns, so
  // the GPU's loads at any moment spread over the weight instead of one column stripe.
  const int n = ce - cb;
  const int rot = n > 0 ? (int)((7LL * blockIdx.x) % n) : 0;
#pragma unroll
  for (int s = 0; s < RIA_S - 1; ++s) {
    if (s < n)
      load_stage(smem + s * RIA_STAGE_BYTES, xb, ldx, vb, meta, M, N, K, row0,
                 cb + (s + rot) % n);
    cp_async_commit();  // empty groups too: the wait below counts groups
  }
  for (int i = 0; i < n; ++i) {
    cp_async_wait<RIA_S - 2>();  // chunk i has landed (this thread's copies) ...
    __syncthreads();             // ... everyone's, and stage (i - 1) % S is free again
    if (i + RIA_S - 1 < n)
      load_stage(smem + (i + RIA_S - 1) % RIA_S * RIA_STAGE_BYTES, xb, ldx, vb, meta, M, N, K,
                 row0, cb + (i + RIA_S - 1 + rot) % n);
    cp_async_commit();
    const char* st = smem + i % RIA_S * RIA_STAGE_BYTES;
    const int c = cb + (i + rot) % n;
    const int steps = min(2 * RIA_U, K / 32 - 2 * RIA_U * c);
#pragma unroll
    for (int s = 0; s < 2 * RIA_U; ++s) {
      if (s < steps) {
        uint4 a[RIA_R];
        u32 e[RIA_R];
#pragma unroll
        for (int r = 0; r < RIA_R; ++r) {
          const int rt = warp * RIA_R + r;  // row tile in the block
          // Matrices: rows 0-7 | 8-15 of values 0-7, then of values 8-15 of the k-step.
          const int row = 16 * rt + (lane & 7) + 8 * ((lane >> 3) & 1);
          u32 f[4];
          ldmatrix_x4(f, st + row * RIA_APITCH + 32 * s + 16 * (lane >> 4));
          a[r] = uint4{f[0], f[1], f[2], f[3]};
          const u32* ew = (const u32*)(st + RIA_A_BYTES + RIA_X_BYTES) +
                          64 * (2 * RIA_U * (rt >> 2) + s) + 16 * (rt & 3) + 2 * g;
          e[r] = tiled_meta(ew[0], ew[1], t);
        }
#pragma unroll
        for (int j = 0; j < RIA_NT; ++j) {
          u32 b[4];  // matrix i: tokens 8j..8j+7, columns 8i..8i+7 of the k-step
          ldmatrix_x4(b, st + RIA_A_BYTES + (8 * j + (lane & 7)) * RIA_XPITCH + 64 * s +
                             16 * (lane >> 3));
#pragma unroll
          for (int r = 0; r < RIA_R; ++r) mma_sp<0>(acc[r][j], a[r], b, e[r]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Accumulator fragment: c0, c1 at row g, tokens 2t, 2t+1; c2, c3 at row g + 8.
#if RIA_SK > 1
  // Each block's sums into its shared memory (entry (rt, j, c), lane); then block q of
  // the cluster adds entries q, q + RIA_SK, ... over blocks 0..RIA_SK-1 in that order.
  constexpr int ENTRIES = RIA_R * RIA_W * RIA_NT * 4;
  float* part = (float*)smem;
  __syncthreads();  // every warp is done reading the stages
#pragma unroll
  for (int r = 0; r < RIA_R; ++r)
#pragma unroll
    for (int j = 0; j < RIA_NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        part[(((warp * RIA_R + r) * RIA_NT + j) * 4 + c) * 32 + lane] = acc[r][j][c];
  cluster_sync();
  for (int idx = threadIdx.x + RIA_W * 32 * blockIdx.y; idx < ENTRIES * 32;
       idx += RIA_W * 32 * RIA_SK) {
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < RIA_SK; ++q) s += cluster_load(part + idx, q);
    const int ln = idx & 31, entry = idx >> 5;
    const int c = entry & 3, j = (entry >> 2) % RIA_NT, rt = (entry >> 2) / RIA_NT;
    const int row = row0 + 16 * rt + (ln >> 2) + 8 * (c >> 1);
    const int token = 8 * j + 2 * (ln & 3) + (c & 1);
    if (row < N && token < M) {
      if (has_bias) s += to_f32(bias[row]);
      y[(long long)token * ldy + row] = from_f32(s);
    }
  }
  cluster_sync();  // no block leaves while another still reads its shared memory
#else
#pragma unroll
  for (int r = 0; r < RIA_R; ++r)
#pragma unroll
    for (int j = 0; j < RIA_NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int row = row0 + 16 * (warp * RIA_R + r) + g + 8 * (c >> 1);
        const int token = 8 * j + 2 * t + (c & 1);
        if (row < N && token < M) {
          float s = acc[r][j][c];
          if (has_bias) s += to_f32(bias[row]);
          y[(long long)token * ldy + row] = from_f32(s);
        }
      }
#endif
}
#endif  // RIA_TILED
