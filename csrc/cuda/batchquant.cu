// BatchQuant CUDA kernels (docs/spec-batchquant.md, section 1).
//
// Forward, two launches and no host sync:
//   1. batch range: per-channel min/max over (row chunk, channel) blocks, folded per channel with
//      exact integer atomics; the last block (atomic counter) takes the means in double, in a fixed
//      order, and writes the qparams [lo, hi, S, z, l, dl_dtheta] (observer and softplus in double,
//      stored as float32);
//   2. element pass: reads those device scalars and writes y with 16-byte vector loads/stores.
// With a stored range (lo_hi) only the element pass runs; each block derives the scalars itself.
// Backward, one launch: recomputes the forward from x and the qparams, writes grad_x, and reduces
// the two parameter-gradient sums with fp32 per-block partials and a fixed-order double finish in
// the last block: bitwise reproducible run to run.
#include <algorithm>

#include "bquant.h"
#include "cuda/common.cuh"

namespace bquant {
namespace gpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// A range block reads at least this many elements (when the tensor has that many per channel tile).
constexpr int64_t kMinRangeBlockElems = 8192;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// ----------------------------------------------------------------------------- batch range

// How many row chunks the range kernel splits the `outer` rows into, each chunk taking `units`
// blocks: as many as fit in one wave of `resident` blocks (rounded down: one chunk more would start
// a partial second wave, which costs as long as the whole first one), but few enough that a block
// reads at least kMinRangeBlockElems elements; then evened out so every chunk has the same rows.
constexpr int64_t range_row_chunks(int64_t resident, int64_t units, int64_t outer, int64_t row_elems) {
  const int64_t by_wave = std::max<int64_t>(1, resident / units);
  const int64_t by_size = ceil_div(outer * row_elems, kMinRangeBlockElems);
  const int64_t chunks = std::clamp<int64_t>(std::min(by_wave, by_size), 1, outer);
  return ceil_div(outer, ceil_div(outer, chunks));
}
// 64x144x56x56 on an H200 (132 SMs x 6 resident blocks of the fp32 planes kernel, 40 registers):
// 5 chunks of 13 planes per channel, 720 blocks in one wave. Rounding up gave 6 chunks of 11 planes,
// 864 blocks: a second wave of 72, and about twice the time (62 us against Triton's 38 in the H200
// profile of 2026-11-27).
static_assert(range_row_chunks(132 * 6, 144, 64, 56 * 56) == 5);
static_assert(range_row_chunks(132 * 6, 24, 64, 14 * 14) == 2);  // small: limited by the block size
static_assert(range_row_chunks(132 * 6, 2000, 64, 49) == 1);     // more channels than a wave holds

// Memory viewed as (outer, C, inner); the outer rows are split into chunks of rows_per_chunk.
// Each block folds its per-channel min/max into min_keys/max_keys[c] with integer atomics on
// order-preserving keys: exact and independent of the order of the updates, so the range is
// reproducible, and the last block reads 2 * C words whatever the number of blocks.
struct RangeArgs {
  int64_t outer;
  int64_t C;
  int64_t inner;
  int64_t rows_per_chunk;
  int64_t units;  // blocks per row chunk: one per channel (planes) or per channel tile (rows)
  int lanes;      // threads per group (planes: a power of two; rows: at most kThreads / 2)
  unsigned int* min_keys;  // [C], zeroed before the launch
  unsigned int* max_keys;  // [C], zeroed before the launch
  unsigned int* counter;
  float* out;       // qparams[kNumQParams], or [lo, hi] when theta.ptr is null
  ScalarRef theta;  // ptr null: write only the range
  Grid grid;
};

// Order-preserving float -> uint32 map (a < b implies key(a) < key(b); -0 < +0), with NaN on top so
// that it wins an atomicMax and so propagates. Key 0 is below every float: the identity.
__device__ __forceinline__ unsigned int max_key(float v) {
  if (v != v) return 0xffffffffu;
  const unsigned int u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float from_max_key(unsigned int key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);  // 0xffffffff -> NaN
}

// The min is kept as an inverted key, so that one zero-fill initialises both and NaN also wins.
__device__ __forceinline__ unsigned int min_key(float v) { return v != v ? 0xffffffffu : ~max_key(v); }

__device__ __forceinline__ float from_min_key(unsigned int key) {
  return key == 0xffffffffu ? __uint_as_float(0x7fffffffu) : from_max_key(~key);
}

__device__ __forceinline__ void fold_channel(const RangeArgs& a, int64_t c, float m, float M) {
  atomicMax(a.min_keys + c, min_key(m));
  atomicMax(a.max_keys + c, max_key(M));
}

// Run by the last block: the means over the channels of their min and max (in double, fixed
// order), then the observer and softplus.
__device__ __forceinline__ void finish_range(const RangeArgs& a) {
  __shared__ double scratch[kWarps];
  double lo_sum = 0.0;
  double hi_sum = 0.0;
  for (int64_t c = threadIdx.x; c < a.C; c += kThreads) {
    lo_sum += from_min_key(load_partial(a.min_keys + c));
    hi_sum += from_max_key(load_partial(a.max_keys + c));
  }
  lo_sum = block_reduce(lo_sum, SumOp{}, 0.0, scratch);
  hi_sum = block_reduce(hi_sum, SumOp{}, 0.0, scratch);
  if (threadIdx.x == 0) {
    const double lo = lo_sum / static_cast<double>(a.C);
    const double hi = hi_sum / static_cast<double>(a.C);
    if (a.theta.ptr != nullptr) {
      fill_qparams(lo, hi, load_scalar(a.theta), a.grid, a.out);
    } else {
      a.out[kLo] = static_cast<float>(lo);
      a.out[kHi] = static_cast<float>(hi);
    }
  }
}

// inner > 1 (NCHW, (N, C, L)): block (r, c) reduces the planes (n, c) for n in chunk r. The block
// is split into groups of `lanes` threads, one plane per group at a time, so that small planes
// (7x7) still keep most threads busy. kVectorized: inner % kVec == 0 and x 16-byte aligned.
template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads) range_planes_kernel(const T* __restrict__ x, RangeArgs a) {
  const int64_t c = blockIdx.x % a.C;
  const int64_t r = blockIdx.x / a.C;
  const int lanes = a.lanes;
  const int group = threadIdx.x / lanes;
  const int lane = threadIdx.x % lanes;
  const int groups = kThreads / lanes;
  const int64_t n_end = std::min(a.outer, (r + 1) * a.rows_per_chunk);
  constexpr int kWidth = kVectorized ? kVec<T> : 1;
  const int64_t units = a.inner / kWidth;

  float m = kInf;
  float M = -kInf;
  for (int64_t n = r * a.rows_per_chunk + group; n < n_end; n += groups) {
    const T* plane = x + (n * a.C + c) * a.inner;
#pragma unroll 4
    for (int64_t i = lane; i < units; i += lanes) {
      if constexpr (kVectorized) {
        const Vec<T> v = load_vec(plane, i);
#pragma unroll
        for (int k = 0; k < kVec<T>; ++k) {
          m = nan_min(m, static_cast<float>(v.v[k]));
          M = nan_max(M, static_cast<float>(v.v[k]));
        }
      } else {
        const float v = static_cast<float>(plane[i]);
        m = nan_min(m, v);
        M = nan_max(M, v);
      }
    }
  }
  __shared__ float scratch[kWarps];
  m = block_reduce(m, MinOp{}, kInf, scratch);
  M = block_reduce(M, MaxOp{}, -kInf, scratch);
  if (threadIdx.x == 0) fold_channel(a, c, m, M);
  if (arrive_last(a.counter, gridDim.x)) finish_range(a);
}

