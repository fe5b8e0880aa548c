// The native ops `torch.ops.bquant.native_*`: the cpu and cuda backends behind the PyTorch dispatcher,
// with their memory-layout handling and autograd formulas in C++. A Python call crosses into C++ once
// per op and once per backward: the per-call overhead is the dispatcher's, not Python's, which is
// what small activations (and a slow host in front of a fast GPU) are bound by.
//
//   native_batchquant(x, theta, offset, lo_hi?, bits, signed) -> (y, qparams)   differentiable
//   native_batchquant_fwd / native_batchquant_bwd                                 the kernels
//   native_batch_range(x) -> [lo, hi]
//   native_lsq(w, step, bits, signed, numel_full) -> w_hat                        differentiable
//   native_lsq_fwd / native_lsq_bwd                                               the kernels
//   native_lsq_multi(weights[], steps[], bits[], signed, numel_full[]) -> w_hat[] differentiable
//   native_lsq_multi_fwd / native_lsq_multi_bwd                                   one launch each on CUDA
//
// Fake (meta) implementations for torch.compile are registered in bquant_kernels/ops.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "batchquant_autograd.h"
#include "bquant.h"

namespace bquant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ----------------------------------------------------------------------------- layout


// x as the kernels walk it (see bquant_kernels/backends/__init__.py): itself when contiguous or
// channels-innermost, else a contiguous copy; element i belongs to channel (i / inner) % C.
struct Dense {
  at::Tensor x;
  int64_t C;
  int64_t inner;
};

Dense dense_activation(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "bquant: x must have at least 2 dimensions (N, C, ...), got shape ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(x.numel() > 0, "bquant: x must not be empty, got shape ", x.sizes());
  const int64_t inner = x.numel() / (x.size(0) * C);
  if (x.is_contiguous()) return {x, C, inner};
  if (channels_innermost(x)) return {x, C, 1};
  return {x.contiguous(), C, inner};
}

// `out` (computed on the dense form of `ref`) with the memory format a PyTorch op gives for `ref`.
at::Tensor restride_like(const at::Tensor& out, const at::Tensor& ref) {
  if (out.strides() == ref.strides()) return out;
  at::Tensor target = at::empty_like(ref, out.options());
  return target.strides() == out.strides() ? out : target.copy_(out);
}

// `t` with the strides of `dense` (a copy only when they differ).
at::Tensor with_strides_of(const at::Tensor& t, const at::Tensor& dense) {
  if (t.strides() == dense.strides()) return t;
  return at::empty_like(dense, t.options()).copy_(t);
}

// ----------------------------------------------------------------------------- kernels per device

template <auto Forward>
std::tuple<at::Tensor, at::Tensor> batchquant_fwd(const at::Tensor& x, const at::Tensor& theta,
                                                  const at::Tensor& offset, const std::optional<at::Tensor>& lo_hi,
                                                  int64_t bits, bool is_signed) {
  const Dense d = dense_activation(x);
  auto [y, qparams] = Forward(d.x, theta, offset, lo_hi, bits, is_signed, d.C, d.inner);
  return {restride_like(y, x), qparams};
}

template <auto Backward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> batchquant_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const at::Tensor& offset, const at::Tensor& qparams,
                                                              int64_t bits, bool is_signed) {
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "bquant: grad_y must have the shape of x (", x.sizes(), "), got ",
                    grad_y.sizes());
  const Dense d = dense_activation(x);
  auto [grad_x, grad_theta, grad_offset] =
      Backward(with_strides_of(grad_y, d.x), d.x, offset, qparams, bits, is_signed);
  return {restride_like(grad_x, x), grad_theta, grad_offset};
}

template <auto Range>
at::Tensor batch_range(const at::Tensor& x) {
  const Dense d = dense_activation(x);
  return Range(d.x, d.C, d.inner);
}

template <auto Forward>
at::Tensor lsq_fwd(const at::Tensor& w, const at::Tensor& step, int64_t bits, bool is_signed, int64_t numel_full) {
  return restride_like(Forward(w.contiguous(), step, bits, is_signed), w);
}

template <auto Backward>
std::tuple<at::Tensor, at::Tensor> lsq_bwd(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& step,
                                           int64_t bits, bool is_signed, int64_t numel_full) {
  TORCH_CHECK_VALUE(grad.sizes() == w.sizes(), "bquant: grad must have the shape of w (", w.sizes(), "), got ",
                    grad.sizes());
  const at::Tensor wc = w.contiguous();
  auto [grad_w, grad_step] = Backward(with_strides_of(grad, wc), wc, step, bits, is_signed, numel_full);
  return {restride_like(grad_w, w), grad_step};
}

