// Int4 GPTQ matmul for decode-sized batches (M <= 16 per slab): y[M, N] = x[M, K] @ W, and the
// dequantization of W for large batches (a cuBLAS matmul then does the product).
//
// Pure CUDA (no torch headers), so CI can compile it with nvcc alone; binding.cpp wraps the
// launcher for torch. Layout (written by gptq_lab/kernels/cuda_pack.py, once at load):
//
//   qweight uint4 [K/64][N/16][32 lanes]   one 16-byte word per lane per (64 k x 16 n) chunk,
//       chunk-major: the blocks running side by side (one tile each) read neighbouring words.
//       Word j (0..3) of a lane covers k-tile j (16 k) of the chunk and holds the 8 codes that
//       lane needs for one m16n8k16 A fragment of W^T (rows = output features n, cols = k):
//       nibble r (r = 0..3) -> low half of A register r, nibble r + 4 -> its high half, where
//       with g = lane / 4, t = lane % 4, register r covers row g + 8 * (r & 1) and columns
//       2t + 8 * (r >> 1) (low) and that + 1 (high).
//       Inside a chunk the k order is permuted (physical k = 16t + 4j + 2h + l for logical
//       column 2t + 8h + l of k-tile j), so that each lane's B fragments are contiguous in x.
//   meta   uint2 [G][N/16][8]   per (group, tile, g): word 0 holds the (row g, row g + 8) pair
//       of 16-bit values in the activation dtype MAGIC + zero point, so that (MAGIC + code) -
//       (MAGIC + zero) is exact (fp16: the row g + 8 value carries a factor 16, see dequant);
//       word 1 the two fp16 scales, applied to each group's partial sums after the MMAs.
//
// The product is computed as y^T = W^T x^T on tensor cores (mma.sync m16n8k16, fp32 accumulate):
// W^T is the A operand, dequantized in registers straight into A fragments (a mask-and-or
// turns 4-bit codes into 16-bit floats MAGIC + code, two at a time), x^T is the B operand with
// the batch as its 8 columns (two MMAs for batches 9-16). Each block owns 16 output features
// and one slab of up to 16 batch rows (larger batches: several slabs, scheduled next to each
// other so that only the first reads the tile's weights from memory, the others from L2);
// its warps split K and reduce through shared memory. Weight words are streamed with 16-byte
// asynchronous copies (cp.async) into a per-warp shared-memory ring, several chunks in flight
// per warp while the oldest is consumed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

// Broadcast helpers named once for both dtypes (cuda_fp16 / cuda_bf16 spell them differently).
__device__ __forceinline__ __half2 __low2half2_any(__half2 v) { return __low2half2(v); }
__device__ __forceinline__ __half2 __high2half2_any(__half2 v) { return __high2half2(v); }
__device__ __forceinline__ __nv_bfloat162 __low2half2_any(__nv_bfloat162 v) {
  return __low2bfloat162(v);
}
__device__ __forceinline__ __nv_bfloat162 __high2half2_any(__nv_bfloat162 v) {
  return __high2bfloat162(v);
}

namespace gptq_lab {
// Internal linkage: builds with other compile-time settings (benchmarks/cuda_variants.py) load
// into one process, and the launchers' function-local statics would otherwise be one object
// process-wide (GNU unique symbols).
namespace {


template <typename T> struct Dtype;
template <> struct Dtype<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both fp16 halves
  static constexpr float kHighRowFactor = 1.f / 16;  // rows g + 8 read as MAGIC + 16 * code
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Dtype<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in both bf16 halves
  static constexpr float kHighRowFactor = 1.f;
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

// c += a b on tensor cores (m16n8k16, fp32 accumulate); TYPE: "f16" or "bf16".
#define GPTQ_LAB_MMA_16816(TYPE)                                                              \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                         \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                 \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (Dtype<T>::kMagic == 0x64006400u)   // fp16
    GPTQ_LAB_MMA_16816("f16");
  else
    GPTQ_LAB_MMA_16816("bf16");
}

template <typename T2>
__device__ __forceinline__ uint32_t as_u32(T2 v) { return *reinterpret_cast<uint32_t*>(&v); }
template <typename T2>
__device__ __forceinline__ T2 as_t2(uint32_t v) { return *reinterpret_cast<T2*>(&v); }

// (a & mask) | magic in one LOP3 (the compiler otherwise emits an AND and an OR).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));
  return r;
}

