// The decode matmul (int8 activations) for weights with one scale per block of 32: GGUF's
// Q4_0, Q4_1 (int4), Q5_0, Q5_1 (int5, unpacked to int8 values) and Q8_0 (int8). Other
// blocks take quant_cpu.cpp's row kernel.
//
// Every output is one fixed sequence of float steps, whichever kernel below computes it and
// however many tokens share the call, so a token's result never depends on the batch.
// Eight accumulators a_0..a_7, block b going to a_(b mod 8), in block order:
//   a_k = fma(float(d_b), scale_b * dx_b, a_k)
//   a_k = fma(min_b, bsum_b, a_k)                      (weights with a min)
//   y   = ((a_0 + a_4) + (a_2 + a_6)) + ((a_1 + a_5) + (a_3 + a_7))
// d_b is the block's exact integer dot product with the int8 activations xq (x ~ dx * xq):
// sum q * xq for int8 weights and int4 ones with a min (q the nibble), and
// sum q * xq - offset * sum xq for int4 without a min (w = scale * (q - 8)); bsum_b is
// dx_b * sum xq.
//
// Few tokens (under 8 for int4, 4 for int8; batch-1 decode): a row at a time, the eight
// accumulators the lanes of one vector per token: eight blocks' integer sums gathered by
// hadd, their eight scales one load, the weights unpacked once for up to four tokens.
// More tokens: rows are taken eight at a time and repacked into a panel: per block,
// 4-byte groups of the eight rows side by side (int4: four 32-byte vectors whose low
// nibbles are values 4g..4g+3 and high nibbles 16+4g..16+4g+3 of the block; int8: eight
// vectors); their scales are transposed to match. A tile of four tokens then broadcasts
// four activation bytes against each panel vector, output rows in the lanes: no horizontal
// sums, each weight byte read from memory once per call. The blocks are visited by residue
// (0, 8, 16, ..., then 1, 9, ...) so that one vector per token carries a_k for eight rows.
// The repack is a 4x4 transpose of 32-bit groups, ~20 vector instructions per eight rows
// and block. Rows past the last multiple of eight take a scalar loop with the same steps.
#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_cpu.h"

