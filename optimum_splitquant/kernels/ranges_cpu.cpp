// Coded ranges (formats 2 to 4): the compiled twin of core/ranges.py's decode of a layer's stored
// range codes and steps, run on every forward pass of a layer that holds only its stored bits. One
// pass over the packed codes (unpacked a tile at a time into a small buffer), in parallel over lines,
// instead of the several torch ops of the pure-torch unpack and decode.
//
// Stored: `codes`, one packed row of 2 * lines * k symbols of r bits (core/packing.py: symbol i at
// stream bits [i * r, (i + 1) * r), LSB first, so eight symbols fill r bytes): all scale codes in
// (line, cluster) order, then all offset codes; `steps` (blocks, 2, k) in any float dtype, line l
// in block l / range_block. Decoded, each product in float32 then rounded once to scale_dtype (round
// to nearest even, subnormals included, as torch's casts):
//
//   scale  = code * scale_step
//   offset = (code - zero) * offset_step      zero = 2**(r - 1) with signed offsets (format 3), else 0

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTileCodes = 4096;  // codes of each kind unpacked at a time by one thread
constexpr int64_t kGrain = 8192;      // codes per parallel chunk, at least

// Symbol `s` of the stream, read on its own (the ends of a span that are not whole runs of eight).
inline uint8_t symbol_at(const uint8_t* p, int64_t nbytes, int r, int64_t s) {
  const int64_t bit = s * r;
  const int64_t byte = bit >> 3;
  unsigned v = p[byte];
  if (byte + 1 < nbytes) v |= static_cast<unsigned>(p[byte + 1]) << 8;
  return static_cast<uint8_t>((v >> (bit & 7)) & ((1u << r) - 1));
}

// Symbols [s, s + n) into dst. A whole run of eight symbols (R bytes) is read with the bytes after it as
// one little-endian 64-bit word (a single load; the last runs of the stream are copied into a zeroed word).
template <int R>
void unpack_span(const uint8_t* p, int64_t nbytes, int64_t s, int64_t n, uint8_t* dst) {
  constexpr uint64_t mask = (uint64_t{1} << R) - 1;
  int64_t i = 0;
  for (; i < n && (s + i) % 8 != 0; ++i) dst[i] = symbol_at(p, nbytes, R, s + i);
  for (; i + 8 <= n; i += 8) {
    const int64_t at = (s + i) / 8 * R;
    uint64_t w = 0;
    if (at + 8 <= nbytes)
      std::memcpy(&w, p + at, 8);  // x86 / ARM targets are little-endian
    else
      std::memcpy(&w, p + at, R);
    for (int j = 0; j < 8; ++j) dst[i + j] = static_cast<uint8_t>((w >> (j * R)) & mask);
  }
  for (; i < n; ++i) dst[i] = symbol_at(p, nbytes, R, s + i);
}

void unpack(const uint8_t* p, int64_t nbytes, int r, int64_t s, int64_t n, uint8_t* dst) {
  switch (r) {
    case 4: return unpack_span<4>(p, nbytes, s, n, dst);
    case 5: return unpack_span<5>(p, nbytes, s, n, dst);
    case 6: return unpack_span<6>(p, nbytes, s, n, dst);
    case 7: return unpack_span<7>(p, nbytes, s, n, dst);
    case 8: return unpack_span<8>(p, nbytes, s, n, dst);
    default: TORCH_CHECK(false, "decode_ranges: range_bits must be 4 to 8, got ", r);
  }
}

#if defined(__x86_64__) || defined(_M_X64)
#define SQ_RANGES_X86 1
#define SQ_AVX2_F16C __attribute__((target("avx2,f16c")))

// 8 codes (uint8) to float32, minus `zero`, times their 8 steps.
SQ_AVX2_F16C inline __m256 products8(const uint8_t* c, const float* st, __m256 zero) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
  return _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(b), zero), _mm256_loadu_ps(st));
}

