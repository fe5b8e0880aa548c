// Gated BatchQuant on the CPU: BatchQuant of z = x * gate[n, c] in one op (a squeeze-excitation block's
// gating feeding the next quantizer), forward and backward, as the native ops
//
//   native_gated_batchquant(x, gate, theta, offset, lo_hi?, bits, signed) -> (y, qparams)        differentiable
//   native_gated_batchquant_fwd / native_gated_batchquant_bwd                                     the kernels
//
// x: (N, C, ...), dense contiguous or channels_last (another layout runs on a contiguous copy); gate: (N, C) or
// (N, C, 1, ..., 1) of x's dtype, its gradient returned in its shape and strides. The numbers are those of the
// composition native_batchquant(x * gate.view(N, C, 1, ...)) and its autograd: z = T(x * g) rounded as torch's
// mul stores it, the batch range, qparams and y of native_batchquant on z bit for bit (also grad_theta /
// grad_offset: the same chunks and sums), grad_x = T(gz * g) bit for bit, grad_gate[n, c] = the sum of
// T(gz * x) over that sample's and channel's elements, in float32 (float64 for float64), rounded to T once; gz
// is native_batchquant's grad_x for z.
//
// z is never stored: the autograd Function saves x and gate, and z = T(x * g) is computed in registers by the
// BatchQuant element loops of kernels_impl.h, the gates read in place (long runs, forward) or from a per-piece
// (per-chunk) buffer `ge` of each element's gate. Forward: a statistics pass reading x (per-(n, c) extremes of
// x mapped to those of z, gated_extremes; z's own for short rows), then one element pass. Backward: one
// element pass per chunk (native_batchquant's backward chunks, vector blocks and partial sums, so grad_theta /
// grad_offset are bit-identical), writing grad_x and the products T(gz * x) into a chunk buffer, then that
// buffer's per-(n, c) sums. Chunks are fixed and partial sums folded in chunk order: results do not depend on
// the thread count.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "batchquant_autograd.h"
#include "bquant.h"
#include "common/quant_math.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_kernels.h"

namespace bquant {
namespace {

// Elements per piece of the forward's element pass (its gates stay in L1); a multiple of every vector width,
// so only the tensor's last piece has a scalar tail, as in native_batchquant.
constexpr int64_t kPiece = 2048;
static_assert(cpu::kChunk % kPiece == 0, "pieces tile a chunk");
// Contiguous rows shorter than this (small spatial sizes): the statistics pass takes z's extremes over the
// samples element-wise, as native_batchquant's column mode does (per-row extremes would be scalar loops).
constexpr int64_t kShortRow = 16;
constexpr int64_t kPad = 64;  // room for gate_expand's overlapping stores
// Samples are reduced in fixed groups of about this many elements (the statistics' partial results).
constexpr int64_t kGroupElems = 65536;
// The forward reads the gates in place for runs of one gate (or gate row) at least this long.
constexpr int64_t kDirectRun = 64;

// x as (outer, C, inner) in memory. Element i is in sample i / sample and channel (i / inner) % C; its gate
// is gate[key], key = (i / sample) * C + (i / inner) % C. Contiguous (inner > 1): key = i / inner, each
// (n, c) one row of `inner` elements. Channels innermost (inner == 1): a sample is S rows of C, the gate
// row of sample n is gate[n * C, (n + 1) * C).
struct Geometry {
  at::Tensor x;
  int64_t N, C, inner, sample, numel;
  bool cols() const { return inner == 1; }
  bool short_rows() const { return inner > 1 && inner < kShortRow; }
};

Geometry geometry_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "bquant: x must have at least 2 dimensions (N, C, ...), got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, "bquant: x must not be empty, got shape ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1), numel = x.numel();
  const int64_t spatial = numel / (N * C);
  at::Tensor d = x;
  int64_t inner = spatial;
  if (!x.is_contiguous()) {
    if (channels_innermost(x)) {
      inner = 1;
    } else {
      d = x.contiguous();
    }
  }
  cpu::check_channel_layout(d, C, inner);
  return {d, N, C, inner, numel / N, numel};
}

