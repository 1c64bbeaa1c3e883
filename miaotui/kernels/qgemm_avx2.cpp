// The int8-activation prefill GEMM's tiles for AVX2 CPUs without VNNI: the same panels
// (qgemm_vnni.h) and the same integer block sums, so the same bits as the VNNI kernel.
// vpmaddubsw multiplies 32 unsigned weight bytes by 32 signed activation bytes and adds
// pairs into int16 lanes, then vpmaddwd adds those pairs into int32: a panel's 16 rows are
// two vectors of 8 rows x 4 values, and a tile is 8 rows by up to kMR tokens.
//   int4 (u = the nibble, 0..15): a pair sum is at most 15 * 127 * 2 = 3810, so a block's
//     eight groups add up in int16 (< 30480) and are widened once per block.
//   int8 (u = w + 128): u * x would overflow int16, so the signed weight w = u ^ 0x80 is
//     used, |w| against x with w's sign (pair sums <= 128 * 127 * 2 = 32512), and the
//     block's sum of x times 128 is added back: sum u x = sum w x + 128 sum x, exactly.
#include <immintrin.h>

#include <cstdint>

#include "qgemm_vnni.h"

namespace miaotui {
namespace vnni {
namespace {

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Rows 8h..8h+7 of the panel against MR tokens; y[t, j] for j < nc (nc <= 8).
template <int MR, bool kInt4>
void tile(const int8_t* xq, const float* dx, const float* bsum, const int32_t* isum, int64_t ld, int64_t K,
          const Panel& p, int h, float* y, int64_t ldy, int nc) {
  const int64_t nb = K / 32;
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[MR];
#pragma GCC unroll 8
  for (int t = 0; t < MR; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i dot[MR];
#pragma GCC unroll 8
    for (int t = 0; t < MR; ++t) dot[t] = _mm256_setzero_si256();
    const uint8_t* u = p.u + b * 512 + 32 * h;
    const int8_t* xb = xq + 32 * b;
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + 64 * g));
      if constexpr (kInt4) {
#pragma GCC unroll 8
        for (int t = 0; t < MR; ++t)
          dot[t] = _mm256_add_epi16(dot[t], _mm256_maddubs_epi16(w, bcast4(xb + t * K + 4 * g)));
      } else {
        const __m256i ws = _mm256_xor_si256(w, flip), wa = _mm256_abs_epi8(ws);
#pragma GCC unroll 8
        for (int t = 0; t < MR; ++t) {
          const __m256i xs = _mm256_sign_epi8(bcast4(xb + t * K + 4 * g), ws);
          dot[t] = _mm256_add_epi32(dot[t], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xs), ones));
        }
      }
    }
    const __m256 sc = _mm256_loadu_ps(p.sc + b * kNR + 8 * h), c = _mm256_loadu_ps(p.c + b * kNR + 8 * h);
#pragma GCC unroll 8
    for (int t = 0; t < MR; ++t) {
      const __m256i d = kInt4 ? _mm256_madd_epi16(dot[t], ones)
                              : _mm256_add_epi32(dot[t], _mm256_set1_epi32(128 * isum[t * ld + b]));
      const __m256 sd = _mm256_mul_ps(sc, _mm256_set1_ps(dx[t * ld + b]));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sd, acc[t]);
      acc[t] = _mm256_fmadd_ps(c, _mm256_set1_ps(bsum[t * ld + b]), acc[t]);
    }
  }
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(nc), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
#pragma GCC unroll 8
  for (int t = 0; t < MR; ++t) {
    if (nc >= 8) _mm256_storeu_ps(y + t * ldy, acc[t]);
    else _mm256_maskstore_ps(y + t * ldy, m, acc[t]);
  }
}

template <bool kInt4>
void half_gemm(const int8_t* xq, const float* dx, const float* bsum, const int32_t* isum, int64_t ld, int64_t T,
               int64_t K, const Panel& p, int h, float* y, int64_t ldy, int nc) {
  constexpr int MR = kAvx2MR;
  int64_t t = 0;
  for (; t + MR <= T; t += MR)
    tile<MR, kInt4>(xq + t * K, dx + t * ld, bsum + t * ld, isum ? isum + t * ld : nullptr, ld, K, p, h, y + t * ldy, ldy, nc);
  const int8_t* x = xq + t * K;
  const float *d = dx + t * ld, *s = bsum + t * ld;
  const int32_t* is = isum ? isum + t * ld : nullptr;
  float* yr = y + t * ldy;
  switch (T - t) {
    case 0: break;
    case 1: tile<1, kInt4>(x, d, s, is, ld, K, p, h, yr, ldy, nc); break;
    case 2: tile<2, kInt4>(x, d, s, is, ld, K, p, h, yr, ldy, nc); break;
    default: tile<3, kInt4>(x, d, s, is, ld, K, p, h, yr, ldy, nc); break;
  }
}

}  // namespace

void panel_gemm_avx2(const int8_t* xq, const float* dx, const float* bsum, const int32_t* isum, int64_t ld,
                     int64_t T, int64_t K, const Panel& p, bool int4, float* y, int64_t ldy, int nc) {
  for (int h = 0; h < 2 && 8 * h < nc; ++h) {
    const int n = nc - 8 * h < 8 ? nc - 8 * h : 8;
    if (int4) half_gemm<true>(xq, dx, bsum, isum, ld, T, K, p, h, y + 8 * h, ldy, n);
    else half_gemm<false>(xq, dx, bsum, isum, ld, T, K, p, h, y + 8 * h, ldy, n);
  }
}

}  // namespace vnni
}  // namespace miaotui
