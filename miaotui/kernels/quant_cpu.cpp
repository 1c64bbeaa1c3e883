// Weight-only quantized matmul for x86-64 CPUs with AVX2, FMA and F16C.
//
// Weight layout (built by miaotui/layers/quant.py):
//   int8: q int8 [N, K]
//   int4: q uint8 [N, K/2]; each block of 32 values takes 16 bytes, byte i holding
//         value i in its low nibble and value i+16 in its high nibble (GGUF's Q4_0 order)
//   int5: q uint8 [N, 5K/8]; a row is its low four bits as int4's (K/2 bytes), then the
//         fifth bits, 4 bytes a block (bit i: value i), as GGUF's Q5_0/Q5_1 store them;
//         w = scale * (q - 16), or scale * q + min. The kernels unpack a block to the
//         int8 values Q5 tensors used to be repacked to and compute as for int8 weights,
//         so the results are those bits, for 0.69 instead of 1.06 bytes a weight.
//   scale [N, K/B] float32 or float16, and for some formats min [N, K/B]:
//         w = scale * q + min      int8, and int4 with a min
//         w = scale * (q - 8)      int4 without a min ("offset" = 8)
//   B, the block that shares one scale, is 16 (int8 only), 32 * 2^s, or K (one per row).
//   K is a multiple of 32 (the Python side pads int8 rows with zeros when needed).
//
// qmatmul (decode, small T): every row of x is quantized to int8 in blocks of 32,
// x ~ dx * xq, and the dot product of each block is an integer one (maddubs + madd).
// int8 weights with one scale per block of 32 (GGUF's Q8_0, Q5_0, Q5_1) take
// qdecode_block32.cpp (a row kernel, and from 16 tokens eight rows of a panel per tile).
// The others (int4, blocks of 16, of 64 and more, one scale per row) take the kernel here:
//   y = sum_b scale_b * dx_b * sum(q * xq)  +  sum_b c_b * dx_b * sum(xq),
//   c_b = min_b (or -8 * scale_b), the second term summed per scale block.
// Eight blocks' integer sums are gathered into one vector (hadd) before the float
// scaling, so the scales cost one multiply and one FMA per eight blocks. Each weight byte
// is read once per call (per 4 tokens, from L2, when T > 4); rows are split between
// threads. Either way a row's arithmetic does not depend on T.
//
// dequant (prefill, large T): float32 rows for BLAS, bit-exact with the Python
// reference (compiled with -ffp-contract=off: a multiply then an add, never an FMA).
#include "quant_cpu.h"
#include "qgemm_vnni.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cpuid.h>
#include <immintrin.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace miaotui {
namespace {

// Sum of w * x over a block of 32, as 8 int32 partial sums (lane i: values 4i..4i+3).
// maddubs multiplies unsigned by signed bytes: 4-bit values are unsigned already; for
// int8 weights the sign moves onto x (|w| * (x * sign w)).
inline __m256i dot_u4(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}
inline __m256i dot_s8(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)),
                           _mm256_set1_epi16(1));
}
}  // namespace

// AVX-VNNI: CPUID leaf 7, subleaf 1, EAX bit 4; AVX-512 VNNI on 256-bit vectors: avx512vnni
// and avx512vl.
Dot dot_kind() {
  static const Dot cpu = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1)) return Dot::kVex;
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) return Dot::kEvex;
    return Dot::kAvx2;
  }();
  auto set = [](const char* name) {
    const char* v = std::getenv(name);
    return v && *v && v[0] != '0';
  };
  if (set("MIAOTUI_NO_VNNI") || (cpu == Dot::kEvex && set("MIAOTUI_NO_AVX512"))) return Dot::kAvx2;
  return cpu;
}

namespace {

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Threads for the row loops. at::parallel_for (OpenMP) ends each call at a barrier that
// waits for every thread, so when another process holds a core the call stalls until the
// scheduler runs the late thread (4-8 ms a call on a busy 2-core machine, more than a
// whole matmul). Here the caller and helper threads take chunks from a shared counter
// and the caller waits only for chunks a helper has started: a helper that wakes up late
// finds no work left and the caller has done it all.
//
// Hand-offs spin before they sleep: a fused decode step runs ~150 jobs a few microseconds
// apart, and a sleep/wake pair through the kernel costs 10-20 us each time. Spinning is
// bounded (kSpinUs), so an idle engine or a busy machine costs at most that per job.
class Workers {
 public:
  static Workers& instance() {
    static Workers* w = new Workers();  // never destroyed: the helpers outlive main()
    return *w;
  }

  // f(c) for c in 0..n, shared by the caller and up to threads - 1 helpers.
  void run(int64_t n, int threads, const std::function<void(int64_t)>& f) {
    if (threads <= 1 || n <= 1) {
      for (int64_t c = 0; c < n; ++c) f(c);
      return;
    }
    std::lock_guard<std::mutex> one_job_at_a_time(job_mu_);
    for (; n_helpers_ < threads - 1; ++n_helpers_)
      std::thread([this, i = n_helpers_] { helper(i); }).detach();
    job_ = &f;
    n_ = n;
    next_.store(0);
    max_helpers_ = threads - 1;
    {
      std::lock_guard<std::mutex> lk(mu_);  // helpers asleep check gen_ under mu_
      open_.store(true);
      gen_.fetch_add(1);
    }
    wake_.notify_all();
    work();
    open_.store(false);  // helpers that come from now on stay out
    if (!spin_until([this] { return busy_.load() == 0; })) {
      std::unique_lock<std::mutex> lk(mu_);
      idle_.wait(lk, [this] { return busy_.load() == 0; });
    }
  }

