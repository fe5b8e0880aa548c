// The AVX2 + FMA + F16C instance of the CPU kernels, used only after the dispatcher (dispatch.cpp)
// has checked the CPU, so the build stays portable.
//
// Only this file's own code is compiled for AVX2: every header it shares with the other translation
// units is included first, for the baseline target, and the rest (ATen's Vectorized for AVX2, in
// its own at::vec::AVX2 namespace, and kernels_impl.h, in bquant::cpu::avx2) inside a
// `#pragma GCC target` region. No -mavx2 flag is involved, so no inline function shared with other
// translation units can be emitted with AVX2 instructions. GCC only; other compilers build the
// portable kernels alone.
#include "cpu/cpu_kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define BQ_CPU_HAVE_AVX2_KERNELS 1
#endif

#ifdef BQ_CPU_HAVE_AVX2_KERNELS

// Everything ATen/cpu/vec includes from outside the vec headers (list from `g++ -H`), so that it is
// compiled here for the baseline target, like in every other translation unit.
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/Exception.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <utility>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define BQ_CPU_ISA avx2

// GCC's C++ front end does not set __AVX__ / __AVX2__ under `#pragma GCC target`, and sleef.h
// (included by ATen's AVX2 Vectorized) declares its AVX2 functions only when they are set.
#define __AVX__ 1
#define __AVX2__ 1
#include "cpu/kernels_impl.h"
#undef __AVX2__
#undef __AVX__

namespace bquant::cpu {

KernelTable kernel_table_avx2() { return avx2::make_table("avx2"); }

}  // namespace bquant::cpu

#pragma GCC pop_options

namespace bquant::cpu {

bool avx2_kernels_compiled() { return true; }

}  // namespace bquant::cpu

#else

namespace bquant::cpu {

// Never selected: avx2_kernels_compiled() is false.
KernelTable kernel_table_avx2() { return kernel_table_default(); }
bool avx2_kernels_compiled() { return false; }

}  // namespace bquant::cpu

#endif
