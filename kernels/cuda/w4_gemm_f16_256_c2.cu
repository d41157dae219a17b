// One configuration of the W4A16 GEMM (w4_gemm.cuh, w4_gemm_api.h): tiles of 256 batch rows in
// clusters of two CTAs along the weights' N, which load each x tile once for both (multicast).
#include "w4_gemm.cuh"
GPTQ_LAB_W4_DEFINE(f16_256_c2, cutlass::half_t, 256, false, 64, 2)
