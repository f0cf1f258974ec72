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
//
// For 16-bit queries (p.int16_products) with head_dim a multiple of 32, steps 1 and 3 use
// VPDPWSSD (32 int16 products a vector, twice the float FMA's 16): each query row is scaled
// to int16 (q ~ q16 * sq, sq = max|q| / 32767) once per task, and each block's weights to
// int16 per row (w ~ w16 * sw, sw = max_j w / 32767). Both roundings are below 2^-16 of the
// row's largest element; the dot products and value sums are exact int32 (|q16 k| sums
// <= 32767 * 127 * d < 2^31 for d <= 512; a block's |w16 v| sums <= 32767 * 127 * 64).
// Against the 2^-9 rounding of the bf16 / fp16 output this is noise; float32 queries keep the
// float path above.
#if defined(__x86_64__) || defined(_M_X64)

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_avx512.h"

namespace tbn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kGroup = kAttentionGroup;

// 16 int8 -> 16 floats.
TB_AVX512_INLINE __m512 load_i8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
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
    prefetch_key(p, c0 + j);
    prefetch_key(p, c0 + j1);
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

// acc + VPDPWSSD(a, b): 16 int32 lanes, each adding the products of its two int16 pairs. (Inline
// asm for the reason dpbusd in avx512_common.h gives: arrays of accumulators stay in registers.)
TB_AVX512_INLINE __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
  __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
  return acc;
}

// 32 int8 -> 32 int16.
TB_AVX512_INLINE __m512i load_i8x32(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 int32 lanes of 8 vectors (a[k * 4 + r], 2 keys x 4 rows) summed horizontally, as floats
// in hsum_2x4's order: lanes 4 k + r. The halves are added in int32 (exact: the full sums fit),
// the 8 partial sums then in float (each rounded to 2^-24 relative).
TB_AVX512_INLINE __m256 hsum_2x4_epi32(const __m512i* a) {
  __m512 f[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(a[i]), _mm512_extracti64x4_epi64(a[i], 1));
    f[i] = _mm512_zextps256_ps512(_mm256_cvtepi32_ps(h));
  }
  return hsum_2x4(f);
}

// Step 3 for 16-bit queries over dims [t0, t0 + 32 S): the block's weights w (key-major, float)
// scaled to int16 per row, then per key pair and row VPDPWSSD on (v_j, v_j+1) interleaved per
// dim; the int32 sums rescaled into acc (times alpha first). Keys past nk count with weight 0.
template <int R, int S>
TB_AVX512_INLINE void values_slice16(const AttentionProblem& p, int64_t c0, int64_t nk, const int32_t* w16,
                                     const float* w_scale, const float* alpha, int64_t t0, float* acc) {
  const int64_t d = p.d;
  __m512i o[R][2 * S];  // [row][lo / hi half of each 32 dims] in the unpack order, see below
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int s = 0; s < 2 * S; ++s) o[r][s] = _mm512_setzero_si512();
  for (int64_t j = 0; j < nk; j += 2) {
    const int8_t* v0 = p.v + (c0 + j) * d + t0;
    const int8_t* v1 = j + 1 < nk ? v0 + d : v0;  // an odd last key pairs with itself, at weight 0
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      const __m512i a = load_i8x32(v0 + 32 * s), b = load_i8x32(v1 + 32 * s);
      // Per 128-bit lane L: lo = dims 8L .. 8L+3 of (v_j, v_j+1) pairs, hi = dims 8L+4 .. 8L+7.
      const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512i wp = _mm512_set1_epi32(w16[(j / 2) * kGroup + r]);
        o[r][2 * s] = dpwssd(o[r][2 * s], lo, wp);
        o[r][2 * s + 1] = dpwssd(o[r][2 * s + 1], hi, wp);
      }
    }
  }
  // lo / hi lanes back to dim order: dims 32 s + 0..15 = lo lane 0, hi lane 0, lo lane 1, hi
  // lane 1; dims 32 s + 16..31 = the same of lanes 2 and 3.
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]), ws = _mm512_set1_ps(w_scale[r]);
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      const __m512 lo = _mm512_cvtepi32_ps(o[r][2 * s]), hi = _mm512_cvtepi32_ps(o[r][2 * s + 1]);
      float* out = acc + r * d + t0 + 32 * s;
      const __m512 y0 = _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), ws);
      const __m512 y1 = _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), ws);
      _mm512_storeu_ps(out, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(out), a), y0));
      _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(out + 16), a), y1));
    }
  }
}