// One 32-bit weight word -> the four A registers of one k-tile, zero points subtracted (the
// scales are applied per group after the MMAs). z: (row g, row g + 8) pair of MAGIC + zero.
// fp16: registers 1 and 3 (rows g + 8) take their nibbles unshifted at bits 4-7, which reads
// as MAGIC + 16 * code; their zero points carry the factor 16 (see cuda_pack.py) and their
// scales the factor 1/16 (Dtype::kHighRowFactor). bf16 (7 mantissa bits) shifts every nibble
// down instead.
template <typename T>
__device__ __forceinline__ void dequant(uint32_t w, uint32_t z, uint32_t (&a)[4]) {
  using T2 = typename Dtype<T>::T2;
  const T2 z2 = as_t2<T2>(z);
  const T2 z_lo = __low2half2_any(z2), z_hi = __high2half2_any(z2);
  const uint32_t w8 = w >> 8, lo = 0x000F000Fu, magic = Dtype<T>::kMagic;
  uint32_t raw[4];
  if constexpr (Dtype<T>::kMagic == 0x64006400u) {
    raw[0] = and_or(w, lo, magic);
    raw[1] = and_or(w, lo << 4, magic);
    raw[2] = and_or(w8, lo, magic);
    raw[3] = and_or(w8, lo << 4, magic);
  } else {
    raw[0] = and_or(w, lo, magic);
    raw[1] = and_or(w >> 4, lo, magic);
    raw[2] = and_or(w8, lo, magic);
    raw[3] = and_or(w >> 12, lo, magic);
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) a[r] = as_u32(__hsub2(as_t2<T2>(raw[r]), (r & 1) ? z_hi : z_lo));
}

// A group's record -> the scales of rows g and g + 8 (the latter with the fp16 factor 1/16, see
// dequant).
template <typename T>
__device__ __forceinline__ void group_scales(const uint2& rec, float& s_lo, float& s_hi) {
  const float2 sc = __half22float2(as_t2<__half2>(rec.y));
  s_lo = sc.x;
  s_hi = sc.y * Dtype<T>::kHighRowFactor;
}

// One chunk of one tile as the lane holds it: its 16-byte weight word (one 32-bit word per
// k-tile) and the (zero, zero) pair of its group's record -> the four k-tiles' A registers.
template <typename T>
__device__ __forceinline__ void dequant_words(const uint4& w, uint32_t z, uint32_t (&a)[4][4]) {
  dequant<T>(w.x, z, a[0]);
  dequant<T>(w.y, z, a[1]);
  dequant<T>(w.z, z, a[2]);
  dequant<T>(w.w, z, a[3]);
}

template <int N>
__device__ __forceinline__ uint32_t word(const uint4& v) {
  return N == 0 ? v.x : N == 1 ? v.y : N == 2 ? v.z : v.w;
}

// cp.async (sm_80+): global -> shared without passing through registers; the copies of one
// commit group complete together (wait_group N: all but the newest N groups are done).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem)
               : "memory");
}
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(smem)), "l"(gmem)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The bulk copy engine (TMA, sm_90): one thread copies `bytes` (a multiple of 16) of global
// memory into shared memory; the mbarrier's phase completes when they have landed. Used for the
// batch-1 activations, so that they are read from shared memory instead of L2 in the main loop.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar) {   // one arrival per phase
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n"
               "fence.mbarrier_init.release.cluster;\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes) : "memory");
  if (bytes > 0)
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
#else
  __trap();                                        // (the launcher uses it on sm_90 only)
#endif
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  while (!done)
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 " selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
#endif
}

// Programmatic dependent launch (sm_90; no-ops before): the launcher lets the kernel start while
// the previous kernel of the stream is still finishing. It then streams its first weight stages
// (the packed weights are constant: cuda_pack.prepare waits for its own writes to land) and
// waits in grid_dependency_wait() for the previous kernel's writes (x) before reading them.
// allow_dependents() lets the next kernel of the stream, if it is launched the same way, start.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

