// One configuration of the W4A16 GEMM (w4_gemm.cuh, w4_gemm_api.h): tiles of 256 batch rows,
// stream-K (for products whose 256-row tiles are fewer than the SMs, e.g. N = 8192, M = 256).
#include "w4_gemm.cuh"
GPTQ_LAB_W4_DEFINE(f16_256_sk, cutlass::half_t, 256, true, 64)
