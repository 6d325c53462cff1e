// Exact 1-D k-means of one float32 row, binned (no sort): the compiled search behind
// optimum_splitquant/core/kmeans/'s binned path (rows of n >= 2^15 float32 values, 2 <= k <= 9).
//
// Same problem, same bins, same bound as the pure-torch path (see that module's docstring), with
// the search done in plain loops instead of some 1,500 small torch ops:
//
// * Bins: the value's order-preserving int32 key shifted right by s (the centre, magnitudes below
//   2^-9 of the largest one, one bin per binade): bit for bit the torch path's _BinnedSource. Every
//   bin holds one sign and one binade, so its float64 sum is exact; prefix sums over bins are
//   sequential (as torch.cumsum). A position inside a bin that has been read ("fine") has the
//   prefix sum  sc[bin] + (exact sum of the bin's values before it), so a cut's prefix sum, and
//   hence every centre, is the same number whichever path found the cut.
// * Search: items (ranges of positions) start as 32 quantile items shared by all cuts; each pass
//   finds the best partition over the items' end positions (chain DP, exact over those positions),
//   drops the items whose lower bound (cores + pulls, chain DP over (item, side)) cannot reach it,
//   and splits every kept item into up to 8 (a kept single bin is read first). When no kept item
//   has a position inside it any more, the incumbent is the optimum.
//
// Returns float64 [st, n_1.., s_1.., lo_1.., hi_1..] (k - 1 cuts: count before the cut, prefix sum,
// first value after it, last value before it; st: sum of the row), or an empty tensor when the
// search gives up (the caller then runs the torch path): after kMaxPasses, or when the items of a
// cut outnumber kMaxItems (a few far outliers: the bound cannot prune, the items would multiply).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int kLog2Bins = 13;
constexpr int kStartItems = 32;
constexpr int kSplit = 8;
constexpr double kTol = 1e-11;
constexpr int kMaxPasses = 200;
constexpr size_t kMaxItems = 4096;  // items per cut at most (pairwise work per pass: their square)
constexpr int64_t kMaxK = 9;  // the binned rows' largest k (core/kmeans/dispatch.py); bit-identical to torch for each
constexpr int64_t kGrain = 1 << 16;  // values per thread at least, in the passes over the data
const double kNeg = -std::numeric_limits<double>::infinity();

inline int32_t key_of(float v) {
  int32_t b;
  std::memcpy(&b, &v, 4);
  return ((b >> 31) & 0x7FFFFFFF) ^ b;
}

inline double value_of(int64_t key) {
  const auto k = static_cast<int32_t>(key);
  const int32_t b = ((k >> 31) & 0x7FFFFFFF) ^ k;
  float v;
  std::memcpy(&v, &b, 4);
  return static_cast<double>(v);
}

// S^2 / N of a range (0 when empty).
inline double val(double n, double s) { return n > 0 ? s * s / n : 0.0; }

// Least SSE increase when n_item values at least dist from a core's mean join it.
inline double pull(double n_core, double n_item, double dist) {
  const double d = std::max(dist, 0.0);
  return n_core * n_item / std::max(n_core + n_item, 1.0) * (d * d);
}

struct Binning {
  int s = 0;
  int64_t ct = 0, base = 0;

  __attribute__((always_inline)) int64_t raw(int64_t key) const {
    int64_t u = key >> s;
    if (ct == 0) return u;
    const int64_t lim = (ct << 23) >> s;
    const int64_t c = std::min(std::max(u, -lim), lim - 1);
    return u - c + (c >> (23 - s));
  }
  __attribute__((always_inline)) int64_t bin(int64_t key) const { return raw(key) - base; }
  int64_t low_key(int64_t b) const {
    const int64_t v = b + base;
    if (ct == 0) return v << s;
    const int64_t lim = (ct << 23) >> s;
    const int64_t u = v >= ct ? v + (lim - ct) : (v < -ct ? v - (lim - ct) : v * (int64_t{1} << (23 - s)));
    return u * (int64_t{1} << s);
  }
};

struct Pos {
  double n, s, q, lo, hi;  // count before, prefix sum, prefix sum of squares (upper bound), value hull
};

