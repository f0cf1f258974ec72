// AVX-512 (F/BW/VL/VNNI) kernels. Compiled with per-function target attributes, so the
// library still loads on any x86-64; cpu_features.cpp only selects them when the CPU has
// these extensions.
#if defined(__x86_64__) || defined(_M_X64)

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <utility>

#include "avx512_common.h"
#include "kernels.h"

// Every loop over tile rows/tokens/planes below is unrolled with "#pragma GCC unroll": unrolled
// early, GCC keeps the accumulator arrays in registers; unrolled late, it keeps a copy of
// them on the stack and stores it every iteration (4x slower).

namespace tbn {
namespace {

TB_AVX512 float quantize_row_avx512(const float* x, int64_t k, int64_t k_pad, int8_t* xq, int32_t* xsum) {
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  const int64_t k16 = k & ~int64_t(15);
  const __mmask16 tail = __mmask16((1u << (k - k16)) - 1u);
  for (int64_t i = 0; i < k16; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
  }
  if (tail) {
    const __m512 v = _mm512_maskz_loadu_ps(tail, x + k16);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
  }
  const float amax = _mm512_reduce_max_ps(vmax);
  if (nan || amax == std::numeric_limits<float>::infinity()) {
    std::memset(xq, 0, size_t(k_pad));
    *xsum = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float a = act_scale_from_amax(amax);
  const __m512 va = _mm512_set1_ps(a);
  const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
  __m512i vsum = _mm512_setzero_si512();
  for (int64_t i = 0; i <= k16; i += 16) {
    const __mmask16 mk = i < k16 ? __mmask16(0xFFFF) : tail;
    if (!mk) break;
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + i), va);
    __m512i q = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
    vsum = _mm512_add_epi32(vsum, q);  // masked-off lanes loaded as 0
    _mm512_mask_cvtepi32_storeu_epi8(xq + i, mk, q);
  }
  std::memset(xq + k, 0, size_t(k_pad - k));
  *xsum = _mm512_reduce_add_epi32(vsum);
  return a;
}

constexpr int64_t kPrefetchAhead = 8192;

// Decode kernel: one token against NR output rows. The code planes are isolated with a
// single AND each (no shift): plane i then holds u * 4^i, so it gets its own accumulator
// and is scaled back (exactly: every product is a multiple of 4^i) after the K loop.
// Per 64 packed bytes: 1 load, 4 AND, 4 VPDPBUSD; the 4 activation vectors are shared by
// the NR rows.
template <int NR>
TB_AVX512 void gemv_tile(const GemmProblem& p, int64_t m, int64_t n) {
  const int8_t* x = p.xq + m * p.ldq;
  const uint8_t* w = p.w + n * p.ldw;
  const __m512i k0 = _mm512_set1_epi8(0x03), k1 = _mm512_set1_epi8(0x0C);
  const __m512i k2 = _mm512_set1_epi8(0x30), k3 = _mm512_set1_epi8(char(0xC0));
  __m512i acc[NR][4];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
    #pragma GCC unroll 16
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_si512();
  // The NR rows are one contiguous range of NR * ldw bytes, read as NR interleaved streams.
  // Prefetch the same amount (NR lines per block) kPrefetchAhead bytes further on into L2, so
  // the bytes of a later tile are on chip in time: DRAM latency, not arithmetic, limits decode.
  // (Measured at the 2B-4T shapes, 2 threads: 8 KiB into L2 streams at the speed of a plain
  // read; into L1, or without the prefetch, 20-35% slower.)
  const char* pf = reinterpret_cast<const char*>(w) + kPrefetchAhead;
  const int64_t nblk = p.k_pad / 256;
  for (int64_t b = 0; b < nblk; ++b) {
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) _mm_prefetch(pf + 64 * (NR * b + r), _MM_HINT_T1);
    const __m512i x0 = _mm512_loadu_si512(x + 256 * b);
    const __m512i x1 = _mm512_loadu_si512(x + 256 * b + 64);
    const __m512i x2 = _mm512_loadu_si512(x + 256 * b + 128);
    const __m512i x3 = _mm512_loadu_si512(x + 256 * b + 192);
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m512i wv = _mm512_loadu_si512(w + r * p.ldw + 64 * b);
      acc[r][0] = dpbusd(acc[r][0], _mm512_and_si512(wv, k0), x0);
      acc[r][1] = dpbusd(acc[r][1], _mm512_and_si512(wv, k1), x1);
      acc[r][2] = dpbusd(acc[r][2], _mm512_and_si512(wv, k2), x2);
      acc[r][3] = dpbusd(acc[r][3], _mm512_and_si512(wv, k3), x3);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    store_result(p, m, n + r, plane_sum(acc[r]));
  }
}

