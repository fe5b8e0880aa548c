// Fused layer epilogue on the CPU: BatchNorm (batch or running statistics) -> activation (identity,
// ReLU, h_swish) -> + residual (optional) -> BatchQuant of that sum s, forward and backward, as the native ops
//
//   native_bn_act_quant(y, gamma, beta, residual?, theta?, offset?, running_mean?, running_var?, lo_hi?, eps,
//                       act, bits, signed, keep) -> (out, kept, stats, qparams)               differentiable
//   native_bn_act_quant_fwd / native_bn_act_quant_bwd                                          the kernels
//
// `bits = 0` stops the chain before the quantizer (out = s). `keep` (needs bits > 0) also returns s as
// `kept` (an empty tensor otherwise), for a later shortcut; gradients into it add to the quantizer's.
// `residual` has y's shape, dtype and strides. `stats` is (2, C): the per-channel mean and biased variance
// BN used; `qparams` is BatchQuant's (zeros without quantizer). The numbers are those of the unfused
// composition F.batch_norm -> activation -> + residual -> batchquant (bn_act_quant_forward / _backward
// in bquant_kernels/backends/reference.py): intermediates are rounded to the input's dtype where the
// composition stores them, the activation formulas are PyTorch's, and the quantization runs through the
// same vectorized BatchQuant loops as bquant::native_batchquant.
//
// Passes over the activation (identity / ReLU, no residual): forward 2 reads + 1 write (statistics:
// BN's sums and the per-channel min/max of y, from which the activated range follows exactly, every
// float step of act((y - mean) * k + beta) being monotone in y; then the element pass). h_swish (not
// monotone) or a residual (s is not a function of y) reads once more for the per-channel extremes of s
// and stores s in `kept` (keep) or in the output, from which the last pass quantizes (in place in the
// output; recomputing h_swish, a division per element, costs more). Backward: read y (and the residual)
// and the gradients, store the activation's gradient in grad_y's memory (and g_s in grad_residual's)
// with BN's per-channel sums; then rewrite grad_y in place. Each channel's sums are accumulated in a
// fixed order on one thread: results do not depend on the thread count.
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
#include <type_traits>
#include <tuple>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>  // F16C conversions of the AVX2 instance
#endif

#include "bquant.h"
#include "common/quant_math.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_kernels.h"