// Multi-tensor LSQ: the arguments are checked with the index of the offending entry, each once per
// call: the kernel ops check the lists (check_lsq_multi); numel_full, which only the backward uses, is
// checked by whoever receives it (check_numel_full), so that a bad one fails at the forward call.

// Under torch.compile's dynamic shapes the sizes are symbols: size checks then run on the real call.
bool concrete_sizes(const at::Tensor& t) { return !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides(); }

void check_lsq_multi(at::TensorList weights, at::TensorList steps, at::IntArrayRef bits) {
  const size_t n = weights.size();
  TORCH_CHECK_VALUE(steps.size() == n, "steps must have one entry per weight (", n, "), got ", steps.size());
  TORCH_CHECK_VALUE(bits.size() == n, "bits must have one entry per weight (", n, "), got ", bits.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), "weights[", i, "] must be a floating tensor, got ",
                     w.scalar_type());
    const bool concrete = concrete_sizes(w);
    TORCH_CHECK_VALUE(!concrete || w.numel() > 0, "weights[", i, "] must not be empty, got shape ", w.sym_sizes());
    TORCH_CHECK_VALUE(w.device() == weights[0].device() && w.scalar_type() == weights[0].scalar_type(),
                      "weights must share one device and dtype: weights[", i, "] is ", w.scalar_type(), " on ",
                      w.device(), ", weights[0] is ", weights[0].scalar_type(), " on ", weights[0].device());
    TORCH_CHECK_VALUE(!concrete || !concrete_sizes(steps[i]) || steps[i].numel() == 1, "steps[", i,
                      "] must have exactly 1 element, got shape ", steps[i].sym_sizes());
    TORCH_CHECK_VALUE(steps[i].device() == w.device(), "steps[", i, "] is on ", steps[i].device(),
                      " but weights[", i, "] is on ", w.device());
    TORCH_CHECK_TYPE(at::isFloatingType(steps[i].scalar_type()), "steps[", i, "] must be a floating tensor, got ",
                     steps[i].scalar_type());
    TORCH_CHECK_VALUE(bits[i] >= 1 && bits[i] <= 8, "bits[", i, "] must be in [1, 8], got ", bits[i]);
  }
}

void check_numel_full(at::TensorList weights, at::IntArrayRef numel_full) {
  TORCH_CHECK_VALUE(numel_full.size() == weights.size(), "numel_full must have one entry per weight (",
                    weights.size(), "), got ", numel_full.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK_VALUE(!concrete_sizes(weights[i]) || numel_full[i] >= weights[i].numel(), "numel_full[", i,
                      "] must be an int >= weights[", i, "].numel() (", weights[i].sym_numel(), "), got ",
                      numel_full[i]);
  }
}

void check_lsq_multi_backward(at::TensorList grads, at::TensorList weights, at::TensorList steps, at::IntArrayRef bits,
                              at::IntArrayRef numel_full) {
  check_lsq_multi(weights, steps, bits);
  check_numel_full(weights, numel_full);
  TORCH_CHECK_VALUE(grads.size() == weights.size(), "grads must have one entry per weight (", weights.size(),
                    "), got ", grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK_VALUE(!concrete_sizes(grads[i]) || !concrete_sizes(weights[i]) || grads[i].sizes() == weights[i].sizes(), "grads[", i,
                      "] must have the shape of weights[", i, "] (", weights[i].sym_sizes(), "), got ",
                      grads[i].sym_sizes());
  }
}

