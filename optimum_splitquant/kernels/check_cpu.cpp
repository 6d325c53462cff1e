// Load-time check of SplitQuant layers' stored tensors: the compiled twin of
// SplitQuantModule.validate()'s pure-torch path (optimum_splitquant/nn/compact.py). One call for a
// model's layers (checked in parallel), one pass each over a layer's ranges and packed bytes,
// instead of a dozen torch ops per layer.
//
// One verdict per layer: 0 when its tensors are valid, 1 when a range is bad (a scale or offset not
// finite, a negative scale, or a rebuilt extreme offset + (levels - 1) * scale that is not finite
// in float32 or in the compute dtype), 2 when a symbol (row padding included) holds a cluster id
// >= num_clusters. The caller names the problem on its slow path.
//
// Packed layout (core/packing.py, format version 1): symbol i of a row sits at stream bits
// [i * width, (i + 1) * width), LSB first, symbol = id << bits | code; eight symbols fill exactly
// `width` bytes and rows are padded with zero symbols to a multiple of 8, so the whole buffer is a
// sequence of `width`-byte runs of eight symbols. Ids are compared without decoding a symbol: after
// shifting out the code bits, each id sits in a field with free bits above it (the next symbol's
// code bits, masked off); adding 2**id_bits - k to every field carries into the bit above exactly
// the ids >= k.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using u128 = unsigned __int128;

// Carry masks for `fields` id fields of `width` bits starting at bit 0 of a word.
template <class Word>
void id_masks(int fields, int width, int id_bits, int64_t k, Word& mask, Word& add, Word& carry) {
  mask = add = carry = 0;
  for (int s = 0; s < fields; ++s) {
    mask |= ((Word{1} << id_bits) - 1) << (s * width);
    add |= static_cast<Word>((int64_t{1} << id_bits) - k) << (s * width);
    carry |= Word{1} << (s * width + id_bits);
  }
}

// Widths dividing 64: the buffer read as 64-bit words in place (a zero-padded last word).
bool ids_ok_words(const uint8_t* p, int64_t n, int width, int bits, int id_bits, int64_t k) {
  uint64_t mask, add, carry;
  id_masks<uint64_t>(64 / width, width, id_bits, k, mask, add, carry);
  uint64_t seen = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);  // x86 / ARM targets are little-endian
    seen |= (((w >> bits) & mask) + add) & carry;
  }
  if (i < n) {
    uint64_t w = 0;
    std::memcpy(&w, p + i, static_cast<size_t>(n - i));
    seen |= (((w >> bits) & mask) + add) & carry;
  }
  return seen == 0;
}

// Other widths (<= 16): each `width`-byte run of eight symbols read as one 128-bit word.
template <int W>
bool ids_ok_runs(const uint8_t* p, int64_t n, int bits, int id_bits, int64_t k) {
  u128 mask, add, carry;
  id_masks<u128>(8, W, id_bits, k, mask, add, carry);
  u128 seen = 0;
  for (int64_t i = 0; i + W <= n; i += W) {
    u128 w = 0;
    std::memcpy(&w, p + i, W);
    seen |= (((w >> bits) & mask) + add) & carry;
  }
  return seen == 0;
}

bool ids_ok(const uint8_t* p, int64_t n, int width, int bits, int64_t k) {
  const int id_bits = width - bits;
  if (k >= (int64_t{1} << id_bits)) return true;  // every id pattern is a valid cluster
  switch (width) {
    case 1: case 2: case 4: case 8: case 16:
      return ids_ok_words(p, n, width, bits, id_bits, k);
    case 3: return ids_ok_runs<3>(p, n, bits, id_bits, k);
    case 5: return ids_ok_runs<5>(p, n, bits, id_bits, k);
    case 6: return ids_ok_runs<6>(p, n, bits, id_bits, k);
    case 7: return ids_ok_runs<7>(p, n, bits, id_bits, k);
    case 9: return ids_ok_runs<9>(p, n, bits, id_bits, k);
    case 10: return ids_ok_runs<10>(p, n, bits, id_bits, k);
    case 11: return ids_ok_runs<11>(p, n, bits, id_bits, k);
    case 12: return ids_ok_runs<12>(p, n, bits, id_bits, k);
    case 13: return ids_ok_runs<13>(p, n, bits, id_bits, k);
    case 14: return ids_ok_runs<14>(p, n, bits, id_bits, k);
    case 15: return ids_ok_runs<15>(p, n, bits, id_bits, k);
    default: TORCH_CHECK(false, "check_stored: bad symbol width ", width);
  }
}

