// The fused epilogue's kernels (csrc/cpu/epilogue_cpu.cpp), included once per instruction set
// with BQ_EPI_ISA naming the namespace of that instance. Not a normal header: no include guard, no
// includes (the including file has included everything first, for the baseline target).
#ifndef BQ_EPI_ISA
#error "define BQ_EPI_ISA before including epilogue_kernels_impl.h"
#endif

namespace BQ_EPI_ISA {

// bfloat16 <-> float as c10 converts (exact widening; round to nearest even, NaN -> 0x7FC0) in
// branch-free bit operations: c10's conversion, with its NaN branch, kept GCC from vectorizing every
// loop over bfloat16 (the fused op ran 1.5-4x slower than the separate ops). Other T: plain casts.
template <typename T>
constexpr bool kBF16 = std::is_same_v<T, c10::BFloat16>;

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
// The upper 16 bits of c10::detail::round_to_nearest_even's result, as a float's bits.
inline uint32_t bf16_round_bits(float f) {
  const uint32_t u = bits_of(f);
  return f != f ? UINT32_C(0x7FC00000) : (u + ((u >> 16) & 1) + UINT32_C(0x7FFF)) & UINT32_C(0xFFFF0000);
}

template <typename A, typename T>
inline A widen(T v) {
  if constexpr (kBF16<T>) {
    return static_cast<A>(float_of(static_cast<uint32_t>(v.x) << 16));
  } else {
    return static_cast<A>(v);
  }
}
template <typename T, typename A>
inline T narrow(A v) {
  if constexpr (kBF16<T>) {
    return T(static_cast<uint16_t>(bf16_round_bits(v) >> 16), T::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

// v rounded to T where the composition stores a T (16-bit inputs); a no-op for float32 / float64.
template <typename T, typename A>
inline A round_to(A v) {
  if constexpr (kBF16<T>) {
    return float_of(bf16_round_bits(v));
  } else if constexpr (sizeof(T) == 2) {
    return static_cast<A>(static_cast<T>(v));
  } else {
    return v;
  }
}

// 8 16-bit lanes as floats, in GCC vector types: GCC does not vectorize the scalar loops over
// c10::BFloat16 even with the branch-free conversions above (nor over c10::Half), so the segment loops
// have an explicit vector body for 16-bit T (the same operations per lane as the scalar tail: the same bits).
using vf8 = float __attribute__((vector_size(32)));
using vu8 = uint32_t __attribute__((vector_size(32)));
using vi8 = int32_t __attribute__((vector_size(32)));
using vh8 = uint16_t __attribute__((vector_size(16)));

inline vf8 load_bf16(const c10::BFloat16* p) {
  vh8 h;
  std::memcpy(&h, p, sizeof(h));
  const vu8 u = __builtin_convertvector(h, vu8) << 16;
  vf8 f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline vf8 load_f8(const float* p) {
  vf8 f;
  std::memcpy(&f, p, sizeof(f));
  return f;
}
inline void store_f8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }
// bf16_round_bits per lane.
inline vu8 bf16_round_bits(vf8 f) {
  vu8 u;
  std::memcpy(&u, &f, sizeof(u));
  const vu8 r = (u + ((u >> 16) & 1) + 0x7FFF) & 0xFFFF0000u;
  const vi8 nan = f != f;
  const vu8 qnan = {0x7FC00000u, 0x7FC00000u, 0x7FC00000u, 0x7FC00000u,
                    0x7FC00000u, 0x7FC00000u, 0x7FC00000u, 0x7FC00000u};
  return nan ? qnan : r;
}
inline vf8 round_bf16(vf8 f) {
  const vu8 u = bf16_round_bits(f);
  vf8 r;
  std::memcpy(&r, &u, sizeof(r));
  return r;
}
inline void store_bf16(c10::BFloat16* p, vf8 f) {
  const vh8 h = __builtin_convertvector(bf16_round_bits(f) >> 16, vh8);
  std::memcpy(p, &h, sizeof(h));
}

// float16 where F16C is targeted (BQ_EPI_F16C: the AVX2 instance): vcvtph2ps widens exactly, as c10 does, and
// vcvtps2ph rounds to nearest even, as c10 does, but keeps a NaN's payload where c10 stores the quiet NaN
// 0x7E00 with the NaN's sign: NaN lanes are first replaced by the float NaN that converts to it. The
// baseline instance keeps the scalar loops.
#if defined(BQ_EPI_F16C)
template <typename T>
constexpr bool kVec16 = kBF16<T> || std::is_same_v<T, c10::Half>;

inline vf8 load_half(const c10::Half* p) {
  return reinterpret_cast<vf8>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m128i half_bits(vf8 f) {
  vu8 u;
  std::memcpy(&u, &f, sizeof(u));
  const vi8 nan = f != f;
  const vu8 c = nan ? (u & 0x80000000u) | 0x7FC00000u : u;
  return _mm256_cvtps_ph(reinterpret_cast<__m256>(c), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline vf8 round_half(vf8 f) { return reinterpret_cast<vf8>(_mm256_cvtph_ps(half_bits(f))); }
inline void store_half(c10::Half* p, vf8 f) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), half_bits(f)); }
#else
template <typename T>
constexpr bool kVec16 = kBF16<T>;
#endif

// 8 lanes of a 16-bit T with a vector body (kVec16<T>): loaded as floats, rounded to T, stored.
template <typename T>
inline vf8 load16(const T* p) {
  if constexpr (kBF16<T>) return load_bf16(p);
#if defined(BQ_EPI_F16C)
  else return load_half(p);
#endif
}
template <typename T>
inline vf8 round16(vf8 f) {
  if constexpr (kBF16<T>) return round_bf16(f);
#if defined(BQ_EPI_F16C)
  else return round_half(f);
#endif
}
template <typename T>
inline void store16(T* p, vf8 f) {
  if constexpr (kBF16<T>) store_bf16(p, f);
#if defined(BQ_EPI_F16C)
  else store_half(p, f);
#endif
}
inline vf8 splat8(float v) { return vf8{v, v, v, v, v, v, v, v}; }  // not {} + v: +0 + -0 is +0

// PyTorch's relu (NaN passes) and hardswish, x * min(max(x + 3, 0), 6) / 6.
template <int64_t kAct, typename A>
inline A act_fwd(A z) {
  if constexpr (kAct == kRelu) {
    return z < A(0) ? A(0) : z;
  } else if constexpr (kAct == kHSwish) {
    return z * std::min(std::max(z + A(3), A(0)), A(6)) / A(6);
  } else {
    return z;
  }
}

// PyTorch's threshold_backward (relu: gradient where the output is > 0) and hardswish_backward.
template <int64_t kAct, typename A>
inline A act_bwd(A z, A g) {
  if constexpr (kAct == kRelu) {
    return z > A(0) ? g : A(0);
  } else if constexpr (kAct == kHSwish) {
    return z < A(-3) ? A(0) : (z <= A(3) ? g * (z / A(3) + A(0.5)) : g);
  } else {
    return g;
  }
}

// act_fwd / act_bwd on 8 float lanes: the scalar forms' comparisons and selects (std::max(a, b) is
// a < b ? b : a, std::min(a, b) is b < a ? b : a), so NaN takes the same branch.
template <int64_t kAct>
inline vf8 act_fwd8(vf8 z) {
  const vf8 zero{};
  if constexpr (kAct == kRelu) {
    return z < zero ? zero : z;
  } else if constexpr (kAct == kHSwish) {
    const vf8 six = splat8(6.f), t = z + splat8(3.f);
    const vf8 mx = t < zero ? zero : t;
    return z * (six < mx ? six : mx) / six;
  } else {
    return z;
  }
}
template <int64_t kAct>
inline vf8 act_bwd8(vf8 z, vf8 g) {
  const vf8 zero{};
  if constexpr (kAct == kRelu) {
    return z > zero ? g : zero;
  } else if constexpr (kAct == kHSwish) {
    const vf8 three = splat8(3.f);
    const vf8 r = z <= three ? g * (z / three + splat8(.5f)) : g;
    return z < -three ? zero : r;
  } else {
    return g;
  }
}

// gz = act'(z) * gz over a segment, in place. float h_swish in GCC vector types: the generic loop's
// division under a condition (it may trap) keeps GCC from vectorizing it, and it was the slowest loop
// of the backward. The middle branch is computed everywhere and selected: the same bits, NaN included.
template <int64_t kAct, typename T, typename A>
inline void act_bwd_segment(const A* __restrict z, T* __restrict gz, int64_t n) {
  int64_t j = 0;
  if constexpr (kAct == kHSwish && std::is_same_v<T, float>) {
    constexpr vf8 zero = {}, three = {3, 3, 3, 3, 3, 3, 3, 3}, half = {.5f, .5f, .5f, .5f, .5f, .5f, .5f, .5f};
    for (; j + 8 <= n; j += 8) {
      vf8 zv, gv;
      std::memcpy(&zv, z + j, sizeof(zv));
      std::memcpy(&gv, gz + j, sizeof(gv));
      const vf8 mid = gv * (zv / three + half);
      const vf8 r = zv <= three ? mid : gv;
      const vf8 out = zv < -three ? zero : r;
      std::memcpy(gz + j, &out, sizeof(out));
    }
  }
  if constexpr (kVec16<T>) {  // rounding once: round_to then the store's rounding give the same bits
    for (; j + 8 <= n; j += 8) store16(gz + j, act_bwd8<kAct>(load_f8(z + j), load16(gz + j)));
  }
  for (; j < n; ++j) gz[j] = narrow<T>(round_to<T>(act_bwd<kAct>(z[j], widen<A>(gz[j]))));
}

// NaN-propagating min / max as two selects (if-converted and vectorized, unlike nan_min's `||`).
template <typename A>
inline A vmin(A acc, A v) {
  const A m = v < acc ? v : acc;
  return v != v ? v : m;
}
template <typename A>
inline A vmax(A acc, A v) {
  const A m = v > acc ? v : acc;
  return v != v ? v : m;
}

// Runs of this many vectors (of kLanes elements, or rows of channels) are summed in A, then folded into
// double accumulators, as the Triton kernels fold their per-program partials: converting every element
// to double made the statistics pass as slow as BN and the activation together. A run's sum loses at
// most about kFloatRun roundings of its own magnitude; squares of deviations beyond ~1e19 overflow to
// inf in float32 where float64 would not (the variance is then inf and BN maps the channel to beta).
constexpr int64_t kFloatRun = 16;

// *s1 += sum(v - mv), *s2 += sum((v - mv) * (w - mw)) over a segment, in kLanes accumulators (the fixed
// inner loop vectorizes). The statistics: v = w = y, mv = mw = shift; BN's backward: v = gz, w = y,
// mv = 0, mw = mean.
template <typename T, typename A>
inline void run_sums(const T* __restrict v, const T* __restrict w, A mv, A mw, int64_t n, double* s1, double* s2) {
  std::array<double, kLanes> d1{}, d2{};
  const int64_t full = n - n % kLanes;
  int64_t j = 0;
  while (j < full) {
    std::array<A, kLanes> r1{}, r2{};
    for (const int64_t end = std::min(full, j + kFloatRun * kLanes); j < end; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const A a = widen<A>(v[j + l]) - mv;
        r1[l] += a;
        r2[l] += a * (widen<A>(w[j + l]) - mw);
      }
    }
    for (int l = 0; l < kLanes; ++l) {
      d1[l] += static_cast<double>(r1[l]);
      d2[l] += static_cast<double>(r2[l]);
    }
  }
  for (; j < n; ++j) {
    const A a = widen<A>(v[j]) - mv;
    d1[0] += static_cast<double>(a);
    d2[0] += static_cast<double>(a * (widen<A>(w[j]) - mw));
  }
  for (int l = 0; l < kLanes; ++l) {
    *s1 += d1[l];
    *s2 += d2[l];
  }
}

// Calls f(offset, len, c, per_elem) on the memory segments of channels [c0, c1), each channel's
// elements in one fixed order: contiguous layout, one segment (of at most kSeg) per (o, c) row, all in
// channel c; channels innermost, one segment per o, element j in channel c + j.
template <typename F>
void for_segments(const Layout& L, int64_t c0, int64_t c1, const F& f) {
  if (L.inner == 1 && L.C > 1) {
    for (int64_t o = 0; o < L.outer; ++o) {
      for (int64_t c = c0; c < c1; c += kSeg) f(o * L.C + c, std::min(kSeg, c1 - c), c, true);
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t o = 0; o < L.outer; ++o) {
      const int64_t base = (o * L.C + c) * L.inner;
      for (int64_t i = 0; i < L.inner; i += kSeg) f(base + i, std::min(kSeg, L.inner - i), c, false);
    }
  }
}

// Runs f(c0, c1) over blocks of channels in parallel (a channel is never split between threads).
template <typename F>
void parallel_channels(const Layout& L, const F& f) {
  const int64_t per_channel = L.outer * L.inner;
  const int64_t grain = std::max<int64_t>(1, cpu::kMinParallelElems / std::max<int64_t>(1, per_channel));
  at::parallel_for(0, L.C, grain, f);
}

// BN of one element.
template <typename T, typename A>
inline A bn_elem(A y, A m, A k, A b) {
  return round_to<T>((y - m) * k + b);
}

// z = round_T((y - m) * k + b) and a = round_T(act(z)) of one segment (af's arrays from its channel c).
template <int64_t kAct, typename T, typename A>
void bn_act_segment(const T* __restrict y, int64_t n, const Affine<A>& af, int64_t c, bool per_elem,
                    A* __restrict z, T* __restrict a) {
  int64_t j = 0;
  if (per_elem) {
    const A* __restrict m = af.mean.data() + c;
    const A* __restrict k = af.k.data() + c;
    const A* __restrict b = af.b.data() + c;
    if constexpr (kVec16<T>) {
      for (; j + 8 <= n; j += 8) {
        const vf8 zv = round16<T>((load16(y + j) - load_f8(m + j)) * load_f8(k + j) + load_f8(b + j));
        store_f8(z + j, zv);
        store16(a + j, act_fwd8<kAct>(zv));
      }
    }
    for (; j < n; ++j) {
      z[j] = bn_elem<T>(widen<A>(y[j]), m[j], k[j], b[j]);
      a[j] = narrow<T>(act_fwd<kAct>(z[j]));
    }
  } else {
    const A mc = af.mean[c], kc = af.k[c], bc = af.b[c];
    if constexpr (kVec16<T>) {
      const vf8 mv = splat8(mc), kv = splat8(kc), bv = splat8(bc);
      for (; j + 8 <= n; j += 8) {
        const vf8 zv = round16<T>((load16(y + j) - mv) * kv + bv);
        store_f8(z + j, zv);
        store16(a + j, act_fwd8<kAct>(zv));
      }
    }
    for (; j < n; ++j) {
      z[j] = bn_elem<T>(widen<A>(y[j]), mc, kc, bc);
      a[j] = narrow<T>(act_fwd<kAct>(z[j]));
    }
  }
}

// a = round_T(a + b) over a segment, in place: the residual's sum (a T tensor in the composition) and
// autograd's sum of the two gradients of s.
template <typename T, typename A>
inline void add_segment(T* __restrict a, const T* __restrict b, int64_t n) {
  int64_t j = 0;
  if constexpr (kVec16<T>) {
    for (; j + 8 <= n; j += 8) store16(a + j, load16(a + j) + load16(b + j));
  }
  for (; j < n; ++j) a[j] = narrow<T>(widen<A>(a[j]) + widen<A>(b[j]));
}

// Runs f(off, n, c, per_elem, z, s) on every segment of y (channel blocks in parallel) with the
// segment's BN output z and quantizer input s (the activation, plus the residual `res` where given:
// it has y's strides, so a segment's offset is the same in both) computed in local buffers.
template <int64_t kAct, typename T, typename A, typename F>
void for_bn_act_segments(const Layout& L, const T* y, const T* res, const Affine<A>& af, const F& f) {
  parallel_channels(L, [&](int64_t c0, int64_t c1) {
    std::array<A, kSeg> z;
    std::array<T, kSeg> a;
    for_segments(L, c0, c1, [&](int64_t off, int64_t n, int64_t c, bool per_elem) {
      bn_act_segment<kAct, T, A>(y + off, n, af, c, per_elem, z.data(), a.data());
      if (res != nullptr) add_segment<T, A>(a.data(), res + off, n);
      f(off, n, c, per_elem, z.data(), a.data());
    });
  });
}

// Channels innermost with few channels: r consecutive rows as one row of r * C channels (wide channel
// j is channel j % C), so the element passes run on segments of up to kSeg elements instead of one
// short segment per row (at C = 40 the per-segment calls cost more than the arithmetic). r divides the
// row count; per-channel arrays are tiled r times and per-channel results folded in replica order, so
// the order of every sum is fixed by the shape (not by the thread count).
inline int64_t wide_rows(const Layout& L) {
  if (L.inner != 1) return 1;
  for (int64_t r = kSeg / L.C; r > 1; --r) {
    if (L.outer % r == 0) return r;
  }
  return 1;
}

template <typename V>
std::vector<V> tiled(const std::vector<V>& v, int64_t r) {
  std::vector<V> out;
  out.reserve(v.size() * r);
  for (int64_t i = 0; i < r; ++i) out.insert(out.end(), v.begin(), v.end());
  return out;
}

// The layout the element passes run on and its per-channel affine (r = 1: the tensor's own).
template <typename A>
struct Widened {
  int64_t r;
  Layout L;
  Affine<A> af;
};

template <typename A>
Widened<A> widened(const Layout& L, const Affine<A>& af) {
  const int64_t r = wide_rows(L);
  if (r == 1) return {1, L, af};
  return {r, {L.x, L.outer / r, L.C * r, 1},
          {tiled(af.k, r), tiled(af.b, r), tiled(af.mean, r), tiled(af.invstd, r)}};
}

// ----------------------------------------------------------------------------- forward

constexpr int64_t kTile = 8;  // channels per register tile (channels-innermost statistics)
constexpr int64_t kStatsBlockBytes = 16384;  // bytes of rows per block of the statistics (channel_stats)

using vd4 = double __attribute__((vector_size(32)));

inline vd4 lo_half(vf8 v) { return __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), vd4); }
inline vd4 hi_half(vf8 v) { return __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), vd4); }

