// AVX2 squared-ReLU gating (kernels.h: relu2_gate), 8 floats per step, float32 and bfloat16
// (the integer round-to-nearest-even of float_to_bf16, NaN -> 0x7FC0); float16 rows take the
// portable loop (the AVX2 path does not require F16C).
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include "avx2_common.h"
#include "kernels.h"


namespace tbn {
namespace {

// relu via max(0, g): vmaxps returns its second operand when one is NaN, so NaN stays NaN.
TB_AVX2_INLINE __m256 relu2(__m256 g) {
  const __m256 r = _mm256_max_ps(_mm256_setzero_ps(), g);
  return _mm256_mul_ps(r, r);
}

}  // namespace

TB_AVX2 void relu2_gate_avx2(void* g, const void* u, DType dt, int64_t n) {
  int64_t done = 0;
  if (dt == DType::F32) {
    float* gp = static_cast<float*>(g);
    const float* up = static_cast<const float*>(u);
    for (; done + 8 <= n; done += 8)
      _mm256_storeu_ps(gp + done, _mm256_mul_ps(relu2(_mm256_loadu_ps(gp + done)), _mm256_loadu_ps(up + done)));
  } else if (dt == DType::BF16) {
    uint16_t* gp = static_cast<uint16_t*>(g);
    const uint16_t* up = static_cast<const uint16_t*>(u);
    for (; done + 8 <= n; done += 8) {
      const __m256 gv = bf16x8_to_float(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gp + done)));
      const __m256 uv = bf16x8_to_float(_mm_loadu_si128(reinterpret_cast<const __m128i*>(up + done)));
      const __m256 r = bf16x8_to_float(float_to_bf16x8(relu2(gv)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(gp + done), float_to_bf16x8(_mm256_mul_ps(r, uv)));
    }
  }
  const int64_t elem = dt == DType::F32 ? 4 : 2;
  relu2_gate_scalar(static_cast<char*>(g) + done * elem, static_cast<const char*>(u) + done * elem, dt, n - done);
}

}  // namespace tbn

#endif  // x86-64
