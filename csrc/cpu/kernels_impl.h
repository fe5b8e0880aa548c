// Vectorized inner loops of the CPU backend, compiled once per instruction set.
//
// Not a normal header: a kernels_<isa>.cpp includes it after defining BQ_CPU_ISA (the namespace the
// instantiations live in) and ATen's CPU_CAPABILITY macros, so that at::vec::Vectorized is the
// implementation for that instruction set. No static data here: the AVX2 instance of this file must
// not run any code before the dispatcher has checked the CPU.
//
// The vector forms of the element passes mirror the scalar functions of common/quant_math.h
// operation for operation (same IEEE operations in the same order, NaN taking the same branches),
// and those scalar functions handle the tails, so an element gets the same bits wherever it sits.
#ifndef BQ_CPU_ISA
#error "define BQ_CPU_ISA before including kernels_impl.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "cpu/cpu_kernels.h"

namespace bquant::cpu::BQ_CPU_ISA {

using at::vec::Vectorized;

// Loads and stores of one block of T as vectors of the math type A (one vector for float and
// double; two float vectors for the 16-bit types).
template <typename T>
struct VecIO {
  using A = T;
  using V = Vectorized<A>;
  static constexpr int kParts = 1;
  static constexpr int64_t kBlock = V::size();
  static void load(const T* p, V* v) { v[0] = V::loadu(p); }
  static void store(T* p, const V* v) { v[0].store(p); }
  // Stores values that T holds exactly (loaded ones, masked, or zeros): no rounding needed.
  static void store_exact(T* p, const V* v) { store(p, v); }
};

template <typename T>
struct VecIO16 {
  using A = float;
  using V = Vectorized<float>;
  static constexpr int kParts = 2;
  static constexpr int64_t kBlock = Vectorized<T>::size();
  static_assert(kBlock == kParts * V::size(), "a 16-bit vector converts to two float vectors");
  static void load(const T* p, V* v) {
    auto [a, b] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    v[0] = a;
    v[1] = b;
  }
  static void store(T* p, const V* v) { at::vec::convert_from_float<T>(v[0], v[1]).store(p); }
  static void store_exact(T* p, const V* v) { store(p, v); }
};

template <>
struct VecIO<c10::Half> : VecIO16<c10::Half> {};
template <>
struct VecIO<c10::BFloat16> : VecIO16<c10::BFloat16> {
#ifdef CPU_CAPABILITY_AVX2
  // A float that came from a bfloat16 has its low 16 bits zero, so dropping them is exact: a shift and
  // a pack instead of convert_from_float's rounding and NaN handling (the backward's grad_x / grad_w
  // are such values, or zeros).
  static void store_exact(c10::BFloat16* p, const V* v) {
    const __m256i lo = _mm256_srli_epi32(_mm256_castps_si256(v[0]), 16);
    const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(v[1]), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);  // lane order back
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  }
#endif
};

// clamp_nan of quant_math.h: v < lo ? lo : (v > hi ? hi : v); NaN fails both tests and stays NaN.
template <typename V>
inline V clamp_nan_vec(const V& v, const V& lo, const V& hi) {
  return V::blendv(V::blendv(v, hi, v > hi), lo, v < lo);
}

template <typename V>
struct BQVecScalars {
  V l, scale, zero, offset, qmin, qmax, step;
  template <typename A>
  explicit BQVecScalars(const BQScalarsT<A>& p)
      : l(p.l), scale(p.scale), zero(p.zero), offset(p.offset), qmin(p.qmin), qmax(p.qmax), step(p.step) {}
};

// batchquant_u, batchquant_y and batchquant_elem of quant_math.h on a vector.
template <typename V>
inline V batchquant_u_vec(const V& x, const BQVecScalars<V>& p) {
  return x * p.l / p.scale + p.zero + p.offset;
}

template <bool kByStep, typename V>
inline V batchquant_y_vec(const V& u, const BQVecScalars<V>& p) {
  const V q = clamp_nan_vec(u, p.qmin, p.qmax).round();
  if constexpr (kByStep) {
    return (q - p.zero - p.offset) * p.step;
  } else {
    return (q - p.zero - p.offset) * p.scale / p.l;
  }
}