#ifndef GPTQ_LAB_ABLATE   // timing experiments only (wrong results): 1 = no math, 2 = no x loads,
#define GPTQ_LAB_ABLATE 0 // 3 = no weight loads
#endif
#ifndef GPTQ_LAB_STAGES
#define GPTQ_LAB_STAGES 4
#endif
#ifndef GPTQ_LAB_B1_MINBLOCKS  // the one-tile kernels for batch <= 8 are compiled to fit this
#define GPTQ_LAB_B1_MINBLOCKS 4  // many blocks of 8 warps per SM (4: at most 64 registers)
#endif
constexpr int kB1MinBlocks = GPTQ_LAB_B1_MINBLOCKS;
constexpr int kMaxWarps = 8;                // warps per block (they split K)
constexpr int kStages = GPTQ_LAB_STAGES;    // stages per warp's ring (all but 1 in flight)
// Bytes of one warp's ring: kStages stages of U chunks x NT tiles (each lane's 16-byte weight
// word per chunk and tile) and one 8-byte record per lane and tile (the U chunks of a stage
// share their group).
template <int NT, int U> __host__ __device__ constexpr int ring_bytes() {
  return kStages * NT * 32 * (16 * U + 8);
}

// MT: batch tiles of 8 rows per slab (1 for M <= 8, 2 for M <= 16); NT: tiles of 16 output
// features per block, sharing each activation fragment (x is read once per block from L2, so
// NT > 1 divides that traffic, which dominates from batch ~8 on); U: 64-k chunks per stage
// (2 where a group spans an even number of chunks and NT is 1, else 1).
// blockDim.x / 32 warps share the block's tiles, splitting K in whole stages, and reduce
// through shared memory at the end. Each warp streams its stages with cp.async into a ring of
// kStages stages, kStages - 1 in flight while the oldest is dequantized and multiplied; each
// stage travels with its group's (zero, scale) record. Each lane copies and later reads only its
// own words, so the ring needs no barrier (the stage refilled is the one consumed in the
// previous step, whose values are already used). At one tile per block the main loop is
// unrolled over the ring, so every shared-memory address is a constant offset. Each stage's MMAs start from zero and its
// group's scales are applied right after them, so no group bookkeeping is needed besides the
// record pointer, which the issuing side advances by counting.
// Inside a 64-k chunk the k order is permuted so that lane (g, t) reads its B fragments of
// all four k-tiles as x[m][64c + 16t .. 64c + 16t + 15]: two 16-byte loads per batch row
// (through L1: every tile of the SM reads the same activations). XS (batch 1, sm_90): each warp
// instead has its K range of x copied into shared memory once, by the bulk copy engine, after
// its first weight stages are on their way (loads from L2 inside the loop stalled every stage).
template <typename T, int MT, int NT, int U, bool XS>
__global__ void __launch_bounds__(kMaxWarps * 32, NT > 1 ? 1 : MT > 1 ? 2 : kB1MinBlocks)
int4_decode_kernel(const T* __restrict__ x, const uint4* __restrict__ qweight,
                   const uint2* __restrict__ meta, T* __restrict__ y, int M, int N, int K,
                   int group_chunks) {
  extern __shared__ uint4 ring[];                   // per warp: its ring; later the reduction
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tiles = (N + 15) / 16, tile0 = blockIdx.y * NT;   // slabs of one tile group run
  const int m_base = blockIdx.x * 8 * MT;           // side by side: all but the first read W from L2
  const int chunks = K / 64, stages = (chunks + U - 1) / U;
  const int c_begin = warp * stages / warps * U;    // whole stages: a stage shares one group
  const int c_end = min(chunks, (warp + 1) * stages / warps * U);

  char* mine = reinterpret_cast<char*>(ring) + warp * ring_bytes<NT, U>();
  // XS: after all rings, one mbarrier per warp, then x [K] (each warp fills its own range).
  char* tail = reinterpret_cast<char*>(ring) + warps * ring_bytes<NT, U>();
  uint64_t* xbar = reinterpret_cast<uint64_t*>(tail) + warp;
  uint4* xs = reinterpret_cast<uint4*>(tail + 8 * kMaxWarps);
  if (XS && lane == 0) mbarrier_init(xbar);
  uint4 (*wslot)[U][NT][32] = reinterpret_cast<uint4 (*)[U][NT][32]>(mine);
  uint2 (*mslot)[NT][32] = reinterpret_cast<uint2 (*)[NT][32]>(mine + kStages * U * NT * 32 * 16);
  const size_t wstride = (size_t)tiles * 32, mstride = (size_t)tiles * 8;
  const uint4* wsrc = qweight + (size_t)c_begin * wstride + (size_t)tile0 * 32 + lane;
  const uint2* msrc = meta + (size_t)(c_begin / group_chunks) * mstride + (size_t)tile0 * 8 + g;
  const int nt_valid = tiles - tile0 < NT ? tiles - tile0 : NT;   // the last group may be short
  int issued = c_begin, issued_in_group = c_begin % group_chunks;
  auto issue = [&](int stage) {                     // the next stage: U chunks and their record
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (GPTQ_LAB_ABLATE == 3 || issued >= c_end || (NT > 1 && nt >= nt_valid)) continue;
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u == 0 || issued + u < c_end)
          cp_async16(&wslot[stage][u][nt][lane], wsrc + u * wstride + nt * 32);
      cp_async8(&mslot[stage][nt][lane], msrc + nt * 8);
    }
    issued += U;
    wsrc += U * wstride;
    issued_in_group += U;
    if (issued_in_group == group_chunks) issued_in_group = 0, msrc += mstride;
    cp_async_commit();
  };

  // Lane (g, t) reads batch row m_base + 8 mt + g; rows past M read row M - 1 instead (their
  // MMA columns are never stored), so the loads need no zero fill.
  const uint4* xr[MT];
  bool row_ok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = m_base + mt * 8 + g;
    row_ok[mt] = m < M;
    xr[mt] = reinterpret_cast<const uint4*>(x + (size_t)(row_ok[mt] ? m : M - 1) * K + 16 * t);
  }
  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);  // prologue: the first kStages - 1 stages
  grid_dependency_wait();                           // x and y may belong to the previous kernel
  allow_dependents();
  if constexpr (XS) {                               // this warp's K range of x (batch row 0)
    __syncwarp();                                   // (the barrier's initialization)
    if (lane == 0)
      bulk_copy(xs + c_begin * 8, x + (size_t)c_begin * 64, (c_end - c_begin) * 128, xbar);
    mbarrier_wait(xbar, 0);
  }
  auto step = [&](int s, int cs) {                  // consume stage s (chunks cs ..), refill the
    issue(s == 0 ? kStages - 1 : s - 1);            // stage consumed before it
    uint4 xv[U][MT][2];                             // B fragments of the U chunks
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if (GPTQ_LAB_ABLATE == 2) {
          xv[u][mt][0] = xv[u][mt][1] = make_uint4(cs, cs, cs, cs);
          continue;
        }
        if (u > 0 && cs + u >= c_end) continue;     // (an odd chunk count: nothing to read)
        if constexpr (XS) {                         // every lane reads row 0 (see xr)
          xv[u][mt][0] = xs[(cs + u) * 8 + 2 * t];
          xv[u][mt][1] = xs[(cs + u) * 8 + 2 * t + 1];
          continue;
        }
        xv[u][mt][0] = __ldg(xr[mt] + (cs + u) * 8);
        xv[u][mt][1] = __ldg(xr[mt] + (cs + u) * 8 + 1);
      }
    cp_async_wait<kStages - 1>();                   // this stage has landed (this lane's copies)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint2 rec = mslot[s][nt][lane];
      if (GPTQ_LAB_ABLATE == 1) {
        const uint4 w = wslot[s][0][nt][lane];
        acc[0][nt][0] += __uint_as_float((w.x ^ w.y ^ w.z ^ w.w ^ rec.x) & 0x3fffffffu) *
                         __low2float(as_t2<__half2>(rec.y));
        continue;
      }
      float part[MT][4];                            // the stage's sums, before the scales
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[mt][i] = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u > 0 && cs + u >= c_end) break;
        uint32_t a[4][4];
        dequant_words<T>(wslot[s][u][nt][lane], rec.x, a);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(part[mt], a[0], word<0>(xv[u][mt][0]), word<1>(xv[u][mt][0]));
          mma_16816<T>(part[mt], a[1], word<2>(xv[u][mt][0]), word<3>(xv[u][mt][0]));
          mma_16816<T>(part[mt], a[2], word<0>(xv[u][mt][1]), word<1>(xv[u][mt][1]));
          mma_16816<T>(part[mt], a[3], word<2>(xv[u][mt][1]), word<3>(xv[u][mt][1]));
        }
      }
      float s_lo, s_hi;
      group_scales<T>(rec, s_lo, s_hi);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        acc[mt][nt][0] += s_lo * part[mt][0];
        acc[mt][nt][1] += s_lo * part[mt][1];
        acc[mt][nt][2] += s_hi * part[mt][2];
        acc[mt][nt][3] += s_hi * part[mt][3];
      }
    }
  };
  if constexpr (NT == 1) {                          // unrolled over the ring: constant offsets
    for (int c0 = c_begin; c0 < c_end; c0 += kStages * U) {
#pragma unroll
      for (int s = 0; s < kStages; ++s) {
        if (s > 0 && c0 + s * U >= c_end) break;
        step(s, c0 + s * U);
      }
    }
  } else {                                          // (a body unrolled kStages times outgrows
    int s = 0;                                      // the instruction cache: slower at NT 4)
    for (int cs = c_begin; cs < c_end; cs += U) {
      step(s, cs);
      s = s + 1 == kStages ? 0 : s + 1;
    }
  }
  cp_async_wait<0>();
  __syncthreads();                                  // the ring becomes the reduction buffer
  float (*red)[MT * 8][NT * 16] = reinterpret_cast<float (*)[MT * 8][NT * 16]>(ring);
  static_assert(MT * 8 * NT * 16 * 4 <= ring_bytes<NT, U>(), "reduction buffer larger than a ring");

  // C fragment: c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1],
  // rows = output features of the tile, columns = batch rows of the 8-row slab.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      red[warp][mt * 8 + 2 * t][nt * 16 + g] = acc[mt][nt][0];
      red[warp][mt * 8 + 2 * t + 1][nt * 16 + g] = acc[mt][nt][1];
      red[warp][mt * 8 + 2 * t][nt * 16 + g + 8] = acc[mt][nt][2];
      red[warp][mt * 8 + 2 * t + 1][nt * 16 + g + 8] = acc[mt][nt][3];
    }
  __syncthreads();
  for (int i = threadIdx.x; i < MT * 8 * NT * 16; i += blockDim.x) {
    const int m = i / (NT * 16), nn = i % (NT * 16);
    float sum = 0.f;
    for (int w = 0; w < warps; ++w) sum += red[w][m][nn];
    const int gm = m_base + m, gn = tile0 * 16 + nn;
    if (gm < M && gn < N) y[(size_t)gm * N + gn] = Dtype<T>::from_float(sum);
  }
}

