// Torch binding of the int4 CUDA kernels (int4_decode.cu, int4_dequant.cu): checks the tensors,
// allocates outputs, launches on torch's stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

extern "C" cudaError_t gptq_lab_int4_decode(const void* x, const void* qweight, const void* meta,
                                            void* y, int M, int N, int K, int group_size,
                                            int warps, int nt, int dtype, cudaStream_t stream);
extern "C" cudaError_t gptq_lab_int4_dequant(const void* qweight, const void* meta, void* w,
                                             int N, int K, int group_size, int dtype,
                                             cudaStream_t stream);

static void check_layout(const torch::Tensor& qweight, const torch::Tensor& meta, int64_t k,
                         int64_t n, int64_t group_size) {
  TORCH_CHECK(k % 64 == 0 && group_size % 64 == 0 && k % group_size == 0,
              "K (", k, ") and group_size (", group_size, ") must be multiples of 64, K of group_size");
  const int64_t tiles = (n + 15) / 16, groups = k / group_size;
  TORCH_CHECK(qweight.is_cuda() && qweight.numel() == tiles * (k / 64) * 32 * 4 && qweight.is_contiguous(),
              "qweight does not match K=", k, ", N=", n);
  TORCH_CHECK(meta.is_cuda() && meta.numel() == groups * tiles * 8 * 2 && meta.is_contiguous(),
              "meta does not match the layout (K=", k, ", N=", n, ", group_size=", group_size, ")");
  TORCH_CHECK(meta.scalar_type() == at::kInt && qweight.scalar_type() == at::kInt,
              "qweight and meta must be packed int32");
}

// x [M, K] fp16/bf16 contiguous (K a multiple of 64) -> y [M, n] in x's dtype.
// warps (per block), nt (tiles of 16 outputs per block): 0 is the launcher's choice; other
// values are for tuning.
torch::Tensor int4_decode(torch::Tensor x, torch::Tensor qweight, torch::Tensor meta,
                          int64_t group_size, int64_t n, int64_t warps, int64_t nt) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "x must be float16 or bfloat16, got ", x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  check_layout(qweight, meta, k, n, group_size);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({m, n}, x.options());
  const int dtype = x.scalar_type() == at::kBFloat16 ? 1 : 0;
  const cudaError_t err = gptq_lab_int4_decode(
      x.data_ptr(), qweight.data_ptr(), meta.data_ptr(), y.data_ptr(), static_cast<int>(m),
      static_cast<int>(n), static_cast<int>(k), static_cast<int>(group_size),
      static_cast<int>(warps), static_cast<int>(nt), dtype, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gptq_lab int4_decode launch failed: ", cudaGetErrorString(err));
  return y;
}

// w [N, K] fp16/bf16 contiguous <- the weight dequantized from the layout (in place).
void int4_dequant(torch::Tensor qweight, torch::Tensor meta, int64_t group_size, torch::Tensor w) {
  TORCH_CHECK(w.is_cuda() && w.dim() == 2 && w.is_contiguous(), "w must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16,
              "w must be float16 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0, "w must be 16-byte aligned");
  const int64_t n = w.size(0), k = w.size(1);
  check_layout(qweight, meta, k, n, group_size);
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaError_t err = gptq_lab_int4_dequant(
      qweight.data_ptr(), meta.data_ptr(), w.data_ptr(), static_cast<int>(n), static_cast<int>(k),
      static_cast<int>(group_size), w.scalar_type() == at::kBFloat16 ? 1 : 0,
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gptq_lab int4_dequant launch failed: ", cudaGetErrorString(err));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_decode", &int4_decode, "int4 GPTQ matmul for decode-sized batches",
        pybind11::arg("x"), pybind11::arg("qweight"), pybind11::arg("meta"),
        pybind11::arg("group_size"), pybind11::arg("n"), pybind11::arg("warps") = 0,
        pybind11::arg("nt") = 0);
  m.def("int4_dequant", &int4_dequant, "dequantize the int4 layout into w [N, K] (in place)",
        pybind11::arg("qweight"), pybind11::arg("meta"), pybind11::arg("group_size"),
        pybind11::arg("w"));
}
