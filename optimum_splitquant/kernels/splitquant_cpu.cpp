// SplitQuant CPU kernels: dequantize, and a fused small-batch linear that reads the packed bytes.
//
// Registered as torch ops (schema below); compiled at first use by optimum_splitquant/kernels/_build.py
// with -ffp-contract=off so every dequantized weight is computed exactly as the pure-torch path does:
//     w = offset[row, group, id] + (scale[row, group, id] * float(code))      (two fp32 roundings)
// where symbol = id << bits | code is read from the layout of core/packing.py (format version 1):
// symbol i of a row sits at stream bits [i * width, (i + 1) * width), LSB first, eight symbols fill
// exactly `width` bytes and rows are padded with zero symbols to a multiple of 8.
//
// Paths: an AVX-512 path (symbol width <= 8, whole-row ranges or group_size % 16 == 0), chosen at run
// time when the CPU has AVX-512 F/BW/DQ/VL; an AVX2 + FMA path (same conditions); a portable scalar
// path for everything else. Cluster ids >= num_clusters (rejected by SplitQuantLinear.validate) read
// as 0 here, where the pure-torch gather would raise.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SQ_X86 1
#else
#define SQ_X86 0
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// Problem description shared by every path.
struct Problem {
  const uint8_t* packed;  // (out, row_bytes)
  const uint8_t* end;     // packed + out * row_bytes
  const float* scale;     // (out, groups, k) as fp32
  const float* offset;    // (out, groups, k) as fp32
  int64_t out;
  int64_t in;
  int64_t row_bytes;
  int64_t groups;
  int64_t group_size;  // in / groups
  int64_t k;
  int bits;
  int width;
};

// Little-endian load of `n` (<= 8) bytes at p; `end` bounds the buffer. One 8-byte load when it
// stays inside the buffer (a byte-wise copy would stall on store forwarding), masked to n bytes.
inline uint64_t load_le(const uint8_t* p, int n, const uint8_t* end) {
  uint64_t v = 0;
  if (p + 8 <= end) {
    std::memcpy(&v, p, 8);  // x86 / ARM targets are little-endian
    return n >= 8 ? v : v & ((uint64_t{1} << (8 * n)) - 1);
  }
  for (int b = 0; b < n; ++b) v |= static_cast<uint64_t>(p[b]) << (8 * b);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Portable path: decode one row into fp32 (exact arithmetic of the pure-torch path).
void row_scalar(const Problem& P, int64_t r, float* dst) {
  const uint8_t* row = P.packed + r * P.row_bytes;
  const float* sc = P.scale + r * P.groups * P.k;
  const float* of = P.offset + r * P.groups * P.k;
  const uint32_t mask = (1u << P.width) - 1u;
  const uint32_t code_mask = (1u << P.bits) - 1u;
  const int w = P.width;
  for (int64_t c = 0; c * 8 < P.in; ++c) {
    // Eight symbols fill `width` (<= 16) bytes: read them as two 64-bit halves.
    const uint8_t* p = row + c * w;
    const uint64_t lo = load_le(p, w < 8 ? w : 8, P.end);
    const uint64_t hi = w > 8 ? load_le(p + 8, w - 8, P.end) : 0;
    for (int j = 0; j < 8; ++j) {
      const int64_t i = c * 8 + j;
      if (i >= P.in) break;
      const int bit = j * w;
      uint64_t v = bit < 64 ? (lo >> bit) : 0;
      if (bit > 0 && bit < 64 && w > 8) v |= hi << (64 - bit);
      if (bit >= 64) v = hi >> (bit - 64);
      const uint32_t s = static_cast<uint32_t>(v) & mask;
      const uint32_t id = s >> P.bits;
      float value = 0.0f;
      if (id < static_cast<uint32_t>(P.k)) {
        const int64_t at = (i / P.group_size) * P.k + id;
        const float step = sc[at] * static_cast<float>(s & code_mask);
        value = of[at] + step;
      }
      dst[i] = value;
    }
  }
}

int64_t row_grain(const Problem& P, int64_t tokens);

void dequantize_scalar(const Problem& P, float* out) {
  at::parallel_for(0, P.out, row_grain(P, 1), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_scalar(P, r, out + r * P.in);
  });
}