namespace miaotui {
namespace {

inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m128i load16(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Offset of block b's values 0..15 in a row of activations, and of values 16..31 after
// them: int4 rows are quantized pair-interleaved (quantize_acts: [b 0..15, b+1 0..15,
// b 16..31, b+1 16..31]), an odd last block and int8 rows in plain order.
struct XBlock {
  int64_t lo, hi;
};
inline XBlock xblock(int64_t b, int64_t paired_blocks) {
  if (b < paired_blocks) return {32 * (b & ~int64_t{1}) + 16 * (b & 1), 32};
  return {32 * b, 16};
}

// out[8 * b + j] = s[j * nwb + b] for b < nb: the scales (or mins) of eight rows (nwb
// apart) as floats, block by block. Eight blocks at a time by an 8x8 transpose; the last
// few blocks of a row (whose eight-wide loads would pass the tensor's end) one by one.
template <typename S>
void rows8_scales(const S* s, int64_t nwb, int64_t nb, float* out) {
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    __m256 r[8], t[8];
    for (int j = 0; j < 8; ++j) r[j] = load8(s + j * nwb + b);
    for (int j = 0; j < 8; j += 2) {
      t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
      t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
    }
    for (int h = 0; h < 8; h += 4) {  // rows h..h+3: columns k and k + 4 of them
      r[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
      r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
      r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
      r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
    }
    for (int k = 0; k < 4; ++k) {
      _mm256_storeu_ps(out + 8 * (b + k), _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
      _mm256_storeu_ps(out + 8 * (b + k + 4), _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
    }
  }
  for (; b < nb; ++b)
    for (int j = 0; j < 8; ++j) out[8 * b + j] = to_float(s[j * nwb + b]);
}

// The activations as quantize_acts leaves them; rows of dx, bsum, osum ld apart, zeros past
// the last block; osum = offset * sum xq (int4 without a min). For one token and int4
// weights, *_p: the same in the order the kernel's sums come out (even_odd_runs).
struct Xq {
  const int8_t* q;
  const float *dx, *bsum;
  const int32_t* osum;
  const float *dx_p, *bsum_p;
  const int32_t* osum_p;
  int64_t ld, K, paired_blocks;
};

// Weights stream once per call; the hardware prefetcher alone leaves bandwidth unused
// (quant_cpu.cpp's kPrefetchBytes). Rows n..n+7 are one contiguous run of 8 row_bytes, read
// at an even pace over `steps` steps: the run about kAhead bytes on is prefetched as fast.
constexpr int64_t kAhead = 4096;

struct Prefetch {
  const char* base;
  int64_t per_step;  // bytes
  Prefetch(const uint8_t* rows, int64_t run, int64_t steps) {
    base = reinterpret_cast<const char*>(rows) + std::max<int64_t>(1, (kAhead + run - 1) / run) * run;
    per_step = (run + steps - 1) / steps;
  }
  void operator()(int64_t i) const {
    for (int64_t at = i * per_step; at < (i + 1) * per_step; at += 64) _mm_prefetch(base + at, _MM_HINT_T0);
  }
};

// The scales and mins of eight rows as floats, 8 a block (rows8_scales).
struct Scales {
  std::vector<float> sc, mn;
  template <bool kMin, typename S>
  void load(const Weights& w, int64_t n) {
    const int64_t nb = w.K / 32;
    sc.resize(8 * nb);
    rows8_scales(static_cast<const S*>(w.scale) + n * w.nwb, w.nwb, nb, sc.data());
    if constexpr (kMin) {
      mn.resize(8 * nb);
      rows8_scales(static_cast<const S*>(w.min) + n * w.nwb, w.nwb, nb, mn.data());
    }
  }
};

// The residue tree (y above) of a vector holding a_0..a_7 in lanes 0..7.
inline float residue_sum(__m256 a) { return hsum(a); }  // hsum adds lanes in exactly that order

// Tokens t0..t0+TM-1 (TM <= 4), row n, the weights unpacked once for them. int4: a 32-byte
// load holds blocks b and b + 1 (low nibbles: values 0..15 of both, high: 16..31) against
// x in the paired order; the sums come out for blocks 0, 2, 4, 6, 1, 3, 5, 7 of the eight,
// and the scales and x's factors (Xq's *_p) follow.
template <bool kInt4, bool kQ5, bool kMin, bool kOffset, typename S, int TM>
void row_tokens(const Weights& w, const Xq& a, int64_t n, int64_t t0, float* y, int64_t ldy) {
  const int64_t nb = w.K / 32, rb = w.row_bytes, K = w.K;
  constexpr int64_t per_group = 8 * (kInt4 ? 16 : kQ5 ? 20 : 32);  // bytes of eight blocks
  const uint8_t* r = w.q + n * rb;
  const S* s = static_cast<const S*>(w.scale) + n * w.nwb;
  const S* m = kMin ? static_cast<const S*>(w.min) + n * w.nwb : nullptr;
  const char* ahead = reinterpret_cast<const char*>(r) + kAhead;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  const __m256i even_odd = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const float* dx = kInt4 ? a.dx_p : a.dx;
  const float* bs = kInt4 ? a.bsum_p : a.bsum;
  const int32_t* os = kInt4 ? a.osum_p : a.osum;
  __m256 acc[TM];
  for (int t = 0; t < TM; ++t) acc[t] = _mm256_setzero_ps();
  // blocks b0..b0+7, or the cnt < 8 left at the end of the row (kFull: known at compile time)
  auto group = [&](int64_t b0, int64_t cnt, auto full) {
    constexpr bool kFull = decltype(full)::value;
    for (int64_t at = b0 / 8 * per_group; at < (b0 / 8 + 1) * per_group; at += 64) _mm_prefetch(ahead + at, _MM_HINT_T0);
    __m256 sc = kFull ? load8(s + b0) : load_part(s + b0, static_cast<int>(cnt));
    __m256 mn = !kMin ? _mm256_setzero_ps() : kFull ? load8(m + b0) : load_part(m + b0, static_cast<int>(cnt));
    __m256i d[TM];
    if constexpr (kInt4) {
      // pair i: blocks b0 + 2i, b0 + 2i + 1; an odd last block alone (x in plain order),
      // the other half of the load zero
      const int pairs = kFull ? 4 : static_cast<int>(cnt / 2), single = kFull ? 0 : static_cast<int>(cnt % 2);
      __m256i lo[4], hi[4];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const int64_t b = b0 + 2 * i;
        const __m256i v = i < pairs ? load32(r + 16 * b) : i < pairs + single ? _mm256_zextsi128_si256(load16(r + 16 * b)) : zero;
        lo[i] = _mm256_and_si256(v, low4);
        hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      }
#pragma GCC unroll 4
      for (int t = 0; t < TM; ++t) {
        __m256i p[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const int8_t* x = a.q + (t0 + t) * K + 32 * (b0 + 2 * i);
          __m256i xl, xh;
          if (i < pairs) {
            xl = load32(x);
            xh = load32(x + 32);
          } else if (i < pairs + single) {
            xl = _mm256_zextsi128_si256(load16(x));
            xh = _mm256_zextsi128_si256(load16(x + 16));
          } else {
            p[i] = zero;
            continue;
          }
          p[i] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[i], xl), _mm256_maddubs_epi16(hi[i], xh)), ones);
        }
        d[t] = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
      }
      sc = _mm256_permutevar8x32_ps(sc, even_odd);
      if constexpr (kMin) mn = _mm256_permutevar8x32_ps(mn, even_odd);
    } else {
      __m256i wv[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i)
        wv[i] = !kFull && i >= cnt ? zero : kQ5 ? unpack_int5(r, K / 2, b0 + i, w.q5_sub16) : load32(r + 32 * (b0 + i));
#pragma GCC unroll 4
      for (int t = 0; t < TM; ++t) {
        __m256i p[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          const __m256i x = load32(a.q + (t0 + t) * K + 32 * (b0 + i));
          p[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv[i], wv[i]), _mm256_sign_epi8(x, wv[i])), ones);
        }
        // lanes 0-3: the first halves of blocks 0..3 (lo) or 4..7 (hi), lanes 4-7 the second
        const __m256i lo = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
        const __m256i hi = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
        d[t] = _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < TM; ++t) {
      const int64_t i = (t0 + t) * a.ld + b0;
      __m256i dt = d[t];
      if constexpr (kOffset) dt = _mm256_sub_epi32(dt, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(os + i)));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dt), _mm256_mul_ps(sc, _mm256_loadu_ps(dx + i)), acc[t]);
      if constexpr (kMin) acc[t] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(bs + i), acc[t]);
    }
  };
  int64_t b0 = 0;
  for (; b0 + 8 <= nb; b0 += 8) group(b0, 8, std::true_type{});
  if (b0 < nb) group(b0, nb - b0, std::false_type{});
