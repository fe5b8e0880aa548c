// Declarations of the kernels' host entry points, bound to Python in bindings.cpp.
// Contract (layout, qparams, dtypes): bquant_kernels/backends/__init__.py.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

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
#endif

}  // namespace bquant