void linear_scalar(const Problem& P, const float* x, int64_t M, const float* bias, float* y) {
  at::parallel_for(0, P.out, row_grain(P, M), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(static_cast<size_t>(P.in));
    for (int64_t r = r0; r < r1; ++r) {
      row_scalar(P, r, buf.data());
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * P.in;
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= P.in; i += 8)
          for (int l = 0; l < 8; ++l) part[l] += buf[i + l] * xm[i + l];
        for (; i < P.in; ++i) part[0] += buf[i] * xm[i];
        const float s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        y[m * P.out + r] = s + (bias ? bias[r] : 0.0f);
      }
    }
  });
}

#if SQ_X86
// ---------------------------------------------------------------------------------------------
// AVX-512 path: 16 symbols per step, unpacked to int32 lanes, looked up in a register table.
#define SQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

// Symbols [16c, 16c + 16) of a row as int32 lanes; `full` is false when only 8 padded symbols remain.
template <int W>
SQ_AVX512 inline __m512i unpack16_512(const uint8_t* p, bool full, const uint8_t* end) {
  if constexpr (W == 4) {
    const __m128i b = full ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))
                           : _mm_cvtsi32_si128(static_cast<int>(load_le(p, 4, end)));
    const __m128i nib = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, nib);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
  } else if constexpr (W == 8) {
    const __m128i b = full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                           : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepu8_epi32(b);
  } else if constexpr (W == 2) {
    const __m128i b = _mm_cvtsi32_si128(static_cast<int>(load_le(p, full ? 4 : 2, end)));
    const __m128i spread = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    const __m512i v = _mm512_cvtepu8_epi32(spread);
    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
    return _mm512_and_si512(_mm512_srlv_epi32(v, sh), _mm512_set1_epi32(3));
  } else {
    const __m512i sh = _mm512_setr_epi64(0, W, 2 * W, 3 * W, 4 * W, 5 * W, 6 * W, 7 * W);
    const __m512i m = _mm512_set1_epi64((1 << W) - 1);
    const uint64_t v0 = load_le(p, W, end);
    const uint64_t v1 = full ? load_le(p + W, W, end) : 0;
    const __m256i a = _mm512_cvtepi64_epi32(
        _mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64(static_cast<long long>(v0)), sh), m));
    const __m256i b = _mm512_cvtepi64_epi32(
        _mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64(static_cast<long long>(v1)), sh), m));
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
  }
}

// Per-(row, group) lookup: widths <= 6 use a table of 2**W entries held in up to four registers;
// wider symbols gather offset and scale by cluster id (k <= 16) and compute offset + scale * code.
template <int W>
struct Lookup512 {
  __m512 t0, t1;  // table entries 0-15, 16-31 (W <= 6), or offsets / scales by id (W > 6)
  __m512 t2, t3;  // table entries 32-47, 48-63 (W == 6)
  __m512i shift, code_mask;

  SQ_AVX512 inline void setup(const float* of, const float* sc, int64_t k, int bits) {
    const __mmask16 valid = static_cast<__mmask16>((1u << k) - 1u);
    const __m512 offv = _mm512_maskz_loadu_ps(valid, of);
    const __m512 scv = _mm512_maskz_loadu_ps(valid, sc);
    shift = _mm512_set1_epi32(bits);
    code_mask = _mm512_set1_epi32((1 << bits) - 1);
    if constexpr (W <= 6) {
      const __m512i s0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      t0 = eval(s0, offv, scv);
      if constexpr (W >= 5) t1 = eval(_mm512_add_epi32(s0, _mm512_set1_epi32(16)), offv, scv);
      if constexpr (W == 6) {
        t2 = eval(_mm512_add_epi32(s0, _mm512_set1_epi32(32)), offv, scv);
        t3 = eval(_mm512_add_epi32(s0, _mm512_set1_epi32(48)), offv, scv);
      }
    } else {
      t0 = offv;
      t1 = scv;
    }
  }

  SQ_AVX512 inline __m512 eval(__m512i sym, __m512 offv, __m512 scv) const {
    const __m512i id = _mm512_srlv_epi32(sym, shift);
    const __m512 code = _mm512_cvtepi32_ps(_mm512_and_si512(sym, code_mask));
    // ids >= 16 (only possible in the table's upper half for small k) must read 0.
    const __mmask16 in_range = _mm512_cmplt_epu32_mask(id, _mm512_set1_epi32(16));
    const __m512 o = _mm512_maskz_permutexvar_ps(in_range, id, offv);
    const __m512 s = _mm512_maskz_permutexvar_ps(in_range, id, scv);
    return _mm512_add_ps(o, _mm512_mul_ps(s, code));
  }

