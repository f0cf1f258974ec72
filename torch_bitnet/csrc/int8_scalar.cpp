// Portable C++ kernels of the int8 per-row weights (lm_head / embedding table): the reference
// path of the extension and the fallback on CPUs without AVX2. Plain loops, baseline ISA.
#include "kernels.h"

namespace tbn {

void int8_gemm_scalar(const Int8Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = p.w + n * p.k_pad;
    for (int64_t m = 0; m < p.m; ++m) {
      const int8_t* x = p.xq + m * p.ldq;
      // |acc| <= 127 * 128 * K < 2^31 for K <= 2^16 (checked by the adapter)
      int32_t acc = 0;
      for (int64_t k = 0; k < p.k_pad; ++k) acc += (int32_t(w[k]) - 128) * x[k];
      store_int8_result(p, m, n, acc);
    }
  }
}

void int8_embedding_rows(const int64_t* ids, int64_t count, const uint8_t* w, int64_t ldw, const float* scale,
                         int64_t d, void* out, DType dt) {
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t* row = w + ids[i] * ldw;
    const float s = scale[ids[i]];
    // (code - 128) is exact in float32: one rounding, in the multiply (and one in the store)
    for (int64_t j = 0; j < d; ++j) store_float(out, dt, i * d + j, float(int32_t(row[j]) - 128) * s);
  }
}

}  // namespace tbn
