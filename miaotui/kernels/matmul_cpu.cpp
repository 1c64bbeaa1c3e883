// Float32 matmuls whose every output is computed the same way whatever the batch (the
// AVX2 tiles here; matmul_avx512.cpp has the same with 16 lanes, used where the CPU can).
//
// y[t, n] = x[t] . W[n] is one chain of eight-lane FMAs over k (k = 0, 8, 16, ...; a
// masked tail), then a fixed horizontal sum. Tiles of several rows of x and of W only run
// several such chains side by side (for the FMA units' latency); no tile changes the order
// of any one chain, threads split the rows of W (and of x), never k. So a row's result
// does not depend on how many other rows share the call, where they sit in it, or on the
// thread count: the property the engine's batch invariance rests on (vLLM's
// batch-invariant mode and the "defeating nondeterminism" work get it on GPUs by fixing
// the reduction split; BLAS gives no such promise, MKL picks kernels by shape).
//
// The same code serves float32 weights (rows read in place), 16-bit ones (widened in the
// tiles, exactly) and quantized ones with
// float32 activations (prefill's exact path). Those are dequantized with exactly
// QuantWeight.dequantize's operations (an int to float, a multiply, an add), either a block
// of rows at a time into a thread's buffer (many rows of x: the work is shared) or eight
// values at a time inside the tiles (a few rows of x: no buffer round trip). Both give the
// same bits, so which one runs may depend on the batch.
//
// Prompt tokens (the engine's exact path) take the packed GEMM further down (f32_gemm,
// qf32_gemm): a different, equally fixed chain per output, used for every prompt row
// whatever the batch, never for decode rows.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "matmul_isa.h"
#include "quant_cpu.h"

namespace miaotui {
namespace {

inline float to_f32(float v) { return v; }
inline float to_f32(half_t v) { return _cvtsh_ss(v); }

// W's rows as the tiles read them, eight values at a time: float32 rows read in place, or
// a quantized weight's rows dequantized on the fly. at(n): the same from row n on.
struct Dense {
  const float* w;
  int64_t ldw;
  __m256 load(int j, int64_t k) const { return _mm256_loadu_ps(w + j * ldw + k); }
  // past K: zeros, and masked loads read nothing past the row
  __m256 load_tail(int j, int64_t k, __m256i m) const { return _mm256_maskload_ps(w + j * ldw + k, m); }
  Dense at(int64_t n) const { return {w + n * ldw, ldw}; }
};

// 16-bit rows read in place and widened to float32 eight values at a time, exactly: float16
// by F16C, bfloat16 by a shift (its bits are a float32's upper half). A 16-bit weight then
// takes the same FMA chain as the float32 weight holding the same value.
template <bool kBF16>
struct Wide16 {
  const half_t* w;
  int64_t ldw;
  static __m256 widen(__m128i v) {
    if constexpr (kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    else return _mm256_cvtph_ps(v);
  }
  // Where the next tile's rows start (see tile()).
  const char* row(int j) const { return reinterpret_cast<const char*>(w + j * ldw); }
  static constexpr int64_t kRowBytes = 2;
  __m256 load(int j, int64_t k) const {
    return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * ldw + k)));
  }
  // past K: zeros, reading nothing past the row
  __m256 load_tail(int j, int64_t k, __m256i m) const {
    alignas(16) half_t buf[8] = {};
    const int count = __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(m)));
    std::copy(w + j * ldw + k, w + j * ldw + k + count, buf);
    return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
  Wide16 at(int64_t n) const { return {w + n * ldw, ldw}; }
};
using Half = Wide16<false>;
using BF16 = Wide16<true>;