  SQ_AVX512 inline __m512 operator()(__m512i sym) const {
    if constexpr (W <= 4) {
      return _mm512_permutexvar_ps(sym, t0);
    } else if constexpr (W == 5) {
      return _mm512_permutex2var_ps(t0, sym, t1);
    } else if constexpr (W == 6) {
      const __m512 lo = _mm512_permutex2var_ps(t0, sym, t1);
      const __m512 hi = _mm512_permutex2var_ps(t2, sym, t3);
      return _mm512_mask_mov_ps(lo, _mm512_test_epi32_mask(sym, _mm512_set1_epi32(32)), hi);
    } else {
      return eval(sym, t0, t1);
    }
  }
};

using Even = std::integral_constant<int, 0>;
using Odd = std::integral_constant<int, 1>;

// Calls f(sym_start, n_valid, weights, parity) for every 16-symbol step of row r (n_valid < 16 only
// at the end); parity alternates 0, 1 (a compile-time constant) so callers can keep two independent
// accumulator chains instead of waiting on one FMA's latency per step.
template <int W, class F>
SQ_AVX512 inline void walk_row_512(const Problem& P, int64_t r, F&& f) {
  const uint8_t* row = P.packed + r * P.row_bytes;
  const float* sc = P.scale + r * P.groups * P.k;
  const float* of = P.offset + r * P.groups * P.k;
  const int64_t padded = ((P.in + 7) / 8) * 8;
  Lookup512<W> lut;
  for (int64_t g = 0; g < P.groups; ++g) {
    lut.setup(of + g * P.k, sc + g * P.k, P.k, P.bits);
    const int64_t s0 = g * P.group_size;
    const int64_t s1 = s0 + P.group_size;
    int64_t s = s0;
    for (; s + 32 <= s1; s += 32) {
      const __m512i a = unpack16_512<W>(row + (s >> 3) * W, true, P.end);
      const __m512i b = unpack16_512<W>(row + ((s + 16) >> 3) * W, true, P.end);
      f(s, 16, lut(a), Even{});
      f(s + 16, 16, lut(b), Odd{});
    }
    if (s < s1) {
      f(s, s1 - s < 16 ? s1 - s : 16, lut(unpack16_512<W>(row + (s >> 3) * W, s + 16 <= padded, P.end)), Even{});
      s += 16;
    }
    if (s < s1) f(s, s1 - s, lut(unpack16_512<W>(row + (s >> 3) * W, s + 16 <= padded, P.end)), Odd{});
  }
}

template <int W>
SQ_AVX512 void dequantize_rows_512(const Problem& P, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    float* dst = out + r * P.in;
    walk_row_512<W>(P, r, [&](int64_t s, int64_t n, __m512 w, auto) SQ_AVX512 {
      if (n == 16) {
        _mm512_storeu_ps(dst + s, w);
      } else {
        _mm512_mask_storeu_ps(dst + s, static_cast<__mmask16>((1u << n) - 1u), w);
      }
    });
  }
}

SQ_AVX512 inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

template <int W, int MB>
SQ_AVX512 void linear_rows_512(const Problem& P, int64_t r0, int64_t r1, const float* x, const float* bias,
                               float* y) {
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[2][MB];
    for (int m = 0; m < MB; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    walk_row_512<W>(P, r, [&](int64_t s, int64_t n, __m512 w, auto parity) SQ_AVX512 {
      constexpr int p = decltype(parity)::value;
      if (n == 16) {
        for (int m = 0; m < MB; ++m) acc[p][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * P.in + s), acc[p][m]);
      } else {
        const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1u);
        for (int m = 0; m < MB; ++m)
          acc[p][m] = _mm512_fmadd_ps(_mm512_maskz_mov_ps(keep, w), _mm512_maskz_loadu_ps(keep, x + m * P.in + s),
                                      acc[p][m]);
      }
    });
    const float b = bias ? bias[r] : 0.0f;
    for (int m = 0; m < MB; ++m) y[m * P.out + r] = hsum512(_mm512_add_ps(acc[0][m], acc[1][m])) + b;
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 path: the same walk with 8 symbols per step (width <= 8).
#define SQ_AVX2 __attribute__((target("avx2,fma")))