// fp16 stores: the hardware conversion rounds to nearest even, subnormals included (as c10::Half).
SQ_AVX2_F16C int64_t finish_half8(const uint8_t* c, const float* st, int64_t n, float zero, c10::Half* out) {
  const __m256 z = _mm256_set1_ps(zero);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(products8(c + i, st + i, z), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return i;
}

// bf16 stores: round to nearest even on the bits, NaN to 0x7FC0 (c10::BFloat16's conversion).
SQ_AVX2_F16C int64_t finish_bf16_8(const uint8_t* c, const float* st, int64_t n, float zero, c10::BFloat16* out) {
  const __m256 z = _mm256_set1_ps(zero);
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), nan = _mm256_set1_epi32(0x7FC0);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = products8(c + i, st + i, z);
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i h = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, bias), lsb), 16);
    h = _mm256_blendv_epi8(h, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);  // 8 x 16 bits, low half
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_castsi256_si128(packed));
  }
  return i;
}
#endif

bool use_avx2() {
#ifdef SQ_RANGES_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// out[i] = ((c[i] - zero) * st[i]) in float32, rounded to S (a subtraction of 0 changes no value).
template <class S>
void finish(const uint8_t* c, const float* st, int64_t n, float zero, S* out, bool avx2) {
  int64_t i = 0;
#ifdef SQ_RANGES_X86
  if constexpr (std::is_same_v<S, c10::Half>) {
    if (avx2) i = finish_half8(c, st, n, zero, out);
  } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
    if (avx2) i = finish_bf16_8(c, st, n, zero, out);
  }
#endif
  for (; i < n; ++i) out[i] = static_cast<S>((static_cast<float>(c[i]) - zero) * st[i]);
}

// Lines [l0, l1), a tile at a time: codes unpacked, each code's step laid beside it, then the products.
template <class S>
void decode_chunk(const uint8_t* p, int64_t nbytes, int r, const float* steps, int64_t lines, int64_t k,
                  int64_t block, float zero, int64_t l0, int64_t l1, S* scale, S* offset, bool avx2) {
  const int64_t tile = std::max<int64_t>(1, kTileCodes / k);
  const size_t cap = static_cast<size_t>(std::min(tile, l1 - l0) * k);
  std::vector<uint8_t> sc(cap), oc(cap);
  std::vector<float> ss(cap), os(cap);
  for (int64_t t0 = l0; t0 < l1; t0 += tile) {
    const int64_t t1 = std::min(t0 + tile, l1);
    const int64_t n = (t1 - t0) * k;
    unpack(p, nbytes, r, t0 * k, n, sc.data());
    unpack(p, nbytes, r, (lines + t0) * k, n, oc.data());
    for (int64_t a = t0; a < t1;) {  // one block's lines at a time
      const int64_t b = a / block;
      const int64_t e = std::min(t1, (b + 1) * block);
      const float* st = steps + b * 2 * k;
      if (k == 1) {
        std::fill(ss.begin() + (a - t0), ss.begin() + (e - t0), st[0]);
        std::fill(os.begin() + (a - t0), os.begin() + (e - t0), st[1]);
      } else {
        for (int64_t l = a; l < e; ++l)
          for (int64_t j = 0; j < k; ++j) {
            ss[(l - t0) * k + j] = st[j];
            os[(l - t0) * k + j] = st[k + j];
          }
      }
      a = e;
    }
    finish<S>(sc.data(), ss.data(), n, 0.0f, scale + t0 * k, avx2);
    finish<S>(oc.data(), os.data(), n, zero, offset + t0 * k, avx2);
  }
}

template <class S>
void decode_all(const uint8_t* p, int64_t nbytes, int r, const float* steps, int64_t lines, int64_t k,
                int64_t block, float zero, S* scale, S* offset) {
  const bool avx2 = use_avx2();
  at::parallel_for(0, lines, std::max<int64_t>(1, kGrain / k), [&](int64_t l0, int64_t l1) {
    decode_chunk<S>(p, nbytes, r, steps, lines, k, block, zero, l0, l1, scale, offset, avx2);
  });
}

