// A W4A16 GEMM for large batches on Hopper (sm_90a): y [M, N] = x [M, K] @ W^T, W int4 [N, K]
// with group scales (and zero points), built from CUTLASS's mixed-input collective (TMA loads,
// warp-specialized wgmma with the weights upconverted in registers, CUTLASS example 55).
//
// Layouts (all device pointers, 16-byte aligned):
//   x       [M, K]          fp16/bf16, row-major (K contiguous); K a multiple of 8
//   w       [N, K] 4-bit    K-major, two codes a byte (even k in the low nibble), then shuffled
//                           by w4_reorder into the order each thread's fragment is read in
//   scales  [K/g, N]        the activation dtype, N contiguous (GPTQ's own [G, N] layout)
//   zeros   [K/g, N]        (zero-point variants) -scale * zero, so w = scale * q + zeros
//   y       [M, N]          the activation dtype, row-major; N a multiple of 8
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

// The shuffled weight layout. wgmma reads its A operand from registers: in a 64 x 16 (N x K)
// MMA tile each warp owns 16 rows and each thread 8 values. The atom below stores, per warp's
// 16 x 16 block, each thread's 8 values next to each other (one 32-bit shared-memory load) in
// the order [0,2,4,6,1,3,5,7], which CUTLASS's int4 -> 16-bit converters expect (two LOP3s per
// 4 values). (n, k) -> offset within the 256-element block.
template <class Mma>
constexpr auto shuffle_atom() {
  using Op = decltype(SM90::GMMA::rs_op_selector<Mma, Mma, float, Shape<_64, _16, _32>>());
  auto tv = typename MMA_Traits<Op>::ALayout{};                       // (128 thr, 8 val) -> (n, k) in 64 x 16
  auto tv_warp = make_layout_like(composition(tv, make_shape(Int<32>{}, size<1>(tv))));
  auto nk_to_tv = right_inverse(tv_warp).with_shape(make_shape(Int<16>{}, Int<16>{}));  // -> thr + 32 * val
  using TvToOffset = Layout<Shape<_32, Shape<_2, _4>>, Stride<_8, Stride<_4, _1>>>;  // thr * 8 + shuffled val
  return composition(TvToOffset{}, nk_to_tv);
}

template <class Mma>
using ShuffleAtom = decltype(shuffle_atom<Mma>());

using StrideW = cutlass::detail::TagToStrideB_t<cutlass::layout::ColumnMajor>;  // (N, K, L), K stride 1
using StrideX = cutlass::detail::TagToStrideA_t<cutlass::layout::RowMajor>;     // (M, K, L), K stride 1

template <class Mma>
using LayoutWShuffled = decltype(tile_to_shape(ShuffleAtom<Mma>{}, Layout<Shape<int, int, int>, StrideW>{}));

// Quant: cutlass::int4b_t (codes - 8, scale only: symmetric GPTQ) or cutlass::uint4b_t (codes,
// scale and zero); TileN: the batch rows per tile; StreamK: split K across CTAs when the tiles
// are fewer than the SMs.
template <class Mma, class Quant, int TileN, bool StreamK>
struct Gemm {
  static constexpr bool kZero = std::is_same_v<Quant, cutlass::uint4b_t>;
  using TileShape = Shape<_128, Int<TileN>, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::ColumnMajor, 8,    // no C
      Mma, cutlass::layout::ColumnMajor, 8,     // D^T: y [M, N] row-major
      cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
  using WElement = std::conditional_t<kZero, cute::tuple<Quant, Mma, Mma>, cute::tuple<Quant, Mma>>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      WElement, LayoutWShuffled<Mma>, 32,
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
    auto layout_w = tile_to_shape(ShuffleAtom<Mma>{}, make_shape(N, K, 1));
    auto stride_x = cutlass::make_cute_packed_stride(StrideX{}, make_shape(M, K, 1));
    auto stride_s = cutlass::make_cute_packed_stride(StrideS{}, make_shape(N, scale_k, 1));
    auto stride_y = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(N, M, 1));
    typename Device::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm, {N, M, K, 1},
        {static_cast<const Quant*>(w), layout_w, static_cast<const Mma*>(x), stride_x,
         static_cast<const Mma*>(scales), stride_s, group_size},
        {{1.0f, 0.0f}, nullptr, typename Kernel::StrideC{}, static_cast<Mma*>(y), stride_y}};
    if constexpr (kZero) args.mainloop.ptr_Z = static_cast<const Mma*>(zeros);
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
#define GPTQ_LAB_W4_DEFINE(name, Mma, Quant, tile_n, stream_k)                                     \
  using Gemm_##name = gptq_lab_w4::Gemm<Mma, Quant, tile_n, stream_k>;                             \
  extern "C" cudaError_t gptq_lab_w4_##name(const GptqLabW4Args* a, cudaStream_t s) {            \
    return Gemm_##name::run(a->x, a->w, a->scales, a->zeros, a->y, a->M, a->N, a->K,              \
                            a->group_size, a->workspace, s);                                       \
  }                                                                                                \
  extern "C" size_t gptq_lab_w4_##name##_workspace(int M, int N, int K, int group_size) {         \
    return Gemm_##name::workspace(M, N, K, group_size);                                            \
  }
