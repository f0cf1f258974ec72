// AVX2 kernel of the int8 per-row weights (lm_head), for x86-64 CPUs without AVX-512 VNNI.
// Per-function target attributes, selected at run time by cpu_features.cpp.
//
// VPMADDUBSW (u8 x s8, pairs summed into saturating int16) cannot take the codes w + 128 as
// they are: 255 * -128 * 2 saturates. So this path moves the activations' signs onto the
// signed weights instead: |x| (0 .. 128, as u8) times w * sign(x) (-127 .. 127, as s8; w is
// never -128, so the negation fits). A pair is then at most 2 * 128 * 127 = 32512 in
// magnitude, never saturates, and VPMADDWD widens it to int32 at once: acc = sum w x exactly.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <algorithm>

#include "kernels.h"

#define TB_AVX2 __attribute__((target("avx2")))
#define TB_AVX2_INLINE TB_AVX2 inline __attribute__((always_inline))
// Loops over tile rows/tokens are unrolled with "#pragma GCC unroll" so the accumulator arrays
// live in registers (see kernels_avx512.cpp).

namespace tbn {
namespace {

// Software prefetch distance of the streaming (decode) tiles, as in int8_avx512.cpp (measured
// here too: 16 KiB ahead ~75% of stream_max with 1 thread, 8 KiB ~65%).
constexpr int64_t kPrefetchAhead = 16384;

TB_AVX2_INLINE int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// MR tokens x NR weight rows, the whole K (32 bytes per step, two steps per 64-byte line).
// Stream (first token tile of a weight tile): prefetch NR lines per 64 bytes kPrefetchAhead
// bytes ahead into L2, see int8_avx512.cpp.
template <int MR, int NR, bool Stream>
TB_AVX2 void tile(const Int8Problem& p, int64_t m, int64_t n) {
  const __m256i flip = _mm256_set1_epi8(char(0x80)), ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NR];
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[t][r] = _mm256_setzero_si256();
  const uint8_t* w = p.w + n * p.k_pad;
  const int8_t* x = p.xq + m * p.ldq;
  const char* pf = reinterpret_cast<const char*>(w) + kPrefetchAhead;
  for (int64_t c = 0; c < p.k_pad; c += 64) {
    if constexpr (Stream) {
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) _mm_prefetch(pf + NR * c + 64 * r, _MM_HINT_T1);
    }
    #pragma GCC unroll 2
    for (int h = 0; h < 64; h += 32) {
      __m256i wv[NR];  // signed weights w = code ^ 0x80
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r)
        wv[r] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * p.k_pad + c + h)), flip);
      #pragma GCC unroll 16
      for (int t = 0; t < MR; ++t) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * p.ldq + c + h));
        const __m256i ax = _mm256_abs_epi8(xv);
        #pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) {
          const __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[r], xv));
          acc[t][r] = _mm256_add_epi32(acc[t][r], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
  }
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) store_int8_result(p, m + t, n + r, hsum_epi32(acc[t][r]));
}

using TileFn = void (*)(const Int8Problem&, int64_t, int64_t);

constexpr int kMR = 2;
constexpr int kNR = 4;
// 16 ymm registers: 2 x 4 accumulators, 4 weight vectors, |x|, x and two constants.
// [streaming][tokens left - 1], as in int8_avx512.cpp.
constexpr TileFn kTiles[2][kMR] = {
    {tile<1, kNR, false>, tile<2, kNR, false>},
    {tile<1, kNR, true>, tile<2, kNR, true>},
};
constexpr TileFn kRowTail[kMR] = {tile<1, 1, false>, tile<2, 1, false>};

}  // namespace

void int8_gemm_avx2(const Int8Problem& p, int64_t n0, int64_t n1) {
  // As in int8_avx512.cpp: token chunks in L2, kNR weight rows in L1, each weight tile streamed
  // from DRAM by the chunk's first token tile.
  const int64_t chunk = std::max<int64_t>(kMR, (int64_t(512) << 10) / p.k_pad / kMR * kMR);
  for (int64_t m0 = 0; m0 < p.m; m0 += chunk) {
    const int64_t m1 = std::min(p.m, m0 + chunk);
    int64_t n = n0;
    for (; n + kNR <= n1; n += kNR)
      for (int64_t m = m0; m < m1; m += kMR) kTiles[m == m0][std::min<int64_t>(kMR, m1 - m) - 1](p, m, n);
    for (; n < n1; ++n)
      for (int64_t m = m0; m < m1; m += kMR) kRowTail[std::min<int64_t>(kMR, m1 - m) - 1](p, m, n);
  }
}

}  // namespace tbn

#endif  // x86-64