// What the launchers need to know about the GPU, read once per process (one GPU model assumed).
struct Device {
  int sms = 0, major = 0, smem_optin = 0;           // SMs, compute capability, max smem per block
  bool pdl = false, xs = false;                     // dependent launch, x staged in shared memory
};
// GPTQ_LAB_PDL=0 / GPTQ_LAB_XS=0 in the environment turn those features off, for comparisons.
inline cudaError_t device_info(const Device** out) {
  static Device dev;
  static cudaError_t err = cudaErrorNotReady;
  if (err == cudaErrorNotReady) {
    int id = 0;
    Device d;
    err = cudaGetDevice(&id);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, id);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, id);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, id);
    const char* pdl = getenv("GPTQ_LAB_PDL");
    const char* xs = getenv("GPTQ_LAB_XS");
    d.pdl = d.major >= 9 && !(pdl && pdl[0] == '0');
    d.xs = d.major >= 9 && !(xs && xs[0] == '0');
    dev = d;
  }
  *out = &dev;
  return err;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent where enabled.
template <typename... Params, typename... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), bool pdl, dim3 grid, dim3 block,
                             size_t smem, cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

// Dynamic shared memory of a block of `warps` warps: the rings, and with XS the barriers and x.
template <int NT, int U, bool XS>
size_t block_smem(int warps, int K) {
  return (size_t)warps * ring_bytes<NT, U>() + (XS ? 8 * kMaxWarps + 2 * (size_t)K : 0);
}

