// BatchQuant on the CPU (spec 1): one pass over x for the batch range, one for the quantization,
// one for the backward. The contract is bquant_kernels/backends/__init__.py; the numbers are those
// of bquant_kernels/backends/reference.py.
#include <algorithm>
#include <utility>
#include <vector>

#include "bquant.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_kernels.h"

namespace bquant {
namespace cpu {
namespace {

// Statistics modes. Rows: each (o, c) row of `inner` elements reduced along its length, one partial
// result per row (2 / inner of x's size). Columns: x as an (outer, C * inner) matrix reduced over
// its rows in tasks of (a group of whole rows, kColBlock columns); a group has about kRowGroupElems
// elements and at least kMinGroupRows rows, one partial row per group. Rows of fewer than
// kRowModeMinInner elements, and matrices narrow enough for groups of kRowGroupElems, use columns.
constexpr int64_t kRowModeMinInner = 16;
constexpr int64_t kColBlock = 512;
constexpr int64_t kRowGroupElems = 65536;
constexpr int64_t kMinGroupRows = 16;

bool use_row_mode(int64_t C, int64_t inner) {
  return inner >= kRowModeMinInner && C * inner > kRowGroupElems / kMinGroupRows;
}

// Per-channel min and max of x viewed as (outer, C, inner), row mode: each (o, c) row, in segments
// of at most kChunk elements, reduced along its length.
template <typename T>
void channel_minmax_rows(const T* x, int64_t outer, int64_t C, int64_t inner, acc_t<T>* ch_min, acc_t<T>* ch_max) {
  using A = acc_t<T>;
  const Kernels<T>& k = kernels<T>();
  const int64_t rows = outer * C;
  const int64_t segs = ceil_div(inner, kChunk);
  const int64_t seg_len = ceil_div(inner, segs);
  std::vector<A> mn(rows * segs), mx(rows * segs);
  const int64_t grain = std::max<int64_t>(1, kMinParallelElems / std::min(inner, kChunk));
  at::parallel_for(0, rows * segs, grain, [&](int64_t u0, int64_t u1) {
    if (segs == 1) {
      k.row_minmax(x + u0 * inner, u1 - u0, inner, inner, mn.data() + u0, mx.data() + u0);
      return;
    }
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t start = (u % segs) * seg_len;
      const int64_t len = std::min(seg_len, inner - start);
      k.row_minmax(x + (u / segs) * inner + start, 1, len, len, &mn[u], &mx[u]);
    }
  });
  if (segs == 1) {  // an (outer, C) matrix of row results: fold its rows in order
    for (int64_t o = 1; o < outer; ++o) k.minmax_accumulate(mn.data(), mx.data(), &mn[o * C], &mx[o * C], C);
    std::copy_n(mn.data(), C, ch_min);
    std::copy_n(mx.data(), C, ch_max);
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    A lo = mn[c * segs], hi = mx[c * segs];
    for (int64_t o = 0; o < outer; ++o) {
      for (int64_t s = 0; s < segs; ++s) {
        const int64_t u = (o * C + c) * segs + s;
        lo = nan_min(lo, mn[u]);
        hi = nan_max(hi, mx[u]);
      }
    }
    ch_min[c] = lo;
    ch_max[c] = hi;
  }
}

// Per-channel min and max, column mode (channels_last, 2-D, short rows): x as an (outer, C * inner)
// matrix reduced over its rows in (row group, column block) tasks, the groups' partial results
// folded in group order, then the inner columns of each channel. Groups are a fixed number of rows,
// so the result does not depend on the thread count.
template <typename T>
void channel_minmax_cols(const T* x, int64_t outer, int64_t C, int64_t inner, acc_t<T>* ch_min, acc_t<T>* ch_max) {
  using A = acc_t<T>;
  const Kernels<T>& k = kernels<T>();
  const int64_t width = C * inner;
  const int64_t col_block = std::min(width, kColBlock);
  const int64_t col_blocks = ceil_div(width, col_block);
  const int64_t group_rows = std::max(kMinGroupRows, kRowGroupElems / width);
  const int64_t groups = ceil_div(outer, group_rows);
  std::vector<A> mn(groups * width), mx(groups * width);
  const int64_t grain = ceil_div(kMinParallelElems, group_rows * col_block);
  at::parallel_for(0, groups * col_blocks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t / col_blocks) * group_rows;
      const int64_t c0 = (t % col_blocks) * col_block;
      const int64_t offset = (t / col_blocks) * width + c0;
      k.col_minmax(x + r0 * width + c0, std::min(group_rows, outer - r0), std::min(col_block, width - c0), width,
                   mn.data() + offset, mx.data() + offset);
    }
  });
  for (int64_t g = 1; g < groups; ++g) {
    k.minmax_accumulate(mn.data(), mx.data(), mn.data() + g * width, mx.data() + g * width, width);
  }
  fold_channel_columns(mn.data(), mx.data(), C, inner, ch_min, ch_max);
}

// (lo, hi) of spec 1.1: means over channels of the per-channel min and max, summed in double in
// channel order.
std::pair<double, double> batch_range_of(const at::Tensor& x, int64_t C, int64_t inner) {
  const int64_t outer = x.numel() / (C * inner);
  double lo = 0.0, hi = 0.0;
  BQ_DISPATCH_CPU_FLOATING(x.scalar_type(), "bquant_cpu_batch_range", [&] {
    using A = acc_t<scalar_t>;
    std::vector<A> ch_min(C), ch_max(C);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    if (use_row_mode(C, inner)) {
      channel_minmax_rows(px, outer, C, inner, ch_min.data(), ch_max.data());
    } else {
      channel_minmax_cols(px, outer, C, inner, ch_min.data(), ch_max.data());
    }
    for (int64_t c = 0; c < C; ++c) {
      lo += static_cast<double>(ch_min[c]);
      hi += static_cast<double>(ch_max[c]);
    }
  });
  return {lo / static_cast<double>(C), hi / static_cast<double>(C)};
}

