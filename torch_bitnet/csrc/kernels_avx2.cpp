// AVX2 kernels (x86-64 CPUs without AVX-512). Per-function target attributes, selected at
// run time by cpu_features.cpp.
//
// The multiply-add is VPMADDUBSW (u8 x s8 -> pairs summed into saturating int16). With codes
// u <= 2 and |x| <= 128 one pair is at most 512 in magnitude, and the 8 pairs summed per
// 256-weight block at most 4096, so int16 cannot saturate before the block's VPMADDWD widens
// the sums to int32.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <utility>

#include "avx2_common.h"
#include "kernels.h"

// Loops over tile rows/tokens are unrolled early ("#pragma GCC unroll") so the accumulator
// arrays live in registers (see kernels_avx512.cpp).

namespace tbn {
namespace {

TB_AVX2 float quantize_row_avx2(const float* x, int64_t k, int64_t k_pad, int8_t* xq, int32_t* xsum) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps();
  __m256 vnan = _mm256_setzero_ps();
  const int64_t k8 = k & ~int64_t(7);
  for (int64_t i = 0; i < k8; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, absmask));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.f;
  for (int j = 0; j < 8; ++j) amax = std::max(amax, lanes[j]);
  bool nan = _mm256_movemask_ps(vnan) != 0;
  for (int64_t i = k8; i < k; ++i) {
    const float v = std::fabs(x[i]);
    nan |= v != v;
    amax = v > amax ? v : amax;
  }
  if (nan || amax == std::numeric_limits<float>::infinity()) {
    std::memset(xq, 0, size_t(k_pad));
    *xsum = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float a = act_scale_from_amax(amax);
  const __m256 va = _mm256_set1_ps(a);
  const __m256i lo = _mm256_set1_epi32(-128), hi = _mm256_set1_epi32(127);
  // packs_epi32 / packs_epi16 interleave 128-bit lanes; this restores element order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i vsum = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    __m256i q[4];
    #pragma GCC unroll 16
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), va);
      q[j] = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      q[j] = _mm256_min_epi32(_mm256_max_epi32(q[j], lo), hi);
      vsum = _mm256_add_epi32(vsum, q[j]);
    }
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + i), _mm256_permutevar8x32_epi32(b, order));
  }
  alignas(32) int32_t sums[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums), vsum);
  int32_t s = 0;
  for (int j = 0; j < 8; ++j) s += sums[j];
  for (; i < k; ++i) {
    float r = std::nearbyint(x[i] * a);
    r = std::min(std::max(r, -128.f), 127.f);
    xq[i] = int8_t(r);
    s += xq[i];
  }
  std::memset(xq + k, 0, size_t(k_pad - k));
  *xsum = s;
  return a;
}

TB_AVX2_INLINE int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Codes of plane I from 32 packed bytes.
template <int I>
TB_AVX2_INLINE __m256i plane(__m256i wv) {
  return _mm256_and_si256(_mm256_srli_epi16(wv, 2 * I), _mm256_set1_epi8(3));
}

// Half H (bytes 32H..32H+31) of one 64-byte block, all 4 planes, for an MR x NR tile;
// products summed into int16 partials.
template <int H, int MR, int NR>
TB_AVX2_INLINE void block_half(__m256i (&part)[MR][NR], const uint8_t* wb, int64_t ldw, const int8_t* xb,
                               int64_t ldq) {
  __m256i wv[NR];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * ldw + 32 * H));
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t) {
    const int8_t* xt = xb + t * ldq + 32 * H;
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt + 64));
    const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt + 128));
    const __m256i x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt + 192));
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(plane<0>(wv[r]), x0), _mm256_maddubs_epi16(plane<1>(wv[r]), x1));
      s = _mm256_add_epi16(s, _mm256_maddubs_epi16(plane<2>(wv[r]), x2));
      s = _mm256_add_epi16(s, _mm256_maddubs_epi16(plane<3>(wv[r]), x3));
      part[t][r] = _mm256_add_epi16(part[t][r], s);
    }
  }
}

