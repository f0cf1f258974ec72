// AVX2 + FMA attention over an int8 KV cache (head_dim a multiple of 8; others go to the
// portable kernel). Per-function target attributes; selected at run time (cpu_features.cpp).
//
// The same algorithm as attention_avx512.cpp (read its header): rows in groups of up to 4,
// blocks of kAttentionBlock positions, each key and value vector converted to float once per
// group, online softmax with the rescaling folded into the value accumulators' loads, scores
// and weights key-major (S[key * 4 + row]; one 256-bit vector = 2 keys x 4 rows). Scores are
// made one key at a time: its 4 dot products summed horizontally together (hsum4), then scaled
// and masked. With 16 vector registers the value accumulators cover 16 dims x 4 rows at a time.
//
// 16-bit queries (p.int16_products) with head_dim a multiple of 32 take int16 products as on
// AVX-512 (the scalings and their error bounds are in attention_avx512.cpp's header): VPMADDWD
// multiplies 16 int16 pairs per instruction, twice the 8 of a float FMA, and needs no
// int -> float conversion of the keys and values. Its int32 pair sums are added with VPADDD
// (AVX2 has no VPDPWSSD). The dot products are summed horizontally in int32 (exact) before one
// conversion to float.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"

#define TB_AVX2 __attribute__((target("avx2,fma")))
#define TB_AVX2_INLINE TB_AVX2 inline __attribute__((always_inline))

namespace tbn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kGroup = kAttentionGroup;

// 8 int8 -> 8 floats.
TB_AVX2_INLINE __m256 load_i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// e^x lane by lane, x <= 0 (see kExpPoly): 0 below kExpMin and for -inf, NaN stays NaN.
TB_AVX2_INLINE __m256 exp_avx2(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(kExpMin), _CMP_NLT_UQ);
  x = _mm256_max_ps(_mm256_set1_ps(kExpMin), x);  // returns x when x is NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 y = _mm256_set1_ps(kExpPoly[0]);
  for (int c = 1; c < 6; ++c) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpPoly[c]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n from its exponent bits: n >= -126 after the clamp, so 2^n is a normal float.
  const __m256 pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  return _mm256_and_ps(_mm256_mul_ps(y, pow2n), live);
}

// Lane i of the result = the sum of the 8 lanes of a_i.
TB_AVX2_INLINE __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m128 x0 = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
  const __m128 x1 = _mm_add_ps(_mm256_castps256_ps128(a1), _mm256_extractf128_ps(a1, 1));
  const __m128 x2 = _mm_add_ps(_mm256_castps256_ps128(a2), _mm256_extractf128_ps(a2, 1));
  const __m128 x3 = _mm_add_ps(_mm256_castps256_ps128(a3), _mm256_extractf128_ps(a3, 1));
  // Transposing sums: [x0 0+2, x1 0+2, x0 1+3, x1 1+3] and the same for x2, x3, then halves.
  const __m128 s01 = _mm_add_ps(_mm_unpacklo_ps(x0, x1), _mm_unpackhi_ps(x0, x1));
  const __m128 s23 = _mm_add_ps(_mm_unpacklo_ps(x2, x3), _mm_unpackhi_ps(x2, x3));
  return _mm_add_ps(_mm_movelh_ps(s01, s23), _mm_movehl_ps(s23, s01));
}

// Per-row maximum (kMax) or sum of a key-major 2 x 4 vector: 4 floats.
template <bool kMax>
TB_AVX2_INLINE __m128 fold_rows(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  return kMax ? _mm_max_ps(lo, hi) : _mm_add_ps(lo, hi);
}

// Scores s (4 rows) of key j into w, -inf in the rows whose bit in `rows` is clear.
TB_AVX2_INLINE void store_scores(float* w, int64_t j, __m128 s, int rows) {
  // Lane r of row_bit has bit r: compared with the key's row bits it selects the rows that see it.
  const __m128i row_bit = _mm_setr_epi32(1, 2, 4, 8);
  const __m128 sees = _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_and_si128(_mm_set1_epi32(rows), row_bit), row_bit));
  _mm_store_ps(w + j * kGroup, _mm_blendv_ps(_mm_set1_ps(kNegInf), s, sees));
}