// Eight weights k..k+7 (k a multiple of 8) of a quantized row as float32, computed as
// dequant_row does: the integer value (minus 8 for int4 without a min), times the scale,
// plus the min.
template <int kBits, bool kMin, bool kB16, typename S>
struct Quant {
  const Weights* w;
  int64_t n0;
  __m256 load(int j, int64_t k) const {
    const int64_t r = n0 + j;
    const uint8_t* q = w->q + r * w->row_bytes;
    __m128i v;
    if constexpr (kBits == 8) {
      v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k));
    } else {  // block b's byte i holds value i (low nibble) and i + 16 (high nibble)
      const int64_t b = k / 32, off = k % 32;
      v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 16 * b + off % 16));
      if (off >= 16) v = _mm_srli_epi16(v, 4);
      v = _mm_and_si128(v, _mm_set1_epi8(0x0F));
      if (!kMin) v = _mm_sub_epi8(v, _mm_set1_epi8(8));
    }
    const int64_t si = r * w->nwb + (kB16 ? k / 16 : (k / 32) >> w->shift);
    __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
                             _mm256_set1_ps(to_f32(static_cast<const S*>(w->scale)[si])));
    if (kMin) f = _mm256_add_ps(f, _mm256_set1_ps(to_f32(static_cast<const S*>(w->min)[si])));
    return f;
  }
  __m256 load_tail(int j, int64_t k, __m256i m) const { return _mm256_and_ps(load(j, k), _mm256_castsi256_ps(m)); }
  Quant at(int64_t n) const { return {w, n0 + n}; }
};