// The gate as the kernels read it: (N, C) of x's dtype on the CPU, contiguous (a copy otherwise).
// gate may also be (N, C, 1, ..., 1) (x's rank), as broadcast against x.
at::Tensor dense_gate(const at::Tensor& gate, const Geometry& G, const at::Tensor& x) {
  cpu::check_cpu_floating(gate, "gate");
  bool ok = gate.dim() >= 2 && gate.size(0) == G.N && gate.size(1) == G.C;
  if (ok && gate.dim() > 2) {
    ok = gate.dim() == x.dim();
    for (int64_t d = 2; d < gate.dim(); ++d) ok = ok && gate.size(d) == 1;
  }
  TORCH_CHECK(ok, "bquant: gate must have shape (N, C) = (", G.N, ", ", G.C, ") or (N, C, 1, ..., 1) for x of shape ",
              x.sizes(), ", got ", gate.sizes());
  TORCH_CHECK(gate.scalar_type() == x.scalar_type(), "bquant: gate must have the dtype of x (", x.scalar_type(),
              "), got ", gate.scalar_type());
  return gate.reshape({G.N, G.C}).contiguous();
}

// `out` (computed on the dense form of `ref`) with the memory format a PyTorch op gives for `ref`.
at::Tensor restride_like(const at::Tensor& out, const at::Tensor& ref) {
  if (out.strides() == ref.strides()) return out;
  at::Tensor target = at::empty_like(ref, out.options());
  return target.strides() == out.strides() ? out : target.copy_(out);
}

// Calls f(i, key, rows, len) for the runs of [s, e) in a contiguous layout: whole rows (key .. key + rows - 1,
// `inner` each) or one partial row (rows = 1, len < inner).
template <typename F>
void for_each_row_run(int64_t s, int64_t e, int64_t inner, const F& f) {
  for (int64_t i = s; i < e;) {
    const int64_t key = i / inner, off = i % inner;
    if (off != 0 || e - i < inner) {
      const int64_t len = std::min(inner - off, e - i);
      f(i, key, int64_t{1}, len);
      i += len;
    } else {
      const int64_t rows = (e - i) / inner;
      f(i, key, rows, inner);
      i += rows * inner;
    }
  }
}

// Calls f(i, n, col, rows, len) for the runs of [s, e) in a channels-innermost layout: whole rows of C
// (col = 0) or one partial row, each within sample n.
template <typename F>
void for_each_col_run(int64_t s, int64_t e, int64_t C, int64_t sample, const F& f) {
  for (int64_t i = s; i < e;) {
    const int64_t n = i / sample, t = i % sample, col = t % C;
    if (col != 0 || e - i < C) {
      const int64_t len = std::min(C - col, e - i);
      f(i, n, col, int64_t{1}, len);
      i += len;
    } else {
      const int64_t rows = std::min(e - i, sample - t) / C;
      f(i, n, int64_t{0}, rows, C);
      i += rows * C;
    }
  }
}

// ge[0, e - s) = the gates of elements [s, e); ge has e - s + kPad elements.
template <typename T>
void expand_gates(const Geometry& G, const T* gate, int64_t s, int64_t e, T* ge) {
  if (G.cols()) {
    for_each_col_run(s, e, G.C, G.sample, [&](int64_t i, int64_t n, int64_t col, int64_t rows, int64_t len) {
      for (int64_t r = 0; r < rows; ++r) std::copy_n(gate + n * G.C + col, len, ge + (i - s) + r * len);
    });
  } else {
    const int64_t k0 = s / G.inner;
    cpu::kernels<T>().gate_expand(gate + k0, e - s, G.inner, (k0 + 1) * G.inner - s, ge);
  }
}

// ----------------------------------------------------------------------------- statistics

template <typename T>
using A_t = cpu::acc_t<T>;

