// The int8-activation prefill GEMM's tiles for CPUs with AVX-512 VNNI (chosen at run time,
// like matmul_avx512.cpp; layout and arithmetic in qgemm_vnni.h). vpdpbusd multiplies four
// unsigned weight bytes by four signed activation bytes and adds them to an int32 lane: one
// instruction is 64 multiply-adds, four times a float32 FMA's 16, and each panel's weights
// are read once for every kMR tokens.
//
// Compiled for AVX-512 VNNI as a whole, so it includes no header with inline functions
// other files share (see matmul_avx512.cpp).
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,fma")
#include <immintrin.h>

#include <cstdint>

#include "qgemm_vnni.h"

namespace miaotui {
namespace vnni {
namespace {

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <int MR>
void tile(const int8_t* xq, const float* dx, const float* bsum, int64_t ld, int64_t K, const Panel& p, float* y,
          int64_t ldy, int nc) {
  const int64_t nb = K / 32;
  __m512 acc[MR];
  for (int t = 0; t < MR; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i dot[MR];
    for (int t = 0; t < MR; ++t) dot[t] = _mm512_setzero_si512();
    const uint8_t* u = p.u + b * 512;
    for (int g = 0; g < 8; ++g) {
      const __m512i w = _mm512_loadu_si512(u + 64 * g);
      for (int t = 0; t < MR; ++t) dot[t] = _mm512_dpbusd_epi32(dot[t], w, bcast4(xq + t * K + 32 * b + 4 * g));
    }
    const __m512 sc = _mm512_loadu_ps(p.sc + b * kNR), c = _mm512_loadu_ps(p.c + b * kNR);
    for (int t = 0; t < MR; ++t) {
      const __m512 sd = _mm512_mul_ps(sc, _mm512_set1_ps(dx[t * ld + b]));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[t]), sd, acc[t]);
      acc[t] = _mm512_fmadd_ps(c, _mm512_set1_ps(bsum[t * ld + b]), acc[t]);
    }
  }
  const __mmask16 m = nc >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nc) - 1);
  for (int t = 0; t < MR; ++t) _mm512_mask_storeu_ps(y + t * ldy, m, acc[t]);
}

}  // namespace

void panel_gemm(const int8_t* xq, const float* dx, const float* bsum, int64_t ld, int64_t T, int64_t K,
                const Panel& p, float* y, int64_t ldy, int nc) {
  int64_t t = 0;
  for (; t + kMR <= T; t += kMR) tile<kMR>(xq + t * K, dx + t * ld, bsum + t * ld, ld, K, p, y + t * ldy, ldy, nc);
  const int8_t* x = xq + t * K;
  const float *d = dx + t * ld, *s = bsum + t * ld;
  float* yr = y + t * ldy;
  switch (T - t) {
    case 0: break;
    case 1: tile<1>(x, d, s, ld, K, p, yr, ldy, nc); break;
    case 2: tile<2>(x, d, s, ld, K, p, yr, ldy, nc); break;
    case 3: tile<3>(x, d, s, ld, K, p, yr, ldy, nc); break;
    case 4: tile<4>(x, d, s, ld, K, p, yr, ldy, nc); break;
    case 5: tile<5>(x, d, s, ld, K, p, yr, ldy, nc); break;
    case 6: tile<6>(x, d, s, ld, K, p, yr, ldy, nc); break;
    default: tile<7>(x, d, s, ld, K, p, yr, ldy, nc); break;
  }
}

}  // namespace vnni
}  // namespace miaotui
