// The portable 5-trit -> 2-bit unpacking (format: kernels.h, torch_bitnet/packing.py).
#include "kernels.h"

namespace tbn {

// Both formats store 64 consecutive weights per 64-byte chunk: chunk q (weights 64q .. 64q + 63)
// is digit q % 5 of 5-trit block q / 5 and bits 2 (q % 4) of 2-bit block q / 4.
void unpack5_scalar(const uint8_t* w5, int64_t k_pad5, int64_t rows, uint8_t* w2, int64_t k_pad2) {
  const int64_t chunks5 = k_pad5 / 64, chunks2 = k_pad2 / 64;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = w5 + r * (k_pad5 / 5);
    uint8_t* dst = w2 + r * (k_pad2 / 4);
    std::memset(dst, 0, size_t(k_pad2 / 4));
    for (int64_t q = 0; q < chunks2; ++q) {
      uint8_t* d = dst + 64 * (q / 4);
      const int shift = int(2 * (q % 4));
      if (q >= chunks5) {  // beyond Kp5: zero weights, code 1
        for (int j = 0; j < 64; ++j) d[j] |= uint8_t(1u << shift);
        continue;
      }
      const uint8_t* s = src + 64 * (q / 5);
      const int digit = int(q % 5);
      for (int j = 0; j < 64; ++j) d[j] |= uint8_t(trit5_code(s[j], digit) << shift);
    }
  }
}

}  // namespace tbn
