// Int4 GPTQ matmul for decode-sized batches (M <= 16 per launch slab): y[M, N] = x[M, K] @ W.
//
// Pure CUDA (no torch headers), so CI can compile it with nvcc alone; binding.cpp wraps the
// launcher for torch. Layout (written by gptq_lab/kernels/cuda_pack.py, once at load):
//
//   qweight uint4 [N/16][K/64][32 lanes]   one 16-byte word per lane per (16 n x 64 k) chunk.
//       Word j (0..3) of a lane covers k-tile j (16 k) of the chunk and holds the 8 codes that
//       lane needs for one m16n8k16 A fragment of W^T (rows = output features n, cols = k):
//       nibble r (r = 0..3) -> low half of A register r, nibble r + 4 -> its high half, where
//       with g = lane / 4, t = lane % 4, register r covers row g + 8 * (r & 1) and columns
//       2t + 8 * (r >> 1) (low) and that + 1 (high).
//   scales, zeros  uint32 [N/16][G][8]     per (tile, group, g) a pair of 16-bit values in the
//       activation dtype: (row g, row g + 8). zeros hold MAGIC + zero point, so that
//       (MAGIC + code) - (MAGIC + zero) is exact, then times the scale.
//
// The product is computed as y^T = W^T x^T on tensor cores (mma.sync m16n8k16, fp32 accumulate):
// W^T is the A operand, dequantized in registers straight into A fragments (a mask-and-or
// turns 4-bit codes into 16-bit floats MAGIC + code, two at a time), x^T is the B operand with
// the batch as its 8 columns (two MMAs for batches 9-16). Each block owns 16 output features;
// its warps split K and reduce through shared memory. Weight words are streamed with 16-byte
// loads, U chunks in flight per warp before the first use (the loads of a chunk group are
// issued together, then consumed).
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

constexpr int kWarps = 8;        // warps per block, splitting K
constexpr int kUnroll = 4;       // 64-k chunks loaded per warp before computing

template <typename T> struct Dtype;
template <> struct Dtype<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both fp16 halves
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Dtype<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in both bf16 halves
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T2>
__device__ __forceinline__ uint32_t as_u32(T2 v) { return *reinterpret_cast<uint32_t*>(&v); }
template <typename T2>
__device__ __forceinline__ T2 as_t2(uint32_t v) { return *reinterpret_cast<T2*>(&v); }

// One 32-bit weight word -> the four A registers of one k-tile.
// s, z: (row g, row g + 8) pairs; lo/hi broadcast one row's value to both halves.
template <typename T>
__device__ __forceinline__ void dequant(uint32_t w, uint32_t s, uint32_t z, uint32_t (&a)[4]) {
  using T2 = typename Dtype<T>::T2;
  const T2 s2 = as_t2<T2>(s), z2 = as_t2<T2>(z);
  const T2 s_lo = __low2half2_any(s2), s_hi = __high2half2_any(s2);
  const T2 z_lo = __low2half2_any(z2), z_hi = __high2half2_any(z2);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const T2 v = as_t2<T2>(((w >> (4 * r)) & 0x000F000Fu) | Dtype<T>::kMagic);
    a[r] = as_u32(__hmul2(__hsub2(v, (r & 1) ? z_hi : z_lo), (r & 1) ? s_hi : s_lo));
  }
}

