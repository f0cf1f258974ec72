// AVX-512 helpers of the attention kernels shared by attention_avx512.cpp and attention_amx.cpp.
// Included only from x86-64 builds of them.
#pragma once

#include <cstdint>
#include <limits>

#include "avx512_common.h"
#include "kernels.h"

namespace tbn {

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

// One row of n floats (n a multiple of 16) -> int16 q16 with x ~ q16 * scale; returns scale
// (0 for a zero row, whose q16 are 0), or NaN if the row holds a NaN or an infinity (it then
// takes the float path, which carries them into the output as the reference does).
TB_AVX512_INLINE float to_int16(const float* x, int64_t n, int16_t* q16) {
  __m512 m = _mm512_setzero_ps();
  __mmask16 finite = 0xFFFF;
  for (int64_t t = 0; t < n; t += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + t));
    finite &= _mm512_cmp_ps_mask(a, _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_LE_OQ);
    m = _mm512_max_ps(a, m);
  }
  if (finite != 0xFFFF) return std::numeric_limits<float>::quiet_NaN();
  const float scale = _mm512_reduce_max_ps(m) / 32767.f;
  const __m512 inv = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
  const __m512 lim = _mm512_set1_ps(32767.f);
  for (int64_t t = 0; t < n; t += 16) {
    const __m512 y = _mm512_min_ps(lim, _mm512_max_ps(-lim, _mm512_mul_ps(_mm512_loadu_ps(x + t), inv)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16 + t), _mm512_cvtepi32_epi16(_mm512_cvt_roundps_epi32(
                                                                y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
  }
  return scale;
}

}  // namespace tbn
