// AVX2 kernel of the int4 group weights (lm_head), for x86-64 CPUs without AVX-512 VNNI.
// Per-function target attributes, selected at run time by cpu_features.cpp.
//
// The layout of int4_avx512.cpp's header, half a line at a time: bytes 32h .. 32h+31 of a line
// are rows 8h .. 8h+7, and dword lane r of lo = half & 0x0F (hi = (half >> 4) & 0x0F) holds row
// 8h + r's codes of k0 .. k0+3 (k0+4 .. k0+7). VPMADDUBSW of the codes (u8, <= 15) with the 4
// activations broadcast (s8) gives pairs of at most 2 * 15 * 128 = 3840 in magnitude (never
// saturated), a group's 8 of them add up in int16 (<= 30720), and VPMADDWD widens the sum to
// row r's group dot product in lane r. As on AVX-512, the float32 sum over groups is lane-wise
// in group order.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "avx2_common.h"
#include "kernels.h"

// Loops over tokens are unrolled with "#pragma GCC unroll" so the accumulator arrays live in
// registers (see kernels_avx512.cpp).

namespace tbn {
namespace {

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}


// Software prefetch distance of a tile's first pass, as in int8_avx2.cpp. Left to the hardware
// prefetcher, that pass streamed 47-55% of a plain read on an AVX2-only Zen 3 (no faster than
// the int8 table, which has twice the bytes).
constexpr int64_t kPrefetchAhead = 16384;

// The bf16 scales of groups g .. g + 15 (fewer at the end of K) of 8 rows (row r at scales +
// r * groups; rows >= rows absent, read as 0), as in int4_avx512.cpp: loaded row by row as bf16
// pairs and transposed, so pairs[j] holds in lane r row r's scales of groups g + 2j (low half)
// and g + 2j + 1 (high half).
TB_AVX2_INLINE void load_scale_pairs(const uint16_t* scales, int64_t groups, int64_t g, int rows,
                                     __m256i (&pairs)[8]) {
  const int64_t cols = std::min<int64_t>(8, (groups - g) / 2);
  const __m256i col_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(cols)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  #pragma GCC unroll 8
  for (int r = 0; r < 8; ++r)
    pairs[r] = r < rows ? _mm256_maskload_epi32(reinterpret_cast<const int*>(scales + r * groups + g), col_mask)
                        : _mm256_setzero_si256();
  transpose8(pairs);
}

// MR tokens (m ..) x rows 8h .. 8h + rows - 1 of tile t, the whole K. The tile's first pass
// (token tile 0, half 0: stream) reads it from DRAM as one sequential stream, each line
// prefetched kPrefetchAhead bytes ahead into L2; the second half and later token tiles find it
// in L1 / L2.
template <int MR>
TB_AVX2 void half_tile(const Int4Problem& p, int64_t m, int64_t t, int h, int rows, bool stream) {
  const int64_t groups = p.k_pad / kInt4Group;
  const uint8_t* w = p.w + t * (kInt4Tile * p.k_pad / 2) + 32 * h;  // half h of each line
  const uint16_t* scales = p.w_scale + (t * kInt4Tile + 8 * h) * groups;  // row 16 t + 8 h's, ...
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 s[MR];
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) s[i] = _mm256_setzero_ps();
  alignas(32) __m256i pairs[8];  // see load_scale_pairs
  for (int64_t g = 0; g < groups; g += 2) {
    const int64_t j = (g / 2) % 8;
    if (j == 0) load_scale_pairs(scales, groups, g, rows, pairs);
    const __m256i pair = pairs[j];
    const __m256 group_scale[2] = {_mm256_castsi256_ps(_mm256_slli_epi32(pair, 16)),
                                   _mm256_castsi256_ps(_mm256_and_si256(pair, _mm256_set1_epi32(int(0xFFFF0000u))))};
    #pragma GCC unroll 2
    for (int gh = 0; gh < 2; ++gh) {
      // acc[i]: 16 int16 lanes, lanes 2r and 2r + 1 row r's partial sums of u x over the group
      // (8 VPMADDUBSW pairs of at most 3840 each: |sum| <= 30720, no saturation)
      __m256i acc[MR];
      #pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const int64_t line = 4 * (g + gh) + c;
        if (stream) _mm_prefetch(reinterpret_cast<const char*>(w + 64 * line) + kPrefetchAhead, _MM_HINT_T1);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * line));
        const __m256i lo = _mm256_and_si256(v, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        #pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
          const int8_t* x = p.xq + (m + i) * p.ldq + 8 * line;
          acc[i] = _mm256_add_epi16(acc[i], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(x))));
          acc[i] = _mm256_add_epi16(acc[i], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(x + 4))));
        }
      }
      #pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(acc[i], ones),
                                           _mm256_set1_epi32(p.offset[(m + i) * groups + g + gh]));
        s[i] = _mm256_add_ps(s[i], _mm256_mul_ps(_mm256_cvtepi32_ps(d), group_scale[gh]));
      }
    }
  }
  const int64_t n = t * kInt4Tile + 8 * h;
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float lanes[8];
    _mm256_storeu_ps(lanes, s[i]);
    for (int r = 0; r < rows; ++r) store_int4_result(p, m + i, n + r, lanes[r]);
  }
}

