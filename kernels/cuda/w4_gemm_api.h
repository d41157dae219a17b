// The C interface between the torch binding (w4_binding.cpp) and the CUTLASS W4A16 GEMMs
// (w4_gemm_*.cu), so the binding compiles without CUTLASS and each GEMM in its own unit.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>

struct GptqLabW4Args {
  const void* x;        // [M, K] fp16/bf16, row-major
  const void* w;        // [N, K] 4-bit: the CUDA decode layout's qweight
  const void* scales;   // [K/g, N] x's dtype
  const void* zeros;    // [K/g, N] x's dtype: -scale * zero point
  void* y;              // [M, N] x's dtype
  int M, N, K, group_size;
  void* workspace;      // workspace_bytes(...) bytes, or nullptr when that is 0
};

// Every compiled configuration: X(name, dtype (0 fp16, 1 bf16), batch rows per tile,
// stream-K, inputs per k-block, CTAs per cluster). Each has a w4_gemm_<name>.cu that defines it
// with the same values (a CPU test checks).
#define GPTQ_LAB_W4_CONFIGS(X)        \
  X(f16_64_sk, 0, 64, 1, 64, 1)       \
  X(f16_128_sk, 0, 128, 1, 64, 1)     \
  X(f16_128, 0, 128, 0, 64, 1)        \
  X(f16_256, 0, 256, 0, 64, 1)        \
  X(bf16_128_sk, 1, 128, 1, 64, 1)    \
  X(bf16_256, 1, 256, 0, 64, 1)       \
  X(f16_256_c2, 0, 256, 0, 64, 2)     \
  X(f16_256_sk, 0, 256, 1, 64, 1)

#define GPTQ_LAB_W4_DECLARE(name, dtype, tile_n, stream_k, tile_k, cluster)             \
  extern "C" cudaError_t gptq_lab_w4_##name(const GptqLabW4Args* a, cudaStream_t s);  \
  extern "C" size_t gptq_lab_w4_##name##_workspace(int M, int N, int K, int group_size);
GPTQ_LAB_W4_CONFIGS(GPTQ_LAB_W4_DECLARE)
