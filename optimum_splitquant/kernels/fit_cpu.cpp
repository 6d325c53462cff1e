// SplitQuant CPU kernel: least-squares range fitting (QuantSpec(fit="mse")), one pass per round per line.
//
// Compiled into the same library as splitquant_cpu.cpp (see _build.py, -ffp-contract=off). The same
// rounds as core/quantize.py's _fit_mse, with the same operations in the same order, so both give the
// same bits: per line (one row, or one range group of a row) and cluster j, sums over the members in
// double, each split over LANES running sums (element i goes to lane i % LANES, in element order) that
// are then added pairwise, ((lane 0 + lane 1) + (lane 2 + lane 3)) + ((4 + 5) + (6 + 7)): independent
// chains that pipeline and vectorize,
//     n, sum c, sum w, sum c*c, sum c*w           (c = code, w = weight as double)
//     scale  = var > 0 ? (n*scw - sc*sw) / var : old scale,   var = n*scc - sc*sc;  scale = scale > 0 ? scale : 0
//     offset = n > 0 ? (sw - scale*sc) / max(n, 1) : old offset
// rounded to the storage dtype through float (as torch's double -> half / bfloat16 copy does); then
// every weight moves to the nearest level offset[j] + code * scale[j] over all clusters j of its line
// (fp32 arithmetic, round half to even, lowest j on ties).
// fit_mse_starts runs those rounds from several starting ranges per line (core/quantize.py's
// FIT_STARTS search): nearest codes in each weight's own cluster, `trial` rounds, the start with the
// least squared error (a double sum over the same lanes; the first on ties), then the rest.
// line_errors gives the squared error of every line on the nearest levels of each of several candidate
// ranges (core/fit.py's _line_errors, one range per line): float32 errors (w - o) - code * s, squared
// and summed in double over the same lanes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SQ_FIT_F16C 1
#endif