// The bits of float_to_bf16(y) in each 32-bit lane: round to nearest even, NaN -> 0x7FC0.
TB_AVX512_INLINE __m512i bf16_bits(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// The bits of float_to_f16(y) in each 32-bit lane (low half): its steps, lane by lane.
TB_AVX512_INLINE __m512i f16_bits(__m512 y) {
  __m512i x = _mm512_castps_si512(y);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x8000));
  x = _mm512_and_si512(x, _mm512_set1_epi32(0x7FFFFFFF));
  // normal: rebias the exponent by -112 and round to nearest even on the bits
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 13), _mm512_set1_epi32(1));
  __m512i h = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(int(0xC8000FFFu)), odd)), 13);
  // |y| < 2^-14, half subnormal: + 0.5f rounds to a multiple of 2^-24, the low bits are the result
  const __m512 sub = _mm512_add_ps(_mm512_castsi512_ps(x), _mm512_set1_ps(0.5f));
  h = _mm512_mask_mov_epi32(h, _mm512_cmplt_epu32_mask(x, _mm512_set1_epi32(0x38800000)),
                            _mm512_sub_epi32(_mm512_castps_si512(sub), _mm512_set1_epi32(0x3F000000)));
  // >= 65520 rounds to Inf; Inf; NaN
  h = _mm512_mask_mov_epi32(h, _mm512_cmpge_epu32_mask(x, _mm512_set1_epi32(0x477FF000)), _mm512_set1_epi32(0x7C00));
  h = _mm512_mask_mov_epi32(h, _mm512_cmpgt_epu32_mask(x, _mm512_set1_epi32(0x7F800000)), _mm512_set1_epi32(0x7E00));
  return _mm512_or_si512(_mm512_and_si512(h, _mm512_set1_epi32(0xFFFF)), sign);
}


// store_result for an MR x NR tile (tokens from m, rows from n) whose sum_ux are in lanes
// 4 t + r of sums: the same float32 operations and roundings, lane by lane, then NR lanes
// stored per token. Masked loads never read past xsum / row_factor[M - 1] or bias[N - 1]; the
// lanes they leave zero are never stored.
template <int MR, int NR>
TB_AVX512_INLINE void store_tile(const GemmProblem& p, int64_t m, int64_t n, __m512i sums) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i t_idx = _mm512_srli_epi32(iota, 2), r_idx = _mm512_and_si512(iota, _mm512_set1_epi32(3));
  constexpr __mmask16 t_mask = __mmask16((1u << MR) - 1u), r_mask = __mmask16((1u << NR) - 1u);
  const Epilogue& e = p.ep;
  const __m512i acc =
      _mm512_sub_epi32(sums, _mm512_permutexvar_epi32(t_idx, _mm512_maskz_loadu_epi32(t_mask, p.xsum + m)));
  __m512i bits = acc;
  if (!e.acc) {
    const __m512 f = _mm512_permutexvar_ps(t_idx, _mm512_maskz_loadu_ps(t_mask, e.row_factor + m));
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), f);
    if (e.bias) y = _mm512_add_ps(y, _mm512_permutexvar_ps(r_idx, _mm512_maskz_loadu_ps(r_mask, e.bias + n)));
    bits = e.out_dtype == DType::F32 ? _mm512_castps_si512(y) : e.out_dtype == DType::BF16 ? bf16_bits(y) : f16_bits(y);
  }
  #pragma GCC unroll 4
  for (int t = 0; t < MR; ++t) {
    // lanes 4 t .. 4 t + NR - 1 -> lanes 0 .. NR - 1, stored at row m + t from n
    const __m512i row = t ? _mm512_permutexvar_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(4 * t)), bits) : bits;
    const int64_t at = (m + t) * e.ld + n;
    if (e.acc)
      _mm512_mask_storeu_epi32(e.acc + at, r_mask, row);
    else if (e.out_dtype == DType::F32)
      _mm512_mask_storeu_epi32(static_cast<float*>(e.out) + at, r_mask, row);
    else
      _mm512_mask_cvtepi32_storeu_epi16(static_cast<uint16_t*>(e.out) + at, r_mask, row);
  }
}

