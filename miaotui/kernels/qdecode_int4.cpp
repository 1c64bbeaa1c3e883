// The decode matmul for int4 weights with one scale per block of 32 (GGUF's Q4_0, Q4_1,
// the default model's format) from 8 tokens on: a panel kernel, output rows in the vector
// lanes, that reproduces the float steps of quant_cpu.cpp's row kernel exactly, so a
// token gets the same bits whichever kernel computes it (the row kernel, the batch-1 path,
// is untouched).
//
// The row kernel's steps for one output (rows with an even number of blocks):
//   eight accumulators; block b goes to R_(b mod 8), in block order:
//     R = fma(float(d_b), scale_b * dx_b, R)      d_b: the exact integer dot product of the
//                                                 block's nibbles (0..15) with its int8 x
//     R = fma(c_b, s_b, R)                        c_b the min (or, without one, the scale),
//                                                 s_b = dx_b * sum xq (times -8 without a min)
//   y = ((R_0 + R_1) + (R_4 + R_5)) + ((R_2 + R_3) + (R_6 + R_7))
// (its vector holds R_0, R_2, R_4, R_6, R_1, R_3, R_5, R_7 in lanes 0..7, and hsum adds
// lanes ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7))).
//
// Rows are unpacked per call, eight at a time, into a panel: per block, eight 32-byte
// vectors whose lane j holds four of row j's values as bytes (values 0..15, then 16..31,
// four at a time); scales and min-term factors transposed to match. A tile of four tokens
// against two panels (sixteen rows) broadcasts four activation bytes and meets both panels'
// vectors with them: the nibbles are unsigned, so vpmaddubsw takes them as they are, and a
// block's eight products add as int16 (at most 8 * 2 * 15 * 128 < 2^15) before one
// vpmaddwd (with VNNI, vpdpbusd adds the same products straight into int32); no
// horizontal sums. Blocks in order, R_0..R_7 of each panel row kept per token.
// From kInt4PanelTokens (8) tokens on; on a SmolLM2 decode step's Q4_0 matmuls 1.2x the row
// kernel at 8 tokens and 1.4-1.6x at 16 (docs/benchmarks.md).
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_cpu.h"

namespace miaotui {
namespace {

// Where block b's activation values 0..15 start (values 16..31 are 32 bytes on): int4
// activations are stored by pairs of blocks, [b 0..15, b+1 0..15, b 16..31, b+1 16..31].
inline int64_t x_at(int64_t b) { return 64 * (b >> 1) + 16 * (b & 1); }

struct Panel {
  std::vector<uint8_t> u;   // 256 bytes a block
  std::vector<float> sc, c; // the eight rows' scales and mins, 8 a block (c empty: no mins)
  // the min-term factors: the mins, or without them the scales (times -8 in s, the factor
  // the activations bring)
  const float* min_term() const { return c.empty() ? sc.data() : c.data(); }
};

// Rows n..n+7 of w into pn.
template <bool kMin, typename S>
void pack(const Weights& w, int64_t n, Panel& pn) {
  const int64_t nb = w.K / 32, rb = w.row_bytes;
  const uint8_t* r = w.q + n * rb;
  const S* s = static_cast<const S*>(w.scale) + n * w.nwb;
  const S* m = kMin ? static_cast<const S*>(w.min) + n * w.nwb : nullptr;
  pn.u.resize(256 * nb);
  pn.sc.resize(8 * nb);
  rows8_scales(s, w.nwb, nb, pn.sc.data());
  pn.c.resize(kMin ? 8 * nb : 0);
  if (kMin) rows8_scales(m, w.nwb, nb, pn.c.data());
  const Prefetch ahead(r, 8 * rb, nb);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    ahead(b);
    // the four 4-byte groups of the block's 16 bytes, rows side by side, split in place
    // into their low nibbles (values 4i..4i+3) and high nibbles (16 + 4i..)
    transpose_rows8(r + 16 * b, rb, &pn.u[256 * b]);
    __m256i* o = reinterpret_cast<__m256i*>(&pn.u[256 * b]);
    for (int i = 0; i < 4; ++i) {
      const __m256i g = _mm256_loadu_si256(o + i);
      _mm256_storeu_si256(o + 4 + i, _mm256_and_si256(_mm256_srli_epi16(g, 4), low4));
      _mm256_storeu_si256(o + i, _mm256_and_si256(g, low4));
    }
  }
}

// Tokens t0..t0+MR-1 against P panels (rows n..n+8P-1): each broadcast of four activation
// bytes meets P panel vectors (P = 2 halves the broadcasts, which compete with the panel
// loads for the load ports). xq in the paired order; dx and s (the min-term factor) rows ld
// apart, plain block order. Blocks in order, block b's steps going to R_(b mod 8).
template <int P, int MR, Dot D>
void tile(const Panel* pn, const int8_t* xq, const float* dx, const float* s, int64_t ld, int64_t K,
          int64_t t0, int64_t n, float* y, int64_t ldy) {
  constexpr bool kVnni = D != Dot::kAvx2;
  const int64_t nb = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 part[P][MR][8];  // R_k of each panel's eight rows
  for (int p = 0; p < P; ++p)
    for (int t = 0; t < MR; ++t)
      for (int k = 0; k < 8; ++k) part[p][t][k] = _mm256_setzero_ps();
  const float* mt[P];
  for (int p = 0; p < P; ++p) mt[p] = pn[p].min_term();
  for (int64_t b = 0; b < nb; ++b) {
    const int k = static_cast<int>(b & 7);
    const int8_t* x = xq + t0 * K + x_at(b);
    __m256i d16[P][MR];  // the block's sums: int16 (maddubs) or, with VNNI, int32
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
      for (int t = 0; t < MR; ++t) d16[p][t] = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {  // values 0..15, then 16..31 (32 bytes on)
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        __m256i c[P];
        for (int p = 0; p < P; ++p) c[p] = load32(&pn[p].u[256 * b + 32 * (4 * h + g)]);
#pragma GCC unroll 4
        for (int t = 0; t < MR; ++t) {
          const __m256i xb = bcast4(x + t * K + 32 * h + 4 * g);
          for (int p = 0; p < P; ++p) {
            if constexpr (kVnni) {
              d16[p][t] = dpbusd<D>(d16[p][t], c[p], xb);  // int32 sums here
            } else {
              d16[p][t] = _mm256_add_epi16(d16[p][t], _mm256_maddubs_epi16(c[p], xb));
              asm("" : "+x"(d16[p][t]));  // keeps the adds a chain (GCC otherwise reorders them into a tree, all products first)
            }
          }
        }
      }
    }
    for (int p = 0; p < P; ++p) {
      const __m256 sc = _mm256_loadu_ps(&pn[p].sc[8 * b]), c = _mm256_loadu_ps(mt[p] + 8 * b);
#pragma GCC unroll 4
      for (int t = 0; t < MR; ++t) {
        const int64_t i = (t0 + t) * ld + b;
        const __m256 d = _mm256_cvtepi32_ps(kVnni ? d16[p][t] : _mm256_madd_epi16(d16[p][t], ones));
        const __m256 acc = _mm256_fmadd_ps(d, _mm256_mul_ps(sc, _mm256_set1_ps(dx[i])), part[p][t][k]);
        part[p][t][k] = _mm256_fmadd_ps(c, _mm256_set1_ps(s[i]), acc);
      }
    }
  }
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int t = 0; t < MR; ++t) {
      const __m256* a = part[p][t];
      const __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[4], a[5])),
                                     _mm256_add_ps(_mm256_add_ps(a[2], a[3]), _mm256_add_ps(a[6], a[7])));
      _mm256_storeu_ps(y + (t0 + t) * ldy + n + 8 * p, v);
    }
}