// inner == 1 (channels_last, (N, C)): rows of C contiguous channels. Block (r, tile) covers
// `lanes` channel units (one channel, or kVec channels when vectorized) of every row in chunk r;
// the groups of the block take interleaved rows and are combined through shared memory.
template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads) range_rows_kernel(const T* __restrict__ x, RangeArgs a) {
  constexpr int kWidth = kVectorized ? kVec<T> : 1;
  const int64_t tile = blockIdx.x % a.units;
  const int64_t r = blockIdx.x / a.units;
  const int lanes = a.lanes;
  const int group = threadIdx.x / lanes;
  const int lane = threadIdx.x % lanes;
  const int groups = kThreads / lanes;
  const int64_t unit = tile * lanes + lane;  // channels [unit * kWidth, unit * kWidth + kWidth)
  // lanes need not divide kThreads: the kThreads % lanes threads past the last whole group sit out.
  const bool active = unit < a.C / kWidth && group < groups;
  const int64_t n_end = std::min(a.outer, (r + 1) * a.rows_per_chunk);

  float m[kWidth];
  float M[kWidth];
#pragma unroll
  for (int k = 0; k < kWidth; ++k) {
    m[k] = kInf;
    M[k] = -kInf;
  }
  if (active) {
#pragma unroll 4
    for (int64_t n = r * a.rows_per_chunk + group; n < n_end; n += groups) {
      if constexpr (kVectorized) {
        const Vec<T> v = load_vec(x + n * a.C, unit);
#pragma unroll
        for (int k = 0; k < kWidth; ++k) {
          m[k] = nan_min(m[k], static_cast<float>(v.v[k]));
          M[k] = nan_max(M[k], static_cast<float>(v.v[k]));
        }
      } else {
        const float v = static_cast<float>(x[n * a.C + unit]);
        m[0] = nan_min(m[0], v);
        M[0] = nan_max(M[0], v);
      }
    }
  }
  __shared__ float smin[kThreads * kWidth];
  __shared__ float smax[kThreads * kWidth];
#pragma unroll
  for (int k = 0; k < kWidth; ++k) {
    smin[threadIdx.x * kWidth + k] = m[k];
    smax[threadIdx.x * kWidth + k] = M[k];
  }
  __syncthreads();
  if (group == 0 && active) {
    for (int g = 1; g < groups; ++g) {
      const int src = (g * lanes + lane) * kWidth;
#pragma unroll
      for (int k = 0; k < kWidth; ++k) {
        m[k] = nan_min(m[k], smin[src + k]);
        M[k] = nan_max(M[k], smax[src + k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kWidth; ++k) fold_channel(a, unit * kWidth + k, m[k], M[k]);
  }
  if (arrive_last(a.counter, gridDim.x)) finish_range(a);
}

// One launch: writes [lo, hi] (theta undefined) or the full qparams (theta given) into `out`.
void launch_range(const at::Tensor& x, int64_t C, int64_t inner, float* out, ScalarRef theta, Grid grid) {
  const int64_t outer = x.numel() / (C * inner);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  BQ_DISPATCH_FLOATING(x.scalar_type(), "bquant_batch_range", [&] {
    using T = scalar_t;
    using Kernel = void (*)(const T*, RangeArgs);
    const bool planes = inner > 1;
    const bool vectorized = all_aligned16({x.data_ptr()}) && (planes ? inner : C) % kVec<T> == 0;
    const int64_t width = vectorized ? kVec<T> : 1;
    const Kernel kernel = planes ? (vectorized ? range_planes_kernel<T, true> : range_planes_kernel<T, false>)
                                 : (vectorized ? range_rows_kernel<T, true> : range_rows_kernel<T, false>);
    // Per row chunk: the blocks (units), the threads per group (lanes), the elements one block reads per row.
    int64_t lanes;
    int64_t units;
    int64_t row_elems;
    if (planes) {
      // As many lanes as a plane has units (a power of two <= kThreads): tiny planes (2x2) then
      // take one thread each instead of leaving most of a warp idle.
      lanes = std::min<int64_t>(pow2_ceil(inner / width), kThreads);
      units = C;
      row_elems = inner;
    } else {
      // A whole row of channel units per group when at least two groups fit in a block (C = 144
      // fp32 vectorized: 36 lanes, 7 groups, 4 threads idle), else tiles of a warp each. Rounding
      // the lanes up to a power of two left up to half of them idle (36 units: a second tile with
      // 4 of 32 lanes busy, and half of all blocks nearly empty).
      const int64_t row_units = C / width;
      lanes = row_units <= kThreads / 2 ? row_units : kWarpSize;
      units = ceil_div(row_units, lanes);
      row_elems = lanes * width;
    }
    const int64_t resident = resident_blocks(reinterpret_cast<const void*>(kernel));
    const int64_t chunks = range_row_chunks(resident, units, outer, row_elems);
    const int64_t rows_per_chunk = ceil_div(outer, chunks);
    const int64_t blocks = units * chunks;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "bquant (cuda backend): x is too large (", blocks,
                " range blocks)");

    // Zeroed words: the counter, then the min and max keys of every channel.
    Workspace ws = make_workspace(x, 0, 1 + 2 * C);
    const RangeArgs args{outer,
                         C,
                         inner,
                         rows_per_chunk,
                         units,
                         static_cast<int>(lanes),
                         ws.counters + 1,
                         ws.counters + 1 + C,
                         ws.counters,
                         out,
                         theta,
                         grid};
    kernel<<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<T>(), args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ----------------------------------------------------------------------------- element pass

struct ForwardArgs {
  int64_t numel;
  float* qparams;   // read (batch statistics), or written by block 0 (stored range)
  ScalarRef lo_hi;  // ptr null: the qparams already hold the batch statistics
  ScalarRef theta;
  ScalarRef offset;
  Grid grid;
};

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    batchquant_forward_kernel(const T* __restrict__ x, T* __restrict__ y, ForwardArgs a) {
  __shared__ float qp[kNumQParams];
  __shared__ float offset;
  if (threadIdx.x == 0) {
    if (a.lo_hi.ptr != nullptr) {
      fill_qparams(load_scalar(a.lo_hi, 0), load_scalar(a.lo_hi, 1), load_scalar(a.theta), a.grid, qp);
      if (blockIdx.x == 0) {
        for (int k = 0; k < kNumQParams; ++k) a.qparams[k] = qp[k];
      }
    } else {
      for (int k = 0; k < kNumQParams; ++k) qp[k] = a.qparams[k];
    }
    offset = static_cast<float>(load_scalar(a.offset));
  }
  __syncthreads();
  const BQScalars p = bq_scalars(qp[kL], qp[kScale], qp[kZero], offset, a.grid.qmin, a.grid.qmax);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  map_unary<T, kVectorized>(x, y, a.numel, first, stride,
                            [&](float v) { return batchquant_elem<sizeof(T)>(v, p); });
}

void launch_forward(const at::Tensor& x, const at::Tensor& y, const ForwardArgs& args) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  BQ_DISPATCH_FLOATING(x.scalar_type(), "bquant_batchquant_forward", [&] {
    using T = scalar_t;
    const bool vectorized = all_aligned16({x.data_ptr(), y.data_ptr()});
    const auto kernel = vectorized ? batchquant_forward_kernel<T, true> : batchquant_forward_kernel<T, false>;
    const int64_t work = vectorized ? ceil_div(x.numel(), kVec<T>) : x.numel();
    const int64_t blocks = grid_for(reinterpret_cast<const void*>(kernel), work);
    kernel<<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<T>(), y.mutable_data_ptr<T>(), args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ----------------------------------------------------------------------------- backward

struct BackwardArgs {
  int64_t numel;
  const float* qparams;
  ScalarRef offset;
  Grid grid;
  float2* partials;  // [gridDim.x]: (sum of dl terms, sum of do terms) per block
  unsigned int* counter;
  float* grad_theta;
  float* grad_offset;
};

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads) batchquant_backward_kernel(const T* __restrict__ grad_y,
                                                                       const T* __restrict__ x,
                                                                       T* __restrict__ grad_x, BackwardArgs a) {
  const BQScalars p = bq_scalars(a.qparams[kL], a.qparams[kScale], a.qparams[kZero],
                                 static_cast<float>(load_scalar(a.offset)), a.grid.qmin, a.grid.qmax);
  float sum_dl = 0.0f;
  float sum_do = 0.0f;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  map_binary<T, kVectorized>(grad_y, x, grad_x, a.numel, first, stride, [&](float g, float v) {
    const BQGrad d = batchquant_elem_backward(g, v, p);
    sum_dl += d.dl_term;
    sum_do += d.do_term;
    return d.grad_x;
  });

  __shared__ float scratch[kWarps];
  sum_dl = block_reduce(sum_dl, SumOp{}, 0.0f, scratch);
  sum_do = block_reduce(sum_do, SumOp{}, 0.0f, scratch);
  if (threadIdx.x == 0) a.partials[blockIdx.x] = make_float2(sum_dl, sum_do);
  if (!arrive_last(a.counter, gridDim.x)) return;

  __shared__ double dscratch[kWarps];
  double dl = 0.0;
  double d_o = 0.0;
  for (int64_t b = threadIdx.x; b < gridDim.x; b += kThreads) {
    const float2 v = load_partial(a.partials + b);
    dl += v.x;
    d_o += v.y;
  }
  dl = block_reduce(dl, SumOp{}, 0.0, dscratch);
  d_o = block_reduce(d_o, SumOp{}, 0.0, dscratch);
  if (threadIdx.x == 0) {
    const BQScalarGrads grads = batchquant_scalar_grads(dl, d_o, a.qparams[kL], a.qparams[kScale], a.qparams[kDlDtheta]);
    *a.grad_theta = static_cast<float>(grads.theta);
    *a.grad_offset = static_cast<float>(grads.offset);
  }
}

// ----------------------------------------------------------------------------- checks

void check_activation(const at::Tensor& x, int64_t C, int64_t inner) {
  check_cuda_input(x, "x");
  TORCH_CHECK(x.dim() >= 2 && x.size(1) == C, "bquant (cuda backend): x must be (N, C, ...) with C = ", C,
              ", got shape ", x.sizes());
  TORCH_CHECK(inner >= 1 && x.numel() % (C * inner) == 0, "bquant (cuda backend): inner = ", inner,
              " does not divide x of shape ", x.sizes(), " into (outer, C, inner)");
  // Element i must belong to channel (i / inner) % C: channels innermost (channels_last, (N, C)),
  // or contiguous with inner the product of the trailing dims.
  const bool layout_ok = inner == 1 ? (C == 1 || x.stride(1) == 1)
                                    : (x.is_contiguous() && inner * C * x.size(0) == x.numel());
  TORCH_CHECK(layout_ok, "bquant (cuda backend): x must be contiguous (inner > 1) or channels-last (inner == 1), got ",
              "strides ", x.strides(), " with inner = ", inner);
}

void check_bits(int64_t bits, int64_t lo, int64_t hi) {
  TORCH_CHECK(bits >= lo && bits <= hi, "bquant (cuda backend): bits must be in [", lo, ", ", hi, "], got ", bits);
}

}  // namespace
}  // namespace gpu

at::Tensor cuda_batch_range(const at::Tensor& x, int64_t C, int64_t inner) {
  gpu::check_activation(x, C, inner);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor range = at::empty({2}, x.options().dtype(at::kFloat));
  gpu::launch_range(x, C, inner, range.mutable_data_ptr<float>(), gpu::ScalarRef{nullptr, 0, gpu::ScalarKind::kFloat},
                    Grid{0.0f, 0.0f});
  return range;
}

std::tuple<at::Tensor, at::Tensor> cuda_batchquant_forward(const at::Tensor& x, const at::Tensor& theta,
                                                           const at::Tensor& offset,
                                                           const std::optional<at::Tensor>& lo_hi, int64_t bits,
                                                           bool is_signed, int64_t C, int64_t inner) {
  gpu::check_activation(x, C, inner);
  gpu::check_bits(bits, 2, 8);
  const gpu::ScalarRef theta_ref = gpu::param_ref(theta, x, "theta", 1);
  const gpu::ScalarRef offset_ref = gpu::param_ref(offset, x, "offset", 1);
  const gpu::ScalarRef lo_hi_ref = lo_hi.has_value() ? gpu::param_ref(*lo_hi, x, "lo_hi", 2)
                                                     : gpu::ScalarRef{nullptr, 0, gpu::ScalarKind::kFloat};
  const c10::cuda::CUDAGuard guard(x.device());
  const Grid grid = batchquant_grid(static_cast<int>(bits), is_signed);

  at::Tensor y = at::empty_like(x);
  at::Tensor qparams = at::empty({kNumQParams}, x.options().dtype(at::kFloat));
  float* qp = qparams.mutable_data_ptr<float>();
  if (!lo_hi.has_value()) gpu::launch_range(x, C, inner, qp, theta_ref, grid);
  gpu::launch_forward(x, y, gpu::ForwardArgs{x.numel(), qp, lo_hi_ref, theta_ref, offset_ref, grid});
  return {y, qparams};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_batchquant_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                        const at::Tensor& offset,
                                                                        const at::Tensor& qparams, int64_t bits,
                                                                        bool is_signed) {
  gpu::check_cuda_input(x, "x");
  gpu::check_same_layout(grad_y, x, "grad_y", "x");
  gpu::check_bits(bits, 2, 8);
  const gpu::ScalarRef offset_ref = gpu::param_ref(offset, x, "offset", 1);
  TORCH_CHECK(qparams.device() == x.device() && qparams.scalar_type() == at::kFloat &&
                  qparams.numel() == kNumQParams && qparams.is_contiguous(),
              "bquant (cuda backend): qparams must be a contiguous float32 tensor of ", kNumQParams,
              " elements on the device of x (the forward's second output), got ", qparams.scalar_type(), " of shape ",
              qparams.sizes(), " on ", qparams.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_theta = at::empty({1}, qparams.options());
  at::Tensor grad_offset = at::empty({1}, qparams.options());
  BQ_DISPATCH_FLOATING(x.scalar_type(), "bquant_batchquant_backward", [&] {
    using T = scalar_t;
    const bool vectorized = gpu::all_aligned16({grad_y.data_ptr(), x.data_ptr(), grad_x.data_ptr()});
    const auto kernel =
        vectorized ? gpu::batchquant_backward_kernel<T, true> : gpu::batchquant_backward_kernel<T, false>;
    const int64_t work = vectorized ? gpu::ceil_div(x.numel(), gpu::kVec<T>) : x.numel();
    const int64_t blocks = gpu::grid_for(reinterpret_cast<const void*>(kernel), work);
    gpu::Workspace ws = gpu::make_workspace(x, blocks * static_cast<int64_t>(sizeof(float2)), 1);
    const gpu::BackwardArgs args{x.numel(),
                                 qparams.const_data_ptr<float>(),
                                 offset_ref,
                                 batchquant_grid(static_cast<int>(bits), is_signed),
                                 static_cast<float2*>(ws.partials),
                                 ws.counters,
                                 grad_theta.mutable_data_ptr<float>(),
                                 grad_offset.mutable_data_ptr<float>()};
    kernel<<<blocks, gpu::kThreads, 0, stream>>>(grad_y.const_data_ptr<T>(), x.const_data_ptr<T>(),
                                                 grad_x.mutable_data_ptr<T>(), args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_theta, grad_offset};
}

}  // namespace bquant
