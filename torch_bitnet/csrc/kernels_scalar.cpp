// Portable C++ kernels: the reference path of the extension and the fallback on CPUs
// without AVX2 (and on ARM). Plain loops, compiled for the baseline ISA.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"

namespace tbn {
namespace {

float quantize_row_scalar(const float* x, int64_t k, int64_t k_pad, int8_t* xq, int32_t* xsum) {
  float amax = 0.f;
  bool nan = false;
  for (int64_t i = 0; i < k; ++i) {
    const float v = std::fabs(x[i]);
    nan |= v != v;
    amax = v > amax ? v : amax;
  }
  if (nan || amax == std::numeric_limits<float>::infinity()) {
    std::memset(xq, 0, size_t(k_pad));
    *xsum = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float a = act_scale_from_amax(amax);
  int32_t s = 0;
  for (int64_t i = 0; i < k; ++i) {
    float r = std::nearbyint(x[i] * a);  // default rounding mode: nearest, ties to even
    r = std::min(std::max(r, -128.f), 127.f);
    xq[i] = int8_t(r);
    s += xq[i];
  }
  std::memset(xq + k, 0, size_t(k_pad - k));
  *xsum = s;
  return a;
}

// One (token, output row) dot product: sum over blocks of the 4 code planes.
int32_t dot_row_scalar(const int8_t* x, const uint8_t* w, int64_t k_pad) {
  int32_t s = 0;
  for (int64_t b = 0; b < k_pad / 256; ++b) {
    const uint8_t* wb = w + 64 * b;
    const int8_t* xb = x + 256 * b;
    for (int j = 0; j < 64; ++j) {
      const int byte = wb[j];
      s += (byte & 3) * xb[j] + ((byte >> 2) & 3) * xb[64 + j] + ((byte >> 4) & 3) * xb[128 + j] +
           (byte >> 6) * xb[192 + j];
    }
  }
  return s;
}

void gemm_scalar(const GemmProblem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.m; ++m)
      store_result(p, m, n, dot_row_scalar(p.xq + m * p.ldq, p.w + n * p.ldw, p.k_pad));
}

uint8_t stream_max_scalar(const uint8_t* p, int64_t n) {
  uint8_t mx = 0;
  for (int64_t i = 0; i < n; ++i) mx = p[i] > mx ? p[i] : mx;
  return mx;
}

}  // namespace

const Kernels kScalarKernels = {quantize_row_scalar, gemm_scalar, stream_max_scalar, attention_partial_scalar,
                                int8_gemm_scalar, int4_gemm_scalar};

void quantize_rows(const Kernels& kern, const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1,
                   int64_t k, int64_t k_pad, int8_t* xq, int64_t ldq, float* a, int32_t* xsum) {
  std::vector<float> row(dt == DType::F32 ? 0 : size_t(k));
  int32_t unused_sum;
  for (int64_t m = m0; m < m1; ++m) {
    const float* src;
    if (dt == DType::F32) {
      src = static_cast<const float*>(x) + m * ldx;
    } else {
      const uint16_t* h = static_cast<const uint16_t*>(x) + m * ldx;
      if (dt == DType::BF16)
        for (int64_t i = 0; i < k; ++i) row[i] = bf16_to_float(h[i]);
      else
        for (int64_t i = 0; i < k; ++i) row[i] = f16_to_float(h[i]);
      src = row.data();
    }
    a[m] = kern.quantize_row(src, k, k_pad, xq + m * ldq, xsum ? xsum + m : &unused_sum);
  }
}

}  // namespace tbn