// 2. Online softmax over the scores of keys c0 .. c0 + nk - 1 in w (key-major; the padding key
// of an odd nk is set hidden here): the rows' maxima m grow, l is rescaled by alpha = e^(m_old -
// m_new) and gains the block's e^(s - m_new); w becomes the weights e^(s - m_new) * v_scale.
// wmax (if non-null): each row's largest weight.
template <int R>
TB_AVX2_INLINE void block_softmax(const AttentionProblem& p, int64_t c0, int64_t nk, float* w, float* m, float* l,
                                  float* alpha, float* wmax) {
  const int64_t pairs = (nk + 1) / 2;
  if (nk % 2) _mm_store_ps(w + nk * kGroup, _mm_set1_ps(kNegInf));
  __m256 vmax = _mm256_set1_ps(kNegInf);
  for (int64_t u = 0; u < pairs; ++u) vmax = _mm256_max_ps(vmax, _mm256_load_ps(w + 8 * u));
  alignas(16) float block_max[kGroup], shift[kGroup], sums[kGroup];
  _mm_store_ps(block_max, fold_rows<true>(vmax));
  for (int r = 0; r < kGroup; ++r) {
    shift[r] = 0.f;  // a row that has seen nothing yet: its weights are e^(-inf - 0) = 0
    alpha[r] = 1.f;
    if (r >= R) continue;
    const float m_new = std::max(m[r], block_max[r]);
    if (m_new == kNegInf) continue;
    alpha[r] = std::exp(m[r] - m_new);  // 1 if the maximum stays, 0 if the row saw nothing before
    shift[r] = m[r] = m_new;
  }
  const __m256 shift2 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(shift));
  __m256 vsum = _mm256_setzero_ps(), wv_max = _mm256_setzero_ps();
  for (int64_t u = 0; u < pairs; ++u) {
    const int64_t j = c0 + 2 * u;
    const float vs_hi = 2 * u + 1 < nk ? p.v_scale[j + 1] : 0.f;  // the padding key past the block has none
    const __m256 vs = _mm256_setr_m128(_mm_set1_ps(p.v_scale[j]), _mm_set1_ps(vs_hi));
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_load_ps(w + 8 * u), shift2));
    vsum = _mm256_add_ps(vsum, e);
    const __m256 wv = _mm256_mul_ps(e, vs);
    wv_max = _mm256_max_ps(wv_max, wv);
    _mm256_store_ps(w + 8 * u, wv);
  }
  _mm_store_ps(sums, fold_rows<false>(vsum));
  for (int r = 0; r < R; ++r) l[r] = l[r] * alpha[r] + sums[r];
  if (wmax) _mm_store_ps(wmax, fold_rows<true>(wv_max));
}

// o[r][s] (= acc * alpha) += sum over the block's keys of w[key][r] * v_key[t0 + 8 s ..]:
// R x S accumulators in registers; S = 2 covers 16 dims.
template <int R, int S>
TB_AVX2_INLINE void values_slice(const AttentionProblem& p, int64_t c0, int64_t nk, const float* w,
                                 const uint8_t* key_rows, const float* alpha, int64_t t0, float* acc) {
  const int64_t d = p.d;
  __m256 o[R][S];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) o[r][s] = _mm256_mul_ps(_mm256_loadu_ps(acc + r * d + t0 + 8 * s), _mm256_set1_ps(alpha[r]));
  for (int64_t j = 0; j < nk; ++j) {
    if (key_rows && !key_rows[j]) continue;  // no row of the group sees this key
    const int8_t* vj = p.v + (c0 + j) * d + t0;
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) {
      const __m256 vv = load_i8x8(vj + 8 * s);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) o[r][s] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + j * kGroup + r), vv, o[r][s]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) _mm256_storeu_ps(acc + r * d + t0 + 8 * s, o[r][s]);
}

