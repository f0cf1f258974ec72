// AVX2 versions of the per-token steps of a decoder layer (kernels.h: load_row, rope_row, add_rows,
// kv_quantize), 8 values per step, for float32 and bf16 rows; float16 rows, and rows whose
// vectors would not be whole (rope_row: half of head_dim not a multiple of 8; kv_quantize:
// head_dim not a multiple of 8), take the portable twins. Each performs the float operations
// of its portable twin (kernels_scalar.cpp, attention_scalar.cpp) in the same order, so every
// path gives the same bits. A decode token runs these on one thread between the parallel
// products: at the 2B-4T shapes the portable loops took ~2.3 ms per token on an AVX2-only
// Zen 3 (31 us per layer normalising rows, 30 the rotary embedding, 16 quantizing keys and
// values), while the other thread waits.
#if defined(__x86_64__) || defined(_M_X64)

#include <cmath>
#include <cstring>

#include "avx2_common.h"
#include "kernels.h"

namespace tbn {
namespace {

// Elements i .. i + 7 of x (float32 or bf16) as floats.
TB_AVX2_INLINE __m256 load8(const void* x, DType dt, int64_t i) {
  if (dt == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  return bf16x8_to_float(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
}

// y rounded to dt and back (round_to): float32 unchanged, bf16 through its bits.
TB_AVX2_INLINE __m256 round8(DType dt, __m256 y) { return dt == DType::F32 ? y : bf16x8_to_float(float_to_bf16x8(y)); }

// y rounded once to dt, stored at elements i .. i + 7 of out.
TB_AVX2_INLINE void store8(void* out, DType dt, int64_t i, __m256 y) {
  if (dt == DType::F32)
    _mm256_storeu_ps(static_cast<float*>(out) + i, y);
  else
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), float_to_bf16x8(y));
}

TB_AVX2_INLINE __m256 negate(__m256 v) { return _mm256_xor_ps(v, _mm256_set1_ps(-0.f)); }

}  // namespace

TB_AVX2 void load_row_avx2(const void* x, DType dt, int64_t k, const RowNorm* norm, float* out) {
  if (dt == DType::F16) {
    load_row_scalar(x, dt, k, norm, out);
    return;
  }
  const int64_t k8 = k & ~int64_t(7);
  // Lane j of sum_lo / sum_hi (j < 4 / j >= 4) adds x_i^2 for i = j, j + 8, j + 16, ... in that
  // order, as the portable loop's partial sum j (exact products of floats in double).
  __m256d sum_lo = _mm256_setzero_pd(), sum_hi = _mm256_setzero_pd();
  for (int64_t i = 0; i < k8; i += 8) {
    const __m256 v = load8(x, dt, i);
    _mm256_storeu_ps(out + i, v);
    if (!norm) continue;
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    sum_lo = _mm256_add_pd(sum_lo, _mm256_mul_pd(lo, lo));
    sum_hi = _mm256_add_pd(sum_hi, _mm256_mul_pd(hi, hi));
  }
  for (int64_t i = k8; i < k; ++i) out[i] = load_float(x, dt, i);
  if (!norm) return;
  alignas(32) double s[8];
  _mm256_store_pd(s, sum_lo);
  _mm256_store_pd(s + 4, sum_hi);
  for (int64_t i = k8; i < k; ++i) s[i % 8] += double(out[i]) * double(out[i]);
  for (int width = 4; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) s[j] += s[j + width];
  const float var = float(s[0] / double(k));
  const float r = float(1.0 / std::sqrt(double(var + norm->eps)));
  const __m256 rv = _mm256_set1_ps(r);
  for (int64_t i = 0; i < k8; i += 8) {
    const __m256 h = round8(dt, _mm256_mul_ps(_mm256_loadu_ps(out + i), rv));
    _mm256_storeu_ps(out + i, round8(dt, _mm256_mul_ps(load8(norm->weight, dt, i), h)));
  }
  for (int64_t i = k8; i < k; ++i)
    out[i] = round_to(dt, load_float(norm->weight, dt, i) * round_to(dt, out[i] * r));
}

TB_AVX2 void rope_row_avx2(const void* x, const float* c, const float* s, DType dt, int64_t d, void* out) {
  const int64_t half = d / 2;
  if (dt == DType::F16 || half % 8 != 0) {
    rope_row_scalar(x, c, s, dt, d, out);
    return;
  }
  for (int64_t i = 0; i < half; i += 8) {
    const __m256 x1 = load8(x, dt, i), x2 = load8(x, dt, i + half);
    const __m256 y1 = _mm256_add_ps(round8(dt, _mm256_mul_ps(x1, _mm256_loadu_ps(c + i))),
                                    round8(dt, _mm256_mul_ps(negate(x2), _mm256_loadu_ps(s + i))));
    const __m256 y2 = _mm256_add_ps(round8(dt, _mm256_mul_ps(x2, _mm256_loadu_ps(c + i + half))),
                                    round8(dt, _mm256_mul_ps(x1, _mm256_loadu_ps(s + i + half))));
    store8(out, dt, i, y1);
    store8(out, dt, i + half, y2);
  }
}

TB_AVX2 void kv_quantize_avx2(const void* x, DType dt, int64_t d, int8_t* q, float* scale) {
  if (dt == DType::F16 || d % 8 != 0) {
    kv_quantize_scalar(x, dt, d, q, scale);
    return;
  }
  // max(|x|, running): VMAXPS returns its second operand when the first is NaN, so NaNs are
  // skipped as std::max(amax, |x|) skips them; without NaNs the order of a max does not matter.
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps();
  for (int64_t t = 0; t < d; t += 8) vmax = _mm256_max_ps(_mm256_and_ps(load8(x, dt, t), abs_mask), vmax);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.f;
  for (int j = 0; j < 8; ++j) amax = std::max(amax, lanes[j]);
  const float s = amax / 127.0f;
  *scale = s;
  if (!(s > 0.f)) {
    std::memset(q, 0, size_t(d));
    return;
  }
  const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  // The low byte of each 32-bit lane: bytes 0, 4, 8, 12 of each 128-bit lane, then the two
  // lanes' 4-byte groups side by side.
  const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                             0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i join = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
  for (int64_t t = 0; t < d; t += 8) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(load8(x, dt, t), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // Operand order keeps a NaN as the portable std::min(std::max(r, -127), 127) does; the
    // conversion then gives 0x80000000, whose low byte 0 is what int8_t(NaN) stores there.
    r = _mm256_min_ps(hi, _mm256_max_ps(lo, r));
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(_mm256_cvttps_epi32(r), low_bytes), join);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + t), _mm256_castsi256_si128(b));
  }
}

TB_AVX2 void add_rows_avx2(const void* a, const void* b, DType dt, int64_t n, void* out) {
  int64_t i = 0;
  if (dt != DType::F16)
    for (; i + 8 <= n; i += 8) store8(out, dt, i, _mm256_add_ps(load8(a, dt, i), load8(b, dt, i)));
  const int64_t elem = dt == DType::F32 ? 4 : 2;
  add_rows_scalar(static_cast<const char*>(a) + i * elem, static_cast<const char*>(b) + i * elem, dt, n - i,
                  static_cast<char*>(out) + i * elem);
}

}  // namespace tbn

#endif  // x86-64