// Plane I of one 256-weight block for an MR x NR tile: the NR weight rows' codes are
// unpacked once (shift + AND) and reused by MR tokens.
template <int I, int MR, int NR>
TB_AVX512_INLINE void gemm_plane(__m512i (&acc)[MR][NR], const uint8_t* wb, int64_t ldw, const int8_t* xb,
                                 int64_t ldq) {
  const __m512i mask = _mm512_set1_epi8(3);
  __m512i c[NR];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
    c[r] = _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512(wb + r * ldw), 2 * I), mask);
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t) {
    const __m512i xv = _mm512_loadu_si512(xb + t * ldq + 64 * I);
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[t][r] = dpbusd(acc[t][r], c[r], xv);
  }
}

// Short prefill kernel (2 <= M < kPanelMinM): MR tokens x NR output rows, register-blocked.
// The 16 sums are reduced together and stored by a vector epilogue (measured at 2560 x 2560,
// M = 4-32, 1 thread: 217 GMAC/s, against 197 with one horizontal reduction and a scalar
// store_result per output).
template <int MR, int NR>
TB_AVX512 void gemm_tile(const GemmProblem& p, int64_t m, int64_t n) {
  __m512i acc[MR][NR];
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[t][r] = _mm512_setzero_si512();
  const uint8_t* w = p.w + n * p.ldw;
  const int8_t* x = p.xq + m * p.ldq;
  const int64_t nblk = p.k_pad / 256;
  for (int64_t b = 0; b < nblk; ++b) {
    gemm_plane<0>(acc, w + 64 * b, p.ldw, x + 256 * b, p.ldq);
    gemm_plane<1>(acc, w + 64 * b, p.ldw, x + 256 * b, p.ldq);
    gemm_plane<2>(acc, w + 64 * b, p.ldw, x + 256 * b, p.ldq);
    gemm_plane<3>(acc, w + 64 * b, p.ldw, x + 256 * b, p.ldq);
  }
  // Empty asms that "change" every accumulator (see panel_tile): without them GCC 12 lets the
  // reduction's operand pairing drive the register allocation of the loop above.
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) __asm__("" : "+v"(acc[t][r]));
  __m512i sums[16];  // lane order 4 t + r, unused lanes zero
  #pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) sums[i] = i / 4 < MR && i % 4 < NR ? acc[i / 4][i % 4] : _mm512_setzero_si512();
  store_tile<MR, NR>(p, m, n, reduce16(sums));
}

constexpr int kMR = 4;
constexpr int kNR = 4;
using TileFn = void (*)(const GemmProblem&, int64_t, int64_t);

// [mr - 1][nr - 1]
constexpr TileFn kTiles[kMR][kNR] = {
    {gemm_tile<1, 1>, gemm_tile<1, 2>, gemm_tile<1, 3>, gemm_tile<1, 4>},
    {gemm_tile<2, 1>, gemm_tile<2, 2>, gemm_tile<2, 3>, gemm_tile<2, 4>},
    {gemm_tile<3, 1>, gemm_tile<3, 2>, gemm_tile<3, 3>, gemm_tile<3, 4>},
    {gemm_tile<4, 1>, gemm_tile<4, 2>, gemm_tile<4, 3>, gemm_tile<4, 4>},
};
constexpr TileFn kGemv[kNR] = {gemv_tile<1>, gemv_tile<2>, gemv_tile<3>, gemv_tile<4>};