constexpr int kWarpOptions[4] = {8, 4, 2, 1};

// Blocks per SM of a kernel for each of kWarpOptions (0: does not fit), cached per process and,
// with XS (x's size depends on K), per K.
template <typename T, int MT, int NT, int U, bool XS>
cudaError_t blocks_per_sm(int K, const Device& dev, const int** out) {
  struct Fit { int K = -1; int blocks[4] = {0, 0, 0, 0}; };
  static Fit fits[8];
  static int next = 0;
  static bool ready = false;
  auto kernel = int4_decode_kernel<T, MT, NT, U, XS>;
  const int key = XS ? K : 0;
  for (const Fit& f : fits)
    if (f.K == key) return *out = f.blocks, cudaSuccess;
  cudaError_t err = cudaSuccess;                // setup errors are returned, not left sticky
  if (!ready)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dev.smem_optin);
  Fit f;
  f.K = key;
  for (int i = 0; i < 4 && err == cudaSuccess; ++i) {
    const size_t smem = block_smem<NT, U, XS>(kWarpOptions[i], K);
    if (smem <= (size_t)dev.smem_optin)
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&f.blocks[i], kernel,
                                                          kWarpOptions[i] * 32, smem);
  }
  if (err != cudaSuccess) return err;
  ready = true;
  fits[next] = f;
  *out = fits[next].blocks;
  next = (next + 1) % 8;
  return cudaSuccess;
}

