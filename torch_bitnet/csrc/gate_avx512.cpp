// AVX-512 (F/BW) squared-ReLU gating (kernels.h: relu2_gate), 16 floats per step. The 16-bit
// roundings are the integer round-to-nearest-even of float_to_bf16 (NaN -> 0x7FC0) and the
// hardware's float -> half conversion, which rounds to nearest even as float_to_f16 does.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include "kernels.h"

#define TB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define TB_AVX512_INLINE TB_AVX512 inline __attribute__((always_inline))

namespace tbn {
namespace {

TB_AVX512_INLINE __m512 bf16x16_to_float(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

TB_AVX512_INLINE __m256i float_to_bf16x16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

TB_AVX512_INLINE __m512 round_bf16(__m512 f) { return bf16x16_to_float(float_to_bf16x16(f)); }

TB_AVX512_INLINE __m512 round_f16(__m512 f) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

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
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(gp + i),
                            _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
      break;
    }
  }
  const int64_t elem = dt == DType::F32 ? 4 : 2;
  relu2_gate_scalar(static_cast<char*>(g) + n16 * elem, static_cast<const char*>(u) + n16 * elem, dt, n - n16);
}

}  // namespace tbn

#endif  // x86-64
