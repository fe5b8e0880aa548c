// Declarations of the kernels' host entry points, registered as the native ops in ops.cpp.
// Contract (layout, qparams, dtypes): bquant_kernels/backends/__init__.py.
#pragma once

// ATen only (not torch/extension.h): the .cu files include this header, and nvcc compiles the whole
// C++ frontend and pybind11 several times slower.
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace bquant {

// Checked by bquant_kernels/extension.py against its API_VERSION (the one other place it is written):
// bump both whenever an op's schema or behaviour changes, so that a stale build is refused.
constexpr int kApiVersion = 4;

// The five kernels of a compiled backend (`prefix` cpu or cuda): the functions of the backend
// contract (bquant_kernels/backends/__init__.py), registered as native ops in ops.cpp. x is dense,
// contiguous or channels_last; element i belongs to channel (i / inner) % C.
#define BQUANT_DECLARE_KERNELS(prefix)                                                                             \
  at::Tensor prefix##_batch_range(const at::Tensor& x, int64_t C, int64_t inner);                                  \
  std::tuple<at::Tensor, at::Tensor> prefix##_batchquant_forward(                                                  \
      const at::Tensor& x, const at::Tensor& theta, const at::Tensor& offset, const std::optional<at::Tensor>& lo_hi, \
      int64_t bits, bool is_signed, int64_t C, int64_t inner);                                                     \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix##_batchquant_backward(                                     \
      const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& offset, const at::Tensor& qparams,          \
      int64_t bits, bool is_signed);                                                                               \
  at::Tensor prefix##_lsq_forward(const at::Tensor& w, const at::Tensor& step, int64_t bits, bool is_signed);      \
  std::tuple<at::Tensor, at::Tensor> prefix##_lsq_backward(const at::Tensor& grad, const at::Tensor& w,            \
                                                           const at::Tensor& step, int64_t bits, bool is_signed,   \
                                                           int64_t numel_full);

BQUANT_DECLARE_KERNELS(cpu)

#ifdef BQUANT_WITH_CUDA
BQUANT_DECLARE_KERNELS(cuda)

// Multi-tensor LSQ (bquant_kernels/lsq_multi.py): one dtype and device per call, dense weights,
// per-tensor bits; the backward returns the grad_w list and float32 step gradients [len(weights)].
std::vector<at::Tensor> cuda_lsq_multi_forward(const std::vector<at::Tensor>& weights,
                                               const std::vector<at::Tensor>& steps, const std::vector<int64_t>& bits,
                                               bool is_signed);
std::tuple<std::vector<at::Tensor>, at::Tensor> cuda_lsq_multi_backward(const std::vector<at::Tensor>& grads,
                                                                        const std::vector<at::Tensor>& weights,
                                                                        const std::vector<at::Tensor>& steps,
                                                                        const std::vector<int64_t>& bits,
                                                                        bool is_signed,
                                                                        const std::vector<int64_t>& numel_full);
#endif

// Whether x is dense with the channel dimension (1) innermost, i.e. x.permute(0, 2, ..., d-1, 1)
// is contiguous (channels_last for 4-D): read from the strides, no view is made.
inline bool channels_innermost(const at::Tensor& x) {
  const int64_t d = x.dim();
  int64_t expected = 1;
  const auto check = [&](int64_t dim) {
    if (x.size(dim) != 1 && x.stride(dim) != expected) return false;
    expected *= x.size(dim);
    return true;
  };
  if (!check(1)) return false;
  for (int64_t dim = d - 1; dim >= 2; --dim) {
    if (!check(dim)) return false;
  }
  return check(0);
}

// A kernel's [1] scalar gradient in the shape and dtype of its 1-element parameter (any shape: 0-d,
// [1], [1, 1]...). Itself when it already has them: a view and Tensor::to would still be dispatched
// ops, and the backward of every quantizer call returns two such scalars.
inline at::Tensor as_param(at::Tensor grad, at::IntArrayRef sizes, at::ScalarType dtype) {
  if (grad.sizes() != sizes) grad = grad.view(sizes);
  return grad.scalar_type() == dtype ? grad : grad.to(dtype);
}

}  // namespace bquant