// min and max of z over each channel c of sample n from those of x in mn[c] / mx[c]: v -> T(v * g) is
// monotone for a finite g (non-decreasing for g > 0, non-increasing for g < 0), so the extremes of z are the
// images of those of x, bit for bit (gate_extremes). For g = +-0 every z is +-0, and the signs of zeros do not
// reach the range (its sums start from +0.0). Where g or an extreme is not finite (inf * 0 = NaN) z is
// computed element by element.
template <typename T>
void gated_extremes(const Geometry& G, const T* x, const T* gate, int64_t n, A_t<T>* mn, A_t<T>* mx) {
  using A = A_t<T>;
  const T* gn = gate + n * G.C;
  if (cpu::kernels<T>().gate_extremes(gn, G.C, mn, mx)) return;
  for (int64_t c = 0; c < G.C; ++c) {
    const A g = static_cast<A>(gn[c]);
    if (std::isfinite(g) && std::isfinite(mn[c]) && std::isfinite(mx[c])) continue;
    // The elements of (n, c): a row of `inner`, or (channels innermost) S elements C apart.
    const T* p = x + n * G.sample + (G.cols() ? c : c * G.inner);
    const int64_t count = G.cols() ? G.sample / G.C : G.inner, stride = G.cols() ? G.C : 1;
    A lo = static_cast<A>(static_cast<T>(static_cast<A>(p[0]) * g)), hi = lo;
    for (int64_t j = 1; j < count; ++j) {
      const A z = static_cast<A>(static_cast<T>(static_cast<A>(p[j * stride]) * g));
      lo = nan_min(lo, z);
      hi = nan_max(hi, z);
    }
    mn[c] = lo;
    mx[c] = hi;
  }
}

// Per-channel min and max of z into ch_min / ch_max (C each).
template <typename T>
void gated_channel_minmax(const Geometry& G, const T* x, const T* gate, A_t<T>* ch_min, A_t<T>* ch_max) {
  using A = A_t<T>;
  const cpu::Kernels<T>& k = cpu::kernels<T>();
  const int64_t N = G.N, C = G.C, inner = G.inner, sample = G.sample;
  if (G.short_rows()) {
    // z itself, element-wise over samples (each sample one row of C * inner), in fixed groups of samples
    // whose partial results are folded in group order; then the inner columns of each channel.
    const int64_t group = std::max<int64_t>(1, kGroupElems / sample);
    const int64_t groups = cpu::ceil_div(N, group);
    std::vector<A> mn(groups * sample), mx(groups * sample);
    at::parallel_for(0, groups, cpu::ceil_div(cpu::kMinParallelElems, group * sample), [&](int64_t g0, int64_t g1) {
      std::vector<T> ge(sample + kPad);
      for (int64_t gi = g0; gi < g1; ++gi) {
        for (int64_t n = gi * group; n < std::min(N, (gi + 1) * group); ++n) {
          k.gate_expand(gate + n * C, sample, inner, inner, ge.data());
          k.gate_col_minmax(x + n * sample, ge.data(), 1, sample, n == gi * group, mn.data() + gi * sample,
                            mx.data() + gi * sample);
        }
      }
    });
    for (int64_t gi = 1; gi < groups; ++gi) {
      k.minmax_accumulate(mn.data(), mx.data(), mn.data() + gi * sample, mx.data() + gi * sample, sample);
    }
    cpu::fold_channel_columns(mn.data(), mx.data(), C, inner, ch_min, ch_max);
    return;
  }
  // Per sample, folded over the samples of fixed groups, whose partial results are then folded in group
  // order: the extremes of x per channel mapped to those of z (gated_extremes), or, channels innermost, z's
  // own per column of the sample's S rows (a multiply per element, which costs less than the mapping and
  // folding per channel, except for 16-bit types, whose z takes a rounding, on many rows).
  const bool z_cols = G.cols() && (sizeof(T) > 2 || sample / C < 8);
  const int64_t group = std::max<int64_t>(1, kGroupElems / sample);
  const int64_t groups = cpu::ceil_div(N, group);
  std::vector<A> gmn(groups * C), gmx(groups * C);
  at::parallel_for(0, groups, cpu::ceil_div(cpu::kMinParallelElems, group * sample), [&](int64_t g0, int64_t g1) {
    std::vector<A> smn(C), smx(C);
    for (int64_t gi = g0; gi < g1; ++gi) {
      A* pmn = gmn.data() + gi * C;
      A* pmx = gmx.data() + gi * C;
      for (int64_t n = gi * group; n < std::min(N, (gi + 1) * group); ++n) {
        const bool first = n == gi * group;
        if (z_cols) {
          k.gate_col_minmax(x + n * sample, gate + n * C, sample / C, C, first, pmn, pmx);
          continue;
        }
        A* mn = first ? pmn : smn.data();
        A* mx = first ? pmx : smx.data();
        if (G.cols()) {
          k.col_minmax(x + n * sample, sample / C, C, C, mn, mx);
        } else {
          k.row_minmax(x + n * sample, C, inner, inner, mn, mx);
        }
        gated_extremes(G, x, gate, n, mn, mx);
        if (!first) k.minmax_accumulate(pmn, pmx, mn, mx, C);
      }
    }
  });
  for (int64_t gi = 1; gi < groups; ++gi) k.minmax_accumulate(gmn.data(), gmx.data(), &gmn[gi * C], &gmx[gi * C], C);
  std::copy_n(gmn.data(), C, ch_min);
  std::copy_n(gmx.data(), C, ch_max);
}