 private:
  static constexpr int64_t kSpinUs = 100;

  template <typename P>
  static bool spin_until(P done) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinUs);
    for (int i = 0;; ++i) {
      if (done()) return true;
      _mm_pause();
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > end) return done();
    }
  }

  void work() {
    for (int64_t c; (c = next_.fetch_add(1)) < n_;) (*job_)(c);
  }

  void helper(int index) {
    uint64_t seen = 0;
    for (;;) {
      if (!spin_until([&] { return gen_.load() != seen; })) {
        std::unique_lock<std::mutex> lk(mu_);
        wake_.wait(lk, [&] { return gen_.load() != seen; });
      }
      seen = gen_.load();
      busy_.fetch_add(1);  // before reading open_: the caller waits for busy_ after closing
      if (open_.load() && index < max_helpers_) work();
      if (busy_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lk(mu_);
        idle_.notify_one();
      }
    }
  }

  std::mutex job_mu_, mu_;
  std::condition_variable wake_, idle_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<uint64_t> gen_{0};  // the job's number
  std::atomic<bool> open_{false};
  std::atomic<int> busy_{0};      // helpers inside run's window
  int n_helpers_ = 0, max_helpers_ = 0;
};

}  // namespace

// Threads the kernels use; 0: torch's setting.
std::atomic<int> g_threads{0};
void set_threads(int64_t n) { g_threads = static_cast<int>(n); }

int kernel_threads() { return g_threads > 0 ? g_threads.load() : at::get_num_threads(); }

// f(begin, end) over [0, n) in chunks of at least `grain`, on the kernels' threads.
void parallel_rows(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  const int threads = kernel_threads();
  const int64_t chunk = std::max(grain, (n + 8 * threads - 1) / (8 * threads));
  const int64_t chunks = (n + chunk - 1) / chunk;
  Workers::instance().run(chunks, threads, [&](int64_t c) {
    f(c * chunk, std::min(n, (c + 1) * chunk));
  });
}


namespace {

// Rows of d and s are padded with zeros to a multiple of eight blocks (ld, lds apart), so
// that a short last group loads them whole.
struct Acts {
  const int8_t* q;  // [T, K]
  const float* d;   // [T, ld] scale of each block of 32
  const float* s;   // [T, lds] sum over a scale block of dx * sum(xq), times -offset when
                    //          the weight has no min; nullptr if unused
  int64_t ld, lds;
  // int4 weights: d and (scale blocks of 32) s again, each run of eight blocks in the order
  // the kernel's sums come out (0, 2, 4, 6, 1, 3, 5, 7; see group): permuted once per row
  // of x here rather than twice per row of W and group in the kernel.
  const float* dp = nullptr;
  const float* sp = nullptr;
};

// v [T, ld] (ld a multiple of 8) with each run of eight in the order 0, 2, 4, 6, 1, 3, 5, 7.
std::vector<float> even_odd_runs(const std::vector<float>& v) {
  static constexpr int kOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); i += 8)
    for (int j = 0; j < 8; ++j) out[i + j] = v[i + kOrder[j]];
  return out;
}

inline int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

// Quantize x [T, K] per block of 32: xq = round(x / dx), dx = max|x| / 127.
// bsum gets dx * sum(xq) of each block, isum (if given) sum(xq) itself; dx, bsum and isum
// rows are ld apart.
// paired (for int4 weights): the two blocks of each pair
// (b, b + 1) are stored interleaved by halves, [b 0..15, b+1 0..15, b 16..31, b+1 16..31],
// the order in which one 32-byte load of int4 weights unpacks (low nibbles, high nibbles).
// An odd last block keeps the plain order.
void quantize_acts(const float* x, int64_t T, int64_t K, int8_t* xq, float* dx, float* bsum,
                   int64_t ld, bool paired, int32_t* isum = nullptr) {
  const int64_t nb = K / 32, paired_blocks = nb / 2 * 2;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  parallel_rows(T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t i = t0 * nb; i < t1 * nb; ++i) {
      const float* p = x + 32 * i;
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int k = 0; k < 4; ++k) {
        v[k] = _mm256_loadu_ps(p + 8 * k);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
      }
      __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m = _mm_max_ps(m, _mm_movehl_ps(m, m));
      m = _mm_max_ss(m, _mm_movehdup_ps(m));
      const float a = _mm_cvtss_f32(m);
      const float d = a / 127.0f;
      const __m256 id = _mm256_set1_ps(a > 0.0f ? 127.0f / a : 0.0f);
      __m256i q[4];
      for (int k = 0; k < 4; ++k) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], id));
      // sum of the 32 integers
      __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      // int32 -> int8; the packs interleave 128-bit lanes, the permute puts them back
      const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                           _mm256_packs_epi32(q[2], q[3]));
      const __m256i bytes = _mm256_permutevar8x32_epi32(b, perm);
      const int64_t j = i % nb;
      if (paired && j < paired_blocks) {
        int8_t* base = xq + 32 * (i - (j & 1)) + 16 * (j & 1);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(base), _mm256_castsi256_si128(bytes));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(base + 32), _mm256_extracti128_si256(bytes, 1));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + 32 * i), bytes);
      }
      const int32_t si = hsum_i32(s);
      dx[i / nb * ld + j] = d;
      bsum[i / nb * ld + j] = d * static_cast<float>(si);
      if (isum) isum[i / nb * ld + j] = si;
    }
  });
}

