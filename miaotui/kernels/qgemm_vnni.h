// What quant_cpu.cpp hands to the AVX-512 VNNI int8 GEMM (qgemm_vnni.cpp), in plain types:
// that file is compiled for AVX-512 VNNI and must not include torch's headers.
#pragma once
#include <cstdint>

namespace miaotui {
namespace vnni {

constexpr int kNR = 16;  // weight rows per panel (one 16-lane vector)
constexpr int kMR = 8;   // tokens per tile

// Weights packed for the kernel, a panel of kNR rows at a time: for block b (32 values of k)
// and group g (values 4g..4g+3 of the block), 64 bytes holding row j's four values, as
// unsigned bytes u, at 4j (w = scale * (u - o) + min); then per block the kNR scales and
// the kNR constants c = min - o * scale (float32).
struct Panel {
  const uint8_t* u;   // [blocks][8][64]
  const float* sc;    // [blocks][kNR]
  const float* c;     // [blocks][kNR]
};

// y[t, j] for the T tokens (rows of xq [T, K] int8, 32-value blocks b with scale
// dx[t * ld + b] and bsum[t * ld + b] = dx * sum(xq)) against one panel's nc (<= kNR) rows,
// rows of y ldy apart: per output, over blocks in order,
//   acc = fma(float(sum_i u_i xq_i), sc_b * dx_b, acc); acc = fma(c_b, bsum_b, acc).
// The integer dot products are exact (vpdpbusd), so the result depends on the token alone.
void panel_gemm(const int8_t* xq, const float* dx, const float* bsum, int64_t ld, int64_t T, int64_t K,
                const Panel& p, float* y, int64_t ldy, int nc);

// The same for AVX2 CPUs without VNNI (qgemm_avx2.cpp), the same bits: tiles of 8 rows by
// kAvx2MR tokens; isum[t * ld + b] = sum(xq) of the block (int8 weights need it, see there);
// int4: the panel holds nibbles (pack: int4 as stored), else int8 + 128.
constexpr int kAvx2MR = 4;
void panel_gemm_avx2(const int8_t* xq, const float* dx, const float* bsum, const int32_t* isum, int64_t ld,
                     int64_t T, int64_t K, const Panel& p, bool int4, float* y, int64_t ldy, int nc);

}  // namespace vnni
}  // namespace miaotui