// (lo, hi) of spec 1.1 for z, summed as native_batchquant sums them (in double, in channel order).
std::pair<double, double> gated_batch_range(const Geometry& G, const at::Tensor& gate) {
  double lo = 0.0, hi = 0.0;
  BQ_DISPATCH_CPU_FLOATING(G.x.scalar_type(), "bquant_cpu_gated_batch_range", [&] {
    std::vector<A_t<scalar_t>> ch_min(G.C), ch_max(G.C);
    gated_channel_minmax(G, G.x.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(), ch_min.data(),
                         ch_max.data());
    for (int64_t c = 0; c < G.C; ++c) {
      lo += static_cast<double>(ch_min[c]);
      hi += static_cast<double>(ch_max[c]);
    }
  });
  return {lo / static_cast<double>(G.C), hi / static_cast<double>(G.C)};
}

template <typename A>
BQScalarsT<A> element_scalars(const A* qp, double offset, Grid grid) {
  return bq_scalars<A>(qp[kL], qp[kScale], qp[kZero], static_cast<A>(offset), grid.qmin, grid.qmax);
}

// Runs f(chunk, begin, end, task buffers) for each fixed chunk of [0, n), in parallel; Buffers is
// default-constructed once per task.
template <typename Buffers, typename F>
void parallel_chunks_with(int64_t n, const F& f) {
  const int64_t chunks = cpu::ceil_div(n, cpu::kChunk);
  at::parallel_for(0, chunks, cpu::ceil_div(cpu::kMinParallelElems, cpu::kChunk), [&](int64_t c0, int64_t c1) {
    Buffers buffers;
    for (int64_t c = c0; c < c1; ++c) f(c, c * cpu::kChunk, std::min(n, (c + 1) * cpu::kChunk), buffers);
  });
}

// ----------------------------------------------------------------------------- kernels

