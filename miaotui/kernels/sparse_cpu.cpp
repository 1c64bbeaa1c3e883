// 2:4 sparse weights: x @ W.T reading only the kept half of W (layers/sparse.py packs them).
//
// Layout of an [N, K] weight with at most 2 nonzeros in every 4 consecutive inputs of a row
// (K a multiple of 16):
//   vals  [N, K/2]  float32, or int8 with a float32 scale per row: the kept values of each
//                   group of 4 in increasing position order
//   idx   [N, K/8]  uint8: the positions (0..3) of a group's two values, 2 bits each; byte
//                   b holds groups 2b (bits 0-3) and 2b + 1 (bits 4-7), first value lowest
// Bytes per weight: 2.125 for float32 values (dense: 4), 0.625 + 4/K for int8 (dense: 1).
//
// Sixteen inputs (four groups) at a time: their 16 bits of positions become eight lane
// indices, two permutes pick the eight matching activations out of x's two vectors and one
// FMA multiplies them by the eight stored values. y[t, n] is one fixed chain per output:
// two accumulators alternating over the 16-input steps, added, then a horizontal sum (and
// the row's scale for int8), whatever T is; rows of x are computed side by side in tiles of
// up to four that only share the weight loads, and threads split n. So a row's result
// does not depend on the batch (the property matmul_cpu.cpp documents for dense weights).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "quant_cpu.h"

namespace miaotui {
namespace {

constexpr int kShift[2][8] = {{0, 2, 4, 6, 8, 10, 12, 14}, {16, 18, 20, 22, 24, 26, 28, 30}};

// Lane i: bits s + 2i..s + 2i + 1 of `bits` (s = 0 or 16: a 16-input step's positions),
// plus 4 for lanes 2, 3, 6, 7 (the second group of each pair sits in the upper half of
// an 8-input vector).
inline __m256i positions(__m256i bits, int half) {
  const __m256i v = _mm256_srlv_epi32(bits, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kShift[half])));
  return _mm256_add_epi32(_mm256_and_si256(v, _mm256_set1_epi32(3)), _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4));
}

// The eight activations the kept values of inputs x[0..16) multiply.
inline __m256 gather16(const float* x, __m256i pos) {
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x), pos);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8), pos);
  return _mm256_blend_ps(lo, hi, 0xF0);
}

// Rows 0..TB of x against output n: 16-input steps alternate between two accumulators
// (even steps: a0, odd: a1), 32 inputs (4 position bytes) per iteration.
template <typename V, int TB>
inline void tile(const float* x, int64_t ldx, const Sparse24& w, int64_t n, float* y, int64_t ldy) {
  const int64_t steps = w.K / 16;
  const V* v = static_cast<const V*>(w.vals) + n * (w.K / 2);
  const uint8_t* ib = w.idx + n * (w.K / 8);
  __m256 a0[TB], a1[TB];
  for (int u = 0; u < TB; ++u) a0[u] = a1[u] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= steps; j += 2) {
    int32_t raw;
    std::memcpy(&raw, ib + 2 * j, 4);
    const __m256i bits = _mm256_set1_epi32(raw);
    const __m256i p0 = positions(bits, 0), p1 = positions(bits, 1);
    const __m256 w0 = load8(v + 8 * j), w1 = load8(v + 8 * j + 8);
    for (int u = 0; u < TB; ++u) {
      const float* xu = x + u * ldx + 16 * j;
      a0[u] = _mm256_fmadd_ps(w0, gather16(xu, p0), a0[u]);
      a1[u] = _mm256_fmadd_ps(w1, gather16(xu + 16, p1), a1[u]);
    }
  }
  if (j < steps) {  // an even last step: a0
    const __m256i p0 = positions(_mm256_set1_epi32(ib[2 * j] | (ib[2 * j + 1] << 8)), 0);
    const __m256 w0 = load8(v + 8 * j);
    for (int u = 0; u < TB; ++u) a0[u] = _mm256_fmadd_ps(w0, gather16(x + u * ldx + 16 * j, p0), a0[u]);
  }
  const float s = w.scale ? w.scale[n] : 1.0f;
  for (int u = 0; u < TB; ++u) {
    const float dot = hsum(_mm256_add_ps(a0[u], a1[u]));
    y[u * ldy + n] = w.scale ? dot * s : dot;
  }
}

template <typename V>
void rows(const float* x, int64_t ldx, int64_t T, const Sparse24& w, float* y, int64_t ldy,
          int64_t n0, int64_t n1) {
  for (int64_t t0 = 0; t0 < T; t0 += 4) {
    const float* xt = x + t0 * ldx;
    float* yt = y + t0 * ldy;
    switch (std::min<int64_t>(4, T - t0)) {
      case 4: for (int64_t n = n0; n < n1; ++n) tile<V, 4>(xt, ldx, w, n, yt, ldy); break;
      case 3: for (int64_t n = n0; n < n1; ++n) tile<V, 3>(xt, ldx, w, n, yt, ldy); break;
      case 2: for (int64_t n = n0; n < n1; ++n) tile<V, 2>(xt, ldx, w, n, yt, ldy); break;
      default: for (int64_t n = n0; n < n1; ++n) tile<V, 1>(xt, ldx, w, n, yt, ldy);
    }
  }
}

at::Tensor sparse24_matmul(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& idx,
                           const std::optional<at::Tensor>& scale) {
  const Sparse24 w = describe_sparse24(vals, idx, scale);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == w.K,
              "x must be contiguous float32 [T, K]");
  at::Tensor y = at::empty({x.size(0), w.N}, x.options());
  sparse24_matmul_into(x.data_ptr<float>(), w.K, x.size(0), w, y.data_ptr<float>(), w.N);
  return y;
}

}  // namespace

Sparse24 describe_sparse24(const at::Tensor& vals, const at::Tensor& idx, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(vals.dim() == 2 && idx.dim() == 2 && vals.is_contiguous() && idx.is_contiguous() &&
                  idx.scalar_type() == at::kByte && vals.size(0) == idx.size(0) &&
                  vals.size(1) == 4 * idx.size(1) && vals.size(1) % 8 == 0,
              "2:4 weights: vals [N, K/2] and idx uint8 [N, K/8], K a multiple of 16");
  const bool int8 = vals.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || vals.scalar_type() == at::kFloat, "2:4 values must be float32 or int8");
  TORCH_CHECK(int8 == scale.has_value(), "int8 2:4 values need a scale per row (and float32 none)");
  Sparse24 w{vals.data_ptr(), idx.data_ptr<uint8_t>(), nullptr, vals.size(0), 2 * vals.size(1), int8};
  if (int8) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == w.N,
                "scale must be float32 [N]");
    w.scale = scale->data_ptr<float>();
  }
  return w;
}

void sparse24_matmul_into(const float* x, int64_t ldx, int64_t T, const Sparse24& w, float* y, int64_t ldy) {
  parallel_rows(w.N, 16, [&](int64_t n0, int64_t n1) {
    if (w.int8) rows<int8_t>(x, ldx, T, w, y, ldy, n0, n1);
    else rows<float>(x, ldx, T, w, y, ldy, n0, n1);
  });
}

void register_sparse(pybind11::module& m) {
  m.def("sparse24_matmul", &sparse24_matmul, "x @ W.T for a 2:4-sparse W (values + 2-bit positions)",
        pybind11::arg("x"), pybind11::arg("vals"), pybind11::arg("idx"), pybind11::arg("scale") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace miaotui