// TM rows of x against TN rows of W over all K; y[i, j] at y + i * ldy + j.
template <int TM, int TN, typename W>
inline void tile(const float* x, int64_t ldx, const W& w, int64_t K, float* y, int64_t ldy) {
  __m256 acc[TM][TN];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t full = K / 8 * 8;
  // One row of x against 16-bit rows (decode): W streams from memory once, TN rows at a
  // time, and a row of K = 576 halves is 18 cache lines, too short a stream for the
  // hardware prefetcher to catch up with: 16-bit rows read at ~22 GB/s where float32 ones
  // (twice as long) read at ~30. So the next TN rows (one contiguous run when ldw == K)
  // are prefetched in order, spread over this tile's steps: ~25 GB/s. Float32 rows are
  // left to the hardware (slower with it). Prefetches change no result.
  constexpr bool kAhead = TM == 1 && requires { W::kRowBytes; };
  [[maybe_unused]] const char* next = nullptr;
  [[maybe_unused]] int64_t lines = 0, per = 0;
  if constexpr (kAhead) {
    next = w.row(TN);
    lines = TN * w.ldw * W::kRowBytes / 64;
    per = (lines + full / 8 - 1) / std::max<int64_t>(1, full / 8);
  }
  for (int64_t k = 0; k < full; k += 8) {
    if constexpr (kAhead) {
      const int64_t l0 = k / 8 * per, l1 = std::min(lines, l0 + per);
      for (int64_t l = l0; l < l1; ++l) _mm_prefetch(next + 64 * l, _MM_HINT_T0);
    }
    __m256 xv[TM];
    for (int i = 0; i < TM; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
    for (int j = 0; j < TN; ++j) {
      const __m256 wv = w.load(j, k);
      for (int i = 0; i < TM; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if (full < K) {  // both operands zero past K
    const __m256i m = lanes_below(K - full);
    for (int j = 0; j < TN; ++j) {
      const __m256 wv = w.load_tail(j, full, m);
      for (int i = 0; i < TM; ++i)
        acc[i][j] = _mm256_fmadd_ps(_mm256_maskload_ps(x + i * ldx + full, m), wv, acc[i][j]);
    }
  }
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) y[i * ldy + j] = hsum(acc[i][j]);
}

// Tiles of up to TM rows of x by TN rows of W, edges included.
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

// All T rows of x against N rows of W (a block that stays in L2), 48 rows of x at a time
// (so they stay in L2 too): three rows of x by four of W (12 chains), a lone row by eight.
template <typename W>
void rows(const float* x, int64_t ldx, int64_t T, int64_t K, const W& w, int64_t N, float* y, int64_t ldy) {
  for (int64_t t0 = 0; t0 < T; t0 += 48) {
    const int64_t t1 = std::min(T, t0 + 48);
    int64_t t = t0;
    for (; t + 3 <= t1; t += 3) tiles_tn<3, 4>(x + t * ldx, ldx, w, K, N, y + t * ldy, ldy);
    if (t1 - t == 2) tiles_tn<2, 4>(x + t * ldx, ldx, w, K, N, y + t * ldy, ldy);
    if (t1 - t == 1) tiles_tn<1, 8>(x + t * ldx, ldx, w, K, N, y + t * ldy, ldy);
  }
}

// 16-lane AVX-512 tiles where the CPU has them (MIAOTUI_NO_AVX512=1: the AVX2 ones).
bool use_avx512() {
  static const bool yes = [] {
    const char* off = std::getenv("MIAOTUI_NO_AVX512");
    return !(off && *off && std::string(off) != "0") && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw");
  }();
  return yes;
}

void rows_block(const float* x, int64_t ldx, int64_t T, int64_t K, const float* w, int64_t ldw,
                int64_t N, float* y, int64_t ldy) {
  if (use_avx512()) return avx512::f32_rows(x, ldx, T, K, w, ldw, N, y, ldy);
  rows(x, ldx, T, K, Dense{w, ldw}, N, y, ldy);
}

void h16_rows_block(const float* x, int64_t ldx, int64_t T, int64_t K, const half_t* w, int64_t ldw,
                    int64_t N, float* y, int64_t ldy, bool bf16) {
  if (use_avx512()) return avx512::h16_rows(x, ldx, T, K, w, ldw, N, y, ldy, bf16);
  if (bf16) rows(x, ldx, T, K, BF16{w, ldw}, N, y, ldy);
  else rows(x, ldx, T, K, Half{w, ldw}, N, y, ldy);
}

// All T rows of x against rows n0..n1 of a quantized W, dequantized inside the tiles.
template <typename S>
void qrows_s(const float* x, int64_t ldx, int64_t T, int64_t K, const Weights& w, int64_t n0, int64_t n1,
             float* y, int64_t ldy) {
  const int64_t N = n1 - n0;
  if (w.bits == 4) {
    if (w.min) rows(x, ldx, T, K, Quant<4, true, false, S>{&w, n0}, N, y, ldy);
    else rows(x, ldx, T, K, Quant<4, false, false, S>{&w, n0}, N, y, ldy);
  } else if (w.b16) {  // block 16: int8, no min
    rows(x, ldx, T, K, Quant<8, false, true, S>{&w, n0}, N, y, ldy);
  } else {
    if (w.min) rows(x, ldx, T, K, Quant<8, true, false, S>{&w, n0}, N, y, ldy);
    else rows(x, ldx, T, K, Quant<8, false, false, S>{&w, n0}, N, y, ldy);
  }
}

void qrows(const float* x, int64_t ldx, int64_t T, int64_t K, const Weights& w, int64_t n0, int64_t n1,
           float* y, int64_t ldy) {
  if (use_avx512()) {
    const QuantRows qr{w.q, w.scale, w.min, w.row_bytes, w.nwb, w.shift, w.bits, w.half, w.b16};
    return avx512::q_rows(x, ldx, T, K, qr, n0, n1, y, ldy);
  }
  if (w.half) qrows_s<half_t>(x, ldx, T, K, w, n0, n1, y, ldy);
  else qrows_s<float>(x, ldx, T, K, w, n0, n1, y, ldy);
}

// Up to this many rows of x, quantized weights are dequantized inside the tiles.
constexpr int64_t kInlineDequantRows = 8;

// Rows of W per job: about 128 KB of float32 weights, a multiple of 8.
int64_t block_rows(int64_t K) { return std::clamp<int64_t>((128 << 10) / (4 * K) / 8 * 8, 8, 256); }

// Jobs over blocks of W's rows and, when those are few, over runs of x's rows too (a
// multiple of 3, so tiles fall the same way). f(t0, t1, n0, n1) does one job.
template <typename F>
void split(int64_t T, int64_t N, int64_t nb, const F& f) {
  const int64_t nblocks = (N + nb - 1) / nb, want = 4 * kernel_threads();
  int64_t tb = T;
  if (nblocks < want && T >= 6) tb = std::max<int64_t>(3, (T * nblocks / want + 2) / 3 * 3);
  const int64_t tblocks = (T + tb - 1) / tb;
  parallel_rows(nblocks * tblocks, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n0 = (j / tblocks) * nb, t0 = (j % tblocks) * tb;
      f(t0, std::min(T, t0 + tb), n0, std::min(N, n0 + nb));
    }
  });
}

// ---- The prefill GEMM: W packed in panels, rows of x broadcast ----
//
// Prompt tokens (many rows of x) take the classic GEMM form instead of the dot-product
// tiles above: W's rows are packed, a block at a time, into panels of NR columns
// (panel[k * NR + j] = W[n + j, k], quantized weights dequantized as dequant_row does), and
// a tile of MR rows of x broadcasts x[t, k] against a panel's NR columns: 2 * MR vector
// accumulators, two vector loads per MR broadcasts, where the dot-product tiles load a W
// vector and an x vector per few FMAs and end every output with a horizontal sum. Each
// output is one FMA chain over k = 0, 1, 2, ... in order, for any tile, vector width or
// number of rows, so batch invariance holds as before, and the AVX2 and AVX-512 kernels
// agree bit for bit (the dot-product tiles did not). The decode path keeps the dot-product
// tiles: one row of x cannot pay for packing W.

// MR rows of x, packed (xp[k * MR + i] = x[i, k]), against one packed panel of 16 columns
// (nc stored), AVX2.
template <int MR>
inline void gemm_tile(const float* xp, const float* p, int64_t K, float* y, int64_t ldy, int nc) {
  // Every loop over i fully unrolled: otherwise GCC keeps a0/a1 in memory as well and
  // stores all 2 * MR accumulators every k (measured: 2.3x slower on a Zen 3 core).
  __m256 a0[MR], a1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) a0[i] = a1[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(p + 16 * k), w1 = _mm256_loadu_ps(p + 16 * k + 8);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m256 b = _mm256_broadcast_ss(xp + k * MR + i);
      a0[i] = _mm256_fmadd_ps(b, w0, a0[i]);
      a1[i] = _mm256_fmadd_ps(b, w1, a1[i]);
    }
  }
  const __m256i m0 = lanes_below(std::min(nc, 8)), m1 = lanes_below(std::max(0, nc - 8));
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if (nc >= 8) _mm256_storeu_ps(y + i * ldy, a0[i]);
    else _mm256_maskstore_ps(y + i * ldy, m0, a0[i]);
    if (nc >= 16) _mm256_storeu_ps(y + i * ldy + 8, a1[i]);
    else if (nc > 8) _mm256_maskstore_ps(y + i * ldy + 8, m1, a1[i]);
  }
}

