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

#include "kernels.h"

namespace tbn {
namespace {

// Tiles (palette 1: 8 tiles of up to 16 rows x 64 bytes). C[i][j] = tmm(2 i + j) accumulates
// token tile i x row vector j; A[i] = tmm(4 + i) holds token tile i's activations for 64 k,
// B[j] = tmm(6 + j) row vector j's codes for the same 64 k. 2 x 2 blocking: per 64 k, four
// tile loads feed four multiply-adds.
//
// The instructions are written as inline asm (tile numbers are immediates) with a "memory"
// clobber, since the compiler cannot see which bytes a tile load or store touches.
#define TB_TILE_LOAD(t, base, stride) \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"(int64_t(stride)) : "memory")
#define TB_TILE_STORE(t, base, stride) \
  __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(base), "r"(int64_t(stride)) : "memory")
#define TB_TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
// c += a (signed bytes) . b (unsigned bytes), dword by dword (AT&T order: b, a, c)
#define TB_TILE_DPBSUD(c, a, b) __asm__ volatile("tdpbsud %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

// LDTILECFG's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of each tile
  uint8_t rows[16] = {};
};

// Token tile 0 has rows0 tokens (1..16), token tile 1 rows1 (0..16; 0: unused). A C tile and its
// A tile have the same rows: a tile load of fewer rows reads only those rows (no read past the
// last token) and a store writes only those.
void configure(int rows0, int rows1) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64;
  const uint8_t r1 = uint8_t(rows1 ? rows1 : 16);
  c.rows[0] = c.rows[1] = c.rows[4] = uint8_t(rows0);
  c.rows[2] = c.rows[3] = c.rows[5] = r1;
  c.rows[6] = c.rows[7] = 16;
  __asm__ volatile("ldtilecfg %0" ::"m"(c));
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

// Below this many tokens the AVX-512 kernels run instead (measured: BENCHMARKS.md, AMX section).
constexpr int64_t kAmxMinM = 16;
// Every panel multiplies all tokens of a group; the group's activations (up to 256 x Kp bytes:
// 1.7 MiB at K = 6912) then stay in the 2 MiB L2 from panel to panel. Longer inputs take the
// rows once per group (each panel unpacked once per group).
constexpr int64_t kAmxGroupTokens = 256;

using UnpackFn = void (*)(const GemmProblem&, int64_t, int64_t, uint8_t*);

// Output rows [n0, n1) of p, all its tokens (p.m >= kAmxMinM), each panel filled by unpack.
void amx_panels(const GemmProblem& p, int64_t n0, int64_t n1, UnpackFn unpack) {
  thread_local AlignedBuffer buffer;  // one thread's panel: kPanelRows x Kp bytes
  uint8_t* panel = static_cast<uint8_t*>(buffer.get(size_t(kPanelRows * p.k_pad)));
  alignas(64) int32_t sums[4][16 * 16];
  const int64_t steps = p.k_pad / 64;
  int configured = -1;  // rows0 + 17 * rows1 of the loaded configuration
  // equal token groups of at most kAmxGroupTokens, in whole pairs of token tiles but the last
  const int64_t groups = (p.m + kAmxGroupTokens - 1) / kAmxGroupTokens;
  const int64_t group = ((p.m + groups - 1) / groups + 31) / 32 * 32;
  for (int64_t m0 = 0; m0 < p.m; m0 += group)
  for (int64_t n = n0; n < n1; n += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, n1 - n);
    const int64_t nv = (rows + 15) / 16;
    const uint16_t last_keep = uint16_t((1u << (rows - 16 * (nv - 1))) - 1u);
    unpack(p, n, rows, panel);
    const int64_t m1 = std::min(p.m, m0 + group);
    for (int64_t m = m0; m < m1; m += 32) {
      const int rows0 = int(std::min<int64_t>(16, m1 - m));
      const int rows1 = int(std::clamp<int64_t>(m1 - m - 16, 0, 16));
      if (rows0 + 17 * rows1 != configured) {
        configure(rows0, rows1);
        configured = rows0 + 17 * rows1;
      }
      const int8_t* x = p.xq + m * p.ldq;
      for (int64_t v = 0; v < nv; v += 2) {
        const bool two_b = v + 1 < nv;
        kBlocks[rows1 > 0][two_b](x, p.ldq, panel, v, steps, sums);
        for (int i = 0; i < (rows1 > 0 ? 2 : 1); ++i)
          for (int j = 0; j < (two_b ? 2 : 1); ++j)
            store_rows_avx512(p, m + 16 * i, i ? rows1 : rows0, n + 16 * (v + j), sums[2 * i + j], 16,
                              v + j == nv - 1 ? last_keep : uint16_t(0xFFFF));
      }
    }
  }
  // Give the tile state back, so the OS need not save 8 KiB of tiles on every context switch.
  if (configured >= 0) __asm__ volatile("tilerelease" ::);
}

void gemm_amx(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.m < kAmxMinM)
    kAvx512Kernels.gemm(p, n0, n1);
  else
    amx_panels(p, n0, n1, unpack_panel_avx512);
}

// 5-trit weights decoded straight into the panel: one pass instead of two (to 2-bit rows, then
// into the panel).
bool gemm5_amx(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.m < kAmxMinM) return false;
  amx_panels(p, n0, n1, unpack5_panel_vbmi);
  return true;
}

Kernels with_amx(Kernels k) {
  k.gemm = gemm_amx;
  k.gemm5 = gemm5_amx;
  return k;
}

}  // namespace

// kAvx512Kernels is constant-initialised (function addresses only), so it is complete before
// this dynamic initialisation runs (kAvx512VbmiKernels, another file's dynamic initialisation,
// might not be).
const Kernels kAmxKernels = with_amx(with_vbmi(kAvx512Kernels));

}  // namespace tbn

#endif  // x86-64
