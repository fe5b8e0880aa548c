// Per-element BatchQuant / LSQ math shared by the CPU and CUDA kernels.
//
// The numerical contract is docs/spec-batchquant.md. Every backend
// must evaluate the same float32 expressions in the same order, so they live here once. The
// observer (lo, hi -> S, z) and softplus are done in double: they run once per call.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BQ_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined on the host too: the CPU backend compiles these functions into one translation
// unit per instruction set (csrc/cpu/kernels_*.cpp), which must never share an out-of-line copy.
#define BQ_HD inline __attribute__((always_inline))
#else
#define BQ_HD inline
#endif

namespace bquant {

// Layout of the small float32 (float64 for float64 inputs) "qparams" tensor every BatchQuant
// forward returns and its backward consumes. Keep in sync with bquant_kernels/qparams.py.
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

// Round half to even (the default rounding mode), on host and device, in float or double.
template <typename T>
BQ_HD T round_half_even(T v) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "round_half_even: float or double");
#if defined(__CUDA_ARCH__)
  return rint(v);  // CUDA's C++ overloads: rintf for float
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

// Observer: (lo, hi) -> (S, z) per spec 1.2, in double like the published host code. T is the
// dtype of the element math (float, or double for float64 inputs).
template <typename T>
BQ_HD void observer_qparams(double lo, double hi, Grid g, T* scale, T* zero) {
  const double lo0 = nan_min(lo, 0.0);
  const double hi0 = nan_max(hi, 0.0);
  if (hi0 == lo0) {
    *scale = T(1);
    *zero = T(0);
    return;
  }
  const double s = nan_max((hi0 - lo0) / (static_cast<double>(g.qmax) - g.qmin), kMinScale);
  // S is used in T by the element pass, so z is derived from that rounded value.
  const T s_t = static_cast<T>(s);
  const double z = clamp_nan(static_cast<double>(g.qmin) - round_half_even(lo0 / static_cast<double>(s_t)),
                             static_cast<double>(g.qmin), static_cast<double>(g.qmax));
  *scale = s_t;
  *zero = static_cast<T>(z);
}

// l = softplus(theta; beta = ln 2) and dl/dtheta, with PyTorch's threshold.
template <typename T>
BQ_HD void softplus_ln2(double theta, T* l, T* dl_dtheta) {
  const double bx = theta * kLn2;
  if (bx > kSoftplusThreshold) {
    *l = static_cast<T>(theta);
    *dl_dtheta = T(1);
    return;
  }
  *l = static_cast<T>(log1p(exp(bx)) / kLn2);
  *dl_dtheta = static_cast<T>(1.0 / (1.0 + exp(-bx)));
}

// Fill a qparams array (float, or double for float64 inputs) from the range and theta.
template <typename T>
BQ_HD void fill_qparams(double lo, double hi, double theta, Grid g, T* qp) {
  qp[kLo] = static_cast<T>(lo);
  qp[kHi] = static_cast<T>(hi);
  observer_qparams(lo, hi, g, &qp[kScale], &qp[kZero]);
  softplus_ln2(theta, &qp[kL], &qp[kDlDtheta]);
}

// The scalars the element pass needs. T is float (float32/float16/bfloat16 inputs) or double
// (float64 inputs); BQScalars is the float form. Made by bq_scalars (which derives `step`).
template <typename T>
struct BQScalarsT {
  T l, scale, zero, offset, qmin, qmax;
  T step;  // S / l, one quantization step in units of x: the backward's y (batchquant_elem_backward)
};
using BQScalars = BQScalarsT<float>;

template <typename T>
BQ_HD BQScalarsT<T> bq_scalars(T l, T scale, T zero, T offset, T qmin, T qmax) {
  return {l, scale, zero, offset, qmin, qmax, scale / l};
}

