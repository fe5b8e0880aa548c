// Device helpers shared by the CUDA kernels: scalar parameters of any dtype, 16-byte vectors,
// deterministic block reductions, the "last block finishes" handshake, launch geometry, input checks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <limits>

#include "common/quant_math.h"

namespace bquant::gpu {

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;

// float32 / float16 / bfloat16 inputs; float64 is not a CUDA-backend dtype.
#define BQ_DISPATCH_FLOATING(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// ----------------------------------------------------------------------------- scalar parameters

// A parameter scalar (theta, offset, step, lo_hi) read on the device in its own dtype, so that no
// conversion kernel runs on the host side. float64 parameters keep their precision (the observer
// and softplus take double, like the reference).
enum class ScalarKind : int32_t { kFloat, kDouble, kHalf, kBFloat16 };

struct ScalarRef {
  const void* ptr;
  int64_t stride;  // in elements, for lo_hi
  ScalarKind kind;
};

__device__ __forceinline__ double load_scalar(const ScalarRef& r, int64_t i = 0) {
  const int64_t k = i * r.stride;
  switch (r.kind) {
    case ScalarKind::kFloat:
      return static_cast<const float*>(r.ptr)[k];
    case ScalarKind::kDouble:
      return static_cast<const double*>(r.ptr)[k];
    case ScalarKind::kHalf:
      return static_cast<float>(static_cast<const c10::Half*>(r.ptr)[k]);
    default:
      return static_cast<float>(static_cast<const c10::BFloat16*>(r.ptr)[k]);
  }
}

// ----------------------------------------------------------------------------- 16-byte vectors

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T>
struct alignas(16) Vec {
  T v[kVec<T>];
};

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* base, int64_t vec_index) {
  return reinterpret_cast<const Vec<T>*>(base)[vec_index];
}

template <typename T>
__device__ __forceinline__ void store_vec(T* base, int64_t vec_index, const Vec<T>& v) {
  reinterpret_cast<Vec<T>*>(base)[vec_index] = v;
}

// Vectors each thread loads before it computes (more bytes in flight per thread: the element
// kernels are bound by memory latency x bandwidth, not by arithmetic).
constexpr int kUnroll = 4;

// out[i] = f(a[i]) for i in [0, n), this thread taking i = first, first + stride, ... In the
// vectorized form a and out must be 16-byte aligned; the last n % kVec elements go scalar.
template <typename T, bool kVectorized, typename F>
__device__ __forceinline__ void map_unary(const T* __restrict__ a, T* __restrict__ out, int64_t n, int64_t first,
                                          int64_t stride, F&& f) {
  int64_t done = 0;
  if constexpr (kVectorized) {
    const int64_t nvec = n / kVec<T>;
    for (int64_t base = first; base < nvec; base += kUnroll * stride) {
      Vec<T> va[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * stride < nvec) va[u] = load_vec(a, base + u * stride);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * stride >= nvec) continue;
        Vec<T> vo;
#pragma unroll
        for (int k = 0; k < kVec<T>; ++k) vo.v[k] = static_cast<T>(f(static_cast<float>(va[u].v[k])));
        store_vec(out, base + u * stride, vo);
      }
    }
    done = nvec * kVec<T>;
  }
  for (int64_t i = done + first; i < n; i += stride) out[i] = static_cast<T>(f(static_cast<float>(a[i])));
}

