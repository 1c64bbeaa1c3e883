// The decode matmul (int8 activations) for int8 weights with one scale per block of 32:
// GGUF's Q8_0, and Q5_0 / Q5_1 (int5, unpacked to their int8 values in registers). Other
// formats take quant_cpu.cpp's row kernel (int4 with this file's steps was 0.93x that
// kernel below 16 tokens, docs/benchmarks.md; qdecode_int4.cpp instead keeps the row
// kernel's steps for its panel kernel).
//
// Every output is one fixed sequence of float steps, whichever kernel below computes it and
// however many tokens share the call, so a token's result never depends on the batch.
// Eight accumulators a_0..a_7, block b going to a_(b mod 8), in block order:
//   a_k = fma(float(d_b), scale_b * dx_b, a_k)
//   a_k = fma(min_b, bsum_b, a_k)                      (weights with a min)
//   y   = ((a_0 + a_4) + (a_2 + a_6)) + ((a_1 + a_5) + (a_3 + a_7))
// d_b is the block's exact integer dot product sum q * xq with the int8 activations
// (x ~ dx * xq); bsum_b is dx_b * sum xq.
//
// Under 16 tokens (8 with VNNI): a row at a time, the eight accumulators the lanes of one vector per
// token: eight blocks' integer sums gathered by hadd (a short rest of a row by half the
// reduction), their eight scales one load, the weights loaded once for up to four tokens.
// From 16 tokens (8): rows eight at a time, repacked into a panel (per block, 4-byte groups of
// the eight rows side by side: eight 32-byte vectors, a 4x4 transpose of 32-bit groups per
// half; scales transposed to match). A tile of four tokens then broadcasts four activation
// bytes against each panel vector, output rows in the lanes: no horizontal sums, each
// weight byte read from memory once per call. Blocks are visited by residue (0, 8, 16, ...,
// then 1, 9, ...) so that one vector per token carries a_k of eight rows. Rows past the
// last multiple of eight take a scalar loop with the same steps. Both kernels take the
// integer sums from vpdpbusd where the CPU has it (quant_cpu.h's Dot: the same integers).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "quant_cpu.h"

namespace miaotui {
namespace {

// The activations as quantize_acts leaves them (plain order); rows of dx and bsum ld apart,
// zeros past the last block.
struct Xq {
  const int8_t* q;
  const float *dx, *bsum;
  int64_t ld, K;
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

// Block b of a row as its 32 int8 values.
template <bool kQ5>
__attribute__((always_inline)) inline __m256i block_q(const Weights& w, const uint8_t* row, int64_t b) {
  if constexpr (kQ5) return unpack_int5(row, w.K / 2, b, w.q5_sub16);
  else return load32(row + 32 * b);
}

// Tokens t0..t0+TM-1 (TM <= 4), rows n0..n1, each row's weights loaded once for them.
template <bool kQ5, bool kMin, typename S, int TM, Dot D>
void row_tokens(const Weights& w, const Xq& a, int64_t n0, int64_t n1, int64_t t0, float* y, int64_t ldy) {
  const int64_t nb = w.K / 32, rb = w.row_bytes, K = w.K;
  constexpr int64_t per_group = 8 * (kQ5 ? 20 : 32);  // bytes of eight blocks
  const __m256i ones = _mm256_set1_epi16(1), zero = _mm256_setzero_si256();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* r = w.q + n * rb;
    const S* s = static_cast<const S*>(w.scale) + n * w.nwb;
    const S* m = kMin ? static_cast<const S*>(w.min) + n * w.nwb : nullptr;
    const char* ahead = reinterpret_cast<const char*>(r) + kPrefetchBytes;
    __m256 acc[TM];
    for (int t = 0; t < TM; ++t) acc[t] = _mm256_setzero_ps();
    // blocks b0..b0+7, or the cnt < 8 left at the end of the row (kFull: known at compile time)
    auto group = [&](int64_t b0, int64_t cnt, auto full) {
      constexpr bool kFull = decltype(full)::value;
      for (int64_t at = b0 / 8 * per_group; at < (b0 / 8 + 1) * per_group; at += 64)
        _mm_prefetch(ahead + at, _MM_HINT_T0);
      const __m256 sc = kFull ? load8(s + b0) : load_part(s + b0, static_cast<int>(cnt));
      const __m256 mn = !kMin ? _mm256_setzero_ps() : kFull ? load8(m + b0) : load_part(m + b0, static_cast<int>(cnt));
      // the block step for token t, right after its sums (fewer registers live)
      auto step = [&](int t, __m256i d) {
        const int64_t i = (t0 + t) * a.ld + b0;
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(sc, _mm256_loadu_ps(a.dx + i)), acc[t]);
        if constexpr (kMin) acc[t] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(a.bsum + i), acc[t]);
      };
      auto dot = [&](__m256i q, int t, int64_t b) {  // 8 int32 partial sums of block b
        const __m256i x = load32(a.q + (t0 + t) * K + 32 * b);
        if constexpr (D != Dot::kAvx2) return dpbusd<D>(zero, _mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
        else return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q)), ones);
      };
      __m256i q[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) q[i] = !kFull && i >= cnt ? zero : block_q<kQ5>(w, r, b0 + i);
      if (!kFull && cnt <= 4) {  // a short rest (K = 576 leaves two): half the reduction
#pragma GCC unroll 4
        for (int t = 0; t < TM; ++t) {
          __m256i p[4];
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) p[i] = i < cnt ? dot(q[i], t, b0 + i) : zero;
          // lanes 0-3: the blocks' first halves, lanes 4-7 their second; lanes 4-7 of the
          // result (blocks that do not exist) zero
          const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
          step(t, _mm256_blend_epi32(_mm256_add_epi32(h, _mm256_permute2x128_si256(h, h, 0x01)), zero, 0xF0));
        }
        return;
      }