// 16-bit T, 8 channels: stats_tile's double sums (the same operations per lane) on vectors.
template <typename T>
void stats_tile16(const T* __restrict y, int64_t rows, int64_t stride, const double* shift, double* s, double* q,
                  float* mn, float* mx) {
  vd4 s0, s1, q0, q1, h0, h1;
  for (int l = 0; l < 4; ++l) {
    h0[l] = shift[l];
    h1[l] = shift[l + 4];
    s0[l] = s[l];
    s1[l] = s[l + 4];
    q0[l] = q[l];
    q1[l] = q[l + 4];
  }
  vf8 vmn = load_f8(mn), vmx = load_f8(mx);
  for (int64_t r = 0; r < rows; ++r) {
    const vf8 v = load16(y + r * stride);
    const vd4 d0 = lo_half(v) - h0, d1 = hi_half(v) - h1;
    s0 += d0;
    s1 += d1;
    q0 += d0 * d0;
    q1 += d1 * d1;
    vmn = v < vmn ? v : vmn;
    vmx = v > vmx ? v : vmx;
  }
  for (int i = 0; i < 8; ++i) {
    const double ls = i < 4 ? s0[i] : s1[i - 4];
    s[i] = ls;
    q[i] = i < 4 ? q0[i] : q1[i - 4];
    const bool nan = ls != ls;
    mn[i] = nan ? static_cast<float>(ls) : vmn[i];
    mx[i] = nan ? static_cast<float>(ls) : vmx[i];
  }
}

