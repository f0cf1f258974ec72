// AVX-512 (F/BW) versions of the per-token steps of a decoder layer (kernels.h: load_row,
// rope_row, kv_quantize, add_rows), 16 values per step. Each performs the float operations of its
// portable twin (kernels_scalar.cpp, attention_scalar.cpp) in the same order, so every path
// gives the same bits; the 16-bit roundings are avx512_float.h's. A decode token runs these on
// one thread between the parallel products (2B-4T: ~100 calls per token), where the portable
// loops cost ~1 ms per token.
#if defined(__x86_64__) || defined(_M_X64)

#include <cmath>
#include <cstring>

#include "avx512_float.h"
#include "kernels.h"

namespace tbn {
namespace {

// Lanes 0 .. n - 1 (all 16 when n >= 16).
TB_AVX512_FLOAT_INLINE __mmask16 first(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// Elements i .. i + 15 of x (dtype dt) as floats; lanes outside `m` are 0.
TB_AVX512_FLOAT_INLINE __m512 load16(const void* x, DType dt, int64_t i, __mmask16 m) {
  if (dt == DType::F32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i);
  return dt == DType::BF16 ? bf16x16_to_float(h) : _mm512_cvtph_ps(h);
}

// y rounded to dt once, stored at elements i .. (lanes in m) of out (dtype dt).
TB_AVX512_FLOAT_INLINE void store16(void* out, DType dt, int64_t i, __m512 y, __mmask16 m) {
  if (dt == DType::F32) {
    _mm512_mask_storeu_ps(static_cast<float*>(out) + i, m, y);
    return;
  }
  _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, m, dt == DType::BF16 ? float_to_bf16x16(y) : float_to_f16x16(y));
}

// y rounded to dt and back (round_to).
TB_AVX512_FLOAT_INLINE __m512 round16(DType dt, __m512 y) {
  return dt == DType::BF16 ? round_bf16(y) : dt == DType::F16 ? round_f16(y) : y;
}

TB_AVX512_FLOAT_INLINE __m512 negate(__m512 v) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(int(0x80000000u))));
}

}  // namespace

TB_AVX512_FLOAT void load_row_avx512(const void* x, DType dt, int64_t k, const RowNorm* norm, float* out) {
  // Lane j of `sum` adds x_i^2 for i = j, j + 8, j + 16, ... in that order, as the portable
  // loop's partial sum j: the low 8 floats of each 16 first, then the high 8 (exact products
  // of floats in double; masked-off lanes add +0).
  __m512d sum = _mm512_setzero_pd();
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 m = first(k - i);
    const __m512 v = load16(x, dt, i, m);
    _mm512_mask_storeu_ps(out + i, m, v);
    if (!norm) continue;
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(v), 1)));
    sum = _mm512_add_pd(_mm512_add_pd(sum, _mm512_mul_pd(lo, lo)), _mm512_mul_pd(hi, hi));
  }
  if (!norm) return;
  alignas(64) double s[8];
  _mm512_store_pd(s, sum);
  for (int width = 4; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) s[j] += s[j + width];
  const float var = float(s[0] / double(k));
  const __m512 r = _mm512_set1_ps(float(1.0 / std::sqrt(double(var + norm->eps))));
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 m = first(k - i);
    const __m512 w = load16(norm->weight, dt, i, m);
    const __m512 h = round16(dt, _mm512_mul_ps(_mm512_loadu_ps(out + i), r));
    _mm512_mask_storeu_ps(out + i, m, round16(dt, _mm512_mul_ps(w, h)));
  }
}

TB_AVX512_FLOAT void rope_row_avx512(const void* x, const float* c, const float* s, DType dt, int64_t d, void* out) {
  const int64_t half = d / 2;
  if (half % 16 != 0) {  // the halves are not whole vectors
    rope_row_scalar(x, c, s, dt, d, out);
    return;
  }
  const __mmask16 all = 0xFFFF;
  for (int64_t i = 0; i < half; i += 16) {
    const __m512 x1 = load16(x, dt, i, all), x2 = load16(x, dt, i + half, all);
    const __m512 y1 = _mm512_add_ps(round16(dt, _mm512_mul_ps(x1, _mm512_loadu_ps(c + i))),
                                    round16(dt, _mm512_mul_ps(negate(x2), _mm512_loadu_ps(s + i))));
    const __m512 y2 = _mm512_add_ps(round16(dt, _mm512_mul_ps(x2, _mm512_loadu_ps(c + i + half))),
                                    round16(dt, _mm512_mul_ps(x1, _mm512_loadu_ps(s + i + half))));
    store16(out, dt, i, y1, all);
    store16(out, dt, i + half, y2, all);
  }
}

TB_AVX512_FLOAT void kv_quantize_avx512(const void* x, DType dt, int64_t d, int8_t* q, float* scale) {
  // max(|x|, running): VMAXPS returns its second operand when the first is NaN, so NaNs are
  // skipped as std::max(amax, |x|) skips them.
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t t = 0; t < d; t += 16) vmax = _mm512_max_ps(_mm512_abs_ps(load16(x, dt, t, first(d - t))), vmax);
  const float s = _mm512_reduce_max_ps(vmax) / 127.0f;
  *scale = s;
  if (!(s > 0.f)) {
    std::memset(q, 0, size_t(d));
    return;
  }
  const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (int64_t t = 0; t < d; t += 16) {
    const __mmask16 m = first(d - t);
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(load16(x, dt, t, m), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // Operand order keeps a NaN as the portable std::min(std::max(r, -127), 127) does; the
    // conversion then gives 0x80000000, whose low byte 0 is what int8_t(NaN) stores there.
    r = _mm512_min_ps(hi, _mm512_max_ps(lo, r));
    _mm512_mask_cvtepi32_storeu_epi8(q + t, m, _mm512_cvttps_epi32(r));
  }
}

TB_AVX512_FLOAT void add_rows_avx512(const void* a, const void* b, DType dt, int64_t n, void* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first(n - i);
    store16(out, dt, i, _mm512_add_ps(load16(a, dt, i, m), load16(b, dt, i, m)), m);
  }
}

}  // namespace tbn

#endif  // x86-64
