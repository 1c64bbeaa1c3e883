// The decoder layers of a model for a batch of decode tokens, in one call: the Llama family,
// Gemma 3 and GPT-2.
//
// A decode step through PyTorch costs ~20 small ops per layer (norms, rope, cache writes,
// attention, residuals), each a few microseconds of dispatch plus a thread wake-up: on
// SmolLM2-135M that was 3/4 of the step. Here a layer is five parallel jobs on the kernels'
// threads (qkv, attention, o, gate/up, down); everything between them is a few vector loops
// on the calling thread. The math is the PyTorch path's (models/llama.py, layers/attention.py):
//
//   h = norm(x) ; q, k, v = h @ Wqkv (+ b) ; q, k = rmsnorm per head (Qwen3, Gemma) ; rope(q, k)
//   cache[slot] = k, v (float32, float16, or int8 with a scale per token and head)
//   o = softmax(q . K * scale) V over the sequence's slots (its block table; a sliding window)
//   x += [norm](o @ Wo + b) ; h = norm(x) ; x += [norm](act(h @ Wg) * (h @ Wu) @ Wd + b)
//
// norm: RMSNorm (Gemma's (1 + w) is folded into w at load) or LayerNorm with a bias (GPT-2);
// the bracketed norms are Gemma's sandwich norms; act: SiLU or GELU (tanh), gated (Llama,
// Gemma) or not (GPT-2: act(h @ Wfc + b) @ Wproj); rope: one of several tables per layer
// (Gemma's local and global bases) or none (GPT-2's learned positions are in x already).
//
// Weights are either quantized (the int8-activation kernel of quant_cpu.cpp, what the
// PyTorch path runs for decode too) or float32 (matmul_cpu.cpp, what prefill runs too).
// Every kernel here computes a token's row the same way whatever else is in the batch.
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <immintrin.h>

#include <chrono>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "quant_cpu.h"

namespace miaotui {
namespace {

enum Phase { kQKV, kAttention, kO, kGateUp, kDown, kHead, kOther, kCalls };

// Adds the time since the last lap to one of the phase counters (nanoseconds).
struct Clock {
  explicit Clock(int64_t* acc) : acc(acc), t(std::chrono::steady_clock::now()) {}
  void lap(Phase p) {
    const auto now = std::chrono::steady_clock::now();
    acc[p] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - t).count();
    t = now;
  }
  int64_t* acc;
  std::chrono::steady_clock::time_point t;
};

// [sum a[0], ..., sum a[7]]: the eight horizontal sums as one vector.
inline __m256 hsum8(const __m256 (&a)[8]) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// q . k[r] for eight cache rows (an int8 row's scale is applied by the caller): eight
// independent FMA chains, one reduction for all of them.
template <typename T>
inline __m256 dot8(const float* q, const T* const (&k)[8], int64_t n) {
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t e = 0; e < n; e += 8) {
    const __m256 qv = _mm256_loadu_ps(q + e);
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qv, load8(k[r] + e), acc[r]);
  }
  return hsum8(acc);
}

template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(T)); i += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p) + i, _MM_HINT_T0);
}

// exp of eight floats: range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial
// (Cephes' expf coefficients), ~1 ulp.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// x[i] = exp(x[i] - m) for i < n; returns their sum.
inline float exp_sub(float* x, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - m));
  return sum;
}

// a = silu(g) * u for g = gu[0..n), u = gu[n..2n): g / (1 + exp(-g)) * u.
void silu_mul(const float* gu, int64_t n, float* a) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gu + i);
    // exp8 takes arguments up to 88 (e^88 < FLT_MAX); beyond, silu(g) is -0 either way
    const __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(88.0f)));
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    _mm256_storeu_ps(a + i, _mm256_mul_ps(s, _mm256_loadu_ps(gu + n + i)));
  }
  for (; i < n; ++i) a[i] = gu[i] / (1.0f + std::exp(-gu[i])) * gu[n + i];
}

// w * (x * rsqrt(mean(x^2) + eps)), as RMSNorm.forward.
void rmsnorm(const float* x, const float* w, float eps, int64_t n, float* out) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
  }
  const float r = 1.0f / std::sqrt(hsum(acc) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// a = gelu(g) [* u], GELU's tanh form: g / 2 * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 g^3))),
// tanh(z) = 1 - 2 / (1 + exp(2z)). Gated: g = gu[0..n), u = gu[n..2n); else g = gu[0..n).
void gelu_tanh(const float* gu, int64_t n, bool gated, float* a) {
  constexpr float c = 0.7978845608028654f;  // sqrt(2 / pi)
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gu + i);
    const __m256 z = _mm256_mul_ps(_mm256_set1_ps(c),
                                   _mm256_add_ps(g, _mm256_mul_ps(_mm256_set1_ps(0.044715f),
                                                                  _mm256_mul_ps(g, _mm256_mul_ps(g, g)))));
    // exp8 takes arguments up to 88; beyond, tanh is 1 either way
    const __m256 e = exp8(_mm256_min_ps(_mm256_add_ps(z, z), _mm256_set1_ps(88.0f)));
    const __m256 t = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                                   _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
    __m256 r = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), g), _mm256_add_ps(_mm256_set1_ps(1.0f), t));
    if (gated) r = _mm256_mul_ps(r, _mm256_loadu_ps(gu + n + i));
    _mm256_storeu_ps(a + i, r);
  }
  for (; i < n; ++i) {
    const float g = gu[i];
    const float r = 0.5f * g * (1.0f + std::tanh(c * (g + 0.044715f * g * g * g)));
    a[i] = gated ? r * gu[n + i] : r;
  }
}