template <int MR>
void gemm_rows(const float* xp, const float* panels, int64_t K, int64_t N, float* y, int64_t ldy) {
  for (int64_t n = 0; n < N; n += 16)
    gemm_tile<MR>(xp, panels + n * K, K, y + n, ldy, static_cast<int>(std::min<int64_t>(16, N - n)));
}

// x packed in blocks of 6 rows (as avx512::gemm_packed takes it, with 6 for kGemmMR).
void gemm_packed_avx2(const float* xp, int64_t T, int64_t K, const float* panels, int64_t N, float* y, int64_t ldy) {
  int64_t t = 0;
  for (; t + 6 <= T; t += 6) gemm_rows<6>(xp + t * K, panels, K, N, y + t * ldy, ldy);
  const float* xr = xp + t * K;
  float* yr = y + t * ldy;
  switch (T - t) {
    case 0: break;
    case 1: gemm_rows<1>(xr, panels, K, N, yr, ldy); break;
    case 2: gemm_rows<2>(xr, panels, K, N, yr, ldy); break;
    case 3: gemm_rows<3>(xr, panels, K, N, yr, ldy); break;
    case 4: gemm_rows<4>(xr, panels, K, N, yr, ldy); break;
    default: gemm_rows<5>(xr, panels, K, N, yr, ldy); break;
  }
}