namespace bquant {
namespace {

enum Act : int64_t { kIdentity = 0, kRelu = 1, kHSwish = 2 };

// Elements per buffered segment: a segment's intermediates stay in L1 between the loops over it.
constexpr int64_t kSeg = 1024;
constexpr int kLanes = 8;  // independent accumulators of a segment's sums

// x as (outer, C, inner) in memory: dense contiguous (inner = prod of the spatial sizes) or with the
// channel dimension innermost (channels_last: inner = 1).
struct Layout {
  at::Tensor x;
  int64_t outer, C, inner;
};


Layout layout_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "bquant: y must have at least 2 dimensions (N, C, ...), got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, "bquant: y must not be empty, got shape ", x.sizes());
  const int64_t C = x.size(1);
  const int64_t inner = x.numel() / (x.size(0) * C);
  if (x.is_contiguous()) return {x, x.size(0), C, inner};
  if (channels_innermost(x)) return {x, x.numel() / C, C, 1};
  return {x.contiguous(), x.size(0), C, inner};
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

// Arguments of the forward and backward kernels (host values).
struct FwdArgs {
  std::vector<double> gamma, beta;
  std::optional<std::pair<double, double>> lo_hi;  // the quantizer's stored range (eval)
  bool batch_stats;
  double eps, theta, offset;
  int64_t bits;
  bool is_signed;
};

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

// The kernels, compiled twice: for the baseline instruction set and, where GCC can target it, for
// AVX2 (+FMA, F16C) in a `#pragma GCC target` region after every shared header, like
// csrc/cpu/kernels_avx2.cpp; the AVX2 instance runs where the BatchQuant kernels run theirs. With
// -ffp-contract=off both compute the same bits.
#define BQ_EPI_ISA isa_default
#include "cpu/epilogue_kernels_impl.h"
#undef BQ_EPI_ISA
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define BQ_EPI_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC optimize("fp-contract=off")  // as on the command line: no FMA the source does not spell out
#define BQ_EPI_ISA isa_avx2
#define BQ_EPI_F16C 1  // the F16C intrinsics are usable (g++ defines no __F16C__ for a pragma target)
#include "cpu/epilogue_kernels_impl.h"
#undef BQ_EPI_F16C
#undef BQ_EPI_ISA
#pragma GCC pop_options
#endif

// Whether the AVX2 instance runs here: exactly when the BatchQuant kernel table is the AVX2 one.
bool use_avx2() {
#ifdef BQ_EPI_HAVE_AVX2
  static const bool avx2 = std::strcmp(cpu::kernel_table().isa, "avx2") == 0;
  return avx2;
#else
  return false;
#endif
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
  static int run(const Layout& L, const FwdArgs& a, const T* res, at::Tensor& out, T* kept, at::Tensor& stats,
                 at::Tensor& qp) {
#ifdef BQ_EPI_HAVE_AVX2
    if (use_avx2()) {
      isa_avx2::forward_impl<kAct, T>(L, a, res, out, kept, stats, qp);
      return 0;
    }
#endif
    isa_default::forward_impl<kAct, T>(L, a, res, out, kept, stats, qp);
    return 0;
  }
};

template <int64_t kAct, typename T>
struct BackwardBody {
  static BwdSums run(const Layout& L, const T* g, const T* g_act, const T* res, const BwdArgs& a,
                     const at::Tensor& stats, const at::Tensor& qp, T* grad_y, T* grad_res) {
#ifdef BQ_EPI_HAVE_AVX2
    if (use_avx2()) return isa_avx2::backward_impl<kAct, T>(L, g, g_act, res, a, stats, qp, grad_y, grad_res);
#endif
    return isa_default::backward_impl<kAct, T>(L, g, g_act, res, a, stats, qp, grad_y, grad_res);
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

// `t` (a residual or a gradient, y's shape and dtype) with the strides of L.x, which the kernels walk
// with the same offsets as y: itself when it has them (always from the public function), else a copy.
at::Tensor walked_like(const at::Tensor& t, const char* name, const at::Tensor& y, const Layout& L) {
  cpu::check_cpu_floating(t, name);
  TORCH_CHECK(t.sizes() == y.sizes() && t.scalar_type() == y.scalar_type(), "bquant: ", name,
              " must have the shape and dtype of y (", y.sizes(), ", ", y.scalar_type(), "), got (", t.sizes(), ", ",
              t.scalar_type(), ")");
  return t.strides() == L.x.strides() ? t : at::empty_like(L.x).copy_(t);
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> epilogue_fwd_cpu(
    const at::Tensor& y, const at::Tensor& gamma, const at::Tensor& beta, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& theta, const std::optional<at::Tensor>& offset,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& lo_hi, double eps, int64_t act, int64_t bits, bool is_signed, bool keep) {
  check_common(y, act, bits);
  TORCH_CHECK(!keep || bits > 0,
              "bquant: keep (return_activation) needs a quantizer (bits > 0): without one the output is the "
              "activation");
  const Layout L = layout_of(y);
  const int64_t C = L.C;
  const at::Tensor res = residual.has_value() ? walked_like(*residual, "residual", y, L) : at::Tensor();
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
  at::Tensor kept = keep ? at::empty_like(L.x) : y.new_empty({0});
  BQ_DISPATCH_CPU_FLOATING(y.scalar_type(), "bquant_cpu_epilogue_forward", [&] {
    dispatch_act<ForwardBody, scalar_t>(act, L, args, data_or_null<scalar_t>(res), out,
                                        keep ? kept.data_ptr<scalar_t>() : nullptr, stats, qparams);
  });
  return {restride_like(out, y), keep ? restride_like(kept, y) : kept, stats, qparams};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> epilogue_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_act, const at::Tensor& y,
    const std::optional<at::Tensor>& residual, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& stats, const std::optional<at::Tensor>& offset, const at::Tensor& qparams, bool batch_stats,
    double eps, int64_t act, int64_t bits, bool is_signed) {
  check_common(y, act, bits);
  const Layout L = layout_of(y);
  const int64_t C = L.C;
  const at::ScalarType math = cpu::math_dtype(y.scalar_type());
  TORCH_CHECK(stats.scalar_type() == math && stats.is_contiguous() && stats.numel() == 2 * C,
              "bquant: stats must be a contiguous (2, C) ", math, " tensor");
  TORCH_CHECK(qparams.scalar_type() == math && qparams.is_contiguous() && qparams.numel() == kNumQParams,
              "bquant: qparams must be a contiguous ", math, " tensor of ", kNumQParams, " elements");
  const at::Tensor g = walked_like(grad_out, "grad_out", y, L);
  const bool has_ga = grad_act.has_value() && grad_act->defined();
  const at::Tensor ga = has_ga ? walked_like(*grad_act, "grad_act", y, L) : at::Tensor();
  const at::Tensor res = residual.has_value() ? walked_like(*residual, "residual", y, L) : at::Tensor();
  if (bits > 0) {
    TORCH_CHECK(offset.has_value(), "bquant: offset is required when bits > 0");
    cpu::check_cpu_floating(*offset, "offset", 1);
  }
  BwdArgs args{read_vector(gamma, "gamma", C), read_vector(beta, "beta", C), batch_stats, eps,
               bits > 0 ? cpu::read_scalar(*offset) : 0.0, bits, is_signed};
  at::Tensor grad_y = at::empty_like(L.x);
  at::Tensor grad_res = res.defined() ? at::empty_like(L.x) : y.new_empty({0});
  at::Tensor grad_gamma = at::empty({C}, gamma.options());
  at::Tensor grad_beta = at::empty({C}, beta.options());
  at::Tensor grad_theta = at::zeros({1}, qparams.options());
  at::Tensor grad_offset = at::zeros({1}, qparams.options());
  BQ_DISPATCH_CPU_FLOATING(y.scalar_type(), "bquant_cpu_epilogue_backward", [&] {
    using A = cpu::acc_t<scalar_t>;
    const BwdSums s = dispatch_act<BackwardBody, scalar_t>(
        act, L, g.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(ga), data_or_null<scalar_t>(res), args, stats,
        qparams, grad_y.data_ptr<scalar_t>(), res.defined() ? grad_res.data_ptr<scalar_t>() : nullptr);
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
  return {restride_like(grad_y, y), res.defined() ? restride_like(grad_res, *residual) : grad_res, grad_gamma,
          grad_beta, grad_theta, grad_offset};
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

// Saves y, the residual and the per-channel statistics only: the backward recomputes BN, activation,
// sum and quantization from them (no BN output, activation or s is kept alive by autograd).
class EpilogueFunction : public torch::autograd::Function<EpilogueFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& gamma,
                               const at::Tensor& beta, const std::optional<at::Tensor>& residual,
                               const std::optional<at::Tensor>& theta, const std::optional<at::Tensor>& offset,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& lo_hi,
                               double eps, int64_t act, int64_t bits, bool is_signed, bool keep) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, kept, stats, qparams] = fwd_op().call(y, gamma, beta, residual, theta, offset, running_mean,
                                                     running_var, lo_hi, eps, act, bits, is_signed, keep);
    const at::Tensor off = offset.has_value() ? *offset : at::Tensor();
    const at::Tensor res = residual.has_value() ? *residual : at::Tensor();
    ctx->save_for_backward({y, gamma, beta, stats, off, qparams, res});
    ctx->saved_data["batch_stats"] = !running_mean.has_value();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["signed"] = is_signed;
    if (theta.has_value()) {  // one-element parameters of any shape get their gradient in that shape
      ctx->saved_data["theta_sizes"] = theta->sizes().vec();
      ctx->saved_data["theta_dtype"] = static_cast<int64_t>(theta->scalar_type());
    }
    if (keep) {
      ctx->mark_non_differentiable({stats, qparams});
    } else {
      ctx->mark_non_differentiable({kept, stats, qparams});  // empty
    }
    ctx->set_materialize_grads(false);
    return {out, kept, stats, qparams};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& y = saved[0];
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(y);
    const std::optional<at::Tensor> grad_act = grads[1].defined() ? std::optional(grads[1]) : std::nullopt;
    const std::optional<at::Tensor> residual = saved[6].defined() ? std::optional(saved[6]) : std::nullopt;
    const std::optional<at::Tensor> offset = saved[4].defined() ? std::optional(saved[4]) : std::nullopt;
    const int64_t bits = ctx->saved_data["bits"].toInt();
    auto [grad_y, grad_res, grad_gamma, grad_beta, grad_theta, grad_offset] =
        bwd_op().call(grad_out, grad_act, y, residual, saved[1], saved[2], saved[3], offset, saved[5],
                      ctx->saved_data["batch_stats"].toBool(), ctx->saved_data["eps"].toDouble(),
                      ctx->saved_data["act"].toInt(), bits, ctx->saved_data["signed"].toBool());
    variable_list out{grad_y, grad_gamma, grad_beta, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
    if (residual.has_value()) out[3] = grad_res;
    if (bits > 0) {
      out[4] = as_param(grad_theta, ctx->saved_data["theta_sizes"].toIntVector(),
                        static_cast<at::ScalarType>(ctx->saved_data["theta_dtype"].toInt()));
      out[5] = as_param(grad_offset, saved[4].sizes(), saved[4].scalar_type());
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> epilogue_autograd(
    const at::Tensor& y, const at::Tensor& gamma, const at::Tensor& beta, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& theta, const std::optional<at::Tensor>& offset,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& lo_hi, double eps, int64_t act, int64_t bits, bool is_signed, bool keep) {
  auto out = EpilogueFunction::apply(y, gamma, beta, residual, theta, offset, running_mean, running_var, lo_hi, eps,
                                     act, bits, is_signed, keep);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> epilogue_no_grad(
    const at::Tensor& y, const at::Tensor& gamma, const at::Tensor& beta, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& theta, const std::optional<at::Tensor>& offset,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& lo_hi, double eps, int64_t act, int64_t bits, bool is_signed, bool keep) {
  return fwd_op().call(y, gamma, beta, residual, theta, offset, running_mean, running_var, lo_hi, eps, act, bits,
                       is_signed, keep);
}

}  // namespace

#define BQ_EPILOGUE_ARGS                                                                                     \
  "Tensor y, Tensor gamma, Tensor beta, Tensor? residual, Tensor? theta, Tensor? offset, "                  \
  "Tensor? running_mean, Tensor? running_var, Tensor? lo_hi, float eps, int act, int bits, bool signed, "   \
  "bool keep"

TORCH_LIBRARY_FRAGMENT(bquant, m) {
  m.def("native_bn_act_quant(" BQ_EPILOGUE_ARGS ") -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("native_bn_act_quant_fwd(" BQ_EPILOGUE_ARGS ") -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("native_bn_act_quant_bwd(Tensor grad_out, Tensor? grad_act, Tensor y, Tensor? residual, Tensor gamma, "
        "Tensor beta, Tensor stats, Tensor? offset, Tensor qparams, bool batch_stats, float eps, int act, int bits, "
        "bool signed) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
#undef BQ_EPILOGUE_ARGS

TORCH_LIBRARY_IMPL(bquant, Autograd, m) { m.impl("native_bn_act_quant", &epilogue_autograd); }

TORCH_LIBRARY_IMPL(bquant, CompositeExplicitAutograd, m) { m.impl("native_bn_act_quant", &epilogue_no_grad); }

TORCH_LIBRARY_IMPL(bquant, CPU, m) {
  m.impl("native_bn_act_quant_fwd", &epilogue_fwd_cpu);
  m.impl("native_bn_act_quant_bwd", &epilogue_bwd_cpu);
}

}  // namespace bquant
