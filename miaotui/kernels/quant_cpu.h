// What the kernel files share: the quantized weight description, the thread pool and the
// int8-activation matmul (quant_cpu.cpp), used by the fused decode step (decode_cpu.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <immintrin.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <type_traits>

namespace miaotui {

// The sum of a vector's eight floats.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

using half_t = uint16_t;  // IEEE binary16 bits (torch.float16)

inline float to_float(float v) { return v; }
inline float to_float(half_t v) { return _cvtsh_ss(v); }

// Eight values from p as float32 (int8 values unscaled).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const half_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Lanes 0..count-1 set (count <= 8): the mask of a partial last eight, for masked loads,
// stores and blends.
inline __m256i lanes_below(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Eight values from p as floats, zeros past `count` (a short last group). Masked loads
// read nothing past p[count - 1]; going through memory instead would stall on
// store-to-load forwarding once per row.
template <typename S>
__attribute__((always_inline)) inline __m256 load_part(const S* p, int count) {
  if (count >= 8) return load8(p);
  if (count <= 0) return _mm256_setzero_ps();
  if constexpr (std::is_same_v<S, float>) {
    return _mm256_maskload_ps(p, lanes_below(count));
  } else {
    if (count % 2 == 0)  // pairs of halves as 32-bit lanes
      return _mm256_cvtph_ps(_mm_maskload_epi32(reinterpret_cast<const int*>(p),
                                                _mm256_castsi256_si128(lanes_below(count / 2))));
    alignas(32) float f[8] = {};
    for (int i = 0; i < count; ++i) f[i] = to_float(p[i]);
    return _mm256_load_ps(f);
  }
}

// The 32 4-bit values of one block as bytes 0..15.
inline __m256i unpack_int4(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

// The 32 values of int5 block b of a row (low nibbles at row, fifth bits at row + K/2) as
// int8, minus 16 when sub16: the bytes an int8 repack of the block holds.
inline __m256i unpack_int5(const uint8_t* row, int64_t half_k, int64_t b, bool sub16) {
  int32_t bits;
  std::memcpy(&bits, row + half_k + 4 * b, 4);
  // byte j of the 32 gets bit j of `bits`: byte j / 8 copied to byte j, tested against 1 << j % 8
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(bits), _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2,
                                                2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i mask = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask);  // 0xFF where the bit is set
  const __m256i low = unpack_int4(row + 16 * b);
  // set: low | 16 (minus 16: low); clear: low (minus 16: low - 16)
  return sub16 ? _mm256_add_epi8(low, _mm256_andnot_si256(set, _mm256_set1_epi8(-16)))
               : _mm256_or_si256(low, _mm256_and_si256(set, _mm256_set1_epi8(16)));
}

// Weights stream from memory once per call and the hardware prefetcher alone leaves
// bandwidth unused: the decode kernels prefetch this far ahead. With it, TinyLlama's Q8_0
// matmuls at M=1 went from 20.0 (best 22.7) to 21.6 (30.8) GB/s (python -m
// miaotui.bench.kernels --m 1, results/kernels_m1*.json).
constexpr int64_t kPrefetchBytes = 4096;

// The panel kernels' prefetch: rows n..n+7 are one contiguous run of 8 row_bytes, read at
// an even pace over `steps` steps; the run about kPrefetchBytes on is prefetched as fast.
struct Prefetch {
  const char* base;
  int64_t per_step;  // bytes
  Prefetch(const uint8_t* rows, int64_t run, int64_t steps) {
    base = reinterpret_cast<const char*>(rows) + std::max<int64_t>(1, (kPrefetchBytes + run - 1) / run) * run;
    per_step = (run + steps - 1) / steps;
  }
  void operator()(int64_t i) const {
    for (int64_t at = i * per_step; at < (i + 1) * per_step; at += 64) _mm_prefetch(base + at, _MM_HINT_T0);
  }
};

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

inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Rows j = 0..7's 16 bytes at p + j * stride as four vectors, lane j of out[g] holding
// row j's bytes 4g..4g+3.
inline void transpose_rows8(const uint8_t* p, int64_t stride, uint8_t* out) {
  __m256i v[4];
  for (int j = 0; j < 4; ++j)
    v[j] = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(p + (j + 4) * stride),
                               reinterpret_cast<const __m128i*>(p + j * stride));
  const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
  __m256i* o = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(o, _mm256_unpacklo_epi64(t0, t2));
  _mm256_storeu_si256(o + 1, _mm256_unpackhi_epi64(t0, t2));
  _mm256_storeu_si256(o + 2, _mm256_unpacklo_epi64(t1, t3));
  _mm256_storeu_si256(o + 3, _mm256_unpackhi_epi64(t1, t3));
}

// The decode kernels' integer dot products, four u8 x s8 byte pairs summed into each int32
// lane: vpmaddubsw + vpmaddwd on AVX2, or one vpdpbusd where the CPU has it, VEX-encoded
// (AVX-VNNI) or EVEX-encoded on 256-bit vectors (AVX-512 VNNI with VL). The kernels keep
// every int16 sum of maddubs below 2^15, so all three give the same integers, the same bits.
enum class Dot { kAvx2, kVex, kEvex };

// This CPU's best; kAvx2 while MIAOTUI_NO_VNNI is set, and instead of kEvex while
// MIAOTUI_NO_AVX512 is (read on every call, so a test can compare the paths in one process).
Dot dot_kind();

// f(std::integral_constant<Dot, dot_kind()>{}): a kernel instantiated per Dot, called with
// the one this CPU takes (the kernels' dispatch in one place).
template <typename F>
void with_dot(F&& f) {
  switch (dot_kind()) {
    case Dot::kVex: f(std::integral_constant<Dot, Dot::kVex>{}); break;
    case Dot::kEvex: f(std::integral_constant<Dot, Dot::kEvex>{}); break;
    default: f(std::integral_constant<Dot, Dot::kAvx2>{}); break;
  }
}

// acc + the four-byte dot products of u (unsigned) and s (signed) per lane. Inline assembly,
// so the files need no -mavxvnni / -mavx512vnni; run only where dot_kind() says so.
template <Dot D>
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
  static_assert(D != Dot::kAvx2, "maddubs + madd: no single instruction");
  if constexpr (D == Dot::kVex) asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
  else asm("%{evex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
  return acc;
}

// Four activation bytes broadcast to every 32-bit lane.
inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// A quantized [N, K] weight (layout: quant_cpu.cpp's header comment).
struct Weights {
  const uint8_t* q;
  const void* scale;
  const void* min;  // nullptr: none
  int64_t N, K;
  int64_t nwb;        // scale blocks per row
  int shift;          // scale index of 32-block b is b >> shift (B == 16: unused)
  int64_t row_bytes;
  float offset;       // 8 for int4 without a min, else 0 (int5: in q5_sub16)
  int bits;           // 4, 5 or 8
  bool q5_sub16;      // int5 without a min: 16 is subtracted when unpacking
  bool half;          // float16 scales (else float32)
  bool b16;           // blocks of 16
};

Weights describe(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& min,
                 int64_t block, int64_t bits, double offset);

// y[t, n] (rows ldy apart) = x[t] . W[n] with x [T, K] quantized to int8 per block of 32.
void qmatmul_into(const float* x, int64_t T, const Weights& w, float* y, int64_t ldy);

// The same for int8 weights with one scale per block of 32 (block32_format: Q8_0, Q5_0,
// Q5_1) in qdecode_block32.cpp; xq, dx, bsum as quantize_acts gives them (plain order).
bool block32_format(const Weights& w);
void block32_matmul(const Weights& w, const int8_t* xq, const float* dx, const float* bsum, int64_t ld, int64_t T,
                    float* y, int64_t ldy);

// The same for int4 weights with one scale per block of 32 from kInt4PanelTokens tokens on
// (qdecode_int4.cpp): the bits of qmatmul_into's row kernel. xq in the paired order, dx and
// s (the min-term factors, quant_cpu.cpp's Acts) plain, rows ld apart. Computes rows below
// the last multiple of eight and returns how many that is.
constexpr int64_t kInt4PanelTokens = 8;
bool int4_panel_format(const Weights& w, int64_t T);
int64_t int4_panel_matmul(const Weights& w, const int8_t* xq, const float* dx, const float* s, int64_t ld,
                          int64_t T, float* y, int64_t ldy);

// The same for prompt tokens (EngineConfig.prefill_int8): an int8 GEMM, VNNI where present.
void qgemm_int8_into(const float* x, int64_t T, const Weights& w, float* y, int64_t ldy);

// Row n of W dequantized to float32 [K] (bit-exact with QuantWeight.dequantize).
void dequant_row(const Weights& w, int64_t n, float* out);

// y[t, n] (rows ldy apart) = x[t] . W[n] in float32, x [T, K] rows ldx apart, with the same
// arithmetic for every t whatever T is (matmul_cpu.cpp). W: float32 rows ldw apart, or
// quantized (dequantized a block of rows at a time, exact activations).
void f32_matmul_into(const float* x, int64_t ldx, int64_t T, int64_t K, const float* w, int64_t ldw,
                     int64_t N, float* y, int64_t ldy);
void qf32_matmul_into(const float* x, int64_t ldx, int64_t T, int64_t K, const Weights& w, float* y,
                      int64_t ldy);
// The same with W float16 or bfloat16 [N, K] rows ldw apart, widened to float32 in the
// tiles: the bits of f32_matmul_into on W converted to float32.
void h16_matmul_into(const float* x, int64_t ldx, int64_t T, int64_t K, const half_t* w, int64_t ldw,
                     int64_t N, float* y, int64_t ldy, bool bf16);

// A 2:4-sparse [N, K] weight: kept values (float32, or int8 times scale[n]) and their 2-bit
// positions (layout: sparse_cpu.cpp's header comment).
struct Sparse24 {
  const void* vals;
  const uint8_t* idx;
  const float* scale;  // int8 values only
  int64_t N, K;
  bool int8;
};

Sparse24 describe_sparse24(const at::Tensor& vals, const at::Tensor& idx, const std::optional<at::Tensor>& scale);

// y[t, n] (rows ldy apart) = x[t] . W[n] in float32, x [T, K] rows ldx apart; batch-invariant.
void sparse24_matmul_into(const float* x, int64_t ldx, int64_t T, const Sparse24& w, float* y, int64_t ldy);

// How many threads the kernels run on.
int kernel_threads();

// f(begin, end) over [0, n) in chunks of at least `grain`, on the kernels' threads.
void parallel_rows(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f);

void register_decode(pybind11::module& m);
void register_matmul(pybind11::module& m);
void register_sparse(pybind11::module& m);

}  // namespace miaotui
