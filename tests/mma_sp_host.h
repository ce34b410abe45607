// Runs python/ria/sparse/mma_sp.cu on a CPU (tests/test_mma_sp.py compiles it with g++), in
// every mode (packed fragments, RIA_E4M3, RIA_CSLT: vals.bin then holds the row-major
// values and meta.bin the tiled metadata of cuSPARSELt's buffer):
// one std::thread per CUDA thread, a barrier per block for __syncthreads, and mma.sp
// emulated per warp from the PTX ISA's fragment tables (sparse m16n8k32, .f16/.bf16; with
// RIA_E4M3 the e4m3 operands are widened to fp16 as cvt.rn.f16x2.e4m3x2 does), so
// the kernel's indexing, batching and reduction are checked without a GPU.
//
// Usage: the including file defines the kernel's RIA_* settings, includes this header,
// then the kernel source. The program reads x.bin, vals.bin, meta.bin, order.bin, bias.bin
// from the directory argv[1] and writes y.bin there; argv[2..] are M N K tiles pairs
// has_bias ldx grid.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <thread>
#include <vector>

#define RIA_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint4 {
  unsigned x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};
#ifndef RIA_E4M3
#define RIA_E4M3 0
#endif
#if RIA_E4M3  // the kernel's x_t and frag_t
typedef unsigned char ria_host_x;
typedef uint2 ria_host_frag;
#else
typedef unsigned short ria_host_x;
typedef uint4 ria_host_frag;
#endif
struct HostIndex {
  int x, y;
};
thread_local HostIndex threadIdx, blockIdx;