template <int W>
SQ_AVX2 inline __m256i unpack8_256(const uint8_t* p, const uint8_t* end) {
  // Eight symbols fill exactly W bytes; spread the 64-bit word over the lanes and shift.
  const uint64_t v = load_le(p, W, end);
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(v)));
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(v >> 32)));
  // Symbol j starts at bit j*W; for j*W + W <= 32 it lies in `lo`, for j*W >= 32 in `hi`; one
  // symbol may straddle, rebuilt from both halves (srlv/sllv give 0 for counts >= 32).
  alignas(32) int lo_shift[8], hi_shift_left[8], hi_shift_right[8];
  for (int j = 0; j < 8; ++j) {
    const int b = j * W;
    lo_shift[j] = b < 32 ? b : 32;
    hi_shift_left[j] = b < 32 ? 32 - b : 32;
    hi_shift_right[j] = b >= 32 ? b - 32 : 32;
  }
  const __m256i a = _mm256_srlv_epi32(lo, _mm256_load_si256(reinterpret_cast<const __m256i*>(lo_shift)));
  const __m256i b1 = _mm256_sllv_epi32(hi, _mm256_load_si256(reinterpret_cast<const __m256i*>(hi_shift_left)));
  const __m256i b2 = _mm256_srlv_epi32(hi, _mm256_load_si256(reinterpret_cast<const __m256i*>(hi_shift_right)));
  const __m256i sym = _mm256_or_si256(a, _mm256_or_si256(b1, b2));
  return _mm256_and_si256(sym, _mm256_set1_epi32((1 << W) - 1));
}

template <int W>
struct Lookup256 {
  alignas(32) float off[16];
  alignas(32) float sc[16];
  __m256i shift, code_mask;
  int64_t k;

  SQ_AVX2 inline void setup(const float* of, const float* s, int64_t kk, int bits) {
    k = kk;
    for (int j = 0; j < 16; ++j) {
      off[j] = j < kk ? of[j] : 0.0f;
      sc[j] = j < kk ? s[j] : 0.0f;
    }
    shift = _mm256_set1_epi32(bits);
    code_mask = _mm256_set1_epi32((1 << bits) - 1);
  }

  SQ_AVX2 inline __m256 operator()(__m256i sym) const {
    const __m256i id = _mm256_srlv_epi32(sym, shift);
    const __m256 code = _mm256_cvtepi32_ps(_mm256_and_si256(sym, code_mask));
    __m256 o, s;
    if (k <= 8) {
      o = _mm256_permutevar8x32_ps(_mm256_load_ps(off), id);
      s = _mm256_permutevar8x32_ps(_mm256_load_ps(sc), id);
      const __m256 in_range = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), id));
      o = _mm256_and_ps(o, in_range);
      s = _mm256_and_ps(s, in_range);
    } else {
      o = _mm256_i32gather_ps(off, id, 4);
      s = _mm256_i32gather_ps(sc, id, 4);
    }
    return _mm256_add_ps(o, _mm256_mul_ps(s, code));
  }
};

template <int W, class F>
SQ_AVX2 inline void walk_row_256(const Problem& P, int64_t r, F&& f) {
  const uint8_t* row = P.packed + r * P.row_bytes;
  const float* sc = P.scale + r * P.groups * P.k;
  const float* of = P.offset + r * P.groups * P.k;
  Lookup256<W> lut;
  for (int64_t g = 0; g < P.groups; ++g) {
    lut.setup(of + g * P.k, sc + g * P.k, P.k, P.bits);
    const int64_t s0 = g * P.group_size;
    const int64_t s1 = s0 + P.group_size;
    int64_t s = s0;
    for (; s + 16 <= s1; s += 16) {
      const __m256 a = lut(unpack8_256<W>(row + (s >> 3) * W, P.end));
      const __m256 b = lut(unpack8_256<W>(row + ((s + 8) >> 3) * W, P.end));
      f(s, 8, a, Even{});
      f(s + 8, 8, b, Odd{});
    }
    for (; s < s1; s += 8) f(s, s1 - s < 8 ? s1 - s : 8, lut(unpack8_256<W>(row + (s >> 3) * W, P.end)), Even{});
  }
}

SQ_AVX2 inline __m256i tail_mask256(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <int W>
SQ_AVX2 void dequantize_rows_256(const Problem& P, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    float* dst = out + r * P.in;
    walk_row_256<W>(P, r, [&](int64_t s, int64_t n, __m256 w, auto) SQ_AVX2 {
      if (n == 8) {
        _mm256_storeu_ps(dst + s, w);
      } else {
        _mm256_maskstore_ps(dst + s, tail_mask256(n), w);
      }
    });
  }
}

