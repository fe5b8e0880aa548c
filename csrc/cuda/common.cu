// Host-side helpers of the CUDA kernels: launch geometry, parameter scalars, workspace, input checks.
#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "cuda/common.cuh"

namespace bquant::gpu {

int64_t resident_blocks(const void* kernel) {
  // Cached per (kernel, device): the occupancy query is a host-side calculation, but not free.
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  if (const auto it = cache.find(key); it != cache.end()) return it->second;
  int per_sm = 0;
  int sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = std::max<int64_t>(1, static_cast<int64_t>(per_sm) * sms);
  cache.emplace(key, blocks);
  return blocks;
}

int64_t grid_for(const void* kernel, int64_t work) {
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min(wanted, resident_blocks(kernel)));
}

Workspace make_workspace(const at::Tensor& like, int64_t partial_bytes, int64_t num_counters) {
  const int64_t partial_padded = (partial_bytes + 15) / 16 * 16;
  const int64_t counter_bytes = num_counters * static_cast<int64_t>(sizeof(unsigned int));
  at::Tensor storage = at::empty({partial_padded + counter_bytes}, like.options().dtype(at::kByte));
  auto* base = static_cast<uint8_t*>(storage.data_ptr());
  auto* counters = reinterpret_cast<unsigned int*>(base + partial_padded);
  C10_CUDA_CHECK(cudaMemsetAsync(counters, 0, counter_bytes, c10::cuda::getCurrentCUDAStream()));
  return {storage, base, counters};
}

void check_cuda_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "bquant (cuda backend): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "bquant (cuda backend): ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.numel() > 0, "bquant (cuda backend): ", name, " must not be empty");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), "bquant (cuda backend): ", name,
              " must be dense (contiguous or channels_last), got strides ", t.strides());
}

ScalarRef param_ref(const at::Tensor& t, const at::Tensor& ref, const char* name, int64_t numel) {
  TORCH_CHECK(t.device() == ref.device(), "bquant (cuda backend): ", name, " is on ", t.device(),
              " but the input is on ", ref.device());
  TORCH_CHECK(t.numel() == numel, "bquant (cuda backend): ", name, " must have ", numel, " element(s), got shape ",
              t.sizes());
  // A multi-value parameter (lo_hi) must be 1-d, so that one stride walks it.
  TORCH_CHECK(numel == 1 || t.dim() == 1, "bquant (cuda backend): ", name, " must be 1-d, got shape ", t.sizes());
  const at::ScalarType dtype = t.scalar_type();
  // Checked before the switch, which then returns on every path (no throw from inside a switch
  // that would otherwise fall off the end of the function).
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "bquant (cuda backend): ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
  const int64_t stride = numel == 1 ? 0 : t.stride(0);
  ScalarKind kind = ScalarKind::kFloat;
  switch (dtype) {
    case at::kDouble:
      kind = ScalarKind::kDouble;
      break;
    case at::kHalf:
      kind = ScalarKind::kHalf;
      break;
    case at::kBFloat16:
      kind = ScalarKind::kBFloat16;
      break;
    default:
      break;
  }
  return {t.data_ptr(), stride, kind};
}

void check_same_layout(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "bquant (cuda backend): ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "bquant (cuda backend): ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes() && t.strides() == ref.strides(), "bquant (cuda backend): ", name,
              " must have the shape and strides of ", ref_name, " (", ref.sizes(), ", ", ref.strides(), "), got (",
              t.sizes(), ", ", t.strides(), ")");
}

}  // namespace bquant::gpu