// Warps per block (8, 4, 2 or 1, splitting K; `forced` > 0 overrides, for tuning): the choice
// with the least time estimated as waves x stages per warp, where a wave is as many blocks as
// the GPU holds at once; ties go to fewer waves (a second, mostly idle wave costs a whole one).
template <typename T, int MT, int NT, int U, bool XS>
cudaError_t launch_tiles(const T* x, const uint4* qw, const uint2* meta, T* y, int M, int N,
                         int K, int group_chunks, int forced, const Device& dev,
                         cudaStream_t stream) {
  const int* fit = nullptr;
  const cudaError_t err = blocks_per_sm<T, MT, NT, U, XS>(K, dev, &fit);
  if (err != cudaSuccess) return err;
  const int groups = (N + 16 * NT - 1) / (16 * NT);
  const int slabs = (M + 8 * MT - 1) / (8 * MT);
  const long long blocks = (long long)groups * slabs;
  const int stages = (K / 64 + U - 1) / U;
  int warps = 1;
  double best = 1e30;
  for (int i = 0; i < 4; ++i) {
    const int w = kWarpOptions[i], per_sm = fit[i];
    if (w > stages || per_sm <= 0) continue;
    const long long waves = (blocks + (long long)per_sm * dev.sms - 1) / ((long long)per_sm * dev.sms);
    const double cost = (double)waves * ((stages + w - 1) / w) + 1e-3 * waves;
    if (cost < best) best = cost, warps = w;
  }
  if (forced > 0) warps = forced < kMaxWarps ? forced : kMaxWarps;
  return launch_dependent(int4_decode_kernel<T, MT, NT, U, XS>, dev.pdl, dim3(slabs, groups), dim3(warps * 32),
                          block_smem<NT, U, XS>(warps, K), stream, x, qw, meta, y, M, N, K,
                          group_chunks);
}

// Tiles per block: 1 at batch 1 (the activations are one row: most blocks is best); from batch
// 2 on the largest of 4 (batch > 8 only) and 2 that still gives every SM a block, else 1.
// `forced` (1, 2 or 4) overrides, for tuning.
inline int tiles_per_block(int M, int N, int MT, int sms, int forced) {
  if (forced == 1 || forced == 2 || forced == 4) return forced;
  if (M == 1) return 1;
  const long long tiles = (N + 15) / 16, slabs = (M + 8 * MT - 1) / (8 * MT);
  for (int nt = MT == 2 ? 4 : 2; nt > 1; nt /= 2)
    if ((tiles + nt - 1) / nt * slabs >= sms) return nt;
  return 1;
}