// out[i] = f(a[i], b[i]), same iteration and alignment rules as map_unary.
template <typename T, bool kVectorized, typename F>
__device__ __forceinline__ void map_binary(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                                           int64_t n, int64_t first, int64_t stride, F&& f) {
  int64_t done = 0;
  if constexpr (kVectorized) {
    constexpr int kPairs = kUnroll / 2;  // two inputs: the same bytes in flight as map_unary
    const int64_t nvec = n / kVec<T>;
    for (int64_t base = first; base < nvec; base += kPairs * stride) {
      Vec<T> va[kPairs];
      Vec<T> vb[kPairs];
#pragma unroll
      for (int u = 0; u < kPairs; ++u) {
        if (base + u * stride < nvec) {
          va[u] = load_vec(a, base + u * stride);
          vb[u] = load_vec(b, base + u * stride);
        }
      }
#pragma unroll
      for (int u = 0; u < kPairs; ++u) {
        if (base + u * stride >= nvec) continue;
        Vec<T> vo;
#pragma unroll
        for (int k = 0; k < kVec<T>; ++k) {
          vo.v[k] = static_cast<T>(f(static_cast<float>(va[u].v[k]), static_cast<float>(vb[u].v[k])));
        }
        store_vec(out, base + u * stride, vo);
      }
    }
    done = nvec * kVec<T>;
  }
  for (int64_t i = done + first; i < n; i += stride) {
    out[i] = static_cast<T>(f(static_cast<float>(a[i]), static_cast<float>(b[i])));
  }
}

// Whether every pointer is 16-byte aligned (the vectorized kernels' precondition).
__host__ __device__ inline bool all_aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// ----------------------------------------------------------------------------- reductions
// Butterfly shuffles and a fixed warp order: the result is a fixed function of the inputs
// (bitwise reproducible), whatever the scheduling.

struct MinOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return nan_min(a, b); }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return nan_max(a, b); }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Reduction over the whole (kThreads) block; the result is valid in thread 0. `scratch` holds
// kWarps values; the leading barrier makes back-to-back calls on the same scratch safe.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity, T* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = warp_reduce(v, op);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_reduce(lane < kWarps ? scratch[lane] : identity, op);
  return v;
}

// ----------------------------------------------------------------------------- last block finishes

// Every block calls this after writing its partial results; it returns true (in all threads) in
// the one block that arrives last, which may then read every block's partials. `counter` must be
// zero before the launch (the host zeroes it on the launch stream, so graph replays re-zero it too).
__device__ __forceinline__ bool arrive_last(unsigned int* counter, unsigned int expected) {
  __shared__ bool is_last;
  __threadfence();  // publish this block's partials before it is counted
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(counter, 1u) == expected - 1;
  __syncthreads();
  if (is_last) __threadfence();  // order the reads of the others' partials after their count
  return is_last;
}

// Partials written by other blocks of the same launch: read through L2, never a stale L1 line.
template <typename T>
__device__ __forceinline__ T load_partial(const T* p) {
  return __ldcg(p);
}

// Sum of per-block fp32 partials p[0..n) in double, in a fixed order (valid in thread 0 of the
// calling block, which must have seen arrive_last() return true).
__device__ __forceinline__ double sum_partials(const float* p, int64_t n) {
  __shared__ double scratch[kWarps];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += load_partial(p + i);
  return block_reduce(s, SumOp{}, 0.0, scratch);
}

// ----------------------------------------------------------------------------- host side

// Blocks of `kernel` (kThreads each) resident at once on the whole current device.
int64_t resident_blocks(const void* kernel);

// Grid-stride grid of `kernel` for `work` items of kThreads-wide blocks: one full wave of resident
// blocks at most (more would only add a partial tail wave). It depends on the kernel, the work size
// and the device, never on timing, so reductions over its blocks are reproducible.
int64_t grid_for(const void* kernel, int64_t work);

// Workspace of `partial_bytes` (rounded up to 16) followed by `num_counters` zeroed counters,
// allocated from the caching allocator; the counters are zeroed on the current stream.
struct Workspace {
  at::Tensor storage;
  void* partials;
  unsigned int* counters;
};
Workspace make_workspace(const at::Tensor& like, int64_t partial_bytes, int64_t num_counters);

void check_cuda_input(const at::Tensor& t, const char* name);
// Checks a parameter tensor (theta, offset, step, lo_hi) against the input `ref` and returns it as a
// device scalar reference (the kernel reads it in its own dtype).
ScalarRef param_ref(const at::Tensor& t, const at::Tensor& ref, const char* name, int64_t numel);
void check_same_layout(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name);

}  // namespace bquant::gpu
