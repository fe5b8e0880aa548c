// Declarations of the kernels' host entry points, bound to Python in bindings.cpp.
// Contract (layout, qparams, dtypes): bquant_kernels/backends/__init__.py.
#pragma once

// ATen only (not torch/extension.h): the .cu files include this header, and nvcc compiles the whole
// C++ frontend and pybind11 several times slower. bindings.cpp includes torch/extension.h itself.
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace bquant {

// x is dense, contiguous or channels_last; element i belongs to channel (i / inner) % C.
at::Tensor cpu_batch_range(const at::Tensor& x, int64_t C, int64_t inner);
std::tuple<at::Tensor, at::Tensor> cpu_batchquant_forward(const at::Tensor& x, const at::Tensor& theta,
                                                          const at::Tensor& offset,
                                                          const std::optional<at::Tensor>& lo_hi, int64_t bits,
                                                          bool is_signed, int64_t C, int64_t inner);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_batchquant_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                       const at::Tensor& offset,
                                                                       const at::Tensor& qparams, int64_t bits,
                                                                       bool is_signed);
at::Tensor cpu_lsq_forward(const at::Tensor& w, const at::Tensor& step, int64_t bits, bool is_signed);
std::tuple<at::Tensor, at::Tensor> cpu_lsq_backward(const at::Tensor& grad, const at::Tensor& w,
                                                    const at::Tensor& step, int64_t bits, bool is_signed,
                                                    int64_t numel_full);

#ifdef BQUANT_WITH_CUDA
at::Tensor cuda_batch_range(const at::Tensor& x, int64_t C, int64_t inner);
std::tuple<at::Tensor, at::Tensor> cuda_batchquant_forward(const at::Tensor& x, const at::Tensor& theta,
                                                           const at::Tensor& offset,
                                                           const std::optional<at::Tensor>& lo_hi, int64_t bits,
                                                           bool is_signed, int64_t C, int64_t inner);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_batchquant_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                        const at::Tensor& offset,
                                                                        const at::Tensor& qparams, int64_t bits,
                                                                        bool is_signed);
at::Tensor cuda_lsq_forward(const at::Tensor& w, const at::Tensor& step, int64_t bits, bool is_signed);
std::tuple<at::Tensor, at::Tensor> cuda_lsq_backward(const at::Tensor& grad, const at::Tensor& w,
                                                     const at::Tensor& step, int64_t bits, bool is_signed,
                                                     int64_t numel_full);
// Multi-tensor LSQ (bquant_kernels/multi_tensor.py): one dtype and device per call, dense weights,
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

}  // namespace bquant
