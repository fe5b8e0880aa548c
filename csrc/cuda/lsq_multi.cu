// Multi-tensor LSQ: every weight of a network fake-quantized in one launch forward and one
// launch backward (per kMultiCapacity tensors).
//
// The table of tensors (pointers, sizes, grid, gradient scale) travels as a __grid_constant__
// kernel parameter: it needs no host-to-device copy, so the launch is stream-ordered without a host
// sync and a CUDA graph captures it by value. Each block owns one kChunk-element chunk of one
// tensor; in the backward, the last block to finish a tensor sums that tensor's chunk partials in
// a fixed order (double), so every step gradient is bitwise reproducible.
#include <string>
#include <vector>

#include "bquant.h"
#include "cuda/common.cuh"
#include "cuda/lsq_common.cuh"

namespace bquant {
namespace gpu {
namespace {

constexpr int kMultiCapacity = 128;  // tensors per launch; the table is ~11 KiB of kernel parameters
constexpr int64_t kChunk = 8192;     // elements per block; a multiple of every kVec keeps chunks aligned

struct LSQMultiEntry {
  const void* grad;  // backward only
  const void* w;
  void* out;  // w_hat (forward) or grad_w (backward)
  ScalarRef step;
  int64_t numel;
  double grad_scale;  // backward only
  int32_t first_block;
  int32_t num_blocks;
  Grid grid;
};

struct LSQMultiTable {
  LSQMultiEntry entries[kMultiCapacity];
  int32_t count;
  float* grad_steps;        // backward: [count]
  float* partials;          // backward: [total blocks]
  unsigned int* counters;   // backward: [count], zeroed before the launch
};

// The entry owning this block: the last one whose first_block <= blockIdx.x (binary search).
__device__ __forceinline__ int find_entry(const LSQMultiTable& table) {
  int lo = 0;
  int hi = table.count - 1;
  const int block = static_cast<int>(blockIdx.x);
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.entries[mid].first_block <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lsq_multi_forward_kernel(const __grid_constant__ LSQMultiTable table) {
  const LSQMultiEntry& e = table.entries[find_entry(table)];
  const int64_t begin = static_cast<int64_t>(blockIdx.x - e.first_block) * kChunk;
  const int64_t n = e.numel - begin < kChunk ? e.numel - begin : kChunk;
  const T* w = static_cast<const T*>(e.w) + begin;
  T* out = static_cast<T*>(e.out) + begin;
  const float abs_step = fabsf(static_cast<float>(load_scalar(e.step)));
  const Grid grid = e.grid;
  const auto f = [&](float v) { return lsq_elem(v, abs_step, grid); };
  if (all_aligned16({w, out})) {
    map_unary<T, true>(w, out, n, threadIdx.x, kThreads, f);
  } else {
    map_unary<T, false>(w, out, n, threadIdx.x, kThreads, f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lsq_multi_backward_kernel(const __grid_constant__ LSQMultiTable table) {
  const int index = find_entry(table);
  const LSQMultiEntry& e = table.entries[index];
  const int64_t begin = static_cast<int64_t>(blockIdx.x - e.first_block) * kChunk;
  const int64_t n = e.numel - begin < kChunk ? e.numel - begin : kChunk;
  const T* grad = static_cast<const T*>(e.grad) + begin;
  const T* w = static_cast<const T*>(e.w) + begin;
  T* grad_w = static_cast<T*>(e.out) + begin;
  const float step = static_cast<float>(load_scalar(e.step));
  const float abs_step = fabsf(step);
  const Grid grid = e.grid;
  float sum = 0.0f;
  const auto f = [&](float g, float v) {
    const LSQGrad d = lsq_elem_backward(g, v, abs_step, grid);
    sum += d.ds_term;
    return d.grad_w;
  };
  if (all_aligned16({grad, w, grad_w})) {
    map_binary<T, true>(grad, w, grad_w, n, threadIdx.x, kThreads, f);
  } else {
    map_binary<T, false>(grad, w, grad_w, n, threadIdx.x, kThreads, f);
  }

  __shared__ float scratch[kWarps];
  sum = block_reduce(sum, SumOp{}, 0.0f, scratch);
  if (threadIdx.x == 0) table.partials[blockIdx.x] = sum;
  if (!arrive_last(table.counters + index, static_cast<unsigned int>(e.num_blocks))) return;
  const double total = sum_partials(table.partials + e.first_block, e.num_blocks);
  if (threadIdx.x == 0) table.grad_steps[index] = lsq_step_grad(total, e.grad_scale, step);
}

// ----------------------------------------------------------------------------- host side

std::string indexed(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

void check_lists(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& steps,
                 const std::vector<int64_t>& bits) {
  TORCH_CHECK(!weights.empty(), "bquant (cuda backend): weights must not be empty");
  TORCH_CHECK(steps.size() == weights.size() && bits.size() == weights.size(),
              "bquant (cuda backend): weights, steps and bits must have the same length, got ", weights.size(), ", ",
              steps.size(), " and ", bits.size());
  const at::Tensor& first = weights.front();
  for (size_t i = 0; i < weights.size(); ++i) {
    check_cuda_input(weights[i], indexed("weights", i).c_str());
    TORCH_CHECK(weights[i].device() == first.device() && weights[i].scalar_type() == first.scalar_type(),
                "bquant (cuda backend): weights[", i, "] is ", weights[i].scalar_type(), " on ", weights[i].device(),
                " but weights[0] is ", first.scalar_type(), " on ", first.device(), " (one dtype and device per call)");
    check_lsq_bits(bits[i]);
  }
}

// Fills one launch's table with the tensors [begin, end); returns the launch's block count.
int64_t fill_table(LSQMultiTable& table, size_t begin, size_t end, const std::vector<at::Tensor>& weights,
                   const std::vector<at::Tensor>& steps, const std::vector<int64_t>& bits, bool is_signed,
                   const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>* grads,
                   const std::vector<int64_t>* numel_full) {
  int64_t blocks = 0;
  table.count = static_cast<int32_t>(end - begin);
  for (size_t i = begin; i < end; ++i) {
    const at::Tensor& w = weights[i];
    LSQMultiEntry& e = table.entries[i - begin];
    e.grad = grads != nullptr ? (*grads)[i].data_ptr() : nullptr;
    e.w = w.data_ptr();
    e.out = outs[i].data_ptr();
    e.step = param_ref(steps[i], w, indexed("steps", i).c_str(), 1);
    e.numel = w.numel();
    e.grid = lsq_grid(static_cast<int>(bits[i]), is_signed);
    e.grad_scale = numel_full != nullptr ? lsq_grad_scale((*numel_full)[i], w.numel(), e.grid) : 0.0;
    e.first_block = static_cast<int32_t>(blocks);
    e.num_blocks = static_cast<int32_t>((w.numel() + kChunk - 1) / kChunk);
    blocks += e.num_blocks;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "bquant (cuda backend): too many weight elements for ",
                "one multi-tensor launch");
  }
  return blocks;
}

}  // namespace
}  // namespace gpu

std::vector<at::Tensor> cuda_lsq_multi_forward(const std::vector<at::Tensor>& weights,
                                               const std::vector<at::Tensor>& steps, const std::vector<int64_t>& bits,
                                               bool is_signed) {
  gpu::check_lists(weights, steps, bits);
  const c10::cuda::CUDAGuard guard(weights.front().device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> outs;
  outs.reserve(weights.size());
  for (const at::Tensor& w : weights) outs.push_back(at::empty_like(w));

  for (size_t begin = 0; begin < weights.size(); begin += gpu::kMultiCapacity) {
    const size_t end = std::min(weights.size(), begin + gpu::kMultiCapacity);
    gpu::LSQMultiTable table{};
    const int64_t blocks = gpu::fill_table(table, begin, end, weights, steps, bits, is_signed, outs, nullptr, nullptr);
    BQ_DISPATCH_FLOATING(weights.front().scalar_type(), "bquant_lsq_multi_forward", [&] {
      gpu::lsq_multi_forward_kernel<scalar_t><<<blocks, gpu::kThreads, 0, stream>>>(table);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return outs;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> cuda_lsq_multi_backward(const std::vector<at::Tensor>& grads,
                                                                        const std::vector<at::Tensor>& weights,
                                                                        const std::vector<at::Tensor>& steps,
                                                                        const std::vector<int64_t>& bits,
                                                                        bool is_signed,
                                                                        const std::vector<int64_t>& numel_full) {
  gpu::check_lists(weights, steps, bits);
  TORCH_CHECK(grads.size() == weights.size() && numel_full.size() == weights.size(),
              "bquant (cuda backend): grads and numel_full must have one entry per weight, got ", grads.size(),
              " and ", numel_full.size(), " for ", weights.size(), " weights");
  for (size_t i = 0; i < weights.size(); ++i) {
    gpu::check_same_layout(grads[i], weights[i], gpu::indexed("grads", i).c_str(), gpu::indexed("weights", i).c_str());
  }
  const at::Tensor& first = weights.front();
  const c10::cuda::CUDAGuard guard(first.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> grad_ws;
  grad_ws.reserve(weights.size());
  for (const at::Tensor& w : weights) grad_ws.push_back(at::empty_like(w));
  at::Tensor grad_steps = at::empty({static_cast<int64_t>(weights.size())}, first.options().dtype(at::kFloat));

  for (size_t begin = 0; begin < weights.size(); begin += gpu::kMultiCapacity) {
    const size_t end = std::min(weights.size(), begin + gpu::kMultiCapacity);
    gpu::LSQMultiTable table{};
    const int64_t blocks =
        gpu::fill_table(table, begin, end, weights, steps, bits, is_signed, grad_ws, &grads, &numel_full);
    gpu::Workspace ws = gpu::make_workspace(first, blocks * static_cast<int64_t>(sizeof(float)), table.count);
    table.grad_steps = grad_steps.mutable_data_ptr<float>() + begin;
    table.partials = static_cast<float*>(ws.partials);
    table.counters = ws.counters;
    BQ_DISPATCH_FLOATING(first.scalar_type(), "bquant_lsq_multi_backward", [&] {
      gpu::lsq_multi_backward_kernel<scalar_t><<<blocks, gpu::kThreads, 0, stream>>>(table);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_ws, grad_steps};
}

}  // namespace bquant