// sum_b c_b * s_b with c_b = min_b, or scale_b when there is no min (s is then scaled by
// -offset already): the term of scale blocks longer than 32.
template <typename S>
float min_term(const S* mn, const S* sc, const float* s, int64_t nwb) {
  const S* c = mn ? mn : sc;
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= nwb; i += 8) acc = _mm256_fmadd_ps(load8(c + i), _mm256_loadu_ps(s + i), acc);
  float r = hsum(acc);
  for (; i < nwb; ++i) r += to_float(c[i]) * s[i];
  return r;
}

// Eight blocks' dot products p[0..7] (8 int32 lanes each) summed by hadd: lane j of lo
// (j < 4) is the sum of p[j]'s lanes 0-3 (its values 0..15), lane 4 + j that of lanes 4-7
// (values 16..31); hi likewise for p[4 + j].
inline void reduce8(const __m256i (&p)[8], __m256i& lo, __m256i& hi) {
  lo = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  hi = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
}

// The weight scales of blocks b..b+7 (b a multiple of 8): block i uses s[i >> shift].
template <typename S>
inline __m256 scales8(const S* s, int64_t b, int shift) {
  if (shift == 0) return load8(s + b);
  const int64_t i = b >> shift;
  if (shift == 1) {
    const float a = to_float(s[i]), c = to_float(s[i + 1]), d = to_float(s[i + 2]),
                e = to_float(s[i + 3]);
    return _mm256_setr_ps(a, a, c, c, d, d, e, e);
  }
  if (shift == 2) {
    const float a = to_float(s[i]), c = to_float(s[i + 1]);
    return _mm256_setr_ps(a, a, a, a, c, c, c, c);
  }
  return _mm256_set1_ps(to_float(s[i]));
}

// The weight scales of blocks b..b+m-1 (block i uses s[i >> shift]), zeros past m.
template <typename S>
__attribute__((always_inline)) inline __m256 scales_part(const S* s, int64_t b, int shift, int m) {
  if (m >= 8) return scales8(s, b, shift);
  if (shift == 0) return load_part(s + b, m);
  if ((b >> shift) == ((b + m - 1) >> shift)) return _mm256_set1_ps(to_float(s[b >> shift]));  // lanes past m meet zero x
  alignas(32) float f[8] = {};
  for (int i = 0; i < m; ++i) f[i] = to_float(s[(b + i) >> shift]);
  return _mm256_load_ps(f);
}

// Blocks b..b+m-1 of one weight row (m <= 8; even for int4) against TM tokens, added to
// acc. Their integer dot products are reduced to one vector of (up to) eight sums, scaled
// by eight (weight scale * dx) products and accumulated with one FMA; with scale blocks of
// 32 the min/offset term rides along (one more FMA). Called with m = 8 for whole groups
// and once with a smaller m for the rest of a row, whose missing lanes are zeros. kDot: int4
// sums by vpdpbusd where the CPU has it (the same integers; quant_cpu.h).
// kM: m known at compile time (a row's short rest), so the blocks past m cost nothing.
template <bool kInt4, bool kB16, typename S, int TM, Dot kDot, int kM = 0>
__attribute__((always_inline)) inline void group(const Weights& w, const Acts& a, const uint8_t* wq,
                                                 const S* ws, const S* wm, int64_t b, int m,
                                                 bool inline_min, int64_t t0, __m256 (&acc)[TM]) {
  if constexpr (kM != 0) m = kM;
  const int64_t K = w.K;
  const __m256i zero = _mm256_setzero_si256(), ones = _mm256_set1_epi16(1);
  const __m256i even_odd = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  if constexpr (kInt4) {
    // One 32-byte load holds blocks b + 2i and b + 2i + 1: its low nibbles are values
    // 0..15 of both, its high nibbles values 16..31, against x in the paired order.
    // maddubs sums stay below 2 * 15 * 127 * 2 < 2^15, so the halves add as int16.
    // The sums come out in block order 0, 2, 4, 6, 1, 3, 5, 7: the scales follow.
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const int pairs = m / 2;
    __m256i lo[4], hi[4];
    for (int i = 0; i < 4; ++i) {
      const __m256i v = i < pairs ? load32(wq + 16 * (b + 2 * i)) : zero;
      lo[i] = _mm256_and_si256(v, low4);
      hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    }
    const __m256 sc = _mm256_permutevar8x32_ps(scales_part(ws, b, w.shift, m), even_odd);
    const __m256 c8 = !inline_min ? _mm256_setzero_ps()
                      : wm        ? _mm256_permutevar8x32_ps(load_part(wm + b, m), even_odd)
                                  : sc;
    for (int t = 0; t < TM; ++t) {
      const int8_t* xq = a.q + (t0 + t) * K + 32 * b;
      __m256i r[4];
      for (int i = 0; i < 4; ++i) {
        if (i >= pairs) r[i] = zero;
        else if constexpr (kDot != Dot::kAvx2)
          r[i] = dpbusd<kDot>(dpbusd<kDot>(zero, lo[i], load32(xq + 64 * i)), hi[i], load32(xq + 64 * i + 32));
        else
          r[i] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[i], load32(xq + 64 * i)),
                                                    _mm256_maddubs_epi16(hi[i], load32(xq + 64 * i + 32))),
                                   ones);
      }
      const __m256i sum = _mm256_hadd_epi32(_mm256_hadd_epi32(r[0], r[1]), _mm256_hadd_epi32(r[2], r[3]));
      const __m256 dx = load8(a.dp + (t0 + t) * a.ld + b);  // already in the sums' order
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(sc, dx), acc[t]);
      if (inline_min) acc[t] = _mm256_fmadd_ps(c8, load8(a.sp + (t0 + t) * a.lds + b), acc[t]);
    }
  } else {
    __m256i wv[8];
    for (int i = 0; i < 8; ++i) wv[i] = i < m ? load32(wq + 32 * (b + i)) : zero;
    __m256 sc_lo, sc_hi, c8;  // weight scales lined up with reduce8's lanes; min term factors
    if constexpr (kB16) {  // scale 2i for values 0..15 of block i, 2i + 1 for 16..31
      sc_lo = _mm256_permutevar8x32_ps(load_part(ws + 2 * b, 2 * m), even_odd);
      sc_hi = _mm256_permutevar8x32_ps(load_part(ws + 2 * b + 8, 2 * m - 8), even_odd);
    } else {
      sc_lo = scales_part(ws, b, w.shift, m);
      c8 = !inline_min ? _mm256_setzero_ps() : wm ? load_part(wm + b, m) : sc_lo;
    }
    const __m256i twice = _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3);
    for (int t = 0; t < TM; ++t) {
      const int8_t* xq = a.q + (t0 + t) * K + 32 * b;
      __m256i p[8];
      for (int i = 0; i < 8; ++i) p[i] = i < m ? dot_s8(wv[i], load32(xq + 32 * i)) : zero;
      __m256i lo, hi;
      reduce8(p, lo, hi);
      const __m256 dx = load8(a.d + (t0 + t) * a.ld + b);
      if constexpr (kB16) {
        const __m256 dlo = _mm256_permutevar8x32_ps(dx, twice);
        const __m256 dhi = _mm256_permutevar8x32_ps(dx, _mm256_add_epi32(twice, _mm256_set1_epi32(4)));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(sc_lo, dlo), acc[t]);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(sc_hi, dhi), acc[t]);
      } else {  // the two halves of each block share a scale: add them first
        const __m256i sum = _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20),
                                             _mm256_permute2x128_si256(lo, hi, 0x31));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(sc_lo, dx), acc[t]);
        if (inline_min) acc[t] = _mm256_fmadd_ps(c8, load8(a.s + (t0 + t) * a.lds + b), acc[t]);
      }
    }
  }
}