template <typename T, int MT>
cudaError_t launch_mt(const T* x, const uint4* qw, const uint2* meta, T* y, int M, int N, int K,
                      int group_chunks, int warps, int nt_forced, cudaStream_t stream) {
  const Device* dev = nullptr;
  const cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  const int nt = tiles_per_block(M, N, MT, dev->sms, nt_forced);
  if constexpr (MT == 2)                        // (MT 1, NT 4 spills: one slab of 8 rows needs
    if (nt == 4)                                // less sharing anyway)
      return launch_tiles<T, MT, 4, 1, false>(x, qw, meta, y, M, N, K, group_chunks, warps, *dev, stream);
  if (nt >= 2)
    return launch_tiles<T, MT, 2, 1, false>(x, qw, meta, y, M, N, K, group_chunks, warps, *dev, stream);
  if (group_chunks % 2 == 0) {                  // two chunks per stage share one group's record
    if constexpr (MT == 1)                      // batch 1: x from shared memory where that costs
      if (M == 1 && dev->xs) {                  // no occupancy (at 8 warps: K up to ~7k on H100)
        const int *with = nullptr, *without = nullptr;
        cudaError_t e = blocks_per_sm<T, 1, 1, 2, true>(K, *dev, &with);
        if (e == cudaSuccess) e = blocks_per_sm<T, 1, 1, 2, false>(K, *dev, &without);
        if (e != cudaSuccess) return e;
        if (with[0] > 0 && with[0] >= without[0])
          return launch_tiles<T, 1, 1, 2, true>(x, qw, meta, y, M, N, K, group_chunks, warps, *dev, stream);
      }
    return launch_tiles<T, MT, 1, 2, false>(x, qw, meta, y, M, N, K, group_chunks, warps, *dev, stream);
  }
  return launch_tiles<T, MT, 1, 1, false>(x, qw, meta, y, M, N, K, group_chunks, warps, *dev, stream);
}

template <typename T>
cudaError_t launch(const void* x, const void* qweight, const void* meta, void* y, int M, int N,
                   int K, int group_size, int warps, int nt, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  const uint4* qw = static_cast<const uint4*>(qweight);
  const uint2* mp = static_cast<const uint2*>(meta);
  if (M <= 8) return launch_mt<T, 1>(xp, qw, mp, yp, M, N, K, group_size / 64, warps, nt, stream);
  return launch_mt<T, 2>(xp, qw, mp, yp, M, N, K, group_size / 64, warps, nt, stream);
}

// W [N, K] in the activation dtype from the same layout, for a cuBLAS matmul at large M
// (prefill): y = x @ W^T. One thread per lane word of a (chunk, tile): it dequantizes the four
// A fragments exactly as the matmul does, applies the scales (value = scale * (code - zero),
// rounded once) and writes its two rows' 16 contiguous k: rows g and g + 8, k = 64c + 16t + i,
// where the k-permutation inside the chunk makes those 16 values contiguous (see the layout).
#ifndef GPTQ_LAB_DEQUANT_STORE  // how the dequantization writes (same values): 1 (H100: 2.1-2.7
#define GPTQ_LAB_DEQUANT_STORE 1  // TB/s): the warp stages its 16 rows x 128 bytes in shared
#endif                            // memory, then stores whole 128-byte rows; 0 (timing variant,
                                  // 1.7-2.2 TB/s): each lane stores its 2 x 16 bytes per row
constexpr int kDequantBlock = 256;                // threads per block (the launcher's)