// CPU: the single-tensor kernels in a C++ loop (same numbers as lsq, bit for bit).
std::vector<at::Tensor> lsq_multi_fwd_cpu(at::TensorList weights, at::TensorList steps, at::IntArrayRef bits,
                                          bool is_signed) {
  check_lsq_multi(weights, steps, bits);
  std::vector<at::Tensor> outs;
  outs.reserve(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    outs.push_back(lsq_fwd<cpu_lsq_forward>(weights[i], steps[i], bits[i], is_signed, weights[i].numel()));
  }
  return outs;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> lsq_multi_bwd_cpu(at::TensorList grads, at::TensorList weights,
                                                                  at::TensorList steps, at::IntArrayRef bits,
                                                                  bool is_signed, at::IntArrayRef numel_full) {
  check_lsq_multi_backward(grads, weights, steps, bits, numel_full);
  std::vector<at::Tensor> grad_ws, grad_steps;
  for (size_t i = 0; i < weights.size(); ++i) {
    auto [gw, gs] = lsq_bwd<cpu_lsq_backward>(grads[i], weights[i], steps[i], bits[i], is_signed, numel_full[i]);
    grad_ws.push_back(gw);
    grad_steps.push_back(gs);
  }
  return {grad_ws, grad_steps.empty() ? at::empty({0}, weights.empty() ? at::TensorOptions() : weights[0].options())
                                      : at::cat(grad_steps)};
}

#ifdef BQUANT_WITH_CUDA
// The kernels walk a weight linearly: contiguous, or channels_last (a copy otherwise).
at::Tensor dense_weight(const at::Tensor& w) {
  if (w.is_contiguous() || (w.dim() == 4 && w.is_contiguous(at::MemoryFormat::ChannelsLast))) return w;
  return w.contiguous();
}

std::vector<at::Tensor> dense_weights(at::TensorList weights) {
  std::vector<at::Tensor> dense;
  dense.reserve(weights.size());
  for (const at::Tensor& w : weights) dense.push_back(dense_weight(w));
  return dense;
}

std::vector<at::Tensor> lsq_multi_fwd_cuda(at::TensorList weights, at::TensorList steps, at::IntArrayRef bits,
                                           bool is_signed) {
  check_lsq_multi(weights, steps, bits);
  if (weights.empty()) return {};
  std::vector<at::Tensor> outs = cuda_lsq_multi_forward(dense_weights(weights), steps.vec(), bits.vec(), is_signed);
  for (size_t i = 0; i < outs.size(); ++i) outs[i] = restride_like(outs[i], weights[i]);
  return outs;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> lsq_multi_bwd_cuda(at::TensorList grads, at::TensorList weights,
                                                                   at::TensorList steps, at::IntArrayRef bits,
                                                                   bool is_signed, at::IntArrayRef numel_full) {
  check_lsq_multi_backward(grads, weights, steps, bits, numel_full);
  const std::vector<at::Tensor> dense = dense_weights(weights);
  std::vector<at::Tensor> dense_grads;
  dense_grads.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) dense_grads.push_back(with_strides_of(grads[i], dense[i]));
  auto [grad_ws, grad_steps] =
      cuda_lsq_multi_backward(dense_grads, dense, steps.vec(), bits.vec(), is_signed, numel_full.vec());
  for (size_t i = 0; i < grad_ws.size(); ++i) grad_ws[i] = restride_like(grad_ws[i], weights[i]);
  return {grad_ws, grad_steps};
}
#endif

// ----------------------------------------------------------------------------- autograd

// The kernel ops, called from the Functions below through the dispatcher (so that the device, and
// torch.compile's fake tensors, pick the implementation). Looked up once each.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

#define BQ_OP(getter, name, signature)                                     \
  const c10::TypedOperatorHandle<signature>& getter() {                    \
    static const auto op = find_op<signature>("bquant::" name);            \
    return op;                                                             \
  }
BQ_OP(batchquant_fwd_op, "native_batchquant_fwd", decltype(batchquant_fwd<cpu_batchquant_forward>))
BQ_OP(batchquant_bwd_op, "native_batchquant_bwd", decltype(batchquant_bwd<cpu_batchquant_backward>))
BQ_OP(lsq_fwd_op, "native_lsq_fwd", decltype(lsq_fwd<cpu_lsq_forward>))
BQ_OP(lsq_bwd_op, "native_lsq_bwd", decltype(lsq_bwd<cpu_lsq_backward>))
BQ_OP(lsq_multi_fwd_op, "native_lsq_multi_fwd", decltype(lsq_multi_fwd_cpu))
BQ_OP(lsq_multi_bwd_op, "native_lsq_multi_bwd", decltype(lsq_multi_bwd_cpu))
#undef BQ_OP

// Saves x, offset and the device scalars (qparams) only; the backward recomputes the rest from x.
class BatchQuantFunction : public torch::autograd::Function<BatchQuantFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& theta,
                               const at::Tensor& offset, const std::optional<at::Tensor>& lo_hi, int64_t bits,
                               bool is_signed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, qparams] = batchquant_fwd_op().call(x, theta, offset, lo_hi, bits, is_signed);
    return save_batchquant(ctx, y, qparams, {x, offset}, theta, bits, is_signed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const SavedBatchQuant s(ctx, grads);
    auto [grad_x, grad_theta, grad_offset] =
        batchquant_bwd_op().call(s.grad_y, s.x(), s.offset(), s.qparams(), s.bits, s.is_signed);
    return s.outputs({grad_x}, grad_theta, grad_offset);
  }
};

