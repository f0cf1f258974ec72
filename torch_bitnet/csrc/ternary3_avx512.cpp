// AVX-512 kernels of the 3-trit weight format (kernels.h, torch_bitnet/packing.py): the decode
// GEMV by table lookup (AVX-512 BW) and the unpacking into the prefill panel (AVX-512 VBMI).
// Per-function target attributes, so the library still loads on any x86-64; cpu_features.cpp
// selects these tables only on CPUs with the instructions.
#if defined(__x86_64__) || defined(_M_X64)

#include <algorithm>
#include <cstring>

#include "avx512_common.h"
#include "kernels.h"

namespace tbn {
namespace {

// lut3's entries as sums of digit * activation (digits 0..2, the codes u; one VPDPBUSD per 16
// entries): byte d of dword lane l of kLut3Digits.d[h] is digit d of the entry that VPACKSSDW
// puts at lane l of the result (it interleaves its two sources by 4 dwords per 128-bit lane:
// entry 8 (l / 4) + l % 4 from source 0, that + 4 from source 1). Entries 27-31 have digits
// 1, 1, 1: their sum minus the activations' sum is 0.
struct Lut3Digits {
  uint32_t d[2][16];
};

constexpr Lut3Digits make_lut3_digits() {
  Lut3Digits t{};
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 16; ++l) {
      t.d[h][l] = trit3_codes(unsigned(8 * (l / 4) + l % 4 + 4 * h));
    }
  return t;
}

constexpr Lut3Digits kLut3Digits = make_lut3_digits();

// Words between the int16 sums' widenings: a word adds three table entries of |e| <= 3 * 128
// per row, so 28 words keep |sum| <= 32256 < 2^15.
constexpr int64_t kWidenWords = 28;
// Bytes ahead of each tile's stream prefetched into L1: 1 KiB streamed 2-3% faster than 2 KiB
// in a standalone harness (256 B and 4 KiB ~12% slower), and a whole decode step 0.8% faster
// (BENCHMARKS.md, eleventh session).
constexpr int64_t kPrefetch3 = 1024;

// Sums of w * x of NT tiles from tile t0, all of K: sums[t][r] for row r of tile t0 + t.
template <int NT>
TB_AVX512 void gemv3_tiles(const GemmProblem& p, int64_t t0, int32_t (*sums)[kTileN3]) {
  const int64_t words = p.ldw / 64;
  const uint8_t* w = p.w + t0 * p.ldw;
  __m512i part[NT], lo[NT], hi[NT];  // int16 partial sums; int32 sums of rows 0-15 and 16-31
  #pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) part[t] = lo[t] = hi[t] = _mm512_setzero_si512();
  for (int64_t j0 = 0; j0 < words; j0 += kWidenWords) {
    const int64_t j1 = std::min(words, j0 + kWidenWords);
    for (int64_t j = j0; j < j1; ++j) {
      const int16_t* l = p.lut + 3 * kLut3Entries * j;
      const __m512i l0 = _mm512_loadu_si512(l), l1 = _mm512_loadu_si512(l + kLut3Entries);
      const __m512i l2 = _mm512_loadu_si512(l + 2 * kLut3Entries);
      #pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        const uint8_t* v = w + t * p.ldw + 64 * j;
        _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetch3, _MM_HINT_T0);
        const __m512i x = _mm512_loadu_si512(v);
        // VPERMW reads the low 5 bits of each word: index 0 as is, 1 and 2 shifted down
        part[t] = _mm512_add_epi16(part[t], _mm512_permutexvar_epi16(x, l0));
        part[t] = _mm512_add_epi16(part[t], _mm512_permutexvar_epi16(_mm512_srli_epi16(x, 5), l1));
        part[t] = _mm512_add_epi16(part[t], _mm512_permutexvar_epi16(_mm512_srli_epi16(x, 10), l2));
      }
    }
    #pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      lo[t] = _mm512_add_epi32(lo[t], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(part[t])));
      hi[t] = _mm512_add_epi32(hi[t], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(part[t], 1)));
      part[t] = _mm512_setzero_si512();
    }
  }
  #pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) {
    _mm512_storeu_si512(sums[t], lo[t]);
    _mm512_storeu_si512(sums[t] + 16, hi[t]);
  }
}

using Gemv3Fn = void (*)(const GemmProblem&, int64_t, int32_t (*)[kTileN3]);
constexpr Gemv3Fn kGemv3[kTiles3] = {gemv3_tiles<1>, gemv3_tiles<2>, gemv3_tiles<3>, gemv3_tiles<4>};

}  // namespace

