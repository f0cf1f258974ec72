// AMX tile instructions shared by the AMX kernels (kernels_amx.cpp: products; attention_amx.cpp:
// prefill attention). Included only from x86-64 builds of them.
//
// The instructions are written as inline asm (tile numbers are immediates, and no -mamx flag is
// needed for the file) with a "memory" clobber, since the compiler cannot see which bytes a tile
// load or store touches. Palette 1: 8 tiles tmm0-7 of up to 16 rows x 64 bytes.
#pragma once

#include <cstdint>

#define TB_TILE_LOAD(t, base, stride) \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"(int64_t(stride)) : "memory")
#define TB_TILE_STORE(t, base, stride) \
  __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(base), "r"(int64_t(stride)) : "memory")
#define TB_TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
// c (16 x 16 int32) += a . b, per dword of 4 byte products; the letters give the signedness of
// a's and b's bytes (s: signed, u: unsigned). AT&T operand order: b, a, c.
#define TB_TILE_DPBSUD(c, a, b) __asm__ volatile("tdpbsud %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#define TB_TILE_DPBSSD(c, a, b) __asm__ volatile("tdpbssd %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#define TB_TILE_DPBUSD(c, a, b) __asm__ volatile("tdpbusd %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

namespace tbn {

// LDTILECFG's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of each tile
  uint8_t rows[16] = {};
};

// Configures tmm0-7 as rows[t] rows of 64 bytes. A load of fewer rows reads only those rows and
// a store writes only those, so a partial tile never touches memory past its last row.
inline void configure_tiles(const uint8_t (&rows)[8]) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = rows[t];
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(c));
}

// Gives the tile state back, so the OS need not save 8 KiB of tiles on every context switch.
inline void release_tiles() { __asm__ volatile("tilerelease" ::); }

}  // namespace tbn