// Shifted sums, min and max of W adjacent channels over `rows` rows `stride` elements apart, carried on
// from s, q, mn, mx (a channel's rows come in several calls, each a whole number of kFloatRun runs but
// the last: the same additions in the same order as in one call). Plain selects (vectorized); a NaN,
// which they may skip, makes the channel's sum NaN, and then its min/max.
template <typename T, typename A, int W>
void stats_tile(const T* __restrict y, int64_t rows, int64_t stride, const double* shift, double* s, double* q,
                A* mn, A* mx) {
  if constexpr (W == 8 && kVec16<T>) {
    stats_tile16(y, rows, stride, shift, s, q, mn, mx);
    return;
  }
  std::array<double, W> ls, lq, sh;
  std::array<A, W> lmn, lmx;
  for (int l = 0; l < W; ++l) {
    sh[l] = shift[l];
    ls[l] = s[l];
    lq[l] = q[l];
    lmn[l] = mn[l];
    lmx[l] = mx[l];
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict p = y + r * stride;
    for (int l = 0; l < W; ++l) {
      const A v = widen<A>(p[l]);
      const double d = static_cast<double>(v) - sh[l];
      ls[l] += d;
      lq[l] += d * d;
      lmn[l] = v < lmn[l] ? v : lmn[l];
      lmx[l] = v > lmx[l] ? v : lmx[l];
    }
  }
  for (int l = 0; l < W; ++l) {
    s[l] = ls[l];
    q[l] = lq[l];
    const bool nan = ls[l] != ls[l];
    mn[l] = nan ? static_cast<A>(ls[l]) : lmn[l];
    mx[l] = nan ? static_cast<A>(ls[l]) : lmx[l];
  }
}