// One token (M = 1) against a whole 16-row tile in one pass: per 64-byte line both halves
// (rows 0..7 and 8..15) take the same two broadcast activation dwords, so a line costs 2
// loads, 6 nibble ops, 4 VPMADDUBSW and 4 int16 adds, and each line is read once. half_tile's
// two passes of 8 rows, each broadcasting the activations again, streamed 55-57% of a plain
// read at M = 1 on an AVX2-only Zen 3, barely faster than the int8 table with twice the bytes;
// one pass made it 69-71%, with the scale prefetch below 90-91%. The float sequence per row is
// half_tile's (and the reference's): s += float(d_g) * scale_g in group order.
TB_AVX2 void gemv_tile(const Int4Problem& p, int64_t t, int rows) {
  const int64_t groups = p.k_pad / kInt4Group;
  const uint8_t* w = p.w + t * (kInt4Tile * p.k_pad / 2);
  const uint16_t* scales = p.w_scale + t * kInt4Tile * groups;
  const int8_t* x = p.xq;
  const int32_t* offset = p.offset;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i high16 = _mm256_set1_epi32(int(0xFFFF0000u));
  __m256 s[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // rows 0..7, 8..15
  // pairs[h]: load_scale_pairs of rows 8 h .. 8 h + 7
  alignas(32) __m256i pairs[2][8];
  for (int64_t g = 0; g < groups; g += 2) {
    const int64_t j = (g / 2) % 8;
    if (j == 0) {
      load_scale_pairs(scales, groups, g, rows, pairs[0]);
      load_scale_pairs(scales + 8 * groups, groups, g, rows - 8, pairs[1]);
    }
    // The next tile's scales (kInt4Tile * groups bf16 = one 64-byte line per pair of groups),
    // a second stream the hardware prefetcher left behind: 22.2 -> 17.3 ms per 2B-4T lm_head
    // at 1 thread, 11.8 -> 9.1 at 2, on the Zen 3.
    _mm_prefetch(reinterpret_cast<const char*>(scales + kInt4Tile * groups) + 32 * g, _MM_HINT_T0);
    #pragma GCC unroll 2
    for (int gh = 0; gh < 2; ++gh) {
      __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};  // int16, see half_tile
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const int64_t line = 4 * (g + gh) + c;
        const uint8_t* l = w + 64 * line;
        _mm_prefetch(reinterpret_cast<const char*>(l) + kPrefetchAhead, _MM_HINT_T1);
        const __m256i x0 = _mm256_set1_epi32(load_i32(x + 8 * line)), x1 = _mm256_set1_epi32(load_i32(x + 8 * line + 4));
        #pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(l + 32 * h));
          acc[h] = _mm256_add_epi16(acc[h], _mm256_maddubs_epi16(_mm256_and_si256(v, low4), x0));
          acc[h] = _mm256_add_epi16(acc[h], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), x1));
        }
      }
      const __m256i off = _mm256_set1_epi32(offset[g + gh]);
      #pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i pair = pairs[h][j];
        const __m256 scale = _mm256_castsi256_ps(gh == 0 ? _mm256_slli_epi32(pair, 16) : _mm256_and_si256(pair, high16));
        const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(acc[h], ones), off);
        s[h] = _mm256_add_ps(s[h], _mm256_mul_ps(_mm256_cvtepi32_ps(d), scale));
      }
    }
  }
  const int64_t n = t * kInt4Tile;
  alignas(32) float lanes[16];
  _mm256_store_ps(lanes, s[0]);
  _mm256_store_ps(lanes + 8, s[1]);
  for (int r = 0; r < rows; ++r) store_int4_result(p, 0, n + r, lanes[r]);
}

constexpr int kMR = 4;
using HalfFn = void (*)(const Int4Problem&, int64_t, int64_t, int, int, bool);
// 16 ymm registers: 4 accumulators, 4 sums, the two nibble planes, the line and two constants.
// By tokens left (1 .. kMR) - 1.
constexpr HalfFn kHalves[kMR] = {half_tile<1>, half_tile<2>, half_tile<3>, half_tile<4>};

}  // namespace

void int4_gemm_avx2(const Int4Problem& p, int64_t n0, int64_t n1) {
  if (p.m == 1) {
    for (int64_t n = n0; n < n1; n += kInt4Tile)
      gemv_tile(p, n / kInt4Tile, int(std::min<int64_t>(kInt4Tile, n1 - n)));
    return;
  }
  // As in int4_avx512.cpp: token chunks in L2, one tile in L1, streamed from DRAM by the first
  // pass over it.
  const int64_t chunk = std::max<int64_t>(kMR, (int64_t(512) << 10) / p.k_pad / kMR * kMR);
  for (int64_t m0 = 0; m0 < p.m; m0 += chunk) {
    const int64_t m1 = std::min(p.m, m0 + chunk);
    for (int64_t n = n0; n < n1; n += kInt4Tile)
      for (int h = 0; h < 2; ++h) {
        const int rows = int(std::min<int64_t>(8, n1 - n - 8 * h));
        if (rows <= 0) break;
        for (int64_t m = m0; m < m1; m += kMR)
          kHalves[std::min<int64_t>(kMR, m1 - m) - 1](p, m, n / kInt4Tile, h, rows, h == 0 && m == m0);
      }
  }
}

}  // namespace tbn

#endif  // x86-64