#pragma GCC unroll 4
  for (int t = 0; t < TM; ++t) {
    if constexpr (kInt4) acc[t] = _mm256_permutevar8x32_ps(acc[t], _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // a_0..a_7
    y[(t0 + t) * ldy + n] = residue_sum(acc[t]);
  }
}

// Rows j = 0..7's 16 bytes at p + j * stride as four vectors, lane j of out[g] holding
// row j's bytes 4g..4g+3.
inline void transpose_rows8(const uint8_t* p, int64_t stride, uint8_t* out) {
  __m256i v[4];
  for (int j = 0; j < 4; ++j)
    v[j] = _mm256_inserti128_si256(_mm256_castsi128_si256(load16(p + j * stride)), load16(p + (j + 4) * stride), 1);
  const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
  __m256i* o = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(o, _mm256_unpacklo_epi64(t0, t2));
  _mm256_storeu_si256(o + 1, _mm256_unpackhi_epi64(t0, t2));
  _mm256_storeu_si256(o + 2, _mm256_unpacklo_epi64(t1, t3));
  _mm256_storeu_si256(o + 3, _mm256_unpackhi_epi64(t1, t3));
}

// A panel: rows n..n+7 repacked (bytes: nb blocks of 4 (int4) or 8 (int8) vectors) with
// their scales and mins.
struct Panel {
  std::vector<uint8_t> u;  // 32 bytes a vector
  Scales st;
};