// (x - mean) / sqrt(var + eps) * w + b, as F.layer_norm (var: the biased one).
void layernorm(const float* x, const float* w, const float* b, float eps, int64_t n, float* out) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + i));
  const float mean = hsum(acc) / static_cast<float>(n);
  const __m256 mv = _mm256_set1_ps(mean);
  acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), mv);
    acc = _mm256_add_ps(acc, _mm256_mul_ps(d, d));
  }
  const float r = 1.0f / std::sqrt(hsum(acc) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * r * w[i] + (b ? b[i] : 0.0f);
}

// A layer's paged KV cache: [slots, kv_heads, head_dim] float32, float16, or int8 with a
// float32 scale per slot and head.
struct Cache {
  at::ScalarType dtype;
  const void *k, *v;
  const float *ks = nullptr, *vs = nullptr;
  int64_t slots;
};

Cache cache_of(const at::Tensor& k, const at::Tensor& v, const at::Tensor& ks, const at::Tensor& vs) {
  Cache c{k.scalar_type(), k.data_ptr(), v.data_ptr()};
  if (c.dtype == at::kChar) c.ks = ks.data_ptr<float>(), c.vs = vs.data_ptr<float>();
  c.slots = k.size(0);
  return c;
}

// Keys are taken in runs that start at multiples of kKeyRun positions, each run one job
// with its own partial softmax; a query's runs depend on its position only, and they are
// merged in position order. So a token's attention output is the same whether it is a
// prompt token of a long prefill chunk, of a short one, or a decode token, and whatever
// else is in the step (flash-decoding splits by thread count would not be).
constexpr int64_t kKeyRun = 128;
constexpr int64_t kTokenBlock = 64;  // query tokens whose partial results are kept at once
constexpr int64_t kGroup = 16;       // query tokens of one sequence that share a job

// Attention of T query tokens over the paged cache. Token t is at position pos[t] of the
// sequence whose block table is row seq[t] (or row t when seq is null) of tables [., nblk];
// it attends to the keys at positions lo..pos[t], lo = pos[t] - window + 1 with a sliding
// window (window > 0), else 0. q: T rows ldq apart, nh heads of hd; out: rows ldo apart.
struct PagedAttention {
  int64_t nh, nkv, hd, bs;
  float scale;