// BatchQuant forward of one element (spec 1.4). Operation order is part of the contract:
//   u = x * l / S + z + o ; q = round(clamp(u, qmin, qmax)) ; y = (q - z - o) * S / l
// (the CPU backend's vector form, csrc/cpu/kernels_impl.h, mirrors it op for op). With kByStep the
// last step is y = (q - z - o) * step (step = S / l): a multiply where the spec divides, within about
// one float32 rounding of the spec's y. The forward takes it for 16-bit inputs (batchquant_elem): the
// stored 16-bit y is the same except where the two straddle a 16-bit rounding midpoint (then one
// 16-bit ulp apart: spec 4 allows the dtype's rounding); every backend does the same, so they agree
// bit for bit per dtype. The backward takes it for every dtype (batchquant_elem_backward).
template <typename T>
BQ_HD T batchquant_u(T x, const BQScalarsT<T>& p) {
  return x * p.l / p.scale + p.zero + p.offset;
}

template <bool kByStep, typename T>
BQ_HD T batchquant_y(T u, const BQScalarsT<T>& p) {
  const T q = round_half_even(clamp_nan(u, p.qmin, p.qmax));
  if constexpr (kByStep) {
    return (q - p.zero - p.offset) * p.step;
  } else {
    return (q - p.zero - p.offset) * p.scale / p.l;
  }
}

// y of one element for inputs of `kBytes` bytes.
template <int kBytes, typename T>
BQ_HD T batchquant_elem(T x, const BQScalarsT<T>& p) {
  return batchquant_y<kBytes == 2>(batchquant_u(x, p), p);
}

// Backward contributions of one element (spec 1.5), before the constant factors:
//   grad_x = g * in
//   grad_l = (1 / l) * sum(g * (in ? x - y : -y))   -> accumulate dl_sum
//   grad_o = -(S / l) * sum(g * !in)                 -> accumulate do_sum
// u, and so q and the mask, are the forward's bit for bit. The y that only feeds the dl sum is
// (q - z - o) * step, within about one rounding (1e-7 relative) of the forward's (q - z - o) * S / l:
// a multiply where the forward divides (the division is what bounds the backward on a CPU, and on a
// GPU for 16-bit inputs), far inside the 1e-4 the spec gives the scalar gradients (section 4).
template <typename T>
struct BQGradT {
  T grad_x;
  T dl_term;
  T do_term;
};
using BQGrad = BQGradT<float>;

template <typename T>
BQ_HD BQGradT<T> batchquant_elem_backward(T g, T x, const BQScalarsT<T>& p) {
  const T u = batchquant_u(x, p);
  const T y = batchquant_y<true>(u, p);
  if (u >= p.qmin && u <= p.qmax) return {g, g * (x - y), T(0)};
  return {T(0), -g * y, g};
}

// The scalar gradients from the backward's two sums (spec 1.5), in double: grad_theta =
// sum_dl / l * dl/dtheta, grad_offset = -sum_do * S / l. When S is not finite (a +-inf in the batch
// range) each outside element's dy/do is infinite and the spec's sum of g * dy/do is NaN whatever the
// signs of g (spec 1.7): every backend returns NaN there, not the +-inf of the factored product.
struct BQScalarGrads {
  double theta;
  double offset;
};

BQ_HD BQScalarGrads batchquant_scalar_grads(double sum_dl, double sum_do, double l, double scale, double dl_dtheta) {
  const bool finite_scale = scale - scale == 0.0;  // false for +-inf and NaN
  return {sum_dl / l * dl_dtheta, finite_scale ? -sum_do * scale / l : scale - scale};
}

// LSQ (spec 2). v = w / |s| ; w_hat = |s| * round(clamp(v, Qn, Qp)).
template <typename T>
BQ_HD T lsq_elem(T w, T abs_step, Grid g) {
  const T v = w / abs_step;
  return round_half_even(clamp_nan(v, static_cast<T>(g.qmin), static_cast<T>(g.qmax))) * abs_step;
}

template <typename T>
struct LSQGradT {
  T grad_w;
  T ds_term;  // g * (inside ? round(v) - v : clamp(v)); times k * sign(s) at the end
};
using LSQGrad = LSQGradT<float>;

template <typename T>
BQ_HD LSQGradT<T> lsq_elem_backward(T grad, T w, T abs_step, Grid g) {
  const T qn = static_cast<T>(g.qmin);
  const T qp = static_cast<T>(g.qmax);
  const T v = w / abs_step;
  if (v > qn && v < qp) return {grad, grad * (round_half_even(v) - v)};
  return {T(0), grad * clamp_nan(v, qn, qp)};
}

}  // namespace bquant
