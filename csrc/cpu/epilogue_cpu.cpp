// Fused layer epilogue on the CPU: BatchNorm (batch or running statistics) -> activation (identity,
// ReLU, h_swish) -> BatchQuant of the activated tensor, forward and backward, as the native ops
//
//   native_bn_act_quant(y, gamma, beta, theta?, offset?, running_mean?, running_var?, lo_hi?, eps, act,
//                       bits, signed) -> (out, stats, qparams)                               differentiable
//   native_bn_act_quant_fwd / native_bn_act_quant_bwd                                          the kernels
//
// `bits = 0` stops the chain before the quantizer (BN + activation only). `stats` is (2, C): the
// per-channel mean and biased variance BN used; `qparams` is BatchQuant's (zeros without quantizer).
// The numbers are those of the unfused composition F.batch_norm -> activation -> batchquant
// (bquant_kernels/backends/reference_epilogue.py): intermediates are rounded to the input's dtype
// where the composition stores them, the activation formulas are PyTorch's, and the quantization runs
// through the same vectorized BatchQuant loops as bquant::native_batchquant.
//
// Passes over the activation (identity / ReLU): forward 2 reads + 1 write (statistics: BN's sums and
// the per-channel min/max of y, from which the activated range follows exactly, every float step of
// act((y - mean) * k + beta) being monotone in y; then the element pass); h_swish, not monotone, reads
// once more for its per-channel extremes. Backward: read y and the gradient, store the activation's
// gradient in grad_y's memory with BN's per-channel sums; then rewrite grad_y in place. Each channel's sums are
// accumulated in a fixed order on one thread: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/quant_math.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_kernels.h"

namespace bquant {
namespace {

enum Act : int64_t { kIdentity = 0, kRelu = 1, kHSwish = 2 };

// Elements per buffered segment: a segment's intermediates stay in L1 between the loops over it.
constexpr int64_t kSeg = 1024;
constexpr int kLanes = 8;  // independent accumulators of a segment's sums

// v rounded to T where the composition stores a T (16-bit inputs); a no-op for float32 / float64.
template <typename T, typename A>
inline A round_to(A v) {
  if constexpr (sizeof(T) == 2) {
    return static_cast<A>(static_cast<T>(v));
  } else {
    return v;
  }
}

// PyTorch's relu (NaN passes) and hardswish, x * min(max(x + 3, 0), 6) / 6.
template <int64_t kAct, typename A>
inline A act_fwd(A z) {
  if constexpr (kAct == kRelu) {
    return z < A(0) ? A(0) : z;
  } else if constexpr (kAct == kHSwish) {
    return z * std::min(std::max(z + A(3), A(0)), A(6)) / A(6);
  } else {
    return z;
  }
}

// PyTorch's threshold_backward (relu: gradient where the output is > 0) and hardswish_backward.
template <int64_t kAct, typename A>
inline A act_bwd(A z, A g) {
  if constexpr (kAct == kRelu) {
    return z > A(0) ? g : A(0);
  } else if constexpr (kAct == kHSwish) {
    return z < A(-3) ? A(0) : (z <= A(3) ? g * (z / A(3) + A(0.5)) : g);
  } else {
    return g;
  }
}

// NaN-propagating min / max as two selects (if-converted and vectorized, unlike nan_min's `||`).
template <typename A>
inline A vmin(A acc, A v) {
  const A m = v < acc ? v : acc;
  return v != v ? v : m;
}
template <typename A>
inline A vmax(A acc, A v) {
  const A m = v > acc ? v : acc;
  return v != v ? v : m;
}

// Sums of v[j] and v[j] * (w[j] - m) over a segment, in kLanes double accumulators (the fixed inner
// loop vectorizes), added to *s1 and *s2.
template <typename T, typename A>
inline void lane_sums(const T* __restrict v, const T* __restrict w, double m, int64_t n, double* s1, double* s2) {
  std::array<double, kLanes> l1{}, l2{};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double a = static_cast<double>(static_cast<A>(v[j + l]));
      l1[l] += a;
      l2[l] += a * (static_cast<double>(static_cast<A>(w[j + l])) - m);
    }
  }
  for (; j < n; ++j) {
    const double a = static_cast<double>(static_cast<A>(v[j]));
    l1[0] += a;
    l2[0] += a * (static_cast<double>(static_cast<A>(w[j])) - m);
  }
  for (int l = 0; l < kLanes; ++l) {
    *s1 += l1[l];
    *s2 += l2[l];
  }
}

// x as (outer, C, inner) in memory: dense contiguous (inner = prod of the spatial sizes) or with the
// channel dimension innermost (channels_last: inner = 1).
struct Layout {
  at::Tensor x;
  int64_t outer, C, inner;
};