std::tuple<at::Tensor, at::Tensor> gated_fwd_cpu(const at::Tensor& x_in, const at::Tensor& gate_in,
                                                 const at::Tensor& theta, const at::Tensor& offset,
                                                 const std::optional<at::Tensor>& lo_hi, int64_t bits,
                                                 bool is_signed) {
  cpu::check_cpu_floating(x_in, "x");
  const Geometry G = geometry_of(x_in);
  const at::Tensor gate = dense_gate(gate_in, G, x_in);
  cpu::check_cpu_floating(theta, "theta", 1);
  cpu::check_cpu_floating(offset, "offset", 1);
  cpu::check_bits(bits);
  double lo, hi;
  if (lo_hi.has_value()) {
    cpu::check_cpu_floating(*lo_hi, "lo_hi", 2);
    lo = cpu::read_scalar(*lo_hi, 0);
    hi = cpu::read_scalar(*lo_hi, 1);
  } else {
    std::tie(lo, hi) = gated_batch_range(G, gate);
  }
  const Grid grid = batchquant_grid(static_cast<int>(bits), is_signed);
  const double theta_v = cpu::read_scalar(theta);
  const double offset_v = cpu::read_scalar(offset);
  at::Tensor qparams = at::empty({kNumQParams}, G.x.options().dtype(cpu::math_dtype(G.x.scalar_type())));
  at::Tensor y = at::empty_like(G.x);
  BQ_DISPATCH_CPU_FLOATING(G.x.scalar_type(), "bquant_cpu_gated_batchquant_forward", [&] {
    using T = scalar_t;
    using A = A_t<T>;
    A* qp = qparams.data_ptr<A>();
    fill_qparams(lo, hi, theta_v, grid, qp);
    const BQScalarsT<A> p = element_scalars(qp, offset_v, grid);
    const cpu::Kernels<T>& k = cpu::kernels<T>();
    const T* px = G.x.const_data_ptr<T>();
    const T* pg = gate.const_data_ptr<T>();
    T* py = y.data_ptr<T>();
    // Gates straight from `gate` where runs of one gate (contiguous) or of one gate row (channels innermost)
    // are long, else from an expanded copy per piece. Each run then gets its own vector blocks and scalar
    // tail: the same bits as native_batchquant's blocks for float32 / float64, whose vector and scalar forms
    // agree on every value; for 16-bit types a NaN's encoding depends on the form that stores it, so there
    // the runs must also start on its vector blocks (lengths a multiple of 64).
    const int64_t run = G.cols() ? G.C : G.inner;
    const bool direct = run >= kDirectRun && (sizeof(T) > 2 || run % 64 == 0);
    struct Buffers {
      std::vector<T> ge;
    };
    parallel_chunks_with<Buffers>(G.numel, [&](int64_t, int64_t b, int64_t e, Buffers& buf) {
      if (direct && G.cols()) {
        for_each_col_run(b, e, G.C, G.sample, [&](int64_t i, int64_t n, int64_t col, int64_t rows, int64_t len) {
          for (int64_t r = 0; r < rows; ++r) {
            k.gated_bq_forward(px + i + r * len, pg + n * G.C + col, py + i + r * len, len, p);
          }
        });
      } else if (direct) {
        for_each_row_run(b, e, G.inner, [&](int64_t i, int64_t key, int64_t rows, int64_t len) {
          for (int64_t r = 0; r < rows; ++r) {
            k.scaled_bq_forward(px + i + r * len, pg + key + r, py + i + r * len, len, p);
          }
        });
      } else {
        // Pieces start at multiples of kPiece: the vector blocks of native_batchquant's loop, and its tail.
        buf.ge.resize(kPiece + kPad);
        for (int64_t s = b; s < e; s += kPiece) {
          const int64_t s1 = std::min(e, s + kPiece);
          expand_gates(G, pg, s, s1, buf.ge.data());
          k.gated_bq_forward(px + s, buf.ge.data(), py + s, s1 - s, p);
        }
      }
    });
  });
  return {restride_like(y, x_in), qparams};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_bwd_cpu(const at::Tensor& grad_y,
                                                                         const at::Tensor& x_in,
                                                                         const at::Tensor& gate_in,
                                                                         const at::Tensor& offset,
                                                                         const at::Tensor& qparams, int64_t bits,
                                                                         bool is_signed) {
  cpu::check_cpu_floating(x_in, "x");
  const Geometry G = geometry_of(x_in);
  const at::Tensor gate = dense_gate(gate_in, G, x_in);
  cpu::check_cpu_floating(grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x_in.sizes() && grad_y.scalar_type() == x_in.scalar_type(),
              "bquant: grad_y must have the shape and dtype of x (", x_in.sizes(), ", ", x_in.scalar_type(),
              "), got (", grad_y.sizes(), ", ", grad_y.scalar_type(), ")");
  const at::Tensor gy = grad_y.strides() == G.x.strides() ? grad_y : at::empty_like(G.x).copy_(grad_y);
  cpu::check_cpu_floating(offset, "offset", 1);
  cpu::check_cpu_floating(qparams, "qparams", kNumQParams);
  const at::ScalarType math = cpu::math_dtype(G.x.scalar_type());
  TORCH_CHECK(qparams.scalar_type() == math, "bquant cpu: qparams must be ", math, " for ", G.x.scalar_type(),
              " inputs, got ", qparams.scalar_type());
  cpu::check_bits(bits);
  const Grid grid = batchquant_grid(static_cast<int>(bits), is_signed);
  const double offset_v = cpu::read_scalar(offset);
  const at::Tensor qp_c = qparams.contiguous();
  at::Tensor grad_x = at::empty_like(G.x);
  at::Tensor grad_gate = at::empty({G.N, G.C}, G.x.options());
  at::Tensor grad_theta = at::empty({1}, qparams.options());
  at::Tensor grad_offset = at::empty({1}, qparams.options());
  BQ_DISPATCH_CPU_FLOATING(G.x.scalar_type(), "bquant_cpu_gated_batchquant_backward", [&] {
    using T = scalar_t;
    using A = A_t<T>;
    const A* qp = qp_c.const_data_ptr<A>();
    const BQScalarsT<A> p = element_scalars(qp, offset_v, grid);
    const cpu::Kernels<T>& k = cpu::kernels<T>();
    const T* pgy = gy.const_data_ptr<T>();
    const T* px = G.x.const_data_ptr<T>();
    const T* pg = gate.const_data_ptr<T>();
    T* pgx = grad_x.data_ptr<T>();
    const int64_t C = G.C, inner = G.inner, sample = G.sample;
    const int64_t chunks = cpu::ceil_div(G.numel, cpu::kChunk);
    // grad_gate's sums: each (n, c) (channels innermost: each sample's C) written whole by the chunk holding
    // its first element; a chunk that starts inside one keeps its part in `cont`, added in chunk order below.
    // Sums start from +0 like torch's; with a spatial size of 1 the composition has no sum (T(gz * x)
    // itself, -0 included), hence -0 there.
    const A init = sample == C ? A(-0.0) : A(0);
    std::vector<A> gsum(G.N * C);
    std::vector<A> cont(G.cols() ? chunks * C : chunks);
    std::vector<cpu::BQChunkSums> partial(chunks);
    struct Buffers {
      std::vector<T> ge = std::vector<T>(cpu::kChunk + kPad);
      std::vector<A> prod = std::vector<A>(cpu::kChunk);
    };
    parallel_chunks_with<Buffers>(G.numel, [&](int64_t c, int64_t b, int64_t e, Buffers& buf) {
      expand_gates(G, pg, b, e, buf.ge.data());
      partial[c] = k.gated_bq_backward(pgy + b, px + b, buf.ge.data(), pgx + b, buf.prod.data(), e - b, p);
      if (G.cols()) {
        for (int64_t n = b / sample; n * sample < e; ++n) {
          A* acc = n * sample >= b ? &gsum[n * C] : &cont[c * C];
          std::fill_n(acc, C, init);
          const int64_t s0 = std::max(b, n * sample), s1 = std::min(e, (n + 1) * sample);
          for_each_col_run(s0, s1, C, sample, [&](int64_t i, int64_t, int64_t col, int64_t rows, int64_t len) {
            k.col_sums(buf.prod.data() + (i - b), rows, len, acc + col);
          });
        }
      } else {
        for_each_row_run(b, e, inner, [&](int64_t i, int64_t key, int64_t rows, int64_t len) {
          k.row_sums(buf.prod.data() + (i - b), rows, len, i % inner == 0 ? &gsum[key] : &cont[c]);
        });
      }
    });
    for (int64_t c = 1; c < chunks; ++c) {
      const int64_t b = c * cpu::kChunk;
      if (G.cols() && b % sample != 0) {
        A* dst = &gsum[(b / sample) * C];
        for (int64_t j = 0; j < C; ++j) dst[j] += cont[c * C + j];
      } else if (!G.cols() && b % inner != 0) {
        gsum[b / inner] += cont[c];
      }
    }
    T* pgg = grad_gate.data_ptr<T>();
    for (int64_t i = 0; i < G.N * C; ++i) pgg[i] = static_cast<T>(gsum[i]);
    double sum_dl = 0.0, sum_do = 0.0;
    for (const cpu::BQChunkSums& s : partial) {
      sum_dl += s.dl;
      sum_do += s.dout;
    }
    const BQScalarGrads grads =
        batchquant_scalar_grads(sum_dl, sum_do, static_cast<double>(qp[kL]), static_cast<double>(qp[kScale]),
                                static_cast<double>(qp[kDlDtheta]));
    grad_theta.data_ptr<A>()[0] = static_cast<A>(grads.theta);
    grad_offset.data_ptr<A>()[0] = static_cast<A>(grads.offset);
  });
  return {restride_like(grad_x, x_in), restride_like(grad_gate.view(gate_in.sizes()), gate_in), grad_theta,
          grad_offset};
}

// ----------------------------------------------------------------------------- autograd

using GatedFwd = decltype(gated_fwd_cpu);
using GatedBwd = decltype(gated_bwd_cpu);

const c10::TypedOperatorHandle<GatedFwd>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bquant::native_gated_batchquant_fwd", "").typed<GatedFwd>();
  return op;
}

