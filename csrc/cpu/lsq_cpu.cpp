// LSQ on the CPU (spec 2): one pass for the forward, one for the backward (grad_w and the step
// gradient's sum, over fixed chunks combined in chunk order).
#include <cmath>
#include <vector>

#include "bquant.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_kernels.h"

namespace bquant {
namespace {

void check_lsq_inputs(const at::Tensor& w, const at::Tensor& step, int64_t bits) {
  cpu::check_dense_input(w, "w");
  cpu::check_cpu_floating(step, "step", 1);
  cpu::check_bits(bits);
}

}  // namespace

at::Tensor cpu_lsq_forward(const at::Tensor& w, const at::Tensor& step, int64_t bits, bool is_signed) {
  check_lsq_inputs(w, step, bits);
  const Grid grid = lsq_grid(static_cast<int>(bits), is_signed);
  const double step_v = cpu::read_scalar(step);
  at::Tensor out = at::empty_like(w);
  BQ_DISPATCH_CPU_FLOATING(w.scalar_type(), "bquant_cpu_lsq_forward", [&] {
    using A = cpu::acc_t<scalar_t>;
    const A abs_step = std::abs(static_cast<A>(step_v));  // |s| in the math dtype, like the reference
    const auto& k = cpu::kernels<scalar_t>();
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    cpu::parallel_chunks(w.numel(),
                         [&](int64_t, int64_t b, int64_t e) { k.lsq_forward(pw + b, po + b, e - b, abs_step, grid); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cpu_lsq_backward(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& step,
                                                    int64_t bits, bool is_signed, int64_t numel_full) {
  check_lsq_inputs(w, step, bits);
  cpu::check_same_layout(grad, "grad", w, "w");
  TORCH_CHECK(numel_full >= w.numel(), "bquant cpu: numel_full must be >= w.numel() (", w.numel(), "), got ",
              numel_full);
  const Grid grid = lsq_grid(static_cast<int>(bits), is_signed);
  const double step_v = cpu::read_scalar(step);
  // Gradient scale of spec 2, 1 / sqrt(N_full * Qp), as the reference computes it (in double).
  const double grad_scale = 1.0 / std::sqrt(static_cast<double>(numel_full) * static_cast<double>(grid.qmax));
  at::Tensor grad_w = at::empty_like(w);
  at::Tensor grad_step = at::empty({1}, w.options().dtype(cpu::math_dtype(w.scalar_type())));
  BQ_DISPATCH_CPU_FLOATING(w.scalar_type(), "bquant_cpu_lsq_backward", [&] {
    using A = cpu::acc_t<scalar_t>;
    const A raw_step = static_cast<A>(step_v);
    const A abs_step = std::abs(raw_step);
    const auto& k = cpu::kernels<scalar_t>();
    const scalar_t* pg = grad.const_data_ptr<scalar_t>();
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    scalar_t* pgw = grad_w.data_ptr<scalar_t>();
    const int64_t n = w.numel();
    std::vector<double> partial(cpu::ceil_div(n, cpu::kChunk));
    cpu::parallel_chunks(n, [&](int64_t c, int64_t b, int64_t e) {
      partial[c] = k.lsq_backward(pg + b, pw + b, pgw + b, e - b, abs_step, grid);
    });
    double sum = 0.0;
    for (const double s : partial) sum += s;
    // sign(s) like torch.sign: 0 for 0 and NaN.
    const double sign = static_cast<double>((A(0) < raw_step) - (raw_step < A(0)));
    grad_step.data_ptr<A>()[0] = static_cast<A>(sum * grad_scale * sign);
  });
  return {grad_w, grad_step};
}

}  // namespace bquant