template <bool kInt4, bool kQ5, bool kMin, typename S>
void pack(const Weights& w, int64_t n, Panel& pn) {
  const int64_t nb = w.K / 32, rb = w.row_bytes, per = kInt4 ? 4 : 8;
  const uint8_t* r = w.q + n * rb;
  pn.u.resize(32 * nb * per);
  pn.st.load<kMin, S>(w, n);
  const Prefetch ahead(r, 8 * rb, nb);
  for (int64_t b = 0; b < nb; ++b) {
    ahead(b);
    if constexpr (kInt4) {
      transpose_rows8(r + 16 * b, rb, &pn.u[128 * b]);
    } else if constexpr (kQ5) {  // unpacked to int8 first
      alignas(32) uint8_t v[8 * 32];
      for (int j = 0; j < 8; ++j)
        _mm256_store_si256(reinterpret_cast<__m256i*>(v + 32 * j), unpack_int5(r + j * rb, w.K / 2, b, w.q5_sub16));
      transpose_rows8(v, 32, &pn.u[256 * b]);
      transpose_rows8(v + 16, 32, &pn.u[256 * b + 128]);
    } else {
      transpose_rows8(r + 32 * b, rb, &pn.u[256 * b]);
      transpose_rows8(r + 32 * b + 16, rb, &pn.u[256 * b + 128]);
    }
  }
}

// Tokens t0..t0+MR-1 against a panel (rows n..n+7), blocks by residue.
template <bool kInt4, bool kMin, bool kOffset, int MR>
void tile(const Panel& pn, const Xq& a, int64_t t0, int64_t n, float* y, int64_t ldy) {
  const int64_t nb = a.K / 32;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
  __m256 part[MR][8];  // a_k of the eight rows
  for (int k = 0; k < 8; ++k) {
    __m256 acc[MR];
#pragma GCC unroll 4
    for (int t = 0; t < MR; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t b = k; b < nb; b += 8) {
      __m256i dot[MR];
  #pragma GCC unroll 4
      for (int t = 0; t < MR; ++t) dot[t] = _mm256_setzero_si256();
      const XBlock xb = xblock(b, a.paired_blocks);
      const int8_t* x = a.q + t0 * a.K + xb.lo;
      if constexpr (kInt4) {
        // int16 sums: a lane adds 8 maddubs pairs of at most 15 * 127 * 2 = 3810 (< 2^15)
        // (a rolled loop: unrolled, GCC computed every product first and spilled them)
  #pragma GCC unroll 1
        for (int g = 0; g < 4; ++g) {
          const __m256i c = load32(&pn.u[128 * b + 32 * g]);
          const __m256i lo = _mm256_and_si256(c, low4), hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low4);
  #pragma GCC unroll 4
          for (int t = 0; t < MR; ++t) {
            const int8_t* xt = x + t * a.K + 4 * g;
            dot[t] = _mm256_add_epi16(dot[t], _mm256_maddubs_epi16(lo, bcast4(xt)));
            dot[t] = _mm256_add_epi16(dot[t], _mm256_maddubs_epi16(hi, bcast4(xt + xb.hi)));
          }
        }
  #pragma GCC unroll 4
        for (int t = 0; t < MR; ++t) dot[t] = _mm256_madd_epi16(dot[t], ones);
      } else {
  #pragma GCC unroll 1
        for (int g = 0; g < 8; ++g) {
          const __m256i c = load32(&pn.u[256 * b + 32 * g]), wa = _mm256_sign_epi8(c, c);
  #pragma GCC unroll 4
          for (int t = 0; t < MR; ++t) {
            const __m256i xs = _mm256_sign_epi8(bcast4(x + t * a.K + 4 * g), c);
            dot[t] = _mm256_add_epi32(dot[t], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xs), ones));
          }
        }
      }
      const __m256 sc = _mm256_loadu_ps(&pn.st.sc[8 * b]);
      const __m256 mn = kMin ? _mm256_loadu_ps(&pn.st.mn[8 * b]) : _mm256_setzero_ps();