const c10::TypedOperatorHandle<GatedBwd>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bquant::native_gated_batchquant_bwd", "").typed<GatedBwd>();
  return op;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Saves x, gate, offset and qparams: the backward recomputes z (no z is kept alive by autograd).
class GatedBatchQuantFunction : public torch::autograd::Function<GatedBatchQuantFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& gate,
                               const at::Tensor& theta, const at::Tensor& offset,
                               const std::optional<at::Tensor>& lo_hi, int64_t bits, bool is_signed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, qparams] = fwd_op().call(x, gate, theta, offset, lo_hi, bits, is_signed);
    return save_batchquant(ctx, y, qparams, {x, gate, offset}, theta, bits, is_signed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const SavedBatchQuant s(ctx, grads);
    const at::Tensor& gate = s.saved[1];
    auto [grad_x, grad_gate, grad_theta, grad_offset] =
        bwd_op().call(s.grad_y, s.x(), gate, s.offset(), s.qparams(), s.bits, s.is_signed);
    return s.outputs({grad_x, grad_gate}, grad_theta, grad_offset);
  }
};

std::tuple<at::Tensor, at::Tensor> gated_autograd(const at::Tensor& x, const at::Tensor& gate,
                                                  const at::Tensor& theta, const at::Tensor& offset,
                                                  const std::optional<at::Tensor>& lo_hi, int64_t bits,
                                                  bool is_signed) {
  auto out = GatedBatchQuantFunction::apply(x, gate, theta, offset, lo_hi, bits, is_signed);
  return {out[0], out[1]};
}