// float32 copy of the steps (as torch's steps.float()): a few values per block.
std::vector<float> steps_as_float(const at::Tensor& steps) {
  std::vector<float> out(static_cast<size_t>(steps.numel()));
  const at::Tensor s = steps.contiguous();
  switch (s.scalar_type()) {
    case at::kFloat: std::memcpy(out.data(), s.data_ptr<float>(), out.size() * sizeof(float)); break;
    case at::kHalf: std::copy_n(s.data_ptr<c10::Half>(), out.size(), out.begin()); break;
    case at::kBFloat16: std::copy_n(s.data_ptr<c10::BFloat16>(), out.size(), out.begin()); break;
    default: {
      const at::Tensor f = s.to(at::kFloat);
      std::memcpy(out.data(), f.data_ptr<float>(), out.size() * sizeof(float));
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> decode_ranges_cpu(const at::Tensor& codes, const at::Tensor& steps, int64_t lines,
                                                     int64_t range_bits, int64_t range_block, bool signed_offsets,
                                                     at::ScalarType scale_dtype) {
  TORCH_CHECK(codes.device().is_cpu() && steps.device().is_cpu(), "decode_ranges runs on CPU tensors");
  TORCH_CHECK(codes.scalar_type() == at::kByte, "decode_ranges: codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK(range_bits >= 4 && range_bits <= 8, "decode_ranges: range_bits must be 4 to 8, got ", range_bits);
  TORCH_CHECK(range_block >= 1 && lines >= 0, "decode_ranges: bad range_block ", range_block, " or lines ", lines);
  TORCH_CHECK(steps.dim() == 3 && steps.size(1) == 2 && steps.size(2) >= 1 && steps.is_floating_point(),
              "decode_ranges: steps must be a float (blocks, 2, k) tensor, got ", steps.sizes());
  TORCH_CHECK(scale_dtype == at::kHalf || scale_dtype == at::kBFloat16 || scale_dtype == at::kFloat,
              "decode_ranges: scale_dtype must be float16, bfloat16 or float32, got ", scale_dtype);
  const int64_t k = steps.size(2);
  const int64_t blocks = lines == 0 ? 0 : (lines + range_block - 1) / range_block;
  TORCH_CHECK(steps.size(0) == blocks, "decode_ranges: ", lines, " lines in blocks of ", range_block, " need ",
              blocks, " step pairs, got ", steps.size(0));
  const int64_t nbytes = (2 * lines * k + 7) / 8 * range_bits;
  TORCH_CHECK(codes.numel() == nbytes, "decode_ranges: ", 2 * lines * k, " codes of ", range_bits, " bits pack into ",
              nbytes, " bytes, got ", codes.numel());
  const at::Tensor c = codes.contiguous();
  const std::vector<float> st = steps_as_float(steps);
  const float zero = signed_offsets ? static_cast<float>(int64_t{1} << (range_bits - 1)) : 0.0f;
  at::Tensor scale = at::empty({lines, k}, codes.options().dtype(scale_dtype));
  at::Tensor offset = at::empty({lines, k}, codes.options().dtype(scale_dtype));
  const uint8_t* p = c.data_ptr<uint8_t>();
  const int r = static_cast<int>(range_bits);
  switch (scale_dtype) {
    case at::kHalf:
      decode_all(p, nbytes, r, st.data(), lines, k, range_block, zero, scale.data_ptr<c10::Half>(),
                 offset.data_ptr<c10::Half>());
      break;
    case at::kBFloat16:
      decode_all(p, nbytes, r, st.data(), lines, k, range_block, zero, scale.data_ptr<c10::BFloat16>(),
                 offset.data_ptr<c10::BFloat16>());
      break;
    default:
      decode_all(p, nbytes, r, st.data(), lines, k, range_block, zero, scale.data_ptr<float>(),
                 offset.data_ptr<float>());
  }
  return {scale, offset};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_splitquant, m) {
  m.def("decode_ranges(Tensor codes, Tensor steps, int lines, int range_bits, int range_block, bool signed_offsets, "
        "ScalarType scale_dtype) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(optimum_splitquant, CPU, m) { m.impl("decode_ranges", &decode_ranges_cpu); }
