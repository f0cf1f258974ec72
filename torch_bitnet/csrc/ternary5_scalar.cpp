// The portable 5-trit -> 2-bit unpacking (format: kernels.h, torch_bitnet/packing.py).
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace tbn {

// Row by row: each 5-trit block's 64 bytes decoded into one code byte per k (chunk i of the block
// is the 64 k from 320 b + 64 i: digit i of its bytes), then the 2-bit bytes built from them.
void unpack5_scalar(const uint8_t* w5, int64_t k_pad5, int64_t rows, uint8_t* w2, int64_t k_pad2) {
  thread_local std::vector<uint8_t> codes;  // one row's codes
  codes.resize(size_t(std::max(k_pad5, k_pad2)));
  uint8_t* c = codes.data();
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = w5 + r * (k_pad5 / 5);
    for (int64_t b = 0; b < k_pad5 / kBlockK5; ++b) {
      const uint8_t* s = src + 64 * b;
      uint8_t* cb = c + kBlockK5 * b;
      uint8_t low4[64];
      for (int j = 0; j < 64; ++j) low4[j] = kTrit5.low4[s[j]];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 64; ++j) cb[64 * i + j] = uint8_t((low4[j] >> (2 * i)) & 3);
      for (int j = 0; j < 64; ++j) cb[256 + j] = kTrit5.u4[s[j] & 63];
    }
    if (k_pad2 > k_pad5) std::memset(c + k_pad5, 1, size_t(k_pad2 - k_pad5));  // beyond Kp5: zero weights
    pack_codes_2bit(c, k_pad2, w2 + r * (k_pad2 / 4));
  }
}

}  // namespace tbn