// Eight rows' values k..k+7 (r[j] + k) stored transposed: dst[i * NR + j] = r[j][k + i].
inline void transpose8(const float* const* r, int64_t k, float* dst, int NR) {
  __m256 a[8], b[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_loadu_ps(r[j] + k);
  for (int j = 0; j < 8; j += 2) {
    b[j] = _mm256_unpacklo_ps(a[j], a[j + 1]);
    b[j + 1] = _mm256_unpackhi_ps(a[j], a[j + 1]);
  }
  for (int j = 0; j < 8; j += 4) {
    a[j] = _mm256_shuffle_ps(b[j], b[j + 2], 0x44);
    a[j + 1] = _mm256_shuffle_ps(b[j], b[j + 2], 0xEE);
    a[j + 2] = _mm256_shuffle_ps(b[j + 1], b[j + 3], 0x44);
    a[j + 3] = _mm256_shuffle_ps(b[j + 1], b[j + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * NR, _mm256_permute2f128_ps(a[i], a[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * NR, _mm256_permute2f128_ps(a[i], a[i + 4], 0x31));
  }
}

// Rows n0..n1 of W into panels of NR columns (zeros past n1). row(n, buf) gives row n's K
// floats, in place or written to buf (K floats); tmp: room for (NR + 1) * K floats.
template <typename Row>
void pack_panels(const Row& row, int64_t n0, int64_t n1, int64_t K, int NR, float* out, float* tmp) {
  float* zeros = tmp + NR * K;
  std::fill(zeros, zeros + K, 0.0f);
  const float* r[32];
  for (int64_t p0 = n0; p0 < n1; p0 += NR) {
    float* panel = out + (p0 - n0) * K;
    for (int j = 0; j < NR; ++j) r[j] = p0 + j < n1 ? row(p0 + j, tmp + j * K) : zeros;
    const int64_t k8 = K / 8 * 8;
    for (int64_t k = 0; k < k8; k += 8)
      for (int j = 0; j < NR; j += 8) transpose8(r + j, k, panel + k * NR + j, NR);
    for (int64_t k = k8; k < K; ++k)
      for (int j = 0; j < NR; ++j) panel[k * NR + j] = r[j][k];
  }
}

// y = x @ W.T over all rows, W given row by row. x is packed once (blocks of MR rows);
// jobs: blocks of W's rows (packed once per job) by runs of whole x blocks.
template <typename Row>
void gemm(const float* x, int64_t ldx, int64_t T, int64_t K, int64_t N, const Row& row, float* y, int64_t ldy) {
  if (T == 0 || N == 0) return;
  const bool wide = use_avx512();
  const int NR = wide ? avx512::kGemmNR : 16, MR = wide ? avx512::kGemmMR : 6;
  const int64_t nxb = (T + MR - 1) / MR;
  std::vector<float> xp(nxb * MR * K);
  parallel_rows(nxb, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * MR, rows = std::min<int64_t>(MR, T - t0);
      float* out = xp.data() + t0 * K;
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t k = 0; k < K; ++k) out[k * rows + i] = x[(t0 + i) * ldx + k];
    }
  });
  // jobs over blocks of W's rows, and over runs of x blocks when those are few
  const int64_t nb = std::clamp<int64_t>((512 << 10) / (4 * K) / NR * NR, NR, 256);
  const int64_t nblocks = (N + nb - 1) / nb, want = 4 * kernel_threads();
  int64_t xb = nxb;
  if (nblocks < want && nxb >= 2) xb = std::max<int64_t>(1, nxb * nblocks / want);
  const int64_t xruns = (nxb + xb - 1) / xb;
  parallel_rows(nblocks * xruns, 1, [&](int64_t j0, int64_t j1) {
    thread_local std::vector<float> panels, tmp;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n0 = (j / xruns) * nb, n1 = std::min(N, n0 + nb);
      const int64_t t0 = (j % xruns) * xb * MR, t1 = std::min(T, t0 + xb * MR);
      panels.resize((n1 - n0 + NR - 1) / NR * NR * K);
      tmp.resize((NR + 1) * K);
      pack_panels(row, n0, n1, K, NR, panels.data(), tmp.data());
      const float* xb_ptr = xp.data() + t0 * K;
      if (wide) avx512::gemm_packed(xb_ptr, t1 - t0, K, panels.data(), n1 - n0, y + t0 * ldy + n0, ldy);
      else gemm_packed_avx2(xb_ptr, t1 - t0, K, panels.data(), n1 - n0, y + t0 * ldy + n0, ldy);
    }
  });
}

}  // namespace