// MR tokens x NR output rows (M < kChunkMinM).
template <int MR, int NR>
TB_AVX2 void gemm_tile(const GemmProblem& p, int64_t m, int64_t n) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NR];
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[t][r] = _mm256_setzero_si256();
  const uint8_t* w = p.w + n * p.ldw;
  const int8_t* x = p.xq + m * p.ldq;
  const int64_t nblk = p.k_pad / 256;
  for (int64_t b = 0; b < nblk; ++b) {
    __m256i part[MR][NR];
    #pragma GCC unroll 16
    for (int t = 0; t < MR; ++t)
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) part[t][r] = _mm256_setzero_si256();
    block_half<0>(part, w + 64 * b, p.ldw, x + 256 * b, p.ldq);
    block_half<1>(part, w + 64 * b, p.ldw, x + 256 * b, p.ldq);
    #pragma GCC unroll 16
    for (int t = 0; t < MR; ++t)
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) acc[t][r] = _mm256_add_epi32(acc[t][r], _mm256_madd_epi16(part[t][r], ones));
  }
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) store_result(p, m + t, n + r, hsum_epi32(acc[t][r]));
}

// Decode kernel (M = 1): one token against NR output rows. Per 32 packed bytes of a row it
// needs one shift instead of block_half's three: planes 0 and 2 are masked in place from the
// bytes (codes, and codes * 16), planes 1 and 3 the same way after one 2-bit shift, and the
// two products of the * 16 planes are shifted back once, together. Bounds: a VPMADDUBSW pair
// of the * 16 codes (0, 16, 32) is at most 2 * 32 * 128 = 8192 in magnitude, so the two such
// products add up to at most 16384 without saturating, and their sum is a multiple of 16, so
// the arithmetic shift by 4 is exact. The row then adds the same at most 4096 per 64-byte block
// to its int16 sums as block_half does, so kWiden = 4 blocks (16384) pass before one VPMADDWD
// widens them to int32. The activation vectors are loaded again for every row (memory operands
// of VPMADDUBSW, from L1) rather than held in registers across rows, which left the compiler
// spilling the sums of 4-row tiles. NR lines per block are prefetched kGemvPrefetch bytes
// ahead into L2.
//
// Measured on an AVX2-only Zen 3 (all 210 ternary weights of a 2B-4T, one token, old and new
// kernels alternating in one process, 30-60 rounds): the one-shift extraction 5-9% faster than
// block_half's at 1 thread, prefetching 4 KiB ahead instead of 8 KiB another 3-7% (16 KiB
// lost 10%, 2-3 KiB 3-10%), 2 rows per tile within +-4% of 1 and 4 rows, 6 rows 9-12% slower;
// together ~12% faster at 1 thread and ~19% at 2. The gemm tiles, which widen every block
// and prefetch nothing, streamed 26-34% of a plain read at M = 1 there: DRAM latency, not
// arithmetic, held them back.
constexpr int64_t kGemvPrefetch = 4096;
constexpr int64_t kWiden = 4;

// The 32 activations of plane I (k = 64 I .. 64 I + 31 of the half at x).
template <int I>
TB_AVX2_INLINE __m256i plane_x(const int8_t* x) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 * I));
}

// Half H (bytes 32H..32H+31) of one 64-byte block of NR rows against one token; int16 sums.
template <int H, int NR>
TB_AVX2_INLINE void gemv_half(__m256i (&part)[NR], const uint8_t* wb, int64_t ldw, const int8_t* xb) {
  const __m256i low2 = _mm256_set1_epi8(0x03), high2 = _mm256_set1_epi8(0x30);
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    const int8_t* x = xb + 32 * H;
    __asm__ volatile("" : "+r"(x));  // a new pointer per row: its loads fold into VPMADDUBSW
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * ldw + 32 * H));
    const __m256i shifted = _mm256_srli_epi16(wv, 2);
    const __m256i low = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(wv, low2), plane_x<0>(x)),
                                         _mm256_maddubs_epi16(_mm256_and_si256(shifted, low2), plane_x<1>(x)));
    const __m256i high = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(wv, high2), plane_x<2>(x)),
                                          _mm256_maddubs_epi16(_mm256_and_si256(shifted, high2), plane_x<3>(x)));
    part[r] = _mm256_add_epi16(part[r], _mm256_add_epi16(low, _mm256_srai_epi16(high, 4)));
  }
}

