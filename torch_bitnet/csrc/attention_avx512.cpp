// AVX-512 attention over an int8 KV cache (head_dim a multiple of 16; others go to the
// portable kernel). Per-function target attributes; selected at run time (cpu_features.cpp).
//
// A task's rows (all query heads of one kv head, for decode the G heads of one token) are
// taken in groups of up to 4. For each block of kAttentionBlock positions and each group:
//   1. dot products: every key vector is loaded and converted to float once and multiplied
//      with the group's 4 query rows; 2 keys x 4 rows of accumulators are summed horizontally
//      together (hsum_2x4);
//   2. scores (scaled, -inf where hidden) and the online softmax over the block: the row
//      maximum grows, the state is rescaled by e^(m_old - m_new) (folded into the loads of
//      step 3), weights e^(s - m) * v_scale;
//   3. values: accumulators for 4 rows x 64 dims live in registers over the block's keys,
//      every value vector again converted once for the 4 rows.
// Scores and weights of a group are kept key-major, S[key * 4 + row], so one 512-bit vector
// holds 4 keys x 4 rows.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"

#define TB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define TB_AVX512_INLINE TB_AVX512 inline __attribute__((always_inline))

namespace tbn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kGroup = kAttentionGroup;

// 16 int8 -> 16 floats.
TB_AVX512_INLINE __m512 load_i8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// e^x lane by lane, x <= 0 (see kExpPoly): 0 below kExpMin and for -inf, NaN stays NaN.
TB_AVX512_INLINE __m512 exp_avx512(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpMin), _CMP_NLT_UQ);
  x = _mm512_max_ps(_mm512_set1_ps(kExpMin), x);  // returns x when x is NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 y = _mm512_set1_ps(kExpPoly[0]);
  for (int c = 1; c < 6; ++c) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpPoly[c]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(y, n));
}

// The dot products of 2 keys x 4 rows, a[k * 4 + r] (16 lanes each) summed horizontally:
// lanes 4 k + r of the result, key-major like the score buffer. Mostly in-lane shuffles
// (cheaper than the cross-lane ones), 12 per key.
TB_AVX512_INLINE __m256 hsum_2x4(const __m512* a) {
  __m512 e[2];  // e[k]: float r of every 128-bit lane = the lane's sum of a[k * 4 + r]
#pragma GCC unroll 2
  for (int k = 0; k < 2; ++k) {
    const __m512* x = a + 4 * k;
    // Per lane: [x0 0+2, x1 0+2, x0 1+3, x1 1+3] and the same for x2, x3; then their halves.
    const __m512 c01 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
    const __m512 c23 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
    e[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c01), _mm512_castps_pd(c23))),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c01), _mm512_castps_pd(c23))));
  }
  // Across lanes: [e0 L0+L2, e0 L1+L3, e1 L0+L2, e1 L1+L3], then lanes 0 + 1 and 2 + 3.
  __m512 f = _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x44), _mm512_shuffle_f32x4(e[0], e[1], 0xEE));
  f = _mm512_add_ps(f, _mm512_shuffle_f32x4(f, f, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_castps512_ps256(_mm512_shuffle_f32x4(f, f, _MM_SHUFFLE(2, 0, 2, 0)));
}

// Per-row maximum (op = max) or sum (op = add) of key-major 4 x 4 vectors: 4 floats.
template <bool kMax>
TB_AVX512_INLINE __m128 fold_rows(__m512 v) {
  const __m512 a = _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2));
  v = kMax ? _mm512_max_ps(v, a) : _mm512_add_ps(v, a);
  const __m512 b = _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1));
  v = kMax ? _mm512_max_ps(v, b) : _mm512_add_ps(v, b);
  return _mm512_castps512_ps128(v);
}

// o[r][s] (= acc * alpha) += sum over the block's keys of w[key][r] * v_key[t0 + 16 s ..]:
// R x S accumulators in registers; S = 4 covers 64 dims.
template <int R, int S>
TB_AVX512_INLINE void values_slice(const AttentionProblem& p, int64_t c0, int64_t nk, const float* w,
                                   const uint8_t* key_rows, const float* alpha, int64_t t0, float* acc) {
  const int64_t d = p.d;
  __m512 o[R][S];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) o[r][s] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * d + t0 + 16 * s), _mm512_set1_ps(alpha[r]));
  for (int64_t j = 0; j < nk; ++j) {
    if (key_rows && !key_rows[j]) continue;  // no row of the group sees this key
    const int8_t* vj = p.v + (c0 + j) * d + t0;
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      const __m512 vv = load_i8x16(vj + 16 * s);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) o[r][s] = _mm512_fmadd_ps(_mm512_set1_ps(w[j * kGroup + r]), vv, o[r][s]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) _mm512_storeu_ps(acc + r * d + t0 + 16 * s, o[r][s]);
}