// Rows g0 .. g0 + R - 1 over positions [c0, c0 + nk). key_rows[j]: bit r set if row r sees key
// c0 + j (null: every row sees every key). m, l, acc: the state of row g0 onwards.
template <int R>
TB_AVX2 void block_group(const AttentionProblem& p, int64_t g0, int64_t c0, int64_t nk, const uint8_t* key_rows,
                         float* m, float* l, float* acc) {
  const int64_t d = p.d;
  alignas(32) float w[kAttentionBlock * kGroup];  // scores, then weights: w[key * 4 + row]
  const int all_rows = (1 << R) - 1;
  // 1. scores
  for (int64_t j = 0; j < nk; ++j) {
    const int rows = key_rows ? key_rows[j] : all_rows;
    if (!rows) {
      _mm_store_ps(w + j * kGroup, _mm_set1_ps(kNegInf));
      continue;
    }
    const int8_t* kj = p.k + (c0 + j) * d;
    prefetch_key(p, c0 + j);
    __m256 a[kGroup];
#pragma GCC unroll 4
    for (int r = 0; r < kGroup; ++r) a[r] = _mm256_setzero_ps();
    for (int64_t t = 0; t < d; t += 8) {
      const __m256 kv = load_i8x8(kj + t);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(p.q + (g0 + r) * d + t), kv, a[r]);
    }
    store_scores(w, j, _mm_mul_ps(hsum4(a[0], a[1], a[2], a[3]), _mm_set1_ps(p.k_scale[c0 + j] * p.scale)), rows);
  }
  alignas(16) float alpha[kGroup];
  block_softmax<R>(p, c0, nk, w, m, l, alpha, nullptr);
  // 3. values
  int64_t t0 = 0;
  for (; t0 + 16 <= d; t0 += 16) values_slice<R, 2>(p, c0, nk, w, key_rows, alpha, t0, acc);
  for (; t0 < d; t0 += 8) values_slice<R, 1>(p, c0, nk, w, key_rows, alpha, t0, acc);
}

// One row of n floats (n a multiple of 16) -> int16 q16 with x ~ q16 * scale; returns scale
// (0 for a zero row), or NaN if the row holds a NaN or an infinity (its task then takes the
// float path). The rounding of attention_avx512.cpp's to_int16.
TB_AVX2_INLINE float to_int16(const float* x, int64_t n, int16_t* q16) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 fmax = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int64_t t = 0; t < n; t += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + t), absmask);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, fmax, _CMP_NLE_UQ));  // > max, or NaN
    m = _mm256_max_ps(a, m);
  }
  if (_mm256_movemask_ps(bad)) return std::numeric_limits<float>::quiet_NaN();
  const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float scale = std::max(_mm_cvtss_f32(m2), _mm_cvtss_f32(_mm_shuffle_ps(m2, m2, 1))) / 32767.f;
  const __m256 inv = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
  const __m256 lim = _mm256_set1_ps(32767.f), neg_lim = _mm256_set1_ps(-32767.f);
  for (int64_t t = 0; t < n; t += 16) {
    __m256i i[2];
    #pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256 y = _mm256_min_ps(lim, _mm256_max_ps(neg_lim, _mm256_mul_ps(_mm256_loadu_ps(x + t + 8 * h), inv)));
      i[h] = _mm256_cvtps_epi32(_mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    // packs interleaves the 128-bit lanes (0-3, 8-11, 4-7, 12-15): the permute restores the order.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(i[0], i[1]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16 + t), packed);
  }
  return scale;
}