void f32_matmul_into(const float* x, int64_t ldx, int64_t T, int64_t K, const float* w, int64_t ldw,
                     int64_t N, float* y, int64_t ldy) {
  if (T == 0 || N == 0) return;
  split(T, N, block_rows(K), [&](int64_t t0, int64_t t1, int64_t n0, int64_t n1) {
    rows_block(x + t0 * ldx, ldx, t1 - t0, K, w + n0 * ldw, ldw, n1 - n0, y + t0 * ldy + n0, ldy);
  });
}

void h16_matmul_into(const float* x, int64_t ldx, int64_t T, int64_t K, const half_t* w, int64_t ldw,
                     int64_t N, float* y, int64_t ldy, bool bf16) {
  if (T == 0 || N == 0) return;
  split(T, N, block_rows(K), [&](int64_t t0, int64_t t1, int64_t n0, int64_t n1) {
    h16_rows_block(x + t0 * ldx, ldx, t1 - t0, K, w + n0 * ldw, ldw, n1 - n0, y + t0 * ldy + n0, ldy, bf16);
  });
}

void qf32_matmul_into(const float* x, int64_t ldx, int64_t T, int64_t K, const Weights& w, float* y,
                      int64_t ldy) {
  TORCH_CHECK(K <= w.K, "x is wider than the weight");
  if (T == 0 || w.N == 0) return;
  if (T <= kInlineDequantRows && w.bits != 5) {  // the tiles read int4/int8 rows; int5: dequant_row below
    split(T, w.N, 32, [&](int64_t t0, int64_t t1, int64_t n0, int64_t n1) {
      qrows(x + t0 * ldx, ldx, t1 - t0, K, w, n0, n1, y + t0 * ldy + n0, ldy);
    });
    return;
  }
  split(T, w.N, block_rows(w.K), [&](int64_t t0, int64_t t1, int64_t n0, int64_t n1) {
    thread_local std::vector<float> buf;
    buf.resize((n1 - n0) * w.K);
    for (int64_t n = n0; n < n1; ++n) dequant_row(w, n, buf.data() + (n - n0) * w.K);
    rows_block(x + t0 * ldx, ldx, t1 - t0, K, buf.data(), w.K, n1 - n0, y + t0 * ldy + n0, ldy);
  });
}

void f32_gemm_into(const float* x, int64_t ldx, int64_t T, int64_t K, const float* w, int64_t ldw, int64_t N,
                   float* y, int64_t ldy) {
  gemm(x, ldx, T, K, N, [&](int64_t n, float*) { return w + n * ldw; }, y, ldy);
}

namespace {

// f32_gemm_into for float16 / bfloat16 rows, each widened exactly into the packing buffer
// as it is packed (the same values, so the same bits as for the float32 weight; no float32
// copy of the whole matrix).
template <bool kBF16>
void h16_gemm_into(const float* x, int64_t ldx, int64_t T, int64_t K, const half_t* w, int64_t ldw, int64_t N,
                   float* y, int64_t ldy) {
  gemm(x, ldx, T, K, N, [&](int64_t n, float* buf) {
    const Wide16<kBF16> row{w + n * ldw, ldw};
    const int64_t k8 = K / 8 * 8;
    for (int64_t k = 0; k < k8; k += 8) _mm256_storeu_ps(buf + k, row.load(0, k));
    for (int64_t k = k8; k < K; ++k) {
      const uint16_t h = row.w[k];
      if constexpr (kBF16) {
        const uint32_t bits = static_cast<uint32_t>(h) << 16;
        std::memcpy(buf + k, &bits, 4);
      } else {
        buf[k] = _cvtsh_ss(h);
      }
    }
    return static_cast<const float*>(buf);
  }, y, ldy);
}

}  // namespace