template <int NR>
TB_AVX2 void gemv_tile(const GemmProblem& p, int64_t n) {
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* w = p.w + n * p.ldw;
  __m256i acc[NR];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_si256();
  const char* pf = reinterpret_cast<const char*>(w) + kGemvPrefetch;
  const int64_t nblk = p.k_pad / 256;
  for (int64_t b0 = 0; b0 < nblk; b0 += kWiden) {
    __m256i part[NR];
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) part[r] = _mm256_setzero_si256();
    const int64_t b1 = std::min(nblk, b0 + kWiden);
    for (int64_t b = b0; b < b1; ++b) {
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) _mm_prefetch(pf + 64 * (NR * b + r), _MM_HINT_T1);
      gemv_half<0>(part, w + 64 * b, p.ldw, p.xq + 256 * b);
      gemv_half<1>(part, w + 64 * b, p.ldw, p.xq + 256 * b);
    }
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(part[r], ones));
  }
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) store_result(p, 0, n + r, hsum_epi32(acc[r]));
}

constexpr int kGemvNR = 2;
constexpr void (*kGemvTiles[kGemvNR])(const GemmProblem&, int64_t) = {gemv_tile<1>, gemv_tile<2>};

constexpr int kMR = 2;
constexpr int kNR = 4;
using TileFn = void (*)(const GemmProblem&, int64_t, int64_t);

// [mr - 1][nr - 1]
constexpr TileFn kTiles[kMR][kNR] = {
    {gemm_tile<1, 1>, gemm_tile<1, 2>, gemm_tile<1, 3>, gemm_tile<1, 4>},
    {gemm_tile<2, 1>, gemm_tile<2, 2>, gemm_tile<2, 3>, gemm_tile<2, 4>},
};

// ---- prefill, M >= kChunkMinM: unpacked weight chunks ----
//
// As the AVX-512 panels, but K one 256-weight block at a time: panels of kChunkRows =
// 8 * kChunkVecs output rows, whose codes for one block are unpacked into a 4 KiB chunk (in
// L1) laid out with one output row per 32-bit lane (for each group q of 4 consecutive k,
// kChunkVecs vectors of 32 bytes; lane l of vector v holds the codes of row 8 v + l at
// k = 4q .. 4q + 3). A tile of kChunkMR tokens x kChunkVecs vectors broadcasts 4 activations
// of a token and multiplies them by the vectors with VPMADDUBSW into int16 pair sums. Those
// accumulate in int16 over the 64 steps of a block (a pair sum lies in [-512, 508], 64 of
// them in [-32768, 32512]: no overflow) and must be widened (VPMADDWD) once per block anyway,
// so the tile's int32 sums over K wait in a per-thread buffer between blocks.
//
// Measured (1 thread, 2560 x 2560, float32 out, this project's 2-core EPYC): 130-150 GMAC/s at
// M = 8-512 against 50-80 for the 2 x 4 tiles, which re-extract the code planes for every
// token tile and reduce every output horizontally; unpacking is cheap next to VPMADDUBSW, so the
// chunks win from M = 3-4 (2560 x 2560 and 6912 x 2560).
//
// The activations are broadcast with VBROADCASTSS from memory, not VPBROADCASTD: on an AVX2-only
// Zen 3 a register-only loop of the 4 x 2 tile's instructions ran 102 G multiply-adds/s with the
// float broadcast against 91 with the integer one (consistent with the latter also taking a
// vector pipe there, next to the 16 VPMADDUBSW / VPADDW of a step); the tiles then ran 6-12%
// faster. With the broadcasts off the vector pipes, 6 x 2 tiles (12 accumulators, 2 weight
// vectors and the broadcast: 15 of the 16 registers) beat 4 x 2 by 8-10%, 5 x 2 by 0-1%,
// and 3 x 2 lost 13-17% (the three 2B-4T shapes at M = 256, 1 and 2 threads).