struct Item {
  double nu, su, nv, sv, qi, lo, hi;
};

struct FineBin {
  std::vector<double> v;    // distinct values, ascending
  std::vector<double> cum;  // count of the bin's values <= v[r]
  std::vector<double> ps;   // exact sum of the bin's values <= v[r]
  std::vector<double> pq;   // sum of squares of the bin's values <= v[r]
};

class Row {
 public:
  Row(const float* x, int64_t n) : x_(x), n_(n) {
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrain));
    const int64_t step = (n + chunks - 1) / chunks;
    std::vector<int32_t> lo_k(chunks, std::numeric_limits<int32_t>::max());
    std::vector<int32_t> hi_k(chunks, std::numeric_limits<int32_t>::min());
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int32_t kmin = lo_k[c], kmax = hi_k[c];
        for (int64_t i = c * step, e = std::min(n, (c + 1) * step); i < e; ++i) {
          const int32_t k = key_of(x[i]);
          kmin = std::min(kmin, k);
          kmax = std::max(kmax, k);
        }
        lo_k[c] = kmin;
        hi_k[c] = kmax;
      }
    });
    const int32_t kmin = *std::min_element(lo_k.begin(), lo_k.end());
    const int32_t kmax = *std::max_element(hi_k.begin(), hi_k.end());
    const int64_t e_top = std::max<int64_t>(kmax, -1 - int64_t{kmin}) >> 23;
    bins_.ct = std::max<int64_t>(e_top - 9, 0);
    const int64_t kt = bins_.ct << 23;
    const int64_t span = std::max<int64_t>(0, kmax - std::max<int64_t>(kmin, kt) + 1) +
                         std::max<int64_t>(0, std::min<int64_t>(kmax, -kt - 1) - kmin + 1);
    const double ratio = static_cast<double>(std::max<int64_t>(span, 1)) / std::ldexp(1.0, kLog2Bins);
    bins_.s = static_cast<int>(std::min(23.0, std::max(0.0, std::ceil(std::log2(ratio)))));
    bins_.base = bins_.raw(kmin);
    nb_ = bins_.raw(kmax) - bins_.base + 1;
    TORCH_CHECK(nb_ <= 65536, "kmeans_binned: internal error, ", nb_, " bins");

    // bin of every value (kept for reading bins later), counts and exact sums; per-chunk
    // histograms merge exactly (every partial sum of a bin is exact), so any split gives the same
    idx_.resize(n);
    std::vector<std::vector<int64_t>> cnt_c(chunks, std::vector<int64_t>(nb_, 0));
    std::vector<std::vector<double>> sum_c(chunks, std::vector<double>(nb_, 0.0));
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* cnt = cnt_c[c].data();
        double* sum = sum_c[c].data();
        for (int64_t i = c * step, e = std::min(n, (c + 1) * step); i < e; ++i) {
          const int64_t b = bins_.bin(key_of(x[i]));
          idx_[i] = static_cast<uint16_t>(b);
          cnt[b] += 1;
          sum[b] += static_cast<double>(x[i]);
        }
      }
    });
    counts_ = std::move(cnt_c[0]);
    std::vector<double> sums = std::move(sum_c[0]);
    for (int64_t c = 1; c < chunks; ++c) {
      for (int64_t b = 0; b < nb_; ++b) {
        counts_[b] += cnt_c[c][b];
        sums[b] += sum_c[c][b];
      }
    }
    bin_lo_.resize(nb_);
    bin_hi_.resize(nb_);
    qb_.resize(nb_);
    for (int64_t b = 0; b < nb_; ++b) {
      const int64_t lk = std::min<int64_t>(std::max<int64_t>(bins_.low_key(b), kmin), kmax);
      const int64_t hk = std::min<int64_t>(std::max<int64_t>(bins_.low_key(b + 1) - 1, kmin), kmax);
      const double lo = value_of(lk), hi = value_of(hk), c = static_cast<double>(counts_[b]);
      bin_lo_[b] = lo;
      bin_hi_[b] = hi;
      // sum of squares of a bin <= (lo + hi) S - N lo hi, as (x - lo)(x - hi) <= 0 inside its hull
      qb_[b] = std::max(0.0, (lo + hi) * sums[b] - c * lo * hi);
    }
    nc_.assign(nb_ + 1, 0.0);
    sc_.assign(nb_ + 1, 0.0);
    double an = 0.0, as = 0.0;
    for (int64_t b = 0; b < nb_; ++b) {  // sequential, as torch.cumsum
      an += static_cast<double>(counts_[b]);
      as += sums[b];
      nc_[b + 1] = an;
      sc_[b + 1] = as;
    }
    rebuild_q();
    q_bound_ = std::abs(qc_[nb_]);
    nxt_.resize(nb_ + 1);
    prv_.resize(nb_ + 1);
    int64_t next = nb_;
    for (int64_t e = nb_; e >= 0; --e) {
      if (e == nb_ || counts_[e] > 0) next = e;
      nxt_[e] = std::min(next, nb_ - 1);
    }
    int64_t prev = 0;
    for (int64_t e = 0; e <= nb_; ++e) {
      if (e > 0 && counts_[e - 1] > 0) prev = e - 1;
      prv_[e] = prev;
    }
    fine_idx_.assign(nb_, -1);
    nt_ = nc_[nb_];
    st_ = sc_[nb_];
  }

  double nt() const { return nt_; }
  double st() const { return st_; }
  double tol() const { return kTol * q_bound_; }

  // Layout fields at a valid count t.
  Pos rec(double t) const {
    const int64_t e = std::min<int64_t>(std::lower_bound(nc_.begin(), nc_.end(), t) - nc_.begin(), nb_);
    if (nc_[e] == t) return {t, sc_[e], qc_[e], bin_lo_[nxt_[std::min(e, nb_ - 1)]], bin_hi_[prv_[e]]};
    const int64_t b = e - 1;  // t lies strictly inside bin b, which is fine
    TORCH_CHECK(b >= 0 && fine_idx_[b] >= 0, "kmeans_binned: internal error, invalid position ", t);
    const FineBin& f = fine_[fine_idx_[b]];
    const double off = t - nc_[b];
    const int64_t r = std::lower_bound(f.cum.begin(), f.cum.end(), off) - f.cum.begin();
    return {t, sc_[b] + f.ps[r], qc_[b] + f.pq[r], f.v[r + 1], f.v[r]};
  }

  // Smallest valid count >= t.
  double snap(double t) const {
    const int64_t e = std::min<int64_t>(std::lower_bound(nc_.begin(), nc_.end(), t) - nc_.begin(), nb_);
    if (nc_[e] == t || e == 0) return nc_[e];
    const int64_t b = e - 1;
    if (fine_idx_[b] >= 0) {
      const FineBin& f = fine_[fine_idx_[b]];
      const double off = t - nc_[b];
      auto it = std::lower_bound(f.cum.begin(), f.cum.end() - 1, off);  // internal positions only
      if (it != f.cum.end() - 1) return nc_[b] + *it;
    }
    return nc_[e];
  }

  // Largest valid count <= t.
  double snap_down(double t) const {
    const int64_t e = (std::upper_bound(nc_.begin(), nc_.end(), t) - nc_.begin()) - 1;
    if (nc_[e] == t || e >= nb_) return nc_[e];
    if (fine_idx_[e] >= 0) {
      const FineBin& f = fine_[fine_idx_[e]];
      auto it = std::upper_bound(f.cum.begin(), f.cum.end() - 1, t - nc_[e]);
      if (it != f.cum.begin()) return nc_[e] + *(it - 1);
    }
    return nc_[e];
  }

  // A valid count strictly inside (u, v)?
  bool has_interior(double u, double v) const { return snap(u + 1.0) < v; }

  // The one non-empty, coarse (several values, not read) bin that item [u, v] consists of, or -1.
  int64_t single_coarse_bin(double u, double v) const {
    const int64_t b = (std::upper_bound(nc_.begin(), nc_.end(), u) - nc_.begin()) - 1;
    if (b < 0 || b >= nb_ || nc_[b] != u || nc_[b + 1] != v) return -1;
    return (counts_[b] > 1 && fine_idx_[b] < 0) ? b : -1;
  }

  // The non-empty bins on either side of a cut at a bin edge, when not read yet.
  void neighbours_to_read(double t, std::vector<int64_t>& out) const {
    const int64_t e = std::min<int64_t>(std::lower_bound(nc_.begin(), nc_.end(), t) - nc_.begin(), nb_);
    if (nc_[e] != t) return;  // inside a fine bin: its neighbours are values already
    for (int64_t b : {prv_[e], nxt_[std::min(e, nb_ - 1)]}) {
      if (counts_[b] > 0 && fine_idx_[b] < 0) out.push_back(b);
    }
  }

  // Read the distinct values of `bins` from the data (one pass).
  void make_fine(std::vector<int64_t> bins) {
    std::sort(bins.begin(), bins.end());
    bins.erase(std::unique(bins.begin(), bins.end()), bins.end());
    std::vector<uint8_t> table(nb_, 0);
    int64_t expect = 0;
    for (int64_t b : bins) {
      if (fine_idx_[b] < 0) {
        table[b] = 1;
        expect += counts_[b];
      }
    }
    if (expect == 0) return;
    std::vector<int32_t> keys;
    keys.reserve(expect);
    const uint16_t* idx = idx_.data();
    const uint8_t* tab = table.data();
    for (int64_t i = 0; i < n_; ++i) {
      if (tab[idx[i]]) keys.push_back(key_of(x_[i]));
    }
    std::sort(keys.begin(), keys.end());
    size_t i = 0;
    while (i < keys.size()) {
      const int64_t b = bins_.bin(keys[i]);
      FineBin f;
      double cnt = 0.0, ps = 0.0, pq = 0.0;
      while (i < keys.size() && bins_.bin(keys[i]) == b) {
        size_t j = i;
        while (j < keys.size() && keys[j] == keys[i]) ++j;
        const double u = value_of(keys[i]), c = static_cast<double>(j - i);
        cnt += c;
        ps += c * u;  // exact: one sign, one binade
        pq += c * u * u;
        f.v.push_back(u);
        f.cum.push_back(cnt);
        f.ps.push_back(ps);
        f.pq.push_back(pq);
        i = j;
      }
      bin_lo_[b] = f.v.front();
      bin_hi_[b] = f.v.back();
      qb_[b] = pq;
      fine_idx_[b] = static_cast<int64_t>(fine_.size());
      fine_.push_back(std::move(f));
    }
    rebuild_q();
  }

 private:
  void rebuild_q() {
    qc_.assign(nb_ + 1, 0.0);
    double aq = 0.0;
    for (int64_t b = 0; b < nb_; ++b) {
      aq += qb_[b];
      qc_[b + 1] = aq;
    }
  }

  const float* x_;
  int64_t n_;
  std::vector<uint16_t> idx_;
  Binning bins_;
  int64_t nb_ = 0;
  std::vector<int64_t> counts_, nxt_, prv_, fine_idx_;
  std::vector<double> bin_lo_, bin_hi_, qb_, nc_, sc_, qc_;
  std::vector<FineBin> fine_;
  double q_bound_ = 0.0, nt_ = 0.0, st_ = 0.0;
};