// float32, 8 channels, in GCC vector types: shifted sums in float over runs of kFloatRun rows, each run
// folded into double accumulators (see run_sums): 3 vector operations and a min / max per 8 elements.
template <>
void stats_tile<float, float, 8>(const float* __restrict y, int64_t rows, int64_t stride, const double* shift,
                                 double* s, double* q, float* mn, float* mx) {
  vd4 s0, s1, q0, q1;
  vf8 h, vmn, vmx;
  for (int l = 0; l < 4; ++l) {
    s0[l] = s[l];
    s1[l] = s[l + 4];
    q0[l] = q[l];
    q1[l] = q[l + 4];
  }
  for (int l = 0; l < 8; ++l) h[l] = static_cast<float>(shift[l]);  // a float value: exact
  std::memcpy(&vmn, mn, sizeof(vmn));
  std::memcpy(&vmx, mx, sizeof(vmx));
  for (int64_t r0 = 0; r0 < rows; r0 += kFloatRun) {
    const int64_t r1 = std::min(rows, r0 + kFloatRun);
    vf8 rs{}, rq{};
    for (int64_t r = r0; r < r1; ++r) {
      vf8 v;
      std::memcpy(&v, y + r * stride, sizeof(v));
      const vf8 d = v - h;
      rs += d;
      rq += d * d;
      vmn = v < vmn ? v : vmn;
      vmx = v > vmx ? v : vmx;
    }
    s0 += lo_half(rs);
    s1 += hi_half(rs);
    q0 += lo_half(rq);
    q1 += hi_half(rq);
  }
  for (int l = 0; l < 4; ++l) {
    const double sums[2] = {s0[l], s1[l]};
    for (int h2 = 0; h2 < 2; ++h2) {
      const int i = l + 4 * h2;
      s[i] = sums[h2];
      q[i] = h2 == 0 ? q0[l] : q1[l];
      const bool nan = sums[h2] != sums[h2];
      mn[i] = nan ? static_cast<float>(sums[h2]) : vmn[i];
      mx[i] = nan ? static_cast<float>(sums[h2]) : vmx[i];
    }
  }
}