// The element-pass scalars from a qparams array and the offset.
template <typename A>
BQScalarsT<A> element_scalars(const A* qp, double offset, Grid grid) {
  return bq_scalars<A>(qp[kL], qp[kScale], qp[kZero], static_cast<A>(offset), grid.qmin, grid.qmax);
}

}  // namespace
}  // namespace cpu

at::Tensor cpu_batch_range(const at::Tensor& x, int64_t C, int64_t inner) {
  cpu::check_channel_layout(x, C, inner);
  const auto [lo, hi] = cpu::batch_range_of(x, C, inner);
  at::Tensor out = at::empty({2}, x.options().dtype(at::kFloat));
  out.data_ptr<float>()[0] = static_cast<float>(lo);
  out.data_ptr<float>()[1] = static_cast<float>(hi);
  return out;
}

std::tuple<at::Tensor, at::Tensor> cpu_batchquant_forward(const at::Tensor& x, const at::Tensor& theta,
                                                          const at::Tensor& offset,
                                                          const std::optional<at::Tensor>& lo_hi, int64_t bits,
                                                          bool is_signed, int64_t C, int64_t inner) {
  cpu::check_channel_layout(x, C, inner);
  cpu::check_cpu_floating(theta, "theta", 1);
  cpu::check_cpu_floating(offset, "offset", 1);
  cpu::check_bits(bits);
  double lo, hi;
  if (lo_hi.has_value()) {
    cpu::check_cpu_floating(*lo_hi, "lo_hi", 2);
    lo = cpu::read_scalar(*lo_hi, 0);
    hi = cpu::read_scalar(*lo_hi, 1);
  } else {
    std::tie(lo, hi) = cpu::batch_range_of(x, C, inner);
  }
  const Grid grid = batchquant_grid(static_cast<int>(bits), is_signed);
  const double theta_v = cpu::read_scalar(theta);
  const double offset_v = cpu::read_scalar(offset);
  at::Tensor qparams = at::empty({kNumQParams}, x.options().dtype(cpu::math_dtype(x.scalar_type())));
  at::Tensor y = at::empty_like(x);
  BQ_DISPATCH_CPU_FLOATING(x.scalar_type(), "bquant_cpu_batchquant_forward", [&] {
    using A = cpu::acc_t<scalar_t>;
    A* qp = qparams.data_ptr<A>();
    fill_qparams(lo, hi, theta_v, grid, qp);
    const BQScalarsT<A> p = cpu::element_scalars(qp, offset_v, grid);
    const auto& k = cpu::kernels<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    cpu::parallel_chunks(x.numel(), [&](int64_t, int64_t b, int64_t e) { k.bq_forward(px + b, py + b, e - b, p); });
  });
  return {y, qparams};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_batchquant_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                       const at::Tensor& offset,
                                                                       const at::Tensor& qparams, int64_t bits,
                                                                       bool is_signed) {
  cpu::check_dense_input(x, "x");
  cpu::check_same_layout(grad_y, "grad_y", x, "x");
  cpu::check_cpu_floating(offset, "offset", 1);
  cpu::check_cpu_floating(qparams, "qparams", kNumQParams);
  const at::ScalarType math = cpu::math_dtype(x.scalar_type());
  TORCH_CHECK(qparams.scalar_type() == math, "bquant cpu: qparams must be ", math, " for ", x.scalar_type(),
              " inputs, got ", qparams.scalar_type());
  cpu::check_bits(bits);
  const Grid grid = batchquant_grid(static_cast<int>(bits), is_signed);
  const double offset_v = cpu::read_scalar(offset);
  const at::Tensor qp_c = qparams.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_theta = at::empty({1}, qparams.options());
  at::Tensor grad_offset = at::empty({1}, qparams.options());
  BQ_DISPATCH_CPU_FLOATING(x.scalar_type(), "bquant_cpu_batchquant_backward", [&] {
    using A = cpu::acc_t<scalar_t>;
    const A* qp = qp_c.const_data_ptr<A>();
    const BQScalarsT<A> p = cpu::element_scalars(qp, offset_v, grid);
    const auto& k = cpu::kernels<scalar_t>();
    const scalar_t* pg = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pgx = grad_x.data_ptr<scalar_t>();
    const int64_t n = x.numel();
    std::vector<cpu::BQChunkSums> partial(cpu::ceil_div(n, cpu::kChunk));
    cpu::parallel_chunks(
        n, [&](int64_t c, int64_t b, int64_t e) { partial[c] = k.bq_backward(pg + b, px + b, pgx + b, e - b, p); });
    double sum_dl = 0.0, sum_do = 0.0;
    for (const cpu::BQChunkSums& s : partial) {
      sum_dl += s.dl;
      sum_do += s.dout;
    }
    const BQScalarGrads grads = batchquant_scalar_grads(sum_dl, sum_do, static_cast<double>(qp[kL]),
                                                        static_cast<double>(qp[kScale]), static_cast<double>(qp[kDlDtheta]));
    grad_theta.data_ptr<A>()[0] = static_cast<A>(grads.theta);
    grad_offset.data_ptr<A>()[0] = static_cast<A>(grads.offset);
  });
  return {grad_x, grad_theta, grad_offset};
}

}  // namespace bquant