using Items = std::vector<std::pair<double, double>>;  // [u, v] counts, ascending, disjoint

Item make_item(const Row& row, double u, double v) {
  const Pos a = row.rec(u), b = row.rec(v);
  return {a.n, a.s, b.n, b.s, b.q - a.q, a.lo, b.hi};
}

std::vector<double> end_positions(const Items& items) {
  std::vector<double> p;
  p.reserve(2 * items.size());
  for (const auto& it : items) {
    p.push_back(it.first);
    p.push_back(it.second);
  }
  std::sort(p.begin(), p.end());
  p.erase(std::unique(p.begin(), p.end()), p.end());
  return p;
}

// Exact best partition with cut j at one of pos[j] (chain DP); returns the score (sum of S^2/N)
// and writes the cut counts. Ties go to the first position in order.
double best_cuts(const Row& row, const std::vector<std::vector<double>>& pos, std::vector<double>& cuts) {
  const size_t k1 = pos.size();
  std::vector<std::vector<Pos>> rec(k1);
  for (size_t j = 0; j < k1; ++j) {
    rec[j].reserve(pos[j].size());
    for (double t : pos[j]) rec[j].push_back(row.rec(t));
  }
  std::vector<double> v(rec[0].size());
  for (size_t p = 0; p < rec[0].size(); ++p) v[p] = val(rec[0][p].n, rec[0][p].s);
  std::vector<std::vector<int64_t>> back(k1);
  for (size_t j = 1; j < k1; ++j) {
    std::vector<double> w(rec[j].size(), kNeg);
    back[j].assign(rec[j].size(), 0);
    for (size_t p = 0; p < rec[j].size(); ++p) {
      const Pos& b = rec[j][p];
      double best = kNeg;
      int64_t arg = 0;
      for (size_t q = 0; q < rec[j - 1].size(); ++q) {
        const Pos& a = rec[j - 1][q];
        const double dn = b.n - a.n;
        if (dn < 0) break;  // positions ascend
        const double c = v[q] + val(dn, b.s - a.s);
        if (c > best) {
          best = c;
          arg = static_cast<int64_t>(q);
        }
      }
      w[p] = best;
      back[j][p] = arg;
    }
    v.swap(w);
  }
  double best = kNeg;
  int64_t idx = 0;
  const auto& last = rec[k1 - 1];
  for (size_t p = 0; p < last.size(); ++p) {
    const double c = v[p] + val(row.nt() - last[p].n, row.st() - last[p].s);
    if (c > best) {
      best = c;
      idx = static_cast<int64_t>(p);
    }
  }
  cuts.assign(k1, 0.0);
  for (size_t j = k1; j-- > 0;) {
    cuts[j] = rec[j][idx].n;
    if (j > 0) idx = back[j][idx];
  }
  return best;
}