template <typename T>
__global__ void int4_dequant_kernel(const uint4* __restrict__ qweight,
                                    const uint2* __restrict__ meta, T* __restrict__ w, int N,
                                    int K, int group_chunks) {
  using T2 = typename Dtype<T>::T2;
  const int tiles = (N + 15) / 16;
  const long long id = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long unit = id >> 5;                   // (tile, chunk), tile-major: consecutive
  const int chunks = K / 64;                        // warps write consecutive 128-byte pieces
  if (unit >= (long long)chunks * tiles) return;    // of the same 16 rows of W
  const int lane = id & 31, g = lane >> 2, t = lane & 3;
  const int tile = unit / chunks, c = unit % chunks;
  // variant 1: per warp 16 rows of 8 16-byte words, padded to 9 (conflict-free both ways)
  __shared__ uint4 stage[GPTQ_LAB_DEQUANT_STORE == 1 ? kDequantBlock / 32 : 1][16][9];
  const uint4 word4 = qweight[((size_t)c * tiles + tile) * 32 + lane];
  const uint2 rec = meta[((size_t)(c / group_chunks) * tiles + tile) * 8 + g];
  uint32_t a[4][4];
  float s_row[2];
  group_scales<T>(rec, s_row[0], s_row[1]);
  dequant_words<T>(word4, rec.x, a);
#pragma unroll
  for (int half = 0; half < 2; ++half) {            // rows g (registers 0, 2), g + 8 (1, 3)
    const int n = tile * 16 + g + 8 * half;
    if (n >= N) continue;
    uint32_t out[8];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {                 // k = 16t + 4j + 2h + (0, 1)
        const float2 v = make_float2(__low2float(as_t2<T2>(a[j][2 * h + half])),
                                     __high2float(as_t2<T2>(a[j][2 * h + half])));
        T2 r;
        r.x = Dtype<T>::from_float(v.x * s_row[half]);
        r.y = Dtype<T>::from_float(v.y * s_row[half]);
        out[2 * j + h] = as_u32(r);
      }
    const uint4 lo = make_uint4(out[0], out[1], out[2], out[3]);
    const uint4 hi = make_uint4(out[4], out[5], out[6], out[7]);
    if constexpr (GPTQ_LAB_DEQUANT_STORE == 1) {
      stage[threadIdx.x >> 5][g + 8 * half][2 * t] = lo;
      stage[threadIdx.x >> 5][g + 8 * half][2 * t + 1] = hi;
      continue;
    }
    uint4* dst = reinterpret_cast<uint4*>(w + (size_t)n * K + (size_t)c * 64 + 16 * t);
    dst[0] = lo;
    dst[1] = hi;
  }
  if constexpr (GPTQ_LAB_DEQUANT_STORE == 1) {       // lane l: 16 bytes (l % 8) of rows 4i + l / 8
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = 4 * i + (lane >> 3), word = lane & 7, n = tile * 16 + row;
      if (n < N)
        reinterpret_cast<uint4*>(w + (size_t)n * K + (size_t)c * 64)[word] =
            stage[threadIdx.x >> 5][row][word];
    }
  }
}

}  // namespace
}  // namespace gptq_lab

// w [N, K] (K a multiple of 64, 16-byte aligned) <- the dequantized weight; dtype as below.
extern "C" cudaError_t gptq_lab_int4_dequant(const void* qweight, const void* meta, void* w,
                                             int N, int K, int group_size, int dtype,
                                             cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (K <= 0 || K % 64 || group_size <= 0 || group_size % 64 || K % group_size)
    return cudaErrorInvalidValue;
  const long long threads = (long long)(K / 64) * ((N + 15) / 16) * 32;
  const int block = gptq_lab::kDequantBlock;
  const unsigned grid = (unsigned)((threads + block - 1) / block);
  const uint4* qw = static_cast<const uint4*>(qweight);
  const uint2* mp = static_cast<const uint2*>(meta);
  if (dtype == 1)
    gptq_lab::int4_dequant_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(
        qw, mp, static_cast<__nv_bfloat16*>(w), N, K, group_size / 64);
  else
    gptq_lab::int4_dequant_kernel<__half><<<grid, block, 0, stream>>>(
        qw, mp, static_cast<__half*>(w), N, K, group_size / 64);
  return cudaGetLastError();
}

// x [M, K] (K a multiple of 64, rows contiguous), y [M, N]; dtype 0 = fp16, 1 = bf16.
// group_size: kernel rows per group, a multiple of 64 dividing K (K for per-channel).
// warps: warps per block (1..8), nt: tiles of 16 outputs per block (1, 2, 4); 0 lets the
// launcher choose (other values are for tuning).
extern "C" cudaError_t gptq_lab_int4_decode(const void* x, const void* qweight, const void* meta,
                                            void* y, int M, int N, int K, int group_size,
                                            int warps, int nt, int dtype, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (K <= 0 || K % 64 || group_size <= 0 || group_size % 64 || K % group_size ||
      (N + 15) / 16 > 65535)                        // tile groups are the grid's y dimension
    return cudaErrorInvalidValue;
  return dtype == 1
             ? gptq_lab::launch<__nv_bfloat16>(x, qweight, meta, y, M, N, K, group_size, warps,
                                               nt, stream)
             : gptq_lab::launch<__half>(x, qweight, meta, y, M, N, K, group_size, warps, nt,
                                        stream);
}
