// Torch binding of the CUTLASS W4A16 GEMMs (w4_gemm_*.cu): checks the tensors, allocates the
// output and the workspace, launches on torch's stream. The weights are the CUDA decode
// kernel's layout (cuda_pack.py); w4_pack.py makes the rest.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "w4_gemm_api.h"

namespace {
struct Config {
  const char* name;
  int dtype, tile_n, stream_k, tile_k, cluster;
  cudaError_t (*run)(const GptqLabW4Args*, cudaStream_t);
  size_t (*workspace)(int, int, int, int);
};

#define GPTQ_LAB_W4_ROW(name, dtype, tile_n, stream_k, tile_k, cluster) \
  {#name, dtype, tile_n, stream_k, tile_k, cluster, gptq_lab_w4_##name, gptq_lab_w4_##name##_workspace},
const Config kConfigs[] = {GPTQ_LAB_W4_CONFIGS(GPTQ_LAB_W4_ROW)};

const Config& find(const std::string& name) {
  for (const Config& c : kConfigs)
    if (name == c.name) return c;
  TORCH_CHECK(false, "no W4 GEMM configuration named '", name, "'");
}

void check_aligned(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, what, " must be 16-byte aligned");
}
}  // namespace

// (name, dtype 0 fp16 / 1 bf16, batch rows per tile, stream-K, inputs per k-block, CTAs per
// cluster) of every build.
std::vector<std::tuple<std::string, int64_t, int64_t, bool, int64_t, int64_t>> w4_configs() {
  std::vector<std::tuple<std::string, int64_t, int64_t, bool, int64_t, int64_t>> out;
  for (const Config& c : kConfigs)
    out.emplace_back(c.name, c.dtype, c.tile_n, c.stream_k != 0, c.tile_k, c.cluster);
  return out;
}

// x [M, K] fp16/bf16 contiguous (the GEMM's column order); qweight: the CUDA decode layout,
// int32 [K/64, N/16, 32, 4]; scales and zeros [K/g, N] in x's dtype -> y [M, N] in x's dtype.
// K a multiple of the configuration's k-block, N of 16, g of it or g == K.
torch::Tensor w4_gemm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                      torch::Tensor zeros, int64_t group_size, const std::string& config) {
  const Config& c = find(config);
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  const auto dtype = c.dtype ? at::kBFloat16 : at::kHalf;
  TORCH_CHECK(x.scalar_type() == dtype, "configuration ", c.name, " takes ", dtype, " activations, got ",
              x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1), n = scales.size(1);
  TORCH_CHECK(k % c.tile_k == 0 && n % 16 == 0, "K (", k, ") must be a multiple of ", c.tile_k,
              " and N (", n, ") of 16 for configuration ", c.name);
  TORCH_CHECK(group_size == k || (group_size > 0 && group_size % c.tile_k == 0 && k % group_size == 0),
              "group_size (", group_size, ") must be K (", k, ") or a multiple of ", c.tile_k,
              " dividing it for configuration ", c.name);
  TORCH_CHECK(qweight.is_cuda() && qweight.is_contiguous() && qweight.scalar_type() == at::kInt &&
                  qweight.numel() == n * k / 8,
              "qweight must be the contiguous int32 decode layout of N=", n, ", K=", k);
  TORCH_CHECK(scales.is_cuda() && scales.is_contiguous() && scales.scalar_type() == dtype &&
                  scales.dim() == 2 && scales.size(0) == k / group_size,
              "scales must be contiguous [", k / group_size, ", N] in ", dtype);
  TORCH_CHECK(zeros.is_cuda() && zeros.is_contiguous() && zeros.sizes() == scales.sizes() &&
                  zeros.scalar_type() == dtype, "zeros must match scales");
  check_aligned(x, "x");
  check_aligned(qweight, "qweight");
  check_aligned(scales, "scales");
  check_aligned(zeros, "zeros");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({m, n}, x.options());
  if (m == 0) return y;
  const size_t ws = c.workspace(static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                                static_cast<int>(group_size));
  torch::Tensor workspace = torch::empty({static_cast<int64_t>(ws)}, x.options().dtype(at::kByte));
  GptqLabW4Args args{x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                     y.data_ptr(), static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                     static_cast<int>(group_size), ws ? workspace.data_ptr() : nullptr};
  const cudaError_t err = c.run(&args, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gptq_lab W4 GEMM (", c.name, ") failed: ", cudaGetErrorString(err),
              " (M=", m, ", N=", n, ", K=", k, ", group_size=", group_size, ")");
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w4_configs", &w4_configs, "the compiled W4 GEMM configurations");
  m.def("w4_gemm", &w4_gemm, "y = x @ W^T, W the int4 decode layout (CUTLASS, sm_90a)",
        pybind11::arg("x"), pybind11::arg("qweight"), pybind11::arg("scales"), pybind11::arg("zeros"),
        pybind11::arg("group_size"), pybind11::arg("config"));
}