#pragma GCC unroll 4
      for (int t = 0; t < MR; ++t) {
        const int64_t i = (t0 + t) * a.ld + b;
        __m256i d = dot[t];
        if constexpr (kOffset) d = _mm256_sub_epi32(d, _mm256_set1_epi32(a.osum[i]));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(sc, _mm256_set1_ps(a.dx[i])), acc[t]);
        if constexpr (kMin) acc[t] = _mm256_fmadd_ps(mn, _mm256_set1_ps(a.bsum[i]), acc[t]);
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < MR; ++t) part[t][k] = acc[t];
  }
#pragma GCC unroll 4
  for (int t = 0; t < MR; ++t) {
    const __m256* p = part[t];
    const __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(p[0], p[4]), _mm256_add_ps(p[2], p[6])),
                                   _mm256_add_ps(_mm256_add_ps(p[1], p[5]), _mm256_add_ps(p[3], p[7])));
    _mm256_storeu_ps(y + (t0 + t) * ldy + n, v);
  }
}

// Row n for every token in scalar code with the same steps (rows past the last eight).
template <bool kInt4, bool kQ5, bool kMin, bool kOffset, typename S>
void row_scalar(const Weights& w, const Xq& a, int64_t T, int64_t n, float* y, int64_t ldy) {
  const int64_t nb = w.K / 32;
  const uint8_t* r = w.q + n * w.row_bytes;
  const S* s = static_cast<const S*>(w.scale) + n * w.nwb;
  const S* m = kMin ? static_cast<const S*>(w.min) + n * w.nwb : nullptr;
  for (int64_t t = 0; t < T; ++t) {
    float acc[8] = {};
    for (int64_t b = 0; b < nb; ++b) {
      const XBlock xb = xblock(b, a.paired_blocks);
      const int8_t* x = a.q + t * a.K + xb.lo;
      int32_t d = 0, fifth = 0;
      if (kQ5) std::memcpy(&fifth, r + w.K / 2 + 4 * b, 4);
      for (int i = 0; i < 32; ++i) {
        const int xi = x[i < 16 ? i : xb.hi + i - 16];
        const int nibble = i < 16 ? r[16 * b + i] & 15 : r[16 * b + i - 16] >> 4;
        const int q = kInt4 ? nibble
                      : kQ5 ? (nibble | ((fifth >> i) & 1) << 4) - (w.q5_sub16 ? 16 : 0)
                            : static_cast<int8_t>(r[32 * b + i]);
        d += q * xi;
      }
      const int64_t i = t * a.ld + b;
      float& ak = acc[b % 8];
      if constexpr (kOffset) d -= a.osum[i];
      ak = std::fma(static_cast<float>(d), to_float(s[b]) * a.dx[i], ak);
      if constexpr (kMin) ak = std::fma(to_float(m[b]), a.bsum[i], ak);
    }
    y[t * ldy + n] = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  }
}

// Fewer tokens than this take the row kernel (a panel's repack costs more than it saves).
template <bool kInt4>
constexpr int64_t kPanelTokens = kInt4 ? 8 : 4;