  void run(const Cache& c, int64_t T, const float* q, int64_t ldq, const int64_t* tables, int64_t nblk,
           const int64_t* seq, const int64_t* pos, int64_t window, float* out, int64_t ldo) const {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = pos[t], lo = first_key(p, window);
      TORCH_CHECK(p >= 0 && p < nblk * bs, "position outside the block table");
      const int64_t* tb = tables + (seq ? seq[t] : t) * nblk;
      for (int64_t blk = lo / bs; blk <= p / bs; ++blk)
        TORCH_CHECK(tb[blk] >= 0 && (tb[blk] + 1) * bs <= c.slots, "block out of range");
    }
    // tokens a block at a time: the partial results of a block's runs stay small
    for (int64_t t0 = 0; t0 < T; t0 += kTokenBlock)
      run_block(c, t0, std::min(T, t0 + kTokenBlock), q, ldq, tables, nblk, seq, pos, window, out, ldo);
  }

  static int64_t first_key(int64_t p, int64_t window) {
    return window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
  }

  // Tokens t0..t1. A job is one run of keys for one KV head and a group of up to kGroup
  // consecutive tokens of one sequence (a prompt chunk's): the run's K/V rows come from
  // memory once for the group, then from L1 for each token, whose own arithmetic is what
  // it would be alone (its part of the run, clipped to its keys).
  void run_block(const Cache& c, int64_t t0, int64_t t1, const float* q, int64_t ldq, const int64_t* tables,
                 int64_t nblk, const int64_t* seq, const int64_t* pos, int64_t window, float* out,
                 int64_t ldo) const {
    const int64_t g = nh / nkv, part = g * (hd + 2), n = t1 - t0;
    std::vector<int64_t> r0(n), first(n + 1);  // token t's runs r0[t].. at partials first[t]..
    for (int64_t t = 0; t < n; ++t) {
      const int64_t p = pos[t0 + t];
      r0[t] = first_key(p, window) / kKeyRun;
      first[t + 1] = first[t] + (p / kKeyRun - r0[t] + 1) * nkv;
    }
    struct Job { int64_t a, b, kh, r; };  // tokens a..b (block-relative), KV head, run
    std::vector<Job> jobs;
    for (int64_t a = 0; a < n;) {
      const int64_t s = seq ? seq[t0 + a] : t0 + a;
      int64_t b = a + 1;
      while (b < n && b - a < kGroup && seq && seq[t0 + b] == s) ++b;
      int64_t rmin = r0[a], rmax = 0;
      for (int64_t t = a; t < b; ++t) rmin = std::min(rmin, r0[t]), rmax = std::max(rmax, pos[t0 + t] / kKeyRun);
      for (int64_t kh = 0; kh < nkv; ++kh)
        for (int64_t r = rmin; r <= rmax; ++r) jobs.push_back({a, b, kh, r});
      a = b;
    }
    std::vector<float> partials(first[n] * part);
    parallel_rows(static_cast<int64_t>(jobs.size()), 1, [&](int64_t j0, int64_t j1) {
      thread_local std::vector<int64_t> rows;
      for (int64_t j = j0; j < j1; ++j) {
        const Job& jb = jobs[j];
        // The cache rows of the job's keys jlo..jhi, once for all its tokens (one sequence),
        // and 8 more repeating the last (lanes past a token's keys read them, unused).
        int64_t jlo = INT64_MAX, jhi = 0;
        for (int64_t t = jb.a; t < jb.b; ++t) {
          const int64_t p = pos[t0 + t];
          jlo = std::min(jlo, std::max(first_key(p, window), jb.r * kKeyRun));
          jhi = std::max(jhi, std::min(p + 1, (jb.r + 1) * kKeyRun));
        }
        if (jlo >= jhi) continue;
        const int64_t* tb0 = tables + (seq ? seq[t0 + jb.a] : t0 + jb.a) * nblk;
        const int64_t cnt = jhi - jlo;
        rows.resize(cnt + 8);
        for (int64_t i = 0, at = jlo; i < cnt;) {  // a block at a time: one division each
          const int64_t off = at % bs, take = std::min(cnt - i, bs - off), base = tb0[at / bs] * bs + off;
          for (int64_t j = 0; j < take; ++j) rows[i + j] = (base + j) * nkv + jb.kh;
          i += take, at += take;
        }
        for (int64_t i = cnt; i < cnt + 8; ++i) rows[i] = rows[cnt - 1];
        bool first_token = true;  // later tokens find the run's K/V rows in L1: no prefetch
        for (int64_t t = jb.a; t < jb.b; ++t) {
          const int64_t p = pos[t0 + t], lo = std::max(first_key(p, window), jb.r * kKeyRun),
                        hi = std::min(p + 1, (jb.r + 1) * kKeyRun);
          if (lo >= hi) continue;  // not one of this token's runs
          const float* qt = q + (t0 + t) * ldq + jb.kh * g * hd;
          const int64_t* tr = rows.data() + (lo - jlo);
          const int64_t runs = (first[t + 1] - first[t]) / nkv;  // (t, kh, r) at first[t] + kh * runs + r - r0
          float* pp = partials.data() + (first[t] + jb.kh * runs + jb.r - r0[t]) * part;
          if (c.dtype == at::kChar)
            attend(static_cast<const int8_t*>(c.k), static_cast<const int8_t*>(c.v), c.ks, c.vs, qt, g, tr,
                   hi - lo, first_token, pp);
          else if (c.dtype == at::kHalf)
            attend(static_cast<const half_t*>(c.k), static_cast<const half_t*>(c.v), nullptr, nullptr, qt, g, tr,
                   hi - lo, first_token, pp);
          else
            attend(static_cast<const float*>(c.k), static_cast<const float*>(c.v), nullptr, nullptr, qt, g, tr,
                   hi - lo, first_token, pp);
          first_token = false;
        }
      }
    });
    // o = sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c,  M = max_c m_c, runs in order
    // (tokens are independent: shared between the threads)
    parallel_rows(n, 8, [&](int64_t ta, int64_t tz) {
      for (int64_t t = ta; t < tz; ++t) {
        const int64_t runs = (first[t + 1] - first[t]) / nkv;
        for (int64_t kh = 0; kh < nkv; ++kh)
          for (int64_t h = 0; h < g; ++h) {
            const int64_t c0 = first[t] + kh * runs, c1 = c0 + runs;
            float m = -INFINITY, lsum = 0.0f;
            for (int64_t ci = c0; ci < c1; ++ci) m = std::max(m, partials[ci * part + g * hd + 2 * h]);
            float* o = out + (t0 + t) * ldo + (kh * g + h) * hd;
            std::fill(o, o + hd, 0.0f);
            for (int64_t ci = c0; ci < c1; ++ci) {
              const float* pc = partials.data() + ci * part;
              const float f = std::exp(pc[g * hd + 2 * h] - m);
              lsum += f * pc[g * hd + 2 * h + 1];
              for (int64_t e = 0; e < hd; ++e) o[e] += f * pc[h * hd + e];
            }
            const float inv = 1.0f / lsum;
            for (int64_t e = 0; e < hd; ++e) o[e] *= inv;
          }
      }
    });
  }

  // One job: the g query heads q [g, hd] of a KV head against the n keys whose cache rows
  // (slot * nkv + head) are rows[0..n), readable up to the next multiple of 8. Writes the
  // unnormalized o [g, hd], then (m, l) per head, to p: m the largest score,
  // l = sum exp(s - m), o = sum exp(s - m) v. Keys are scored eight at a time, each K/V row
  // read once for all g heads; prefetch: fetch the rows ahead (not in cache yet).
  template <typename T>
  void attend(const T* kc, const T* vc, const float* ksc, const float* vsc, const float* q, int64_t g,
              const int64_t* rows, int64_t n, bool prefetch, float* p) const {
    const int64_t np = (n + 7) / 8 * 8;
    thread_local std::vector<float> scores;
    scores.resize(g * np);
    for (int64_t i = 0; i < n; i += 8) {
      const T* k[8];
      alignas(32) float f[8];
      for (int r = 0; r < 8; ++r) {
        k[r] = kc + rows[i + r] * hd;
        f[r] = ksc ? ksc[rows[i + r]] * scale : scale;
        if (prefetch && i + 8 + r < n) {
          prefetch_row(kc + rows[i + 8 + r] * hd, hd);
          prefetch_row(vc + rows[i + 8 + r] * hd, hd);
        }
      }
      const __m256 fv = _mm256_load_ps(f);
      for (int64_t h = 0; h < g; ++h)
        _mm256_storeu_ps(scores.data() + h * np + i, _mm256_mul_ps(dot8(q + h * hd, k, hd), fv));
    }
    float* ml = p + g * hd;
    for (int64_t h = 0; h < g; ++h) {
      float* s = scores.data() + h * np;
      // the largest score, eight at a time (a scalar loop ran ~3 cycles a key); lanes past
      // n (other tokens' keys) count as -inf
      __m256 mv = _mm256_set1_ps(-INFINITY);
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + i));
      if (i < n)
        mv = _mm256_max_ps(mv, _mm256_blendv_ps(mv, _mm256_loadu_ps(s + i),
                                                _mm256_castsi256_ps(lanes_below(n - i))));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, mv);
      const float m = *std::max_element(lanes, lanes + 8);
      ml[2 * h] = m;
      ml[2 * h + 1] = exp_sub(s, n, m);
      if (vsc)
        for (int64_t i = 0; i < n; ++i) s[i] *= vsc[rows[i]];
    }
    // o = sum_i s_i v_i, 64 dimensions at a time in registers
    for (int64_t h = 0; h < g; ++h) {
      const float* s = scores.data() + h * np;
      for (int64_t e0 = 0; e0 < hd; e0 += 64) {
        const int64_t ne = std::min<int64_t>(64, hd - e0) / 8;
        __m256 acc[8];
        for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
        if (ne == 8) {
          for (int64_t i = 0; i < n; ++i) {
            const T* v = vc + rows[i] * hd + e0;
            const __m256 w = _mm256_set1_ps(s[i]);
            for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(w, load8(v + 8 * k), acc[k]);
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            const T* v = vc + rows[i] * hd + e0;
            const __m256 w = _mm256_set1_ps(s[i]);
            for (int64_t k = 0; k < ne; ++k) acc[k] = _mm256_fmadd_ps(w, load8(v + 8 * k), acc[k]);
          }
        }
        for (int64_t k = 0; k < ne; ++k) _mm256_storeu_ps(p + h * hd + e0 + 8 * k, acc[k]);
      }
    }
  }
};