// Whether float32 `v` stays finite once rounded to the compute dtype.
bool finite_in(float v, at::ScalarType dtype) {
  if (!std::isfinite(v)) return false;
  switch (dtype) {
    case at::kHalf: return std::isfinite(static_cast<float>(c10::Half(v)));
    case at::kBFloat16: return std::isfinite(static_cast<float>(c10::BFloat16(v)));
    default: return true;  // float32, float64: v is already finite
  }
}

// Scales non-negative, and the extremes of scale, offset and offset + top * scale (float32) finite
// in float32 and in the compute dtype (rounding is monotonic, so the extremes bound every value).
bool ranges_ok(const float* scale, const float* offset, int64_t n, float top, at::ScalarType dtype) {
  if (n == 0) return true;
  const float inf = INFINITY;
  float smin = inf, smax = -inf, omin = inf, omax = -inf, hmin = inf, hmax = -inf;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float s = scale[i], o = offset[i];
    const float h = o + top * s;  // two roundings, as weights are rebuilt (-ffp-contract=off)
    nan |= (s != s) | (o != o) | (h != h);
    smin = s < smin ? s : smin;
    smax = s > smax ? s : smax;
    omin = o < omin ? o : omin;
    omax = o > omax ? o : omax;
    hmin = h < hmin ? h : hmin;
    hmax = h > hmax ? h : hmax;
  }
  if (nan || smin < 0.0f) return false;
  for (const float v : {smin, smax, omin, omax, hmin, hmax})
    if (!finite_in(v, dtype)) return false;
  return true;
}

int64_t check_layer(const at::Tensor& packed, const at::Tensor& s32, const at::Tensor& o32, int64_t bits,
                    int64_t width, int64_t num_clusters, at::ScalarType dtype) {
  const float top = static_cast<float>((int64_t{1} << bits) - 1);
  if (!ranges_ok(s32.data_ptr<float>(), o32.data_ptr<float>(), s32.numel(), top, dtype)) return 1;
  if (!ids_ok(packed.data_ptr<uint8_t>(), packed.numel(), static_cast<int>(width), static_cast<int>(bits),
              num_clusters))
    return 2;
  return 0;
}

// One verdict per layer; layers are checked in parallel.
std::vector<int64_t> check_stored_cpu(at::TensorList packed, at::TensorList scale, at::TensorList offset,
                                      at::IntArrayRef bits, at::IntArrayRef width, at::IntArrayRef num_clusters,
                                      at::ScalarType dtype) {
  const int64_t n = static_cast<int64_t>(packed.size());
  TORCH_CHECK(static_cast<int64_t>(scale.size()) == n && static_cast<int64_t>(offset.size()) == n &&
                  static_cast<int64_t>(bits.size()) == n && static_cast<int64_t>(width.size()) == n &&
                  static_cast<int64_t>(num_clusters.size()) == n,
              "check_stored: one packed, scale, offset, bits, width and num_clusters per layer");
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(packed[i].device().is_cpu() && scale[i].device().is_cpu() && offset[i].device().is_cpu(),
                "check_stored runs on CPU tensors");
    TORCH_CHECK(packed[i].scalar_type() == at::kByte, "packed must be uint8");
    TORCH_CHECK(scale[i].scalar_type() == offset[i].scalar_type() && scale[i].sizes() == offset[i].sizes(),
                "scale and offset must have one dtype and shape");
    TORCH_CHECK(width[i] >= 1 && width[i] <= 16 && bits[i] >= 1 && bits[i] <= width[i],
                "check_stored: bad bits/width");
    TORCH_CHECK(num_clusters[i] >= 1, "check_stored: bad num_clusters");
  }
  std::vector<int64_t> verdicts(n, 0);
  at::parallel_for(0, n, 1, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const at::Tensor s32 = scale[i].to(at::kFloat).contiguous();
      const at::Tensor o32 = offset[i].to(at::kFloat).contiguous();
      verdicts[i] = check_layer(packed[i].contiguous(), s32, o32, bits[i], width[i], num_clusters[i], dtype);
    }
  });
  return verdicts;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_splitquant, m) {
  m.def("check_stored(Tensor[] packed, Tensor[] scale, Tensor[] offset, int[] bits, int[] width, "
        "int[] num_clusters, ScalarType dtype) -> int[]");
}

TORCH_LIBRARY_IMPL(optimum_splitquant, CPU, m) { m.impl("check_stored", &check_stored_cpu); }
