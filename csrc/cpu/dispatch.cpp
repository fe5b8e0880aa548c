// Picks the CPU kernel table once per process.
#include <ATen/Version.h>

#include <string>

#include "cpu/cpu_kernels.h"

namespace bquant::cpu {
namespace {

bool cpu_has_avx2() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// Follows ATen's choice (which honours ATEN_CPU_CAPABILITY=default|avx2|avx512) so that
// `ATEN_CPU_CAPABILITY=default` also selects our portable kernels; never AVX2 on a CPU without it.
KernelTable select_table() {
  const std::string aten = at::get_cpu_capability();
  const bool aten_avx2 = aten == "AVX2" || aten == "AVX512";
  if (aten_avx2 && avx2_kernels_compiled() && cpu_has_avx2()) return kernel_table_avx2();
  return kernel_table_default();
}

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table = select_table();
  return table;
}

}  // namespace bquant::cpu