SQ_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int W, int MB>
SQ_AVX2 void linear_rows_256(const Problem& P, int64_t r0, int64_t r1, const float* x, const float* bias,
                             float* y) {
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[2][MB];
    for (int m = 0; m < MB; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
    walk_row_256<W>(P, r, [&](int64_t s, int64_t n, __m256 w, auto parity) SQ_AVX2 {
      constexpr int p = decltype(parity)::value;
      if (n == 8) {
        for (int m = 0; m < MB; ++m) acc[p][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * P.in + s), acc[p][m]);
      } else {
        const __m256i keep = tail_mask256(n);
        const __m256 wk = _mm256_and_ps(w, _mm256_castsi256_ps(keep));
        for (int m = 0; m < MB; ++m)
          acc[p][m] = _mm256_fmadd_ps(wk, _mm256_maskload_ps(x + m * P.in + s, keep), acc[p][m]);
      }
    });
    const float b = bias ? bias[r] : 0.0f;
    for (int m = 0; m < MB; ++m) y[m * P.out + r] = hsum256(_mm256_add_ps(acc[0][m], acc[1][m])) + b;
  }
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif  // SQ_X86

// ---------------------------------------------------------------------------------------------
// Dispatch.
enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

int64_t best_isa() {
#if SQ_X86
  static const int64_t isa = cpu_has_avx512() ? kAvx512 : (cpu_has_avx2() ? kAvx2 : kScalar);
  return isa;
#else
  return kScalar;
#endif
}

// The ISA to use for this problem, capped by `requested` (-1 = best available).
int64_t pick_isa(const Problem& P, int64_t requested) {
  int64_t isa = best_isa();
  if (requested >= 0 && requested < isa) isa = requested;
  if (P.width > 8 || P.k > 16) return kScalar;
  if (isa == kAvx512 && P.groups > 1 && P.group_size % 16 != 0) isa = kAvx2;
  if (isa == kAvx2 && P.groups > 1 && P.group_size % 8 != 0) isa = kScalar;
  return isa;
}

#if SQ_X86
// Rows [r0, r1) for every token, in blocks of 4, 2, 1 tokens (each token's sums do not depend on the blocking).
template <int W>
void linear_rows(const Problem& P, int64_t isa, int64_t r0, int64_t r1, const float* x, int64_t M,
                 const float* bias, float* y) {
  int64_t m = 0;
  const auto block = [&](auto mb) {
    constexpr int MB = decltype(mb)::value;
    if (isa == kAvx512) {
      linear_rows_512<W, MB>(P, r0, r1, x + m * P.in, bias, y + m * P.out);
    } else {
      linear_rows_256<W, MB>(P, r0, r1, x + m * P.in, bias, y + m * P.out);
    }
    m += MB;
  };
  while (m + 4 <= M) block(std::integral_constant<int, 4>{});
  if (m + 2 <= M) block(std::integral_constant<int, 2>{});
  if (m < M) block(std::integral_constant<int, 1>{});
}

template <int W>
void dequantize_rows(const Problem& P, int64_t isa, int64_t r0, int64_t r1, float* out) {
  if (isa == kAvx512) {
    dequantize_rows_512<W>(P, r0, r1, out);
  } else {
    dequantize_rows_256<W>(P, r0, r1, out);
  }
}

// Calls f(std::integral_constant<int, width>) for the vector kernels' widths 1-8.
template <class F>
void with_width(int width, F&& f) {
  switch (width) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: TORCH_CHECK(false, "splitquant: no vector kernel for width ", width);
  }
}
#endif  // SQ_X86

// Rows per parallel task: at least ~1M weight-token products (~0.1 ms on one core), so the
// fork/join of a parallel region is amortised, and a decode step's many small layers stay on one
// thread (on a loaded machine a region waits for its slowest, possibly descheduled, thread).
int64_t row_grain(const Problem& P, int64_t tokens) {
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(P.in * tokens, 1));
}