// MT: batch tiles of 8 rows handled by this launch slab (1 for M <= 8, 2 for M <= 16).
template <typename T, int MT>
__global__ void __launch_bounds__(kWarps * 32)
int4_decode_kernel(const T* __restrict__ x, const uint4* __restrict__ qweight,
                   const uint32_t* __restrict__ scales, const uint32_t* __restrict__ zeros,
                   T* __restrict__ y, int M, int N, int K, int group_chunks, int G) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x;
  const int m_base = blockIdx.y * 8 * MT;
  const int chunks = K / 64;
  const int c_begin = warp * chunks / kWarps, c_end = (warp + 1) * chunks / kWarps;

  const uint4* wp = qweight + (size_t)tile * chunks * 32 + lane;
  const uint32_t* sp = scales + (size_t)tile * G * 8 + g;
  const uint32_t* zp = zeros + (size_t)tile * G * 8 + g;
  const uint32_t* xr[MT];
  bool row_ok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = m_base + mt * 8 + g;
    row_ok[mt] = m < M;
    xr[mt] = reinterpret_cast<const uint32_t*>(x + (size_t)(row_ok[mt] ? m : 0) * K + 2 * t);
  }
  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;

  // One chunk: 4 k-tiles of 16, one weight word each.
  auto compute = [&](const uint4& w, int c) {
    const int grp = c / group_chunks;
    const uint32_t s = __ldg(sp + grp * 8), z = __ldg(zp + grp * 8);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t a[4];
      dequant<T>(words[j], s, z, a);
      const int k2 = (c * 64 + j * 16) / 2;      // in 32-bit (two-element) units
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint32_t b0 = row_ok[mt] ? __ldg(xr[mt] + k2) : 0u;
        const uint32_t b1 = row_ok[mt] ? __ldg(xr[mt] + k2 + 4) : 0u;
        mma_16816<T>(acc[mt], a, b0, b1);
      }
    }
  };

  int c = c_begin;
  for (; c + kUnroll <= c_end; c += kUnroll) {
    uint4 w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) w[u] = __ldcs(wp + (size_t)(c + u) * 32);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) compute(w[u], c + u);
  }
  for (; c < c_end; ++c) compute(__ldcs(wp + (size_t)c * 32), c);

  // C fragment: c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1],
  // rows = output features of the tile, columns = batch rows of the 8-row slab.
  __shared__ float red[kWarps][MT * 8][16];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    red[warp][mt * 8 + 2 * t][g] = acc[mt][0];
    red[warp][mt * 8 + 2 * t + 1][g] = acc[mt][1];
    red[warp][mt * 8 + 2 * t][g + 8] = acc[mt][2];
    red[warp][mt * 8 + 2 * t + 1][g + 8] = acc[mt][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < MT * 8 * 16; i += kWarps * 32) {
    const int m = i / 16, nn = i % 16;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[w][m][nn];
    const int gm = m_base + m, gn = tile * 16 + nn;
    if (gm < M && gn < N) y[(size_t)gm * N + gn] = Dtype<T>::from_float(sum);
  }
}

template <typename T>
cudaError_t launch(const void* x, const void* qweight, const void* scales, const void* zeros,
                   void* y, int M, int N, int K, int group_size, int G, cudaStream_t stream) {
  const int tiles = (N + 15) / 16;
  const int group_chunks = group_size / 64;
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  const uint4* qw = static_cast<const uint4*>(qweight);
  const uint32_t* sp = static_cast<const uint32_t*>(scales);
  const uint32_t* zp = static_cast<const uint32_t*>(zeros);
  if (M <= 8) {
    int4_decode_kernel<T, 1><<<dim3(tiles, 1), kWarps * 32, 0, stream>>>(
        xp, qw, sp, zp, yp, M, N, K, group_chunks, G);
  } else {
    int4_decode_kernel<T, 2><<<dim3(tiles, (M + 15) / 16), kWarps * 32, 0, stream>>>(
        xp, qw, sp, zp, yp, M, N, K, group_chunks, G);
  }
  return cudaGetLastError();
}

}  // namespace gptq_lab

// x [M, K] (K a multiple of 64, rows contiguous), y [M, N]; dtype 0 = fp16, 1 = bf16.
// group_size: kernel rows per group, a multiple of 64 (K for per-channel); G = K / group_size.
extern "C" cudaError_t gptq_lab_int4_decode(const void* x, const void* qweight,
                                            const void* scales, const void* zeros, void* y,
                                            int M, int N, int K, int group_size, int G,
                                            int dtype, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (K <= 0 || K % 64 || group_size <= 0 || group_size % 64 || (long long)G * group_size != K)
    return cudaErrorInvalidValue;
  return dtype == 1
             ? gptq_lab::launch<__nv_bfloat16>(x, qweight, scales, zeros, y, M, N, K,
                                               group_size, G, stream)
             : gptq_lab::launch<__half>(x, qweight, scales, zeros, y, M, N, K, group_size, G,
                                        stream);
}