// A row range of a linear layer's output, stored one way: quantized, or dense rows of
// float32, float16 or bfloat16 (16-bit rows are widened to float32 inside the matmul's
// tiles: the same arithmetic as float32 weights holding the same values).
struct Part {
  int64_t out0, n, k;
  std::optional<Weights> quant;    // else dense [n, k] (unless sparse)
  std::optional<Sparse24> sparse;  // 2:4 sparse (sparse_cpu.cpp)
  at::Tensor dense;
  std::vector<at::Tensor> keep;  // the tensors `quant` points into
};

struct Linear {
  std::vector<Part> parts;
  const float* bias = nullptr;
  int64_t N = 0;

  // y [T, N] = x [T, K] @ W.T (+ bias)
  void run(const float* x, int64_t T, float* y) const {
    for (const Part& p : parts) {
      if (p.quant) qmatmul_into(x, T, *p.quant, y + p.out0, N);
      else if (p.sparse) sparse24_matmul_into(x, p.k, T, *p.sparse, y + p.out0, N);
      else if (p.dense.scalar_type() == at::kFloat)
        f32_matmul_into(x, p.k, T, p.k, p.dense.data_ptr<float>(), p.k, p.n, y + p.out0, N);
      else
        h16_matmul_into(x, p.k, T, p.k, static_cast<const half_t*>(p.dense.data_ptr()), p.k, p.n, y + p.out0, N,
                        p.dense.scalar_type() == at::kBFloat16);
    }
    if (bias)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < N; ++n) y[t * N + n] += bias[n];
  }
};

// A norm's weights: RMSNorm, or LayerNorm (with its bias, which may be null) in a model
// built with LayerNorm. w null: no norm there.
struct Norm {
  const float* w = nullptr;
  const float* b = nullptr;
};

struct Layer {
  // before attention, after it (Gemma), before the MLP, after it (Gemma)
  Norm attn_in, attn_out, mlp_in, mlp_out;
  const float* q_norm = nullptr;  // Qwen3, Gemma: RMSNorm per head
  const float* k_norm = nullptr;
  int64_t window = 0;  // sliding window in tokens (0: none)
  int64_t rope = 0;    // which rope table (-1: none)
  Linear lin[4];       // qkv, o, gate_up (GPT-2: fc), down (GPT-2: proj)
  at::Tensor k, v, k_scale, v_scale;  // the paged cache; scales when int8
};

enum class Act { kSilu, kGeluTanh };

class DecodeModel {
 public:
  DecodeModel(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
              int64_t intermediate, double eps, double scale, int64_t block_size)
      : H_(hidden), nh_(heads), nkv_(kv_heads), hd_(head_dim), I_(intermediate),
        eps_(static_cast<float>(eps)), scale_(static_cast<float>(scale)), bs_(block_size) {
    TORCH_CHECK(H_ % 8 == 0 && hd_ % 8 == 0 && nh_ % nkv_ == 0, "unsupported shape");
    attn_ = PagedAttention{nh_, nkv_, hd_, bs_, scale_};
  }

  // The architecture's choices, before any layer: norm "rms" or "layer" (LayerNorm), act
  // "silu" or "gelu_tanh", gated MLP (act(gate) * up) or not (act(fc)). Default: Llama's.
  void set_arch(const std::string& norm, const std::string& act, bool gated) {
    TORCH_CHECK(layers_.empty(), "set_arch comes before add_layer");
    TORCH_CHECK(norm == "rms" || norm == "layer", "norm: rms or layer");
    TORCH_CHECK(act == "silu" || act == "gelu_tanh", "act: silu or gelu_tanh");
    layer_norm_ = norm == "layer";
    act_ = act == "silu" ? Act::kSilu : Act::kGeluTanh;
    gated_ = gated;
  }

