// SplitQuant CPU kernel: least-squares range fitting (QuantSpec(fit="mse")), one pass per round per line.
//
// Compiled into the same library as splitquant_cpu.cpp (see _build.py, -ffp-contract=off). The same
// rounds as core/quantize.py's _fit_mse, with the same operations in the same order, so both give the
// same bits: per line (one row, or one range group of a row) and cluster j, sums over the members in
// element order, in double,
//     n, sum c, sum w, sum c*c, sum c*w           (c = code, w = weight as double)
//     scale  = var > 0 ? (n*scw - sc*sw) / var : old scale,   var = n*scc - sc*sc;  scale = scale > 0 ? scale : 0
//     offset = n > 0 ? (sw - scale*sc) / max(n, 1) : old offset
// rounded to the storage dtype through float (as torch's double -> half / bfloat16 copy does); then
// every weight moves to the nearest level offset[j] + code * scale[j] over all clusters j of its line
// (fp32 arithmetic, round half to even, lowest j on ties).
// fit_mse_starts runs those rounds from several starting ranges per line (core/quantize.py's
// FIT_STARTS search): nearest codes in each weight's own cluster, `trial` rounds, the start with the
// least squared error (a running double sum in element order; the first on ties), then the rest.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

// Nearest code of `steps` in [0, top], ties to even: torch's round() then clamp(0, top). Clamped to
// [-1, top + 1] first (the same result after the final clamp), where adding and subtracting 1.5 * 2^23
// rounds to an integer in float arithmetic (round-to-nearest-even mode). (GCC keeps the clamps as
// branches under its default trapping math, so the loops calling it run scalar.)
inline float nearest_code(float steps, float top) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const float bounded = std::min(std::max(steps, -1.0f), top + 1.0f);
  const float rounded = (bounded + magic) - magic;
  return std::min(std::max(rounded, 0.0f), top);
}

// Nearest codes of a line with one range (k == 1), as assign_line computes them.
inline void codes_line(const float* __restrict wl, float* __restrict cl, int64_t g, float o, float s, float top) {
  const float ok = s > 0 ? 1.0f : 0.0f, div = s > 0 ? s : 1.0f;
  for (int64_t i = 0; i < g; ++i) cl[i] = nearest_code(ok * ((wl[i] - o) / div), top);
}

// Nearest codes of a line in each weight's own cluster (k > 1).
void own_cluster_codes(const float* __restrict wl, const int64_t* __restrict il, float* __restrict cl,
                       int64_t g, const float* of, const float* sf, float top) {
  for (int64_t i = 0; i < g; ++i) {
    const float o = of[il[i]], s = sf[il[i]];
    cl[i] = nearest_code((s > 0 ? 1.0f : 0.0f) * ((wl[i] - o) / (s > 0 ? s : 1.0f)), top);
  }
}

// Every weight of a line to its nearest level over the k clusters, cluster by cluster (selects as
// arithmetic; the strict `<` keeps the lowest j on ties). The cluster goes to bj as a float.
void assign_line(const float* __restrict wl, float* __restrict cl, float* __restrict be, float* __restrict bj,
                 int64_t g, const float* off, const float* sca, int64_t k, float top) {
  for (int64_t j = 0; j < k; ++j) {
    const float o = off[j], s = sca[j];
    const float ok = s > 0 ? 1.0f : 0.0f;
    const float div = s > 0 ? s : 1.0f;
    const float jf = static_cast<float>(j);
    if (j == 0) {
      for (int64_t i = 0; i < g; ++i) {
        const float x = wl[i];
        const float code = nearest_code(ok * ((x - o) / div), top);
        be[i] = std::fabs(x - (o + code * s));
        cl[i] = code;
        bj[i] = 0.0f;
      }
      continue;
    }
    for (int64_t i = 0; i < g; ++i) {
      const float x = wl[i];
      const float code = nearest_code(ok * ((x - o) / div), top);
      const float err = std::fabs(x - (o + code * s));
      // Selects as arithmetic (exact: codes and cluster numbers are small integers), not a branch.
      const float better = err < be[i] ? 1.0f : 0.0f;
      be[i] = std::min(be[i], err);
      cl[i] += better * (code - cl[i]);
      bj[i] += better * (jf - bj[i]);
    }
  }
}

// Scratch space of one thread: per-cluster sums and ranges, per-weight best error and cluster.
struct Scratch {
  std::vector<double> n, sc, sw, scc, scw;
  std::vector<float> off, sca, best_err, best_j;
  Scratch(int64_t k, int64_t g) : n(k), sc(k), sw(k), scc(k), scw(k), off(k), sca(k), best_err(g), best_j(g) {}
};