// Per-channel batch statistics of y: mean and biased variance (shifted sums in double, shift = the
// channel's first element) and min / max.
template <typename T, typename A>
void channel_stats(const Layout& L, const T* y, double* mean, double* var, A* mn, A* mx) {
  const int64_t C = L.C;
  std::vector<double> shift(C), s(C, 0.0), q(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = static_cast<double>(y[L.inner == 1 ? c : c * L.inner]);
    mn[c] = static_cast<A>(y[L.inner == 1 ? c : c * L.inner]);
    mx[c] = mn[c];
  }
  const auto& kern = cpu::kernels<T>();
  if (L.inner == 1) {  // channels innermost: tiles of kTile channels down a block of rows, sums in registers
    parallel_channels(L, [&](int64_t c0, int64_t c1) {
      // Blocks of about kStatsBlockBytes of this thread's channels, so that the kTile-channel tiles after
      // the first read a block from L1 / L2 (down all rows, each tile re-read the tensor from memory).
      const int64_t bytes = (c1 - c0) * static_cast<int64_t>(sizeof(T));
      const int64_t block = std::max<int64_t>(1, kStatsBlockBytes / bytes / kFloatRun) * kFloatRun;
      for (int64_t r0 = 0; r0 < L.outer; r0 += block) {
        const int64_t rows = std::min(block, L.outer - r0);
        const T* yb = y + r0 * C;
        for (int64_t c = c0; c < c1; c += kTile) {
          if (c + kTile <= c1) {
            stats_tile<T, A, kTile>(yb + c, rows, C, &shift[c], &s[c], &q[c], mn + c, mx + c);
          } else {
            for (int64_t t = c; t < c1; ++t) {
              stats_tile<T, A, 1>(yb + t, rows, C, &shift[t], &s[t], &q[t], mn + t, mx + t);
            }
          }
        }
      }
    });
  } else {
    parallel_channels(L, [&](int64_t c0, int64_t c1) {
      for_segments(L, c0, c1, [&](int64_t off, int64_t n, int64_t c, bool) {
      const T* __restrict p = y + off;
      A lo, hi;
      kern.row_minmax(p, 1, n, n, &lo, &hi);
      mn[c] = nan_min(mn[c], lo);
      mx[c] = nan_max(mx[c], hi);
      const A sh = static_cast<A>(shift[c]);  // the channel's first element: exact in A
      run_sums<T, A>(p, p, sh, sh, n, &s[c], &q[c]);
      });
    });
  }
  const double m = static_cast<double>(L.outer * L.inner);
  for (int64_t c = 0; c < C; ++c) {
    const double ds = s[c] / m;
    mean[c] = shift[c] + ds;
    var[c] = std::max(q[c] / m - ds * ds, 0.0);
  }
}