template <int kBytes, typename V>
inline V batchquant_elem_vec(const V& x, const BQVecScalars<V>& p) {
  return batchquant_y_vec<kBytes == 2>(batchquant_u_vec(x, p), p);
}

// Lanes of a vector folded in lane order with f.
template <typename V, typename R, typename F>
inline R fold_lanes(const V& v, R init, F f) {
  typename V::value_type lanes[V::size()];
  v.store(lanes);
  for (int64_t i = 0; i < V::size(); ++i) init = f(init, lanes[i]);
  return init;
}

// ----------------------------------------------------------------------------- statistics
//
// min and max are idempotent, so a row or column range that is not a whole number of vector blocks
// ends with one block overlapping the previous one instead of a scalar tail.

template <typename V>
inline V vec_min(const V& a, const V& b) {
  return at::vec::minimum(a, b);  // NaN-propagating, like nan_min
}
template <typename V>
inline V vec_max(const V& a, const V& b) {
  return at::vec::maximum(a, b);
}

template <typename T>
void row_minmax(const T* x, int64_t rows, int64_t len, int64_t stride, acc_t<T>* mn, acc_t<T>* mx) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::V;
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = x + r * stride;
    if (len < IO::kBlock) {
      A lo = static_cast<A>(p[0]), hi = lo;
      for (int64_t i = 1; i < len; ++i) {
        lo = nan_min(lo, static_cast<A>(p[i]));
        hi = nan_max(hi, static_cast<A>(p[i]));
      }
      mn[r] = lo;
      mx[r] = hi;
      continue;
    }
    V lo[IO::kParts], hi[IO::kParts], v[IO::kParts];
    IO::load(p, lo);
    IO::load(p, hi);
    for (int64_t i = IO::kBlock; i < len; i += IO::kBlock) {
      IO::load(p + std::min(i, len - IO::kBlock), v);
      for (int k = 0; k < IO::kParts; ++k) {
        lo[k] = vec_min(lo[k], v[k]);
        hi[k] = vec_max(hi[k], v[k]);
      }
    }
    for (int k = 1; k < IO::kParts; ++k) {
      lo[0] = vec_min(lo[0], lo[k]);
      hi[0] = vec_max(hi[0], hi[k]);
    }
    mn[r] = at::vec::vec_reduce_all<A>(vec_min<V>, lo[0]);
    mx[r] = at::vec::vec_reduce_all<A>(vec_max<V>, hi[0]);
  }
}

// Column min and max of a strip of kStrip blocks over `rows` rows, the running values held in
// registers; they start from row 0 when `first`, else from mn / mx.
template <typename T, int kStrip>
void col_minmax_strip(const T* x, int64_t rows, int64_t stride, bool first, acc_t<T>* mn, acc_t<T>* mx) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int kVecs = kStrip * IO::kParts;
  V lo[kVecs], hi[kVecs], v[kVecs];
  if (first) {
    for (int s = 0; s < kStrip; ++s) IO::load(x + s * IO::kBlock, lo + s * IO::kParts);
    for (int k = 0; k < kVecs; ++k) hi[k] = lo[k];
  } else {
    for (int k = 0; k < kVecs; ++k) {
      lo[k] = V::loadu(mn + k * V::size());
      hi[k] = V::loadu(mx + k * V::size());
    }
  }
  for (int64_t r = first ? 1 : 0; r < rows; ++r) {
    for (int s = 0; s < kStrip; ++s) IO::load(x + r * stride + s * IO::kBlock, v + s * IO::kParts);
    for (int k = 0; k < kVecs; ++k) {
      lo[k] = vec_min(lo[k], v[k]);
      hi[k] = vec_max(hi[k], v[k]);
    }
  }
  for (int k = 0; k < kVecs; ++k) {
    lo[k].store(mn + k * V::size());
    hi[k].store(mx + k * V::size());
  }
}