// The same for a short rest of at most four int8 blocks (K = 576 leaves two): half the
// reduction of a whole group, ~13% faster at K = 576 (an int4 rest gains nothing from it).
// Lane j and lane j + 4 of the reduced sums both belong to block j.
template <bool kB16, typename S, int TM>
__attribute__((always_inline)) inline void group4_int8(const Weights& w, const Acts& a, const uint8_t* wq,
                                                       const S* ws, const S* wm, int64_t b, int m,
                                                       bool inline_min, int64_t t0, __m256 (&acc)[TM]) {
  const __m256i zero = _mm256_setzero_si256(), idx = _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3);
  const __m256 sc = kB16 ? _mm256_permutevar8x32_ps(load_part(ws + 2 * b, 2 * m), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7))
                         : _mm256_permutevar8x32_ps(scales_part(ws, b, w.shift, m), idx);
  const __m256 c4 = !inline_min ? _mm256_setzero_ps() : wm ? load_part(wm + b, m) : scales_part(ws, b, 0, m);
  __m256i wv[4];
  for (int i = 0; i < 4; ++i) wv[i] = i < m ? load32(wq + 32 * (b + i)) : zero;
  for (int t = 0; t < TM; ++t) {
    const int8_t* xq = a.q + (t0 + t) * w.K + 32 * b;
    __m256i p[4];
    for (int i = 0; i < 4; ++i) p[i] = i < m ? dot_s8(wv[i], load32(xq + 32 * i)) : zero;
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    const __m256 dx = _mm256_permutevar8x32_ps(load8(a.d + (t0 + t) * a.ld + b), idx);
    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(sc, dx), acc[t]);
    if (inline_min) acc[t] = _mm256_fmadd_ps(c4, load8(a.s + (t0 + t) * a.lds + b), acc[t]);
  }
}

