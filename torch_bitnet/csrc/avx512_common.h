// Pieces shared by the AVX-512 VNNI kernel files (kernels_avx512.cpp, int8_avx512.cpp): the
// target attributes and helpers both use. Included only from x86-64 builds of those files.
#pragma once

// GCC 12.2's AVX-512 headers define _mm512_undefined_epi32() as a self-initialised variable,
// which -Wall reports at every inlined unpack / shuffle / permute (false positives).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>

#define TB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define TB_AVX512_INLINE TB_AVX512 inline __attribute__((always_inline))

namespace tbn {

// 16 vectors -> one: lane i = sum of the 16 lanes of v[i] (a transposing reduction tree:
// 15 adds and 30 shuffles for 16 sums instead of 16 separate horizontal reductions).
TB_AVX512_INLINE __m512i reduce16(const __m512i (&v)[16]) {
  __m512i a[8], b[4], c[2];
  // a[i], per 128-bit lane: [v2i.0 + v2i.2, v2i+1.0 + v2i+1.2, v2i.1 + v2i.3, v2i+1.1 + v2i+1.3]
  #pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                            _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  // b[i], per 128-bit lane: the lane's sums of v4i .. v4i+3
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * i], a[2 * i + 1]),
                            _mm512_unpackhi_epi64(a[2 * i], a[2 * i + 1]));
  // c[i] = [b2i lanes 0+1, b2i lanes 2+3, b2i+1 lanes 0+1, b2i+1 lanes 2+3]
  #pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0x88),
                            _mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
}

}  // namespace tbn
