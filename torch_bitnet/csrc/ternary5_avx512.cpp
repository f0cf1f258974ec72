// AVX-512 VBMI kernels of the 5-trit weight format (kernels.h, torch_bitnet/packing.py): the
// decode GEMV that streams 1.6 bits per weight, and the unpacking to the 2-bit format used for
// prefill. Per-function target attributes, so the library still loads on any x86-64;
// cpu_features.cpp selects kAvx512VbmiKernels only when the CPU has VBMI.
#if defined(__x86_64__) || defined(_M_X64)

#include <algorithm>

#include "avx512_common.h"
#include "kernels.h"


namespace tbn {
namespace {

// The decoding tables in registers.
struct Trit5Regs {
  __m512i low4[4];  // kTrit5.low4, 64 bytes each
  __m512i u4;       // kTrit5.u4
};

TB_VBMI_INLINE Trit5Regs load_tables() {
  Trit5Regs t;
  for (int i = 0; i < 4; ++i) t.low4[i] = _mm512_loadu_si512(kTrit5.low4 + 64 * i);
  t.u4 = _mm512_loadu_si512(kTrit5.u4);
  return t;
}

// 64 codes c -> the 2-bit bytes of their chunks 0..3 (returned) and the codes of chunk 4 (*u4).
// A 256-entry byte lookup is two 128-entry VPERMI2B lookups selected by the top bit of c.
TB_VBMI_INLINE __m512i decode(const Trit5Regs& t, __m512i c, __m512i* u4) {
  const __mmask64 hi = _mm512_movepi8_mask(c);
  __m512i p = _mm512_mask2_permutex2var_epi8(t.low4[2], c, hi, t.low4[3]);      // c >= 128
  p = _mm512_mask2_permutex2var_epi8(t.low4[0], p, _knot_mask64(hi), t.low4[1]);  // c < 128
  *u4 = _mm512_permutexvar_epi8(c, t.u4);  // VPERMB reads the low 6 bits of each index
  return p;
}

// One token against NR rows: as the 2-bit gemv_tile (kernels_avx512.cpp) on the decoded bytes
// (4 AND + 4 VPDPBUSD, planes scaled back after the loop), plus one VPDPBUSD for chunk 4, whose
// codes are unshifted like plane 0's. Per 64 packed bytes (320 weights): 1 load, 1 mask move,
// 2 VPERMI2B, 1 VPERMB, 4 AND, 5 VPDPBUSD. The prefetch runs PF bytes ahead into L1: with the
// decode's extra work per byte the lines must be in L1, not L2 (the 2-bit kernel's 8 KiB L2
// prefetch was ~20% slower here). Chosen in a standalone harness at the 2B-4T shapes among
// 1-16 KiB into L1 or L2: 4 KiB for rows of <= 768 bytes, 8 KiB for longer ones (~two tiles).
template <int NR, int PF>
TB_VBMI void gemv5_tile(const GemmProblem& p, int64_t n) {
  const Trit5Regs t = load_tables();
  const int8_t* x = p.xq;
  const uint8_t* w = p.w + n * p.ldw;
  const __m512i k0 = _mm512_set1_epi8(0x03), k1 = _mm512_set1_epi8(0x0C);
  const __m512i k2 = _mm512_set1_epi8(0x30), k3 = _mm512_set1_epi8(char(0xC0));
  __m512i acc[NR][4];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
    #pragma GCC unroll 16
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_si512();
  const char* pf = reinterpret_cast<const char*>(w) + PF;
  const int64_t nblk = p.k_pad / kBlockK5;
  for (int64_t b = 0; b < nblk; ++b) {
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) _mm_prefetch(pf + 64 * (NR * b + r), _MM_HINT_T0);
    const int8_t* xb = x + kBlockK5 * b;
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      __m512i u4;
      const __m512i lo = decode(t, _mm512_loadu_si512(w + r * p.ldw + 64 * b), &u4);
      acc[r][0] = dpbusd(acc[r][0], _mm512_and_si512(lo, k0), _mm512_loadu_si512(xb));
      acc[r][1] = dpbusd(acc[r][1], _mm512_and_si512(lo, k1), _mm512_loadu_si512(xb + 64));
      acc[r][2] = dpbusd(acc[r][2], _mm512_and_si512(lo, k2), _mm512_loadu_si512(xb + 128));
      acc[r][3] = dpbusd(acc[r][3], _mm512_and_si512(lo, k3), _mm512_loadu_si512(xb + 192));
      acc[r][0] = dpbusd(acc[r][0], u4, _mm512_loadu_si512(xb + 256));
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    store_result(p, 0, n + r, plane_sum(acc[r]));
  }
}

using Gemv5Fn = void (*)(const GemmProblem&, int64_t);
constexpr int kNR5 = 4;
constexpr Gemv5Fn kGemv5Near[kNR5] = {gemv5_tile<1, 4096>, gemv5_tile<2, 4096>, gemv5_tile<3, 4096>,
                                      gemv5_tile<4, 4096>};
constexpr Gemv5Fn kGemv5Far[kNR5] = {gemv5_tile<1, 8192>, gemv5_tile<2, 8192>, gemv5_tile<3, 8192>,
                                     gemv5_tile<4, 8192>};

void gemv5_vbmi(const GemmProblem& p, int64_t n0, int64_t n1) {
  const Gemv5Fn* tiles = p.ldw <= 768 ? kGemv5Near : kGemv5Far;
  for (int64_t n = n0; n < n1; n += kNR5) tiles[std::min<int64_t>(kNR5, n1 - n) - 1](p, n);
}

// unpack5_scalar's loop (chunk q of the row: digit q % 5 of 5-trit block q / 5, bits 2 (q % 4)
// of 2-bit block q / 4) on 64-byte vectors: each 5-trit block is decoded once.
TB_VBMI void unpack5_vbmi(const uint8_t* w5, int64_t k_pad5, int64_t rows, uint8_t* w2, int64_t k_pad2) {
  const Trit5Regs t = load_tables();
  const __m512i three = _mm512_set1_epi8(3), ones = _mm512_set1_epi8(1);
  const int64_t chunks5 = k_pad5 / 64, chunks2 = k_pad2 / 64;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = w5 + r * (k_pad5 / 5);
    uint8_t* dst = w2 + r * (k_pad2 / 4);
    __m512i lo = ones, u4 = ones, out = _mm512_setzero_si512();
    for (int64_t q = 0; q < chunks2; ++q) {
      const int digit = int(q % 5);
      if (q < chunks5 && digit == 0) lo = decode(t, _mm512_loadu_si512(src + 64 * (q / 5)), &u4);
      __m512i code = ones;  // beyond Kp5: zero weights
      if (q < chunks5)
        code = digit == 4 ? u4 : _mm512_and_si512(_mm512_srl_epi16(lo, _mm_cvtsi32_si128(2 * digit)), three);
      out = _mm512_or_si512(out, _mm512_sll_epi16(code, _mm_cvtsi32_si128(int(2 * (q % 4)))));
      if (q % 4 == 3) {
        _mm512_storeu_si512(dst + 64 * (q / 4), out);
        out = _mm512_setzero_si512();
      }
    }
  }
}

}  // namespace