bool channels_innermost(const at::Tensor& x) {
  int64_t expected = 1;
  const auto check = [&](int64_t dim) {
    if (x.size(dim) != 1 && x.stride(dim) != expected) return false;
    expected *= x.size(dim);
    return true;
  };
  if (!check(1)) return false;
  for (int64_t dim = x.dim() - 1; dim >= 2; --dim) {
    if (!check(dim)) return false;
  }
  return check(0);
}

Layout layout_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "bquant: y must have at least 2 dimensions (N, C, ...), got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, "bquant: y must not be empty, got shape ", x.sizes());
  const int64_t C = x.size(1);
  const int64_t inner = x.numel() / (x.size(0) * C);
  if (x.is_contiguous()) return {x, x.size(0), C, inner};
  if (channels_innermost(x)) return {x, x.numel() / C, C, 1};
  return {x.contiguous(), x.size(0), C, inner};
}

// Calls f(offset, len, c, per_elem) on the memory segments of channels [c0, c1), each channel's
// elements in one fixed order: contiguous layout, one segment (of at most kSeg) per (o, c) row, all in
// channel c; channels innermost, one segment per o, element j in channel c + j.
template <typename F>
void for_segments(const Layout& L, int64_t c0, int64_t c1, const F& f) {
  if (L.inner == 1 && L.C > 1) {
    for (int64_t o = 0; o < L.outer; ++o) {
      for (int64_t c = c0; c < c1; c += kSeg) f(o * L.C + c, std::min(kSeg, c1 - c), c, true);
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t o = 0; o < L.outer; ++o) {
      const int64_t base = (o * L.C + c) * L.inner;
      for (int64_t i = 0; i < L.inner; i += kSeg) f(base + i, std::min(kSeg, L.inner - i), c, false);
    }
  }
}

// Runs f(c0, c1) over blocks of channels in parallel (a channel is never split between threads).
template <typename F>
void parallel_channels(const Layout& L, const F& f) {
  const int64_t per_channel = L.outer * L.inner;
  const int64_t grain = std::max<int64_t>(1, cpu::kMinParallelElems / std::max<int64_t>(1, per_channel));
  at::parallel_for(0, L.C, grain, f);
}

// A vector of doubles from a 1-D tensor of any floating dtype and stride.
std::vector<double> read_vector(const at::Tensor& t, const char* name, int64_t n) {
  cpu::check_cpu_floating(t, name, n);
  TORCH_CHECK(t.dim() == 1, "bquant cpu: ", name, " must be 1-D, got shape ", t.sizes());
  std::vector<double> out(n);
  BQ_DISPATCH_CPU_FLOATING(t.scalar_type(), "bquant_read_vector", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(p[i * t.stride(0)]);
  });
  return out;
}

// Per-channel form of BN: z = (y - mean) * k + beta, k = gamma / sqrt(var + eps) (in double, used in
// A): no cancellation of large terms when |mean| >> std, and z = beta exactly where y == mean. `mean`
// and `var` are the stored (A-rounded) statistics, so the backward recomputes the forward's z bit for bit.
template <typename A>
struct Affine {
  std::vector<A> k, b, mean;
  std::vector<double> invstd;
};

template <typename A>
Affine<A> affine_of(const A* mean, const A* var, const std::vector<double>& gamma, const std::vector<double>& beta,
                    double eps, int64_t C) {
  Affine<A> a{std::vector<A>(C), std::vector<A>(C), std::vector<A>(mean, mean + C), std::vector<double>(C)};
  for (int64_t c = 0; c < C; ++c) {
    a.invstd[c] = 1.0 / std::sqrt(static_cast<double>(var[c]) + eps);
    const double k = gamma[c] * a.invstd[c];
    a.k[c] = static_cast<A>(k);
    a.b[c] = static_cast<A>(beta[c]);
  }
  return a;
}

// BN of one element.
template <typename T, typename A>
inline A bn_elem(A y, A m, A k, A b) {
  return round_to<T>((y - m) * k + b);
}

// z = round_T((y - m) * k + b) and a = round_T(act(z)) of one segment (af's arrays from its channel c).
template <int64_t kAct, typename T, typename A>
void bn_act_segment(const T* __restrict y, int64_t n, const Affine<A>& af, int64_t c, bool per_elem,
                    A* __restrict z, T* __restrict a) {
  if (per_elem) {
    const A* __restrict m = af.mean.data() + c;
    const A* __restrict k = af.k.data() + c;
    const A* __restrict b = af.b.data() + c;
    for (int64_t j = 0; j < n; ++j) {
      z[j] = bn_elem<T>(static_cast<A>(y[j]), m[j], k[j], b[j]);
      a[j] = static_cast<T>(act_fwd<kAct>(z[j]));
    }
  } else {
    const A mc = af.mean[c], kc = af.k[c], bc = af.b[c];
    for (int64_t j = 0; j < n; ++j) {
      z[j] = bn_elem<T>(static_cast<A>(y[j]), mc, kc, bc);
      a[j] = static_cast<T>(act_fwd<kAct>(z[j]));
    }
  }
}

