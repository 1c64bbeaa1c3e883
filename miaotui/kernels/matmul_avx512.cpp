// matmul_cpu.cpp's tiles with 16-lane AVX-512 vectors, for CPUs that have them (chosen at
// run time: the rest of the package is built for AVX2). Each output is again one fixed
// FMA chain (sixteen lanes over k, then a fixed horizontal sum), whatever the tile, so a
// row's result never depends on the batch; it differs from the AVX2 result in the last
// bits, which only matters across machines.
//
// This file is compiled for AVX-512 as a whole, so it includes no header with inline
// functions other files share (torch's, the standard library's): the linker could
// otherwise keep an AVX-512 copy of one for every caller.
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,fma,f16c")
#include <immintrin.h>

#include <cstdint>

#include "matmul_isa.h"

namespace miaotui {
namespace avx512 {
namespace {

inline int64_t lesser(int64_t a, int64_t b) { return a < b ? a : b; }
inline float to_f32(const void* s, int64_t i, bool half) {
  return half ? _cvtsh_ss(static_cast<const uint16_t*>(s)[i]) : static_cast<const float*>(s)[i];
}

// Eight weights k..k+7 of a quantized row, as dequant_row computes them (quant_cpu.cpp).
inline __m256 qload8(const QuantRows& w, const uint8_t* q, const void* s, const void* m, int64_t k) {
  __m128i v;
  if (w.bits == 8) {
    v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k));
  } else {
    const int64_t b = k / 32, off = k % 32;
    v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 16 * b + off % 16));
    if (off >= 16) v = _mm_srli_epi16(v, 4);
    v = _mm_and_si128(v, _mm_set1_epi8(0x0F));
    if (!m) v = _mm_sub_epi8(v, _mm_set1_epi8(8));
  }
  const int64_t si = w.b16 ? k / 16 : (k / 32) >> w.shift;
  __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), _mm256_set1_ps(to_f32(s, si, w.half)));
  if (m) f = _mm256_add_ps(f, _mm256_set1_ps(to_f32(m, si, w.half)));
  return f;
}

// W's rows as tile() reads them: float32 rows, or a quantized weight dequantized sixteen
// values at a time.
struct Dense {
  const float* w;
  int64_t ldw;
  __m512 load(int j, int64_t k) const { return _mm512_loadu_ps(w + j * ldw + k); }
  __m512 load_tail(int j, int64_t k, __mmask16 m) const { return _mm512_maskz_loadu_ps(m, w + j * ldw + k); }
  Dense at(int64_t n) const { return {w + n * ldw, ldw}; }
};

// float16 / bfloat16 rows widened to float32 sixteen values at a time (exact).
template <bool kBF16>
struct Wide16 {
  const uint16_t* w;
  int64_t ldw;
  static __m512 widen(__m256i v) {
    if constexpr (kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    else return _mm512_cvtph_ps(v);
  }
  __m512 load(int j, int64_t k) const {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * ldw + k)));
  }
  __m512 load_tail(int j, int64_t k, __mmask16 m) const { return widen(_mm256_maskz_loadu_epi16(m, w + j * ldw + k)); }
  Wide16 at(int64_t n) const { return {w + n * ldw, ldw}; }
};

struct Quant {
  const QuantRows* w;
  int64_t n0;
  __m512 load(int j, int64_t k) const {
    const int64_t r = n0 + j, es = w->half ? 2 : 4;
    const uint8_t* q = w->q + r * w->row_bytes;
    const void* s = static_cast<const char*>(w->scale) + r * w->nwb * es;
    const void* m = w->min ? static_cast<const char*>(w->min) + r * w->nwb * es : nullptr;
    return _mm512_insertf32x8(_mm512_castps256_ps512(qload8(*w, q, s, m, k)), qload8(*w, q, s, m, k + 8), 1);
  }
  // past K the values are zero, as a masked load of a dequantized row would give
  __m512 load_tail(int j, int64_t k, __mmask16 m) const { return _mm512_maskz_mov_ps(m, load(j, k)); }
  Quant at(int64_t n) const { return {w, n0 + n}; }
};