// 16 int8 -> 16 int16.
TB_AVX2_INLINE __m256i load_i8x16(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Within each 128-bit half of the result: lane i = the sum of that half's 4 lanes of x[i].
TB_AVX2_INLINE __m256i half_sums4(const __m256i (&x)[4]) {
  // [x0 0+2, x1 0+2, x0 1+3, x1 1+3] and the same for x2, x3, then the pairs' sums.
  const __m256i s01 = _mm256_add_epi32(_mm256_unpacklo_epi32(x[0], x[1]), _mm256_unpackhi_epi32(x[0], x[1]));
  const __m256i s23 = _mm256_add_epi32(_mm256_unpacklo_epi32(x[2], x[3]), _mm256_unpackhi_epi32(x[2], x[3]));
  return _mm256_add_epi32(_mm256_unpacklo_epi64(s01, s23), _mm256_unpackhi_epi64(s01, s23));
}

// Lane 4 k + i of the result = the sum of the 8 int32 lanes of a_k[i], k = 0, 1 (exact).
TB_AVX2_INLINE __m256i hsum8_epi32(const __m256i (&a0)[4], const __m256i (&a1)[4]) {
  const __m256i t0 = half_sums4(a0), t1 = half_sums4(a1);
  return _mm256_add_epi32(_mm256_permute2x128_si256(t0, t1, 0x20), _mm256_permute2x128_si256(t0, t1, 0x31));
}

// Step 3 for 16-bit queries over dims [t0, t0 + 16): w16[(j / 2) * 4 + r] holds row r's int16
// weights of keys j (low half) and j + 1 (high half); per key pair and row one VPMADDWD of the
// pair's values interleaved per dim. The int32 sums (|sum| <= 32767 * 127 * 64 per block) are
// rescaled into acc, times alpha first.
template <int R>
TB_AVX2_INLINE void values_slice16(const AttentionProblem& p, int64_t c0, int64_t nk, const int32_t* w16,
                                   const float* w_scale, const float* alpha, int64_t t0, float* acc) {
  const int64_t d = p.d;
  // o[r][0]: dims t0 + 0..3 and 8..11, o[r][1]: 4..7 and 12..15 (the unpack order)
  __m256i o[R][2];
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) o[r][0] = o[r][1] = _mm256_setzero_si256();
  for (int64_t j = 0; j < nk; j += 2) {
    const int8_t* v0 = p.v + (c0 + j) * d + t0;
    const int8_t* v1 = j + 1 < nk ? v0 + d : v0;  // an odd last key pairs with itself, at weight 0
    const __m256i a = load_i8x16(v0), b = load_i8x16(v1);
    const __m256i lo = _mm256_unpacklo_epi16(a, b), hi = _mm256_unpackhi_epi16(a, b);
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256i wp = _mm256_set1_epi32(w16[(j / 2) * kGroup + r]);
      o[r][0] = _mm256_add_epi32(o[r][0], _mm256_madd_epi16(lo, wp));
      o[r][1] = _mm256_add_epi32(o[r][1], _mm256_madd_epi16(hi, wp));
      // An empty asm that "changes" the row's accumulators: without it GCC loads all four
      // rows' weights first and, short of registers, keeps an accumulator on the stack (a
      // store-to-load chain per key pair); measured 5-8% of the attention's time.
      __asm__("" : "+x"(o[r][0]), "+x"(o[r][1]));
    }
  }
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m256 al = _mm256_set1_ps(alpha[r]), ws = _mm256_set1_ps(w_scale[r]);
    const __m256 lo = _mm256_cvtepi32_ps(o[r][0]), hi = _mm256_cvtepi32_ps(o[r][1]);
    float* out = acc + r * d + t0;
    const __m256 y0 = _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x20), ws);  // dims 0..7
    const __m256 y1 = _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x31), ws);  // dims 8..15
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(out), al), y0));
    _mm256_storeu_ps(out + 8, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(out + 8), al), y1));
  }
}