// y[t, n] for rows n0..n1 and the TM tokens t0..t0+TM, eight blocks at a time.
// kInlineMin: the min/offset term rides in the groups (one scale per block; see run_rows).
// A compile-time flag: tested at run time inside the token loop it left the four
// accumulators of a 4-token tile on the stack, each group's FMA waiting on a store.
template <bool kInt4, bool kB16, typename S, int TM, Dot kDot, bool kInlineMin>
void dot_rows(const Weights& w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1,
              int64_t t0) {
  const int64_t K = w.K, nb = K / 32;
  constexpr bool inline_min = kInlineMin;
  const int64_t full = nb / 8 * 8, rest = kInt4 ? (nb - full) / 2 * 2 : nb - full;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wq = w.q + n * w.row_bytes;
    const S* ws = static_cast<const S*>(w.scale) + n * w.nwb;
    const S* wm = w.min ? static_cast<const S*>(w.min) + n * w.nwb : nullptr;
    __m256 acc[TM];
    for (int t = 0; t < TM; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < full; b += 8) {
      const char* ahead = reinterpret_cast<const char*>(wq) + (kInt4 ? 16 : 32) * b + kPrefetchBytes;
      for (int l = 0; l < (kInt4 ? 2 : 4); ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
      group<kInt4, kB16, S, TM, kDot>(w, a, wq, ws, wm, b, 8, inline_min, t0, acc);
    }
    if constexpr (!kInt4) {
      if (rest && rest <= 4) {
        group4_int8<kB16, S, TM>(w, a, wq, ws, wm, full, static_cast<int>(rest), inline_min, t0, acc);
      } else if (rest) {
        group<kInt4, kB16, S, TM, kDot>(w, a, wq, ws, wm, full, static_cast<int>(rest), inline_min, t0, acc);
      }
    } else if (rest == 2) {  // int4: a rest of 2, 4 or 6 blocks, m fixed at compile time (~9% at K = 576)
      group<kInt4, kB16, S, TM, kDot, 2>(w, a, wq, ws, wm, full, 2, inline_min, t0, acc);
    } else if (rest == 4) {
      group<kInt4, kB16, S, TM, kDot, 4>(w, a, wq, ws, wm, full, 4, inline_min, t0, acc);
    } else if (rest) {
      group<kInt4, kB16, S, TM, kDot, 6>(w, a, wq, ws, wm, full, 6, inline_min, t0, acc);
    }
    float r[TM];
    for (int t = 0; t < TM; ++t) r[t] = hsum(acc[t]);
    if (full + rest < nb) {  // an odd last block of int4 weights
      const int64_t b = nb - 1;
      const __m256i wv = unpack_int4(wq + 16 * b);
      const float s0 = to_float(ws[b >> w.shift]);
      for (int t = 0; t < TM; ++t) {
        const __m256i p = dot_u4(wv, load32(a.q + (t0 + t) * K + 32 * b));
        r[t] += a.d[(t0 + t) * a.ld + b] * s0 * static_cast<float>(hsum_i32(p));
        if (inline_min) r[t] += to_float(wm ? wm[b] : ws[b]) * a.s[(t0 + t) * a.lds + b];
      }
    }
    for (int t = 0; t < TM; ++t) {
      if (a.s && !inline_min) r[t] += min_term(wm, ws, a.s + (t0 + t) * a.lds, w.nwb);
      y[(t0 + t) * ldy + n] = r[t];
    }
  }
}

template <bool kInt4, bool kB16, typename S, Dot kDot, bool kInlineMin>
void tile_rows(const Weights& w, const Acts& a, float* y, int64_t ldy, int64_t T, int64_t c0, int64_t c1,
               int64_t t0) {
  switch (std::min<int64_t>(4, T - t0)) {
    case 1: dot_rows<kInt4, kB16, S, 1, kDot, kInlineMin>(w, a, y, ldy, c0, c1, t0); break;
    case 2: dot_rows<kInt4, kB16, S, 2, kDot, kInlineMin>(w, a, y, ldy, c0, c1, t0); break;
    case 3: dot_rows<kInt4, kB16, S, 3, kDot, kInlineMin>(w, a, y, ldy, c0, c1, t0); break;
    default: dot_rows<kInt4, kB16, S, 4, kDot, kInlineMin>(w, a, y, ldy, c0, c1, t0); break;
  }
}

template <bool kInt4, bool kB16, typename S, Dot kDot = Dot::kAvx2>
void run_rows(const Weights& w, const Acts& a, float* y, int64_t ldy, int64_t T, int64_t n0,
              int64_t n1) {
  // Rows in chunks that stay in L2 while every tile of (up to) 4 tokens passes over them.
  const int64_t chunk = std::max<int64_t>(1, (128 << 10) / w.row_bytes);
  for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
    const int64_t c1 = std::min(n1, c0 + chunk);
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
      if (a.s && !kB16 && w.shift == 0) tile_rows<kInt4, kB16, S, kDot, true>(w, a, y, ldy, T, c0, c1, t0);
      else tile_rows<kInt4, kB16, S, kDot, false>(w, a, y, ldy, T, c0, c1, t0);
    }
  }
}

}  // namespace

Weights describe(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& min,
                 int64_t block, int64_t bits, double offset) {
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, "bits must be 4, 5 or 8");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && q.dim() == 2 && q.element_size() == 1,
              "q must be a contiguous 2-d int8/uint8 tensor");
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf);
  Weights w;
  w.q = static_cast<const uint8_t*>(q.data_ptr());
  w.N = q.size(0);
  w.row_bytes = q.size(1);
  w.K = bits == 8 ? w.row_bytes : bits == 4 ? 2 * w.row_bytes : w.row_bytes * 8 / 5;
  TORCH_CHECK(w.K % 32 == 0 && w.K * bits == 8 * w.row_bytes, "K must be a multiple of 32");
  w.scale = scale.data_ptr();
  w.nwb = scale.size(1);
  TORCH_CHECK(scale.size(0) == w.N && w.nwb * block == w.K, "scale shape");
  w.min = nullptr;
  if (min.defined() && min.numel() > 0) {
    TORCH_CHECK(min.is_contiguous() && min.sizes() == scale.sizes() &&
                min.scalar_type() == scale.scalar_type(), "min must match scale");
    w.min = min.data_ptr();
  }
  w.offset = static_cast<float>(offset);
  w.q5_sub16 = false;
  if (bits == 5) {  // the offset is taken when unpacking (unpack_int5)
    TORCH_CHECK(w.min ? offset == 0 : offset == 16, "int5: offset 16 without a min, else 0");
    w.q5_sub16 = !w.min;
    w.offset = 0.0f;
  }
  w.shift = 0;
  if (block == w.K) w.shift = 62;  // one scale per row
  else if (block != 16) {
    TORCH_CHECK(block % 32 == 0 && (block & (block - 1)) == 0, "unsupported block ", block);
    while ((32 << w.shift) < block) ++w.shift;
  }
  TORCH_CHECK(block != 16 || (bits == 8 && !w.min && offset == 0), "block 16: int8 only");
  TORCH_CHECK(bits != 5 || block == 32, "int5: blocks of 32");
  w.bits = static_cast<int>(bits);
  w.half = scale.scalar_type() == at::kHalf;
  w.b16 = block == 16;
  return w;
}

