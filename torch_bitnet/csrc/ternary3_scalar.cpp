// The portable 3-trit -> 2-bit unpacking (format: kernels.h, torch_bitnet/packing.py).
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace tbn {
namespace {

// trit3_codes of every index: one 4-byte store writes an index's codes.
struct Trit3Codes {
  uint32_t c[32];
};

constexpr Trit3Codes make_trit3_codes() {
  Trit3Codes t{};
  for (unsigned i = 0; i < 32; ++i) t.c[i] = trit3_codes(i);
  return t;
}

constexpr Trit3Codes kTrit3Codes = make_trit3_codes();

}  // namespace

// Row by row: the row's words (one per 64-byte vector of its tile: the tile, 18 KB at K = 2560,
// stays in L1 over its 32 rows) decoded into one code byte per k, then the 2-bit bytes built
// from them.
void unpack3_scalar(const GemmProblem& p, int64_t n, int64_t rows, uint8_t* w2, int64_t k_pad2) {
  const int64_t words = p.ldw / 64, k_pad3 = words * kGroupK3;
  thread_local std::vector<uint8_t> codes;  // one row's codes; 4 bytes of slack for the last store
  codes.resize(size_t(std::max(k_pad2, k_pad3) + 4));
  uint8_t* c = codes.data();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = n + r;
    const uint8_t* word = p.w + row / kTileN3 * p.ldw + 2 * (row % kTileN3);
    for (int64_t j = 0; j < words; ++j, word += 64) {
      const unsigned x = unsigned(word[0]) | unsigned(word[1]) << 8;
      for (int m = 0; m < 3; ++m) std::memcpy(c + kGroupK3 * j + 3 * m, &kTrit3Codes.c[(x >> (5 * m)) & 31u], 4);
    }
    if (k_pad2 > k_pad3) std::memset(c + k_pad3, 1, size_t(k_pad2 - k_pad3));  // beyond Kp3: zero weights
    pack_codes_2bit(c, k_pad2, w2 + r * (k_pad2 / 4));
  }
}

}  // namespace tbn