// Rows g0 .. g0 + R - 1 over positions [c0, c0 + nk). key_rows[j]: bit r set if row r sees key
// c0 + j (null: every row sees every key). m, l, acc: the state of row g0 onwards.
template <int R>
TB_AVX512 void block_group(const AttentionProblem& p, int64_t g0, int64_t c0, int64_t nk, const uint8_t* key_rows,
                           float* m, float* l, float* acc) {
  const int64_t d = p.d;
  alignas(64) float w[kAttentionBlock * kGroup];  // dot products, scores, then weights: w[key * 4 + row]
  // 1. dot products, 2 keys at a time (an odd last key is paired with itself)
  for (int64_t j = 0; j < nk; j += 2) {
    const int64_t j1 = std::min(j + 1, nk - 1);
    if (key_rows && !(key_rows[j] | key_rows[j1])) {
      _mm256_store_ps(w + j * kGroup, _mm256_setzero_ps());  // hidden: replaced by -inf in step 2
      continue;
    }
    const int8_t* k0 = p.k + (c0 + j) * d;
    const int8_t* k1 = p.k + (c0 + j1) * d;
    __m512 a[2 * kGroup];
#pragma GCC unroll 8
    for (int r = 0; r < 2 * kGroup; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t t = 0; t < d; t += 16) {
      const __m512 ka = load_i8x16(k0 + t), kb = load_i8x16(k1 + t);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512 qv = _mm512_loadu_ps(p.q + (g0 + r) * d + t);
        a[r] = _mm512_fmadd_ps(qv, ka, a[r]);
        a[kGroup + r] = _mm512_fmadd_ps(qv, kb, a[kGroup + r]);
      }
    }
    _mm256_store_ps(w + j * kGroup, hsum_2x4(a));
  }
  const int64_t quads = (nk + 3) / 4;
  if ((nk + 1) / 2 * 2 < quads * 4) _mm256_store_ps(w + (quads * 4 - 2) * kGroup, _mm256_setzero_ps());
  // 2. scores = dot * k_scale * scale, -inf where hidden; online softmax. Lane 4 k + r of a quad
  // is key k, row r: per-key values are loaded 4 at a time and spread over 4 lanes each.
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512 scale = _mm512_set1_ps(p.scale), hidden = _mm512_set1_ps(kNegInf);
  __m512 vmax = hidden;
  for (int64_t u = 0; u < quads; ++u) {
    const int64_t keys = std::min<int64_t>(4, nk - 4 * u);
    uint32_t sees = 0;  // bit 4 k + r: row r sees key 4 u + k
    for (int64_t k = 0; k < keys; ++k) sees |= uint32_t(key_rows ? key_rows[4 * u + k] : (1u << R) - 1u) << (4 * k);
    const __m512 ks = _mm512_permutexvar_ps(
        spread, _mm512_castps128_ps512(_mm_maskz_loadu_ps(__mmask8((1u << keys) - 1u), p.k_scale + c0 + 4 * u)));
    const __m512 sc = _mm512_mask_mul_ps(hidden, __mmask16(sees), _mm512_load_ps(w + 16 * u), _mm512_mul_ps(ks, scale));
    _mm512_store_ps(w + 16 * u, sc);
    vmax = _mm512_max_ps(vmax, sc);
  }
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
  const __m512 shift4 = _mm512_broadcast_f32x4(_mm_load_ps(shift));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t u = 0; u < quads; ++u) {
    const __mmask8 keys = __mmask8(nk - 4 * u >= 4 ? 0xF : (1u << (nk - 4 * u)) - 1u);
    const __m512 vs = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_maskz_loadu_ps(keys, p.v_scale + c0 + 4 * u)));
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_load_ps(w + 16 * u), shift4));
    vsum = _mm512_add_ps(vsum, e);
    _mm512_store_ps(w + 16 * u, _mm512_mul_ps(e, vs));
  }
  _mm_store_ps(sums, fold_rows<false>(vsum));
  for (int r = 0; r < R; ++r) l[r] = l[r] * alpha[r] + sums[r];
  // 3. values
  int64_t t0 = 0;
  for (; t0 + 64 <= d; t0 += 64) values_slice<R, 4>(p, c0, nk, w, key_rows, alpha, t0, acc);
  for (; t0 < d; t0 += 16) values_slice<R, 1>(p, c0, nk, w, key_rows, alpha, t0, acc);
}

}  // namespace

TB_AVX512 void attention_partial_avx512(const AttentionProblem& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1,
                                        float* m, float* l, float* acc) {
  if (p.d % 16 != 0) {
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