// ---- prefill, M >= kPanelMinM: unpacked weight panels ----
//
// Output rows go kPanelRows = 64 at a time (a panel). The panel's codes are unpacked once, for
// all of K, into a per-thread buffer (64 x Kp bytes: 160 KiB at K = 2560, 432 KiB at 6912,
// in L2) laid out for VPDPBUSD with one output row per 32-bit lane: for each group q of 4
// consecutive k it holds 4 vectors of 64 bytes, lane l of vector v holding the codes u of row
// 16 v + l at k = 4q .. 4q + 3. A tile of kPanelMR = 6 tokens x 4 vectors broadcasts 4
// activations of a token and multiplies them by the 4 vectors (per 4 k: 4 loads, 6
// broadcasts, 24 VPDPBUSD into 24 accumulators), so one accumulator holds 16 outputs: no
// horizontal reductions, no shifts or ANDs in the loop, and the 2-bit unpacking (transpose,
// shift, AND) paid once per panel instead of once per token tile.
//
// Measured (1 thread, float32 out, 2B-4T shapes, peak 230 GMAC/s from a register-only
// VPDPBUSD loop): 210-225 GMAC/s at M = 128-512, 220-224 at M = 512, against 200-220 for the
// 4 x 4 tiles (with their vectorised epilogue); even with them at M = 64-128 (unpacking costs
// ~260 cycles per KiB of packed weight), so the tiles serve M < 128. 6 x 4 tiles were as fast
// as 8 x 3 and faster than 4 x 6 or 5 x 5. Unpacking one 256-weight block of the panel at a
// time into an L1-resident chunk (sums over K kept in memory between blocks) was 2-5% slower.

constexpr int kPanelMR = 6;
constexpr int64_t kPanelMinM = 128;
// Prefetch distance of the packed rows in unpack16: two blocks ahead.
constexpr int64_t kUnpackPrefetch = 128;


// 16 packed rows (from w, stride ldw; only the first `rows` real unless Full, the others
// read as zero codes) x one 64-byte block -> code vector q = 16 i + j (plane i, dword j) at
// dst + q * kPanelVecs * 64. The packed dwords are transposed once for all 4 planes.
template <bool Full>
TB_AVX512_INLINE void unpack16(const uint8_t* w, int64_t ldw, int64_t rows, uint8_t* dst) {
  const __m512i three = _mm512_set1_epi8(3);
  __m512i t[16];
  #pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) t[r] = Full || r < rows ? _mm512_loadu_si512(w + r * ldw) : _mm512_setzero_si512();
  #pragma GCC unroll 16
  for (int r = 0; r < 16; ++r)
    if (Full || r < rows) _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + kUnpackPrefetch), _MM_HINT_T0);
  transpose16(t);
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    #pragma GCC unroll 16
    for (int j = 0; j < 16; ++j)
      _mm512_store_si512(dst + (16 * i + j) * kPanelVecs * 64, _mm512_and_si512(_mm512_srli_epi16(t[j], 2 * i), three));
}

}  // namespace

// Rows [n, n + rows), rows <= kPanelRows, into panel (the layout in kernels.h): block by
// block, so each block's 16 KiB of the panel is written in one go. Also the AMX kernel's.
TB_AVX512 void unpack_panel_avx512(const GemmProblem& p, int64_t n, int64_t rows, uint8_t* panel) {
  for (int64_t b = 0; b < p.k_pad / 256; ++b)
    for (int64_t v = 0; 16 * v < rows; ++v) {
      const uint8_t* w = p.w + (n + 16 * v) * p.ldw + 64 * b;
      uint8_t* dst = panel + (64 * b * kPanelVecs + v) * 64;
      if (rows - 16 * v >= 16)
        unpack16<true>(w, p.ldw, 16, dst);
      else
        unpack16<false>(w, p.ldw, rows - 16 * v, dst);
    }
}

