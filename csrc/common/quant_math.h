// Per-element BatchQuant / LSQ math shared by the CPU and CUDA kernels.
//
// The numerical contract is ../shared/spec/batchquant.md (a copy lives in docs/spec-batchquant.md). Every backend
// must evaluate the same float32 expressions in the same order, so they live here once. The
// observer (lo, hi -> S, z) and softplus are done in double: they run once per call.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BQ_HD __host__ __device__ __forceinline__
#else
#define BQ_HD inline
#endif

namespace bquant {

// Layout of the small float32 (float64 for float64 inputs) "qparams" tensor every BatchQuant
// forward returns and its backward consumes. Keep in sync with bquant_kernels/_qparams.py.
enum QParam : int {
  kLo = 0,        // batch (or stored) range, before the zero clamp
  kHi = 1,
  kScale = 2,     // observer scale S
  kZero = 3,      // observer zero point z (an integer value)
  kL = 4,         // l = softplus(theta; beta = ln 2)
  kDlDtheta = 5,  // dl/dtheta = sigmoid(theta * ln 2), or 1 above the softplus threshold
  kNumQParams = 6,
};

constexpr double kLn2 = 0.69314718055994530942;
constexpr double kSoftplusThreshold = 20.0;  // PyTorch's softplus threshold on beta * x
constexpr double kMinScale = 1.1920928955078125e-07;  // 2^-23

struct Grid {
  float qmin;
  float qmax;
};

// Integer grid of a b-bit quantizer: unsigned [0, 2^b - 1], signed [-2^(b-1), 2^(b-1) - 1].
BQ_HD Grid batchquant_grid(int bits, bool is_signed) {
  const float levels = static_cast<float>((1 << bits) - 1);
  if (is_signed) {
    const float half = static_cast<float>(1 << (bits - 1));
    return {-half, half - 1.0f};
  }
  return {0.0f, levels};
}

// LSQ grid: Qn = -2^(b-1), Qp = 2^(b-1) - 1 (Qp = 1 for b = 1); unsigned: [0, 2^b - 1].
BQ_HD Grid lsq_grid(int bits, bool is_signed) {
  if (!is_signed) return {0.0f, static_cast<float>((1 << bits) - 1)};
  if (bits == 1) return {-1.0f, 1.0f};
  const float half = static_cast<float>(1 << (bits - 1));
  return {-half, half - 1.0f};
}

// Round half to even (the default rounding mode), on host and device.
BQ_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}

BQ_HD double round_half_even(double v) {
#if defined(__CUDA_ARCH__)
  return rint(v);
#else
  return std::nearbyint(v);
#endif
}

// min / max / clamp that propagate NaN, like torch.amin / torch.amax / torch.clamp.
template <typename T>
BQ_HD T nan_min(T a, T b) {
  return (a < b || a != a) ? a : b;
}
template <typename T>
BQ_HD T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}
template <typename T>
BQ_HD T clamp_nan(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Observer: (lo, hi) -> (S, z) per spec 1.2, in double like the published host code.
BQ_HD void observer_qparams(double lo, double hi, Grid g, float* scale, float* zero) {
  const double lo0 = nan_min(lo, 0.0);
  const double hi0 = nan_max(hi, 0.0);
  if (hi0 == lo0) {
    *scale = 1.0f;
    *zero = 0.0f;
    return;
  }
  const double s = nan_max((hi0 - lo0) / (static_cast<double>(g.qmax) - g.qmin), kMinScale);
  // S is used in float32 by the element pass, so z is derived from that float32 value.
  const float s32 = static_cast<float>(s);
  const double z = clamp_nan(static_cast<double>(g.qmin) - round_half_even(lo0 / s32),
                             static_cast<double>(g.qmin), static_cast<double>(g.qmax));
  *scale = s32;
  *zero = static_cast<float>(z);
}

// l = softplus(theta; beta = ln 2) and dl/dtheta, with PyTorch's threshold.
BQ_HD void softplus_ln2(double theta, float* l, float* dl_dtheta) {
  const double bx = theta * kLn2;
  if (bx > kSoftplusThreshold) {
    *l = static_cast<float>(theta);
    *dl_dtheta = 1.0f;
    return;
  }
  *l = static_cast<float>(log1p(exp(bx)) / kLn2);
  *dl_dtheta = static_cast<float>(1.0 / (1.0 + exp(-bx)));
}

// Fill a qparams array from the range and theta.
BQ_HD void fill_qparams(double lo, double hi, double theta, Grid g, float* qp) {
  qp[kLo] = static_cast<float>(lo);
  qp[kHi] = static_cast<float>(hi);
  observer_qparams(lo, hi, g, &qp[kScale], &qp[kZero]);
  softplus_ln2(theta, &qp[kL], &qp[kDlDtheta]);
}

// The scalars the element pass needs.
struct BQScalars {
  float l, scale, zero, offset, qmin, qmax;
};

// BatchQuant forward of one element (spec 1.4). Operation order is part of the contract:
//   u = x * l / S + z + o ; q = round(clamp(u, qmin, qmax)) ; y = (q - z - o) * S / l
struct BQElem {
  float y;
  bool in;  // inclusive clamp mask qmin <= u <= qmax (spec 1.5)
};

BQ_HD BQElem batchquant_elem(float x, const BQScalars& p) {
  const float u = x * p.l / p.scale + p.zero + p.offset;
  const float q = round_half_even(clamp_nan(u, p.qmin, p.qmax));
  const float y = (q - p.zero - p.offset) * p.scale / p.l;
  return {y, u >= p.qmin && u <= p.qmax};
}

// Backward contributions of one element (spec 1.5), before the constant factors:
//   grad_x = g * in
//   grad_l = (1 / l) * sum(g * (in ? x - y : -y))   -> accumulate dl_sum
//   grad_o = -(S / l) * sum(g * !in)                 -> accumulate do_sum
struct BQGrad {
  float grad_x;
  float dl_term;
  float do_term;
};

BQ_HD BQGrad batchquant_elem_backward(float g, float x, const BQScalars& p) {
  const BQElem e = batchquant_elem(x, p);
  if (e.in) return {g, g * (x - e.y), 0.0f};
  return {0.0f, -g * e.y, g};
}

// LSQ (spec 2). v = w / |s| ; w_hat = |s| * round(clamp(v, Qn, Qp)).
BQ_HD float lsq_elem(float w, float abs_step, Grid g) {
  const float v = w / abs_step;
  return round_half_even(clamp_nan(v, g.qmin, g.qmax)) * abs_step;
}

struct LSQGrad {
  float grad_w;
  float ds_term;  // g * (inside ? round(v) - v : clamp(v)); times k * sign(s) at the end
};

BQ_HD LSQGrad lsq_elem_backward(float grad, float w, float abs_step, Grid g) {
  const float v = w / abs_step;
  if (v > g.qmin && v < g.qmax) return {grad, grad * (round_half_even(v) - v)};
  return {0.0f, grad * clamp_nan(v, g.qmin, g.qmax)};
}

}  // namespace bquant
