// Int8 KV cache kernels, portable C++ (the first step of INT8 attention: SIMD paths to come).
// Layouts: caches int8 (L, D) per (batch, kv head), row j = position j; scales float32 (L,).
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"

namespace tbn {

void kv_quantize_row(const float* x, int64_t d, int8_t* q, float* scale) {
  float amax = 0.f;
  for (int64_t t = 0; t < d; ++t) amax = std::max(amax, std::fabs(x[t]));
  const float s = amax / 127.0f;  // as reference.kv_quantize: 0 for an all-zero vector
  *scale = s;
  for (int64_t t = 0; t < d; ++t) {
    const float r = s > 0.f ? std::nearbyint(x[t] / s) : 0.f;
    q[t] = int8_t(std::min(std::max(r, -127.f), 127.f));
  }
}

void int8_attention_row(const float* q, const int8_t* k, const float* k_scale, const int8_t* v,
                        const float* v_scale, const uint8_t* mask, int64_t n, int64_t d, float scale, float* scores,
                        float* out) {
  // scores_j = (q . k_j) * k_scale_j * scale over the visible positions; softmax with the
  // maximum subtracted (stable for any magnitude); out = sum_j p_j * v_scale_j * v_j.
  // Hidden positions are skipped in every pass, so no exp(-inf) or 0 * garbage is evaluated.
  float m = -std::numeric_limits<float>::infinity();
  bool any = false;
  for (int64_t j = 0; j < n; ++j) {
    if (mask && !mask[j]) continue;
    float dot = 0.f;
    for (int64_t t = 0; t < d; ++t) dot += q[t] * float(k[j * d + t]);
    scores[j] = dot * k_scale[j] * scale;
    m = std::max(m, scores[j]);
    any = true;
  }
  std::fill(out, out + d, 0.f);
  if (!any) return;  // nothing visible: zeros, where a plain softmax would give 0/0 = NaN
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    if (mask && !mask[j]) continue;
    scores[j] = std::exp(scores[j] - m);
    sum += scores[j];
  }
  for (int64_t j = 0; j < n; ++j) {
    if (mask && !mask[j]) continue;
    const float w = scores[j] * v_scale[j];
    for (int64_t t = 0; t < d; ++t) out[t] += w * float(v[j * d + t]);
  }
  for (int64_t t = 0; t < d; ++t) out[t] /= sum;
}

}  // namespace tbn