constexpr int kChunkVecs = 2;
constexpr int64_t kChunkRows = 8 * kChunkVecs;
constexpr int kChunkMR = 6;
constexpr int64_t kChunkMinM = 4;
// Tokens per pass over a thread's rows. Every panel streams its tokens' activations once per
// block, and past ~256 tokens (2.5-7 MB at the 2B-4T widths) they no longer stayed in cache:
// `ternary_mm` over the three 2B-4T shapes ran 0.80x the speed of M = 256 at M = 1024 and 0.63x
// at 2048 (2 threads, Zen 3). Longer inputs (a forward over a whole sequence, a prefill chunk
// above 256) take the rows once per group of at most this many tokens: 1.19x / 1.24x at M =
// 1024 (2 / 1 threads), 1.22x at 2048 (2 threads); groups of 512 gained about half as much.
constexpr int64_t kChunkGroupTokens = 256;


// 8 packed rows (from w, stride ldw; only the first `rows` real unless Full, the others read
// as zero codes) x one 64-byte block -> code vector q = 16 i + 8 h + j (plane i, half h,
// dword j) at dst + q * kChunkVecs * 32.
template <bool Full>
TB_AVX2_INLINE void unpack8(const uint8_t* w, int64_t ldw, int64_t rows, uint8_t* dst) {
  const __m256i three = _mm256_set1_epi8(3);
  #pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    __m256i t[8];
    #pragma GCC unroll 8
    for (int r = 0; r < 8; ++r)
      t[r] = Full || r < rows ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + 32 * h))
                              : _mm256_setzero_si256();
    transpose8(t);
    #pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
      #pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)
        _mm256_store_si256(reinterpret_cast<__m256i*>(dst + (16 * i + 8 * h + j) * kChunkVecs * 32),
                           _mm256_and_si256(_mm256_srli_epi16(t[j], 2 * i), three));
  }
}

// Block b of rows [n, n + rows), rows <= kChunkRows, into chunk.
TB_AVX2 void unpack_chunk(const GemmProblem& p, int64_t n, int64_t rows, int64_t b, uint8_t* chunk) {
  for (int64_t v = 0; 8 * v < rows; ++v) {
    const uint8_t* w = p.w + (n + 8 * v) * p.ldw + 64 * b;
    if (rows - 8 * v >= 8)
      unpack8<true>(w, p.ldw, 8, chunk + 32 * v);
    else
      unpack8<false>(w, p.ldw, rows - 8 * v, chunk + 32 * v);
  }
}

// store_result for the outputs (token m, rows n .. n + count - 1) of one int32 vector: the
// same float32 operations and roundings, lane by lane (count < 8: one at a time).
TB_AVX2_INLINE void store_vec(const GemmProblem& p, int64_t m, int64_t n, __m256i sum_ux, int64_t count) {
  if (count < 8) {
    alignas(32) int32_t s[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(s), sum_ux);
    for (int64_t r = 0; r < count; ++r) store_result(p, m, n + r, s[r]);
    return;
  }
  const __m256i acc = _mm256_sub_epi32(sum_ux, _mm256_set1_epi32(p.xsum[m]));
  const Epilogue& e = p.ep;
  const int64_t at = m * e.ld + n;
  if (e.acc) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(e.acc + at), acc);
    return;
  }
  __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(e.row_factor[m]));
  if (e.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(e.bias + n));
  if (e.out_dtype == DType::F32) {
    _mm256_storeu_ps(static_cast<float*>(e.out) + at, y);
    return;
  }
  __m256i x = _mm256_castps_si256(y), h;
  if (e.out_dtype == DType::BF16) {
    // float_to_bf16: round to nearest even on the bits, NaN -> 0x7FC0
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    h = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
    h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
  } else {
    // float_to_f16's steps, lane by lane (|x| < 2^31, so signed compares order it correctly)
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x8000));
    x = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFFFFFF));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 13), _mm256_set1_epi32(1));
    h = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(int(0xC8000FFFu)), odd)), 13);
    const __m256 sub = _mm256_add_ps(_mm256_castsi256_ps(x), _mm256_set1_ps(0.5f));
    h = _mm256_blendv_epi8(h, _mm256_sub_epi32(_mm256_castps_si256(sub), _mm256_set1_epi32(0x3F000000)),
                           _mm256_cmpgt_epi32(_mm256_set1_epi32(0x38800000), x));
    h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7C00), _mm256_cmpgt_epi32(x, _mm256_set1_epi32(0x477FEFFF)));
    h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7E00), _mm256_cmpgt_epi32(x, _mm256_set1_epi32(0x7F800000)));
    h = _mm256_or_si256(_mm256_and_si256(h, _mm256_set1_epi32(0xFFFF)), sign);
  }
  // 8 x 16 bits: pack within 128-bit lanes, then bring the two halves together
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(e.out) + at), _mm256_castsi256_si128(packed));
}