void qmatmul_into(const float* x, int64_t T, const Weights& w, float* y, int64_t ldy) {
  const int64_t nb = w.K / 32, ld = round8(nb), lds = round8(w.nwb);
  if (block32_format(w)) {  // Q8_0, Q5_0, Q5_1: qdecode_block32.cpp
    std::vector<int8_t> xq(T * w.K);
    std::vector<float> dx(T * ld), bsum(T * ld);
    quantize_acts(x, T, w.K, xq.data(), dx.data(), bsum.data(), ld, false);
    return block32_matmul(w, xq.data(), dx.data(), bsum.data(), ld, T, y, ldy);
  }
  std::vector<int8_t> xq(T * w.K);
  std::vector<float> dx(T * ld), bsum(T * ld), s;
  quantize_acts(x, T, w.K, xq.data(), dx.data(), bsum.data(), ld, w.bits == 4);
  Acts a{xq.data(), dx.data(), nullptr, ld, lds};
  if (w.min || w.offset != 0.0f) {  // the block sums, per scale block (times -offset, no min)
    const int64_t per = nb / w.nwb;
    const float f = w.min ? 1.0f : -w.offset;
    s.assign(T * lds, 0.0f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < nb; ++j) s[t * lds + j / per] += f * bsum[t * ld + j];
    a.s = s.data();
  }
  int64_t n0 = 0;  // rows done by the panel kernel
  // (its format has one scale per block of 32, so lds == ld)
  if (a.s && int4_panel_format(w, T)) n0 = int4_panel_matmul(w, a.q, a.d, a.s, ld, T, y, ldy);
  if (n0 == w.N) return;
  std::vector<float> dp, sp;
  if (w.bits == 4) {
    dp = even_odd_runs(dx);
    a.dp = dp.data();
    if (a.s && w.shift == 0) {
      sp = even_odd_runs(s);
      a.sp = sp.data();
    }
    // the integer sums by vpdpbusd where the CPU has it (the same integers)
    with_dot([&](auto d) {
      parallel_rows(w.N - n0, 16, [&](int64_t i0, int64_t i1) {
        if (w.half) run_rows<true, false, half_t, d.value>(w, a, y, ldy, T, n0 + i0, n0 + i1);
        else run_rows<true, false, float, d.value>(w, a, y, ldy, T, n0 + i0, n0 + i1);
      });
    });
    return;
  }
  parallel_rows(w.N - n0, 16, [&](int64_t i0, int64_t i1) {
    const int64_t r0 = n0 + i0, r1 = n0 + i1;
    if (w.b16) {
      if (w.half) run_rows<false, true, half_t>(w, a, y, ldy, T, r0, r1);
      else run_rows<false, true, float>(w, a, y, ldy, T, r0, r1);
    } else {
      if (w.half) run_rows<false, false, half_t>(w, a, y, ldy, T, r0, r1);
      else run_rows<false, false, float>(w, a, y, ldy, T, r0, r1);
    }
  });
}

// ---- Prompt tokens with int8 activations (EngineConfig.prefill_int8, off by default) ----
//
// As llama.cpp does for prompts: x quantized per block of 32 as for decode, then a GEMM
// whose block dot products are exact integer ones (AVX-512 VNNI's vpdpbusd, qgemm_vnni.cpp),
// W packed a panel of 16 rows at a time and read once for every 8 tokens. Each output is a
// fixed sequence of per-block float steps whatever the batch, so prompt rows stay
// batch-invariant within an engine that uses it. Without VNNI (or with
// MIAOTUI_NO_AVX512=1) an AVX2 GEMM over the same panels (qgemm_avx2.cpp, vpmaddubsw)
// computes the same integer sums and the same bits; int8 blocks of 16 take the decode
// kernel (qmatmul).

namespace {

bool use_vnni() {
  static const bool yes = [] {
    const char* off = std::getenv("MIAOTUI_NO_AVX512");
    return !(off && *off && std::string(off) != "0") && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
  }();
  return yes;
}

// Rows n0..n0+nc of W as one vnni::Panel (rows past nc: zeros). Values become unsigned
// bytes u with w = scale * (u - o) + min: int4 as stored (o = 8 without a min), int8 + 128
// (int5: its int8 values, the offset already taken by unpack_int5, + 128).
template <typename S>
void pack_vnni_panel(const Weights& w, int64_t n0, int nc, uint8_t* u, float* sc, float* c) {
  constexpr int NR = vnni::kNR;
  const int64_t nb = w.K / 32;
  const float o = w.bits == 4 ? (w.min ? 0.0f : 8.0f) : 128.0f;
  alignas(32) uint8_t vals[NR][32];
  for (int64_t b = 0; b < nb; ++b) {
    for (int j = 0; j < NR; ++j) {
      float s = 0.0f, m = 0.0f;
      if (j < nc) {
        const int64_t n = n0 + j;
        const uint8_t* q = w.q + n * w.row_bytes;
        const __m256i v = w.bits == 4 ? unpack_int4(q + 16 * b)
                          : _mm256_xor_si256(w.bits == 5 ? unpack_int5(q, w.K / 2, b, w.q5_sub16) : load32(q + 32 * b),
                                             _mm256_set1_epi8(static_cast<char>(0x80)));
        _mm256_store_si256(reinterpret_cast<__m256i*>(vals[j]), v);
        const int64_t si = n * w.nwb + (b >> w.shift);
        s = to_float(static_cast<const S*>(w.scale)[si]);
        m = w.min ? to_float(static_cast<const S*>(w.min)[si]) : 0.0f;
      } else {
        std::memset(vals[j], 0, 32);
      }
      sc[b * NR + j] = s;
      c[b * NR + j] = m - o * s;
    }
    for (int g = 0; g < 8; ++g)
      for (int j = 0; j < NR; ++j) std::memcpy(u + b * 512 + 64 * g + 4 * j, vals[j] + 4 * g, 4);
  }
}

}  // namespace

