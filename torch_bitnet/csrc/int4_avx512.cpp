// AVX-512 VNNI kernel of the int4 group weights (lm_head). Per-function target attributes;
// cpu_features.cpp selects it only on CPUs with AVX-512 F/BW/VL/VNNI.
//
// A 64-byte line of codes is 16 rows x 8 weights (torch_bitnet/int4.py): lo = line & 0x0F holds
// in dword lane r row r's codes of k0 .. k0+3, hi = (line >> 4) & 0x0F those of k0+4 .. k0+7.
// VPDPBUSD of lo with the 4 activations x[k0 .. k0+3] broadcast to every lane adds row r's 4
// products u * x into lane r. A group's 4 lines leave its 16 rows' exact int32 dot products in
// the 16 lanes (no horizontal sums), and the float32 sum over groups runs lane by lane in group
// order: the scalar kernel's sequence of operations, so the results are bit-identical.
#if defined(__x86_64__) || defined(_M_X64)

#include <algorithm>
#include <cstring>

#include "avx512_common.h"
#include "kernels.h"

// Loops over tokens / accumulators are unrolled with "#pragma GCC unroll" so the accumulator
// arrays live in registers (see kernels_avx512.cpp).

namespace tbn {
namespace {

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Store the 16 results y of one token (rows n .. n+15, lanes outside `rows` masked) at out[at].
// The conversions are int8_avx512.cpp's: bit-identical to store_float.
TB_AVX512_INLINE void store16(const Int4Problem& p, int64_t at, __mmask16 rows, __m512 y) {
  if (p.out_dtype == DType::F32) {
    _mm512_mask_storeu_ps(static_cast<float*>(p.out) + at, rows, y);
    return;
  }
  __m512i bits = _mm512_castps_si512(y);
  if (p.out_dtype == DType::BF16) {
    // float_to_bf16: round to nearest even on the bit pattern, NaN -> 0x7FC0
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
    bits = _mm512_mask_mov_epi32(bits, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  } else {
    // IEEE round to nearest even, as float_to_f16 (NaN payloads may differ; NaN stays NaN)
    bits = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  _mm512_mask_cvtepi32_storeu_epi16(static_cast<uint16_t*>(p.out) + at, rows, bits);
}


// Bytes ahead of the line being read that kPrefetch tiles prefetch into L2 (measured on the
// Xeon, see int4_gemm_avx512_prefetch: 4-8 KiB into L2 best, 1-2 KiB into L1 less).
constexpr int64_t kInt4Prefetch = 4096;

// MR tokens (m ..) x the 16 rows of tile t, the whole K; `rows` masks the rows that exist.
// A tile is one contiguous run of 16 x Kp / 2 bytes (and its scales one of 16 x Kp / 16), read
// front to back: a sequential stream. On the Zen 4 the hardware prefetcher follows it at memory
// speed, and software prefetch (as in int8_avx512.cpp, 1-16 KiB ahead) made a decode step
// 10-60% slower; on the Xeon (AMX path) a prefetch kInt4Prefetch ahead of every line is 1.11-1.33x
// faster (kPrefetch). The chunk's later token tiles find the tile in L1.
template <int MR, bool kPrefetch>
TB_AVX512 void tile(const Int4Problem& p, int64_t m, int64_t t, __mmask16 rows) {
  // Independent accumulators per token, so back-to-back VPDPBUSDs do not wait for each other
  // (latency ~5 cycles): 4 for one token, 2 for 2-3, 1 from 4 tokens on (they are the chains).
  // Measured on Zen (512-bit ops in two halves): the one-token loop is then bound by the vector
  // pipes, ~4 cycles per line for 2 VPDPBUSD, 3 unpack ops and 2 broadcasts: ~55 GB/s from
  // L1, above what one core reads from DRAM.
  constexpr int kAcc = MR == 1 ? 4 : MR <= 3 ? 2 : 1;
  const int64_t groups = p.k_pad / kInt4Group;
  const uint8_t* w = p.w + t * (kInt4Tile * p.k_pad / 2);
  const uint16_t* scales = p.w_scale + t * kInt4Tile * groups;  // row 16 t's, then 16 t + 1's ...
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 s[MR];
  #pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) s[i] = _mm512_setzero_ps();
  // The scales of up to 32 groups (16 dwords: bf16 pairs, g even and a row holds an even number
  // of scales) of the 16 rows: loaded row by row, transposed so pairs[j] holds in lane r row r's
  // scales of groups g0 + 2j (low half) and g0 + 2j + 1 (high half). Absent rows read nothing.
  alignas(64) __m512i pairs[16];
  for (int64_t g = 0; g < groups; g += 2) {
    const int64_t j = (g / 2) % 16;
    if (j == 0) {
      const __mmask16 cols = __mmask16((1u << std::min<int64_t>(16, (groups - g) / 2)) - 1u);
      #pragma GCC unroll 16
      for (int r = 0; r < 16; ++r)
        pairs[r] = _mm512_maskz_loadu_epi32((rows >> r) & 1 ? cols : 0, scales + r * groups + g);
      transpose16(pairs);
    }
    const __m512i pair = pairs[j];
    const __m512 group_scale[2] = {_mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)),
                                   _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(int(0xFFFF0000u))))};
    #pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m512i acc[MR][kAcc];
      #pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        acc[i][0] = _mm512_set1_epi32(p.offset[(m + i) * groups + g + h]);
        #pragma GCC unroll 4
        for (int j = 1; j < kAcc; ++j) acc[i][j] = _mm512_setzero_si512();
      }
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {  // the group's 4 lines
        const int64_t line = 4 * (g + h) + c;
        if (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(w + 64 * line) + kInt4Prefetch, _MM_HINT_T1);
        const __m512i v = _mm512_loadu_si512(w + 64 * line);
        const __m512i lo = _mm512_and_si512(v, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        #pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
          const int8_t* x = p.xq + (m + i) * p.ldq + 8 * line;
          const int a0 = (2 * c) % kAcc, a1 = (2 * c + 1) % kAcc;
          acc[i][a0] = dpbusd(acc[i][a0], lo, _mm512_set1_epi32(load_i32(x)));
          acc[i][a1] = dpbusd(acc[i][a1], hi, _mm512_set1_epi32(load_i32(x + 4)));
        }
      }
      #pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        __m512i d = acc[i][0];
        #pragma GCC unroll 4
        for (int j = 1; j < kAcc; ++j) d = _mm512_add_epi32(d, acc[i][j]);
        s[i] = _mm512_add_ps(s[i], _mm512_mul_ps(_mm512_cvtepi32_ps(d), group_scale[h]));
      }
    }
  }
  const int64_t n = t * kInt4Tile;
  const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(rows, p.bias + n) : _mm512_setzero_ps();
  #pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    __m512 y = _mm512_div_ps(s[i], _mm512_set1_ps(p.a[m + i]));
    if (p.bias) y = _mm512_add_ps(y, bias);
    store16(p, (m + i) * p.ld + n, rows, y);
  }
}