// `iters` refit / reassign rounds of one line (see the top of the file), in place.
template <class T>
void fit_rounds(const float* wl, int64_t* il, float* cl, T* ol, T* sl, int64_t g, int64_t k, float top, int64_t iters,
                Scratch& t, std::atomic<bool>& overflow) {
  for (int64_t it = 0; it < iters; ++it) {
    if (k == 1) {  // one slot: the same sums in the same order, without the indexing
      double n0 = 0.0, sc0 = 0.0, sw0 = 0.0, scc0 = 0.0, scw0 = 0.0;
      for (int64_t i = 0; i < g; ++i) {
        const double c = static_cast<double>(cl[i]);
        const double x = static_cast<double>(wl[i]);
        n0 += 1.0;
        sc0 += c;
        sw0 += x;
        scc0 += c * c;
        scw0 += c * x;
      }
      t.n[0] = n0, t.sc[0] = sc0, t.sw[0] = sw0, t.scc[0] = scc0, t.scw[0] = scw0;
    } else {
      std::fill(t.n.begin(), t.n.end(), 0.0);
      std::fill(t.sc.begin(), t.sc.end(), 0.0);
      std::fill(t.sw.begin(), t.sw.end(), 0.0);
      std::fill(t.scc.begin(), t.scc.end(), 0.0);
      std::fill(t.scw.begin(), t.scw.end(), 0.0);
      for (int64_t i = 0; i < g; ++i) {
        const int64_t j = il[i];
        const double c = static_cast<double>(cl[i]);
        const double x = static_cast<double>(wl[i]);
        t.n[j] += 1.0;
        t.sc[j] += c;
        t.sw[j] += x;
        t.scc[j] += c * c;
        t.scw[j] += c * x;
      }
    }
    for (int64_t j = 0; j < k; ++j) {
      const double var = t.n[j] * t.scc[j] - t.sc[j] * t.sc[j];
      double s = var > 0 ? (t.n[j] * t.scw[j] - t.sc[j] * t.sw[j]) / var : static_cast<double>(static_cast<float>(sl[j]));
      s = s > 0 ? s : 0.0;
      const double o = t.n[j] > 0 ? (t.sw[j] - s * t.sc[j]) / std::max(t.n[j], 1.0)
                                  : static_cast<double>(static_cast<float>(ol[j]));
      const T sv(static_cast<float>(s)), ov(static_cast<float>(o));  // rounded as torch's double -> T copy
      sl[j] = sv;
      ol[j] = ov;
      t.sca[j] = static_cast<float>(sv);
      t.off[j] = static_cast<float>(ov);
      if (!std::isfinite(t.sca[j]) || !std::isfinite(t.off[j])) overflow = true;
    }
    if (k == 1) {  // one range: every weight keeps cluster 0, only its code moves
      codes_line(wl, cl, g, t.off[0], t.sca[0], top);
      continue;
    }
    assign_line(wl, cl, t.best_err.data(), t.best_j.data(), g, t.off.data(), t.sca.data(), k, top);
    for (int64_t i = 0; i < g; ++i) il[i] = static_cast<int64_t>(t.best_j[i]);
  }
}

// Stored ranges as float (exact: every storage dtype widens to float).
template <class T>
inline void as_float(const T* off, const T* sca, float* of, float* sf, int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    of[j] = static_cast<float>(off[j]);
    sf[j] = static_cast<float>(sca[j]);
  }
}