class LSQFunction : public torch::autograd::Function<LSQFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& w, const at::Tensor& step, int64_t bits,
                               bool is_signed, int64_t numel_full) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = lsq_fwd_op().call(w, step, bits, is_signed, numel_full);
    ctx->save_for_backward({w, step});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["signed"] = is_signed;
    ctx->saved_data["numel_full"] = numel_full;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& step = saved[1];
    auto [grad_w, grad_step] =
        lsq_bwd_op().call(grads[0], saved[0], step, ctx->saved_data["bits"].toInt(),
                          ctx->saved_data["signed"].toBool(), ctx->saved_data["numel_full"].toInt());
    return {grad_w, as_param(grad_step, step.sizes(), step.scalar_type()), {}, {}, {}};
  }
};

// Inputs flatten to weights..., steps..., then the three non-tensor arguments.
class LSQMultiFunction : public torch::autograd::Function<LSQMultiFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList weights, at::TensorList steps,
                               at::IntArrayRef bits, bool is_signed, at::IntArrayRef numel_full) {
    at::AutoDispatchBelowADInplaceOrView guard;
    check_numel_full(weights, numel_full);  // the forward op checks the rest
    std::vector<at::Tensor> outs = lsq_multi_fwd_op().call(weights, steps, bits, is_signed);
    std::vector<at::Tensor> saved(weights.begin(), weights.end());
    saved.insert(saved.end(), steps.begin(), steps.end());
    ctx->save_for_backward(saved);
    ctx->set_materialize_grads(false);  // an unused output's zeros are made below, not by the engine
    ctx->saved_data["bits"] = bits.vec();
    ctx->saved_data["signed"] = is_signed;
    ctx->saved_data["numel_full"] = numel_full.vec();
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const size_t n = saved.size() / 2;
    const std::vector<at::Tensor> weights(saved.begin(), saved.begin() + n);
    const std::vector<at::Tensor> steps(saved.begin() + n, saved.end());
    for (size_t i = 0; i < n; ++i) {
      if (!grads[i].defined()) grads[i] = at::zeros_like(weights[i]);  // that output was not used
    }
    const std::vector<int64_t> bits = ctx->saved_data["bits"].toIntVector();
    const std::vector<int64_t> numel_full = ctx->saved_data["numel_full"].toIntVector();
    auto [grad_ws, grad_steps] =
        lsq_multi_bwd_op().call(grads, weights, steps, bits, ctx->saved_data["signed"].toBool(), numel_full);
    variable_list out(grad_ws.begin(), grad_ws.end());
    // One split for all steps; a view or cast only for a step that is not a float32 [1] like the kernels'.
    std::vector<at::Tensor> per_step = grad_steps.split(1);
    for (size_t i = 0; i < n; ++i) out.push_back(as_param(per_step[i], steps[i].sizes(), steps[i].scalar_type()));
    out.resize(2 * n + 3);  // bits, signed, numel_full: no gradient
    return out;
  }
};

std::vector<at::Tensor> lsq_multi_autograd(at::TensorList weights, at::TensorList steps, at::IntArrayRef bits,
                                           bool is_signed, at::IntArrayRef numel_full) {
  return LSQMultiFunction::apply(weights, steps, bits, is_signed, numel_full);
}

std::vector<at::Tensor> lsq_multi_no_grad(at::TensorList weights, at::TensorList steps, at::IntArrayRef bits,
                                          bool is_signed, at::IntArrayRef numel_full) {
  check_numel_full(weights, numel_full);  // the forward op checks the rest
  return lsq_multi_fwd_op().call(weights, steps, bits, is_signed);
}

std::tuple<at::Tensor, at::Tensor> batchquant_autograd(const at::Tensor& x, const at::Tensor& theta,
                                                       const at::Tensor& offset,
                                                       const std::optional<at::Tensor>& lo_hi, int64_t bits,
                                                       bool is_signed) {
  auto out = BatchQuantFunction::apply(x, theta, offset, lo_hi, bits, is_signed);
  return {out[0], out[1]};
}