void qgemm_int8_into(const float* x, int64_t T, const Weights& w, float* y, int64_t ldy) {
  if (T == 0 || w.N == 0) return;
  if (w.b16) return qmatmul_into(x, T, w, y, ldy);
  constexpr int NR = vnni::kNR;
  const bool avx512 = use_vnni(), int4 = w.bits == 4;
  const int64_t K = w.K, nb = K / 32, ld = round8(nb);
  std::vector<int8_t> xq(T * K);
  std::vector<float> dx(T * ld), bsum(T * ld);
  std::vector<int32_t> isum(!avx512 && !int4 ? T * ld : 0);  // AVX2, int8 weights: sum(xq) a block
  quantize_acts(x, T, K, xq.data(), dx.data(), bsum.data(), ld, false, isum.empty() ? nullptr : isum.data());
  // Jobs: 128 rows of W (8 panels, packed once per job) by runs of tokens whose int8 rows
  // stay in L2 (~512 KB) while the panels pass; more runs when there are few row blocks.
  const int64_t rows = 128, nblocks = (w.N + rows - 1) / rows, want = 4 * kernel_threads();
  int64_t run = std::max<int64_t>(vnni::kMR, (512 << 10) / K / vnni::kMR * vnni::kMR);
  if (nblocks * ((T + run - 1) / run) < want)
    run = std::max<int64_t>(vnni::kMR, (T * nblocks / want + vnni::kMR - 1) / vnni::kMR * vnni::kMR);
  const int64_t runs = (T + run - 1) / run;
  parallel_rows(nblocks * runs, 1, [&](int64_t j0, int64_t j1) {
    thread_local std::vector<uint8_t> u;
    thread_local std::vector<float> sc, c;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n0 = (j / runs) * rows, n1 = std::min(w.N, n0 + rows);
      const int64_t t0 = (j % runs) * run, t1 = std::min(T, t0 + run);
      const int64_t panels = (n1 - n0 + NR - 1) / NR;
      u.resize(panels * nb * 512);
      sc.resize(panels * nb * NR);
      c.resize(panels * nb * NR);
      for (int64_t p = 0; p < panels; ++p) {
        const int nc = static_cast<int>(std::min<int64_t>(NR, n1 - n0 - p * NR));
        uint8_t* pu = u.data() + p * nb * 512;
        float *ps = sc.data() + p * nb * NR, *pc = c.data() + p * nb * NR;
        if (w.half) pack_vnni_panel<half_t>(w, n0 + p * NR, nc, pu, ps, pc);
        else pack_vnni_panel<float>(w, n0 + p * NR, nc, pu, ps, pc);
        const vnni::Panel panel{pu, ps, pc};
        float* yp = y + t0 * ldy + n0 + p * NR;
        if (avx512)
          vnni::panel_gemm(xq.data() + t0 * K, dx.data() + t0 * ld, bsum.data() + t0 * ld, ld, t1 - t0, K, panel,
                           yp, ldy, nc);
        else
          vnni::panel_gemm_avx2(xq.data() + t0 * K, dx.data() + t0 * ld, bsum.data() + t0 * ld,
                                isum.empty() ? nullptr : isum.data() + t0 * ld, ld, t1 - t0, K, panel, int4, yp,
                                ldy, nc);
      }
    }
  });
}

namespace {

// y = x @ W.T for x [T, K] float32.
at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                   const at::Tensor& min, int64_t block, int64_t bits, double offset) {
  const Weights w = describe(q, scale, min, block, bits, offset);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
              x.size(1) == w.K, "x must be contiguous float32 [T, K]");
  at::Tensor y = at::empty({x.size(0), w.N}, x.options());
  qmatmul_into(x.data_ptr<float>(), x.size(0), w, y.data_ptr<float>(), w.N);
  return y;
}

// y = x @ W.T for prompt tokens with int8 activations (qgemm_int8_into).
at::Tensor qgemm_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                      const at::Tensor& min, int64_t block, int64_t bits, double offset) {
  const Weights w = describe(q, scale, min, block, bits, offset);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
              x.size(1) == w.K, "x must be contiguous float32 [T, K]");
  at::Tensor y = at::empty({x.size(0), w.N}, x.options());
  qgemm_int8_into(x.data_ptr<float>(), x.size(0), w, y.data_ptr<float>(), w.N);
  return y;
}