// Rows are taken in tiles of about kColTileBytes, which the strips of a tile re-read from L1.
constexpr int64_t kColTileBytes = 16384;

template <typename T>
void col_minmax(const T* x, int64_t rows, int64_t cols, int64_t stride, acc_t<T>* mn, acc_t<T>* mx) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  constexpr int kStrip = std::max(1, 4 / IO::kParts);  // 4 vectors each of running min, max and input
  if (cols < IO::kBlock) {
    for (int64_t j = 0; j < cols; ++j) mn[j] = mx[j] = static_cast<A>(x[j]);
    for (int64_t r = 1; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        mn[j] = nan_min(mn[j], static_cast<A>(x[r * stride + j]));
        mx[j] = nan_max(mx[j], static_cast<A>(x[r * stride + j]));
      }
    }
    return;
  }
  const int64_t tile_rows = std::max<int64_t>(1, kColTileBytes / static_cast<int64_t>(cols * sizeof(T)));
  for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const T* tile = x + r0 * stride;
    const int64_t tr = std::min(tile_rows, rows - r0);
    int64_t j = 0;
    for (; j + kStrip * IO::kBlock <= cols; j += kStrip * IO::kBlock) {
      col_minmax_strip<T, kStrip>(tile + j, tr, stride, r0 == 0, mn + j, mx + j);
    }
    for (; j < cols; j += IO::kBlock) {
      // The last block may overlap the previous one (min and max are idempotent).
      const int64_t c = std::min(j, cols - IO::kBlock);
      col_minmax_strip<T, 1>(tile + c, tr, stride, r0 == 0, mn + c, mx + c);
    }
  }
}

// mn = min(mn, src_mn) and mx = max(mx, src_mx) element-wise over n elements (NaN-propagating).
template <typename A>
void minmax_accumulate(A* mn, A* mx, const A* src_mn, const A* src_mx, int64_t n) {
  using V = Vectorized<A>;
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    vec_min(V::loadu(mn + j), V::loadu(src_mn + j)).store(mn + j);
    vec_max(V::loadu(mx + j), V::loadu(src_mx + j)).store(mx + j);
  }
  for (; j < n; ++j) {
    mn[j] = nan_min(mn[j], src_mn[j]);
    mx[j] = nan_max(mx[j], src_mx[j]);
  }
}

// ----------------------------------------------------------------------------- BatchQuant

template <typename T>
void bq_forward(const T* x, T* y, int64_t n, const BQScalarsT<acc_t<T>>& p) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const BQVecScalars<V> vp(p);
  int64_t i = 0;
  for (; i + IO::kBlock <= n; i += IO::kBlock) {
    V v[IO::kParts];
    IO::load(x + i, v);
    for (int k = 0; k < IO::kParts; ++k) v[k] = batchquant_elem_vec<sizeof(T)>(v[k], vp);
    IO::store(y + i, v);
  }
  for (; i < n; ++i) y[i] = static_cast<T>(batchquant_elem<sizeof(T)>(static_cast<acc_t<T>>(x[i]), p));
}

template <typename T>
BQChunkSums bq_backward(const T* g, const T* x, T* grad_x, int64_t n, const BQScalarsT<acc_t<T>>& p) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::V;
  const BQVecScalars<V> vp(p);
  const V zero(A(0));
  V dl_acc(A(0)), do_acc(A(0));
  int64_t i = 0;
  for (; i + IO::kBlock <= n; i += IO::kBlock) {
    V vg[IO::kParts], vx[IO::kParts], gx[IO::kParts];
    IO::load(g + i, vg);
    IO::load(x + i, vx);
    for (int k = 0; k < IO::kParts; ++k) {
      // batchquant_elem_backward of quant_math.h: in ? {g, g * (x - y), 0} : {0, -g * y, g}.
      const V u = batchquant_u_vec(vx[k], vp);
      const V in = (u >= vp.qmin) & (u <= vp.qmax);
      const V y = batchquant_y_vec<true>(u, vp);
      gx[k] = V::blendv(zero, vg[k], in);
      // -g * y == g * -y bit for bit (a product's sign does not affect its rounding): one multiply.
      dl_acc = dl_acc + vg[k] * V::blendv(y.neg(), vx[k] - y, in);
      do_acc = do_acc + V::blendv(vg[k], zero, in);
    }
    IO::store_exact(grad_x + i, gx);  // g or 0
  }
  const auto add = [](double s, A v) { return s + static_cast<double>(v); };
  BQChunkSums sums{fold_lanes(dl_acc, 0.0, add), fold_lanes(do_acc, 0.0, add)};
  for (; i < n; ++i) {
    const BQGradT<A> e = batchquant_elem_backward(static_cast<A>(g[i]), static_cast<A>(x[i]), p);
    grad_x[i] = static_cast<T>(e.grad_x);
    sums.dl += static_cast<double>(e.dl_term);
    sums.dout += static_cast<double>(e.do_term);
  }
  return sums;
}

