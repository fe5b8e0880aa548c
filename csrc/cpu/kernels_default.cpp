// The portable instance of the CPU kernels: ATen's generic Vectorized (plain arrays the compiler
// vectorizes for the baseline instruction set of the build).
#define CPU_CAPABILITY DEFAULT
#define BQ_CPU_ISA default_isa

#include "cpu/kernels_impl.h"

namespace bquant::cpu {

KernelTable kernel_table_default() { return default_isa::make_table("default"); }

}  // namespace bquant::cpu
