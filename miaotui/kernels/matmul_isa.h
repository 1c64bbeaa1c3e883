// What matmul_cpu.cpp hands to its AVX-512 twin (matmul_avx512.cpp), in plain types: that
// file is compiled for AVX-512 and must not include torch's headers.
#pragma once
#include <cstdint>

namespace miaotui {

// A quantized [N, K] weight as quant_cpu.h's Weights describes it.
struct QuantRows {
  const uint8_t* q;
  const void* scale;
  const void* min;  // nullptr: none
  int64_t row_bytes, nwb;
  int shift, bits;
  bool half, b16;
};

namespace avx512 {
// y[t, n] = x[t] . W[n] for all T rows of x and N rows of W, on the calling thread.
void f32_rows(const float* x, int64_t ldx, int64_t T, int64_t K, const float* w, int64_t ldw, int64_t N,
              float* y, int64_t ldy);
// The same with W float16 or bfloat16 bits (uint16), widened to float32 exactly.
void h16_rows(const float* x, int64_t ldx, int64_t T, int64_t K, const uint16_t* w, int64_t ldw, int64_t N,
              float* y, int64_t ldy, bool bf16);
// The same against rows n0..n1 of a quantized W, dequantized inside the tiles.
void q_rows(const float* x, int64_t ldx, int64_t T, int64_t K, const QuantRows& w, int64_t n0, int64_t n1,
            float* y, int64_t ldy);
}  // namespace avx512

}  // namespace miaotui

namespace miaotui {
// The prefill GEMM (matmul_cpu.cpp's gemm): y[t, n] = x[t] . W[n] for W packed in panels
// of NR columns, panel p holding W[p * NR + j, k] at p * K * NR + k * NR + j (zeros past
// the last row). Every output is one FMA chain over k = 0, 1, 2, ... in order, whatever
// the tile, the vector width or the batch, so the AVX2 and AVX-512 kernels agree bit for bit.
namespace avx512 {
constexpr int kGemmNR = 32;
constexpr int kGemmMR = 12;
// T rows of x, packed (block b of kGemmMR rows at b * kGemmMR * K, x[t, k] at k * rows + i,
// rows: the block's row count), against the N (<= panels * NR) columns of the packed
// panels, on this thread.
void gemm_packed(const float* xp, int64_t T, int64_t K, const float* panels, int64_t N, float* y, int64_t ldy);
}  // namespace avx512
}  // namespace miaotui
