// One configuration of the W4A16 GEMM (w4_gemm.cuh, w4_gemm_api.h): k-blocks of 128 inputs
// (half as many pipeline stages, each twice as long); group sizes that are multiples of 128.
#include "w4_gemm.cuh"
GPTQ_LAB_W4_DEFINE(f16_128_k128, cutlass::half_t, 128, false, 128)
