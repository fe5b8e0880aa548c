// The CPU backend's inner loops: plain functions over raw pointers, one table per instruction set.
//
// The host entry points (batchquant_cpu.cpp, lsq_cpu.cpp) validate, allocate, cut the work into
// fixed chunks and run them with at::parallel_for; each chunk calls one of these functions. The
// functions are compiled once per instruction set (kernels_default.cpp, kernels_avx2.cpp, both from
// kernels_impl.h) and the table is picked at run time, so one build runs on any x86-64 CPU.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "common/quant_math.h"

namespace bquant::cpu {

// Element math runs in float for float32/float16/bfloat16 and in double for float64 (spec 1.4).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Sums of one backward chunk, accumulated in acc_t within the chunk and returned in double.
struct BQChunkSums {
  double dl;    // sum of g * (in ? x - y : -y)
  double dout;  // sum of g * !in
};

template <typename T>
struct Kernels {
  using A = acc_t<T>;
  // Min and max (NaN-propagating) of each of `rows` rows of `len` elements, rows `stride` apart.
  void (*row_minmax)(const T* x, int64_t rows, int64_t len, int64_t stride, A* mn, A* mx);
  // Column-wise min and max (NaN-propagating) over `rows` rows of `cols` elements, rows `stride` apart.
  void (*col_minmax)(const T* x, int64_t rows, int64_t cols, int64_t stride, A* mn, A* mx);
  // mn = min(mn, src_mn), mx = max(mx, src_mx) element-wise over n elements (NaN-propagating).
  void (*minmax_accumulate)(A* mn, A* mx, const A* src_mn, const A* src_mx, int64_t n);
  // BatchQuant forward of n elements (spec 1.4).
  void (*bq_forward)(const T* x, T* y, int64_t n, const BQScalarsT<A>& p);
  // BatchQuant backward of n elements (spec 1.5): writes grad_x, returns the chunk's sums.
  BQChunkSums (*bq_backward)(const T* g, const T* x, T* grad_x, int64_t n, const BQScalarsT<A>& p);
  // LSQ forward of n elements (spec 2).
  void (*lsq_forward)(const T* w, T* out, int64_t n, A abs_step, Grid grid);
  // LSQ backward of n elements: writes grad_w, returns the chunk's sum of ds_term.
  double (*lsq_backward)(const T* g, const T* w, T* grad_w, int64_t n, A abs_step, Grid grid);

  // Gated BatchQuant (gated_batchquant_cpu.cpp): the BatchQuant loops on z = T(x * ge) (ge: each element's
  // gate; products rounded to T once, like torch's mul), z computed in registers. The backward also writes
  // grad_x = T(gz * ge) and prod = T(gz * x) (for the gate's gradient). Same numbers as the loops above on z.
  void (*gated_bq_forward)(const T* x, const T* ge, T* y, int64_t n, const BQScalarsT<A>& p);
  // The same with one gate, *g, for all n elements.
  void (*scaled_bq_forward)(const T* x, const T* g, T* y, int64_t n, const BQScalarsT<A>& p);
  BQChunkSums (*gated_bq_backward)(const T* g, const T* x, const T* ge, T* grad_x, A* prod, int64_t n,
                                   const BQScalarsT<A>& p);
  // Per-key extremes of x (mn, mx) -> those of T(x * g[key]) where g and both are finite; returns whether
  // every key was.
  bool (*gate_extremes)(const T* g, int64_t n, A* mn, A* mx);
  // Column min and max (NaN-propagating) of T(x[r][j] * g[j]), rows of `len` consecutive elements, into
  // mn / mx: started from row 0 when `first`, else accumulated.
  void (*gate_col_minmax)(const T* x, const T* g, int64_t rows, int64_t len, bool first, A* mn, A* mx);
  // out[0, n) = g[0] for the first `head` elements, then each next gate for the next `inner`. Writes up to
  // 32 elements past n.
  void (*gate_expand)(const T* g, int64_t n, int64_t inner, int64_t head, T* out);
  // sums[r] = sum of row r (from +0); acc[j] += column j in row order. Rows of `len` consecutive elements.
  void (*row_sums)(const A* p, int64_t rows, int64_t len, A* sums);
  void (*col_sums)(const A* p, int64_t rows, int64_t len, A* acc);
};

struct KernelTable {
  const char* isa;
  Kernels<float> f32;
  Kernels<double> f64;
  Kernels<c10::Half> f16;
  Kernels<c10::BFloat16> bf16;
};

KernelTable kernel_table_default();
// Defined only where the compiler can target AVX2 (x86-64 GCC/Clang); see kernels_avx2.cpp.
KernelTable kernel_table_avx2();
bool avx2_kernels_compiled();

// The table for this CPU, chosen once: AVX2 when the CPU has AVX2+FMA+F16C and ATen's own
// capability (ATEN_CPU_CAPABILITY) is AVX2 or above, else the portable one.
const KernelTable& kernel_table();

template <typename T>
const Kernels<T>& kernels() {
  const KernelTable& t = kernel_table();
  if constexpr (std::is_same_v<T, float>) {
    return t.f32;
  } else if constexpr (std::is_same_v<T, double>) {
    return t.f64;
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return t.f16;
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>, "unsupported dtype");
    return t.bf16;
  }
}

}  // namespace bquant::cpu