// Several starting ranges per line (starts x lines x k): each start's codes are the nearest ones of
// every weight in its own cluster, then `trial` rounds; the start with the least squared error
// (double, summed in element order; the first on ties) gets the remaining `iters - trial` rounds.
template <class T>
void fit_lines_starts(const float* w, const int64_t* ids0, const T* offsets, const T* scales, int64_t starts,
                      int64_t* ids, float* codes, T* offset, T* scale, int64_t lines, int64_t g, int64_t k,
                      int64_t levels, int64_t trial, int64_t iters, std::atomic<bool>& overflow) {
  const float top = static_cast<float>(levels - 1);
  at::parallel_for(0, lines, std::max<int64_t>(1, 16384 / std::max<int64_t>(g, 1)), [&](int64_t l0, int64_t l1) {
    Scratch t(k, g);
    std::vector<int64_t> il(g);
    std::vector<float> cl(g);
    std::vector<T> ol(k), sl(k);
    std::vector<float> of(k), sf(k);  // ol, sl as float, converted once per use rather than per weight
    for (int64_t l = l0; l < l1; ++l) {
      const float* wl = w + l * g;
      double best = 0.0;
      for (int64_t st = 0; st < starts; ++st) {
        const T* o0 = offsets + (st * lines + l) * k;
        const T* s0 = scales + (st * lines + l) * k;
        std::copy(o0, o0 + k, ol.begin());
        std::copy(s0, s0 + k, sl.begin());
        std::copy(ids0 + l * g, ids0 + (l + 1) * g, il.begin());
        as_float(ol.data(), sl.data(), of.data(), sf.data(), k);
        if (k == 1) {  // one range: the same arithmetic without the per-weight look-up
          codes_line(wl, cl.data(), g, of[0], sf[0], top);
        } else {
          own_cluster_codes(wl, il.data(), cl.data(), g, of.data(), sf.data(), top);
        }
        fit_rounds(wl, il.data(), cl.data(), ol.data(), sl.data(), g, k, top, trial, t, overflow);
        as_float(ol.data(), sl.data(), of.data(), sf.data(), k);
        double err = 0.0;
        for (int64_t i = 0; i < g; ++i) {
          const int64_t j = k == 1 ? 0 : il[i];
          const double d = static_cast<double>(wl[i] - (of[j] + cl[i] * sf[j]));
          err += d * d;
        }
        if (st == 0 || err < best) {
          best = err;
          std::copy(il.begin(), il.end(), ids + l * g);
          std::copy(cl.begin(), cl.end(), codes + l * g);
          std::copy(ol.begin(), ol.end(), offset + l * k);
          std::copy(sl.begin(), sl.end(), scale + l * k);
        }
      }
      fit_rounds(wl, ids + l * g, codes + l * g, offset + l * k, scale + l * k, g, k, top, iters - trial, t, overflow);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fit_mse_starts_cpu(const at::Tensor& w, const at::Tensor& ids,
                                                                              const at::Tensor& offsets,
                                                                              const at::Tensor& scales, int64_t bits,
                                                                              int64_t trial, int64_t iters) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "w must be a float32 (lines, g) tensor");
  TORCH_CHECK(ids.sizes() == w.sizes() && ids.scalar_type() == at::kLong, "ids must be int64 of w's shape");
  TORCH_CHECK(offsets.dim() == 3 && offsets.size(0) >= 1 && offsets.size(1) == w.size(0) &&
                  scales.sizes() == offsets.sizes(),
              "offsets and scales must be (starts, lines, k)");
  TORCH_CHECK(offsets.scalar_type() == scales.scalar_type(), "offsets and scales must share a dtype");
  TORCH_CHECK(bits >= 1 && bits <= 16 && trial >= 0 && iters >= trial, "bad bits or rounds");
  const int64_t starts = offsets.size(0), lines = w.size(0), g = w.size(1), k = offsets.size(2);
  const at::Tensor wc = w.contiguous(), ids0 = ids.contiguous(), oc = offsets.contiguous(), sc = scales.contiguous();
  if (ids0.numel()) {
    const auto mm = ids0.aminmax();
    TORCH_CHECK(std::get<0>(mm).item<int64_t>() >= 0 && std::get<1>(mm).item<int64_t>() < k, "ids out of range");
  }
  at::Tensor ids_out = at::empty_like(ids0);
  at::Tensor codes_out = at::empty_like(wc);
  at::Tensor off_out = at::empty({lines, k}, oc.options());
  at::Tensor scale_out = at::empty({lines, k}, oc.options());
  std::atomic<bool> overflow{false};
  const int64_t levels = int64_t{1} << bits;
  if (lines && g && k) {
    switch (oc.scalar_type()) {
#define SQ_FIT_STARTS(TYPE)                                                                                        \
  fit_lines_starts(wc.data_ptr<float>(), ids0.data_ptr<int64_t>(), oc.data_ptr<TYPE>(), sc.data_ptr<TYPE>(), starts, \
                   ids_out.data_ptr<int64_t>(), codes_out.data_ptr<float>(), off_out.data_ptr<TYPE>(),              \
                   scale_out.data_ptr<TYPE>(), lines, g, k, levels, trial, iters, overflow)
      case at::kHalf:
        SQ_FIT_STARTS(c10::Half);
        break;
      case at::kBFloat16:
        SQ_FIT_STARTS(c10::BFloat16);
        break;
      case at::kFloat:
        SQ_FIT_STARTS(float);
        break;
#undef SQ_FIT_STARTS
      default:
        TORCH_CHECK(false, "offsets and scales must be float16, bfloat16 or float32");
    }
  } else {
    ids_out.copy_(ids0);
    codes_out.zero_();
    off_out.copy_(oc[0]);
    scale_out.copy_(sc[0]);
  }
  TORCH_CHECK(!overflow, "fitted ranges overflow the storage dtype");
  return {ids_out, codes_out, off_out, scale_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_splitquant, m) {
  m.def("fit_mse_starts(Tensor w, Tensor ids, Tensor offsets, Tensor scales, int bits, int trial, int iters) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(optimum_splitquant, CPU, m) {
  m.impl("fit_mse_starts", &fit_mse_starts_cpu);
}
