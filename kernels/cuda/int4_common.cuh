// What the int4 CUDA kernels share: the weight layout, its dequantization into tensor-core
// fragments, and the MMA. int4_decode.cu: the matmul for decode-sized batches (M <= 16 per
// slab); int4_dequant.cu: W dequantized for large batches (a cuBLAS matmul does the product).
//
// Pure CUDA (no torch headers), so CI can compile the kernels with nvcc alone; binding.cpp
// wraps their launchers for torch. Layout (written by gptq_lab/kernels/cuda_pack.py, once at load):
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
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

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

}  // namespace
}  // namespace gptq_lab
