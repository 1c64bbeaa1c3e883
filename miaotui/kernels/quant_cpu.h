// What the kernel files share: the quantized weight description, the thread pool and the
// int8-activation matmul (quant_cpu.cpp), used by the fused decode step (decode_cpu.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <immintrin.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <functional>
#include <optional>

namespace miaotui {

// The sum of a vector's eight floats.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

using half_t = uint16_t;  // IEEE binary16 bits (torch.float16)

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
