// W [N, K] dequantized from the layout described in int4_common.cuh, for large batches
// (prefill), where a cuBLAS matmul does the product.
#include "int4_common.cuh"

namespace gptq_lab {
namespace {   // internal linkage, as in int4_common.cuh

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
  // staged stores: per warp 16 rows of 8 16-byte words, padded to 9 (conflict-free both ways)
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

