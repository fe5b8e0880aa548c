// The fused epilogue's kernels (csrc/cpu/epilogue_cpu.cpp), included once per instruction set
// with BQ_EPI_ISA naming the namespace of that instance. Not a normal header: no include guard, no
// includes (the including file has included everything first, for the baseline target).
#ifndef BQ_EPI_ISA
#error "define BQ_EPI_ISA before including epilogue_kernels_impl.h"
#endif

namespace BQ_EPI_ISA {

// v rounded to T where the composition stores a T (16-bit inputs); a no-op for float32 / float64.
template <typename T, typename A>
inline A round_to(A v) {
  if constexpr (sizeof(T) == 2) {
    return static_cast<A>(static_cast<T>(v));
  } else {
    return v;
  }
}

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

// gz = act'(z) * gz over a segment, in place. float h_swish in GCC vector types: the generic loop's
// division under a condition (it may trap) keeps GCC from vectorizing it, and it was the slowest loop
// of the backward. The middle branch is computed everywhere and selected: the same bits, NaN included.
template <int64_t kAct, typename T, typename A>
inline void act_bwd_segment(const A* __restrict z, T* __restrict gz, int64_t n) {
  int64_t j = 0;
  if constexpr (kAct == kHSwish && std::is_same_v<T, float>) {
    using vf8 = float __attribute__((vector_size(32)));
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
  for (; j < n; ++j) gz[j] = static_cast<T>(round_to<T>(act_bwd<kAct>(z[j], static_cast<A>(gz[j]))));
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

// Sums of v[j] and v[j] * (w[j] - m) over a segment, in kLanes double accumulators (the fixed inner
// loop vectorizes), added to *s1 and *s2.
template <typename T, typename A>
inline void lane_sums(const T* __restrict v, const T* __restrict w, double m, int64_t n, double* s1, double* s2) {
  std::array<double, kLanes> l1{}, l2{};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double a = static_cast<double>(static_cast<A>(v[j + l]));
      l1[l] += a;
      l2[l] += a * (static_cast<double>(static_cast<A>(w[j + l])) - m);
    }
  }
  for (; j < n; ++j) {
    const double a = static_cast<double>(static_cast<A>(v[j]));
    l1[0] += a;
    l2[0] += a * (static_cast<double>(static_cast<A>(w[j])) - m);
  }
  for (int l = 0; l < kLanes; ++l) {
    *s1 += l1[l];
    *s2 += l2[l];
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
  if (per_elem) {
    const A* __restrict m = af.mean.data() + c;
    const A* __restrict k = af.k.data() + c;
    const A* __restrict b = af.b.data() + c;
    for (int64_t j = 0; j < n; ++j) {
      z[j] = bn_elem<T>(static_cast<A>(y[j]), m[j], k[j], b[j]);
      a[j] = static_cast<T>(act_fwd<kAct>(z[j]));
    }
  } else {
    const A mc = af.mean[c], kc = af.k[c], bc = af.b[c];
    for (int64_t j = 0; j < n; ++j) {
      z[j] = bn_elem<T>(static_cast<A>(y[j]), mc, kc, bc);
      a[j] = static_cast<T>(act_fwd<kAct>(z[j]));
    }
  }
}

// Runs f(off, n, c, per_elem, z, a) on every segment of y (channel blocks in parallel) with the
// segment's BN output z and activation a computed in local buffers.
template <int64_t kAct, typename T, typename A, typename F>
void for_bn_act_segments(const Layout& L, const T* y, const Affine<A>& af, const F& f) {
  parallel_channels(L, [&](int64_t c0, int64_t c1) {
    std::array<A, kSeg> z;
    std::array<T, kSeg> a;
    for_segments(L, c0, c1, [&](int64_t off, int64_t n, int64_t c, bool per_elem) {
      bn_act_segment<kAct, T, A>(y + off, n, af, c, per_elem, z.data(), a.data());
      f(off, n, c, per_elem, z.data(), a.data());
    });
  });
}

// ----------------------------------------------------------------------------- forward

constexpr int64_t kTile = 8;  // channels per register tile (channels-innermost statistics)

// Shifted sums, min and max of W adjacent channels over `rows` rows `stride` elements apart. Plain
// selects (vectorized); a NaN, which they may skip, makes the channel's sum NaN, and then its min/max.
template <typename T, typename A, int W>
void stats_tile(const T* __restrict y, int64_t rows, int64_t stride, const double* shift, double* s, double* q,
                A* mn, A* mx) {
  std::array<double, W> ls{}, lq{}, sh;
  std::array<A, W> lmn, lmx;
  for (int l = 0; l < W; ++l) {
    sh[l] = shift[l];
    lmn[l] = mn[l];
    lmx[l] = mx[l];
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict p = y + r * stride;
    for (int l = 0; l < W; ++l) {
      const A v = static_cast<A>(p[l]);
      const double d = static_cast<double>(v) - sh[l];
      ls[l] += d;
      lq[l] += d * d;
      lmn[l] = v < lmn[l] ? v : lmn[l];
      lmx[l] = v > lmx[l] ? v : lmx[l];
    }
  }
  for (int l = 0; l < W; ++l) {
    s[l] += ls[l];
    q[l] += lq[l];
    const bool nan = ls[l] != ls[l];
    mn[l] = nan ? static_cast<A>(ls[l]) : lmn[l];
    mx[l] = nan ? static_cast<A>(ls[l]) : lmx[l];
  }
}

// float32, 8 channels: the same operations in GCC vector types (the compiler's SLP pass does not
// vectorize the generic form's float -> double mix).
using vf4 = float __attribute__((vector_size(16)));
using vd4 = double __attribute__((vector_size(32)));

template <>
void stats_tile<float, float, 8>(const float* __restrict y, int64_t rows, int64_t stride, const double* shift,
                                 double* s, double* q, float* mn, float* mx) {
  vd4 s0{}, s1{}, q0{}, q1{}, h0, h1;
  vf4 mn0, mn1, mx0, mx1;
  std::memcpy(&h0, shift, sizeof(h0));
  std::memcpy(&h1, shift + 4, sizeof(h1));
  std::memcpy(&mn0, mn, sizeof(mn0));
  std::memcpy(&mn1, mn + 4, sizeof(mn1));
  std::memcpy(&mx0, mx, sizeof(mx0));
  std::memcpy(&mx1, mx + 4, sizeof(mx1));
  for (int64_t r = 0; r < rows; ++r) {
    vf4 v0, v1;
    std::memcpy(&v0, y + r * stride, sizeof(v0));
    std::memcpy(&v1, y + r * stride + 4, sizeof(v1));
    const vd4 d0 = __builtin_convertvector(v0, vd4) - h0;
    const vd4 d1 = __builtin_convertvector(v1, vd4) - h1;
    s0 += d0;
    s1 += d1;
    q0 += d0 * d0;
    q1 += d1 * d1;
    mn0 = v0 < mn0 ? v0 : mn0;
    mn1 = v1 < mn1 ? v1 : mn1;
    mx0 = v0 > mx0 ? v0 : mx0;
    mx1 = v1 > mx1 ? v1 : mx1;
  }
  for (int l = 0; l < 4; ++l) {
    const double sums[2] = {s0[l], s1[l]};
    for (int h = 0; h < 2; ++h) {
      const int i = l + 4 * h;
      s[i] += sums[h];
      q[i] += h == 0 ? q0[l] : q1[l];
      const bool nan = sums[h] != sums[h];
      mn[i] = nan ? static_cast<float>(sums[h]) : (h == 0 ? mn0[l] : mn1[l]);
      mx[i] = nan ? static_cast<float>(sums[h]) : (h == 0 ? mx0[l] : mx1[l]);
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
  if (L.inner == 1) {  // channels innermost: tiles of kTile channels down all rows, sums in registers
    parallel_channels(L, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; c += kTile) {
        if (c + kTile <= c1) {
          stats_tile<T, A, kTile>(y + c, L.outer, C, &shift[c], &s[c], &q[c], mn + c, mx + c);
        } else {
          for (int64_t t = c; t < c1; ++t) {
            stats_tile<T, A, 1>(y + t, L.outer, C, &shift[t], &s[t], &q[t], mn + t, mx + t);
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
      std::array<double, kLanes> ls{}, lq{};
      const double sh = shift[c];
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const double d = static_cast<double>(static_cast<A>(p[j + l])) - sh;
          ls[l] += d;
          lq[l] += d * d;
        }
      }
      for (; j < n; ++j) {
        const double d = static_cast<double>(static_cast<A>(p[j])) - sh;
        ls[0] += d;
        lq[0] += d * d;
      }
      for (int l = 0; l < kLanes; ++l) {
        s[c] += ls[l];
        q[c] += lq[l];
      }
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

// Per-channel min / max of the activated values (h_swish: not monotone, so one more read), which are
// stored in `a_out` (the output's memory): the quantizing pass then reads them instead of recomputing
// BN and the activation (a division per element for h_swish, the CPU's bottleneck here).
template <int64_t kAct, typename T, typename A>
void activated_minmax(const Layout& L, const T* y, const Affine<A>& af, A* amin, A* amax, T* a_out) {
  for (int64_t c = 0; c < L.C; ++c) {
    amin[c] = std::numeric_limits<A>::infinity();
    amax[c] = -std::numeric_limits<A>::infinity();
  }
  const auto& kern = cpu::kernels<T>();
  for_bn_act_segments<kAct>(L, y, af, [&](int64_t off, int64_t n, int64_t c, bool per_elem, const A*, const T* a) {
    std::copy_n(a, n, a_out + off);
    if (per_elem) {
      A* __restrict mnc = amin + c;
      A* __restrict mxc = amax + c;
      for (int64_t j = 0; j < n; ++j) {
        mnc[j] = vmin(mnc[j], static_cast<A>(a[j]));
        mxc[j] = vmax(mxc[j], static_cast<A>(a[j]));
      }
      return;
    }
    A lo, hi;
    kern.row_minmax(a, 1, n, n, &lo, &hi);
    amin[c] = nan_min(amin[c], lo);
    amax[c] = nan_max(amax[c], hi);
  });
}


template <int64_t kAct, typename T>
void forward_impl(const Layout& L, const FwdArgs& args, at::Tensor& out, at::Tensor& stats, at::Tensor& qparams) {
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
  A* qp = qparams.data_ptr<A>();
  T* po = out.data_ptr<T>();
  bool a_in_out = false;  // whether `out` holds the activation already (activated_minmax)
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
      if (kAct == kHSwish || !args.batch_stats) {
        activated_minmax<kAct, T, A>(L, y, af, amin.data(), amax.data(), po);
        a_in_out = true;
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
  if (a_in_out) {  // quantize the stored activation in place
    at::parallel_for(0, L.x.numel(), cpu::kMinParallelElems, [&](int64_t i0, int64_t i1) {
      kern.bq_forward(po + i0, po + i0, i1 - i0, p);
    });
    return;
  }
  for_bn_act_segments<kAct>(L, y, af, [&](int64_t off, int64_t n, int64_t, bool, const A*, const T* a) {
    if (quantize) {
      kern.bq_forward(a, po + off, n, p);
    } else {
      std::copy_n(a, n, po + off);
    }
  });
}

// ----------------------------------------------------------------------------- backward



template <int64_t kAct, typename T>
BwdSums backward_impl(const Layout& L, const T* g, const BwdArgs& args, const at::Tensor& stats,
                      const at::Tensor& qparams, T* grad_y) {
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
  BwdSums sums{std::vector<double>(C, 0.0), std::vector<double>(C, 0.0)};
  std::vector<double> dl(C, 0.0), dout(C, 0.0);  // the quantizer's sums, per channel (then in channel order)
  const auto& kern = cpu::kernels<T>();
  // Pass 1: gz = act'(z) * dBatchQuant/da * g into grad_y (exact in T), and the per-channel sums.
  for_bn_act_segments<kAct>(L, y, af, [&](int64_t off, int64_t n, int64_t c, bool per_elem, const A* z, const T* a) {
    T* __restrict gz = grad_y + off;
    if (quantize) {
      const cpu::BQChunkSums q = kern.bq_backward(g + off, a, gz, n, p);
      dl[c] += q.dl;
      dout[c] += q.dout;
    } else {
      std::copy_n(g + off, n, gz);
    }
    act_bwd_segment<kAct, T, A>(z, gz, n);
    if (per_elem) {
      double* __restrict s1 = sums.s1.data() + c;
      double* __restrict s2 = sums.s2.data() + c;
      const A* __restrict m = af.mean.data() + c;
      const T* __restrict py = y + off;
      for (int64_t j = 0; j < n; ++j) {
        const double v = static_cast<double>(static_cast<A>(gz[j]));
        s1[j] += v;
        s2[j] += v * (static_cast<double>(static_cast<A>(py[j])) - static_cast<double>(m[j]));
      }
      return;
    }
    lane_sums<T, A>(gz, y + off, static_cast<double>(af.mean[c]), n, &sums.s1[c], &sums.s2[c]);
  });
  for (int64_t c = 0; c < C; ++c) {
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
  parallel_channels(L, [&](int64_t c0, int64_t c1_) {
    for_segments(L, c0, c1_, [&](int64_t off, int64_t n, int64_t c, bool per_elem) {
      T* __restrict gz = grad_y + off;
      const T* __restrict py = y + off;
      if (per_elem) {
        for (int64_t j = 0; j < n; ++j) {
          const A d = static_cast<A>(py[j]) - af.mean[c + j];
          gz[j] = static_cast<T>(af.k[c + j] * static_cast<A>(gz[j]) - c1[c + j] - d * c2[c + j]);
        }
        return;
      }
      const A k = af.k[c], a1 = c1[c], a2 = c2[c], m = af.mean[c];
      for (int64_t j = 0; j < n; ++j) {
        gz[j] = static_cast<T>(k * static_cast<A>(gz[j]) - a1 - (static_cast<A>(py[j]) - m) * a2);
      }
    });
  });
  return sums;
}

}  // namespace BQ_EPI_ISA
