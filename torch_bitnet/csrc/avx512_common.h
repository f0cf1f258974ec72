// Pieces shared by the AVX-512 VNNI kernel files (kernels_avx512.cpp, int8_avx512.cpp,
// int4_avx512.cpp, ternary5_avx512.cpp, attention_avx512.cpp): the target attributes, the dword
// transpose, the transposing reduction and the code planes' sum.
// Included only from x86-64 builds of those files.
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
// The same plus VBMI (byte permutes): the 5-trit and 3-trit weights' kernels.
#define TB_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))
#define TB_VBMI_INLINE TB_VBMI inline __attribute__((always_inline))

namespace tbn {

// acc + VPDPBUSD(u, x): u unsigned, x signed bytes, 4 products per dword lane.
// The kernels call this instead of _mm512_dpbusd_epi32. Reason: GCC 12 compiles
// _mm512_dpbusd_epi32 on arrays of accumulators into a register copy, the update and a copy
// back, plus a stack store per update in the 4-row decode tiles. The asm ties the accumulator
// to one register and updates it in place, as the instruction does. Measured on one core with
// an L2-resident weight (benchmarks/bench_trit5.py, "hot"): 2-bit decode 95-100 -> 111-114 G
// weights/s, 5-trit 77-80 -> 83-84; prefill and the lm_head GEMVs unchanged. GCC and Clang
// accept this syntax (AT&T operand order: x, u, acc).
TB_AVX512_INLINE __m512i dpbusd(__m512i acc, __m512i u, __m512i x) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "vm"(x));
  return acc;
}

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

// 16 vectors of 16 dwords -> their transpose: out[j] lane r = in[r] lane j.
TB_AVX512_INLINE void transpose16(__m512i (&v)[16]) {
  __m512i t[16];
  // t[2i], t[2i+1] per 128-bit lane L: rows 2i, 2i+1 at dwords 4L, 4L+1 / 4L+2, 4L+3
  #pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  // v[4g + c] per 128-bit lane L: rows 4g .. 4g + 3 at dword 4L + c
  #pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    v[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    v[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    v[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    v[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  // 4 x 4 transpose of 128-bit lanes among v[c], v[4 + c], v[8 + c], v[12 + c]
  #pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512i a0 = _mm512_shuffle_i32x4(v[c], v[4 + c], 0x44), a1 = _mm512_shuffle_i32x4(v[c], v[4 + c], 0xEE);
    const __m512i a2 = _mm512_shuffle_i32x4(v[8 + c], v[12 + c], 0x44);
    const __m512i a3 = _mm512_shuffle_i32x4(v[8 + c], v[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(a0, a2, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(a0, a2, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(a1, a3, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(a1, a3, 0xDD);
  }
  #pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) v[j] = t[j];
}

// One row's sum_k u*x from the accumulators of the 2-bit format's four code planes, each
// isolated with an AND and no shift (plane i holds u * 4^i): every lane of plane i's
// accumulator is a sum of multiples of 4^i, so an arithmetic >> 2i scales it back exactly,
// lane by lane, and the four planes need one horizontal sum instead of four (fewer
// instructions; no measurable speed change, the multiply-adds dominate). Used by the 2-bit
// and 5-trit decode GEMVs.
TB_AVX512_INLINE int32_t plane_sum(const __m512i (&acc)[4]) {
  const __m512i lo = _mm512_add_epi32(acc[0], _mm512_srai_epi32(acc[1], 2));
  const __m512i hi = _mm512_add_epi32(_mm512_srai_epi32(acc[2], 4), _mm512_srai_epi32(acc[3], 6));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(lo, hi));
}

}  // namespace tbn