namespace {

// store_result for the 16 outputs (token m, rows n .. n + 15) of one accumulator, only the
// lanes in keep: the same float32 operations and roundings, lane by lane.
TB_AVX512_INLINE void store_vec(const GemmProblem& p, int64_t m, int64_t n, __m512i sum_ux, __mmask16 keep) {
  const __m512i acc = _mm512_sub_epi32(sum_ux, _mm512_set1_epi32(p.xsum[m]));
  const Epilogue& e = p.ep;
  const int64_t at = m * e.ld + n;
  if (e.acc) {
    _mm512_mask_storeu_epi32(e.acc + at, keep, acc);
    return;
  }
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(e.row_factor[m]));
  if (e.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(keep, e.bias + n));
  switch (e.out_dtype) {
    case DType::F32:
      _mm512_mask_storeu_ps(static_cast<float*>(e.out) + at, keep, y);
      break;
    case DType::BF16:
      _mm512_mask_cvtepi32_storeu_epi16(static_cast<uint16_t*>(e.out) + at, keep, bf16_bits(y));
      break;
    case DType::F16:
      _mm512_mask_cvtepi32_storeu_epi16(static_cast<uint16_t*>(e.out) + at, keep, f16_bits(y));
      break;
  }
}

// MR tokens from m x NV vectors of a panel (rows from n), all of K; the last vector stores
// only the lanes in last_keep.
template <int MR, int NV>
TB_AVX512 void panel_tile(const GemmProblem& p, const uint8_t* panel, int64_t m, int64_t n, __mmask16 last_keep) {
  __m512i acc[MR][NV];
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_setzero_si512();
  const int8_t* x = p.xq + m * p.ldq;
  const int64_t nq = p.k_pad / 4;
  for (int64_t q = 0; q < nq; ++q) {
    __m512i wv[NV];
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_si512(panel + (q * kPanelVecs + v) * 64);
    #pragma GCC unroll 16
    for (int t = 0; t < MR; ++t) {
      int32_t x4;
      std::memcpy(&x4, x + t * p.ldq + 4 * q, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[t][v] = dpbusd(acc[t][v], wv[v], xb);
    }
    // An empty asm that "changes" every accumulator, here and after the loop (as in
    // int8_avx512.cpp): without both, GCC 12 may copy all accumulators between registers
    // and to the stack on every step (measured 2x slower).
    #pragma GCC unroll 16
    for (int t = 0; t < MR; ++t)
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) __asm__("" : "+v"(acc[t][v]));
  }
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) __asm__("" : "+v"(acc[t][v]));
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      store_vec(p, m + t, n + 16 * v, acc[t][v], v == NV - 1 ? last_keep : __mmask16(0xFFFF));
}

using PanelFn = void (*)(const GemmProblem&, const uint8_t*, int64_t, int64_t, __mmask16);

template <int NV, int... T>
constexpr std::array<PanelFn, sizeof...(T)> panel_tiles_nv(std::integer_sequence<int, T...>) {
  return {panel_tile<T + 1, NV>...};
}
template <int... V>
constexpr std::array<std::array<PanelFn, kPanelMR>, sizeof...(V)> panel_tiles(std::integer_sequence<int, V...>) {
  return {panel_tiles_nv<V + 1>(std::make_integer_sequence<int, kPanelMR>())...};
}
// [nv - 1][mr - 1]
constexpr auto kPanelTiles = panel_tiles(std::make_integer_sequence<int, kPanelVecs>());