#pragma GCC unroll 4
      for (int t = 0; t < TM; ++t) {
        __m256i p[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) p[i] = !kFull && i >= cnt ? zero : dot(q[i], t, b0 + i);
        // lanes 0-3: the first halves of blocks 0..3 (lo) or 4..7 (hi), lanes 4-7 the second
        const __m256i lo = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
        const __m256i hi = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
        step(t, _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31)));
      }
    };
    int64_t b0 = 0;
    for (; b0 + 8 <= nb; b0 += 8) group(b0, 8, std::true_type{});
    if (b0 < nb) group(b0, nb - b0, std::false_type{});
    for (int t = 0; t < TM; ++t) y[(t0 + t) * ldy + n] = residue_sum(acc[t]);
  }
}

// A panel: rows n..n+7 repacked (nb blocks of eight 32-byte vectors) with their scales and
// mins.
struct Panel {
  std::vector<uint8_t> u;
  Scales st;
};

template <bool kQ5, bool kMin, typename S>
void pack(const Weights& w, int64_t n, Panel& pn) {
  const int64_t nb = w.K / 32, rb = w.row_bytes;
  const uint8_t* r = w.q + n * rb;
  pn.u.resize(256 * nb);
  pn.st.load<kMin, S>(w, n);
  const Prefetch ahead(r, 8 * rb, nb);
  for (int64_t b = 0; b < nb; ++b) {
    ahead(b);
    if constexpr (kQ5) {  // unpacked to int8 first
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
template <bool kMin, int MR, Dot D>
void tile(const Panel& pn, const Xq& a, int64_t t0, int64_t n, float* y, int64_t ldy) {
  const int64_t nb = a.K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 part[MR][8];  // a_k of the eight rows
  for (int k = 0; k < 8; ++k) {
    __m256 acc[MR];
#pragma GCC unroll 4
    for (int t = 0; t < MR; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t b = k; b < nb; b += 8) {
      __m256i dot[MR];
#pragma GCC unroll 4
      for (int t = 0; t < MR; ++t) dot[t] = _mm256_setzero_si256();
      const int8_t* x = a.q + t0 * a.K + 32 * b;
      // (a rolled loop: unrolled, GCC computed every product first and spilled them)
#pragma GCC unroll 1
      for (int g = 0; g < 8; ++g) {
        const __m256i c = load32(&pn.u[256 * b + 32 * g]), wa = _mm256_sign_epi8(c, c);
#pragma GCC unroll 4
        for (int t = 0; t < MR; ++t) {
          const __m256i xs = _mm256_sign_epi8(bcast4(x + t * a.K + 4 * g), c);
          if constexpr (D != Dot::kAvx2) dot[t] = dpbusd<D>(dot[t], wa, xs);
          else dot[t] = _mm256_add_epi32(dot[t], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xs), ones));
        }
      }
      const __m256 sc = _mm256_loadu_ps(&pn.st.sc[8 * b]);
      const __m256 mn = kMin ? _mm256_loadu_ps(&pn.st.mn[8 * b]) : _mm256_setzero_ps();
#pragma GCC unroll 4
      for (int t = 0; t < MR; ++t) {
        const int64_t i = (t0 + t) * a.ld + b;
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t]), _mm256_mul_ps(sc, _mm256_set1_ps(a.dx[i])), acc[t]);
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
template <bool kQ5, bool kMin, typename S>
void row_scalar(const Weights& w, const Xq& a, int64_t T, int64_t n, float* y, int64_t ldy) {
  const int64_t nb = w.K / 32;
  const uint8_t* r = w.q + n * w.row_bytes;
  const S* s = static_cast<const S*>(w.scale) + n * w.nwb;
  const S* m = kMin ? static_cast<const S*>(w.min) + n * w.nwb : nullptr;
  for (int64_t t = 0; t < T; ++t) {
    float acc[8] = {};
    for (int64_t b = 0; b < nb; ++b) {
      alignas(32) int8_t q[32];
      _mm256_store_si256(reinterpret_cast<__m256i*>(q), block_q<kQ5>(w, r, b));
      const int8_t* x = a.q + t * a.K + 32 * b;
      int32_t d = 0;
      for (int i = 0; i < 32; ++i) d += q[i] * x[i];
      const int64_t i = t * a.ld + b;
      float& ak = acc[b % 8];
      ak = std::fma(static_cast<float>(d), to_float(s[b]) * a.dx[i], ak);
      if constexpr (kMin) ak = std::fma(to_float(m[b]), a.bsum[i], ak);
    }
    y[t * ldy + n] = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  }
}

// From this many tokens on the panel kernel (its repack pays for itself), below it the row one;
// with vpdpbusd the panel's products cost fewer instructions and it pays from 8 (a SmolLM2
// step's Q8_0 matmuls 1.07x at 8 tokens, 1.28x at 12; 0.80-0.92x at 4-6; docs/benchmarks.md).
constexpr int64_t kPanelTokens = 16, kPanelTokensVnni = 8;

template <bool kQ5, bool kMin, typename S, Dot D>
void run(const Weights& w, const Xq& a, int64_t T, float* y, int64_t ldy) {
  if (T < (D == Dot::kAvx2 ? kPanelTokens : kPanelTokensVnni)) {
    parallel_rows(w.N, 16, [&](int64_t n0, int64_t n1) {
      int64_t t = 0;
      for (; t + 4 <= T; t += 4) row_tokens<kQ5, kMin, S, 4, D>(w, a, n0, n1, t, y, ldy);
      switch (T - t) {
        case 1: row_tokens<kQ5, kMin, S, 1, D>(w, a, n0, n1, t, y, ldy); break;
        case 2: row_tokens<kQ5, kMin, S, 2, D>(w, a, n0, n1, t, y, ldy); break;
        case 3: row_tokens<kQ5, kMin, S, 3, D>(w, a, n0, n1, t, y, ldy); break;
        default: break;
      }
    });
    return;
  }
  const int64_t groups = w.N / 8;
  parallel_rows(groups + (w.N % 8 ? 1 : 0), 2, [&](int64_t g0, int64_t g1) {
    thread_local Panel pn;
    for (int64_t g = g0; g < g1; ++g) {
      if (g == groups) {  // the rows past the last eight
        for (int64_t n = 8 * groups; n < w.N; ++n) row_scalar<kQ5, kMin, S>(w, a, T, n, y, ldy);
        continue;
      }
      pack<kQ5, kMin, S>(w, 8 * g, pn);
      int64_t t = 0;
      for (; t + 4 <= T; t += 4) tile<kMin, 4, D>(pn, a, t, 8 * g, y, ldy);
      switch (T - t) {
        case 1: tile<kMin, 1, D>(pn, a, t, 8 * g, y, ldy); break;
        case 2: tile<kMin, 2, D>(pn, a, t, 8 * g, y, ldy); break;
        case 3: tile<kMin, 3, D>(pn, a, t, 8 * g, y, ldy); break;
        default: break;
      }
    }
  });
}

template <typename S, Dot D>
void dispatch(const Weights& w, const Xq& a, int64_t T, float* y, int64_t ldy) {
  const bool q5 = w.bits == 5;
  if (q5 && w.min) run<true, true, S, D>(w, a, T, y, ldy);
  else if (q5) run<true, false, S, D>(w, a, T, y, ldy);
  else if (w.min) run<false, true, S, D>(w, a, T, y, ldy);
  else run<false, false, S, D>(w, a, T, y, ldy);
}

}  // namespace

bool block32_format(const Weights& w) {
  return w.bits != 4 && !w.b16 && w.nwb == w.K / 32 && w.offset == 0.0f;  // K = 32 too (one scale per row)
}

void block32_matmul(const Weights& w, const int8_t* xq, const float* dx, const float* bsum, int64_t ld, int64_t T,
                    float* y, int64_t ldy) {
  const Xq a{xq, dx, bsum, ld, w.K};
  with_dot([&](auto d) {
    if (w.half) dispatch<half_t, d.value>(w, a, T, y, ldy);
    else dispatch<float, d.value>(w, a, T, y, ldy);
  });
}

}  // namespace miaotui
