// What the autograd Functions of BatchQuant's native ops share: BatchQuantFunction (native_batchquant, ops.cpp) and
// GatedBatchQuantFunction (native_gated_batchquant, cpu/gated_batchquant_cpu.cpp). Each calls its own kernel ops;
// what is saved for the backward, grad_y when y was not used, and the shapes of theta's and offset's gradients are
// written here once, so that the two Functions, and each one's forward and backward, cannot drift apart.
//
// Not in bquant.h: the .cu files include that, and this needs the autograd headers.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <vector>

#include "bquant.h"

namespace bquant {

// The forward's outputs (y, qparams), after saving `inputs` (what the backward op reads: x first, offset last) and
// qparams, and the scalars the backward needs. Only the forward's kernel op call is left to the Function.
inline torch::autograd::variable_list save_batchquant(torch::autograd::AutogradContext* ctx, const at::Tensor& y,
                                                      const at::Tensor& qparams, std::vector<at::Tensor> inputs,
                                                      const at::Tensor& theta, int64_t bits, bool is_signed) {
  inputs.push_back(qparams);
  ctx->save_for_backward(inputs);
  ctx->set_materialize_grads(false);  // no zeros for the qparams output, which never has a gradient
  ctx->saved_data["bits"] = bits;
  ctx->saved_data["signed"] = is_signed;
  ctx->saved_data["theta_sizes"] = theta.sizes().vec();
  ctx->saved_data["theta_dtype"] = static_cast<int64_t>(theta.scalar_type());
  ctx->mark_non_differentiable({qparams});
  return {y, qparams};
}

// The backward's view of what save_batchquant kept.
struct SavedBatchQuant {
  torch::autograd::variable_list saved;  // the forward's `inputs`, then qparams
  at::Tensor grad_y;
  int64_t bits;
  bool is_signed;

  SavedBatchQuant(torch::autograd::AutogradContext* ctx, const torch::autograd::variable_list& grads)
      : saved(ctx->get_saved_variables()),
        grad_y(grads[0].defined() ? grads[0] : at::zeros_like(saved[0])),  // only the range was used
        bits(ctx->saved_data["bits"].toInt()),
        is_signed(ctx->saved_data["signed"].toBool()),
        ctx_(ctx) {}

  const at::Tensor& x() const { return saved.front(); }
  const at::Tensor& offset() const { return saved[saved.size() - 2]; }
  const at::Tensor& qparams() const { return saved.back(); }

  // The backward's outputs: `grads` (those of x and any inputs after it), then theta's and offset's (the kernel's [1]
  // scalars in those parameters' shapes and dtypes), then none for lo_hi, bits and signed.
  torch::autograd::variable_list outputs(torch::autograd::variable_list grads, const at::Tensor& grad_theta,
                                         const at::Tensor& grad_offset) const {
    const auto theta_dtype = static_cast<at::ScalarType>(ctx_->saved_data["theta_dtype"].toInt());
    grads.push_back(as_param(grad_theta, ctx_->saved_data["theta_sizes"].toIntVector(), theta_dtype));
    grads.push_back(as_param(grad_offset, offset().sizes(), offset().scalar_type()));
    grads.resize(grads.size() + 3);  // lo_hi, bits, signed
    return grads;
  }

 private:
  torch::autograd::AutogradContext* ctx_;
};

}  // namespace bquant