template <int P, Dot D>
void tiles(const Panel* pn, const int8_t* xq, const float* dx, const float* s, int64_t ld, int64_t K, int64_t T,
           int64_t n, float* y, int64_t ldy) {
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) tile<P, 4, D>(pn, xq, dx, s, ld, K, t, n, y, ldy);
  switch (T - t) {
    case 1: tile<P, 1, D>(pn, xq, dx, s, ld, K, t, n, y, ldy); break;
    case 2: tile<P, 2, D>(pn, xq, dx, s, ld, K, t, n, y, ldy); break;
    case 3: tile<P, 3, D>(pn, xq, dx, s, ld, K, t, n, y, ldy); break;
    default: break;
  }
}

// Rows 0..8 * groups - 1, sixteen at a time (eight for an odd last group).
template <bool kMin, typename S, Dot D>
void run(const Weights& w, const int8_t* xq, const float* dx, const float* s, int64_t ld, int64_t T,
         int64_t groups, float* y, int64_t ldy) {
  parallel_rows((groups + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
    thread_local Panel pn[2];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = 16 * p;
      pack<kMin, S>(w, n, pn[0]);
      if (n + 16 <= 8 * groups) {
        pack<kMin, S>(w, n + 8, pn[1]);
        tiles<2, D>(pn, xq, dx, s, ld, w.K, T, n, y, ldy);
      } else {
        tiles<1, D>(pn, xq, dx, s, ld, w.K, T, n, y, ldy);
      }
    }
  });
}

template <Dot D>
void dispatch(const Weights& w, const int8_t* xq, const float* dx, const float* s, int64_t ld, int64_t T,
              int64_t groups, float* y, int64_t ldy) {
  if (w.half) {
    if (w.min) run<true, half_t, D>(w, xq, dx, s, ld, T, groups, y, ldy);
    else run<false, half_t, D>(w, xq, dx, s, ld, T, groups, y, ldy);
  } else {
    if (w.min) run<true, float, D>(w, xq, dx, s, ld, T, groups, y, ldy);
    else run<false, float, D>(w, xq, dx, s, ld, T, groups, y, ldy);
  }
}

}  // namespace

bool int4_panel_format(const Weights& w, int64_t T) {
  // the row kernel's steps above hold for one scale per block of 32 and an even block count
  return T >= kInt4PanelTokens && w.bits == 4 && !w.b16 && w.shift == 0 && w.nwb == w.K / 32 &&
         (w.K / 32) % 2 == 0 && w.N >= 8;
}

int64_t int4_panel_matmul(const Weights& w, const int8_t* xq, const float* dx, const float* s, int64_t ld,
                          int64_t T, float* y, int64_t ldy) {
  const int64_t groups = w.N / 8;
  with_dot([&](auto d) { dispatch<d.value>(w, xq, dx, s, ld, T, groups, y, ldy); });
  return 8 * groups;
}

}  // namespace miaotui
