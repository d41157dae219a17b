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
//       Inside a chunk the k order is permuted (physical k = 16t + 4j + 2h + l for logical
//       column 2t + 8h + l of k-tile j), so that each lane's B fragments are contiguous in x.
//   zeros  uint32 [N/16][G][8]   per (tile, group, g) a pair of 16-bit values in the
//       activation dtype for (row g, row g + 8): MAGIC + zero point, so that (MAGIC + code) -
//       (MAGIC + zero) is exact (fp16: the row g + 8 value carries a factor 16, see dequant).
//   scales float2 [N/16][G][8]   the matching (row g, row g + 8) scales in fp32 (fp16: the
//       second divided by 16), applied to each group's partial sums after the MMAs.
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

// One 32-bit weight word -> the four A registers of one k-tile, zero points subtracted (the
// scales are applied per group after the MMAs). z: (row g, row g + 8) pair of MAGIC + zero.
// fp16: registers 1 and 3 (rows g + 8) take their nibbles unshifted at bits 4-7, which reads
// as MAGIC + 16 * code; their zero points and scales carry the factor 16 (see cuda_pack.py).
// bf16 (7 mantissa bits) shifts every nibble down instead.
template <typename T>
__device__ __forceinline__ void dequant(uint32_t w, uint32_t z, uint32_t (&a)[4]) {
  using T2 = typename Dtype<T>::T2;
  const T2 z2 = as_t2<T2>(z);
  const T2 z_lo = __low2half2_any(z2), z_hi = __high2half2_any(z2);
  const uint32_t w8 = w >> 8;
  uint32_t raw[4];
  if constexpr (sizeof(T) == 2 && Dtype<T>::kMagic == 0x64006400u) {
    raw[0] = (w & 0x000F000Fu) | Dtype<T>::kMagic;
    raw[1] = (w & 0x00F000F0u) | Dtype<T>::kMagic;
    raw[2] = (w8 & 0x000F000Fu) | Dtype<T>::kMagic;
    raw[3] = (w8 & 0x00F000F0u) | Dtype<T>::kMagic;
  } else {
    raw[0] = (w & 0x000F000Fu) | Dtype<T>::kMagic;
    raw[1] = ((w >> 4) & 0x000F000Fu) | Dtype<T>::kMagic;
    raw[2] = (w8 & 0x000F000Fu) | Dtype<T>::kMagic;
    raw[3] = ((w >> 12) & 0x000F000Fu) | Dtype<T>::kMagic;
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) a[r] = as_u32(__hsub2(as_t2<T2>(raw[r]), (r & 1) ? z_hi : z_lo));
}

template <int N>
__device__ __forceinline__ uint32_t word(const uint4& v) {
  return N == 0 ? v.x : N == 1 ? v.y : N == 2 ? v.z : v.w;
}

constexpr int kUnroll = 4;       // 64-k chunks per warp in flight while the previous 4 compute