  void add_layer(const at::Tensor& in_norm, const at::Tensor& post_norm,
                 const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                 const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& k_scale,
                 const std::optional<at::Tensor>& v_scale) {
    Layer l;
    l.attn_in.w = f32(in_norm, H_);
    l.mlp_in.w = f32(post_norm, H_);
    if (q_norm) l.q_norm = f32(*q_norm, hd_);
    if (k_norm) l.k_norm = f32(*k_norm, hd_);
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.dim() == 3 && k.size(1) == nkv_ &&
                k.size(2) == hd_, "cache shape");
    const bool int8 = k.scalar_type() == at::kChar;
    TORCH_CHECK(int8 ? (k_scale && v_scale) : (k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf),
                "cache dtype");
    l.k = k, l.v = v;
    TORCH_CHECK(layers_.empty() || num_slots_ == k.size(0), "caches differ in size");
    num_slots_ = k.size(0);
    if (int8) l.k_scale = *k_scale, l.v_scale = *v_scale;
    const int64_t outs[4] = {(nh_ + 2 * nkv_) * hd_, H_, (gated_ ? 2 : 1) * I_, H_};
    for (int i = 0; i < 4; ++i) l.lin[i].N = outs[i];
    layers_.push_back(std::move(l));
  }

  // Norm `which` of a layer (0 before attention, 1 after it, 2 before the MLP, 3 after it;
  // layer -1: the final norm), with a LayerNorm's bias.
  void set_norm(int64_t layer, int64_t which, const at::Tensor& w, const std::optional<at::Tensor>& b) {
    TORCH_CHECK(which >= 0 && which < 4, "which");
    Norm* n = &final_norm_;
    if (layer >= 0) {
      Layer& l = layers_.at(layer);
      Norm* norms[4] = {&l.attn_in, &l.attn_out, &l.mlp_in, &l.mlp_out};
      n = norms[which];
    }
    n->w = f32(w, H_);
    n->b = b ? f32(*b, H_) : nullptr;
  }

  // A layer's attention: its sliding window (0: none) and rope table (-1: none).
  void set_attention(int64_t layer, int64_t window, int64_t rope) {
    TORCH_CHECK(window >= 0 && rope >= -1, "window, rope");
    Layer& l = layers_.at(layer);
    l.window = window, l.rope = rope;
  }

  void add_quant(int64_t layer, int64_t which, int64_t out0, const at::Tensor& q,
                 const at::Tensor& scale, const at::Tensor& min, int64_t block, int64_t bits,
                 double offset) {
    Part p;
    p.quant = describe(q, scale, min, block, bits, offset);
    p.out0 = out0, p.n = p.quant->N, p.k = p.quant->K;
    p.keep = {q, scale, min};
    add_part(layer, which, std::move(p));
  }

  void add_sparse24(int64_t layer, int64_t which, int64_t out0, const at::Tensor& vals, const at::Tensor& idx,
                    const std::optional<at::Tensor>& scale) {
    Part p;
    p.sparse = describe_sparse24(vals, idx, scale);
    p.out0 = out0, p.n = p.sparse->N, p.k = p.sparse->K;
    p.keep = {vals, idx};
    if (scale) p.keep.push_back(*scale);
    add_part(layer, which, std::move(p));
  }

  void add_dense(int64_t layer, int64_t which, int64_t out0, const at::Tensor& w) {
    const auto dt = w.scalar_type();
    TORCH_CHECK((dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) && w.is_contiguous() &&
                w.dim() == 2 && w.size(1) % 8 == 0,
                "dense weights must be contiguous float32, float16 or bfloat16 with in_features % 8 == 0");
    Part p;
    p.out0 = out0, p.n = w.size(0), p.k = w.size(1), p.dense = w;
    add_part(layer, which, std::move(p));
  }

  // The final norm and the LM head [vocab, H] (its weights then go through add_quant /
  // add_dense with layer -1).
  void set_head(const at::Tensor& norm, int64_t vocab) {
    final_norm_.w = f32(norm, H_);
    head_.N = vocab;
  }

  // Tensor parallel: after o and down (row parallel, partial sums), hand [B, H] to `fn`
  // (a Python all-reduce, in place) before the residual add.
  void set_reduce(pybind11::function fn) { reduce_ = std::move(fn); }

  void set_bias(int64_t layer, int64_t which, const at::Tensor& b) {
    Linear& l = linear(layer, which);
    l.bias = f32(b, l.N);
  }

  // Logits [B, vocab] of one token per sequence. x [B, H]: their embeddings (overwritten);
  // cos/sin [R, B, hd/2] for R rope tables ([B, hd/2]: one); slots [B] where each token's
  // K/V goes; tables [B, nblk] block tables; lens [B] tokens in each sequence's context,
  // this one included.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                     const at::Tensor& tables, const at::Tensor& lens) {
    const int64_t B = x.size(0), half = hd_ / 2;
    TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) == H_, "x");
    const int64_t R = cos.dim() == 3 ? cos.size(0) : 1;
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
                cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                (cos.numel() == 0 || (cos.size(-2) == B && cos.size(-1) == half)), "rope");
    TORCH_CHECK(slots.scalar_type() == at::kLong && tables.scalar_type() == at::kLong &&
                lens.scalar_type() == at::kLong && tables.is_contiguous() && tables.size(0) == B &&
                slots.numel() == B && lens.numel() == B, "metadata");
    check_complete();
    TORCH_CHECK(max_rope_ < (cos.numel() == 0 ? 0 : R), "a layer's rope table is missing");
    Step s(B, H_, (nh_ + 2 * nkv_) * hd_, nh_ * hd_, (gated_ ? 2 : 1) * I_, I_);
    s.x = x.data_ptr<float>();
    if (cos.numel()) s.cos = cos.data_ptr<float>(), s.sin = sin.data_ptr<float>();
    s.slot = slots.data_ptr<int64_t>(), s.table = tables.data_ptr<int64_t>(), s.nblk = tables.size(1);
    const int64_t* len = lens.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) s.pos[b] = len[b] - 1;  // each attends to its whole context
    Clock clock(profile_);
    for (Layer& l : layers_) run_layer(l, s, clock);
    norm(final_norm_, s.x, s.h.data(), B);
    at::Tensor logits = at::empty({B, head_.N}, x.options());
    clock.lap(kOther);
    head_.run(s.h.data(), B, logits.data_ptr<float>());
    clock.lap(kHead);
    ++profile_[kCalls];
    return logits;
  }

  // Seconds spent in each part since construction (or reset): the profile of a step.
  pybind11::dict profile(bool reset) {
    pybind11::dict d;
    const char* names[] = {"qkv", "attention", "o", "gate_up", "down", "lm_head", "other"};
    for (int i = 0; i < kCalls; ++i) d[names[i]] = profile_[i] * 1e-9;
    d["calls"] = profile_[kCalls];
    if (reset) std::fill(std::begin(profile_), std::end(profile_), 0);
    return d;
  }

 private:
  // One forward's state: the B tokens' residual stream x, their metadata and the buffers
  // between the jobs.
  struct Step {
    Step(int64_t B, int64_t H, int64_t QKV, int64_t Q, int64_t GU, int64_t I)
        : B(B), QKV(QKV), pos(B), h(B * H), qkv(B * QKV), att(B * Q), gu(B * GU), act(B * I), y(B * H) {}
    int64_t B, QKV;
    float* x = nullptr;
    const float *cos = nullptr, *sin = nullptr;
    const int64_t *slot = nullptr, *table = nullptr;
    int64_t nblk = 0;
    std::vector<int64_t> pos;
    std::vector<float> h, qkv, att, gu, act, y;
  };

  // One decoder layer for the step's tokens: x += attention(...), x += mlp(...).
  void run_layer(Layer& l, Step& s, Clock& clock) {
    const int64_t B = s.B, QKV = s.QKV, half = hd_ / 2;
    norm(l.attn_in, s.x, s.h.data(), B);
    clock.lap(kOther);
    l.lin[0].run(s.h.data(), B, s.qkv.data());
    clock.lap(kQKV);
    for (int64_t b = 0; b < B; ++b) {
      float* row = s.qkv.data() + b * QKV;
      for (int64_t i = 0; i < nh_ + nkv_; ++i) {  // q heads, then k heads
        float* head = row + i * hd_;
        const float* nw = i < nh_ ? l.q_norm : l.k_norm;
        if (nw) rmsnorm(head, nw, eps_, hd_, head);
        if (l.rope < 0) continue;
        const int64_t at = (l.rope * B + b) * half;
        const float *c = s.cos + at, *sn = s.sin + at;
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = head[j], x2 = head[j + half];
          head[j] = x1 * c[j] - x2 * sn[j];
          head[j + half] = x2 * c[j] + x1 * sn[j];
        }
      }
      write_kv(l, s.slot[b], row + nh_ * hd_, row + (nh_ + nkv_) * hd_);
    }
    clock.lap(kOther);
    attn_.run(cache_of(l.k, l.v, l.k_scale, l.v_scale), B, s.qkv.data(), QKV, s.table, s.nblk, nullptr,
              s.pos.data(), l.window, s.att.data(), nh_ * hd_);
    clock.lap(kAttention);
    l.lin[1].run(s.att.data(), B, s.y.data());
    reduce(s.y.data(), B);  // tensor parallel: the ranks' partial sums
    clock.lap(kO);
    add_residual(l.attn_out, s);
    norm(l.mlp_in, s.x, s.h.data(), B);
    clock.lap(kOther);
    l.lin[2].run(s.h.data(), B, s.gu.data());
    clock.lap(kGateUp);
    const int64_t GU = (gated_ ? 2 : 1) * I_;
    for (int64_t b = 0; b < B; ++b) {
      if (act_ == Act::kSilu) silu_mul(s.gu.data() + b * GU, I_, s.act.data() + b * I_);  // always gated
      else gelu_tanh(s.gu.data() + b * GU, I_, gated_, s.act.data() + b * I_);
    }
    clock.lap(kOther);
    l.lin[3].run(s.act.data(), B, s.y.data());
    reduce(s.y.data(), B);
    clock.lap(kDown);
    add_residual(l.mlp_out, s);
  }

  // x += norm(y) (a sandwich norm) or x += y.
  void add_residual(const Norm& n, Step& s) const {
    if (n.w) norm(n, s.y.data(), s.y.data(), s.B);
    for (int64_t i = 0; i < s.B * H_; ++i) s.x[i] = s.x[i] + s.y[i];
  }

  // out [B, H] = norm(x [B, H]) row by row (out may be x).
  void norm(const Norm& n, const float* x, float* out, int64_t B) const {
    for (int64_t b = 0; b < B; ++b) {
      if (layer_norm_) layernorm(x + b * H_, n.w, n.b, eps_, H_, out + b * H_);
      else rmsnorm(x + b * H_, n.w, eps_, H_, out + b * H_);
    }
  }

  static const float* f32(const at::Tensor& t, int64_t n) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, "expected float32 [", n, "]");
    return t.data_ptr<float>();
  }

  void reduce(float* y, int64_t B) {
    if (!reduce_) return;
    pybind11::gil_scoped_acquire gil;
    (*reduce_)(at::from_blob(y, {B, H_}, at::TensorOptions().dtype(at::kFloat)));
  }

  Linear& linear(int64_t layer, int64_t which) {
    TORCH_CHECK(which >= 0 && which < 4, "which");
    return layer < 0 ? head_ : layers_.at(layer).lin[which];
  }

  void add_part(int64_t layer, int64_t which, Part p) {
    Linear& l = linear(layer, which);
    const int64_t K = layer < 0 || which == 0 || which == 2 ? H_ : which == 1 ? nh_ * hd_ : I_;
    TORCH_CHECK(p.k == K && p.out0 >= 0 && p.out0 + p.n <= l.N, "part shape");
    l.parts.push_back(std::move(p));
  }

  void check_complete() {
    if (complete_) return;
    TORCH_CHECK(final_norm_.w && !head_.parts.empty(), "the LM head is missing");
    TORCH_CHECK(act_ == Act::kGeluTanh || gated_, "SiLU is only taken gated");
    for (const Layer& l : layers_) {
      max_rope_ = std::max(max_rope_, l.rope);
      for (const Linear& lin : l.lin) {
        int64_t n = 0;
        for (const Part& p : lin.parts) n += p.n;
        TORCH_CHECK(n == lin.N, "a linear layer is missing weights");
      }
    }
    complete_ = true;
  }

  void write_kv(Layer& l, int64_t slot, const float* k, const float* v) {
    TORCH_CHECK(slot >= 0 && slot < l.k.size(0), "slot out of range");
    const int64_t row = slot * nkv_ * hd_;
    if (l.k.scalar_type() == at::kFloat) {
      std::copy(k, k + nkv_ * hd_, l.k.data_ptr<float>() + row);
      std::copy(v, v + nkv_ * hd_, l.v.data_ptr<float>() + row);
      return;
    }
    if (l.k.scalar_type() == at::kHalf) {  // rounded to nearest even, as Tensor.to(float16)
      half_t* kd = static_cast<half_t*>(l.k.data_ptr()) + row;
      half_t* vd = static_cast<half_t*>(l.v.data_ptr()) + row;
      for (int64_t i = 0; i < nkv_ * hd_; i += 8) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(kd + i), _mm256_cvtps_ph(_mm256_loadu_ps(k + i), _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(vd + i), _mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT));
      }
      return;
    }
    // int8: scale = max|x| / 127 (at least 1e-8), q = round(x / scale), as KVCache._quant
    const float* src[2] = {k, v};
    int8_t* dst[2] = {l.k.data_ptr<int8_t>() + row, l.v.data_ptr<int8_t>() + row};
    float* sc[2] = {l.k_scale.data_ptr<float>() + slot * nkv_, l.v_scale.data_ptr<float>() + slot * nkv_};
    for (int kv = 0; kv < 2; ++kv)
      for (int64_t h = 0; h < nkv_; ++h) {
        const float* s = src[kv] + h * hd_;
        float m = 0.0f;
        for (int64_t i = 0; i < hd_; ++i) m = std::max(m, std::fabs(s[i]));
        const float scale = std::max(m, 1e-8f) / 127.0f;
        sc[kv][h] = scale;
        for (int64_t i = 0; i < hd_; ++i) dst[kv][h * hd_ + i] = static_cast<int8_t>(std::nearbyint(s[i] / scale));
      }
  }

  int64_t H_, nh_, nkv_, hd_, I_;
  float eps_, scale_;
  int64_t bs_;
  bool layer_norm_ = false, gated_ = true;
  Act act_ = Act::kSilu;
  PagedAttention attn_;
  int64_t num_slots_ = 0;
  std::vector<Layer> layers_;
  Linear head_;
  Norm final_norm_;
  int64_t max_rope_ = -1;
  bool complete_ = false;
  std::optional<pybind11::function> reduce_;
  int64_t profile_[kCalls + 1] = {};
};