// MR tokens from m x NV vectors (rows from n) of the chunk holding block b. part: the tile's
// int32 sums over blocks 0 .. b - 1 (MR x NV vectors; none if first); after the last block
// the results are stored (the last vector's first last_count).
template <int MR, int NV>
TB_AVX2 void chunk_tile(const GemmProblem& p, const uint8_t* chunk, int64_t m, int64_t n, int64_t b, int32_t* part,
                        bool first, bool last, int64_t last_count) {
  __m256i acc[MR][NV];
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[t][v] = _mm256_setzero_si256();
  // Each token's row of the block, as its own pointer: computed in the loop (x + t * ldq + 4q),
  // GCC added LEAs for the broadcasts' addresses (41 instructions per step instead of 36), and
  // the tiles ran 11-13% slower (the three 2B-4T shapes at M = 256, 1 and 2 threads).
  const int8_t* xr[MR];
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t) xr[t] = p.xq + (m + t) * p.ldq + 256 * b;
  for (int q = 0; q < 64; ++q) {
    __m256i wv[NV];
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      wv[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(chunk + (q * kChunkVecs + v) * 32));
    #pragma GCC unroll 16
    for (int t = 0; t < MR; ++t) {
      // the token's 4 activations k = 4q .. 4q + 3 in every lane (see above for the float broadcast)
      const __m256i xb =
          _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(xr[t] + 4 * q)));
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[t][v] = _mm256_add_epi16(acc[t][v], _mm256_maddubs_epi16(wv[v], xb));
    }
    // Empty asms that "change" every accumulator, here and after the loop: see panel_tile in
    // kernels_avx512.cpp.
    #pragma GCC unroll 16
    for (int t = 0; t < MR; ++t)
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) __asm__("" : "+x"(acc[t][v]));
  }
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) __asm__("" : "+x"(acc[t][v]));
  const __m256i ones = _mm256_set1_epi16(1);
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      __m256i* slot = reinterpret_cast<__m256i*>(part + (t * NV + v) * 8);
      __m256i sum = _mm256_madd_epi16(acc[t][v], ones);
      if (!first) sum = _mm256_add_epi32(sum, _mm256_load_si256(slot));
      if (last)
        store_vec(p, m + t, n + 8 * v, sum, v == NV - 1 ? last_count : 8);
      else
        _mm256_store_si256(slot, sum);
    }
}

using ChunkFn = void (*)(const GemmProblem&, const uint8_t*, int64_t, int64_t, int64_t, int32_t*, bool, bool, int64_t);

template <int NV, int... T>
constexpr std::array<ChunkFn, sizeof...(T)> chunk_tiles_nv(std::integer_sequence<int, T...>) {
  return {chunk_tile<T + 1, NV>...};
}
template <int... V>
constexpr std::array<std::array<ChunkFn, kChunkMR>, sizeof...(V)> chunk_tiles(std::integer_sequence<int, V...>) {
  return {chunk_tiles_nv<V + 1>(std::make_integer_sequence<int, kChunkMR>())...};
}
// [nv - 1][mr - 1]
constexpr auto kChunkTiles = chunk_tiles(std::make_integer_sequence<int, kChunkVecs>());

