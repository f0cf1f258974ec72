// AMX (Advanced Matrix Extensions) prefill kernel: the int8 tile multiply-add TDPBSUD over the
// AVX-512 panel's unpacked codes (kernels.h). cpu_features.cpp selects kAmxKernels only when the
// CPU has AMX-TILE and AMX-INT8 and the OS has granted this process the tile state.
//
// One TDPBSUD multiplies a tile of 16 tokens x 64 activations (int8, one token per tile row)
// by a tile of 16 groups of 4 k x 16 output rows (unsigned codes u, 4 consecutive k of one
// row per dword: exactly one 64-byte vector of the panel per tile row) into 16 x 16 int32
// sums of u * x: 16K multiply-adds per instruction against 64 for a VPDPBUSD. The activation
// tile loads straight from the quantized input (row stride ldq), the code tile from the panel
// (row stride kPanelVecs * 64), and the sums are the same integers as every other path's.
#if defined(__x86_64__) || defined(_M_X64)

#include <algorithm>
#include <cstdint>

#include "amx_common.h"
#include "kernels.h"

namespace tbn {
namespace {

// Tiles: C[i][j] = tmm(2 i + j) accumulates token tile i x row vector j; A[i] = tmm(4 + i) holds
// token tile i's activations for 64 k, B[j] = tmm(6 + j) row vector j's codes for the same 64 k.
// 2 x 2 blocking: per 64 k, four tile loads feed four multiply-adds.

// Token tile 0 has rows0 tokens (1..16), token tile 1 rows1 (0..16; 0: unused). A C tile and its
// A tile have the same rows: a tile load of fewer rows reads no row past the last token.
void configure(int rows0, int rows1) {
  const uint8_t r0 = uint8_t(rows0), r1 = uint8_t(rows1 ? rows1 : 16);
  configure_tiles({r0, r0, r1, r1, r0, r1, 16, 16});
}

// Sums of u * x for token tiles 0 (and 1 if TwoA) from x (row stride ldq) and panel vectors v
// (and v + 1 if TwoB), over `steps` x 64 k, into sums[2 i + j] (16 x 16 int32 each).
template <bool TwoA, bool TwoB>
void tile_block(const int8_t* x, int64_t ldq, const uint8_t* panel, int64_t v, int64_t steps,
                int32_t (*sums)[16 * 16]) {
  TB_TILE_ZERO(0);
  if (TwoB) TB_TILE_ZERO(1);
  if (TwoA) TB_TILE_ZERO(2);
  if (TwoA && TwoB) TB_TILE_ZERO(3);
  constexpr int64_t kCodeStride = kPanelVecs * 64;  // bytes between the panel's groups of 4 k
  const uint8_t* b = panel + v * 64;
  for (int64_t s = 0; s < steps; ++s, x += 64, b += 16 * kCodeStride) {
    TB_TILE_LOAD(4, x, ldq);
    if (TwoA) TB_TILE_LOAD(5, x + 16 * ldq, ldq);
    TB_TILE_LOAD(6, b, kCodeStride);
    if (TwoB) TB_TILE_LOAD(7, b + 64, kCodeStride);
    TB_TILE_DPBSUD(0, 4, 6);
    if (TwoB) TB_TILE_DPBSUD(1, 4, 7);
    if (TwoA) TB_TILE_DPBSUD(2, 5, 6);
    if (TwoA && TwoB) TB_TILE_DPBSUD(3, 5, 7);
  }
  TB_TILE_STORE(0, sums[0], 64);
  if (TwoB) TB_TILE_STORE(1, sums[1], 64);
  if (TwoA) TB_TILE_STORE(2, sums[2], 64);
  if (TwoA && TwoB) TB_TILE_STORE(3, sums[3], 64);
}

using BlockFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, int64_t, int32_t (*)[16 * 16]);
// [two_a][two_b]
constexpr BlockFn kBlocks[2][2] = {{tile_block<false, false>, tile_block<false, true>},
                                   {tile_block<true, false>, tile_block<true, true>}};

// Below this many tokens the AVX-512 kernels run instead: for the ternary weights, whose
// AVX-512 kernel unpacks codes with shifts and ANDs, amx wins from 12 (1.13x), for the int8
// table, whose codes need no unpacking there, from 16 (1.05-1.13x; 0.78-0.80x at 8;
// BENCHMARKS.md, "An Intel Xeon with AMX").
constexpr int64_t kAmxMinM = 12;
constexpr int64_t kAmxMinMTable = 16;
// Every panel multiplies all tokens of a group; the group's activations (up to 256 x Kp bytes:
// 1.7 MiB at K = 6912) then stay in the 2 MiB L2 from panel to panel. Longer inputs take the
// rows once per group (each panel unpacked once per group).
constexpr int64_t kAmxGroupTokens = 256;

// The activations of a product: m tokens of k_pad int8 values, row stride ldq.
struct AmxInput {
  const int8_t* xq;
  int64_t ldq;
  int64_t m;
  int64_t k_pad;
};

// Output rows [n0, n1) of a product, all its tokens: for each panel of up to
// kPanelRows rows, unpack(n, rows, panel) fills the panel's codes (kernels.h layout over
// x.k_pad), then store(m, count, n, sums, keep) receives the sums of u * x of `count` tokens
// from m and the 16 rows from n (sums[t * 16 + j]; only the rows in keep are real).
template <class Unpack, class Store>
void amx_panels(const AmxInput& x, int64_t n0, int64_t n1, const Unpack& unpack, const Store& store) {
  thread_local AlignedBuffer buffer;  // one thread's panel: kPanelRows x Kp bytes
  uint8_t* panel = static_cast<uint8_t*>(buffer.get(size_t(kPanelRows * x.k_pad)));
  alignas(64) int32_t sums[4][16 * 16];
  const int64_t steps = x.k_pad / 64;
  int configured = -1;  // rows0 + 17 * rows1 of the loaded configuration
  // equal token groups of at most kAmxGroupTokens, in whole pairs of token tiles but the last
  const int64_t groups = (x.m + kAmxGroupTokens - 1) / kAmxGroupTokens;
  const int64_t group = ((x.m + groups - 1) / groups + 31) / 32 * 32;
  for (int64_t m0 = 0; m0 < x.m; m0 += group)
  for (int64_t n = n0; n < n1; n += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, n1 - n);
    const int64_t nv = (rows + 15) / 16;
    const uint16_t last_keep = uint16_t((1u << (rows - 16 * (nv - 1))) - 1u);
    unpack(n, rows, panel);
    const int64_t m1 = std::min(x.m, m0 + group);
    for (int64_t m = m0; m < m1; m += 32) {
      const int rows0 = int(std::min<int64_t>(16, m1 - m));
      const int rows1 = int(std::clamp<int64_t>(m1 - m - 16, 0, 16));
      if (rows0 + 17 * rows1 != configured) {
        configure(rows0, rows1);
        configured = rows0 + 17 * rows1;
      }
      for (int64_t v = 0; v < nv; v += 2) {
        const bool two_b = v + 1 < nv;
        kBlocks[rows1 > 0][two_b](x.xq + m * x.ldq, x.ldq, panel, v, steps, sums);
        for (int i = 0; i < (rows1 > 0 ? 2 : 1); ++i)
          for (int j = 0; j < (two_b ? 2 : 1); ++j)
            store(m + 16 * i, i ? rows1 : rows0, n + 16 * (v + j), sums[2 * i + j],
                  v + j == nv - 1 ? last_keep : uint16_t(0xFFFF));
      }
    }
  }
  if (configured >= 0) release_tiles();
}

