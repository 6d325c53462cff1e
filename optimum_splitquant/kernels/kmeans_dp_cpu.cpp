// Exact 1-D k-means by dynamic programming over sorted rows: the compiled layers behind
// optimum_splitquant/core/kmeans/dp.py (many clusters), the same operations in the same order.
//
// best_j[i] is the least SSE of the first i sorted values in j intervals. Its leftmost optimal last
// cut is monotone in i, so each layer is solved by divide and conquer: the middle position of a
// range takes the leftmost best cut among the candidates its neighbours allow, and the halves
// search only on their side of it. O(n log n) interval costs per layer and row, each
//   prev[m] + (pq[i] - pq[m]) - (ps[i] - ps[m])^2 / max(i - m, 1)
// from prefix sums of the centred values (ps) and of their squares (pq), which the caller computes
// in torch, so the cuts are the same integers as in the torch layers (ties to the leftmost cut).
//
// Input: ps, pq float64 (G, n + 1). Output: int64 (G, k - 1), the count of values before each cut.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

struct Layer {
  const double* ps;
  const double* pq;
  const double* prev;
  double* cur;
  int64_t* arg;

  // Positions lo..hi of the layer, whose optimal last cut lies in olo..ohi.
  void solve(int64_t lo, int64_t hi, int64_t olo, int64_t ohi) const {
    while (lo <= hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      const int64_t end = std::min(mid, ohi);
      double best = std::numeric_limits<double>::infinity();
      int64_t pick = olo;
      const double psi = ps[mid], pqi = pq[mid];
      for (int64_t m = olo; m <= end; ++m) {
        const double sm = psi - ps[m];
        const double d = std::max(static_cast<double>(mid - m), 1.0);
        const double val = (prev[m] + (pqi - pq[m])) - (sm * sm) / d;
        if (val < best) {
          best = val;
          pick = m;
        }
      }
      cur[mid] = best;
      arg[mid] = pick;
      if (lo < mid) solve(lo, mid - 1, olo, pick);
      lo = mid + 1;  // the right half, without recursion
      olo = pick;
    }
  }
};

void solve_row(const double* ps, const double* pq, int64_t n, int64_t k, int64_t* cuts) {
  const int64_t width = n + 1;
  std::vector<double> prev(width), cur(width);
  std::vector<int64_t> args(static_cast<size_t>((k - 1) * width));
  for (int64_t i = 0; i < width; ++i) {
    prev[i] = pq[i] - (ps[i] * ps[i]) / std::max(static_cast<double>(i), 1.0);
  }
  for (int64_t j = 1; j < k; ++j) {
    Layer layer{ps, pq, prev.data(), cur.data(), args.data() + (j - 1) * width};
    layer.solve(0, n, 0, n);
    std::swap(prev, cur);
  }
  int64_t idx = n;
  for (int64_t j = k - 1; j >= 1; --j) {
    idx = args[(j - 1) * width + idx];
    cuts[j - 1] = idx;
  }
}

at::Tensor kmeans_dp_cpu(const at::Tensor& ps_in, const at::Tensor& pq_in, int64_t k) {
  TORCH_CHECK(ps_in.dim() == 2 && ps_in.scalar_type() == at::kDouble, "kmeans_dp expects 2-D float64 prefix sums");
  TORCH_CHECK(pq_in.sizes() == ps_in.sizes() && pq_in.scalar_type() == at::kDouble,
              "kmeans_dp: the two prefix-sum tables must have the same shape and dtype");
  TORCH_CHECK(ps_in.size(1) >= 1, "kmeans_dp needs prefix sums of at least 1 column");
  TORCH_CHECK(k >= 2, "kmeans_dp needs k >= 2, got ", k);
  const at::Tensor ps = ps_in.contiguous(), pq = pq_in.contiguous();
  const int64_t g = ps.size(0), width = ps.size(1), n = width - 1;
  at::Tensor out = at::empty({g, k - 1}, ps.options().dtype(at::kLong));
  const double* psd = ps.data_ptr<double>();
  const double* pqd = pq.data_ptr<double>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, g, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) solve_row(psd + r * width, pqd + r * width, n, k, o + r * (k - 1));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_splitquant, m) { m.def("kmeans_dp(Tensor ps, Tensor pq, int k) -> Tensor"); }

TORCH_LIBRARY_IMPL(optimum_splitquant, CPU, m) { m.impl("kmeans_dp", &kmeans_dp_cpu); }
