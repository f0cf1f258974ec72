// AVX2 kernels (x86-64 CPUs without AVX-512). Per-function target attributes, selected at
// run time by cpu_features.cpp.
//
// The multiply-add is VPMADDUBSW (u8 x s8 -> pairs summed into saturating int16). With codes
// u <= 2 and |x| <= 128 one pair is at most 512 in magnitude, and the 8 pairs summed per
// 256-weight block at most 4096, so int16 cannot saturate before the block's VPMADDWD widens
// the sums to int32.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"

#define TB_AVX2 __attribute__((target("avx2")))
#define TB_AVX2_INLINE TB_AVX2 inline __attribute__((always_inline))
// Loops over tile rows/tokens are unrolled early ("#pragma GCC unroll") so the accumulator
// arrays live in registers (see kernels_avx512.cpp).

namespace tbn {
namespace {

TB_AVX2 float quantize_row_avx2(const float* x, int64_t k, int64_t k_pad, int8_t* xq, int32_t* xsum) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps();
  __m256 vnan = _mm256_setzero_ps();
  const int64_t k8 = k & ~int64_t(7);
  for (int64_t i = 0; i < k8; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, absmask));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.f;
  for (int j = 0; j < 8; ++j) amax = std::max(amax, lanes[j]);
  bool nan = _mm256_movemask_ps(vnan) != 0;
  for (int64_t i = k8; i < k; ++i) {
    const float v = std::fabs(x[i]);
    nan |= v != v;
    amax = v > amax ? v : amax;
  }
  if (nan || amax == std::numeric_limits<float>::infinity()) {
    std::memset(xq, 0, size_t(k_pad));
    *xsum = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float a = act_scale_from_amax(amax);
  const __m256 va = _mm256_set1_ps(a);
  const __m256i lo = _mm256_set1_epi32(-128), hi = _mm256_set1_epi32(127);
  // packs_epi32 / packs_epi16 interleave 128-bit lanes; this restores element order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i vsum = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    __m256i q[4];
    #pragma GCC unroll 16
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), va);
      q[j] = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      q[j] = _mm256_min_epi32(_mm256_max_epi32(q[j], lo), hi);
      vsum = _mm256_add_epi32(vsum, q[j]);
    }
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + i), _mm256_permutevar8x32_epi32(b, order));
  }
  alignas(32) int32_t sums[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums), vsum);
  int32_t s = 0;
  for (int j = 0; j < 8; ++j) s += sums[j];
  for (; i < k; ++i) {
    float r = std::nearbyint(x[i] * a);
    r = std::min(std::max(r, -128.f), 127.f);
    xq[i] = int8_t(r);
    s += xq[i];
  }
  std::memset(xq + k, 0, size_t(k_pad - k));
  *xsum = s;
  return a;
}

TB_AVX2_INLINE int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Codes of plane I from 32 packed bytes.
template <int I>
TB_AVX2_INLINE __m256i plane(__m256i wv) {
  return _mm256_and_si256(_mm256_srli_epi16(wv, 2 * I), _mm256_set1_epi8(3));
}

// Half H (bytes 32H..32H+31) of one 64-byte block, all 4 planes, for an MR x NR tile;
// products summed into int16 partials.
template <int H, int MR, int NR>
TB_AVX2_INLINE void block_half(__m256i (&part)[MR][NR], const uint8_t* wb, int64_t ldw, const int8_t* xb,
                               int64_t ldq) {
  __m256i wv[NR];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * ldw + 32 * H));
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t) {
    const int8_t* xt = xb + t * ldq + 32 * H;
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt + 64));
    const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt + 128));
    const __m256i x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt + 192));
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(plane<0>(wv[r]), x0), _mm256_maddubs_epi16(plane<1>(wv[r]), x1));
      s = _mm256_add_epi16(s, _mm256_maddubs_epi16(plane<2>(wv[r]), x2));
      s = _mm256_add_epi16(s, _mm256_maddubs_epi16(plane<3>(wv[r]), x3));
      part[t][r] = _mm256_add_epi16(part[t][r], s);
    }
  }
}

// MR tokens x NR output rows.
template <int MR, int NR>
TB_AVX2 void gemm_tile(const GemmProblem& p, int64_t m, int64_t n) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NR];
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[t][r] = _mm256_setzero_si256();
  const uint8_t* w = p.w + n * p.ldw;
  const int8_t* x = p.xq + m * p.ldq;
  const int64_t nblk = p.k_pad / 256;
  for (int64_t b = 0; b < nblk; ++b) {
    __m256i part[MR][NR];
    #pragma GCC unroll 16
    for (int t = 0; t < MR; ++t)
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) part[t][r] = _mm256_setzero_si256();
    block_half<0>(part, w + 64 * b, p.ldw, x + 256 * b, p.ldq);
    block_half<1>(part, w + 64 * b, p.ldw, x + 256 * b, p.ldq);
    #pragma GCC unroll 16
    for (int t = 0; t < MR; ++t)
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) acc[t][r] = _mm256_add_epi32(acc[t][r], _mm256_madd_epi16(part[t][r], ones));
  }
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) store_result(p, m + t, n + r, hsum_epi32(acc[t][r]));
}

constexpr int kMR = 2;
constexpr int kNR = 4;
using TileFn = void (*)(const GemmProblem&, int64_t, int64_t);

// [mr - 1][nr - 1]
constexpr TileFn kTiles[kMR][kNR] = {
    {gemm_tile<1, 1>, gemm_tile<1, 2>, gemm_tile<1, 3>, gemm_tile<1, 4>},
    {gemm_tile<2, 1>, gemm_tile<2, 2>, gemm_tile<2, 3>, gemm_tile<2, 4>},
};

void gemm_avx2(const GemmProblem& p, int64_t n0, int64_t n1) {
  // As in the AVX-512 kernel: token chunks stay in L2, NR weight rows in L1.
  const int64_t chunk = std::max<int64_t>(kMR, (int64_t(256) << 10) / p.k_pad / kMR * kMR);
  for (int64_t m0 = 0; m0 < p.m; m0 += chunk) {
    const int64_t m1 = std::min(p.m, m0 + chunk);
    for (int64_t n = n0; n < n1; n += kNR) {
      const int64_t nr = std::min<int64_t>(kNR, n1 - n);
      for (int64_t m = m0; m < m1; m += kMR) kTiles[std::min<int64_t>(kMR, m1 - m) - 1][nr - 1](p, m, n);
    }
  }
}

TB_AVX2 uint8_t stream_max_avx2(const uint8_t* p, int64_t n) {
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    m0 = _mm256_max_epu8(m0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    m1 = _mm256_max_epu8(m1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    m2 = _mm256_max_epu8(m2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    m3 = _mm256_max_epu8(m3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  m0 = _mm256_max_epu8(_mm256_max_epu8(m0, m1), _mm256_max_epu8(m2, m3));
  alignas(32) uint8_t lanes[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), m0);
  uint8_t mx = 0;
  for (int j = 0; j < 32; ++j) mx = std::max(mx, lanes[j]);
  for (; i < n; ++i) mx = std::max(mx, p[i]);
  return mx;
}

}  // namespace

const Kernels kAvx2Kernels = {quantize_row_avx2, gemm_avx2, stream_max_avx2, attention_partial_avx2,
                                int8_gemm_avx2, relu2_gate_avx2, int4_gemm_avx2};

}  // namespace tbn

#endif  // x86-64