// Gains of the middle cluster between item a (cut j) and item b (cut j + 1), per sides
// (LL, LR, RL, RR: the side each item's values go to), as in the torch path's _keep_items.
inline void gains(const Item& a, const Item& b, bool same, double g[4]) {
  if (same) {
    g[0] = g[1] = g[2] = g[3] = 0.0;
    return;
  }
  if (!(a.nu < b.nv)) {
    g[0] = g[1] = g[2] = g[3] = kNeg;
    return;
  }
  const double ny = std::max(b.nu - a.nv, 0.0);
  const double sy = ny > 0 ? b.su - a.sv : 0.0;
  const double mu = sy / std::max(ny, 1.0);
  const double na = a.nv - a.nu, nb = b.nv - b.nu;
  const double l = std::max(mu - a.hi, 0.0), r = std::max(b.lo - mu, 0.0), d = std::max(b.lo - a.hi, 0.0);
  const double dl = l * l, dr = r * r, dd = d * d;
  const double base = val(ny, sy) + b.qi;
  g[0] = base - ny * nb * dr / std::max(ny + nb, 1.0);
  g[1] = base;
  g[2] = base - (ny * (na * dl + nb * dr) + na * nb * dd) / std::max(ny + na + nb, 1.0);
  g[3] = base - ny * na * dl / std::max(ny + na, 1.0);
}