// Unpack fills a panel from p's weight: unpack_panel_avx512 (2-bit) or unpack3_panel_avx512.
template <void (*Unpack)(const GemmProblem&, int64_t, int64_t, uint8_t*)>
void gemm_panels(const GemmProblem& p, int64_t n0, int64_t n1) {
  thread_local AlignedBuffer buffer;  // one thread's panel: kPanelRows x Kp bytes
  uint8_t* panel = static_cast<uint8_t*>(buffer.get(size_t(kPanelRows * p.k_pad)));
  for (int64_t n = n0; n < n1; n += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, n1 - n);
    const int64_t nv = (rows + 15) / 16;
    const __mmask16 last_keep = __mmask16((1u << (rows - 16 * (nv - 1))) - 1u);
    Unpack(p, n, rows, panel);
    for (int64_t m = 0; m < p.m; m += kPanelMR)
      kPanelTiles[nv - 1][std::min<int64_t>(kPanelMR, p.m - m) - 1](p, panel, m, n, last_keep);
  }
}

void gemm_avx512(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.m == 1) {
    for (int64_t n = n0; n < n1; n += kNR) kGemv[std::min<int64_t>(kNR, n1 - n) - 1](p, 0, n);
    return;
  }
  if (p.m >= kPanelMinM) {
    gemm_panels<unpack_panel_avx512>(p, n0, n1);
    return;
  }
  // Tokens are processed in chunks whose activations (chunk x Kp bytes, <= 256 KiB) stay in
  // L2 while NR weight rows at a time (NR x Kp/4 bytes) stay in L1.
  const int64_t chunk = std::max<int64_t>(kMR, (int64_t(256) << 10) / p.k_pad / kMR * kMR);
  for (int64_t m0 = 0; m0 < p.m; m0 += chunk) {
    const int64_t m1 = std::min(p.m, m0 + chunk);
    for (int64_t n = n0; n < n1; n += kNR) {
      const int64_t nr = std::min<int64_t>(kNR, n1 - n);
      for (int64_t m = m0; m < m1; m += kMR) kTiles[std::min<int64_t>(kMR, m1 - m) - 1][nr - 1](p, m, n);
    }
  }
}

TB_AVX512 uint8_t stream_max_avx512(const uint8_t* p, int64_t n) {
  __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    m0 = _mm512_max_epu8(m0, _mm512_loadu_si512(p + i));
    m1 = _mm512_max_epu8(m1, _mm512_loadu_si512(p + i + 64));
    m2 = _mm512_max_epu8(m2, _mm512_loadu_si512(p + i + 128));
    m3 = _mm512_max_epu8(m3, _mm512_loadu_si512(p + i + 192));
  }
  m0 = _mm512_max_epu8(_mm512_max_epu8(m0, m1), _mm512_max_epu8(m2, m3));
  alignas(64) uint8_t lanes[64];
  _mm512_store_si512(lanes, m0);
  uint8_t mx = 0;
  for (int j = 0; j < 64; ++j) mx = std::max(mx, lanes[j]);
  for (; i < n; ++i) mx = std::max(mx, p[i]);
  return mx;
}

}  // namespace

TB_AVX512 void store_rows_avx512(const GemmProblem& p, int64_t m, int64_t count, int64_t n, const int32_t* sum_ux,
                                 int64_t ld_sums, uint16_t keep) {
  for (int64_t t = 0; t < count; ++t) store_vec(p, m + t, n, _mm512_loadu_si512(sum_ux + t * ld_sums), __mmask16(keep));
}

// Every token count on the panels: the 3-trit codes must be unpacked anyway, and the panel
// tiles take any M.
void gemm3_panels_avx512(const GemmProblem& p, int64_t n0, int64_t n1) {
  gemm_panels<unpack3_panel_avx512>(p, n0, n1);
}

const Kernels kAvx512Kernels = {quantize_row_avx512, gemm_avx512, stream_max_avx512, attention_partial_avx512,
                                int8_gemm_avx512, relu2_gate_avx512, int4_gemm_avx512,
                                unpack5_scalar, nullptr, nullptr, load_row_avx512, rope_row_avx512, kv_quantize_avx512,
                                add_rows_avx512, unpack3_scalar, gemv3_avx512, lut3_avx512, nullptr};

}  // namespace tbn

#endif  // x86-64
