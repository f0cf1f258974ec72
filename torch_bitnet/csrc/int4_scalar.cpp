// Portable C++ kernels of the int4 group weights (lm_head / embedding table): the reference path
// of the extension and the fallback on CPUs without AVX2. Plain loops, baseline ISA.
#include "kernels.h"

namespace tbn {

void int4_gemm_scalar(const Int4Problem& p, int64_t n0, int64_t n1) {
  const int64_t groups = p.k_pad / kInt4Group;
  for (int64_t n = n0; n < n1; ++n) {
    // Row n: dword r of every 64-byte line of its tile (16 rows x Kp / 2 bytes).
    const uint8_t* row = p.w + (n / kInt4Tile) * (kInt4Tile * p.k_pad / 2) + 4 * (n % kInt4Tile);
    const uint16_t* scale = p.w_scale + n * groups;
    for (int64_t m = 0; m < p.m; ++m) {
      const int8_t* x = p.xq + m * p.ldq;
      float s = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        // -8 sum x + sum u x = sum (u - 8) x, |d| <= 8 * 128 * 32: exact in int32 and in float32
        int32_t d = p.offset[m * groups + g];
        for (int64_t c = 4 * g; c < 4 * g + 4; ++c) {  // the group's 4 lines of 8 weights
          const uint8_t* b = row + 64 * c;
          const int8_t* xc = x + 8 * c;
          for (int j = 0; j < 4; ++j) d += (b[j] & 0x0F) * xc[j] + (b[j] >> 4) * xc[4 + j];
        }
        s += float(d) * bf16_to_float(scale[g]);
      }
      store_int4_result(p, m, n, s);
    }
  }
}

void int4_embedding_rows(const int64_t* ids, int64_t count, const uint8_t* w, const uint16_t* scale, int64_t k_pad,
                         int64_t d, void* out, DType dt) {
  const int64_t groups = k_pad / kInt4Group;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = ids[i];
    const uint8_t* row = w + (n / kInt4Tile) * (kInt4Tile * k_pad / 2) + 4 * (n % kInt4Tile);
    const uint16_t* s = scale + n * groups;
    for (int64_t k = 0; k < d; ++k) {
      const uint8_t b = row[64 * (k / 8) + (k % 4)];
      const int32_t u = (k % 8) < 4 ? (b & 0x0F) : (b >> 4);
      // (u - 8) is exact in float32: one rounding, in the multiply (and one in the store)
      store_float(out, dt, i * d + k, float(u - 8) * bf16_to_float(s[k / kInt4Group]));
    }
  }
}

}  // namespace tbn