// Runs f(off, n, c, per_elem, z, a) on every segment of y (channel blocks in parallel) with the
// segment's BN output z and activation a computed in local buffers.
template <int64_t kAct, typename T, typename A, typename F>
void for_bn_act_segments(const Layout& L, const T* y, const Affine<A>& af, const F& f) {
  parallel_channels(L, [&](int64_t c0, int64_t c1) {
    std::array<A, kSeg> z;
    std::array<T, kSeg> a;
    for_segments(L, c0, c1, [&](int64_t off, int64_t n, int64_t c, bool per_elem) {
      bn_act_segment<kAct, T, A>(y + off, n, af, c, per_elem, z.data(), a.data());
      f(off, n, c, per_elem, z.data(), a.data());
    });
  });
}

// ----------------------------------------------------------------------------- forward

constexpr int64_t kTile = 8;  // channels per register tile (channels-innermost statistics)

// Shifted sums, min and max of W adjacent channels over `rows` rows `stride` elements apart. Plain
// selects (vectorized); a NaN, which they may skip, makes the channel's sum NaN, and then its min/max.
template <typename T, typename A, int W>
void stats_tile(const T* __restrict y, int64_t rows, int64_t stride, const double* shift, double* s, double* q,
                A* mn, A* mx) {
  std::array<double, W> ls{}, lq{}, sh;
  std::array<A, W> lmn, lmx;
  for (int l = 0; l < W; ++l) {
    sh[l] = shift[l];
    lmn[l] = mn[l];
    lmx[l] = mx[l];
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict p = y + r * stride;
    for (int l = 0; l < W; ++l) {
      const A v = static_cast<A>(p[l]);
      const double d = static_cast<double>(v) - sh[l];
      ls[l] += d;
      lq[l] += d * d;
      lmn[l] = v < lmn[l] ? v : lmn[l];
      lmx[l] = v > lmx[l] ? v : lmx[l];
    }
  }
  for (int l = 0; l < W; ++l) {
    s[l] += ls[l];
    q[l] += lq[l];
    const bool nan = ls[l] != ls[l];
    mn[l] = nan ? static_cast<A>(ls[l]) : lmn[l];
    mx[l] = nan ? static_cast<A>(ls[l]) : lmx[l];
  }
}

// float32, 8 channels: the same operations in GCC vector types (the compiler's SLP pass does not
// vectorize the generic form's float -> double mix).
using vf4 = float __attribute__((vector_size(16)));
using vd4 = double __attribute__((vector_size(32)));

template <>
void stats_tile<float, float, 8>(const float* __restrict y, int64_t rows, int64_t stride, const double* shift,
                                 double* s, double* q, float* mn, float* mx) {
  vd4 s0{}, s1{}, q0{}, q1{}, h0, h1;
  vf4 mn0, mn1, mx0, mx1;
  std::memcpy(&h0, shift, sizeof(h0));
  std::memcpy(&h1, shift + 4, sizeof(h1));
  std::memcpy(&mn0, mn, sizeof(mn0));
  std::memcpy(&mn1, mn + 4, sizeof(mn1));
  std::memcpy(&mx0, mx, sizeof(mx0));
  std::memcpy(&mx1, mx + 4, sizeof(mx1));
  for (int64_t r = 0; r < rows; ++r) {
    vf4 v0, v1;
    std::memcpy(&v0, y + r * stride, sizeof(v0));
    std::memcpy(&v1, y + r * stride + 4, sizeof(v1));
    const vd4 d0 = __builtin_convertvector(v0, vd4) - h0;
    const vd4 d1 = __builtin_convertvector(v1, vd4) - h1;
    s0 += d0;
    s1 += d1;
    q0 += d0 * d0;
    q1 += d1 * d1;
    mn0 = v0 < mn0 ? v0 : mn0;
    mn1 = v1 < mn1 ? v1 : mn1;
    mx0 = v0 > mx0 ? v0 : mx0;
    mx1 = v1 > mx1 ? v1 : mx1;
  }
  for (int l = 0; l < 4; ++l) {
    const double sums[2] = {s0[l], s1[l]};
    for (int h = 0; h < 2; ++h) {
      const int i = l + 4 * h;
      s[i] += sums[h];
      q[i] += h == 0 ? q0[l] : q1[l];
      const bool nan = sums[h] != sums[h];
      mn[i] = nan ? static_cast<float>(sums[h]) : (h == 0 ? mn0[l] : mn1[l]);
      mx[i] = nan ? static_cast<float>(sums[h]) : (h == 0 ? mx0[l] : mx1[l]);
    }
  }
}