template <bool kInt4, bool kQ5, bool kMin, bool kOffset, typename S>
void run(const Weights& w, const Xq& a, int64_t T, float* y, int64_t ldy) {
  if (T < kPanelTokens<kInt4>) {
    parallel_rows(w.N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        int64_t t = 0;
        for (; t + 4 <= T; t += 4) row_tokens<kInt4, kQ5, kMin, kOffset, S, 4>(w, a, n, t, y, ldy);
        switch (T - t) {
          case 1: row_tokens<kInt4, kQ5, kMin, kOffset, S, 1>(w, a, n, t, y, ldy); break;
          case 2: row_tokens<kInt4, kQ5, kMin, kOffset, S, 2>(w, a, n, t, y, ldy); break;
          case 3: row_tokens<kInt4, kQ5, kMin, kOffset, S, 3>(w, a, n, t, y, ldy); break;
          default: break;
        }
      }
    });
    return;
  }
  const int64_t groups = w.N / 8;
  parallel_rows(groups + (w.N % 8 ? 1 : 0), 2, [&](int64_t g0, int64_t g1) {
    thread_local Panel pn;
    for (int64_t g = g0; g < g1; ++g) {
      if (g == groups) {  // the rows past the last eight
        for (int64_t n = 8 * groups; n < w.N; ++n) row_scalar<kInt4, kQ5, kMin, kOffset, S>(w, a, T, n, y, ldy);
        continue;
      }
      pack<kInt4, kQ5, kMin, S>(w, 8 * g, pn);
      int64_t t = 0;
      for (; t + 4 <= T; t += 4) tile<kInt4, kMin, kOffset, 4>(pn, a, t, 8 * g, y, ldy);
      switch (T - t) {
        case 1: tile<kInt4, kMin, kOffset, 1>(pn, a, t, 8 * g, y, ldy); break;
        case 2: tile<kInt4, kMin, kOffset, 2>(pn, a, t, 8 * g, y, ldy); break;
        case 3: tile<kInt4, kMin, kOffset, 3>(pn, a, t, 8 * g, y, ldy); break;
        default: break;
      }
    }
  });
}

template <typename S>
void dispatch(const Weights& w, const Xq& a, int64_t T, float* y, int64_t ldy) {
  if (w.bits == 8) {
    if (w.min) run<false, false, true, false, S>(w, a, T, y, ldy);
    else run<false, false, false, false, S>(w, a, T, y, ldy);
  } else if (w.bits == 5) {  // unpacked to the int8 values, then as int8 weights
    if (w.min) run<false, true, true, false, S>(w, a, T, y, ldy);
    else run<false, true, false, false, S>(w, a, T, y, ldy);
  } else if (w.min) {
    run<true, false, true, false, S>(w, a, T, y, ldy);
  } else {
    run<true, false, false, true, S>(w, a, T, y, ldy);
  }
}

// v [n] (n a multiple of 8) with each run of eight in the order 0, 2, 4, 6, 1, 3, 5, 7.
template <typename V>
std::vector<V> even_odd(const V* v, int64_t n) {
  static constexpr int kOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  std::vector<V> out(n);
  for (int64_t i = 0; i < n; i += 8)
    for (int j = 0; j < 8; ++j) out[i + j] = v[i + kOrder[j]];
  return out;
}

}  // namespace

bool block32_format(const Weights& w) {
  const bool blocks32 = !w.b16 && w.nwb == w.K / 32;  // K = 32 too (shift: one scale per row)
  return blocks32 && ((w.bits != 4 && w.offset == 0.0f) ||
                      (w.bits == 4 && (w.min ? w.offset == 0.0f : w.offset == 8.0f)));
}

void block32_matmul(const Weights& w, const int8_t* xq, const float* dx, const float* bsum, const int32_t* osum,
                    int64_t ld, int64_t T, float* y, int64_t ldy) {
  const int64_t nb = w.K / 32;
  Xq a{xq, dx, bsum, osum, dx, bsum, osum, ld, w.K, w.bits == 4 ? nb / 2 * 2 : 0};
  std::vector<float> dxp, bsp;
  std::vector<int32_t> osp;
  if (T < kPanelTokens<true> && w.bits == 4) {  // the row kernel: factors in the order of its sums
    dxp = even_odd(dx, T * ld);
    bsp = even_odd(bsum, T * ld);
    a.dx_p = dxp.data();
    a.bsum_p = bsp.data();
    if (osum) {
      osp = even_odd(osum, T * ld);
      a.osum_p = osp.data();
    }
  }
  if (w.half) dispatch<half_t>(w, a, T, y, ldy);
  else dispatch<float>(w, a, T, y, ldy);
}

}  // namespace miaotui
