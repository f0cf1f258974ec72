// The portable 3-trit -> 2-bit unpacking (format: kernels.h, torch_bitnet/packing.py).
#include <cstring>

#include "kernels.h"

namespace tbn {

// Row n's word of group j is 16-bit word n % 32 of vector j of tile n / 32. Weight k of a 2-bit
// row is bits 2 (k % 256 / 64) of byte 64 (k / 256) + k % 64.
void unpack3_scalar(const GemmProblem& p, int64_t n, int64_t rows, uint8_t* w2, int64_t k_pad2) {
  const int64_t words = p.ldw / 64, k_pad3 = words * kGroupK3, row_bytes = k_pad2 / 4;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = n + r;
    const uint8_t* tile = p.w + row / kTileN3 * p.ldw + 2 * (row % kTileN3);
    uint8_t* dst = w2 + r * row_bytes;
    std::memset(dst, 0, size_t(row_bytes));
    for (int64_t k = 0; k < k_pad2; ++k) {
      uint8_t code = 1;  // beyond Kp3: zero weights
      if (k < k_pad3) {
        const int64_t j = k / kGroupK3, in_word = k % kGroupK3;
        const unsigned word = unsigned(tile[64 * j]) | unsigned(tile[64 * j + 1]) << 8;
        code = trit3_code((word >> (5 * (in_word / 3))) & 31u, int(in_word % 3));
      }
      dst[64 * (k / 256) + k % 64] |= uint8_t(code << (2 * (k % 256 / 64)));
    }
  }
}

}  // namespace tbn
