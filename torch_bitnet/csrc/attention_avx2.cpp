// AVX2 + FMA attention over an int8 KV cache (head_dim a multiple of 8; others go to the
// portable kernel). Per-function target attributes; selected at run time (cpu_features.cpp).
//
// The same algorithm as attention_avx512.cpp (read its header): rows in groups of up to 4,
// blocks of kAttentionBlock positions, each key and value vector converted to float once per
// group, online softmax with the rescaling folded into the value accumulators' loads, scores
// and weights key-major (S[key * 4 + row]; one 256-bit vector = 2 keys x 4 rows). Scores are
// made one key at a time: its 4 dot products summed horizontally together (hsum4), then scaled
// and masked. With 16 vector registers the value accumulators cover 16 dims x 4 rows at a time.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

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
  const __m128 hidden = _mm_set1_ps(kNegInf);
  // Lane r of row_bit[r] has bit r: compared with a key's row bits it selects the rows that see it.
  const __m128i row_bit = _mm_setr_epi32(1, 2, 4, 8);
  const int all_rows = (1 << R) - 1;
  // 1. scores
  for (int64_t j = 0; j < nk; ++j) {
    const int rows = key_rows ? key_rows[j] : all_rows;
    if (!rows) {
      _mm_store_ps(w + j * kGroup, hidden);
      continue;
    }
    const int8_t* kj = p.k + (c0 + j) * d;
    __m256 a[kGroup];
#pragma GCC unroll 4
    for (int r = 0; r < kGroup; ++r) a[r] = _mm256_setzero_ps();
    for (int64_t t = 0; t < d; t += 8) {
      const __m256 kv = load_i8x8(kj + t);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(p.q + (g0 + r) * d + t), kv, a[r]);
    }
    const __m128 s = _mm_mul_ps(hsum4(a[0], a[1], a[2], a[3]), _mm_set1_ps(p.k_scale[c0 + j] * p.scale));
    const __m128 sees = _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_and_si128(_mm_set1_epi32(rows), row_bit), row_bit));
    _mm_store_ps(w + j * kGroup, _mm_blendv_ps(hidden, s, sees));
  }
  const int64_t pairs = (nk + 1) / 2;
  if (nk % 2) _mm_store_ps(w + nk * kGroup, hidden);
  // 2. online softmax
  __m256 vmax = _mm256_set1_ps(kNegInf);
  for (int64_t u = 0; u < pairs; ++u) vmax = _mm256_max_ps(vmax, _mm256_load_ps(w + 8 * u));
  alignas(16) float block_max[kGroup], shift[kGroup], alpha[kGroup], sums[kGroup];
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
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t u = 0; u < pairs; ++u) {
    const int64_t j = c0 + 2 * u;
    const float vs_hi = 2 * u + 1 < nk ? p.v_scale[j + 1] : 0.f;  // the padding key past the block has none
    const __m256 vs = _mm256_setr_m128(_mm_set1_ps(p.v_scale[j]), _mm_set1_ps(vs_hi));
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_load_ps(w + 8 * u), shift2));
    vsum = _mm256_add_ps(vsum, e);
    _mm256_store_ps(w + 8 * u, _mm256_mul_ps(e, vs));
  }
  _mm_store_ps(sums, fold_rows<false>(vsum));
  for (int r = 0; r < R; ++r) l[r] = l[r] * alpha[r] + sums[r];
  // 3. values
  int64_t t0 = 0;
  for (; t0 + 16 <= d; t0 += 16) values_slice<R, 2>(p, c0, nk, w, key_rows, alpha, t0, acc);
  for (; t0 < d; t0 += 8) values_slice<R, 1>(p, c0, nk, w, key_rows, alpha, t0, acc);
}

}  // namespace

TB_AVX2 void attention_partial_avx2(const AttentionProblem& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1,
                                    float* m, float* l, float* acc) {
  if (p.d % 8 != 0) {
    attention_partial_scalar(p, r0, r1, j0, j1, m, l, acc);
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
