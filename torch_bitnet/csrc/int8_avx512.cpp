// AVX-512 VNNI kernel of the int8 per-row weights (lm_head). Per-function target attributes;
// cpu_features.cpp selects it only on CPUs with AVX-512 F/BW/VL/VNNI.
//
// VPDPBUSD multiplies 64 unsigned weight codes (w + 128) by 64 signed activations and adds
// each group of 4 products into one of 16 int32 lanes; acc = sum (w + 128) x - 128 sum x.
// Every intermediate is exact: |sum (w + 128) x| <= 255 * 128 * K < 2^31 for K <= 2^16.
#if defined(__x86_64__) || defined(_M_X64)

#include <algorithm>

#include "avx512_common.h"
#include "kernels.h"

// Loops over tile rows/tokens are unrolled with "#pragma GCC unroll" so the accumulator arrays
// live in registers (see kernels_avx512.cpp).

namespace tbn {
namespace {

// Software prefetch distance of the streaming tiles, bytes ahead of the tile start. (Measured
// at the 2B-4T lm_head, M = 1, 1 thread: 16 KiB streams at 85-90% of stream_max, 8 KiB ~78%,
// no prefetch ~72%; 32 KiB no better.)
constexpr int64_t kPrefetchAhead = 16384;

// The bits of y as p.out_dtype, one value per 32-bit lane (16-bit formats in the low half).
TB_AVX512_INLINE __m512i out_bits(const Int8Problem& p, __m512 y) {
  __m512i bits = _mm512_castps_si512(y);
  if (p.out_dtype == DType::BF16) {
    // float_to_bf16: round to nearest even on the bit pattern, NaN -> 0x7FC0
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
    bits = _mm512_mask_mov_epi32(bits, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  } else if (p.out_dtype == DType::F16) {
    // IEEE round to nearest even, as float_to_f16 (NaN payloads may differ; NaN stays NaN)
    bits = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return bits;
}

// Epilogue of an MR x NR tile (MR * NR <= 16): lane i = t * NR + r holds sum (w + 128) x of
// token m + t and row n + r. Evaluates store_int8_result's float32 expression for all lanes
// at once and stores the NR results of each of the MR tokens.
template <int MR, int NR>
TB_AVX512_INLINE void store_tile(const Int8Problem& p, int64_t m, int64_t n, __m512i sums) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  static_assert(16 % NR == 0, "NR divides 16 (and is a power of two)");
  constexpr int kShift = __builtin_ctz(NR);
  const __m512i t_idx = _mm512_srli_epi32(iota, kShift);                // token of each lane
  const __m512i r_idx = _mm512_and_si512(iota, _mm512_set1_epi32(NR - 1));  // row of each lane
  constexpr __mmask16 t_mask = __mmask16((1u << MR) - 1u), r_mask = __mmask16((1u << NR) - 1u);
  // Masked loads: never read past xsum[M - 1] or scale[N - 1]; unused lanes compute garbage
  // (0 / 0) that is never stored.
  const __m512i xsum = _mm512_permutexvar_epi32(t_idx, _mm512_maskz_loadu_epi32(t_mask, p.xsum + m));
  const __m512 a = _mm512_permutexvar_ps(t_idx, _mm512_maskz_loadu_ps(t_mask, p.a + m));
  const __m512 s = _mm512_permutexvar_ps(r_idx, _mm512_maskz_loadu_ps(r_mask, p.w_scale + n));
  const __m512i acc = _mm512_sub_epi32(sums, _mm512_slli_epi32(xsum, 7));
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_div_ps(s, a));
  if (p.bias) y = _mm512_add_ps(y, _mm512_permutexvar_ps(r_idx, _mm512_maskz_loadu_ps(r_mask, p.bias + n)));
  const __m512i bits = out_bits(p, y);
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t) {
    // lanes t*NR .. t*NR + NR - 1 -> lanes 0 .. NR - 1, stored at out[m + t, n ..]
    const __m512i row = t ? _mm512_permutexvar_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(t * NR)), bits) : bits;
    const int64_t at = (m + t) * p.ld + n;
    if (p.out_dtype == DType::F32)
      _mm512_mask_storeu_epi32(static_cast<float*>(p.out) + at, r_mask, row);
    else
      _mm512_mask_cvtepi32_storeu_epi16(static_cast<uint16_t*>(p.out) + at, r_mask, row);
  }
}