// Below autograd (inference mode, or inside the Function above): straight to the kernel.
std::tuple<at::Tensor, at::Tensor> gated_no_grad(const at::Tensor& x, const at::Tensor& gate,
                                                 const at::Tensor& theta, const at::Tensor& offset,
                                                 const std::optional<at::Tensor>& lo_hi, int64_t bits,
                                                 bool is_signed) {
  return fwd_op().call(x, gate, theta, offset, lo_hi, bits, is_signed);
}

}  // namespace

#define BQ_GATED_ARGS "Tensor x, Tensor gate, Tensor theta, Tensor offset, Tensor? lo_hi, int bits, bool signed"

TORCH_LIBRARY_FRAGMENT(bquant, m) {
  m.def("native_gated_batchquant(" BQ_GATED_ARGS ") -> (Tensor, Tensor)");
  m.def("native_gated_batchquant_fwd(" BQ_GATED_ARGS ") -> (Tensor, Tensor)");
  m.def("native_gated_batchquant_bwd(Tensor grad_y, Tensor x, Tensor gate, Tensor offset, Tensor qparams, int bits, "
        "bool signed) -> (Tensor, Tensor, Tensor, Tensor)");
}
#undef BQ_GATED_ARGS

TORCH_LIBRARY_IMPL(bquant, Autograd, m) { m.impl("native_gated_batchquant", &gated_autograd); }

TORCH_LIBRARY_IMPL(bquant, CompositeExplicitAutograd, m) { m.impl("native_gated_batchquant", &gated_no_grad); }

TORCH_LIBRARY_IMPL(bquant, CPU, m) {
  m.impl("native_gated_batchquant_fwd", &gated_fwd_cpu);
  m.impl("native_gated_batchquant_bwd", &gated_bwd_cpu);
}

}  // namespace bquant