// Per-channel batch statistics of y: mean and biased variance (shifted sums in double, shift = the
// channel's first element) and min / max.
template <typename T, typename A>
void channel_stats(const Layout& L, const T* y, double* mean, double* var, A* mn, A* mx) {
  const int64_t C = L.C;
  std::vector<double> shift(C), s(C, 0.0), q(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = static_cast<double>(y[L.inner == 1 ? c : c * L.inner]);
    mn[c] = static_cast<A>(y[L.inner == 1 ? c : c * L.inner]);
    mx[c] = mn[c];
  }
  const auto& kern = cpu::kernels<T>();
  if (L.inner == 1) {  // channels innermost: tiles of kTile channels down all rows, sums in registers
    parallel_channels(L, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; c += kTile) {
        if (c + kTile <= c1) {
          stats_tile<T, A, kTile>(y + c, L.outer, C, &shift[c], &s[c], &q[c], mn + c, mx + c);
        } else {
          for (int64_t t = c; t < c1; ++t) {
            stats_tile<T, A, 1>(y + t, L.outer, C, &shift[t], &s[t], &q[t], mn + t, mx + t);
          }
        }
      }
    });
  } else {
    parallel_channels(L, [&](int64_t c0, int64_t c1) {
      for_segments(L, c0, c1, [&](int64_t off, int64_t n, int64_t c, bool) {
      const T* __restrict p = y + off;
      A lo, hi;
      kern.row_minmax(p, 1, n, n, &lo, &hi);
      mn[c] = nan_min(mn[c], lo);
      mx[c] = nan_max(mx[c], hi);
      std::array<double, kLanes> ls{}, lq{};
      const double sh = shift[c];
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const double d = static_cast<double>(static_cast<A>(p[j + l])) - sh;
          ls[l] += d;
          lq[l] += d * d;
        }
      }
      for (; j < n; ++j) {
        const double d = static_cast<double>(static_cast<A>(p[j])) - sh;
        ls[0] += d;
        lq[0] += d * d;
      }
      for (int l = 0; l < kLanes; ++l) {
        s[c] += ls[l];
        q[c] += lq[l];
      }
      });
    });
  }
  const double m = static_cast<double>(L.outer * L.inner);
  for (int64_t c = 0; c < C; ++c) {
    const double ds = s[c] / m;
    mean[c] = shift[c] + ds;
    var[c] = std::max(q[c] / m - ds * ds, 0.0);
  }
}

// Per-channel min / max of the activated values (h_swish: not monotone, so one more read).
template <int64_t kAct, typename T, typename A>
void activated_minmax(const Layout& L, const T* y, const Affine<A>& af, A* amin, A* amax) {
  for (int64_t c = 0; c < L.C; ++c) {
    amin[c] = std::numeric_limits<A>::infinity();
    amax[c] = -std::numeric_limits<A>::infinity();
  }
  const auto& kern = cpu::kernels<T>();
  for_bn_act_segments<kAct>(L, y, af, [&](int64_t, int64_t n, int64_t c, bool per_elem, const A*, const T* a) {
    if (per_elem) {
      A* __restrict mnc = amin + c;
      A* __restrict mxc = amax + c;
      for (int64_t j = 0; j < n; ++j) {
        mnc[j] = vmin(mnc[j], static_cast<A>(a[j]));
        mxc[j] = vmax(mxc[j], static_cast<A>(a[j]));
      }
      return;
    }
    A lo, hi;
    kern.row_minmax(a, 1, n, n, &lo, &hi);
    amin[c] = nan_min(amin[c], lo);
    amax[c] = nan_max(amax[c], hi);
  });
}

struct FwdArgs {
  std::vector<double> gamma, beta;
  std::optional<std::pair<double, double>> lo_hi;  // the quantizer's stored range (eval)
  bool batch_stats;
  double eps, theta, offset;
  int64_t bits;
  bool is_signed;
};