// Per group: its 3 activations (and a 4th, multiplied by digit 0) broadcast as a dword, the
// sums of u * x of 2 x 16 entries minus the activations' sum, packed to int16 (|e| <= 384).
TB_AVX512 void lut3_avx512(const int8_t* xq, int64_t k_pad3, int16_t* lut) {
  const __m512i digits0 = _mm512_loadu_si512(kLut3Digits.d[0]), digits1 = _mm512_loadu_si512(kLut3Digits.d[1]);
  const __m512i ones = _mm512_set1_epi32(0x010101);
  const int64_t groups = k_pad3 / 3;
  for (int64_t g = 0; g < groups; ++g) {
    // the 4-byte load of the last group would read past the activations: a masked one
    int32_t x4;
    if (g + 1 < groups)
      std::memcpy(&x4, xq + 3 * g, 4);
    else
      x4 = _mm_cvtsi128_si32(_mm_maskz_loadu_epi8(0x7, xq + 3 * g));
    const __m512i x = _mm512_set1_epi32(x4);
    const __m512i neg_sum = _mm512_sub_epi32(_mm512_setzero_si512(), dpbusd(_mm512_setzero_si512(), ones, x));
    const __m512i e0 = dpbusd(neg_sum, digits0, x), e1 = dpbusd(neg_sum, digits1, x);
    _mm512_storeu_si512(lut + kLut3Entries * g, _mm512_packs_epi32(e0, e1));
  }
}

// Whole tiles, kTiles3 at a time; a tile's rows outside [n0, n1) are computed and not stored
// (ops.cpp hands a token's rows out in whole tiles, but the last tile of a weight whose N is not
// a multiple of 32 ends inside). The sums are of w * x; the epilogue wants u * x = w * x + x.
TB_AVX512 void gemv3_avx512(const GemmProblem& p, int64_t n0, int64_t n1) {
  alignas(64) int32_t sums[kTiles3][kTileN3];
  const __m512i xsum = _mm512_set1_epi32(p.xsum[0]);
  const int64_t t_end = (n1 + kTileN3 - 1) / kTileN3;
  for (int64_t t0 = n0 / kTileN3; t0 < t_end; t0 += kTiles3) {
    const int nt = int(std::min<int64_t>(kTiles3, t_end - t0));
    kGemv3[nt - 1](p, t0, sums);
    for (int t = 0; t < nt; ++t)
      for (int h = 0; h < 2; ++h) {
        const int64_t row0 = (t0 + t) * kTileN3 + 16 * h;
        const int64_t a = std::max(row0, n0), b = std::min(row0 + 16, n1);
        if (a >= b) continue;
        int32_t* s = sums[t] + 16 * h;
        _mm512_store_si512(s, _mm512_add_epi32(_mm512_load_si512(s), xsum));
        const uint16_t keep = uint16_t(((1u << (b - row0)) - 1u) & ~((1u << (a - row0)) - 1u));
        store_rows_avx512(p, 0, 1, row0, s, 16, keep);
      }
  }
}

namespace {

// Words of one step of unpack3_panel: 32 (288 k), whose codes (32 bytes per k: one byte per row
// of a tile; 9 KiB per tile) stay in L1 between decoding and regathering.
constexpr int64_t kPanelWords3 = 32;
// Bytes of the tile's words prefetched ahead of the decoding: the weights come from DRAM, and
// without it a third of the unpacking's time stalled on their loads.
constexpr int64_t kUnpackPrefetch3 = 1024;

// The two tables of the decoding: pairs[i] = codes 0 and 1 of index i (low, high byte),
// third[i] = code 2 (trit3_code: indices 27-31 are three zero weights).
struct Trit3Pairs {
  int16_t pairs[32];
  int16_t third[32];
};

constexpr Trit3Pairs make_trit3_pairs() {
  Trit3Pairs t{};
  for (unsigned i = 0; i < 32; ++i) {
    t.pairs[i] = int16_t(trit3_codes(i) & 0xFFFF);
    t.third[i] = int16_t(trit3_codes(i) >> 16);
  }
  return t;
}

constexpr Trit3Pairs kTrit3Pairs = make_trit3_pairs();

// VPERMB index splitting 32 words into their low bytes (bytes 0-31) and high bytes (32-63).
struct ByteSplit {
  uint8_t idx[64];
};

constexpr ByteSplit make_byte_split() {
  ByteSplit s{};
  for (int b = 0; b < 32; ++b) {
    s.idx[b] = uint8_t(2 * b);
    s.idx[32 + b] = uint8_t(2 * b + 1);
  }
  return s;
}

constexpr ByteSplit kByteSplit = make_byte_split();

// VPERMT2B indices gathering, from 4 k x 32 rows of codes (k-major, 32 bytes per k), one panel
// vector of rows 16 h .. 16 h + 15: lane l's 4 bytes are the codes of row 16 h + l at the 4 k.
struct PanelGather {
  uint8_t idx[2][64];
};

constexpr PanelGather make_panel_gather() {
  PanelGather g{};
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 16; ++l)
      for (int d = 0; d < 4; ++d) g.idx[h][4 * l + d] = uint8_t(32 * d + 16 * h + l);
  return g;
}

