// Host-side helpers of the CPU entry points: input checks, parameter reads, fixed-chunk parallelism.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "common/quant_math.h"

namespace bquant::cpu {

// Work is cut into chunks of kChunk elements whatever the thread count, and per-chunk partial sums
// are combined in chunk order: results are bitwise identical for any torch.set_num_threads. kChunk
// is a multiple of every vector width, so only the last chunk has a scalar tail.
constexpr int64_t kChunk = 8192;
// Below this many elements a call runs on the calling thread (waking the pool costs more).
constexpr int64_t kMinParallelElems = 32768;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs f(chunk, begin, end) for every chunk of [0, n), in parallel.
template <typename F>
void parallel_chunks(int64_t n, const F& f) {
  const int64_t chunks = ceil_div(n, kChunk);
  at::parallel_for(0, chunks, ceil_div(kMinParallelElems, kChunk), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c, c * kChunk, std::min(n, (c + 1) * kChunk));
  });
}

#define BQ_DISPATCH_CPU_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

// The dtype of qparams and of the scalar gradients: float64 for float64 inputs, else float32.
inline at::ScalarType math_dtype(at::ScalarType t) {
  return t == at::ScalarType::Double ? at::ScalarType::Double : at::ScalarType::Float;
}

inline bool is_floating(at::ScalarType t) {
  return t == at::ScalarType::Float || t == at::ScalarType::Double || t == at::ScalarType::Half ||
         t == at::ScalarType::BFloat16;
}

// A CPU tensor of float16/bfloat16/float32/float64 with `numel` elements (any count when numel < 0).
inline void check_cpu_floating(const at::Tensor& t, const char* name, int64_t numel = -1) {
  TORCH_CHECK(t.defined(), "bquant cpu: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "bquant cpu: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(is_floating(t.scalar_type()), "bquant cpu: ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(numel < 0 || t.numel() == numel, "bquant cpu: ", name, " must have ", numel, " element(s), got shape ",
              t.sizes());
}

// An input the kernels walk in memory order: non-empty, dense, no overlap.
inline void check_dense_input(const at::Tensor& t, const char* name) {
  check_cpu_floating(t, name);
  TORCH_CHECK(t.numel() > 0, "bquant cpu: ", name, " must not be empty, got shape ", t.sizes());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), "bquant cpu: ", name,
              " must be dense (contiguous or channels_last), got sizes ", t.sizes(), " strides ", t.strides());
}

// `other` (a gradient) must have the dtype, sizes and strides of `ref`, so both are walked alike.
inline void check_same_layout(const at::Tensor& other, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_cpu_floating(other, name);
  TORCH_CHECK(other.scalar_type() == ref.scalar_type(), "bquant cpu: ", name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", other.scalar_type());
  TORCH_CHECK(other.sizes() == ref.sizes() && other.strides() == ref.strides(), "bquant cpu: ", name,
              " must have the sizes and strides of ", ref_name, " (", ref.sizes(), ", ", ref.strides(), "), got (",
              other.sizes(), ", ", other.strides(), ")");
}

// x is dense and element i of its memory belongs to channel (i / inner) % C (backends/__init__.py).
inline void check_channel_layout(const at::Tensor& x, int64_t C, int64_t inner) {
  check_dense_input(x, "x");
  TORCH_CHECK(x.dim() >= 2, "bquant cpu: x must have at least 2 dimensions (N, C, ...), got shape ", x.sizes());
  TORCH_CHECK(C == x.size(1), "bquant cpu: C must equal x.size(1) = ", x.size(1), ", got ", C);
  TORCH_CHECK(inner >= 1 && x.numel() % (C * inner) == 0,
              "bquant cpu: inner must be >= 1 and divide x.numel() / C, got ", inner, " for shape ", x.sizes());
  // Dense strides nest: the dims with a smaller stride than the channel dim span exactly its stride,
  // the larger ones step over multiples of C times it. So "element i is in channel (i / inner) % C"
  // holds exactly when the channel dim has stride `inner` (any layout for a single channel).
  TORCH_CHECK(C == 1 || x.stride(1) == inner, "bquant cpu: inner = ", inner, " does not match x's channel stride ",
              x.stride(1), " (x sizes ", x.sizes(), ", strides ", x.strides(), ")");
}

inline void check_bits(int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 16, "bquant cpu: bits must be in [1, 16], got ", bits);
}

// Element i (in row-major order) of a small parameter tensor (theta, offset, step, lo_hi), as
// double. Reads it in place, whatever the tensor's shape and strides.
inline double read_scalar(const at::Tensor& t, int64_t i = 0) {
  int64_t offset = 0;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    offset += (i % t.size(d)) * t.stride(d);
    i /= t.size(d);
  }
  double v = 0.0;
  BQ_DISPATCH_CPU_FLOATING(t.scalar_type(), "bquant_read_scalar",
                           [&] { v = static_cast<double>(t.const_data_ptr<scalar_t>()[offset]); });
  return v;
}

// Per-channel extremes from per-column ones (the column mode of the statistics): columns
// [c * inner, (c + 1) * inner) of mn / mx folded in order, NaN propagating.
template <typename A>
void fold_channel_columns(const A* mn, const A* mx, int64_t C, int64_t inner, A* ch_min, A* ch_max) {
  for (int64_t c = 0; c < C; ++c) {
    A lo = mn[c * inner], hi = mx[c * inner];
    for (int64_t j = c * inner + 1; j < (c + 1) * inner; ++j) {
      lo = nan_min(lo, mn[j]);
      hi = nan_max(hi, mx[j]);
    }
    ch_min[c] = lo;
    ch_max[c] = hi;
  }
}

}  // namespace bquant::cpu