template <int64_t kAct, typename T>
void forward_impl(const Layout& L, const FwdArgs& args, at::Tensor& out, at::Tensor& stats, at::Tensor& qparams) {
  using A = cpu::acc_t<T>;
  const int64_t C = L.C;
  const T* y = L.x.const_data_ptr<T>();
  A* st = stats.data_ptr<A>();  // (2, C): mean, var
  std::vector<A> ymin(C), ymax(C);
  if (args.batch_stats) {
    std::vector<double> mean(C), var(C);
    channel_stats<T, A>(L, y, mean.data(), var.data(), ymin.data(), ymax.data());
    for (int64_t c = 0; c < C; ++c) {
      st[c] = static_cast<A>(mean[c]);
      st[C + c] = static_cast<A>(var[c]);
    }
  }
  const Affine<A> af = affine_of<A>(st, st + C, args.gamma, args.beta, args.eps, C);
  A* qp = qparams.data_ptr<A>();
  std::fill_n(qp, kNumQParams, A(0));
  BQScalarsT<A> p{};
  const bool quantize = args.bits > 0;
  if (quantize) {
    const Grid grid = batchquant_grid(static_cast<int>(args.bits), args.is_signed);
    double lo, hi;
    if (args.lo_hi) {
      std::tie(lo, hi) = *args.lo_hi;
    } else {
      std::vector<A> amin(C), amax(C);
      if (kAct == kHSwish || !args.batch_stats) {
        activated_minmax<kAct, T, A>(L, y, af, amin.data(), amax.data());
      } else {  // monotone: the extremes of act((y - mean) * k + beta) are those of y's extremes
        for (int64_t c = 0; c < C; ++c) {
          const A z0 = bn_elem<T>(ymin[c], af.mean[c], af.k[c], af.b[c]);
          const A z1 = bn_elem<T>(ymax[c], af.mean[c], af.k[c], af.b[c]);
          const bool down = af.k[c] < A(0);
          amin[c] = round_to<T>(act_fwd<kAct>(down ? z1 : z0));
          amax[c] = round_to<T>(act_fwd<kAct>(down ? z0 : z1));
        }
      }
      lo = hi = 0.0;  // spec 1.1: means over channels, summed in double in channel order
      for (int64_t c = 0; c < C; ++c) {
        lo += static_cast<double>(amin[c]);
        hi += static_cast<double>(amax[c]);
      }
      lo /= static_cast<double>(C);
      hi /= static_cast<double>(C);
    }
    fill_qparams(lo, hi, args.theta, grid, qp);
    p = bq_scalars<A>(qp[kL], qp[kScale], qp[kZero], static_cast<A>(args.offset), grid.qmin, grid.qmax);
  }
  const auto& kern = cpu::kernels<T>();
  T* po = out.data_ptr<T>();
  for_bn_act_segments<kAct>(L, y, af, [&](int64_t off, int64_t n, int64_t, bool, const A*, const T* a) {
    if (quantize) {
      kern.bq_forward(a, po + off, n, p);
    } else {
      std::copy_n(a, n, po + off);
    }
  });
}

// ----------------------------------------------------------------------------- backward

struct BwdArgs {
  std::vector<double> gamma, beta;
  bool batch_stats;
  double eps, offset;
  int64_t bits;
  bool is_signed;
};

struct BwdSums {
  std::vector<double> s1, s2;  // per channel: sum gz, sum gz * (y - mean)
  double dl = 0.0, dout = 0.0;
};

template <int64_t kAct, typename T>
BwdSums backward_impl(const Layout& L, const T* g, const BwdArgs& args, const at::Tensor& stats,
                      const at::Tensor& qparams, T* grad_y) {
  using A = cpu::acc_t<T>;
  const int64_t C = L.C;
  const T* y = L.x.const_data_ptr<T>();
  const A* st = stats.const_data_ptr<A>();
  const Affine<A> af = affine_of<A>(st, st + C, args.gamma, args.beta, args.eps, C);
  const bool quantize = args.bits > 0;
  BQScalarsT<A> p{};
  if (quantize) {
    const A* qp = qparams.const_data_ptr<A>();
    const Grid grid = batchquant_grid(static_cast<int>(args.bits), args.is_signed);
    p = bq_scalars<A>(qp[kL], qp[kScale], qp[kZero], static_cast<A>(args.offset), grid.qmin, grid.qmax);
  }
  BwdSums sums{std::vector<double>(C, 0.0), std::vector<double>(C, 0.0)};
  std::vector<double> dl(C, 0.0), dout(C, 0.0);  // the quantizer's sums, per channel (then in channel order)
  const auto& kern = cpu::kernels<T>();
  // Pass 1: gz = act'(z) * dBatchQuant/da * g into grad_y (exact in T), and the per-channel sums.
  for_bn_act_segments<kAct>(L, y, af, [&](int64_t off, int64_t n, int64_t c, bool per_elem, const A* z, const T* a) {
    T* __restrict gz = grad_y + off;
    if (quantize) {
      const cpu::BQChunkSums q = kern.bq_backward(g + off, a, gz, n, p);
      dl[c] += q.dl;
      dout[c] += q.dout;
    } else {
      std::copy_n(g + off, n, gz);
    }
    const A* __restrict zz = z;
    for (int64_t j = 0; j < n; ++j) gz[j] = static_cast<T>(round_to<T>(act_bwd<kAct>(zz[j], static_cast<A>(gz[j]))));
    if (per_elem) {
      double* __restrict s1 = sums.s1.data() + c;
      double* __restrict s2 = sums.s2.data() + c;
      const A* __restrict m = af.mean.data() + c;
      const T* __restrict py = y + off;
      for (int64_t j = 0; j < n; ++j) {
        const double v = static_cast<double>(static_cast<A>(gz[j]));
        s1[j] += v;
        s2[j] += v * (static_cast<double>(static_cast<A>(py[j])) - static_cast<double>(m[j]));
      }
      return;
    }
    lane_sums<T, A>(gz, y + off, static_cast<double>(af.mean[c]), n, &sums.s1[c], &sums.s2[c]);
  });
  for (int64_t c = 0; c < C; ++c) {
    sums.dl += dl[c];
    sums.dout += dout[c];
  }
  // Pass 2: grad_y = k * gz - k * mean(gz) - (y - mean) * k * invstd^2 * mean(gz * (y - mean)) (batch
  // statistics); k * gz with running statistics (constants).
  const double count = static_cast<double>(L.outer * L.inner);
  std::vector<A> c1(C, A(0)), c2(C, A(0));
  if (args.batch_stats) {
    for (int64_t c = 0; c < C; ++c) {
      const double k = static_cast<double>(af.k[c]);
      c1[c] = static_cast<A>(k * sums.s1[c] / count);
      c2[c] = static_cast<A>(k * af.invstd[c] * af.invstd[c] * sums.s2[c] / count);
    }
  }
  parallel_channels(L, [&](int64_t c0, int64_t c1_) {
    for_segments(L, c0, c1_, [&](int64_t off, int64_t n, int64_t c, bool per_elem) {
      T* __restrict gz = grad_y + off;
      const T* __restrict py = y + off;
      if (per_elem) {
        for (int64_t j = 0; j < n; ++j) {
          const A d = static_cast<A>(py[j]) - af.mean[c + j];
          gz[j] = static_cast<T>(af.k[c + j] * static_cast<A>(gz[j]) - c1[c + j] - d * c2[c + j]);
        }
        return;
      }
      const A k = af.k[c], a1 = c1[c], a2 = c2[c], m = af.mean[c];
      for (int64_t j = 0; j < n; ++j) {
        gz[j] = static_cast<T>(k * static_cast<A>(gz[j]) - a1 - (static_cast<A>(py[j]) - m) * a2);
      }
    });
  });
  return sums;
}