// Attention of T tokens [T, heads, head_dim] over one layer's paged cache (their own K/V
// already written): token t is at position pos[t] of the sequence whose block table is row
// seq[t] of tables. Returns [T, heads * head_dim].
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                           const at::Tensor& tables, const at::Tensor& seq, const at::Tensor& pos,
                           int64_t block_size, int64_t window, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3, "q: float32 [T, heads, dim]");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.dim() == 3 && k.sizes() == v.sizes() &&
              k.size(2) == q.size(2) && q.size(2) % 8 == 0 && q.size(1) % k.size(1) == 0, "cache shape");
  const bool int8 = k.scalar_type() == at::kChar;
  TORCH_CHECK(int8 ? (k_scale && v_scale) : (k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf),
              "cache dtype");
  const int64_t T = q.size(0);
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.is_contiguous() && tables.dim() == 2 &&
              seq.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && seq.numel() == T &&
              pos.numel() == T && seq.is_contiguous() && pos.is_contiguous(), "metadata");
  const int64_t* sp = seq.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < tables.size(0), "sequence index");
  at::Tensor out = at::empty({T, q.size(1) * q.size(2)}, q.options());
  const PagedAttention attn{q.size(1), k.size(1), q.size(2), block_size, static_cast<float>(scale)};
  attn.run(cache_of(k, v, int8 ? *k_scale : at::Tensor(), int8 ? *v_scale : at::Tensor()), T,
           q.data_ptr<float>(), q.size(1) * q.size(2), tables.data_ptr<int64_t>(), tables.size(1), sp,
           pos.data_ptr<int64_t>(), window, out.data_ptr<float>(), q.size(1) * q.size(2));
  return out;
}

