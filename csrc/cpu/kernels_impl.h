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
  // The values rounded to T (what a T tensor would hold): nothing to do.
  static void round(V* v) {}
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
  static void round(V* v) {
    auto [a, b] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v[0], v[1]));
    v[0] = a;
    v[1] = b;
  }
};

template <>
struct VecIO<c10::Half> : VecIO16<c10::Half> {
#ifdef CPU_CAPABILITY_AVX2
  // F16C rounds to nearest even as c10 does, but keeps a NaN's payload where c10 stores 0x7E00 with the
  // NaN's sign: NaN lanes become the float NaN that converts to that, so that an element gets the scalar
  // tail's bits wherever it sits.
  static __m128i to_half(__m256 v) {
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    if (_mm256_movemask_ps(nan) != 0) {  // rare: a branch costs less than a blend on every vector
      const __m256 sign = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u))));
      v = _mm256_blendv_ps(v, _mm256_or_ps(sign, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000))), nan);
    }
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  }
  static void store(c10::Half* p, const V* v) {
    for (int k = 0; k < kParts; ++k) _mm_storeu_si128(reinterpret_cast<__m128i*>(p) + k, to_half(v[k]));
  }
  static void store_exact(c10::Half* p, const V* v) { store(p, v); }
  // The round trip per float vector, without packing the two halves into one 16-bit vector and out again.
  static void round(V* v) {
    for (int k = 0; k < kParts; ++k) v[k] = _mm256_cvtph_ps(to_half(v[k]));
  }