// Row n of W as float32 [K]: scale * q (+ min) or scale * (q - 8).
template <typename S>
void dequant_row_t(const Weights& w, int64_t n, float* o) {
  const int64_t nb = w.K / 32;
  const bool int4 = w.bits == 4;
  const __m256i eight = _mm256_set1_epi8(8);
  const uint8_t* wq = w.q + n * w.row_bytes;
  const S* ws = static_cast<const S*>(w.scale) + n * w.nwb;
  const S* wm = w.min ? static_cast<const S*>(w.min) + n * w.nwb : nullptr;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i v = int4 ? unpack_int4(wq + 16 * b) : w.bits == 5 ? unpack_int5(wq, w.K / 2, b, w.q5_sub16)
                                                              : load32(wq + 32 * b);
    if (int4 && !wm) v = _mm256_sub_epi8(v, eight);
    const __m128i h[2] = {_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)};
    for (int k = 0; k < 4; ++k) {  // values 8k..8k+7
      const int64_t si = w.b16 ? 2 * b + k / 2 : b >> w.shift;
      const __m128i bytes = k % 2 ? _mm_srli_si128(h[k / 2], 8) : h[k / 2];
      __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
      f = _mm256_mul_ps(f, _mm256_set1_ps(to_float(ws[si])));
      if (wm) f = _mm256_add_ps(f, _mm256_set1_ps(to_float(wm[si])));
      _mm256_storeu_ps(o + 32 * b + 8 * k, f);
    }
  }
}

}  // namespace

void dequant_row(const Weights& w, int64_t n, float* out) {
  if (w.half) dequant_row_t<half_t>(w, n, out);
  else dequant_row_t<float>(w, n, out);
}

namespace {

// Rows row(0..n) of a quantized weight as float32 [n, K], dequant_row's bits.
template <typename F>
at::Tensor dequant_rows(const Weights& w, int64_t n, const at::Tensor& scale, int64_t grain, const F& row) {
  TORCH_CHECK(w.bits != 4 || w.offset == 8.0f || w.min, "int4 needs a min or offset 8");
  at::Tensor out = at::empty({n, w.K}, scale.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  parallel_rows(n, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dequant_row(w, row(r), o + r * w.K);
  });
  return out;
}

at::Tensor dequant(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& min,
                   int64_t block, int64_t bits, double offset, int64_t n0, int64_t n1) {
  const Weights w = describe(q, scale, min, block, bits, offset);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= w.N, "row range");
  return dequant_rows(w, n1 - n0, scale, 4, [&](int64_t r) { return n0 + r; });
}

// Rows ids[i] of a quantized weight as float32 [len(ids), K]: an embedding lookup, the
// same bits as dequant (a decode step's one row took ~0.25 ms as PyTorch ops, ~5% of a
// SmolLM2 Q4_0 token).
at::Tensor dequant_ids(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& min,
                       int64_t block, int64_t bits, double offset, const at::Tensor& ids) {
  const Weights w = describe(q, scale, min, block, bits, offset);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous(), "ids: int64 [n]");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.size(0); ++i) TORCH_CHECK(0 <= id[i] && id[i] < w.N, "row ", id[i], " out of range");
  return dequant_rows(w, ids.size(0), scale, 16, [&](int64_t r) { return id[r]; });
}

// A benchmark candidate: int8 weights times float32 activations (no activation
// quantization), one token, scale blocks of 32 * 2^s or one per row, no min.
at::Tensor int8_f32_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                         int64_t block) {
  const Weights w = describe(q, scale, at::Tensor(), block, 8, 0.0);
  TORCH_CHECK(x.numel() == w.K && x.is_contiguous() && scale.scalar_type() == at::kFloat &&
              block != 16);
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  at::Tensor y = at::empty({1, w.N}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t nb = w.K / 32;
  parallel_rows(w.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wq = reinterpret_cast<const int8_t*>(w.q + n * w.row_bytes);
      __m256 acc = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        __m256 p[4];
        for (int k = 0; k < 4; ++k) {
          const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wq + 32 * b + 8 * k));
          p[k] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
                               _mm256_loadu_ps(xp + 32 * b + 8 * k));
        }
        const __m256 blk = _mm256_add_ps(_mm256_add_ps(p[0], p[1]), _mm256_add_ps(p[2], p[3]));
        acc = _mm256_fmadd_ps(blk, _mm256_set1_ps(sp[n * w.nwb + (b >> w.shift)]), acc);
      }
      yp[n] = hsum(acc);
    }
  });
  return y;
}

}  // namespace
}  // namespace miaotui

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace miaotui;
  // Other Python threads (a server's) may run while a kernel does.
  using no_gil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("set_threads", &set_threads, "threads for the kernels (0: torch's setting)");
  m.def("qmatmul", &qmatmul, "x @ W.T with int8-quantized activations", no_gil());
  m.def("qgemm_int8", &qgemm_int8, "x @ W.T with int8 activations, prompt tokens (VNNI GEMM)", no_gil());
  m.def("has_vnni", &use_vnni, "whether qgemm_int8 runs the AVX-512 VNNI GEMM");
  m.def("decode_dot", [] {
    const Dot d = dot_kind();
    return std::string(d == Dot::kVex ? "avx-vnni" : d == Dot::kEvex ? "avx512-vnni" : "avx2");
  }, "the instruction the decode kernels take their int8 dot products from");
  m.def("dequant", &dequant, "float32 rows n0..n1 of a quantized weight", no_gil());
  m.def("dequant_ids", &dequant_ids, "float32 rows ids of a quantized weight (an embedding lookup)", no_gil());
  m.def("int8_f32_gemv", &int8_f32_gemv, "benchmark candidate: int8 W, float32 x", no_gil());
  register_decode(m);
  register_matmul(m);
  register_sparse(m);
}