// The sixteen sums of a[0..16) as one vector, lane 4 * (m % 4) + m / 4 holding a[m]'s:
// each sum pairs lanes i and i + 8, then i and i + 4, i and i + 2, i and i + 1, as the
// one-at-a-time sum in tile() does (the same additions, so the same bits), but four
// accumulators share each shuffle and add.
inline __m512 hsum16(const __m512 (&a)[16]) {
  __m512 p[8], q[4];
  for (int m = 0; m < 8; ++m)  // [a 0-7 + 8-15, b 0-7 + 8-15]
    p[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], 0xEE));
  for (int n = 0; n < 4; ++n)  // 128-bit lane L: accumulator 4n + L, lanes 0-3 + 4-7
    q[n] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * n], p[2 * n + 1], 0x88),
                         _mm512_shuffle_f32x4(p[2 * n], p[2 * n + 1], 0xDD));
  const __m512 r0 = _mm512_add_ps(_mm512_shuffle_ps(q[0], q[1], 0x44), _mm512_shuffle_ps(q[0], q[1], 0xEE));
  const __m512 r1 = _mm512_add_ps(_mm512_shuffle_ps(q[2], q[3], 0x44), _mm512_shuffle_ps(q[2], q[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(r0, r1, 0x88), _mm512_shuffle_ps(r0, r1, 0xDD));
}

template <int TM, int TN, typename W>
inline void tile(const float* x, int64_t ldx, const W& w, int64_t K, float* y, int64_t ldy) {
  __m512 acc[TM][TN];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t full = K / 16 * 16;
  for (int64_t k = 0; k < full; k += 16) {
    __m512 xv[TM];
    for (int i = 0; i < TM; ++i) xv[i] = _mm512_loadu_ps(x + i * ldx + k);
    for (int j = 0; j < TN; ++j) {
      const __m512 wv = w.load(j, k);
      for (int i = 0; i < TM; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if (full < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - full)) - 1);
    for (int j = 0; j < TN; ++j) {
      const __m512 wv = w.load_tail(j, full, m);
      for (int i = 0; i < TM; ++i)
        acc[i][j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i * ldx + full), wv, acc[i][j]);
    }
  }
  if constexpr (TN == 4) {  // four rows at a time, sixteen sums in one go (the same pairs)
    for (int i0 = 0; i0 < TM; i0 += 4) {
      __m512 a[16];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) a[4 * j + i] = i0 + i < TM ? acc[i0 + i][j] : _mm512_setzero_ps();
      const __m512 r = hsum16(a);
      for (int i = 0; i < 4 && i0 + i < TM; ++i) _mm_storeu_ps(y + (i0 + i) * ldy, _mm512_extractf32x4_ps(r, i));
    }
    return;
  }
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) {  // a fixed sum: halves, then quarters, ... of the lanes
      const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(acc[i][j]), _mm512_extractf32x8_ps(acc[i][j], 1));
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      y[i * ldy + j] = _mm_cvtss_f32(s);
    }
}

template <int TM, int TN, typename W>
inline void tiles_tn(const float* x, int64_t ldx, const W& w, int64_t K, int64_t N, float* y, int64_t ldy) {
  int64_t n = 0;
  for (; n + TN <= N; n += TN) tile<TM, TN>(x, ldx, w.at(n), K, y + n, ldy);
  const W r = w.at(n);
  switch (N - n) {
    case 0: break;
    case 1: tile<TM, 1>(x, ldx, r, K, y + n, ldy); break;
    case 2: tile<TM, 2>(x, ldx, r, K, y + n, ldy); break;
    case 3: tile<TM, 3>(x, ldx, r, K, y + n, ldy); break;
    case 4: tile<TM, 4>(x, ldx, r, K, y + n, ldy); break;
    case 5: tile<TM, 5>(x, ldx, r, K, y + n, ldy); break;
    case 6: tile<TM, 6>(x, ldx, r, K, y + n, ldy); break;
    default: tile<TM, 7>(x, ldx, r, K, y + n, ldy); break;
  }
}

// Rows of x, 48 at a time (they stay in L2), by tiles of six rows of x and four of W (six
// x vectors from L1 and four W vectors from L2 per 24 FMAs: W's rows, read from L2 for
// every tile, are what limits the speed), the rest by four or fewer (a lone row of x:
// eight of W).
template <typename W>
void rows(const float* x, int64_t ldx, int64_t T, int64_t K, const W& w, int64_t N, float* y, int64_t ldy) {
  for (int64_t t0 = 0; t0 < T; t0 += 48) {
    const int64_t t1 = lesser(T, t0 + 48);
    int64_t t = t0;
    for (; t + 6 <= t1; t += 6) tiles_tn<6, 4>(x + t * ldx, ldx, w, K, N, y + t * ldy, ldy);
    if (t1 - t >= 4) tiles_tn<4, 4>(x + t * ldx, ldx, w, K, N, y + t * ldy, ldy), t += 4;
    if (t1 - t == 3) tiles_tn<3, 4>(x + t * ldx, ldx, w, K, N, y + t * ldy, ldy);
    if (t1 - t == 2) tiles_tn<2, 4>(x + t * ldx, ldx, w, K, N, y + t * ldy, ldy);
    if (t1 - t == 1) tiles_tn<1, 8>(x + t * ldx, ldx, w, K, N, y + t * ldy, ldy);
  }
}

}  // namespace