// The norms and activations of the step, for the PyTorch modules (layers/norm.py,
// layers/activation.py): with the same code on both paths, a decode token's activations are
// bit-identical whichever path computes it, which matters where they are then rounded to int8
// (a last-bit difference can move a value across a rounding edge). Rows are independent.
at::Tensor rows_of(const at::Tensor& x, int64_t n) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(-1) == n, "x: contiguous float32 [..., ",
              n, "]");
  return at::empty(x.sizes(), x.options());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t n = w.numel();
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && n % 8 == 0, "w: float32 [n], n % 8 == 0");
  at::Tensor out = rows_of(x, n);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_rows(x.numel() / std::max<int64_t>(n, 1), 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rmsnorm(xp + r * n, wp, static_cast<float>(eps), n, op + r * n);
  });
  return out;
}

// apply_rotary (layers/rotary.py) in one pass: x [T, H, D] (rows of heads, each head
// contiguous), cos/sin [T, 1, D/2]; out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin),
// every product and sum rounded on its own as PyTorch's ops do, so the same bits.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) &&
              x.size(2) % 16 == 0, "x: float32 [T, H, D], heads contiguous, D % 16 == 0");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == T * half && sin.numel() == T * half, "cos, sin: [T, 1, D/2]");
  at::Tensor out = at::empty({T, H, D}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  parallel_rows(T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const float* a = xp + t * ldx + h * D;
        float* o = op + (t * H + h) * D;
        for (int64_t i = 0; i < half; i += 8) {
          const __m256 c = _mm256_loadu_ps(cp + t * half + i), s = _mm256_loadu_ps(sp + t * half + i);
          const __m256 x1 = _mm256_loadu_ps(a + i), x2 = _mm256_loadu_ps(a + half + i);
          _mm256_storeu_ps(o + i, _mm256_sub_ps(_mm256_mul_ps(x1, c), _mm256_mul_ps(x2, s)));
          _mm256_storeu_ps(o + half + i, _mm256_add_ps(_mm256_mul_ps(x2, c), _mm256_mul_ps(x1, s)));
        }
      }
  });
  return out;
}

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps) {
  const int64_t n = w.numel();
  TORCH_CHECK(w.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && w.is_contiguous() &&
              b.is_contiguous() && b.numel() == n && n % 8 == 0, "w, b: float32 [n], n % 8 == 0");
  at::Tensor out = rows_of(x, n);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_rows(x.numel() / std::max<int64_t>(n, 1), 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) layernorm(xp + r * n, wp, bp, static_cast<float>(eps), n, op + r * n);
  });
  return out;
}