// Items of each cut that may hold cut j of a partition scoring at least thresh.
std::vector<std::vector<uint8_t>> keep_items(const Row& row, const std::vector<Items>& lists, bool shared,
                                             double thresh) {
  const size_t k1 = lists.size();
  std::vector<std::vector<Item>> it(k1);
  for (size_t j = 0; j < k1; ++j) {
    if (shared && j > 0) {
      it[j] = it[0];
      continue;
    }
    for (const auto& [u, v] : lists[j]) it[j].push_back(make_item(row, u, v));
  }
  // f[j][2a + side]: best bound of cuts 0..j with cut j in item a; h: cuts j..end
  std::vector<std::vector<double>> f(k1), h(k1);
  f[0].resize(2 * it[0].size());
  for (size_t a = 0; a < it[0].size(); ++a) {
    const Item& t = it[0][a];
    const double head = val(t.nu, t.su) + t.qi;
    f[0][2 * a] = head - pull(t.nu, t.nv - t.nu, t.lo - t.su / std::max(t.nu, 1.0));
    f[0][2 * a + 1] = head;
  }
  double g[4];
  for (size_t j = 0; j + 1 < k1; ++j) {
    f[j + 1].assign(2 * it[j + 1].size(), kNeg);
    for (size_t a = 0; a < it[j].size(); ++a) {
      for (size_t b = 0; b < it[j + 1].size(); ++b) {
        gains(it[j][a], it[j + 1][b], shared && a == b, g);
        for (int sa = 0; sa < 2; ++sa) {
          for (int sb = 0; sb < 2; ++sb) {
            double& o = f[j + 1][2 * b + sb];
            o = std::max(o, f[j][2 * a + sa] + g[2 * sa + sb]);
          }
        }
      }
    }
  }
  h[k1 - 1].resize(2 * it[k1 - 1].size());
  for (size_t b = 0; b < it[k1 - 1].size(); ++b) {
    const Item& t = it[k1 - 1][b];
    const double nz = row.nt() - t.nv, sz = row.st() - t.sv;
    const double tail = val(nz, sz);
    h[k1 - 1][2 * b] = tail;
    h[k1 - 1][2 * b + 1] = tail - pull(nz, t.nv - t.nu, sz / std::max(nz, 1.0) - t.hi);
  }
  for (size_t j = k1 - 1; j-- > 0;) {
    h[j].assign(2 * it[j].size(), kNeg);
    for (size_t a = 0; a < it[j].size(); ++a) {
      for (size_t b = 0; b < it[j + 1].size(); ++b) {
        gains(it[j][a], it[j + 1][b], shared && a == b, g);
        for (int sa = 0; sa < 2; ++sa) {
          for (int sb = 0; sb < 2; ++sb) {
            double& o = h[j][2 * a + sa];
            o = std::max(o, g[2 * sa + sb] + h[j + 1][2 * b + sb]);
          }
        }
      }
    }
  }
  std::vector<std::vector<uint8_t>> keep(k1);
  for (size_t j = 0; j < k1; ++j) {
    keep[j].resize(it[j].size());
    for (size_t a = 0; a < it[j].size(); ++a) {
      const double best = std::max(f[j][2 * a] + h[j][2 * a], f[j][2 * a + 1] + h[j][2 * a + 1]);
      keep[j][a] = best >= thresh;
    }
  }
  return keep;
}