// Per-channel min / max of the quantizer's input s (h_swish: not monotone; with a residual: s is not a
// function of y alone; so one more read), which is stored in `s_out` (the output's memory, or the kept
// tensor): the quantizing pass then reads it instead of recomputing BN, the activation and the sum (a
// division per element for h_swish, the CPU's bottleneck here).
template <int64_t kAct, typename T, typename A>
void activated_minmax(const Layout& L, const T* y, const T* res, const Affine<A>& af, A* amin, A* amax, T* s_out) {
  for (int64_t c = 0; c < L.C; ++c) {
    amin[c] = std::numeric_limits<A>::infinity();
    amax[c] = -std::numeric_limits<A>::infinity();
  }
  const auto& kern = cpu::kernels<T>();
  for_bn_act_segments<kAct>(L, y, res, af, [&](int64_t off, int64_t n, int64_t c, bool per_elem, const A*, const T* a) {
    std::copy_n(a, n, s_out + off);
    if (per_elem) {
      A* __restrict mnc = amin + c;
      A* __restrict mxc = amax + c;
      int64_t j = 0;
      if constexpr (kVec16<T>) {
        for (; j + 8 <= n; j += 8) {
          const vf8 v = load16(a + j);
          store_f8(mnc + j, vmin(load_f8(mnc + j), v));
          store_f8(mxc + j, vmax(load_f8(mxc + j), v));
        }
      }
      for (; j < n; ++j) {
        mnc[j] = vmin(mnc[j], widen<A>(a[j]));
        mxc[j] = vmax(mxc[j], widen<A>(a[j]));
      }
      return;
    }
    A lo, hi;
    kern.row_minmax(a, 1, n, n, &lo, &hi);
    amin[c] = nan_min(amin[c], lo);
    amax[c] = nan_max(amax[c], hi);
  });
}