at::Tensor lsq_autograd(const at::Tensor& w, const at::Tensor& step, int64_t bits, bool is_signed,
                        int64_t numel_full) {
  return LSQFunction::apply(w, step, bits, is_signed, numel_full)[0];
}

// Below autograd (inference mode, or inside the Functions above): straight to the kernels.
std::tuple<at::Tensor, at::Tensor> batchquant_no_grad(const at::Tensor& x, const at::Tensor& theta,
                                                      const at::Tensor& offset,
                                                      const std::optional<at::Tensor>& lo_hi, int64_t bits,
                                                      bool is_signed) {
  return batchquant_fwd_op().call(x, theta, offset, lo_hi, bits, is_signed);
}

at::Tensor lsq_no_grad(const at::Tensor& w, const at::Tensor& step, int64_t bits, bool is_signed,
                       int64_t numel_full) {
  return lsq_fwd_op().call(w, step, bits, is_signed, numel_full);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bquant, m) {
  m.def("native_batchquant(Tensor x, Tensor theta, Tensor offset, Tensor? lo_hi, int bits, bool signed) -> "
        "(Tensor, Tensor)");
  m.def("native_batchquant_fwd(Tensor x, Tensor theta, Tensor offset, Tensor? lo_hi, int bits, bool signed) -> "
        "(Tensor, Tensor)");
  m.def("native_batchquant_bwd(Tensor grad_y, Tensor x, Tensor offset, Tensor qparams, int bits, bool signed) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("native_batch_range(Tensor x) -> Tensor");
  m.def("native_lsq(Tensor w, Tensor step, int bits, bool signed, int numel_full) -> Tensor");
  m.def("native_lsq_fwd(Tensor w, Tensor step, int bits, bool signed, int numel_full) -> Tensor");
  m.def("native_lsq_bwd(Tensor grad, Tensor w, Tensor step, int bits, bool signed, int numel_full) -> "
        "(Tensor, Tensor)");
  m.def("native_lsq_multi(Tensor[] weights, Tensor[] steps, int[] bits, bool signed, int[] numel_full) -> Tensor[]");
  m.def("native_lsq_multi_fwd(Tensor[] weights, Tensor[] steps, int[] bits, bool signed) -> Tensor[]");
  m.def("native_lsq_multi_bwd(Tensor[] grads, Tensor[] weights, Tensor[] steps, int[] bits, bool signed, "
        "int[] numel_full) -> (Tensor[], Tensor)");
}

TORCH_LIBRARY_IMPL(bquant, Autograd, m) {
  m.impl("native_batchquant", &batchquant_autograd);
  m.impl("native_lsq", &lsq_autograd);
  m.impl("native_lsq_multi", &lsq_multi_autograd);
}

TORCH_LIBRARY_IMPL(bquant, CompositeExplicitAutograd, m) {
  m.impl("native_batchquant", &batchquant_no_grad);
  m.impl("native_lsq", &lsq_no_grad);
  m.impl("native_lsq_multi", &lsq_multi_no_grad);
}

// The kernel ops of one compiled backend: `prefix` is cpu or cuda (the kernels of csrc/bquant.h and
// the lsq_multi_*_<prefix> loops above).
#define BQUANT_IMPL_KERNEL_OPS(m, prefix)                                             \
  m.impl("native_batchquant_fwd", &batchquant_fwd<prefix##_batchquant_forward>);      \
  m.impl("native_batchquant_bwd", &batchquant_bwd<prefix##_batchquant_backward>);     \
  m.impl("native_batch_range", &batch_range<prefix##_batch_range>);                   \
  m.impl("native_lsq_fwd", &lsq_fwd<prefix##_lsq_forward>);                           \
  m.impl("native_lsq_bwd", &lsq_bwd<prefix##_lsq_backward>);                          \
  m.impl("native_lsq_multi_fwd", &lsq_multi_fwd_##prefix);                           \
  m.impl("native_lsq_multi_bwd", &lsq_multi_bwd_##prefix)

TORCH_LIBRARY_IMPL(bquant, CPU, m) { BQUANT_IMPL_KERNEL_OPS(m, cpu); }

#ifdef BQUANT_WITH_CUDA
TORCH_LIBRARY_IMPL(bquant, CUDA, m) { BQUANT_IMPL_KERNEL_OPS(m, cuda); }
#endif

#undef BQUANT_IMPL_KERNEL_OPS

}  // namespace bquant