void gemm_chunks(const GemmProblem& p, int64_t n0, int64_t n1) {
  constexpr int64_t tile_ints = kChunkMR * kChunkVecs * 8;
  // equal token groups of at most kChunkGroupTokens, in whole tiles but the last
  const int64_t groups = (p.m + kChunkGroupTokens - 1) / kChunkGroupTokens;
  const int64_t group = ((p.m + groups - 1) / groups + kChunkMR - 1) / kChunkMR * kChunkMR;
  thread_local AlignedBuffer partial;  // one thread's partial sums: kChunkMR x kChunkVecs vectors per token tile
  int32_t* part = static_cast<int32_t*>(partial.get(size_t(group / kChunkMR * tile_ints) * sizeof(int32_t)));
  alignas(64) uint8_t chunk[64 * kChunkVecs * 32];
  const int64_t nblk = p.k_pad / 256;
  for (int64_t m0 = 0; m0 < p.m; m0 += group) {
    const int64_t m1 = std::min(p.m, m0 + group);
    for (int64_t n = n0; n < n1; n += kChunkRows) {
      const int64_t rows = std::min(kChunkRows, n1 - n);
      const int64_t nv = (rows + 7) / 8;
      for (int64_t b = 0; b < nblk; ++b) {
        // The lines unpacked next (the next block of these rows, or the next panel's first), into
        // L1 while this block's tiles run: unpacking read them straight from memory, ~4% of a
        // prefill's samples; with the prefetch the three 2B-4T shapes ran 4-5% faster at M = 256.
        const bool more = b + 1 < nblk;
        const int64_t next_rows = more ? rows : std::min(kChunkRows, n1 - n - kChunkRows);
        if (next_rows > 0) {
          const uint8_t* next = more ? p.w + n * p.ldw + 64 * (b + 1) : p.w + (n + kChunkRows) * p.ldw;
          for (int64_t r = 0; r < next_rows; ++r)
            _mm_prefetch(reinterpret_cast<const char*>(next + r * p.ldw), _MM_HINT_T0);
        }
        unpack_chunk(p, n, rows, b, chunk);
        for (int64_t m = m0; m < m1; m += kChunkMR)
          kChunkTiles[nv - 1][std::min<int64_t>(kChunkMR, m1 - m) - 1](
              p, chunk, m, n, b, part + (m - m0) / kChunkMR * tile_ints, b == 0, b == nblk - 1, rows - 8 * (nv - 1));
      }
    }
  }
}

void gemm_avx2(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.m == 1) {
    for (int64_t n = n0; n < n1; n += kGemvNR) kGemvTiles[std::min<int64_t>(kGemvNR, n1 - n) - 1](p, n);
    return;
  }
  if (p.m >= kChunkMinM) {
    gemm_chunks(p, n0, n1);
    return;
  }
  // As in the AVX-512 kernel: token chunks stay in L2, NR weight rows in L1.
  const int64_t chunk = std::max<int64_t>(kMR, (int64_t(256) << 10) / p.k_pad / kMR * kMR);
  for (int64_t m0 = 0; m0 < p.m; m0 += chunk) {
    const int64_t m1 = std::min(p.m, m0 + chunk);
    for (int64_t n = n0; n < n1; n += kNR) {
      const int64_t nr = std::min<int64_t>(kNR, n1 - n);
      for (int64_t m = m0; m < m1; m += kMR) kTiles[std::min<int64_t>(kMR, m1 - m) - 1][nr - 1](p, m, n);
    }
  }
}

TB_AVX2 uint8_t stream_max_avx2(const uint8_t* p, int64_t n) {
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    m0 = _mm256_max_epu8(m0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    m1 = _mm256_max_epu8(m1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    m2 = _mm256_max_epu8(m2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    m3 = _mm256_max_epu8(m3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  m0 = _mm256_max_epu8(_mm256_max_epu8(m0, m1), _mm256_max_epu8(m2, m3));
  alignas(32) uint8_t lanes[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), m0);
  uint8_t mx = 0;
  for (int j = 0; j < 32; ++j) mx = std::max(mx, lanes[j]);
  for (; i < n; ++i) mx = std::max(mx, p[i]);
  return mx;
}

}  // namespace

const Kernels kAvx2Kernels = {quantize_row_avx2, gemm_avx2, stream_max_avx2, attention_partial_avx2,
                                int8_gemm_avx2, relu2_gate_avx2, int4_gemm_avx2,
                                unpack5_scalar, nullptr, nullptr, load_row_avx2, rope_row_avx2, kv_quantize_avx2,
                                add_rows_avx2, unpack3_scalar, nullptr, nullptr, nullptr};

}  // namespace tbn

#endif  // x86-64