// Scores of keys j and (if `second`) j + 1 for R rows of int16 queries q16 into w[0..8)
// (key-major, as store_scores), -inf in the lanes whose `sees` lane is clear (an odd last key
// is scored twice and its second copy hidden). A pair shares each query load between two keys
// and sums its 8 dot products horizontally together (hsum8_epi32): measured on the AVX2-only
// Zen 3, 4-9% less time for a decode token's and a 512-token prompt's attention than one key at
// a time. A hidden key is still multiplied (its scale may be anything): the blend discards it.
template <int R>
TB_AVX2_INLINE void score_pair(const AttentionProblem& p, const int16_t* q16, __m256 qs8, int64_t j, bool second,
                               __m256 sees, float* w) {
  const int64_t d = p.d;
  const int8_t* kj = p.k + j * d;
  const int64_t j1 = second ? j + 1 : j;  // never past the cache's end
  prefetch_key(p, j);
  prefetch_key(p, j1);
  __m256i a0[kGroup], a1[kGroup];
  #pragma GCC unroll 4
  for (int r = 0; r < kGroup; ++r) a0[r] = a1[r] = _mm256_setzero_si256();
  for (int64_t t = 0; t < d; t += 16) {
    const __m256i k0 = load_i8x16(kj + t), k1 = load_i8x16(p.k + j1 * d + t);
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q16 + r * d + t));
      a0[r] = _mm256_add_epi32(a0[r], _mm256_madd_epi16(k0, qv));
      a1[r] = _mm256_add_epi32(a1[r], _mm256_madd_epi16(k1, qv));
    }
  }
  // the float path's order of operations: (dot * q_scale) * (k_scale * scale)
  const __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(hsum8_epi32(a0, a1)), qs8);
  const __m256 ks = _mm256_setr_m128(_mm_set1_ps(p.k_scale[j] * p.scale), _mm_set1_ps(p.k_scale[j1] * p.scale));
  _mm256_store_ps(w, _mm256_blendv_ps(_mm256_set1_ps(kNegInf), _mm256_mul_ps(dot, ks), sees));
}

// block_group for 16-bit queries: q16 / q_scale are rows g0 .. of the task in int16 (d values
// each) and their scales.
template <int R>
TB_AVX2 void block_group16(const AttentionProblem& p, const int16_t* q16, const float* q_scale, int64_t c0,
                           int64_t nk, const uint8_t* key_rows, float* m, float* l, float* acc) {
  const int64_t d = p.d;
  alignas(32) float w[kAttentionBlock * kGroup];
  alignas(16) float qs[kGroup] = {0.f, 0.f, 0.f, 0.f};
  for (int r = 0; r < R; ++r) qs[r] = q_scale[r];
  const __m256 qs8 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(qs));  // both keys of a pair
  const int all_rows = (1 << R) - 1;
  // 1. scores: exact int32 dot products, times each row's query scale; keys in pairs
  // (score_pair; the slot after an odd last key is the padding block_softmax hides)
  const __m256i row_bit = _mm256_setr_epi32(1, 2, 4, 8, 1, 2, 4, 8);
  for (int64_t j = 0; j < nk; j += 2) {
    const bool second = j + 1 < nk;
    const int rows0 = key_rows ? key_rows[j] : all_rows;
    const int rows1 = !second ? 0 : key_rows ? key_rows[j + 1] : all_rows;
    if (!(rows0 | rows1)) {
      _mm256_store_ps(w + j * kGroup, _mm256_set1_ps(kNegInf));
      continue;
    }
    const __m256i rv = _mm256_setr_m128i(_mm_set1_epi32(rows0), _mm_set1_epi32(rows1));
    const __m256 sees = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(rv, row_bit), row_bit));
    score_pair<R>(p, q16, qs8, c0 + j, second, sees, w + j * kGroup);
  }
  // 2.
  alignas(16) float alpha[kGroup], wmax[kGroup], w_scale[kGroup], inv[kGroup];
  block_softmax<R>(p, c0, nk, w, m, l, alpha, wmax);
  // 3. weights to int16 per row (>= 0, <= 32767), in key pairs: w16[(j / 2) * 4 + r] =
  // w16_j | w16_j+1 << 16. The padding key of an odd nk has weight 0.
  for (int r = 0; r < kGroup; ++r) {
    w_scale[r] = wmax[r] / 32767.f;
    inv[r] = w_scale[r] > 0.f ? 1.f / w_scale[r] : 0.f;
  }
  alignas(32) int32_t w16[kAttentionBlock / 2 * kGroup];
  const __m256 inv2 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(inv));
  const __m256 lim = _mm256_set1_ps(32767.f);
  for (int64_t u = 0; u < (nk + 1) / 2; ++u) {  // keys 2u (low 128 bits), 2u + 1 (high)
    const __m256 y = _mm256_min_ps(_mm256_mul_ps(_mm256_load_ps(w + 8 * u), inv2), lim);
    const __m256i q = _mm256_cvtps_epi32(_mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m128i pair = _mm_or_si128(_mm256_castsi256_si128(q), _mm_slli_epi32(_mm256_extracti128_si256(q, 1), 16));
    _mm_store_si128(reinterpret_cast<__m128i*>(w16 + 4 * u), pair);
  }
  for (int64_t t0 = 0; t0 < d; t0 += 16) values_slice16<R>(p, c0, nk, w16, w_scale, alpha, t0, acc);
}

}  // namespace