// MT: batch tiles of 8 rows handled by this launch slab (1 for M <= 8, 2 for M <= 16).
// blockDim.x / 32 warps share one tile of 16 output features, splitting K, and reduce through
// shared memory at the end. Each warp keeps the next kUnroll chunks' weight words in flight
// (registers, double-buffered) while it dequantizes and multiplies the current ones.
// Inside a 64-k chunk the k order is permuted so that lane (g, t) reads its B fragments of
// all four k-tiles as x[m][64c + 16t .. 64c + 16t + 15]: two 16-byte loads per batch row
// (through L1: every tile of the SM reads the same activations).
template <typename T, int MT>
__global__ void __launch_bounds__(256, 1)
int4_decode_kernel(const T* __restrict__ x, const uint4* __restrict__ qweight,
                   const float2* __restrict__ scales, const uint32_t* __restrict__ zeros,
                   T* __restrict__ y, int M, int N, int K, int group_chunks, int G) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x;
  const int m_base = blockIdx.y * 8 * MT;
  const int chunks = K / 64;
  const int c_begin = warp * chunks / warps, c_end = (warp + 1) * chunks / warps;

  const uint4* wp = qweight + (size_t)tile * chunks * 32 + lane;
  const float2* sp = scales + (size_t)tile * G * 8 + g;
  const uint32_t* zp = zeros + (size_t)tile * G * 8 + g;
  const uint4* xr[MT];
  bool row_ok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = m_base + mt * 8 + g;
    row_ok[mt] = m < M;
    xr[mt] = reinterpret_cast<const uint4*>(x + (size_t)(row_ok[mt] ? m : 0) * K + 16 * t);
  }
  float acc[MT][4], part[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = part[mt][i] = 0.f;

  uint4 wbuf[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    if (c_begin + u < c_end) wbuf[u] = __ldcs(wp + (size_t)(c_begin + u) * 32);

  for (int c0 = c_begin; c0 < c_end; c0 += kUnroll) {
    uint4 w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) w[u] = wbuf[u];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)           // the next chunks' weights, in flight meanwhile
      if (c0 + kUnroll + u < c_end) wbuf[u] = __ldcs(wp + (size_t)(c0 + kUnroll + u) * 32);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u;
      if (c >= c_end) break;
      uint4 xv[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        xv[mt][0] = row_ok[mt] ? __ldg(xr[mt] + c * 8) : make_uint4(0, 0, 0, 0);
        xv[mt][1] = row_ok[mt] ? __ldg(xr[mt] + c * 8 + 1) : make_uint4(0, 0, 0, 0);
      }
      const int grp = c / group_chunks;
      const uint32_t z = __ldg(zp + grp * 8);
      uint32_t a[4][4];
      dequant<T>(w[u].x, z, a[0]);
      dequant<T>(w[u].y, z, a[1]);
      dequant<T>(w[u].z, z, a[2]);
      dequant<T>(w[u].w, z, a[3]);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(part[mt], a[0], word<0>(xv[mt][0]), word<1>(xv[mt][0]));
        mma_16816<T>(part[mt], a[1], word<2>(xv[mt][0]), word<3>(xv[mt][0]));
        mma_16816<T>(part[mt], a[2], word<0>(xv[mt][1]), word<1>(xv[mt][1]));
        mma_16816<T>(part[mt], a[3], word<2>(xv[mt][1]), word<3>(xv[mt][1]));
      }
      if ((c + 1) % group_chunks == 0 || c + 1 == c_end) {   // end of a group: apply scales
        const float2 s = __ldg(sp + grp * 8);                 // (row g, row g + 8)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          acc[mt][0] += s.x * part[mt][0];
          acc[mt][1] += s.x * part[mt][1];
          acc[mt][2] += s.y * part[mt][2];
          acc[mt][3] += s.y * part[mt][3];
#pragma unroll
          for (int i = 0; i < 4; ++i) part[mt][i] = 0.f;
        }
      }
    }
  }

  // C fragment: c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1],
  // rows = output features of the tile, columns = batch rows of the 8-row slab.
  __shared__ float red[8][MT * 8][16];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    red[warp][mt * 8 + 2 * t][g] = acc[mt][0];
    red[warp][mt * 8 + 2 * t + 1][g] = acc[mt][1];
    red[warp][mt * 8 + 2 * t][g + 8] = acc[mt][2];
    red[warp][mt * 8 + 2 * t + 1][g + 8] = acc[mt][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < MT * 8 * 16; i += blockDim.x) {
    const int m = i / 16, nn = i % 16;
    float sum = 0.f;
    for (int w = 0; w < warps; ++w) sum += red[w][m][nn];
    const int gm = m_base + m, gn = tile * 16 + nn;
    if (gm < M && gn < N) y[(size_t)gm * N + gn] = Dtype<T>::from_float(sum);
  }
}

// Warps per block (8, 4, 2 or 1, splitting K): the choice with the least time estimated as
// waves x chunks per warp, where a wave is as many blocks as the GPU holds at once; ties go
// to fewer waves. This avoids a second, mostly idle wave (512 tiles of 8 warps do not fit on
// one H100 at once; of 4 warps they do).
template <typename T, int MT>
cudaError_t launch_tiles(const T* x, const uint4* qw, const float2* sp, const uint32_t* zp, T* y,
                         int M, int N, int K, int group_chunks, int G, cudaStream_t stream) {
  static int sms = 0, fits[4] = {0, 0, 0, 0};   // per process: one GPU model assumed
  const int warp_options[4] = {8, 4, 2, 1};
  auto kernel = int4_decode_kernel<T, MT>;
  if (sms == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    for (int i = 0; i < 4; ++i)
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fits[i], kernel, warp_options[i] * 32, 0);
  }
  const long long blocks = (long long)((N + 15) / 16) * ((M + 8 * MT - 1) / (8 * MT));
  int warps = 1;
  double best = 1e30;
  for (int i = 0; i < 4; ++i) {
    const int w = warp_options[i];
    if (w > K / 64 || fits[i] <= 0) continue;
    const long long waves = (blocks + (long long)fits[i] * sms - 1) / ((long long)fits[i] * sms);
    const double cost = (double)waves * ((K / 64 + w - 1) / w) + 1e-3 * waves;
    if (cost < best) best = cost, warps = w;
  }
  kernel<<<dim3((N + 15) / 16, (M + 8 * MT - 1) / (8 * MT)), warps * 32, 0, stream>>>(
      x, qw, sp, zp, y, M, N, K, group_chunks, G);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const void* x, const void* qweight, const void* scales, const void* zeros,
                   void* y, int M, int N, int K, int group_size, int G, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  const uint4* qw = static_cast<const uint4*>(qweight);
  const float2* sp = static_cast<const float2*>(scales);
  const uint32_t* zp = static_cast<const uint32_t*>(zeros);
  if (M <= 8) return launch_tiles<T, 1>(xp, qw, sp, zp, yp, M, N, K, group_size / 64, G, stream);
  return launch_tiles<T, 2>(xp, qw, sp, zp, yp, M, N, K, group_size / 64, G, stream);
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