constexpr int kMR = 8;
using TileFn = void (*)(const Int4Problem&, int64_t, int64_t, __mmask16);
// Tiles by tokens left (1 .. kMR) - 1.
template <bool kPrefetch>
constexpr TileFn kTiles[kMR] = {tile<1, kPrefetch>, tile<2, kPrefetch>, tile<3, kPrefetch>, tile<4, kPrefetch>,
                                tile<5, kPrefetch>, tile<6, kPrefetch>, tile<7, kPrefetch>, tile<8, kPrefetch>};

template <bool kPrefetch>
void gemm_tiles(const Int4Problem& p, int64_t n0, int64_t n1) {
  // Token chunks whose activations (chunk x Kp bytes, <= 512 KiB) stay in L2 while one tile of
  // 16 rows (8 x Kp bytes, 20 KiB at K = 2560) stays in L1 and serves every token of the chunk:
  // the table is read from DRAM once per chunk, at memory speed. Decode (M = 1) is the one-tile
  // case of the same loop.
  const int64_t chunk = std::max<int64_t>(kMR, (int64_t(512) << 10) / p.k_pad / kMR * kMR);
  for (int64_t m0 = 0; m0 < p.m; m0 += chunk) {
    const int64_t m1 = std::min(p.m, m0 + chunk);
    for (int64_t n = n0; n < n1; n += kInt4Tile) {
      const __mmask16 rows = n1 - n >= kInt4Tile ? __mmask16(0xFFFF) : __mmask16((1u << (n1 - n)) - 1u);
      for (int64_t m = m0; m < m1; m += kMR)
        kTiles<kPrefetch>[std::min<int64_t>(kMR, m1 - m) - 1](p, m, n / kInt4Tile, rows);
    }
  }
}

}  // namespace

void int4_gemm_avx512(const Int4Problem& p, int64_t n0, int64_t n1) { gemm_tiles<false>(p, n0, n1); }

// The AMX path's (Intel server cores): the 2B-4T int4 table's one-token product in 2 MiB pages
// took 6.19 against 8.25 ms (2 threads) and 13.06 against 14.47 (1 thread) with the prefetch,
// and a whole int4-table decode step 30.80 against 31.42 ms with it against a 1 KiB one into
// L1 (BENCHMARKS.md).
void int4_gemm_avx512_prefetch(const Int4Problem& p, int64_t n0, int64_t n1) { gemm_tiles<true>(p, n0, n1); }

}  // namespace tbn

#endif  // x86-64
