// Int8 KV cache kernels, portable C++: quantization of new keys / values, the scalar twin of
// the SIMD attention kernels, and the merge of partial softmax states.
// Layouts: caches int8 (L, D) per (batch, kv head), row j = position j; scales float32 (L,).
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"

namespace tbn {

void kv_quantize_scalar(const void* x, DType dt, int64_t d, int8_t* q, float* scale) {
  float amax = 0.f;
  for (int64_t t = 0; t < d; ++t) amax = std::max(amax, std::fabs(load_float(x, dt, t)));
  const float s = amax / 127.0f;  // as reference.kv_quantize: 0 for an all-zero vector
  *scale = s;
  for (int64_t t = 0; t < d; ++t) {
    const float r = s > 0.f ? std::nearbyint(load_float(x, dt, t) / s) : 0.f;
    q[t] = int8_t(std::min(std::max(r, -127.f), 127.f));
  }
}

namespace {

// q . k over d dims in 8 interleaved partial sums: independent lanes the compiler can keep in
// SIMD registers of any ISA (a single running sum would be one serial chain of adds).
float dot_i8(const float* q, const int8_t* k, int64_t d) {
  constexpr int64_t kLanes = 8;
  float part[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= d; t += kLanes)
    for (int64_t u = 0; u < kLanes; ++u) part[u] += q[t + u] * float(k[t + u]);
  for (; t < d; ++t) part[0] += q[t] * float(k[t]);
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t u = 0; u < width; ++u) part[u] += part[u + width];
  return part[0];
}

}  // namespace

void attention_partial_scalar(const AttentionProblem& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1, float* m,
                              float* l, float* acc) {
  // Online softmax (the state is rescaled whenever a block raises a row's maximum), so no
  // exponent ever exceeds 0. Blocks outermost: a block's keys and values are read from memory
  // once and reused from L1 by every row. Hidden positions are skipped, never exponentiated.
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t d = p.d;
  std::fill(m, m + (r1 - r0), kNegInf);
  std::fill(l, l + (r1 - r0), 0.f);
  std::fill(acc, acc + (r1 - r0) * d, 0.f);
  float s[kAttentionBlock];  // scores of one row over the block; kNegInf = hidden
  for (int64_t c0 = j0; c0 < j1; c0 += kAttentionBlock) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % p.nq;
      const int64_t c1 = std::min({j1, c0 + kAttentionBlock, p.end[i]});
      if (c1 <= c0) continue;
      const uint8_t* visible = p.mask ? p.mask + i * p.ld_mask : nullptr;
      const float* q = p.q + r * d;
      float block_max = kNegInf;
      for (int64_t j = c0; j < c1; ++j) {
        s[j - c0] = kNegInf;
        if (visible && !visible[j]) continue;
        s[j - c0] = dot_i8(q, p.k + j * d, d) * p.k_scale[j] * p.scale;
        block_max = std::max(block_max, s[j - c0]);
      }
      if (block_max == kNegInf) continue;  // the row sees nothing in this block
      float& mr = m[r - r0];
      float* out = acc + (r - r0) * d;
      if (block_max > mr) {
        const float alpha = std::exp(mr - block_max);  // 0 while mr is still -inf
        l[r - r0] *= alpha;
        for (int64_t t = 0; t < d; ++t) out[t] *= alpha;
        mr = block_max;
      }
      for (int64_t j = c0; j < c1; ++j) {
        if (s[j - c0] == kNegInf) continue;
        const float e = std::exp(s[j - c0] - mr);
        l[r - r0] += e;
        const float w = e * p.v_scale[j];
        for (int64_t t = 0; t < d; ++t) out[t] += w * float(p.v[j * d + t]);
      }
    }
  }
}

void attention_merge(const float* m, const float* l, const float* acc, int64_t parts, int64_t stride, int64_t d,
                     float* out) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < parts; ++s) mx = std::max(mx, m[s * stride]);
  if (mx == -std::numeric_limits<float>::infinity()) {  // no visible position: zeros, not 0 / 0
    std::fill(out, out + d, 0.f);
    return;
  }
  float w[kMaxAttentionParts];  // e^(m_s - M): 0 for parts that saw nothing
  float sum = 0.f;
  for (int64_t s = 0; s < parts; ++s) {
    w[s] = std::exp(m[s * stride] - mx);
    sum += w[s] * l[s * stride];
  }
  const float inv = 1.f / sum;
  // Dims in chunks, parts in the outer loop, so the compiler vectorizes the inner loops (one dim
  // at a time over a run-time number of parts stayed scalar: ~250 ns per row, 11% of a 512-token
  // prompt's attention on the Zen 3). A chunk reads every part before writing out: out may alias
  // a part.
  constexpr int64_t kChunk = 64;
  for (int64_t t0 = 0; t0 < d; t0 += kChunk) {
    const int64_t n = std::min(kChunk, d - t0);
    float o[kChunk];
    for (int64_t t = 0; t < n; ++t) o[t] = w[0] * acc[t0 + t];
    for (int64_t s = 1; s < parts; ++s) {
      const float* a = acc + s * stride * d + t0;
      for (int64_t t = 0; t < n; ++t) o[t] += w[s] * a[t];
    }
    for (int64_t t = 0; t < n; ++t) out[t0 + t] = o[t] * inv;
  }
}

}  // namespace tbn