// MR tokens x NR weight rows, the whole K. Stream (the first token tile of a weight tile): the
// tile's rows are one contiguous range of NR * Kp bytes, read from DRAM as NR interleaved
// streams; each step also prefetches NR lines kPrefetchAhead bytes further on into L2, so DRAM
// latency is hidden and the weight is read at memory speed (as the ternary GEMV in
// kernels_avx512.cpp). Without Stream the rows were just read by the previous token tile and
// sit in L1.
template <int MR, int NR, bool Stream>
TB_AVX512 void tile(const Int8Problem& p, int64_t m, int64_t n) {
  static_assert(MR * NR <= 16, "one result vector holds the tile");
  __m512i acc[MR][NR];
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[t][r] = _mm512_setzero_si512();
  const uint8_t* w = p.w + n * p.k_pad;
  const int8_t* x = p.xq + m * p.ldq;
  const char* pf = reinterpret_cast<const char*>(w) + kPrefetchAhead;
  for (int64_t c = 0; c < p.k_pad; c += 64) {
    if constexpr (Stream) {
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) _mm_prefetch(pf + NR * c + 64 * r, _MM_HINT_T1);
    }
    __m512i wv[NR];
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_si512(w + r * p.k_pad + c);
    #pragma GCC unroll 16
    for (int t = 0; t < MR; ++t) {
      const __m512i xv = _mm512_loadu_si512(x + t * p.ldq + c);
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) acc[t][r] = dpbusd(acc[t][r], wv[r], xv);
    }
  }
  // An empty asm that "changes" every accumulator: without it GCC 12 lets the reduction's
  // operand pairing drive the register allocation of the loop above and copies all 16
  // accumulators between registers on every step (measured: prefill 1.5x slower).
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) __asm__("" : "+v"(acc[t][r]));
  __m512i sums[16];  // lane order t * NR + r, unused lanes zero
  #pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) sums[i] = i < MR * NR ? acc[i / NR][i % NR] : _mm512_setzero_si512();
  store_tile<MR, NR>(p, m, n, reduce16(sums));
}

constexpr int kMR = 4;
constexpr int kNR = 4;
using TileFn = void (*)(const Int8Problem&, int64_t, int64_t);
// Tiles by [streaming][tokens left (1 .. kMR) - 1]. The first token tile of a weight tile reads
// its kNR rows from DRAM and streams them (4 rows per thread: 8 or 16 in flight measured no
// faster, and slower with 1 thread); the chunk's later token tiles find them in L1.
constexpr TileFn kTiles[2][kMR] = {
    {tile<1, kNR, false>, tile<2, kNR, false>, tile<3, kNR, false>, tile<4, kNR, false>},
    {tile<1, kNR, true>, tile<2, kNR, true>, tile<3, kNR, true>, tile<4, kNR, true>},
};
// The last n1 - n < kNR rows of a range, one at a time.
constexpr TileFn kRowTail[kMR] = {tile<1, 1, false>, tile<2, 1, false>, tile<3, 1, false>, tile<4, 1, false>};

}  // namespace

// 16 rows x 64 codes at a time: the rows' dwords (4 consecutive k of one row) transposed, so
// vector j holds dword j of the 16 rows (rows past `rows` read as zero codes).
TB_AVX512 void unpack_int8_panel_avx512(const Int8Problem& p, int64_t n, int64_t rows, uint8_t* panel) {
  for (int64_t c = 0; c < p.k_pad; c += 64)
    for (int64_t v = 0; 16 * v < rows; ++v) {
      const int64_t real = std::min<int64_t>(16, rows - 16 * v);
      const uint8_t* w = p.w + (n + 16 * v) * p.k_pad + c;
      __m512i t[16];
      #pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) t[r] = r < real ? _mm512_loadu_si512(w + r * p.k_pad) : _mm512_setzero_si512();
      transpose16(t);
      uint8_t* dst = panel + (c / 4 * kPanelVecs + v) * 64;  // group q = c / 4 + j
      #pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) _mm512_store_si512(dst + j * kPanelVecs * 64, t[j]);
    }
}

// store_tile's expression, 16 rows of one token per vector.
TB_AVX512 void store_int8_rows_avx512(const Int8Problem& p, int64_t m, int64_t count, int64_t n,
                                      const int32_t* sum_ux, int64_t ld_sums, uint16_t keep) {
  const __mmask16 k = __mmask16(keep);
  const __m512 s = _mm512_maskz_loadu_ps(k, p.w_scale + n);
  const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(k, p.bias + n) : _mm512_setzero_ps();
  for (int64_t t = 0; t < count; ++t) {
    const __m512i acc = _mm512_sub_epi32(_mm512_loadu_si512(sum_ux + t * ld_sums), _mm512_set1_epi32(p.xsum[m + t] * 128));
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_div_ps(s, _mm512_set1_ps(p.a[m + t])));
    if (p.bias) y = _mm512_add_ps(y, bias);
    const int64_t at = (m + t) * p.ld + n;
    if (p.out_dtype == DType::F32)
      _mm512_mask_storeu_ps(static_cast<float*>(p.out) + at, k, y);
    else
      _mm512_mask_cvtepi32_storeu_epi16(static_cast<uint16_t*>(p.out) + at, k, out_bits(p, y));
  }
}

void int8_gemm_avx512(const Int8Problem& p, int64_t n0, int64_t n1) {
  // Token chunks whose activations (chunk x Kp bytes, <= 512 KiB) stay in L2 while kNR weight
  // rows at a time (kNR x Kp bytes, 10 KiB at K = 2560) stay in L1 and serve every token of the
  // chunk: the weight is read from DRAM once per chunk (once in all up to 204 tokens at
  // K = 2560), at memory speed. Decode (M <= 4) is the one-tile case of the same loop.
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