// block_group for 16-bit queries (see the file comment): q16 / q_scale are rows g0 .. of the
// task in int16 (d values each) and their scales.
template <int R>
TB_AVX512 void block_group16(const AttentionProblem& p, const int16_t* q16, const float* q_scale, int64_t c0,
                             int64_t nk, const uint8_t* key_rows, float* m, float* l, float* acc) {
  const int64_t d = p.d;
  alignas(64) float w[kAttentionBlock * kGroup];
  // 1. dot products (int32, exact), times each row's query scale
  alignas(16) float qs[kGroup] = {0.f, 0.f, 0.f, 0.f};
  for (int r = 0; r < R; ++r) qs[r] = q_scale[r];
  const __m256 qs8 = _mm256_castps128_ps256(_mm_load_ps(qs));
  const __m256 q_scale8 = _mm256_insertf128_ps(qs8, _mm_load_ps(qs), 1);
  for (int64_t j = 0; j < nk; j += 2) {
    const int64_t j1 = std::min(j + 1, nk - 1);
    if (key_rows && !(key_rows[j] | key_rows[j1])) {
      _mm256_store_ps(w + j * kGroup, _mm256_setzero_ps());
      continue;
    }
    const int8_t* k0 = p.k + (c0 + j) * d;
    const int8_t* k1 = p.k + (c0 + j1) * d;
    prefetch_key(p, c0 + j);
    prefetch_key(p, c0 + j1);
    __m512i a[2 * kGroup];
#pragma GCC unroll 8
    for (int r = 0; r < 2 * kGroup; ++r) a[r] = _mm512_setzero_si512();
    for (int64_t t = 0; t < d; t += 32) {
      const __m512i ka = load_i8x32(k0 + t), kb = load_i8x32(k1 + t);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512i qv = _mm512_loadu_si512(q16 + r * d + t);
        a[r] = dpwssd(a[r], ka, qv);
        a[kGroup + r] = dpwssd(a[kGroup + r], kb, qv);
      }
    }
    _mm256_store_ps(w + j * kGroup, _mm256_mul_ps(hsum_2x4_epi32(a), q_scale8));
  }
  // 2. as block_group
  const int64_t quads = (nk + 3) / 4;
  if ((nk + 1) / 2 * 2 < quads * 4) _mm256_store_ps(w + (quads * 4 - 2) * kGroup, _mm256_setzero_ps());
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512 scale = _mm512_set1_ps(p.scale), hidden = _mm512_set1_ps(kNegInf);
  __m512 vmax = hidden;
  for (int64_t u = 0; u < quads; ++u) {
    const int64_t keys = std::min<int64_t>(4, nk - 4 * u);
    uint32_t sees = 0;
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
    shift[r] = 0.f;
    alpha[r] = 1.f;
    if (r >= R) continue;
    const float m_new = std::max(m[r], block_max[r]);
    if (m_new == kNegInf) continue;
    alpha[r] = std::exp(m[r] - m_new);
    shift[r] = m[r] = m_new;
  }
  const __m512 shift4 = _mm512_broadcast_f32x4(_mm_load_ps(shift));
  __m512 vsum = _mm512_setzero_ps(), wmax = _mm512_setzero_ps();
  for (int64_t u = 0; u < quads; ++u) {
    const __mmask8 keys = __mmask8(nk - 4 * u >= 4 ? 0xF : (1u << (nk - 4 * u)) - 1u);
    const __m512 vs = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_maskz_loadu_ps(keys, p.v_scale + c0 + 4 * u)));
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_load_ps(w + 16 * u), shift4));
    vsum = _mm512_add_ps(vsum, e);
    const __m512 wv = _mm512_mul_ps(e, vs);
    wmax = _mm512_max_ps(wmax, wv);
    _mm512_store_ps(w + 16 * u, wv);
  }
  _mm_store_ps(sums, fold_rows<false>(vsum));
  for (int r = 0; r < R; ++r) l[r] = l[r] * alpha[r] + sums[r];
  // 3. weights to int16 per row, in key pairs: w16[(j / 2) * 4 + r] = (w16_j | w16_j+1 << 16)
  alignas(16) float wmax4[kGroup], w_scale[kGroup], inv[kGroup];
  _mm_store_ps(wmax4, fold_rows<true>(wmax));
  for (int r = 0; r < kGroup; ++r) {
    w_scale[r] = wmax4[r] / 32767.f;
    inv[r] = w_scale[r] > 0.f ? 1.f / w_scale[r] : 0.f;
  }
  alignas(64) int32_t w16[kAttentionBlock / 2 * kGroup];
  const __m512 inv4 = _mm512_broadcast_f32x4(_mm_load_ps(inv));
  // Lanes 4 k + r of quad u (keys 4u .. 4u+3): keys 4u, 4u+1 pair into dwords 8u + r, keys
  // 4u+2, 4u+3 into 8u + 4 + r.
  const __m512i pairs = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
  for (int64_t u = 0; u < quads; ++u) {
    const __mmask16 live = __mmask16(nk - 4 * u >= 4 ? 0xFFFF : (1u << (4 * (nk - 4 * u))) - 1u);
    const __m512 y = _mm512_maskz_mul_ps(live, _mm512_load_ps(w + 16 * u), inv4);
    const __m512i q = _mm512_cvt_roundps_epi32(_mm512_min_ps(y, _mm512_set1_ps(32767.f)),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // int16 of lane 4 k + r at word 2 (4 (k / 2) + r) + k % 2
    const __m256i h = _mm512_cvtepi32_epi16(_mm512_permutexvar_epi32(pairs, q));
    _mm256_store_si256(reinterpret_cast<__m256i*>(w16 + 8 * u), h);
  }
  int64_t t0 = 0;
  for (; t0 + 64 <= d; t0 += 64) values_slice16<R, 2>(p, c0, nk, w16, w_scale, alpha, t0, acc);
  for (; t0 < d; t0 += 32) values_slice16<R, 1>(p, c0, nk, w16, w_scale, alpha, t0, acc);
}

}  // namespace

TB_AVX512 void attention_partial_avx512(const AttentionProblem& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1,
                                        float* m, float* l, float* acc) {
  if (p.d % 16 != 0) {
    attention_partial_scalar(p, r0, r1, j0, j1, m, l, acc);
    return;
  }
  std::vector<int16_t> q16;
  std::vector<float> q_scale;
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