// out = batchquant(s) (or s without quantizer), s = act(bn(y)) (+ res where given); kept = s where
// `kept` is given (a separate tensor of y's layout).
template <int64_t kAct, typename T>
void forward_impl(const Layout& L, const FwdArgs& args, const T* res, at::Tensor& out, T* kept, at::Tensor& stats,
                  at::Tensor& qparams) {
  using A = cpu::acc_t<T>;
  const int64_t C = L.C;
  const T* y = L.x.const_data_ptr<T>();
  A* st = stats.data_ptr<A>();  // (2, C): mean, var
  std::vector<A> ymin(C), ymax(C);
  if (args.batch_stats) {
    std::vector<double> mean(C), var(C);
    channel_stats<T, A>(L, y, mean.data(), var.data(), ymin.data(), ymax.data());
    for (int64_t c = 0; c < C; ++c) {
      st[c] = static_cast<A>(mean[c]);
      st[C + c] = static_cast<A>(var[c]);
    }
  }
  const Affine<A> af = affine_of<A>(st, st + C, args.gamma, args.beta, args.eps, C);
  const auto [r, Lw, afw] = widened(L, af);
  A* qp = qparams.data_ptr<A>();
  T* po = out.data_ptr<T>();
  T* s_store = kept != nullptr ? kept : po;  // where activated_minmax stores s
  bool s_stored = false;  // whether s_store holds s already (activated_minmax)
  std::fill_n(qp, kNumQParams, A(0));
  BQScalarsT<A> p{};
  const bool quantize = args.bits > 0;
  if (quantize) {
    const Grid grid = batchquant_grid(static_cast<int>(args.bits), args.is_signed);
    double lo, hi;
    if (args.lo_hi) {
      std::tie(lo, hi) = *args.lo_hi;
    } else {
      std::vector<A> amin(C), amax(C);
      if (kAct == kHSwish || !args.batch_stats || res != nullptr) {
        std::vector<A> wmin(Lw.C), wmax(Lw.C);
        activated_minmax<kAct, T, A>(Lw, y, res, afw, wmin.data(), wmax.data(), s_store);
        s_stored = true;
        for (int64_t c = 0; c < C; ++c) {  // fold the replicas
          amin[c] = wmin[c];
          amax[c] = wmax[c];
          for (int64_t j = c + C; j < Lw.C; j += C) {
            amin[c] = vmin(amin[c], wmin[j]);
            amax[c] = vmax(amax[c], wmax[j]);
          }
        }
      } else {  // monotone: the extremes of act((y - mean) * k + beta) are those of y's extremes
        for (int64_t c = 0; c < C; ++c) {
          const A z0 = bn_elem<T>(ymin[c], af.mean[c], af.k[c], af.b[c]);
          const A z1 = bn_elem<T>(ymax[c], af.mean[c], af.k[c], af.b[c]);
          const bool down = af.k[c] < A(0);
          amin[c] = round_to<T>(act_fwd<kAct>(down ? z1 : z0));
          amax[c] = round_to<T>(act_fwd<kAct>(down ? z0 : z1));
        }
      }
      lo = hi = 0.0;  // spec 1.1: means over channels, summed in double in channel order
      for (int64_t c = 0; c < C; ++c) {
        lo += static_cast<double>(amin[c]);
        hi += static_cast<double>(amax[c]);
      }
      lo /= static_cast<double>(C);
      hi /= static_cast<double>(C);
    }
    fill_qparams(lo, hi, args.theta, grid, qp);
    p = bq_scalars<A>(qp[kL], qp[kScale], qp[kZero], static_cast<A>(args.offset), grid.qmin, grid.qmax);
  }
  const auto& kern = cpu::kernels<T>();
  if (s_stored) {  // quantize the stored s (in place when it is in `out`)
    at::parallel_for(0, L.x.numel(), cpu::kMinParallelElems, [&](int64_t i0, int64_t i1) {
      kern.bq_forward(s_store + i0, po + i0, i1 - i0, p);
    });
    return;
  }
  for_bn_act_segments<kAct>(Lw, y, res, afw, [&](int64_t off, int64_t n, int64_t, bool, const A*, const T* a) {
    if (kept != nullptr) std::copy_n(a, n, kept + off);
    if (quantize) {
      kern.bq_forward(a, po + off, n, p);
    } else {
      std::copy_n(a, n, po + off);
    }
  });
}

// ----------------------------------------------------------------------------- backward



