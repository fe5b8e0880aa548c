// LSQ CUDA kernels (docs/spec-batchquant.md, section 2): one launch forward, one launch backward.
// The step gradient is reduced like the BatchQuant backward: fp32 per-block partials, summed in
// double in a fixed order by the last block, so it is bitwise reproducible run to run.
#include <cmath>

#include "bquant.h"
#include "cuda/common.cuh"
#include "cuda/lsq_common.cuh"

namespace bquant {
namespace gpu {
namespace {

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    lsq_forward_kernel(const T* __restrict__ w, T* __restrict__ out, int64_t numel, ScalarRef step, Grid grid) {
  const float abs_step = fabsf(static_cast<float>(load_scalar(step)));
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  map_unary<T, kVectorized>(w, out, numel, first, stride, [&](float v) { return lsq_elem(v, abs_step, grid); });
}

struct LSQBackwardArgs {
  int64_t numel;
  ScalarRef step;
  Grid grid;
  double grad_scale;  // k = 1 / sqrt(numel_full * Qp)
  float* partials;    // [gridDim.x]
  unsigned int* counter;
  float* grad_step;
};

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads) lsq_backward_kernel(const T* __restrict__ grad, const T* __restrict__ w,
                                                                T* __restrict__ grad_w, LSQBackwardArgs a) {
  const float step = static_cast<float>(load_scalar(a.step));
  const float abs_step = fabsf(step);
  float sum = 0.0f;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  map_binary<T, kVectorized>(grad, w, grad_w, a.numel, first, stride, [&](float g, float v) {
    const LSQGrad d = lsq_elem_backward(g, v, abs_step, a.grid);
    sum += d.ds_term;
    return d.grad_w;
  });

  __shared__ float scratch[kWarps];
  sum = block_reduce(sum, SumOp{}, 0.0f, scratch);
  if (threadIdx.x == 0) a.partials[blockIdx.x] = sum;
  if (!arrive_last(a.counter, gridDim.x)) return;
  const double total = sum_partials(a.partials, gridDim.x);
  if (threadIdx.x == 0) *a.grad_step = lsq_step_grad(total, a.grad_scale, step);
}

}  // namespace
}  // namespace gpu

at::Tensor cuda_lsq_forward(const at::Tensor& w, const at::Tensor& step, int64_t bits, bool is_signed) {
  gpu::check_cuda_input(w, "w");
  gpu::check_lsq_bits(bits);
  const gpu::ScalarRef step_ref = gpu::param_ref(step, w, "step", 1);
  const c10::cuda::CUDAGuard guard(w.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Grid grid = lsq_grid(static_cast<int>(bits), is_signed);

  at::Tensor out = at::empty_like(w);
  BQ_DISPATCH_FLOATING(w.scalar_type(), "bquant_lsq_forward", [&] {
    using T = scalar_t;
    const bool vectorized = gpu::all_aligned16({w.data_ptr(), out.data_ptr()});
    const auto kernel = vectorized ? gpu::lsq_forward_kernel<T, true> : gpu::lsq_forward_kernel<T, false>;
    const int64_t work = vectorized ? (w.numel() + gpu::kVec<T> - 1) / gpu::kVec<T> : w.numel();
    const int64_t blocks = gpu::grid_for(reinterpret_cast<const void*>(kernel), work);
    kernel<<<blocks, gpu::kThreads, 0, stream>>>(w.const_data_ptr<T>(), out.mutable_data_ptr<T>(), w.numel(),
                                                 step_ref, grid);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cuda_lsq_backward(const at::Tensor& grad, const at::Tensor& w,
                                                     const at::Tensor& step, int64_t bits, bool is_signed,
                                                     int64_t numel_full) {
  gpu::check_cuda_input(w, "w");
  gpu::check_same_layout(grad, w, "grad", "w");
  gpu::check_lsq_bits(bits);
  const gpu::ScalarRef step_ref = gpu::param_ref(step, w, "step", 1);
  const c10::cuda::CUDAGuard guard(w.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Grid grid = lsq_grid(static_cast<int>(bits), is_signed);
  const double grad_scale = gpu::lsq_grad_scale(numel_full, w.numel(), grid);

  at::Tensor grad_w = at::empty_like(w);
  at::Tensor grad_step = at::empty({1}, w.options().dtype(at::kFloat));
  BQ_DISPATCH_FLOATING(w.scalar_type(), "bquant_lsq_backward", [&] {
    using T = scalar_t;
    const bool vectorized = gpu::all_aligned16({grad.data_ptr(), w.data_ptr(), grad_w.data_ptr()});
    const auto kernel = vectorized ? gpu::lsq_backward_kernel<T, true> : gpu::lsq_backward_kernel<T, false>;
    const int64_t work = vectorized ? (w.numel() + gpu::kVec<T> - 1) / gpu::kVec<T> : w.numel();
    const int64_t blocks = gpu::grid_for(reinterpret_cast<const void*>(kernel), work);
    gpu::Workspace ws = gpu::make_workspace(w, blocks * static_cast<int64_t>(sizeof(float)), 1);
    const gpu::LSQBackwardArgs args{w.numel(),
                                    step_ref,
                                    grid,
                                    grad_scale,
                                    static_cast<float*>(ws.partials),
                                    ws.counters,
                                    grad_step.mutable_data_ptr<float>()};
    kernel<<<blocks, gpu::kThreads, 0, stream>>>(grad.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                                 grad_w.mutable_data_ptr<T>(), args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_w, grad_step};
}

}  // namespace bquant