constexpr PanelGather kPanelGather = make_panel_gather();

}  // namespace

// kPanelWords3 words (of every tile the panel's rows touch) at a time: the words' codes decoded
// k-major (two VPERMW per index, VPERMB splitting the byte pairs), then each 4 k regathered per
// 16-row panel vector (one VPERMT2B), the panel written in order.
TB_VBMI void unpack3_panel_avx512(const GemmProblem& p, int64_t n, int64_t rows, uint8_t* panel) {
  const int64_t words = p.ldw / 64, k_pad3 = words * kGroupK3;
  const __m512i pairs = _mm512_loadu_si512(kTrit3Pairs.pairs), third = _mm512_loadu_si512(kTrit3Pairs.third);
  const __m512i split = _mm512_loadu_si512(kByteSplit.idx);
  const __m512i gather[2] = {_mm512_loadu_si512(kPanelGather.idx[0]), _mm512_loadu_si512(kPanelGather.idx[1])};
  constexpr int64_t kChunkK = kPanelWords3 * kGroupK3, kTileCodes = kChunkK * kTileN3;
  // codes of up to 3 tiles (a panel of 64 rows from a row 16 mod 32 touches 3), + the last
  // word's spill past the chunk
  alignas(64) uint8_t codes[3 * kTileCodes + 64];
  const int64_t t_first = n / kTileN3, tiles = (n + rows - 1) / kTileN3 - t_first + 1;
  const int64_t nv = (rows + 15) / 16;
  for (int64_t k0 = 0; k0 < p.k_pad; k0 += kChunkK) {
    const int64_t k1 = std::min(p.k_pad, k0 + kChunkK);
    const int64_t j1 = std::min(words, (k1 + kGroupK3 - 1) / kGroupK3);
    for (int64_t t = 0; t < tiles; ++t) {
      const uint8_t* tile = p.w + (t_first + t) * p.ldw;
      uint8_t* c = codes + t * kTileCodes;
      for (int64_t j = k0 / kGroupK3; j < j1; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(tile + 64 * j) + kUnpackPrefetch3, _MM_HINT_T0);
        const __m512i x = _mm512_loadu_si512(tile + 64 * j);
        #pragma GCC unroll 3
        for (int m = 0; m < 3; ++m) {
          const __m512i idx = m ? _mm512_srli_epi16(x, 5 * m) : x;
          _mm512_storeu_si512(c, _mm512_permutexvar_epi8(split, _mm512_permutexvar_epi16(idx, pairs)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 64),
                              _mm512_castsi512_si256(_mm512_permutexvar_epi8(split, _mm512_permutexvar_epi16(idx, third))));
          c += 3 * kTileN3;
        }
      }
      if (k1 > k_pad3) {  // past Kp3: zero weights
        const int64_t from = std::max(k0, k_pad3);
        std::fill(codes + t * kTileCodes + (from - k0) * kTileN3, codes + t * kTileCodes + (k1 - k0) * kTileN3,
                  uint8_t(1));
      }
    }
    uint8_t* dst = panel + k0 / 4 * kPanelVecs * 64;
    for (int64_t q = 0; q < (k1 - k0) / 4; ++q)
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t row0 = n + 16 * v;
        const uint8_t* src = codes + (row0 / kTileN3 - t_first) * kTileCodes + 4 * q * kTileN3;
        _mm512_store_si512(dst + (q * kPanelVecs + v) * 64,
                           _mm512_permutex2var_epi8(_mm512_load_si512(src), gather[row0 / 16 % 2],
                                                    _mm512_load_si512(src + 64)));
      }
  }
}

}  // namespace tbn

#endif  // x86-64