// act(x) ("silu" only gated, "gelu_tanh"), or gated: act(gate) * up for x [..., 2n] holding
// gate and up side by side; returns [..., n].
at::Tensor activation(const at::Tensor& x, const std::string& act, bool gated) {
  TORCH_CHECK(act == "gelu_tanh" || (act == "silu" && gated), "activation: gelu_tanh, or silu gated");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1 && (!gated || x.size(-1) % 2 == 0),
              "x: contiguous float32");
  const int64_t w = x.size(-1), n = gated ? w / 2 : w;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_rows(x.numel() / std::max<int64_t>(w, 1), 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (act == "silu") silu_mul(xp + r * w, n, op + r * n);
      else gelu_tanh(xp + r * w, n, gated, op + r * n);
    }
  });
  return out;
}

}  // namespace

void register_decode(pybind11::module& m) {
  m.def("paged_attention", &paged_attention, "attention of prompt or decode tokens over a paged KV cache",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  using no_gil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("rms_norm", &rms_norm, "w * (x * rsqrt(mean(x^2) + eps)) per row, as the fused step", no_gil());
  m.def("rotary", &rotary, "apply_rotary's result (the same bits) in one pass", no_gil());
  m.def("layer_norm", &layer_norm, "LayerNorm per row, as the fused step", no_gil());
  m.def("activation", &activation, "act(x) or act(gate) * up per row, as the fused step", no_gil());
  pybind11::class_<DecodeModel>(m, "DecodeModel")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, int64_t>())
      .def("set_arch", &DecodeModel::set_arch)
      .def("add_layer", &DecodeModel::add_layer)
      .def("set_norm", &DecodeModel::set_norm, pybind11::arg("layer"), pybind11::arg("which"), pybind11::arg("weight"),
           pybind11::arg("bias") = pybind11::none())
      .def("set_attention", &DecodeModel::set_attention)
      .def("add_quant", &DecodeModel::add_quant)
      .def("add_dense", &DecodeModel::add_dense)
      .def("add_sparse24", &DecodeModel::add_sparse24)
      .def("set_bias", &DecodeModel::set_bias)
      .def("set_reduce", &DecodeModel::set_reduce)
      .def("set_head", &DecodeModel::set_head)
      .def("profile", &DecodeModel::profile, pybind11::arg("reset") = false)
      .def("forward", &DecodeModel::forward, no_gil());
}

}  // namespace miaotui