void qf32_gemm_into(const float* x, int64_t ldx, int64_t T, int64_t K, const Weights& w, float* y, int64_t ldy) {
  TORCH_CHECK(K <= w.K, "x is wider than the weight");
  // a row dequantized to w.K values, of which the first K meet x (the rest is padding)
  gemm(x, ldx, T, K, w.N, [&](int64_t n, float* buf) {
    if (K == w.K) {
      dequant_row(w, n, buf);
      return static_cast<const float*>(buf);
    }
    thread_local std::vector<float> full;
    full.resize(w.K);
    dequant_row(w, n, full.data());
    std::copy(full.begin(), full.begin() + K, buf);
    return static_cast<const float*>(buf);
  }, y, ldy);
}

namespace {

at::Tensor check_x(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "x must be float32 [T, K] with contiguous rows");
  return x;
}

// y = x @ W.T for W [N, K] float32, or float16 / bfloat16 widened to float32 (the same
// result as for W.float()).
at::Tensor f32_matmul(const at::Tensor& x, const at::Tensor& w) {
  check_x(x);
  const auto dt = w.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) && w.dim() == 2 && w.stride(1) == 1 &&
              w.size(1) == x.size(1), "w must be float32, float16 or bfloat16 [N, K] with contiguous rows");
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  if (dt == at::kFloat)
    f32_matmul_into(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), w.data_ptr<float>(),
                    w.stride(0), w.size(0), y.data_ptr<float>(), w.size(0));
  else
    h16_matmul_into(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), static_cast<const half_t*>(w.data_ptr()),
                    w.stride(0), w.size(0), y.data_ptr<float>(), w.size(0), dt == at::kBFloat16);
  return y;
}

// y = x @ dequantize(W).T for a quantized W, activations kept float32.
at::Tensor qf32_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const at::Tensor& min, int64_t block, int64_t bits, double offset) {
  check_x(x);
  const Weights w = describe(q, scale, min, block, bits, offset);
  at::Tensor y = at::empty({x.size(0), w.N}, x.options());
  qf32_matmul_into(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), w, y.data_ptr<float>(), w.N);
  return y;
}

// The same as f32_matmul / qf32_matmul through the packed GEMM (prompt tokens).
at::Tensor f32_gemm(const at::Tensor& x, const at::Tensor& w) {
  check_x(x);
  const auto dt = w.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) && w.dim() == 2 && w.stride(1) == 1 &&
              w.size(1) == x.size(1), "w must be float32, float16 or bfloat16 [N, K] with contiguous rows");
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  const auto h = static_cast<const half_t*>(w.data_ptr());
  if (dt == at::kFloat)
    f32_gemm_into(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), w.data_ptr<float>(), w.stride(0),
                  w.size(0), y.data_ptr<float>(), w.size(0));
  else if (dt == at::kHalf)
    h16_gemm_into<false>(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), h, w.stride(0), w.size(0),
                         y.data_ptr<float>(), w.size(0));
  else
    h16_gemm_into<true>(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), h, w.stride(0), w.size(0),
                        y.data_ptr<float>(), w.size(0));
  return y;
}

at::Tensor qf32_gemm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& min,
                     int64_t block, int64_t bits, double offset) {
  check_x(x);
  const Weights w = describe(q, scale, min, block, bits, offset);
  at::Tensor y = at::empty({x.size(0), w.N}, x.options());
  qf32_gemm_into(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), w, y.data_ptr<float>(), w.N);
  return y;
}

}  // namespace

void register_matmul(pybind11::module& m) {
  using no_gil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("f32_matmul", &f32_matmul, "x @ W.T, float32 (W float32, float16 or bfloat16), batch-invariant", no_gil());
  m.def("qf32_matmul", &qf32_matmul, "x @ dequantize(W).T, float32 activations, batch-invariant", no_gil());
  m.def("f32_gemm", &f32_gemm, "x @ W.T (W float32, float16 or bfloat16), batch-invariant, W packed (prefill)",
        no_gil());
  m.def("qf32_gemm", &qf32_gemm, "x @ dequantize(W).T, float32 activations, batch-invariant, packed (prefill)",
        no_gil());
}

}  // namespace miaotui