// ----------------------------------------------------------------------------- host entry points

template <template <int64_t, typename> class Body, typename T, typename... Args>
auto dispatch_act(int64_t act, Args&&... args) {
  switch (act) {
    case kRelu:
      return Body<kRelu, T>::run(std::forward<Args>(args)...);
    case kHSwish:
      return Body<kHSwish, T>::run(std::forward<Args>(args)...);
    default:
      return Body<kIdentity, T>::run(std::forward<Args>(args)...);
  }
}

template <int64_t kAct, typename T>
struct ForwardBody {
  static int run(const Layout& L, const FwdArgs& a, at::Tensor& out, at::Tensor& stats, at::Tensor& qp) {
    forward_impl<kAct, T>(L, a, out, stats, qp);
    return 0;
  }
};

template <int64_t kAct, typename T>
struct BackwardBody {
  static BwdSums run(const Layout& L, const T* g, const BwdArgs& a, const at::Tensor& stats, const at::Tensor& qp,
                     T* grad_y) {
    return backward_impl<kAct, T>(L, g, a, stats, qp, grad_y);
  }
};

void check_common(const at::Tensor& y, int64_t act, int64_t bits) {
  cpu::check_cpu_floating(y, "y");
  TORCH_CHECK(act >= kIdentity && act <= kHSwish, "bquant: act must be 0 (identity), 1 (relu) or 2 (h_swish), got ",
              act);
  TORCH_CHECK(bits == 0 || (bits >= 2 && bits <= 8), "bquant: bits must be 0 (no quantizer) or in [2, 8], got ",
              bits);
}