namespace {

constexpr int64_t LANES = 8;  // running sums per total (core/quantize.py's SUM_LANES)

inline double lanes_total(const double* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// On x86-64 Linux the per-weight loops of the fit (the one-range block fit, the reassignment and sums of
// several clusters) are also compiled for AVX2 and picked at run time (the same operations, hence the
// same bits, on wider vectors).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SQ_WIDE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SQ_WIDE_CLONES
#endif
#define SQ_INLINE inline __attribute__((always_inline))

// Adding and subtracting 1.5 * 2^23 rounds a float in [0, 2^22] to an integer, ties to even.
constexpr float ROUND_MAGIC = 12582912.0f;

// Nearest code of `steps` in [0, top], ties to even: torch's round() then clamp(0, top), as clamp then
// round (the same value: 0 and top are integers) with ROUND_MAGIC (round-to-nearest-even mode). (The
// clamps become min / max instructions, and the loops calling it vectorize, under -fno-trapping-math:
// see _build.py.)
SQ_INLINE float nearest_code(float steps, float top) {
  return (std::min(std::max(steps, 0.0f), top) + ROUND_MAGIC) - ROUND_MAGIC;
}

// Nearest codes of a line with one range (k == 1), as assign_line computes them.
SQ_INLINE void codes_line(const float* __restrict wl, float* __restrict cl, int64_t g, float o, float s, float top) {
  const float ok = s > 0 ? 1.0f : 0.0f, div = s > 0 ? s : 1.0f;
  for (int64_t i = 0; i < g; ++i) cl[i] = nearest_code(ok * ((wl[i] - o) / div), top);
}

// Nearest codes of a line in each weight's own cluster (k > 1).
SQ_WIDE_CLONES void own_cluster_codes(const float* __restrict wl, const int64_t* __restrict il,
                                      float* __restrict cl, int64_t g, const float* of, const float* sf, float top) {
  for (int64_t i = 0; i < g; ++i) {
    const float o = of[il[i]], s = sf[il[i]];
    cl[i] = nearest_code((s > 0 ? 1.0f : 0.0f) * ((wl[i] - o) / (s > 0 ? s : 1.0f)), top);
  }
}

// Eight floats as one vector (one AVX register, two SSE ones).
typedef float vec8f __attribute__((vector_size(8 * sizeof(float))));
typedef int32_t vec8i __attribute__((vector_size(8 * sizeof(int32_t))));
typedef int64_t vec8l __attribute__((vector_size(8 * sizeof(int64_t))));

// out = mask ? a : b, lane by lane (mask lanes all ones or all zeros, as comparisons give them). (Wide
// vectors pass by reference: by value they would change the calling convention without AVX.)
SQ_INLINE void pick(vec8f& out, const vec8i& mask, const vec8f& a, const vec8f& b) {
  vec8i ia, ib;
  std::memcpy(&ia, &a, sizeof(ia));
  std::memcpy(&ib, &b, sizeof(ib));
  const vec8i r = (ia & mask) | (ib & ~mask);
  std::memcpy(&out, &r, sizeof(out));
}

// Every weight of a line to its nearest level over the k clusters, eight weights at a time with their
// best error, code and cluster in registers over the clusters (the strict `<` keeps the lowest j on
// ties): the code to cl, the cluster to il. The same operations per weight as nearest_code.
SQ_WIDE_CLONES void assign_line(const float* __restrict wl, float* __restrict cl, int64_t* __restrict il, int64_t g,
                                const float* off, const float* sca, int64_t k, float top) {
  const vec8i sign = {INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN};
  const vec8f zero = {}, tops = zero + top;
  for (int64_t i = 0; i < g; i += 8) {
    const int64_t n = std::min<int64_t>(8, g - i);
    vec8f x = {};  // a short chunk padded with zeros
    if (n == 8) {
      std::memcpy(&x, wl + i, sizeof(x));
    } else {
      for (int64_t e = 0; e < n; ++e) x[e] = wl[i + e];
    }
    vec8f be = {}, bc = {};
    vec8i bj = {};
    for (int64_t j = 0; j < k; ++j) {
      const float o = off[j], s = sca[j];
      vec8f code = {};
      if (s > 0) {
        const vec8f steps = (x - o) / s;
        vec8f low, high;
        pick(low, steps < zero, zero, steps);
        pick(high, tops < low, tops, low);
        code = (high + ROUND_MAGIC) - ROUND_MAGIC;
      }
      const vec8f diff = x - (o + code * s);
      vec8i bits;
      std::memcpy(&bits, &diff, sizeof(bits));
      bits &= ~sign;  // |diff|
      vec8f err;
      std::memcpy(&err, &bits, sizeof(err));
      if (j == 0) {
        be = err, bc = code;
        continue;
      }
      const vec8i better = err < be;
      pick(be, better, err, be);
      pick(bc, better, code, bc);
      bj = (better & static_cast<int32_t>(j)) | (bj & ~better);
    }
    const vec8l ids = __builtin_convertvector(bj, vec8l);
    if (n == 8) {
      std::memcpy(cl + i, &bc, sizeof(bc));
      std::memcpy(il + i, &ids, sizeof(ids));
    } else {
      for (int64_t e = 0; e < n; ++e) cl[i + e] = bc[e], il[i + e] = ids[e];
    }
  }
}

// Scratch space of one thread: per-cluster totals (cluster_sums), the line as double, ranges as float.
struct Scratch {
  std::vector<double> n, sc, sw, scc, scw;
  std::vector<double> wd, cd;  // the line's weights and codes as double
  std::vector<float> off, sca;
  Scratch(int64_t k, int64_t g) : n(k), sc(k), sw(k), scc(k), scw(k), wd(g), cd(g), off(k), sca(k) {}
};

// Half the lanes as vectors (GCC / clang vector extensions: one AVX register, two SSE ones); lanes
// 0-3 and 4-7 run in two such vectors.
typedef float half_f __attribute__((vector_size(4 * sizeof(float))));
typedef double half_d __attribute__((vector_size(4 * sizeof(double))));
typedef int64_t half_l __attribute__((vector_size(4 * sizeof(int64_t))));
static_assert(LANES == 8, "two vectors of 4 lanes");

SQ_INLINE half_f load4(const float* p) {
  half_f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

SQ_INLINE void store_lanes(double* out, const half_d& lo, const half_d& hi) {
  std::memcpy(out, &lo, sizeof(lo));
  std::memcpy(out + 4, &hi, sizeof(hi));
}

// Lane sums of one line with one range (k == 1): independent chains, vectorized. (The count n is g;
// the sums of codes and squared codes are exact integers, the same in any order.)
SQ_INLINE void sums_line(const float* __restrict wl, const float* __restrict cl, int64_t g, double* __restrict n,
                         double* __restrict sc, double* __restrict sw, double* __restrict scc,
                         double* __restrict scw) {
  half_d c0 = {}, c1 = {}, w0 = {}, w1 = {}, cc0 = {}, cc1 = {}, cw0 = {}, cw1 = {};
  int64_t i = 0;
  for (; i + LANES <= g; i += LANES) {
    const half_d ca = __builtin_convertvector(load4(cl + i), half_d);
    const half_d cb = __builtin_convertvector(load4(cl + i + 4), half_d);
    const half_d xa = __builtin_convertvector(load4(wl + i), half_d);
    const half_d xb = __builtin_convertvector(load4(wl + i + 4), half_d);
    c0 += ca, c1 += cb, w0 += xa, w1 += xb;
    cc0 += ca * ca, cc1 += cb * cb, cw0 += ca * xa, cw1 += cb * xb;
  }
  double tc[LANES], tw[LANES], tcc[LANES], tcw[LANES];
  store_lanes(tc, c0, c1), store_lanes(tw, w0, w1), store_lanes(tcc, cc0, cc1), store_lanes(tcw, cw0, cw1);
  for (int64_t l = 0; i < g; ++i, ++l) {
    const double c = static_cast<double>(cl[i]);
    const double x = static_cast<double>(wl[i]);
    tc[l] += c;
    tw[l] += x;
    tcc[l] += c * c;
    tcw[l] += c * x;
  }
  *n = static_cast<double>(g);
  *sc = lanes_total(tc), *sw = lanes_total(tw), *scc = lanes_total(tcc), *scw = lanes_total(tcw);
}

// Squared error of a line with one range (k == 1) against its levels, over the lanes.
SQ_INLINE double error_line(const float* __restrict wl, const float* __restrict cl, int64_t g, float o, float s) {
  half_d e0 = {}, e1 = {};
  int64_t i = 0;
  for (; i + LANES <= g; i += LANES) {
    const half_d da = __builtin_convertvector(load4(wl + i) - (o + load4(cl + i) * s), half_d);
    const half_d db = __builtin_convertvector(load4(wl + i + 4) - (o + load4(cl + i + 4) * s), half_d);
    e0 += da * da, e1 += db * db;
  }
  double t[LANES];
  store_lanes(t, e0, e1);
  for (int64_t l = 0; i < g; ++i, ++l) {
    const double d = static_cast<double>(wl[i] - (o + cl[i] * s));
    t[l] += d * d;
  }
  return lanes_total(t);
}

// Squared error of a line with k > 1 clusters against its levels, over the same lanes.
inline double error_line(const float* __restrict wl, const int64_t* __restrict il, const float* __restrict cl,
                         int64_t g, const float* of, const float* sf) {
  double acc[LANES] = {};
  for (int64_t i = 0; i < g; ++i) {
    const int64_t j = il[i];
    const double d = static_cast<double>(wl[i] - (of[j] + cl[i] * sf[j]));
    acc[i % LANES] += d * d;
  }
  return lanes_total(acc);
}

// Storage dtype of the ranges, for the one-range path (not a template: see SQ_WIDE_CLONES).
enum class Store { kHalf, kBFloat16, kFloat };

template <class T>
constexpr Store store_of() {
  if constexpr (std::is_same_v<T, c10::Half>) return Store::kHalf;
  if constexpr (std::is_same_v<T, c10::BFloat16>) return Store::kBFloat16;
  return Store::kFloat;
}

// static_cast<float>(c10::Half(v)): v rounded to the nearest half (ties to even), in a few integer and
// float operations instead of a conversion each way. Half normals keep 10 of float's 23 fraction
// bits (rounded in the bits; a carry moves into the exponent); below 2^-14, the multiples of 2^-24
// are float's own rounding steps in [0.5, 1) (adding and subtracting 0.75); past 65504, infinity.
SQ_INLINE float round_to_half(float v) {
  const float a = std::fabs(v);
  float r;
  if (a < 0x1p-14f) {
    r = (a + 0.75f) - 0.75f;
  } else {
    uint32_t u;
    std::memcpy(&u, &a, sizeof(u));
    u = (u + 0x0FFFu + ((u >> 13) & 1u)) & 0xFFFFE000u;
    std::memcpy(&r, &u, sizeof(r));
    if (r > 65504.0f) r = INFINITY;
  }
  return std::copysign(r, v);
}

// `v` rounded to the storage dtype and back (exact on the way back).
SQ_INLINE float stored_as(float v, Store st) {
  switch (st) {
    case Store::kHalf:
      return round_to_half(v);
    case Store::kBFloat16:
      return static_cast<float>(c10::BFloat16(v));
    default:
      return v;
  }
}

// One refit of a line's single range (o, s) to its codes (see the top of the file); false on overflow.
SQ_INLINE bool refit_line(const float* __restrict wl, const float* __restrict cl, int64_t g, float& o, float& s,
                          Store st) {
  double n, sc, sw, scc, scw;
  sums_line(wl, cl, g, &n, &sc, &sw, &scc, &scw);
  const double var = n * scc - sc * sc;
  double sd = var > 0 ? (n * scw - sc * sw) / var : static_cast<double>(s);
  sd = sd > 0 ? sd : 0.0;
  const double od = n > 0 ? (sw - sd * sc) / std::max(n, 1.0) : static_cast<double>(o);
  s = stored_as(static_cast<float>(sd), st);  // through float, as torch's double -> half / bfloat16 copy
  o = stored_as(static_cast<float>(od), st);
  return std::isfinite(s) && std::isfinite(o);
}

// Lines fitted together by fit_block: their independent refits overlap in the pipeline.
constexpr int64_t MAX_BLOCK = 16;

// The whole fit of `nb` <= MAX_BLOCK consecutive lines with one range each (k == 1), the same rounds as
// fit_rounds: `starts` starting ranges per line (o0 / s0 [start * nb + line], values of the storage
// dtype), each with nearest codes and `trial` rounds; each line's start with the least squared error
// (the first on ties) gets `rest` more rounds. Codes to `codes` (tmp: nb * g floats of scratch), ranges
// to o_out / s_out; false if a range overflowed the storage dtype.
SQ_WIDE_CLONES bool fit_block(const float* __restrict w, int64_t nb, int64_t g, const float* o0, const float* s0,
                              int64_t starts, int64_t trial, int64_t rest, float top, Store st,
                              float* __restrict codes, float* __restrict tmp, float* o_out, float* s_out) {
  bool ok = true;
  double best[MAX_BLOCK];
  float o[MAX_BLOCK], s[MAX_BLOCK];
  for (int64_t i = 0; i < starts; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      o[b] = o0[i * nb + b], s[b] = s0[i * nb + b];
      codes_line(w + b * g, tmp + b * g, g, o[b], s[b], top);
    }
    for (int64_t r = 0; r < trial; ++r) {
      for (int64_t b = 0; b < nb; ++b) ok &= refit_line(w + b * g, tmp + b * g, g, o[b], s[b], st);
      for (int64_t b = 0; b < nb; ++b) codes_line(w + b * g, tmp + b * g, g, o[b], s[b], top);
    }
    for (int64_t b = 0; b < nb; ++b) {
      const double err = error_line(w + b * g, tmp + b * g, g, o[b], s[b]);
      if (i == 0 || err < best[b]) {
        best[b] = err, o_out[b] = o[b], s_out[b] = s[b];
        std::copy(tmp + b * g, tmp + (b + 1) * g, codes + b * g);
      }
    }
  }
  for (int64_t r = 0; r < rest; ++r) {
    for (int64_t b = 0; b < nb; ++b) ok &= refit_line(w + b * g, codes + b * g, g, o_out[b], s_out[b], st);
    for (int64_t b = 0; b < nb; ++b) codes_line(w + b * g, codes + b * g, g, o_out[b], s_out[b], top);
  }
  return ok;
}

// v with its lanes outside mask zeroed, in place (mask lanes all ones or all zeros).
SQ_INLINE void keep(half_d& v, const half_l& mask) {
  half_l bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= mask;
  std::memcpy(&v, &bits, sizeof(v));
}

// Per-cluster totals of a line with k > 1 clusters (entry j: cluster j), over the lanes: weights wd and
// codes cd as double. Cluster by cluster over vectors, a non-member adding +0.0 (a running sum that
// starts at +0.0 is never -0.0, so adding +-0.0 leaves it unchanged: the same bits as adding members only).
SQ_WIDE_CLONES void cluster_sums(const double* __restrict wd, const int64_t* __restrict il,
                                 const double* __restrict cd, int64_t g, int64_t k, double* __restrict n,
                                 double* __restrict sc, double* __restrict sw, double* __restrict scc,
                                 double* __restrict scw) {
  const half_d one = {1.0, 1.0, 1.0, 1.0};
  for (int64_t j = 0; j < k; ++j) {
    const half_l jv = {j, j, j, j};
    half_d n0 = {}, n1 = {}, c0 = {}, c1 = {}, w0 = {}, w1 = {}, cc0 = {}, cc1 = {}, cw0 = {}, cw1 = {};
    int64_t i = 0;
    for (; i + LANES <= g; i += LANES) {
      half_l ia, ib;
      half_d ca, cb, xa, xb;
      std::memcpy(&ia, il + i, sizeof(ia));
      std::memcpy(&ib, il + i + 4, sizeof(ib));
      std::memcpy(&ca, cd + i, sizeof(ca));
      std::memcpy(&cb, cd + i + 4, sizeof(cb));
      std::memcpy(&xa, wd + i, sizeof(xa));
      std::memcpy(&xb, wd + i + 4, sizeof(xb));
      const half_l ma = ia == jv, mb = ib == jv;
      half_d na = one, nb = one;
      keep(ca, ma), keep(cb, mb), keep(xa, ma), keep(xb, mb), keep(na, ma), keep(nb, mb);
      n0 += na, n1 += nb;
      c0 += ca, c1 += cb, w0 += xa, w1 += xb;
      cc0 += ca * ca, cc1 += cb * cb, cw0 += ca * xa, cw1 += cb * xb;
    }
    double tn[LANES], tc[LANES], tw[LANES], tcc[LANES], tcw[LANES];
    store_lanes(tn, n0, n1), store_lanes(tc, c0, c1), store_lanes(tw, w0, w1);
    store_lanes(tcc, cc0, cc1), store_lanes(tcw, cw0, cw1);
    for (int64_t l = 0; i < g; ++i, ++l) {
      if (il[i] != j) continue;
      const double c = cd[i], x = wd[i];
      tn[l] += 1.0, tc[l] += c, tw[l] += x, tcc[l] += c * c, tcw[l] += c * x;
    }
    n[j] = lanes_total(tn), sc[j] = lanes_total(tc), sw[j] = lanes_total(tw);
    scc[j] = lanes_total(tcc), scw[j] = lanes_total(tcw);
  }
}

// `iters` refit / reassign rounds of one line with k > 1 clusters (see the top of the file), in place;
// t.wd holds the line wl as double.
template <class T>
void fit_rounds(const float* wl, int64_t* il, float* cl, T* ol, T* sl, int64_t g, int64_t k, float top, int64_t iters,
                Scratch& t, std::atomic<bool>& overflow) {
  for (int64_t it = 0; it < iters; ++it) {
    for (int64_t i = 0; i < g; ++i) t.cd[i] = static_cast<double>(cl[i]);
    cluster_sums(t.wd.data(), il, t.cd.data(), g, k, t.n.data(), t.sc.data(), t.sw.data(), t.scc.data(), t.scw.data());
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
    assign_line(wl, cl, il, g, t.off.data(), t.sca.data(), k, top);
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
// (double, summed over the lanes; the first on ties) gets the remaining `iters - trial` rounds.
// With k == 1, ids0 and ids are not used (null).
template <class T>
void fit_lines_starts(const float* w, const int64_t* ids0, const T* offsets, const T* scales, int64_t starts,
                      int64_t* ids, float* codes, T* offset, T* scale, int64_t lines, int64_t g, int64_t k,
                      int64_t levels, int64_t trial, int64_t iters, std::atomic<bool>& overflow) {
  const float top = static_cast<float>(levels - 1);
  at::parallel_for(0, lines, std::max<int64_t>(1, 16384 / std::max<int64_t>(g, 1)), [&](int64_t l0, int64_t l1) {
    if (k == 1) {  // one range per line: blocks of lines through fit_block
      const int64_t block = std::clamp<int64_t>(4096 / std::max<int64_t>(g, 1), 1, MAX_BLOCK);
      std::vector<float> o0(starts * block), s0(starts * block), tmp(block * g), ob(block), sb(block);
      for (int64_t l = l0; l < l1; l += block) {
        const int64_t nb = std::min(block, l1 - l);
        for (int64_t st = 0; st < starts; ++st) {
          for (int64_t b = 0; b < nb; ++b) {
            o0[st * nb + b] = static_cast<float>(offsets[st * lines + l + b]);
            s0[st * nb + b] = static_cast<float>(scales[st * lines + l + b]);
          }
        }
        if (!fit_block(w + l * g, nb, g, o0.data(), s0.data(), starts, trial, iters - trial, top, store_of<T>(),
                       codes + l * g, tmp.data(), ob.data(), sb.data()))
          overflow = true;
        for (int64_t b = 0; b < nb; ++b) offset[l + b] = T(ob[b]), scale[l + b] = T(sb[b]);  // exact: values of T
      }
      return;
    }
    Scratch t(k, g);
    std::vector<int64_t> il(g);
    std::vector<float> cl(g);
    std::vector<T> ol(k), sl(k);
    std::vector<float> of(k), sf(k);  // ol, sl as float, converted once per use rather than per weight
    for (int64_t l = l0; l < l1; ++l) {
      const float* wl = w + l * g;
      for (int64_t i = 0; i < g; ++i) t.wd[i] = static_cast<double>(wl[i]);  // fit_rounds' sums read it
      double best = 0.0;
      for (int64_t st = 0; st < starts; ++st) {
        const T* o0p = offsets + (st * lines + l) * k;
        const T* s0p = scales + (st * lines + l) * k;
        std::copy(o0p, o0p + k, ol.begin());
        std::copy(s0p, s0p + k, sl.begin());
        std::copy(ids0 + l * g, ids0 + (l + 1) * g, il.begin());
        as_float(ol.data(), sl.data(), of.data(), sf.data(), k);
        own_cluster_codes(wl, il.data(), cl.data(), g, of.data(), sf.data(), top);
        fit_rounds(wl, il.data(), cl.data(), ol.data(), sl.data(), g, k, top, trial, t, overflow);
        as_float(ol.data(), sl.data(), of.data(), sf.data(), k);
        const double err = error_line(wl, il.data(), cl.data(), g, of.data(), sf.data());
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
  const at::Tensor wc = w.contiguous(), oc = offsets.contiguous(), sc = scales.contiguous();
  // One range per line (k == 1): every id is 0; they are neither read nor written (an expanded 0 comes back).
  const at::Tensor ids0 = k == 1 ? ids : ids.contiguous();
  if (k != 1 && ids0.numel()) {
    const auto mm = ids0.aminmax();
    TORCH_CHECK(std::get<0>(mm).item<int64_t>() >= 0 && std::get<1>(mm).item<int64_t>() < k, "ids out of range");
  }
  at::Tensor ids_out = k == 1 ? at::zeros({}, ids.options()).expand(ids.sizes()) : at::empty_like(ids0);
  at::Tensor codes_out = at::empty_like(wc);
  at::Tensor off_out = at::empty({lines, k}, oc.options());
  at::Tensor scale_out = at::empty({lines, k}, oc.options());
  std::atomic<bool> overflow{false};
  const int64_t levels = int64_t{1} << bits;
  if (lines && g && k) {
    switch (oc.scalar_type()) {
#define SQ_FIT_STARTS(TYPE)                                                                                        \
  fit_lines_starts(wc.data_ptr<float>(), k == 1 ? nullptr : ids0.data_ptr<int64_t>(), oc.data_ptr<TYPE>(),        \
                   sc.data_ptr<TYPE>(), starts, k == 1 ? nullptr : ids_out.data_ptr<int64_t>(),                     \
                   codes_out.data_ptr<float>(), off_out.data_ptr<TYPE>(),                                           \
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
    if (k != 1) ids_out.copy_(ids0);
    codes_out.zero_();
    off_out.copy_(oc[0]);
    scale_out.copy_(sc[0]);
  }
  TORCH_CHECK(!overflow, "fitted ranges overflow the storage dtype");
  return {ids_out, codes_out, off_out, scale_out};
}

// The next value of a 16-bit float (half or bfloat16 bits) toward -inf (up = false) or +inf, as
// torch.nextafter (an infinity moving outwards stays; only finite ranges are kept anyway).
inline uint16_t next16(uint16_t x, bool up, uint16_t inf) {
  const bool negative = (x & 0x8000) != 0;
  const uint16_t magnitude = x & 0x7FFF;
  if (magnitude == 0) return up ? 0x0001 : 0x8001;
  if (negative == up) return x - 1;  // toward zero
  return magnitude >= inf ? x : x + 1;
}

inline c10::Half next_value(c10::Half v, bool up) {
  return c10::Half(next16(v.x, up, 0x7C00), c10::Half::from_bits());
}
inline c10::BFloat16 next_value(c10::BFloat16 v, bool up) {
  return c10::BFloat16(next16(v.x, up, 0x7F80), c10::BFloat16::from_bits());
}
inline float next_value(float v, bool up) { return std::nextafter(v, up ? INFINITY : -INFINITY); }

// The bits of a float that holds a half value (round_to_half's results, infinities included): its sign,
// exponent and top 10 fraction bits, or below 2^-14 its whole number of 2^-24 steps. No rounding.
SQ_INLINE uint16_t half_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return sign | 0x7C00;
  if (a >= 0x38800000u) return sign | static_cast<uint16_t>((((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3FFu));
  return sign | static_cast<uint16_t>(std::fabs(v) * 0x1p24f);
}

// The float value of half bits (finite or infinite), exactly.
SQ_INLINE float half_value(uint16_t h) {
  const uint32_t m = h & 0x7FFFu;
  float r;
  if (m >= 0x7C00u) {
    r = INFINITY;
  } else if (m >= 0x0400u) {
    const uint32_t u = (m << 13) + (112u << 23);
    std::memcpy(&r, &u, sizeof(r));
  } else {
    r = static_cast<float>(m) * 0x1p-24f;
  }
  return (h & 0x8000u) ? -r : r;
}

// One slot's start in half precision, as the generic start_ranges below rounds it but in float
// arithmetic (round_to_half) instead of two conversions each way: the same bits, several times faster.
SQ_INLINE bool start_half(float a, float b, float steps, c10::Half& offset, c10::Half& scale) {
  float o = round_to_half(a);
  if (o > a) o = half_value(next16(half_bits(o), false, 0x7C00));
  const float exact = (b - o) / steps;
  float s = round_to_half(exact);
  if (s < exact) s = half_value(next16(half_bits(s), true, 0x7C00));
  offset = c10::Half(half_bits(o), c10::Half::from_bits());
  scale = c10::Half(half_bits(s), c10::Half::from_bits());
  return std::isfinite(o) && std::isfinite(s);
}

#ifdef SQ_FIT_F16C
// start_half on eight slots at a time, [i0, i0 + 8 * n): the F16C conversions round the offset down and the
// scale up directly (_MM_FROUND_TO_NEG_INF / _TO_POS_INF), which is what rounding to the nearest half and
// then moving one step when it lies on the wrong side gives (the largest half <= a, the smallest >= exact;
// past the largest finite half: 65504 for a positive offset, infinity otherwise). The other operations are
// start_ranges' own, in the same order. False if a range is not finite.
__attribute__((target("avx,f16c"))) bool start_half8(const float* lo, const float* hi, int64_t i0, int64_t n,
                                                       float kept, float steps, c10::Half* offsets,
                                                       c10::Half* scales) {
  const __m256 k = _mm256_set1_ps(kept), st = _mm256_set1_ps(steps), two = _mm256_set1_ps(2.0f);
  const __m256 zero = _mm256_setzero_ps();
  __m256 finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int64_t b = 0; b < n; ++b) {
    const int64_t i = i0 + 8 * b;
    const __m256 l = _mm256_loadu_ps(lo + i), h = _mm256_loadu_ps(hi + i);
    const __m256 mid = _mm256_div_ps(_mm256_add_ps(l, h), two);
    const __m256 a = _mm256_add_ps(mid, _mm256_mul_ps(_mm256_sub_ps(l, mid), k));
    const __m256 top = _mm256_add_ps(mid, _mm256_mul_ps(_mm256_sub_ps(h, mid), k));
    const __m128i oh = _mm256_cvtps_ph(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m256 o = _mm256_cvtph_ps(oh);
    const __m256 exact = _mm256_div_ps(_mm256_sub_ps(top, o), st);
    const __m128i sh = _mm256_cvtps_ph(exact, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
    const __m256 s = _mm256_cvtph_ps(sh);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(offsets + i), oh);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(scales + i), sh);
    // x - x is 0 for a finite x, NaN for an infinity or NaN
    finite = _mm256_and_ps(finite, _mm256_cmp_ps(_mm256_sub_ps(o, o), zero, _CMP_EQ_OQ));
    finite = _mm256_and_ps(finite, _mm256_cmp_ps(_mm256_sub_ps(s, s), zero, _CMP_EQ_OQ));
  }
  return _mm256_movemask_ps(finite) == 0xFF;
}

bool has_f16c() {
  static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

// Starting ranges of fit_mse_starts from each slot's member min / max (core/quantize.py's
// _start_ranges and _stored_range, the same float operations): for start s, the range shrunk to the
// share kept[s] around its middle, offset rounded down and scale rounded up to T, spread over
// levels - 1 - spare[s] steps (at least 1). False if a range is not finite in T.
template <class T>
bool start_ranges(const float* lo, const float* hi, int64_t slots, const std::vector<float>& kept,
                  const std::vector<int64_t>& spare, int64_t levels, T* offsets, T* scales) {
  std::atomic<bool> finite{true};
  const int64_t starts = static_cast<int64_t>(kept.size());
  at::parallel_for(0, slots, 4096, [&](int64_t i0, int64_t i1) {
    bool ok = true;
    for (int64_t s = 0; s < starts; ++s) {
      const float steps = static_cast<float>(std::max<int64_t>(levels - 1 - spare[s], 1));
      int64_t first = i0;
#ifdef SQ_FIT_F16C
      if constexpr (std::is_same_v<T, c10::Half>) {
        if (has_f16c()) {
          const int64_t blocks = (i1 - i0) / 8;
          ok &= start_half8(lo, hi, i0, blocks, kept[s], steps, offsets + s * slots, scales + s * slots);
          first = i0 + 8 * blocks;
        }
      }
#endif
      for (int64_t i = first; i < i1; ++i) {
        const float mid = (lo[i] + hi[i]) / 2.0f;
        const float a = mid + (lo[i] - mid) * kept[s];
        const float b = mid + (hi[i] - mid) * kept[s];
        if constexpr (std::is_same_v<T, c10::Half>) {
          ok &= start_half(a, b, steps, offsets[s * slots + i], scales[s * slots + i]);
          continue;
        }
        T offset(a);
        if (static_cast<float>(offset) > a) offset = next_value(offset, false);
        const float exact = (b - static_cast<float>(offset)) / steps;
        T scale(exact);
        if (static_cast<float>(scale) < exact) scale = next_value(scale, true);
        ok &= std::isfinite(static_cast<float>(offset)) && std::isfinite(static_cast<float>(scale));
        offsets[s * slots + i] = offset;
        scales[s * slots + i] = scale;
      }
    }
    if (!ok) finite = false;
  });
  return finite;
}

std::tuple<at::Tensor, at::Tensor> start_ranges_cpu(const at::Tensor& lo, const at::Tensor& hi,
                                                    at::ArrayRef<double> kept, at::IntArrayRef spare, int64_t bits,
                                                    at::ScalarType dtype) {
  TORCH_CHECK(lo.dim() == 2 && lo.scalar_type() == at::kFloat && hi.sizes() == lo.sizes() &&
                  hi.scalar_type() == at::kFloat,
              "lo and hi must be float32 (lines, k) tensors");
  TORCH_CHECK(!kept.empty() && kept.size() == spare.size(), "kept and spare must be non-empty and of one length");
  TORCH_CHECK(bits >= 1 && bits <= 16, "bad bits");
  const at::Tensor l = lo.contiguous(), h = hi.contiguous();
  const int64_t starts = static_cast<int64_t>(kept.size()), slots = l.numel();
  at::Tensor offsets = at::empty({starts, l.size(0), l.size(1)}, l.options().dtype(dtype));
  at::Tensor scales = at::empty_like(offsets);
  const std::vector<float> kept_f(kept.begin(), kept.end());  // as torch.tensor(kept): float32
  const std::vector<int64_t> spare_v(spare.begin(), spare.end());
  const int64_t levels = int64_t{1} << bits;
  bool finite = true;
  switch (dtype) {
    case at::kHalf:
      finite = start_ranges(l.data_ptr<float>(), h.data_ptr<float>(), slots, kept_f, spare_v, levels,
                            offsets.data_ptr<c10::Half>(), scales.data_ptr<c10::Half>());
      break;
    case at::kBFloat16:
      finite = start_ranges(l.data_ptr<float>(), h.data_ptr<float>(), slots, kept_f, spare_v, levels,
                            offsets.data_ptr<c10::BFloat16>(), scales.data_ptr<c10::BFloat16>());
      break;
    case at::kFloat:
      finite = start_ranges(l.data_ptr<float>(), h.data_ptr<float>(), slots, kept_f, spare_v, levels,
                            offsets.data_ptr<float>(), scales.data_ptr<float>());
      break;
    default:
      TORCH_CHECK(false, "dtype must be float16, bfloat16 or float32");
  }
  TORCH_CHECK(finite, "start ranges overflow the storage dtype");
  return {offsets, scales};
}

// Every weight of each line to its nearest level over the line's clusters (core/quantize.py's
// _nearest_levels: lowest cluster on ties); ranges as float (lines, k). With k == 1 the ids come back
// as an expanded 0.
std::tuple<at::Tensor, at::Tensor> nearest_levels_cpu(const at::Tensor& w, const at::Tensor& offset,
                                                      const at::Tensor& scale, int64_t bits) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "w must be a float32 (lines, g) tensor");
  TORCH_CHECK(offset.dim() == 2 && offset.size(0) == w.size(0) && offset.size(1) >= 1 &&
                  scale.sizes() == offset.sizes() && offset.scalar_type() == at::kFloat &&
                  scale.scalar_type() == at::kFloat,
              "offset and scale must be float32 (lines, k) tensors");
  TORCH_CHECK(bits >= 1 && bits <= 16, "bad bits");
  const at::Tensor wc = w.contiguous(), oc = offset.contiguous(), sc = scale.contiguous();
  const int64_t lines = wc.size(0), g = wc.size(1), k = oc.size(1);
  at::Tensor codes = at::empty_like(wc);
  at::Tensor ids = k == 1 ? at::zeros({}, wc.options().dtype(at::kLong)).expand(wc.sizes())
                          : at::empty(wc.sizes(), wc.options().dtype(at::kLong));
  const float top = static_cast<float>((int64_t{1} << bits) - 1);
  const float* wp = wc.data_ptr<float>();
  const float* op = oc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  float* cp = codes.data_ptr<float>();
  int64_t* ip = k == 1 ? nullptr : ids.data_ptr<int64_t>();
  at::parallel_for(0, lines, std::max<int64_t>(1, 16384 / std::max<int64_t>(g, 1)), [&](int64_t l0, int64_t l1) {
    if (k == 1) {
      for (int64_t l = l0; l < l1; ++l) codes_line(wp + l * g, cp + l * g, g, op[l], sp[l], top);
      return;
    }
    for (int64_t l = l0; l < l1; ++l) {
      assign_line(wp + l * g, cp + l * g, ip + l * g, g, op + l * k, sp + l * k, k, top);
    }
  });
  return {ids, codes};
}

// Squared errors of lines [l0, l1) of w on the nearest levels of each of `cands` ranges (offsets /
// scales [c * lines + l]), to out[l * cands + c]. Per weight, as nearest_code and core/fit.py's
// _line_errors: d = w - o, code = nearest code of ok * (d / div), e = d - code * s (float32), e * e summed
// in double, element i in lane i % LANES. Eight weights at a time through one float vector (the clamps
// with pick, as in assign_line), their squares summed in two double vectors of four lanes.
SQ_WIDE_CLONES void line_errors_block(const float* __restrict w, int64_t l0, int64_t l1, int64_t lines, int64_t g,
                                      const float* offsets, const float* scales, int64_t cands, float top,
                                      double* __restrict out) {
  const vec8f zero = {}, tops = zero + top;
  for (int64_t l = l0; l < l1; ++l) {
    const float* wl = w + l * g;
    for (int64_t c = 0; c < cands; ++c) {
      const float o = offsets[c * lines + l], s = scales[c * lines + l];
      const float ok = s > 0 ? 1.0f : 0.0f, div = s > 0 ? s : 1.0f;
      half_d e0 = {}, e1 = {};
      int64_t i = 0;
      for (; i + LANES <= g; i += LANES) {
        vec8f x;
        std::memcpy(&x, wl + i, sizeof(x));
        const vec8f d = x - o;
        const vec8f steps = ok * (d / div);
        vec8f low, high;
        pick(low, steps < zero, zero, steps);  // std::max(steps, 0.0f)
        pick(high, tops < low, tops, low);     // std::min(low, top)
        const vec8f e = d - ((high + ROUND_MAGIC) - ROUND_MAGIC) * s;
        // Widened element by element: one conversion per half. (GCC 12 makes __builtin_convertvector of
        // halves taken from e four two-wide conversions and shuffles: the loop ~40% slower.)
        const half_d da = {e[0], e[1], e[2], e[3]}, db = {e[4], e[5], e[6], e[7]};
        e0 += da * da, e1 += db * db;
      }
      double t[LANES];
      store_lanes(t, e0, e1);
      for (int64_t j = 0; i < g; ++i, ++j) {
        const float d = wl[i] - o;
        const double e = static_cast<double>(d - nearest_code(ok * (d / div), top) * s);
        t[j] += e * e;
      }
      out[l * cands + c] = lanes_total(t);
    }
  }
}

// Squared error (double) of every line of w on the nearest levels of each candidate range, one range per
// line (core/fit.py's _line_errors with one cluster): w float32 (lines, g), offsets / scales float32
// (candidates, lines); float64 (lines, candidates), the same bits as the torch path.
at::Tensor line_errors_cpu(const at::Tensor& w, const at::Tensor& offsets, const at::Tensor& scales, int64_t bits) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "line_errors: w must be a float32 (lines, g) tensor, got ",
              w.scalar_type(), " of shape ", w.sizes());
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(1) == w.size(0) && offsets.scalar_type() == at::kFloat,
              "line_errors: offsets must be a float32 (candidates, lines) tensor with lines = ", w.size(0), ", got ",
              offsets.scalar_type(), " of shape ", offsets.sizes());
  TORCH_CHECK(scales.sizes() == offsets.sizes() && scales.scalar_type() == at::kFloat,
              "line_errors: scales must be a float32 tensor of the offsets' shape ", offsets.sizes(), ", got ",
              scales.scalar_type(), " of shape ", scales.sizes());
  TORCH_CHECK(bits >= 1 && bits <= 16, "line_errors: bits must be in [1, 16], got ", bits);
  const at::Tensor wc = w.contiguous(), oc = offsets.contiguous(), sc = scales.contiguous();
  const int64_t lines = wc.size(0), g = wc.size(1), cands = oc.size(0);
  at::Tensor out = at::empty({lines, cands}, wc.options().dtype(at::kDouble));
  const float top = static_cast<float>((int64_t{1} << bits) - 1);
  const float* wp = wc.data_ptr<float>();
  const float* op = oc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  double* ep = out.data_ptr<double>();
  const int64_t work = std::max<int64_t>(g * cands, 1);  // weights visited per line
  at::parallel_for(0, lines, std::max<int64_t>(1, 16384 / work), [&](int64_t l0, int64_t l1) {
    line_errors_block(wp, l0, l1, lines, g, op, sp, cands, top, ep);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_splitquant, m) {
  m.def("fit_mse_starts(Tensor w, Tensor ids, Tensor offsets, Tensor scales, int bits, int trial, int iters) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("start_ranges(Tensor lo, Tensor hi, float[] kept, int[] spare, int bits, ScalarType dtype) -> "
        "(Tensor, Tensor)");
  m.def("nearest_levels(Tensor w, Tensor offset, Tensor scale, int bits) -> (Tensor, Tensor)");
  m.def("line_errors(Tensor w, Tensor offsets, Tensor scales, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(optimum_splitquant, CPU, m) {
  m.impl("fit_mse_starts", &fit_mse_starts_cpu);
  m.impl("start_ranges", &start_ranges_cpu);
  m.impl("nearest_levels", &nearest_levels_cpu);
  m.impl("line_errors", &line_errors_cpu);
}