namespace host {
struct Warp {  // operands deposited by the 32 lanes for one warp-wide mma.sp or ldmatrix
  uint4 a[32];
  unsigned b[32][4];
  unsigned e[32];
  const char* row[32];
  std::barrier<>* sync;
};
thread_local Warp* warp;
thread_local std::barrier<>* block_sync;
thread_local float* shared;
// RIA_TILED: a thread-block cluster's barrier and every block's shared memory.
thread_local std::barrier<>* cluster_barrier;
thread_local float* const* cluster_shared;

struct Copy {  // one cp.async: lands when a wait_group lets it (as late as the PTX allows)
  char* dst;
  const char* src;
  int bytes;
};
thread_local std::vector<Copy> open_group;
thread_local std::deque<std::vector<Copy>> committed;

inline float half(unsigned short v) {
  const int sign = v >> 15, exponent = (v >> 10) & 31, mantissa = v & 1023;
  const float r = exponent == 0 ? std::ldexp((float)mantissa, -24)
                                : std::ldexp((float)(mantissa | 1024), exponent - 25);
  return sign ? -r : r;
}

inline float bfloat(unsigned short v) {
  const unsigned bits = ((unsigned)v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float element(unsigned short v) {  // an mma.sp operand
#if RIA_F16 || RIA_E4M3
  return half(v);
#else
  return bfloat(v);
#endif
}

inline unsigned short half_bits(float f) {  // round to nearest even
  const float magnitude = std::fabs(f);
  const unsigned short sign = f < 0 ? 0x8000 : 0;
  if (magnitude < std::ldexp(1.0f, -14))  // subnormal: multiples of 2^-24
    return sign | (unsigned short)std::nearbyint(magnitude * std::ldexp(1.0f, 24));
  int exponent;
  const float m = std::frexp(magnitude, &exponent);  // magnitude = m * 2^exponent
  unsigned mantissa = (unsigned)std::nearbyint((2 * m - 1) * 1024);
  int biased = exponent - 1 + 15;
  if (mantissa == 1024) mantissa = 0, ++biased;
  return sign | (unsigned short)(biased << 10) | (unsigned short)mantissa;
}

inline float e4m3(unsigned char v) {  // e4m3fn: bias 7, subnormals 2^-9 steps (no NaN here)
  const int exponent = (v >> 3) & 15, mantissa = v & 7;
  const float r = exponent == 0 ? std::ldexp((float)mantissa, -9)
                                : std::ldexp((float)(mantissa | 8), exponent - 10);
  return (v & 0x80) ? -r : r;
}
}  // namespace host

// cvt.rn.f16x2.e4m3x2: low byte to the low half.
inline unsigned e4m3x2_to_f16x2(unsigned short v) {
  return host::half_bits(host::e4m3(v & 0xFF)) | ((unsigned)host::half_bits(host::e4m3(v >> 8)) << 16);
}

inline void __syncthreads() { host::block_sync->arrive_and_wait(); }

// cp.async (16 bytes, the first `bytes` read, the rest zero-filled), deferred until a
// cp_async_wait leaves its group no longer pending: reading a stage too early reads stale
// data here too.
inline void cp_async16(void* dst, const void* src, int bytes) {
  host::open_group.push_back({(char*)dst, (const char*)src, bytes});
}
inline void cp_async_commit() {
  host::committed.push_back(std::move(host::open_group));
  host::open_group.clear();
}
template <int N>
void cp_async_wait() {
  while ((int)host::committed.size() > N) {
    for (const host::Copy& c : host::committed.front()) {
      std::memcpy(c.dst, c.src, c.bytes);
      std::memset(c.dst + c.bytes, 0, 16 - c.bytes);
    }
    host::committed.pop_front();
  }
}

// ldmatrix .x4 .b16: lane 8i + r names row r of matrix i; lane (g, t) gets 4 bytes at
// 4t of row g of matrix i in register i.
inline void ldmatrix_x4(unsigned (&r)[4], const void* row) {
  const int lane = threadIdx.x & 31;
  host::Warp& w = *host::warp;
  w.row[lane] = (const char*)row;
  w.sync->arrive_and_wait();
  for (int i = 0; i < 4; ++i) std::memcpy(&r[i], w.row[8 * i + (lane >> 2)] + 4 * (lane & 3), 4);
  w.sync->arrive_and_wait();
}

inline void cluster_sync() { host::cluster_barrier->arrive_and_wait(); }
inline float cluster_load(const float* local, int rank) {
  return host::cluster_shared[rank][local - host::shared];
}
inline float* ria_host_shared() { return host::shared; }
inline void wait_for_prior_grid() {}  // one kernel at a time on the host
inline int min(int a, int b) { return a < b ? a : b; }
template <typename T>
T ld_stream(const T* p) {  // the weight stream's loads (cache hints only on a GPU)
  return *p;
}

#if RIA_F16
inline float to_f32(unsigned short v) { return host::half(v); }
#else
inline float to_f32(unsigned short v) { return host::bfloat(v); }
#endif

inline unsigned short from_f32(float f) {  // round to nearest even
#if RIA_F16
  return host::half_bits(f);
#else
  unsigned bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return (unsigned short)(bits >> 16);
#endif
}

namespace host {
// This lane's operands of a warp-wide mma.sp, once every lane has put its own in.
inline Warp& exchange(const uint4& a, const unsigned* b, unsigned e) {
  const int lane = threadIdx.x & 31;
  Warp& w = *warp;
  w.a[lane] = a;
  for (int i = 0; i < 4; ++i) w.b[lane][i] = b[i];
  w.e[lane] = e;
  w.sync->arrive_and_wait();
  return w;
}

// d += this lane's accumulators of A B (c0, c1 at row g, columns 2t, 2t + 1; c2, c3 at
// row g + 8), then lets the warp's operands be overwritten by the next instruction.
template <int K>
void accumulate(float* d, const float (&A)[16][K], const float (&B)[K][8]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int c = 0; c < 4; ++c) {
    const int row = g + 8 * (c >> 1), col = 2 * t + (c & 1);
    float s = 0.f;
    for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
    d[c] += s;
  }
  warp->sync->arrive_and_wait();
}
}  // namespace host

// d += A B for the warp: A (16 x 32, 2:4) from every lane's 8 kept values and the metadata
// of the lanes the selector names, B (32 x 8) from every lane's 4 registers.
template <int SEL>
void mma_sp(float* d, const uint4& a, const unsigned* b, unsigned e) {
  const host::Warp& w = host::exchange(a, b, e);
  float A[16][32] = {}, B[32][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    const unsigned regs[4] = {w.a[l].x, w.a[l].y, w.a[l].z, w.a[l].w};
    for (int i = 0; i < 8; ++i) {
      const unsigned short v = (unsigned short)(regs[i / 2] >> (16 * (i % 2)));
      // PTX: a_i at row g for i in {0, 1, 4, 5}, else g + 8; compressed column
      // 2t + (i & 1) (+ 8 for i >= 4); two compressed columns per group of 4.
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int compressed = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
      const int group = compressed / 2, slot = compressed % 2;
      // Metadata: lanes 2 * SEL and 2 * SEL + 1 of the quad hold groups 0-3 and 4-7;
      // bits 0-15 row g, 16-31 row g + 8, 4 bits per group, 2 per kept value.
      const unsigned word = w.e[4 * g + 2 * SEL + group / 4];
      const int bit = (row >= 8 ? 16 : 0) + 4 * (group % 4) + 2 * slot;
      A[row][4 * group + ((word >> bit) & 3)] = host::element(v);
    }
    for (int i = 0; i < 8; ++i)  // b_i at k = 2t + (i & 1) + 8 (i / 2), column g
      B[2 * t + (i & 1) + 8 * (i / 2)][g] =
          host::element((unsigned short)(w.b[l][i / 2] >> (16 * (i % 2))));
  }
  host::accumulate(d, A, B);
}

// prmt.b32 (default mode): result byte i is byte n_i of {b, a} (a: 0..3, b: 4..7), n_i the
// selector's nibble i (its sign-replicate bit unused here).
inline unsigned prmt(unsigned a, unsigned b, unsigned selector) {
  const unsigned long long bytes = a | ((unsigned long long)b << 32);
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((bytes >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}

// d += A B for the warp, mma.sp m16n8k64 .e4m3: A (16 x 64, 2:4) and B (64 x 8) in e4m3.
// From the PTX ISA ("Matrix Fragments for sparse mma.m16n8k64 with .u8/.s8/.e4m3/.e5m2"):
// a_i (byte i % 4 of register i / 4) at row g for i in 0..3 and 8..11, else g + 8, among the
// kept values of columns 8t .. 8t + 7 (i < 8) or 32 + 8t .. (i >= 8); b_i at k = 16 (i / 4)
// + 4t + i % 4, column g (one register per 16 rows, as the ISA's four B figures split it).
// Metadata (selector 0, every lane): lane 4g + t describes row g + 8 (t % 2), columns
// 32 (t / 2) .. + 31, 4 bits per group of 4 from bit 0 (CUTLASS's ELayout_64x64 for
// sparse GMMA 64xNx64, the same figure in the ISA).
inline void mma_sp64(float* d, const uint4& a, const unsigned* b, unsigned e) {
  const host::Warp& w = host::exchange(a, b, e);
  float A[16][64] = {}, B[64][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    const unsigned regs[4] = {w.a[l].x, w.a[l].y, w.a[l].z, w.a[l].w};
    for (int i = 0; i < 16; ++i) {
      const unsigned char v = (unsigned char)(regs[i / 4] >> (8 * (i % 4)));
      const int row = ((i / 4) % 2 == 0) ? g : g + 8;
      const int compressed = 4 * t + (i % 4) + (i >= 8 ? 16 : 0);  // 2 per group of 4
      const int group = compressed / 2, slot = compressed % 2;
      const unsigned word = w.e[4 * (row % 8) + 2 * (group / 8) + (row >= 8)];
      const int bit = 4 * (group % 8) + 2 * slot;
      A[row][4 * group + ((word >> bit) & 3)] = host::e4m3(v);
    }
    for (int i = 0; i < 16; ++i)
      B[16 * (i / 4) + 4 * t + i % 4][g] = host::e4m3((unsigned char)(w.b[l][i / 4] >> (8 * (i % 4))));
  }
  host::accumulate(d, A, B);
}

#if RIA_ORDER == 64
#define RIA_HOST_INDEX long long
#else
#define RIA_HOST_INDEX int
#endif
extern "C" void ria_mma_sp24(const ria_host_x* x, int ldx, const ria_host_frag* vals,
                             const unsigned* meta, const RIA_HOST_INDEX* order,
                             const unsigned short* bias, int has_bias, unsigned short* y,
                             int ldy, int M, int N, int K, int tiles, int pairs,
                             const float* x_scale, const float* w_scale);

static std::vector<char> read_file(const char* dir, const char* name) {
  char path[4096];
  std::snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = std::fopen(path, "rb");
  if (!f) std::perror(path), std::exit(2);
  std::fseek(f, 0, SEEK_END);
  std::vector<char> data(std::ftell(f) + 16);
  std::fseek(f, 0, SEEK_SET);
  if (std::fread(data.data(), 1, data.size() - 16, f) != data.size() - 16) std::exit(2);
  std::fclose(f);
  return data;
}

int main(int argc, char** argv) {
  if (argc != 10) return 2;
  const char* dir = argv[1];
  const int M = std::atoi(argv[2]), N = std::atoi(argv[3]), K = std::atoi(argv[4]);
  const int tiles = std::atoi(argv[5]), pairs = std::atoi(argv[6]);
  const int has_bias = std::atoi(argv[7]), ldx = std::atoi(argv[8]), grid = std::atoi(argv[9]);
  const auto x = read_file(dir, "x.bin"), vals = read_file(dir, "vals.bin"),
             meta = read_file(dir, "meta.bin"), order = read_file(dir, "order.bin"),
             bias = read_file(dir, "bias.bin");
#if RIA_E4M3  // the e4m3 kernel's scales: per token, per row
  const auto x_scale = read_file(dir, "x_scale.bin"), w_scale = read_file(dir, "w_scale.bin");
  const float *xs = (const float*)x_scale.data(), *ws = (const float*)w_scale.data();
#else
  const float *xs = nullptr, *ws = nullptr;
#endif
  std::vector<unsigned short> y((size_t)M * N, 0xFFFF);  // NaN where nothing is written
  const int threads = RIA_W * 32;
#if RIA_TILED  // the RIA_SK blocks of a cluster run together
  const int cluster = RIA_SK;
  const size_t shared_floats = 232448 / 4;  // an H200's most per block
#else
  const int cluster = 1;
  const size_t shared_floats = (size_t)RIA_W * RIA_R * RIA_NT * 4 * 32;
#endif
  for (int bx = 0; bx < grid; ++bx) {
    std::vector<std::vector<float>> shared(cluster, std::vector<float>(shared_floats, NAN));
    std::vector<float*> shared_ptrs;
    for (auto& s : shared) shared_ptrs.push_back(s.data());
    std::barrier<> cluster_barrier(cluster * threads);
    std::deque<std::barrier<>> block_syncs;
    for (int q = 0; q < cluster; ++q) block_syncs.emplace_back(threads);
    std::vector<host::Warp> warps(cluster * RIA_W);
    std::deque<std::barrier<>> warp_syncs;
    for (auto& w : warps) w.sync = &warp_syncs.emplace_back(32);
    std::vector<std::thread> pool;
    for (int ct = 0; ct < cluster * threads; ++ct)
      pool.emplace_back([&, ct] {
        const int tid = ct % threads, q = ct / threads;
        threadIdx.x = tid;
        blockIdx.x = bx;
        blockIdx.y = q;
        host::shared = shared_ptrs[q];
        host::cluster_shared = shared_ptrs.data();
        host::cluster_barrier = &cluster_barrier;
        host::block_sync = &block_syncs[q];
        host::warp = &warps[ct / 32];
        ria_mma_sp24((const ria_host_x*)x.data(), ldx, (const ria_host_frag*)vals.data(),
                     (const unsigned*)meta.data(), (const RIA_HOST_INDEX*)order.data(),
                     (const unsigned short*)bias.data(), has_bias, y.data(), N, M, N, K, tiles,
                     pairs, xs, ws);
      });
    for (auto& t : pool) t.join();
  }
  char path[4096];
  std::snprintf(path, sizeof path, "%s/y.bin", dir);
  FILE* f = std::fopen(path, "wb");
  std::fwrite(y.data(), 2, y.size(), f);
  std::fclose(f);
  return 0;
}
