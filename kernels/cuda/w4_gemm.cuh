// A W4A16 GEMM for large batches on Hopper (sm_90a): y [M, N] = x [M, K] @ W^T, W 4-bit [N, K]
// with group scales and zeros, built from CUTLASS's mixed-input collective (TMA loads, warp-
// specialized wgmma with the weights upconverted in registers; CUTLASS example 55). It reads
// the CUDA decode kernel's own weight layout, so a layer needs no second copy of its weights.
//
// Layouts (device pointers, 16-byte aligned):
//   x       [M, K]          fp16/bf16, row-major, K in the layout's order (below); K % 64 == 0
//   w       [N, K] 4-bit    the decode layout's qweight (DecodeAtom); N % 16 == 0
//   scales  [K/g, N]        x's dtype, N contiguous
//   zeros   [K/g, N]        x's dtype: -scale * zero point, so w = scale * code + zeros
//   y       [M, N]          x's dtype, row-major
// The group size g is K (per-channel) or a multiple of 64 (the tile's K).
//
// CUTLASS puts the narrow operand in the register file, so the problem runs swapped: the
// weights are wgmma's A operand (N plays CUTLASS's M) and the batch is its N; the epilogue
// writes the transpose, i.e. y row-major.
#pragma once

#include <cuda_runtime.h>

#include "w4_gemm_api.h"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace gptq_lab_w4 {
using namespace cute;

// The weights are read straight from the CUDA decode kernel's layout (int4_common.cuh,
// cuda_pack.py): per tile of 16 outputs and chunk of 64 inputs, lane 4g + t of a warp holds 16
// bytes, the codes of its four m16n8k16 A fragments (one per k-tile j, in the value order
// [0,2,4,6,1,3,5,7] of CUTLASS's int4 -> 16-bit converters); wgmma's register A operand has
// the same fragment per warp, so each thread's codes for four k-blocks are one 128-bit load.
// (n, k) -> element offset, with n = g + 8 n1 and k = k0 + 2 t + 8 k2 + 16 j inside the
// 16 x 64 unit, k in the layout's own order (the GEMM's x is permuted to match, w4_ops.py):
//   32 (4 g + t) + 8 j + n1 + 2 k2 + 4 k0.   Units follow each other along N, then along K.
using DecodeAtom = Layout<Shape<Shape<_8, _2>, Shape<_2, _4, _2, _4>>,
                          Stride<Stride<_128, _1>, Stride<_4, _32, _2, _8>>>;

using StrideW = cutlass::detail::TagToStrideB_t<cutlass::layout::ColumnMajor>;  // (N, K, L), K stride 1
using StrideX = cutlass::detail::TagToStrideA_t<cutlass::layout::RowMajor>;     // (M, K, L), K stride 1

using LayoutW = decltype(tile_to_shape(DecodeAtom{}, Layout<Shape<int, int, int>, StrideW>{}));

// Codes are unsigned (0..15) with per-group scales and zeros (w = scale * code + zeros);
// TileN: the batch rows per tile; StreamK: split K across CTAs when the tiles are fewer than
// the SMs; TileK: inputs per k-block (the group size must be a multiple of it, or K);
// ClusterM: CTAs per cluster along the weights' N, which share each x tile (TMA multicast).
template <class Mma, int TileN, bool StreamK, int TileK = 64, int ClusterM = 1>
struct Gemm {
  using Quant = cutlass::uint4b_t;
  using TileShape = Shape<_128, Int<TileN>, Int<TileK>>;
  using ClusterShape = Shape<Int<ClusterM>, _1, _1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::ColumnMajor, 8,    // no C
      Mma, cutlass::layout::ColumnMajor, 8,     // D^T: y [M, N] row-major
      cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      cute::tuple<Quant, Mma, Mma>, LayoutW, 32,
      Mma, cutlass::layout::ColumnMajor, 8,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Scheduler = std::conditional_t<StreamK, cutlass::gemm::StreamKScheduler, void>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Device::Arguments arguments(const void* x, const void* w, const void* scales,
                                              const void* zeros, void* y, int M, int N, int K,
                                              int group_size) {
    using StrideS = typename Mainloop::StrideScale;
    const int scale_k = (K + group_size - 1) / group_size;
    auto layout_w = tile_to_shape(DecodeAtom{}, make_shape(N, K, 1));
    auto stride_x = cutlass::make_cute_packed_stride(StrideX{}, make_shape(M, K, 1));
    auto stride_s = cutlass::make_cute_packed_stride(StrideS{}, make_shape(N, scale_k, 1));
    auto stride_y = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(N, M, 1));
    typename Device::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm, {N, M, K, 1},
        {static_cast<const Quant*>(w), layout_w, static_cast<const Mma*>(x), stride_x,
         static_cast<const Mma*>(scales), stride_s, group_size, static_cast<const Mma*>(zeros)},
        {{1.0f, 0.0f}, nullptr, typename Kernel::StrideC{}, static_cast<Mma*>(y), stride_y}};
    return args;
  }

  // workspace == nullptr: returns the workspace bytes needed (as a cudaError_t-free size).
  static size_t workspace(int M, int N, int K, int group_size) {
    return Device::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K, group_size));
  }

  static cudaError_t run(const void* x, const void* w, const void* scales, const void* zeros, void* y,
                         int M, int N, int K, int group_size, void* workspace, cudaStream_t stream) {
    auto args = arguments(x, w, scales, zeros, y, M, N, K, group_size);
    Device gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return cudaGetLastError() != cudaSuccess ? cudaErrorLaunchFailure : cudaErrorUnknown;
    return cudaSuccess;
  }
};

}  // namespace gptq_lab_w4

// Defines the C entry points of one configuration (see w4_gemm_api.h).
#define GPTQ_LAB_W4_DEFINE(name, Mma, tile_n, stream_k, tile_k, ...)                        \
  using Gemm_##name = gptq_lab_w4::Gemm<Mma, tile_n, stream_k, tile_k, ##__VA_ARGS__>;      \
  extern "C" cudaError_t gptq_lab_w4_##name(const GptqLabW4Args* a, cudaStream_t s) {            \
    return Gemm_##name::run(a->x, a->w, a->scales, a->zeros, a->y, a->M, a->N, a->K,              \
                            a->group_size, a->workspace, s);                                       \
  }                                                                                                \
  extern "C" size_t gptq_lab_w4_##name##_workspace(int M, int N, int K, int group_size) {         \
    return Gemm_##name::workspace(M, N, K, group_size);                                            \
  }