Problem make_problem(const at::Tensor& packed, const at::Tensor& scale32, const at::Tensor& offset32,
                     int64_t in_features, int64_t bits, int64_t width) {
  TORCH_CHECK(packed.device().is_cpu() && scale32.device().is_cpu() && offset32.device().is_cpu(),
              "splitquant kernels run on CPU tensors");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
              "packed must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(scale32.dim() == 3 && offset32.sizes() == scale32.sizes(), "scale/offset must be (out, groups, k)");
  TORCH_CHECK(width >= 1 && width <= 16 && bits >= 1 && bits <= width, "bad bits/width");
  TORCH_CHECK(scale32.size(0) == packed.size(0), "scale rows do not match packed rows");
  const int64_t groups = scale32.size(1);
  TORCH_CHECK(groups >= 1 && in_features % groups == 0, "groups must divide in_features");
  TORCH_CHECK(packed.size(1) == ((in_features + 7) / 8) * width, "packed row bytes do not match in_features");
  TORCH_CHECK(scale32.size(2) >= 1 && scale32.size(2) <= (int64_t{1} << (width - bits)), "bad num_clusters");
  Problem P;
  P.packed = packed.data_ptr<uint8_t>();
  P.end = P.packed + packed.numel();
  P.scale = scale32.data_ptr<float>();
  P.offset = offset32.data_ptr<float>();
  P.out = packed.size(0);
  P.in = in_features;
  P.row_bytes = packed.size(1);
  P.groups = groups;
  P.group_size = in_features / groups;
  P.k = scale32.size(2);
  P.bits = static_cast<int>(bits);
  P.width = static_cast<int>(width);
  return P;
}

at::Tensor as_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous(); }

at::Tensor dequantize_cpu(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& offset,
                          int64_t in_features, int64_t bits, int64_t width, int64_t isa) {
  const at::Tensor s32 = as_f32(scale);
  const at::Tensor o32 = as_f32(offset);
  const Problem P = make_problem(packed, s32, o32, in_features, bits, width);
  at::Tensor out = at::empty({P.out, P.in}, packed.options().dtype(at::kFloat));
  if (P.out == 0 || P.in == 0) return out;
  float* dst = out.data_ptr<float>();
  const int64_t use = pick_isa(P, isa);
  if (use == kScalar) {
    dequantize_scalar(P, dst);
    return out;
  }
#if SQ_X86
  at::parallel_for(0, P.out, row_grain(P, 1), [&](int64_t r0, int64_t r1) {
    with_width(P.width, [&](auto w) { dequantize_rows<decltype(w)::value>(P, use, r0, r1, dst); });
  });
#endif
  return out;
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                      const at::Tensor& offset, const std::optional<at::Tensor>& bias, int64_t in_features,
                      int64_t bits, int64_t width, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "x must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be (tokens, in_features)");
  const at::Tensor xc = x.contiguous();
  const at::Tensor s32 = as_f32(scale);
  const at::Tensor o32 = as_f32(offset);
  const Problem P = make_problem(packed, s32, o32, in_features, bits, width);
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    b32 = as_f32(*bias);
    TORCH_CHECK(b32.dim() == 1 && b32.size(0) == P.out, "bias must be (out_features,)");
  }
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, P.out}, xc.options());
  if (M == 0 || P.out == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (P.in == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < P.out; ++r) yp[m * P.out + r] = bp ? bp[r] : 0.0f;
    return y;
  }
  const int64_t use = pick_isa(P, isa);
  if (use == kScalar) {
    linear_scalar(P, xp, M, bp, yp);
    return y;
  }
#if SQ_X86
  at::parallel_for(0, P.out, row_grain(P, M), [&](int64_t r0, int64_t r1) {
    with_width(P.width, [&](auto w) { linear_rows<decltype(w)::value>(P, use, r0, r1, xp, M, bp, yp); });
  });
#endif
  return y;
}

std::string info() {
  const int64_t isa = best_isa();
  std::string s = isa == kAvx512 ? "avx512" : (isa == kAvx2 ? "avx2" : "scalar");
#ifdef _OPENMP
  s += "+openmp";
#endif
  return s;
}

int64_t best_isa_op() { return best_isa(); }

}  // namespace

TORCH_LIBRARY(optimum_splitquant, m) {
  m.def("dequantize(Tensor packed, Tensor scale, Tensor offset, int in_features, int bits, int width, int isa=-1) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, Tensor scale, Tensor offset, Tensor? bias, int in_features, int bits, int width, int isa=-1) -> Tensor");
  m.def("best_isa() -> int", &best_isa_op);
}

TORCH_LIBRARY_IMPL(optimum_splitquant, CPU, m) {
  m.impl("dequantize", &dequantize_cpu);
  m.impl("linear", &linear_cpu);
}
