// AVX-512 (F/BW/VL/VNNI) kernels. Compiled with per-function target attributes, so the
// library still loads on any x86-64; cpu_features.cpp only selects them when the CPU has
// these extensions.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"

#define TB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define TB_AVX512_INLINE TB_AVX512 inline __attribute__((always_inline))
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
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], _mm512_and_si512(wv, k0), x0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], _mm512_and_si512(wv, k1), x1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], _mm512_and_si512(wv, k2), x2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], _mm512_and_si512(wv, k3), x3);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    const int32_t s = _mm512_reduce_add_epi32(acc[r][0]) + (_mm512_reduce_add_epi32(acc[r][1]) >> 2) +
                      (_mm512_reduce_add_epi32(acc[r][2]) >> 4) + (_mm512_reduce_add_epi32(acc[r][3]) >> 6);
    store_result(p, m, n + r, s);
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
    for (int r = 0; r < NR; ++r) acc[t][r] = _mm512_dpbusd_epi32(acc[t][r], c[r], xv);
  }
}

// Prefill kernel: MR tokens x NR output rows, register-blocked.
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
  #pragma GCC unroll 16
  for (int t = 0; t < MR; ++t)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) store_result(p, m + t, n + r, _mm512_reduce_add_epi32(acc[t][r]));
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

void gemm_avx512(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.m == 1) {
    for (int64_t n = n0; n < n1; n += kNR) kGemv[std::min<int64_t>(kNR, n1 - n) - 1](p, 0, n);
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

const Kernels kAvx512Kernels = {quantize_row_avx512, gemm_avx512, stream_max_avx512, attention_partial_avx512,
                                int8_gemm_avx512, relu2_gate_avx512, int4_gemm_avx512};

}  // namespace tbn

#endif  // x86-64
