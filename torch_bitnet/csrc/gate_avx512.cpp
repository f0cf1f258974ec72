// AVX-512 (F/BW) squared-ReLU gating (kernels.h: relu2_gate), 16 floats per step, with the
// 16-bit roundings of avx512_float.h.
#if defined(__x86_64__) || defined(_M_X64)

#include "avx512_float.h"
#include "kernels.h"

#define TB_AVX512 TB_AVX512_FLOAT
#define TB_AVX512_INLINE TB_AVX512_FLOAT_INLINE

namespace tbn {
namespace {

// relu via max(0, g): vmaxps returns its second operand when one is NaN, so NaN stays NaN.
TB_AVX512_INLINE __m512 relu2(__m512 g) {
  const __m512 r = _mm512_max_ps(_mm512_setzero_ps(), g);
  return _mm512_mul_ps(r, r);
}

}  // namespace

TB_AVX512 void relu2_gate_avx512(void* g, const void* u, DType dt, int64_t n) {
  const int64_t n16 = n & ~int64_t(15);
  switch (dt) {
    case DType::F32: {
      float* gp = static_cast<float*>(g);
      const float* up = static_cast<const float*>(u);
      for (int64_t i = 0; i < n16; i += 16)
        _mm512_storeu_ps(gp + i, _mm512_mul_ps(relu2(_mm512_loadu_ps(gp + i)), _mm512_loadu_ps(up + i)));
      break;
    }
    case DType::BF16: {
      uint16_t* gp = static_cast<uint16_t*>(g);
      const uint16_t* up = static_cast<const uint16_t*>(u);
      for (int64_t i = 0; i < n16; i += 16) {
        const __m512 gv = bf16x16_to_float(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gp + i)));
        const __m512 uv = bf16x16_to_float(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(up + i)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(gp + i), float_to_bf16x16(_mm512_mul_ps(round_bf16(relu2(gv)), uv)));
      }
      break;
    }
    case DType::F16: {
      uint16_t* gp = static_cast<uint16_t*>(g);
      const uint16_t* up = static_cast<const uint16_t*>(u);
      for (int64_t i = 0; i < n16; i += 16) {
        const __m512 gv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gp + i)));
        const __m512 uv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(up + i)));
        const __m512 y = _mm512_mul_ps(round_f16(relu2(gv)), uv);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(gp + i), float_to_f16x16(y));
      }
      break;
    }
  }
  const int64_t elem = dt == DType::F32 ? 4 : 2;
  relu2_gate_scalar(static_cast<char*>(g) + n16 * elem, static_cast<const char*>(u) + n16 * elem, dt, n - n16);
}

}  // namespace tbn

#endif  // x86-64