#endif
};
template <>
struct VecIO<c10::BFloat16> : VecIO16<c10::BFloat16> {
#ifdef CPU_CAPABILITY_AVX2
  // Round to nearest even on the float's bits, as c10 rounds, NaN to c10's 0x7FC0 (torch's vector
  // conversion stores 0xFFFF: an element gets the scalar tail's bits wherever it sits); no packing into a
  // bfloat16 vector and out again.
  static void round(V* v) {
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int k = 0; k < kParts; ++k) {
      const __m256i u = _mm256_castps_si256(v[k]);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
      const __m256 r = _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(lsb, bias)), high));
      v[k] = c10_nan(r, v[k]);
    }
  }
  static void store(c10::BFloat16* p, const V* v) {
    V r[kParts] = {v[0], v[1]};
    round(r);
    pack(p, r);
  }
  // Values a bfloat16 holds (loaded ones, masked, or zeros: the backward's grad_x / grad_w) have their low
  // 16 bits zero, so dropping them is exact: a shift and a pack instead of the rounding (NaN as c10 stores it).
  static void store_exact(c10::BFloat16* p, const V* v) {
    const V r[kParts] = {c10_nan(v[0], v[0]), c10_nan(v[1], v[1])};
    pack(p, r);
  }

 private:
  // r, or c10's NaN 0x7FC0 (as a float) where v is NaN.
  static __m256 c10_nan(__m256 r, __m256 v) {
    return _mm256_blendv_ps(r, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  // The upper 16 bits of each float, in order.
  static void pack(c10::BFloat16* p, const V* v) {
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

// A product as torch's mul stores it in T: for 16-bit inputs the float product (exact) rounded to T once.
template <typename T>
inline T gated_t(T a, T b) {
  return static_cast<T>(static_cast<acc_t<T>>(a) * static_cast<acc_t<T>>(b));
}
template <typename T>
inline acc_t<T> gated_a(T a, T b) {
  return static_cast<acc_t<T>>(gated_t(a, b));
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

// Column min and max (NaN-propagating) of the rows of x or, kGated, of z = T(x[r][j] * g[j]) (rounded as torch's mul
// stores it, gated_t), computed in registers: one walk for both, the gating compiled out of the plain form.

// A strip of kStrip blocks over `rows` rows, rows `stride` apart, the running values (and the strip's gates) held in
// registers; they start from row 0 when `first`, else from mn / mx.
template <typename T, int kStrip, bool kGated>
void col_minmax_strip(const T* x, const T* g, int64_t rows, int64_t stride, bool first, acc_t<T>* mn, acc_t<T>* mx) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int kVecs = kStrip * IO::kParts;
  V vg[kVecs], lo[kVecs], hi[kVecs], v[kVecs];
  if constexpr (kGated) {
    for (int s = 0; s < kStrip; ++s) IO::load(g + s * IO::kBlock, vg + s * IO::kParts);
  }
  const auto load_row = [&](int64_t r) {
    for (int s = 0; s < kStrip; ++s) IO::load(x + r * stride + s * IO::kBlock, v + s * IO::kParts);
    if constexpr (kGated) {
      for (int k = 0; k < kVecs; ++k) v[k] = v[k] * vg[k];
      for (int s = 0; s < kStrip; ++s) IO::round(v + s * IO::kParts);
    }
  };
  int64_t r = 0;
  if (first) {
    load_row(r++);
    for (int k = 0; k < kVecs; ++k) lo[k] = hi[k] = v[k];
  } else {
    for (int k = 0; k < kVecs; ++k) {
      lo[k] = V::loadu(mn + k * V::size());
      hi[k] = V::loadu(mx + k * V::size());
    }
  }
  for (; r < rows; ++r) {
    load_row(r);
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

// `rows` rows of `cols` elements, rows `stride` apart, into mn / mx: started from row 0 when `first`, else accumulated.
template <typename T, bool kGated>
void col_minmax_impl(const T* x, const T* g, int64_t rows, int64_t cols, int64_t stride, bool first, acc_t<T>* mn,
                     acc_t<T>* mx) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::V;
  constexpr int kStrip = std::max(1, 4 / IO::kParts);  // 4 vectors each of running min, max and input
  if (rows == 1 || cols < IO::kBlock) {  // one row (the gated op's short-row samples) or narrow: a loop over the rows
    for (int64_t r = 0; r < rows; ++r) {
      const T* px = x + r * stride;
      const bool init = first && r == 0;
      int64_t j = 0;
      for (; j + IO::kBlock <= cols; j += IO::kBlock) {
        V v[IO::kParts];
        IO::load(px + j, v);
        if constexpr (kGated) {
          V vg[IO::kParts];
          IO::load(g + j, vg);
          for (int k = 0; k < IO::kParts; ++k) v[k] = v[k] * vg[k];
          IO::round(v);
        }
        for (int k = 0; k < IO::kParts; ++k) {
          const int64_t o = j + k * V::size();
          (init ? v[k] : vec_min(V::loadu(mn + o), v[k])).store(mn + o);
          (init ? v[k] : vec_max(V::loadu(mx + o), v[k])).store(mx + o);
        }
      }
      for (; j < cols; ++j) {
        const A z = kGated ? gated_a(px[j], g[j]) : static_cast<A>(px[j]);
        mn[j] = init ? z : nan_min(mn[j], z);
        mx[j] = init ? z : nan_max(mx[j], z);
      }
    }
    return;
  }
  const int64_t tile_rows = std::max<int64_t>(1, kColTileBytes / static_cast<int64_t>(cols * sizeof(T)));
  for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const T* tile = x + r0 * stride;
    const int64_t tr = std::min(tile_rows, rows - r0);
    const bool init = first && r0 == 0;
    int64_t j = 0;
    for (; j + kStrip * IO::kBlock <= cols; j += kStrip * IO::kBlock) {  // (the plain form's g is null: left as is)
      col_minmax_strip<T, kStrip, kGated>(tile + j, kGated ? g + j : g, tr, stride, init, mn + j, mx + j);
    }
    for (; j < cols; j += IO::kBlock) {
      // The last block may overlap the previous one (min and max are idempotent).
      const int64_t c = std::min(j, cols - IO::kBlock);
      col_minmax_strip<T, 1, kGated>(tile + c, kGated ? g + c : g, tr, stride, init, mn + c, mx + c);
    }
  }
}

template <typename T>
void col_minmax(const T* x, int64_t rows, int64_t cols, int64_t stride, acc_t<T>* mn, acc_t<T>* mx) {
  col_minmax_impl<T, false>(x, nullptr, rows, cols, stride, true, mn, mx);
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

// The element loops of BatchQuant, also for gated BatchQuant: the input is then z = T(x * gate), computed in
// registers as torch's mul rounds it, with one gate per element (kGated, ge) or one for all (kScaled, *ge).
// The backward's gated form also writes grad_x = T(gz * ge) and prod = T(gz * x). The operations on z are
// the same in every form.
enum Gating { kUngated, kGated, kScaled };

template <typename T, Gating kGating>
void bq_forward_impl(const T* x, const T* ge, T* y, int64_t n, const BQScalarsT<acc_t<T>>& p) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::V;
  const BQVecScalars<V> vp(p);
  const V scale(kGating == kScaled ? static_cast<A>(*ge) : A(1));
  int64_t i = 0;
  for (; i + IO::kBlock <= n; i += IO::kBlock) {
    V v[IO::kParts];
    IO::load(x + i, v);
    if constexpr (kGating != kUngated) {
      V vg[IO::kParts];
      if constexpr (kGating == kGated) {
        IO::load(ge + i, vg);
      } else {
        for (int k = 0; k < IO::kParts; ++k) vg[k] = scale;
      }
      for (int k = 0; k < IO::kParts; ++k) v[k] = v[k] * vg[k];
      IO::round(v);
    }
    for (int k = 0; k < IO::kParts; ++k) v[k] = batchquant_elem_vec<sizeof(T)>(v[k], vp);
    IO::store(y + i, v);
  }
  for (; i < n; ++i) {
    const T z = kGating == kUngated ? x[i] : gated_t(x[i], kGating == kGated ? ge[i] : *ge);
    y[i] = static_cast<T>(batchquant_elem<sizeof(T)>(static_cast<acc_t<T>>(z), p));
  }
}

template <typename T, bool kWithGate>
BQChunkSums bq_backward_impl(const T* g, const T* x, const T* ge, T* grad_x, acc_t<T>* prod, int64_t n,
                             const BQScalarsT<acc_t<T>>& p) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::V;
  const BQVecScalars<V> vp(p);
  const V zero(A(0));
  V dl_acc(A(0)), do_acc(A(0));
  int64_t i = 0;
  for (; i + IO::kBlock <= n; i += IO::kBlock) {
    V vg[IO::kParts], vx[IO::kParts], gx[IO::kParts], vz[IO::kParts], vge[IO::kParts];
    IO::load(g + i, vg);
    IO::load(x + i, vx);
    if constexpr (kWithGate) {
      IO::load(ge + i, vge);
      for (int k = 0; k < IO::kParts; ++k) vz[k] = vx[k] * vge[k];
      IO::round(vz);
    } else {
      for (int k = 0; k < IO::kParts; ++k) vz[k] = vx[k];
    }
    for (int k = 0; k < IO::kParts; ++k) {
      // batchquant_elem_backward of quant_math.h: in ? {g, g * (z - y), 0} : {0, -g * y, g}.
      const V u = batchquant_u_vec(vz[k], vp);
      const V in = (u >= vp.qmin) & (u <= vp.qmax);
      const V y = batchquant_y_vec<true>(u, vp);
      gx[k] = V::blendv(zero, vg[k], in);
      // -g * y == g * -y bit for bit (a product's sign does not affect its rounding): one multiply.
      dl_acc = dl_acc + vg[k] * V::blendv(y.neg(), vz[k] - y, in);
      do_acc = do_acc + V::blendv(vg[k], zero, in);
    }
    if constexpr (kWithGate) {
      for (int k = 0; k < IO::kParts; ++k) {
        vx[k] = gx[k] * vx[k];  // gz is g or 0: exact in T
        gx[k] = gx[k] * vge[k];
      }
      IO::store(grad_x + i, gx);
      IO::round(vx);
      for (int k = 0; k < IO::kParts; ++k) vx[k].store(prod + i + k * V::size());
    } else {
      IO::store_exact(grad_x + i, gx);  // g or 0
    }
  }
  const auto add = [](double s, A v) { return s + static_cast<double>(v); };
  BQChunkSums sums{fold_lanes(dl_acc, 0.0, add), fold_lanes(do_acc, 0.0, add)};
  for (; i < n; ++i) {
    const T z = kWithGate ? gated_t(x[i], ge[i]) : x[i];
    const BQGradT<A> e = batchquant_elem_backward(static_cast<A>(g[i]), static_cast<A>(z), p);
    const T gz = static_cast<T>(e.grad_x);
    if constexpr (kWithGate) {
      prod[i] = gated_a(gz, x[i]);
      grad_x[i] = gated_t(gz, ge[i]);
    } else {
      grad_x[i] = gz;
    }
    sums.dl += static_cast<double>(e.dl_term);
    sums.dout += static_cast<double>(e.do_term);
  }
  return sums;
}

template <typename T>
void bq_forward(const T* x, T* y, int64_t n, const BQScalarsT<acc_t<T>>& p) {
  bq_forward_impl<T, kUngated>(x, nullptr, y, n, p);
}

template <typename T>
BQChunkSums bq_backward(const T* g, const T* x, T* grad_x, int64_t n, const BQScalarsT<acc_t<T>>& p) {
  return bq_backward_impl<T, false>(g, x, nullptr, grad_x, nullptr, n, p);
}

template <typename T>
void gated_bq_forward(const T* x, const T* ge, T* y, int64_t n, const BQScalarsT<acc_t<T>>& p) {
  bq_forward_impl<T, kGated>(x, ge, y, n, p);
}

template <typename T>
void scaled_bq_forward(const T* x, const T* g, T* y, int64_t n, const BQScalarsT<acc_t<T>>& p) {
  bq_forward_impl<T, kScaled>(x, g, y, n, p);
}

template <typename T>
BQChunkSums gated_bq_backward(const T* g, const T* x, const T* ge, T* grad_x, acc_t<T>* prod, int64_t n,
                              const BQScalarsT<acc_t<T>>& p) {
  return bq_backward_impl<T, true>(g, x, ge, grad_x, prod, n, p);
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

// ----------------------------------------------------------------------------- gated BatchQuant
//
// Helpers of gated_batchquant_cpu.cpp (its element loops are bq_forward_impl / bq_backward_impl above).

// Extremes of x per key (mn, mx) -> those of T(x * g[key]), v -> T(v * g) being monotone for a finite g
// (swapped for g < 0), where g and both extremes are finite; keys with a non-finite one are left as they
// are. Returns whether every key was mapped.
template <typename T>
bool gate_extremes(const T* g, int64_t n, acc_t<T>* mn, acc_t<T>* mx) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::V;
  const V zero(A(0));
  bool all = true;
  int64_t j = 0;
  for (; j + IO::kBlock <= n; j += IO::kBlock) {
    V vg[IO::kParts], lo[IO::kParts], hi[IO::kParts], a[IO::kParts], b[IO::kParts];
    IO::load(g + j, vg);
    for (int k = 0; k < IO::kParts; ++k) {
      lo[k] = V::loadu(mn + j + k * V::size());
      hi[k] = V::loadu(mx + j + k * V::size());
      a[k] = lo[k] * vg[k];
      b[k] = hi[k] * vg[k];
    }
    IO::round(a);
    IO::round(b);
    for (int k = 0; k < IO::kParts; ++k) {
      const V finite = (vg[k] - vg[k] == zero) & (lo[k] - lo[k] == zero) & (hi[k] - hi[k] == zero);
      const V neg = vg[k] < zero;
      all = all && finite.zero_mask() == 0;
      V::blendv(lo[k], V::blendv(a[k], b[k], neg), finite).store(mn + j + k * V::size());
      V::blendv(hi[k], V::blendv(b[k], a[k], neg), finite).store(mx + j + k * V::size());
    }
  }
  for (; j < n; ++j) {
    const A ga = static_cast<A>(g[j]);
    if (!(std::isfinite(ga) && std::isfinite(mn[j]) && std::isfinite(mx[j]))) {
      all = false;
      continue;
    }
    const A a = static_cast<A>(static_cast<T>(mn[j] * ga)), b = static_cast<A>(static_cast<T>(mx[j] * ga));
    mn[j] = ga < 0 ? b : a;
    mx[j] = ga < 0 ? a : b;
  }
  return all;
}

// Column min and max of z = T(x[r][j] * g[j]), rows of `len` consecutive elements (col_minmax_impl).
template <typename T>
void gate_col_minmax(const T* x, const T* g, int64_t rows, int64_t len, bool first, acc_t<T>* mn, acc_t<T>* mx) {
  col_minmax_impl<T, true>(x, g, rows, len, len, first, mn, mx);
}

// out[0, n): g[0] in the first `head` elements, then each next gate in the next `inner`. One broadcast store
// (or a few) per gate, the last one overlapping the next gate's place, which that gate's own store then
// overwrites: short runs (small spatial sizes) cost one store each. Writes up to 32 elements past n.
template <typename T>
void gate_expand(const T* g, int64_t n, int64_t inner, int64_t head, T* out) {
  using V = Vectorized<T>;
  int64_t pos = std::min(head, n);
  for (int64_t j = 0; j < pos; j += V::size()) V(g[0]).store(out + j);
  const T* gk = g + 1;
  if (inner <= V::size()) {  // one store per gate, no inner loop
    for (; pos < n; ++gk, pos += inner) V(*gk).store(out + pos);
    return;
  }
  for (; pos < n; ++gk, pos += inner) {
    const V v(*gk);
    const int64_t len = std::min(inner, n - pos);
    for (int64_t j = 0; j < len; j += V::size()) v.store(out + pos + j);
  }
}

// sums[r] = the sum of row r of `rows` rows of `len` (consecutive), from +0, in A.
template <typename A>
void row_sums(const A* p, int64_t rows, int64_t len, A* sums) {
  using V = Vectorized<A>;
  for (int64_t r = 0; r < rows; ++r) {
    const A* pr = p + r * len;
    int64_t j = 0;
    A s = A(0);
    if (len >= V::size()) {
      V acc(A(0));
      for (; j + V::size() <= len; j += V::size()) acc = acc + V::loadu(pr + j);
      s = fold_lanes(acc, A(0), [](A a, A b) { return a + b; });
    }
    for (; j < len; ++j) s += pr[j];
    sums[r] = s;
  }
}

// acc[j] += p[r][j] over `rows` rows of `len` (consecutive), in row order.
template <typename A>
void col_sums(const A* p, int64_t rows, int64_t len, A* acc) {
  using V = Vectorized<A>;
  for (int64_t r = 0; r < rows; ++r) {
    const A* pr = p + r * len;
    int64_t j = 0;
    for (; j + V::size() <= len; j += V::size()) (V::loadu(acc + j) + V::loadu(pr + j)).store(acc + j);
    for (; j < len; ++j) acc[j] += pr[j];
  }
}

// ----------------------------------------------------------------------------- table

template <typename T>
Kernels<T> make_kernels() {
  return {&row_minmax<T>,       &col_minmax<T>,        &minmax_accumulate<acc_t<T>>, &bq_forward<T>,
          &bq_backward<T>,      &lsq_forward<T>,       &lsq_backward<T>,             &gated_bq_forward<T>,
          &scaled_bq_forward<T>,
          &gated_bq_backward<T>, &gate_extremes<T>,    &gate_col_minmax<T>,          &gate_expand<T>,
          &row_sums<acc_t<T>>,  &col_sums<acc_t<T>>};
}

inline KernelTable make_table(const char* isa) {
  return {isa, make_kernels<float>(), make_kernels<double>(), make_kernels<c10::Half>(), make_kernels<c10::BFloat16>()};
}

}  // namespace bquant::cpu::BQ_CPU_ISA