TB_AVX2 void attention_partial_avx2(const AttentionProblem& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1,
                                    float* m, float* l, float* acc) {
  if (p.d % 8 != 0) {
    attention_partial_scalar(p, r0, r1, j0, j1, m, l, acc);
    return;
  }
  std::vector<int16_t> q16;
  std::vector<float> q_scale;
  // head_dim a multiple of 32, as on AVX-512: the same shapes take int16 products on both paths.
  bool int16 = p.int16_products && p.d % 32 == 0 && p.d <= 512;
  if (int16) {
    q16.resize(size_t((r1 - r0) * p.d));
    q_scale.resize(size_t(r1 - r0));
    for (int64_t r = r0; r < r1 && int16; ++r) {
      q_scale[size_t(r - r0)] = to_int16(p.q + r * p.d, p.d, q16.data() + (r - r0) * p.d);
      int16 = !std::isnan(q_scale[size_t(r - r0)]);
    }
  }
  if (int16) {
    for_each_attention_group(p, r0, r1, j0, j1, m, l, acc,
                             [&](int rows, int64_t g0, int64_t c0, int64_t nk, const uint8_t* key_rows, float* gm,
                                 float* gl, float* gacc) {
                               const int16_t* q = q16.data() + (g0 - r0) * p.d;
                               const float* qs = q_scale.data() + (g0 - r0);
                               switch (rows) {
                                 case 1: block_group16<1>(p, q, qs, c0, nk, key_rows, gm, gl, gacc); break;
                                 case 2: block_group16<2>(p, q, qs, c0, nk, key_rows, gm, gl, gacc); break;
                                 case 3: block_group16<3>(p, q, qs, c0, nk, key_rows, gm, gl, gacc); break;
                                 default: block_group16<4>(p, q, qs, c0, nk, key_rows, gm, gl, gacc); break;
                               }
                             });
    return;
  }
  for_each_attention_group(p, r0, r1, j0, j1, m, l, acc,
                           [&](int rows, int64_t g0, int64_t c0, int64_t nk, const uint8_t* key_rows, float* gm,
                               float* gl, float* gacc) {
                             switch (rows) {
                               case 1: block_group<1>(p, g0, c0, nk, key_rows, gm, gl, gacc); break;
                               case 2: block_group<2>(p, g0, c0, nk, key_rows, gm, gl, gacc); break;
                               case 3: block_group<3>(p, g0, c0, nk, key_rows, gm, gl, gacc); break;
                               default: block_group<4>(p, g0, c0, nk, key_rows, gm, gl, gacc); break;
                             }
                           });
}

}  // namespace tbn

#endif  // x86-64
