// LSQ pieces shared by the single-tensor and the multi-tensor kernels.
#pragma once

#include <cmath>

#include "cuda/common.cuh"

namespace bquant::gpu {

// grad_step = k * sign(s) * sum(ds terms), with torch.sign semantics (sign(0) = 0, NaN stays NaN).
__device__ __forceinline__ float lsq_step_grad(double ds_sum, double grad_scale, float step) {
  const double sign = step > 0.0f ? 1.0 : (step < 0.0f ? -1.0 : static_cast<double>(step));
  return static_cast<float>(ds_sum * grad_scale * sign);
}

inline void check_lsq_bits(int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bquant (cuda backend): bits must be in [1, 8], got ", bits);
}

// k = 1 / sqrt(numel_full * Qp), the LSQ step-gradient scale (spec 2).
inline double lsq_grad_scale(int64_t numel_full, int64_t numel, Grid grid) {
  TORCH_CHECK(numel_full >= numel, "bquant (cuda backend): numel_full must be >= w.numel() (", numel, "), got ",
              numel_full);
  return 1.0 / std::sqrt(static_cast<double>(numel_full) * static_cast<double>(grid.qmax));
}

}  // namespace bquant::gpu