// ----------------------------------------------------------------------------- LSQ

template <typename T>
void lsq_forward(const T* w, T* out, int64_t n, acc_t<T> abs_step, Grid grid) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::V;
  const V s(abs_step), qn(static_cast<A>(grid.qmin)), qp(static_cast<A>(grid.qmax));
  int64_t i = 0;
  for (; i + IO::kBlock <= n; i += IO::kBlock) {
    V v[IO::kParts];
    IO::load(w + i, v);
    // lsq_elem of quant_math.h: round(clamp(w / s, Qn, Qp)) * s.
    for (int k = 0; k < IO::kParts; ++k) v[k] = clamp_nan_vec(v[k] / s, qn, qp).round() * s;
    IO::store(out + i, v);
  }
  for (; i < n; ++i) out[i] = static_cast<T>(lsq_elem(static_cast<A>(w[i]), abs_step, grid));
}

template <typename T>
double lsq_backward(const T* g, const T* w, T* grad_w, int64_t n, acc_t<T> abs_step, Grid grid) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::V;
  const V s(abs_step), qn(static_cast<A>(grid.qmin)), qp(static_cast<A>(grid.qmax)), zero(A(0));
  V acc(A(0));
  int64_t i = 0;
  for (; i + IO::kBlock <= n; i += IO::kBlock) {
    V vg[IO::kParts], vw[IO::kParts], gw[IO::kParts];
    IO::load(g + i, vg);
    IO::load(w + i, vw);
    for (int k = 0; k < IO::kParts; ++k) {
      // lsq_elem_backward of quant_math.h: inside (exclusive) ? {g, g * (round(v) - v)} : {0, g * clamp(v)}.
      const V v = vw[k] / s;
      const V inside = (v > qn) & (v < qp);
      gw[k] = V::blendv(zero, vg[k], inside);
      acc = acc + V::blendv(vg[k] * clamp_nan_vec(v, qn, qp), vg[k] * (v.round() - v), inside);
    }
    IO::store_exact(grad_w + i, gw);  // g or 0
  }
  double sum = fold_lanes(acc, 0.0, [](double s_, A v) { return s_ + static_cast<double>(v); });
  for (; i < n; ++i) {
    const LSQGradT<A> e = lsq_elem_backward(static_cast<A>(g[i]), static_cast<A>(w[i]), abs_step, grid);
    grad_w[i] = static_cast<T>(e.grad_w);
    sum += static_cast<double>(e.ds_term);
  }
  return sum;
}

// ----------------------------------------------------------------------------- table

template <typename T>
Kernels<T> make_kernels() {
  return {&row_minmax<T>,  &col_minmax<T>,  &minmax_accumulate<acc_t<T>>, &bq_forward<T>, &bq_backward<T>,
          &lsq_forward<T>, &lsq_backward<T>};
}

inline KernelTable make_table(const char* isa) {
  return {isa, make_kernels<float>(), make_kernels<double>(), make_kernels<c10::Half>(), make_kernels<c10::BFloat16>()};
}

}  // namespace bquant::cpu::BQ_CPU_ISA