// 16 rows at a time per 5-trit block: each row's 64 bytes decoded once into the 2-bit bytes of
// chunks 0-3 and the codes of chunk 4, both transposed by dwords (a dword: 4 consecutive k of
// one row), chunks 0-3 split by shift + AND, as unpack16 in kernels_avx512.cpp.
TB_VBMI void unpack5_panel_vbmi(const GemmProblem& p, int64_t n, int64_t rows, uint8_t* panel) {
  const Trit5Regs t = load_tables();
  const __m512i three = _mm512_set1_epi8(3);
  for (int64_t b = 0; b < p.k_pad / kBlockK5; ++b)
    for (int64_t v = 0; 16 * v < rows; ++v) {
      const int64_t real = std::min<int64_t>(16, rows - 16 * v);  // rows past it: zero bytes
      const uint8_t* w = p.w + (n + 16 * v) * p.ldw + 64 * b;
      __m512i lo[16], u4[16];
      #pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) {
        const __m512i c = r < real ? _mm512_loadu_si512(w + r * p.ldw) : _mm512_setzero_si512();
        if (r < real) _mm_prefetch(reinterpret_cast<const char*>(w + r * p.ldw + 128), _MM_HINT_T0);
        lo[r] = decode(t, c, &u4[r]);
      }
      transpose16(lo);
      transpose16(u4);
      uint8_t* dst = panel + (16 * 5 * b * kPanelVecs + v) * 64;  // group q = 16 (5 b + i) + j
      #pragma GCC unroll 4
      for (int i = 0; i < 4; ++i)
        #pragma GCC unroll 16
        for (int j = 0; j < 16; ++j)
          _mm512_store_si512(dst + (16 * i + j) * kPanelVecs * 64,
                             _mm512_and_si512(_mm512_srli_epi16(lo[j], 2 * i), three));
      #pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) _mm512_store_si512(dst + (64 + j) * kPanelVecs * 64, u4[j]);
    }
}

Kernels with_vbmi(Kernels k) {
  k.unpack5 = unpack5_vbmi;
  k.gemv5 = gemv5_vbmi;
  k.gemm3 = gemm3_panels_avx512;
  return k;
}

// kAvx512Kernels is constant-initialised (function addresses only), so it is complete before
// this dynamic initialisation runs.
const Kernels kAvx512VbmiKernels = with_vbmi(kAvx512Kernels);

}  // namespace tbn

#endif  // x86-64