// `out` (computed on the dense form of `ref`) with the memory format a PyTorch op gives for `ref`.
at::Tensor restride_like(const at::Tensor& out, const at::Tensor& ref) {
  if (out.strides() == ref.strides()) return out;
  at::Tensor target = at::empty_like(ref, out.options());
  return target.strides() == out.strides() ? out : target.copy_(out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> epilogue_fwd_cpu(
    const at::Tensor& y, const at::Tensor& gamma, const at::Tensor& beta, const std::optional<at::Tensor>& theta,
    const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& lo_hi, double eps, int64_t act,
    int64_t bits, bool is_signed) {
  check_common(y, act, bits);
  const Layout L = layout_of(y);
  const int64_t C = L.C;
  FwdArgs args{read_vector(gamma, "gamma", C), read_vector(beta, "beta", C), std::nullopt,
               !running_mean.has_value(), eps, 0.0, 0.0, bits, is_signed};
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "bquant: running_mean and running_var must be given together");
  if (bits > 0) {
    TORCH_CHECK(theta.has_value() && offset.has_value(), "bquant: theta and offset are required when bits > 0");
    cpu::check_cpu_floating(*theta, "theta", 1);
    cpu::check_cpu_floating(*offset, "offset", 1);
    args.theta = cpu::read_scalar(*theta);
    args.offset = cpu::read_scalar(*offset);
    if (lo_hi.has_value()) {
      cpu::check_cpu_floating(*lo_hi, "lo_hi", 2);
      args.lo_hi = std::make_pair(cpu::read_scalar(*lo_hi, 0), cpu::read_scalar(*lo_hi, 1));
    }
  }
  const at::ScalarType math = cpu::math_dtype(y.scalar_type());
  at::Tensor stats = at::empty({2, C}, y.options().dtype(math));
  if (!args.batch_stats) {
    const std::vector<double> rm = read_vector(*running_mean, "running_mean", C);
    const std::vector<double> rv = read_vector(*running_var, "running_var", C);
    AT_DISPATCH_FLOATING_TYPES(math, "bquant_epilogue_stats", [&] {
      scalar_t* st = stats.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        st[c] = static_cast<scalar_t>(rm[c]);
        st[C + c] = static_cast<scalar_t>(rv[c]);
      }
    });
  }
  at::Tensor qparams = at::empty({kNumQParams}, y.options().dtype(math));
  at::Tensor out = at::empty_like(L.x);
  BQ_DISPATCH_CPU_FLOATING(y.scalar_type(), "bquant_cpu_epilogue_forward",
                           [&] { dispatch_act<ForwardBody, scalar_t>(act, L, args, out, stats, qparams); });
  return {restride_like(out, y), stats, qparams};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> epilogue_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& stats, const at::Tensor& offset, const at::Tensor& qparams, bool batch_stats, double eps,
    int64_t act, int64_t bits, bool is_signed) {
  check_common(y, act, bits);
  const Layout L = layout_of(y);
  const int64_t C = L.C;
  const at::ScalarType math = cpu::math_dtype(y.scalar_type());
  TORCH_CHECK(stats.scalar_type() == math && stats.is_contiguous() && stats.numel() == 2 * C,
              "bquant: stats must be a contiguous (2, C) ", math, " tensor");
  TORCH_CHECK(qparams.scalar_type() == math && qparams.is_contiguous() && qparams.numel() == kNumQParams,
              "bquant: qparams must be a contiguous ", math, " tensor of ", kNumQParams, " elements");
  TORCH_CHECK(grad_out.sizes() == y.sizes() && grad_out.scalar_type() == y.scalar_type(),
              "bquant: grad_out must have the shape and dtype of y");
  const at::Tensor g = grad_out.strides() == L.x.strides() ? grad_out : at::empty_like(L.x).copy_(grad_out);
  BwdArgs args{read_vector(gamma, "gamma", C), read_vector(beta, "beta", C), batch_stats, eps,
               bits > 0 ? cpu::read_scalar(offset) : 0.0, bits, is_signed};
  at::Tensor grad_y = at::empty_like(L.x);
  at::Tensor grad_gamma = at::empty({C}, gamma.options());
  at::Tensor grad_beta = at::empty({C}, beta.options());
  at::Tensor grad_theta = at::zeros({1}, qparams.options());
  at::Tensor grad_offset = at::zeros({1}, qparams.options());
  BQ_DISPATCH_CPU_FLOATING(y.scalar_type(), "bquant_cpu_epilogue_backward", [&] {
    using A = cpu::acc_t<scalar_t>;
    const BwdSums s = dispatch_act<BackwardBody, scalar_t>(act, L, g.const_data_ptr<scalar_t>(), args, stats,
                                                           qparams, grad_y.data_ptr<scalar_t>());
    const A* st = stats.const_data_ptr<A>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gamma.scalar_type(), "bquant_epilogue_gamma", [&] {
      scalar_t* gg = grad_gamma.data_ptr<scalar_t>();
      scalar_t* gb = grad_beta.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        gg[c] = static_cast<scalar_t>(s.s2[c] / std::sqrt(static_cast<double>(st[C + c]) + eps));
        gb[c] = static_cast<scalar_t>(s.s1[c]);
      }
    });
    if (bits > 0) {
      const A* qp = qparams.const_data_ptr<A>();
      const double l = static_cast<double>(qp[kL]);
      grad_theta.data_ptr<A>()[0] = static_cast<A>(s.dl / l * static_cast<double>(qp[kDlDtheta]));
      grad_offset.data_ptr<A>()[0] = static_cast<A>(-s.dout * static_cast<double>(qp[kScale]) / l);
    }
  });
  return {restride_like(grad_y, y), grad_gamma, grad_beta, grad_theta, grad_offset};
}

// ----------------------------------------------------------------------------- autograd

using EpilogueFwd = decltype(epilogue_fwd_cpu);
using EpilogueBwd = decltype(epilogue_bwd_cpu);