// A ternary product on AMX: panels from 2-bit (unpack_panel_avx512), 5-trit (unpack5_panel_vbmi)
// or 3-trit rows (unpack3_panel_avx512), results through the AVX-512 panel kernel's epilogue.
template <void (*Unpack)(const GemmProblem&, int64_t, int64_t, uint8_t*)>
void ternary_panels(const GemmProblem& p, int64_t n0, int64_t n1) {
  amx_panels(
      AmxInput{p.xq, p.ldq, p.m, p.k_pad}, n0, n1,
      [&](int64_t n, int64_t rows, uint8_t* panel) { Unpack(p, n, rows, panel); },
      [&](int64_t m, int64_t count, int64_t n, const int32_t* sums, uint16_t keep) {
        store_rows_avx512(p, m, count, n, sums, 16, keep);
      });
}

void gemm_amx(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.m < kAmxMinM)
    kAvx512Kernels.gemm(p, n0, n1);
  else
    ternary_panels<unpack_panel_avx512>(p, n0, n1);
}

// 5-trit weights decoded straight into the panel: one pass instead of two (to 2-bit rows, then
// into the panel).
bool gemm5_amx(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.m < kAmxMinM) return false;
  ternary_panels<unpack5_panel_vbmi>(p, n0, n1);
  return true;
}

// The int8 table (lm_head) for several tokens: its codes (w + 128, unsigned) transposed into
// the same panel layout, the sums of code * x through the AVX-512 int8 kernel's epilogue.
void int8_gemm_amx(const Int8Problem& p, int64_t n0, int64_t n1) {
  if (p.m < kAmxMinMTable) {
    kAvx512Kernels.int8_gemm(p, n0, n1);
    return;
  }
  amx_panels(
      AmxInput{p.xq, p.ldq, p.m, p.k_pad}, n0, n1,
      [&](int64_t n, int64_t rows, uint8_t* panel) { unpack_int8_panel_avx512(p, n, rows, panel); },
      [&](int64_t m, int64_t count, int64_t n, const int32_t* sums, uint16_t keep) {
        store_int8_rows_avx512(p, m, count, n, sums, 16, keep);
      });
}

// 3-trit weights decoded straight into the panel; below kAmxMinM tokens the AVX-512 panels.
void gemm3_amx(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.m < kAmxMinM)
    gemm3_panels_avx512(p, n0, n1);
  else
    ternary_panels<unpack3_panel_avx512>(p, n0, n1);
}

Kernels with_amx(Kernels k) {
  k.gemm = gemm_amx;
  k.gemm5 = gemm5_amx;
  k.gemm3 = gemm3_amx;
  k.int8_gemm = int8_gemm_amx;
  k.int4_gemm = int4_gemm_avx512_prefetch;  // Intel cores want the software prefetch (int4_avx512.cpp)
  k.attention_partial = attention_partial_amx;
  return k;
}

}  // namespace

// kAvx512Kernels is constant-initialised (function addresses only), so it is complete before
// this dynamic initialisation runs (kAvx512VbmiKernels, another file's dynamic initialisation,
// might not be).
const Kernels kAmxKernels = with_amx(with_vbmi(kAvx512Kernels));

}  // namespace tbn

#endif  // x86-64