// Sub-items of [u, v] (which has valid positions inside), cut at the valid positions nearest to
// kSplit - 1 equally spaced counts (each target gives an inner position: the first valid one at
// or after it, else the last one before it).
void split_item(const Row& row, double u, double v, Items& out) {
  double prev = u;
  for (int i = 1; i < kSplit; ++i) {
    const double t = std::floor(u + (v - u) * i / kSplit);
    double c = row.snap(t);
    if (c >= v) c = row.snap_down(t);
    if (c > prev && c < v) {
      out.emplace_back(prev, c);
      prev = c;
    }
  }
  out.emplace_back(prev, v);
}

// Quantile items (shared by all cuts) and the best partition over quantile positions.
std::vector<double> quantile_positions(const Row& row, int count) {
  std::vector<double> p;
  for (int i = 0; i <= count; ++i) p.push_back(row.snap(std::floor(row.nt() * i / count)));
  p.erase(std::unique(p.begin(), p.end()), p.end());
  return p;
}

at::Tensor kmeans_binned_cpu(const at::Tensor& x_in, int64_t k) {
  TORCH_CHECK(x_in.dim() == 1 && x_in.scalar_type() == at::kFloat, "kmeans_binned expects a 1-D float32 tensor");
  TORCH_CHECK(k >= 2 && k <= kMaxK, "kmeans_binned supports 2 <= k <= ", kMaxK, ", got ", k);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  TORCH_CHECK(n > 0, "kmeans_binned needs at least one value");
  Row row(x.data_ptr<float>(), n);
  const size_t k1 = static_cast<size_t>(k - 1);

  std::vector<double> cuts;
  const std::vector<double> start = quantile_positions(row, 4 * kStartItems);
  double best = best_cuts(row, std::vector<std::vector<double>>(k1, start), cuts);
  const std::vector<double> q = quantile_positions(row, kStartItems);
  Items shared_items;
  for (size_t i = 0; i + 1 < q.size(); ++i) shared_items.emplace_back(q[i], q[i + 1]);
  std::vector<Items> lists(k1, shared_items);
  bool shared = true;
  bool done = false;
  for (int pass = 0; pass < kMaxPasses && !done; ++pass) {
    size_t most = 0;
    for (const Items& l : lists) most = std::max(most, l.size());
    if (most > kMaxItems) break;  // the bound cannot prune: the caller's dynamic programme finds the cuts
    std::vector<std::vector<double>> pos(k1);
    for (size_t j = 0; j < k1; ++j) pos[j] = (shared && j > 0) ? pos[0] : end_positions(lists[j]);
    std::vector<double> found;
    const double v = best_cuts(row, pos, found);
    if (v > best) {
      best = v;
      cuts = found;
    }
    const auto keep = keep_items(row, lists, shared, best - row.tol());
    std::vector<Items> kept(k1);
    for (size_t j = 0; j < k1; ++j) {
      for (size_t a = 0; a < lists[j].size(); ++a) {
        if (keep[j][a]) kept[j].push_back(lists[j][a]);
      }
    }
    if (shared) {
      bool disjoint = true;
      for (size_t j = 0; j + 1 < k1; ++j) {
        if (kept[j].empty() || kept[j + 1].empty() || kept[j].back().second > kept[j + 1].front().first) {
          disjoint = false;
        }
      }
      if (!disjoint) {  // one list for all cuts: the items any cut keeps
        Items all;
        for (size_t a = 0; a < lists[0].size(); ++a) {
          bool any = false;
          for (size_t j = 0; j < k1; ++j) any = any || keep[j][a];
          if (any) all.push_back(lists[0][a]);
        }
        kept.assign(k1, all);
      } else {
        shared = false;
      }
    }
    // kept single coarse bins are read first, then every kept item with inner positions is split
    std::vector<int64_t> to_read;
    for (size_t j = 0; j < (shared ? 1 : k1); ++j) {
      for (const auto& [u, v2] : kept[j]) {
        const int64_t b = row.single_coarse_bin(u, v2);
        if (b >= 0) to_read.push_back(b);
      }
    }
    if (!to_read.empty()) row.make_fine(to_read);
    done = true;
    for (size_t j = 0; j < (shared ? 1 : k1); ++j) {
      Items next;
      for (const auto& [u, v2] : kept[j]) {
        if (row.has_interior(u, v2)) {
          split_item(row, u, v2, next);
          done = false;
        } else {
          next.emplace_back(u, v2);
        }
      }
      lists[j] = std::move(next);
    }
    if (shared) {
      for (size_t j = 1; j < k1; ++j) lists[j] = lists[0];
    }
  }
  if (!done) return at::empty({0}, x.options().dtype(at::kDouble));
  // the values next to each cut, exactly (read the neighbouring bins if needed)
  std::vector<int64_t> near;
  for (double c : cuts) row.neighbours_to_read(c, near);
  if (!near.empty()) row.make_fine(near);
  at::Tensor out = at::empty({static_cast<int64_t>(1 + 4 * k1)}, x.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  o[0] = row.st();
  for (size_t j = 0; j < k1; ++j) {
    const Pos p = row.rec(cuts[j]);
    o[1 + j] = p.n;
    o[1 + k1 + j] = p.s;
    o[1 + 2 * k1 + j] = p.lo;
    o[1 + 3 * k1 + j] = p.hi;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_splitquant, m) {
  m.def("kmeans_binned(Tensor x, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(optimum_splitquant, CPU, m) { m.impl("kmeans_binned", &kmeans_binned_cpu); }