const c10::TypedOperatorHandle<EpilogueFwd>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bquant::native_bn_act_quant_fwd", "").typed<EpilogueFwd>();
  return op;
}

const c10::TypedOperatorHandle<EpilogueBwd>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bquant::native_bn_act_quant_bwd", "").typed<EpilogueBwd>();
  return op;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// Saves y and the per-channel statistics only: the backward recomputes BN, activation and
// quantization from y (no BN output or activation is kept alive).
class EpilogueFunction : public torch::autograd::Function<EpilogueFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& gamma,
                               const at::Tensor& beta, const std::optional<at::Tensor>& theta,
                               const std::optional<at::Tensor>& offset,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& lo_hi,
                               double eps, int64_t act, int64_t bits, bool is_signed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, stats, qparams] =
        fwd_op().call(y, gamma, beta, theta, offset, running_mean, running_var, lo_hi, eps, act, bits, is_signed);
    const at::Tensor off = offset.has_value() ? *offset : at::Tensor();
    ctx->save_for_backward({y, gamma, beta, stats, off, qparams});
    ctx->saved_data["batch_stats"] = !running_mean.has_value();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["signed"] = is_signed;
    ctx->saved_data["theta_dtype"] =
        static_cast<int64_t>(theta.has_value() ? theta->scalar_type() : qparams.scalar_type());
    ctx->mark_non_differentiable({stats, qparams});
    ctx->set_materialize_grads(false);
    return {out, stats, qparams};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& y = saved[0];
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(y);
    const int64_t bits = ctx->saved_data["bits"].toInt();
    auto [grad_y, grad_gamma, grad_beta, grad_theta, grad_offset] =
        bwd_op().call(grad_out, y, saved[1], saved[2], saved[3], bits > 0 ? saved[4] : saved[3], saved[5],
                      ctx->saved_data["batch_stats"].toBool(), ctx->saved_data["eps"].toDouble(),
                      ctx->saved_data["act"].toInt(), bits, ctx->saved_data["signed"].toBool());
    variable_list out{grad_y, grad_gamma, grad_beta, {}, {}, {}, {}, {}, {}, {}, {}, {}};
    if (bits > 0) {
      out[3] = as_dtype(grad_theta, static_cast<at::ScalarType>(ctx->saved_data["theta_dtype"].toInt()));
      out[4] = as_dtype(grad_offset, saved[4].scalar_type());
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> epilogue_autograd(
    const at::Tensor& y, const at::Tensor& gamma, const at::Tensor& beta, const std::optional<at::Tensor>& theta,
    const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& lo_hi, double eps, int64_t act,
    int64_t bits, bool is_signed) {
  auto out = EpilogueFunction::apply(y, gamma, beta, theta, offset, running_mean, running_var, lo_hi, eps, act, bits,
                                     is_signed);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> epilogue_no_grad(
    const at::Tensor& y, const at::Tensor& gamma, const at::Tensor& beta, const std::optional<at::Tensor>& theta,
    const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& lo_hi, double eps, int64_t act,
    int64_t bits, bool is_signed) {
  return fwd_op().call(y, gamma, beta, theta, offset, running_mean, running_var, lo_hi, eps, act, bits, is_signed);
}

}  // namespace

#define BQ_EPILOGUE_ARGS                                                                                     \
  "Tensor y, Tensor gamma, Tensor beta, Tensor? theta, Tensor? offset, Tensor? running_mean, "              \
  "Tensor? running_var, Tensor? lo_hi, float eps, int act, int bits, bool signed"

TORCH_LIBRARY_FRAGMENT(bquant, m) {
  m.def("native_bn_act_quant(" BQ_EPILOGUE_ARGS ") -> (Tensor, Tensor, Tensor)");
  m.def("native_bn_act_quant_fwd(" BQ_EPILOGUE_ARGS ") -> (Tensor, Tensor, Tensor)");
  m.def("native_bn_act_quant_bwd(Tensor grad_out, Tensor y, Tensor gamma, Tensor beta, Tensor stats, "
        "Tensor offset, Tensor qparams, bool batch_stats, float eps, int act, int bits, bool signed) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}
#undef BQ_EPILOGUE_ARGS

TORCH_LIBRARY_IMPL(bquant, Autograd, m) { m.impl("native_bn_act_quant", &epilogue_autograd); }

TORCH_LIBRARY_IMPL(bquant, CompositeExplicitAutograd, m) { m.impl("native_bn_act_quant", &epilogue_no_grad); }

TORCH_LIBRARY_IMPL(bquant, CPU, m) {
  m.impl("native_bn_act_quant_fwd", &epilogue_fwd_cpu);
  m.impl("native_bn_act_quant_bwd", &epilogue_bwd_cpu);
}

}  // namespace bquant