// g_s = dBatchQuant/ds * g (+ g_act, the gradient into the kept s, where given); grad_res = g_s where
// given (s = a + r passes it unchanged); then as without residual: act' and BN's backward.
template <int64_t kAct, typename T>
BwdSums backward_impl(const Layout& L, const T* g, const T* g_act, const T* res, const BwdArgs& args,
                      const at::Tensor& stats, const at::Tensor& qparams, T* grad_y, T* grad_res) {
  using A = cpu::acc_t<T>;
  const int64_t C = L.C;
  const T* y = L.x.const_data_ptr<T>();
  const A* st = stats.const_data_ptr<A>();
  const Affine<A> af = affine_of<A>(st, st + C, args.gamma, args.beta, args.eps, C);
  const bool quantize = args.bits > 0;
  BQScalarsT<A> p{};
  if (quantize) {
    const A* qp = qparams.const_data_ptr<A>();
    const Grid grid = batchquant_grid(static_cast<int>(args.bits), args.is_signed);
    p = bq_scalars<A>(qp[kL], qp[kScale], qp[kZero], static_cast<A>(args.offset), grid.qmin, grid.qmax);
  }
  const auto [r, Lw, afw] = widened(L, af);
  const int64_t W = Lw.C;
  BwdSums wide{std::vector<double>(W, 0.0), std::vector<double>(W, 0.0)};  // per wide channel
  std::vector<double> dl(W, 0.0), dout(W, 0.0);  // the quantizer's sums, per channel (then in channel order)
  std::vector<A> run1(W, A(0)), run2(W, A(0));  // channels innermost: the current run of rows' sums
  const auto& kern = cpu::kernels<T>();
  // Pass 1: gz = act'(z) * g_s into grad_y (g_s = dBatchQuant/ds * g exact in T, plus g_act rounded to
  // T as autograd sums the two), and the per-channel sums.
  for_bn_act_segments<kAct>(Lw, y, res, afw, [&](int64_t off, int64_t n, int64_t c, bool per_elem, const A* z,
                                                 const T* s) {
    T* __restrict gz = grad_y + off;
    if (quantize) {
      const cpu::BQChunkSums q = kern.bq_backward(g + off, s, gz, n, p);
      dl[c] += q.dl;
      dout[c] += q.dout;
    } else {
      std::copy_n(g + off, n, gz);
    }
    if (g_act != nullptr) add_segment<T, A>(gz, g_act + off, n);
    if (grad_res != nullptr) std::copy_n(gz, n, grad_res + off);
    act_bwd_segment<kAct, T, A>(z, gz, n);
    if (per_elem) {  // channels innermost: this row's terms into the channels' run sums (see run_sums)
      A* __restrict r1 = run1.data() + c;
      A* __restrict r2 = run2.data() + c;
      const A* __restrict m = afw.mean.data() + c;
      const T* __restrict py = y + off;
      int64_t j = 0;
      if constexpr (kVec16<T>) {
        for (; j + 8 <= n; j += 8) {
          const vf8 v = load16(gz + j);
          store_f8(r1 + j, load_f8(r1 + j) + v);
          store_f8(r2 + j, load_f8(r2 + j) + v * (load16(py + j) - load_f8(m + j)));
        }
      }
      for (; j < n; ++j) {
        const A v = widen<A>(gz[j]);
        r1[j] += v;
        r2[j] += v * (widen<A>(py[j]) - m[j]);
      }
      const int64_t row = off / W;
      if ((row + 1) % kFloatRun == 0 || row + 1 == Lw.outer) {  // the run ends: fold it
        double* __restrict s1 = wide.s1.data() + c;
        double* __restrict s2 = wide.s2.data() + c;
        for (int64_t j = 0; j < n; ++j) {
          s1[j] += static_cast<double>(r1[j]);
          s2[j] += static_cast<double>(r2[j]);
          r1[j] = r2[j] = A(0);
        }
      }
      return;
    }
    run_sums<T, A>(gz, y + off, A(0), afw.mean[c], n, &wide.s1[c], &wide.s2[c]);
  });
  BwdSums sums{std::vector<double>(C, 0.0), std::vector<double>(C, 0.0)};
  for (int64_t c = 0; c < W; ++c) {  // fold the replicas, in order
    sums.s1[c % C] += wide.s1[c];
    sums.s2[c % C] += wide.s2[c];
    sums.dl += dl[c];
    sums.dout += dout[c];
  }
  // Pass 2: grad_y = k * gz - k * mean(gz) - (y - mean) * k * invstd^2 * mean(gz * (y - mean)) (batch
  // statistics); k * gz with running statistics (constants).
  const double count = static_cast<double>(L.outer * L.inner);
  std::vector<A> c1(C, A(0)), c2(C, A(0));
  if (args.batch_stats) {
    for (int64_t c = 0; c < C; ++c) {
      const double k = static_cast<double>(af.k[c]);
      c1[c] = static_cast<A>(k * sums.s1[c] / count);
      c2[c] = static_cast<A>(k * af.invstd[c] * af.invstd[c] * sums.s2[c] / count);
    }
  }
  if (r > 1) {
    c1 = tiled(c1, r);
    c2 = tiled(c2, r);
  }
  parallel_channels(Lw, [&](int64_t c0, int64_t c1_) {
    for_segments(Lw, c0, c1_, [&](int64_t off, int64_t n, int64_t c, bool per_elem) {
      T* __restrict gz = grad_y + off;
      const T* __restrict py = y + off;
      int64_t j = 0;
      if (per_elem) {
        if constexpr (kVec16<T>) {
          for (; j + 8 <= n; j += 8) {
            const vf8 d = load16(py + j) - load_f8(afw.mean.data() + c + j);
            store16(gz + j, load_f8(afw.k.data() + c + j) * load16(gz + j) - load_f8(c1.data() + c + j) -
                                   d * load_f8(c2.data() + c + j));
          }
        }
        for (; j < n; ++j) {
          const A d = widen<A>(py[j]) - afw.mean[c + j];
          gz[j] = narrow<T>(afw.k[c + j] * widen<A>(gz[j]) - c1[c + j] - d * c2[c + j]);
        }
        return;
      }
      const A k = afw.k[c], a1 = c1[c], a2 = c2[c], m = afw.mean[c];
      if constexpr (kVec16<T>) {
        const vf8 kv = splat8(k), a1v = splat8(a1), a2v = splat8(a2), mv = splat8(m);
        for (; j + 8 <= n; j += 8) {
          store16(gz + j, kv * load16(gz + j) - a1v - (load16(py + j) - mv) * a2v);
        }
      }
      for (; j < n; ++j) {
        gz[j] = narrow<T>(k * widen<A>(gz[j]) - a1 - (widen<A>(py[j]) - m) * a2);
      }
    });
  });
  return sums;
}

}  // namespace BQ_EPI_ISA
