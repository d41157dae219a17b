// One configuration of the W4A16 GEMM (w4_gemm.cuh, w4_gemm_api.h).
#include "w4_gemm.cuh"
GPTQ_LAB_W4_DEFINE(f16_256, cutlass::half_t, 256, false, 64)