void f32_rows(const float* x, int64_t ldx, int64_t T, int64_t K, const float* w, int64_t ldw, int64_t N,
              float* y, int64_t ldy) {
  rows(x, ldx, T, K, Dense{w, ldw}, N, y, ldy);
}

void h16_rows(const float* x, int64_t ldx, int64_t T, int64_t K, const uint16_t* w, int64_t ldw, int64_t N,
              float* y, int64_t ldy, bool bf16) {
  if (bf16) rows(x, ldx, T, K, Wide16<true>{w, ldw}, N, y, ldy);
  else rows(x, ldx, T, K, Wide16<false>{w, ldw}, N, y, ldy);
}

void q_rows(const float* x, int64_t ldx, int64_t T, int64_t K, const QuantRows& w, int64_t n0, int64_t n1,
            float* y, int64_t ldy) {
  rows(x, ldx, T, K, Quant{&w, n0}, n1 - n0, y, ldy);
}

}  // namespace avx512
}  // namespace miaotui

namespace miaotui {
namespace avx512 {
namespace {

// MR rows of x, packed (xp[k * MR + i] = x[i, k]), against one packed panel of 32 columns
// (nc of them stored): 2 * MR accumulators, each column's sum one FMA chain over k in order.
template <int MR>
inline void gemm_tile(const float* xp, const float* p, int64_t K, float* y, int64_t ldy, int nc) {
  __m512 a0[MR], a1[MR];
  for (int i = 0; i < MR; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(p + 32 * k), w1 = _mm512_loadu_ps(p + 32 * k + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 b = _mm512_set1_ps(xp[k * MR + i]);
      a0[i] = _mm512_fmadd_ps(b, w0, a0[i]);
      a1[i] = _mm512_fmadd_ps(b, w1, a1[i]);
    }
  }
  const __mmask16 m0 = nc >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nc) - 1);
  const __mmask16 m1 = nc >= 32 ? 0xFFFF : nc <= 16 ? 0 : static_cast<__mmask16>((1u << (nc - 16)) - 1);
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(y + i * ldy, m0, a0[i]);
    _mm512_mask_storeu_ps(y + i * ldy + 16, m1, a1[i]);
  }
}

template <int MR>
void gemm_rows(const float* xp, const float* panels, int64_t K, int64_t N, float* y, int64_t ldy) {
  for (int64_t n = 0; n < N; n += 32)
    gemm_tile<MR>(xp, panels + n * K, K, y + n, ldy, static_cast<int>(lesser(32, N - n)));
}

}  // namespace

void gemm_packed(const float* xp, int64_t T, int64_t K, const float* panels, int64_t N, float* y, int64_t ldy) {
  constexpr int MR = kGemmMR;
  int64_t t = 0;
  for (; t + MR <= T; t += MR) gemm_rows<MR>(xp + t * K, panels, K, N, y + t * ldy, ldy);
  const float* xr = xp + t * K;
  float* yr = y + t * ldy;
  switch (T - t) {
    case 0: break;
    case 1: gemm_rows<1>(xr, panels, K, N, yr, ldy); break;
    case 2: gemm_rows<2>(xr, panels, K, N, yr, ldy); break;
    case 3: gemm_rows<3>(xr, panels, K, N, yr, ldy); break;
    case 4: gemm_rows<4>(xr, panels, K, N, yr, ldy); break;
    case 5: gemm_rows<5>(xr, panels, K, N, yr, ldy); break;
    case 6: gemm_rows<6>(xr, panels, K, N, yr, ldy); break;
    case 7: gemm_rows<7>(xr, panels, K, N, yr, ldy); break;
    case 8: gemm_rows<8>(xr, panels, K, N, yr, ldy); break;
    case 9: gemm_rows<9>(xr, panels, K, N, yr, ldy); break;
    case 10: gemm_rows<10>(xr, panels, K, N, yr, ldy); break;
    default: gemm_rows<11>(xr, panels, K, N, yr, ldy); break;
  }
}

}  // namespace avx512
}  // namespace miaotui
