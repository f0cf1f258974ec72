// Pieces shared by the AVX2 kernel files (kernels_avx2.cpp, int4_avx2.cpp, gate_avx2.cpp,
// rows_avx2.cpp): the target attributes, the dword transpose and 8 floats <-> 8 bf16 values with
// float_to_bf16's rounding. Included only from x86-64 builds of those files.
#pragma once

#include <immintrin.h>

#define TB_AVX2 __attribute__((target("avx2")))
#define TB_AVX2_INLINE TB_AVX2 inline __attribute__((always_inline))

namespace tbn {

// 8 vectors of 8 dwords -> their transpose: out[j] lane r = in[r] lane j.
TB_AVX2_INLINE void transpose8(__m256i (&v)[8]) {
  __m256i t[8];
  // t[2i], t[2i+1] per 128-bit lane L: rows 2i, 2i+1 at dwords 4L, 4L+1 / 4L+2, 4L+3
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  // v[4g + c] per 128-bit lane L: rows 4g .. 4g + 3 at dword 4L + c
  #pragma GCC unroll 2
  for (int g = 0; g < 2; ++g) {
    v[4 * g + 0] = _mm256_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    v[4 * g + 1] = _mm256_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    v[4 * g + 2] = _mm256_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    v[4 * g + 3] = _mm256_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  // out[c] = rows 0-3 | rows 4-7 at dword c (low lanes), out[4 + c] at dword 4 + c (high lanes)
  #pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm256_permute2x128_si256(v[c], v[4 + c], 0x20);
    t[4 + c] = _mm256_permute2x128_si256(v[c], v[4 + c], 0x31);
  }
  #pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) v[j] = t[j];
}

// 8 bf16 values -> floats (exact).
TB_AVX2_INLINE __m256 bf16x8_to_float(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 8 floats -> bf16 values, lane by lane as float_to_bf16: round to nearest even on the bits,
// NaN -> 0x7FC0.
TB_AVX2_INLINE __m128i float_to_bf16x8(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // r holds 8 values < 2^16 in 32-bit lanes: pack them (unsigned saturation never triggers).
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

}  // namespace tbn
