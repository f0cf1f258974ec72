// 16 floats <-> 16 bf16 / f16 values in AVX-512 (F/BW) registers, with the roundings of the
// scalar helpers in kernels.h: bf16 by the integer round-to-nearest-even of float_to_bf16
// (NaN -> 0x7FC0); f16 by the hardware conversion, which rounds to nearest even as
// float_to_f16 does (NaN payloads may differ; NaN stays NaN). Shared by gate_avx512.cpp and
// rows_avx512.cpp; included only from x86-64 builds of them.
#pragma once

// GCC 12.2's AVX-512 headers define _mm512_undefined_*() as self-initialised variables, which
// -Wall reports at every inlined conversion and masked load (false positives).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>

#define TB_AVX512_FLOAT __attribute__((target("avx512f,avx512bw,avx512vl")))
#define TB_AVX512_FLOAT_INLINE TB_AVX512_FLOAT inline __attribute__((always_inline))

namespace tbn {

TB_AVX512_FLOAT_INLINE __m512 bf16x16_to_float(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

TB_AVX512_FLOAT_INLINE __m256i float_to_bf16x16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

TB_AVX512_FLOAT_INLINE __m256i float_to_f16x16(__m512 f) {
  return _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

TB_AVX512_FLOAT_INLINE __m512 round_bf16(__m512 f) { return bf16x16_to_float(float_to_bf16x16(f)); }

TB_AVX512_FLOAT_INLINE __m512 round_f16(__m512 f) { return _mm512_cvtph_ps(float_to_f16x16(f)); }

}  // namespace tbn
