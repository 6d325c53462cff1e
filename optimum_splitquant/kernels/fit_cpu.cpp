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

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
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

template <class T>
inline float stored(double v) {
  return static_cast<float>(T(static_cast<float>(v)));
}

template <class T>
void fit_lines(const float* w, int64_t* ids, float* codes, T* offset, T* scale, int64_t lines, int64_t g, int64_t k,
               int64_t levels, int64_t iters, std::atomic<bool>& overflow) {
  const float top = static_cast<float>(levels - 1);
  at::parallel_for(0, lines, std::max<int64_t>(1, 16384 / std::max<int64_t>(g, 1)), [&](int64_t l0, int64_t l1) {
    std::vector<double> n(k), sc(k), sw(k), scc(k), scw(k);
    std::vector<float> off(k), sca(k);
    for (int64_t l = l0; l < l1; ++l) {
      const float* wl = w + l * g;
      int64_t* il = ids + l * g;
      float* cl = codes + l * g;
      T* ol = offset + l * k;
      T* sl = scale + l * k;
      for (int64_t it = 0; it < iters; ++it) {
        std::fill(n.begin(), n.end(), 0.0);
        std::fill(sc.begin(), sc.end(), 0.0);
        std::fill(sw.begin(), sw.end(), 0.0);
        std::fill(scc.begin(), scc.end(), 0.0);
        std::fill(scw.begin(), scw.end(), 0.0);
        for (int64_t i = 0; i < g; ++i) {
          const int64_t j = il[i];
          const double c = static_cast<double>(cl[i]);
          const double x = static_cast<double>(wl[i]);
          n[j] += 1.0;
          sc[j] += c;
          sw[j] += x;
          scc[j] += c * c;
          scw[j] += c * x;
        }
        for (int64_t j = 0; j < k; ++j) {
          const double var = n[j] * scc[j] - sc[j] * sc[j];
          double s = var > 0 ? (n[j] * scw[j] - sc[j] * sw[j]) / var : static_cast<double>(static_cast<float>(sl[j]));
          s = s > 0 ? s : 0.0;
          const double o = n[j] > 0 ? (sw[j] - s * sc[j]) / std::max(n[j], 1.0)
                                    : static_cast<double>(static_cast<float>(ol[j]));
          sca[j] = stored<T>(s);
          off[j] = stored<T>(o);
          if (!std::isfinite(sca[j]) || !std::isfinite(off[j])) overflow = true;
          sl[j] = T(sca[j]);
          ol[j] = T(off[j]);
        }
        for (int64_t i = 0; i < g; ++i) {
          const float x = wl[i];
          float best_err = 0.0f, best_code = 0.0f;
          int64_t best_j = 0;
          for (int64_t j = 0; j < k; ++j) {
            const float steps = sca[j] > 0 ? (x - off[j]) / sca[j] : 0.0f;
            const float code = std::min(std::max(std::nearbyint(steps), 0.0f), top);
            const float err = std::fabs(x - (off[j] + code * sca[j]));
            if (j == 0 || err < best_err) {
              best_err = err;
              best_code = code;
              best_j = j;
            }
          }
          il[i] = best_j;
          cl[i] = best_code;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fit_mse_cpu(const at::Tensor& w, const at::Tensor& ids,
                                                                       const at::Tensor& codes,
                                                                       const at::Tensor& offset,
                                                                       const at::Tensor& scale, int64_t bits,
                                                                       int64_t iters) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "w must be a float32 (lines, g) tensor");
  TORCH_CHECK(ids.sizes() == w.sizes() && ids.scalar_type() == at::kLong, "ids must be int64 of w's shape");
  TORCH_CHECK(codes.sizes() == w.sizes() && codes.scalar_type() == at::kFloat, "codes must be float32 of w's shape");
  TORCH_CHECK(offset.dim() == 2 && offset.size(0) == w.size(0) && scale.sizes() == offset.sizes(),
              "offset and scale must be (lines, k)");
  TORCH_CHECK(offset.scalar_type() == scale.scalar_type(), "offset and scale must share a dtype");
  TORCH_CHECK(bits >= 1 && bits <= 16 && iters >= 0, "bad bits or iters");
  const int64_t lines = w.size(0), g = w.size(1), k = offset.size(1);
  const at::Tensor wc = w.contiguous();
  at::Tensor ids_out = ids.contiguous().clone();
  at::Tensor codes_out = codes.contiguous().clone();
  at::Tensor off_out = offset.contiguous().clone();
  at::Tensor scale_out = scale.contiguous().clone();
  // The loop reads each member's cluster id as an index: refuse out-of-range ids before touching memory.
  if (ids_out.numel()) {
    const auto mm = ids_out.aminmax();
    TORCH_CHECK(std::get<0>(mm).item<int64_t>() >= 0 && std::get<1>(mm).item<int64_t>() < k, "ids out of range");
  }
  std::atomic<bool> overflow{false};
  const int64_t levels = int64_t{1} << bits;
  if (lines && g && k) {
    switch (offset.scalar_type()) {
      case at::kHalf:
        fit_lines(wc.data_ptr<float>(), ids_out.data_ptr<int64_t>(), codes_out.data_ptr<float>(),
                  off_out.data_ptr<c10::Half>(), scale_out.data_ptr<c10::Half>(), lines, g, k, levels, iters, overflow);
        break;
      case at::kBFloat16:
        fit_lines(wc.data_ptr<float>(), ids_out.data_ptr<int64_t>(), codes_out.data_ptr<float>(),
                  off_out.data_ptr<c10::BFloat16>(), scale_out.data_ptr<c10::BFloat16>(), lines, g, k, levels, iters,
                  overflow);
        break;
      case at::kFloat:
        fit_lines(wc.data_ptr<float>(), ids_out.data_ptr<int64_t>(), codes_out.data_ptr<float>(),
                  off_out.data_ptr<float>(), scale_out.data_ptr<float>(), lines, g, k, levels, iters, overflow);
        break;
      default:
        TORCH_CHECK(false, "offset and scale must be float16, bfloat16 or float32");
    }
  }
  TORCH_CHECK(!overflow, "fitted ranges overflow the storage dtype");
  return {ids_out, codes_out, off_out, scale_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_splitquant, m) {
  m.def("fit_mse(Tensor w, Tensor ids, Tensor codes, Tensor offset, Tensor scale, int bits, int iters) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(optimum_splitquant, CPU, m) { m.impl("fit_mse", &fit_mse_cpu); }
