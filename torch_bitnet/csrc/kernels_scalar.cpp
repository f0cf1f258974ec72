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
                                int8_gemm_scalar, relu2_gate_scalar, int4_gemm_scalar,
                                unpack5_scalar, nullptr, nullptr, load_row_scalar, rope_row_scalar, kv_quantize_scalar,
                                add_rows_scalar, unpack3_scalar, nullptr, nullptr, nullptr};

// RowNorm (kernels.h) of one row of k values of dtype dt, as floats in out.
void load_row_scalar(const void* x, DType dt, int64_t k, const RowNorm* norm, float* out) {
  to_float(x, dt, k, out);
  if (!norm) return;
  // Eight independent sums (lane i % 8, folded pairwise as the AVX-512 path folds its vector):
  // the loop runs at the adder's throughput, not its latency.
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= k; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += double(out[i + j]) * double(out[i + j]);
  for (; i < k; ++i) s[i % 8] += double(out[i]) * double(out[i]);
  for (int width = 4; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) s[j] += s[j + width];
  const float var = float(s[0] / double(k));
  const float r = float(1.0 / std::sqrt(double(var + norm->eps)));
  switch (dt) {  // one loop per dtype, so each compiles to straight-line (vectorisable) code
    case DType::BF16: {
      const uint16_t* w = static_cast<const uint16_t*>(norm->weight);
      for (int64_t j = 0; j < k; ++j) {
        const float h = bf16_to_float(float_to_bf16(out[j] * r));
        out[j] = bf16_to_float(float_to_bf16(bf16_to_float(w[j]) * h));
      }
      break;
    }
    case DType::F16: {
      const uint16_t* w = static_cast<const uint16_t*>(norm->weight);
      for (int64_t j = 0; j < k; ++j) {
        const float h = f16_to_float(float_to_f16(out[j] * r));
        out[j] = f16_to_float(float_to_f16(f16_to_float(w[j]) * h));
      }
      break;
    }
    case DType::F32: {
      const float* w = static_cast<const float*>(norm->weight);
      for (int64_t j = 0; j < k; ++j) out[j] = w[j] * (out[j] * r);
      break;
    }
  }
}

void rope_row_scalar(const void* x, const float* c, const float* s, DType dt, int64_t d, void* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float xi = load_float(x, dt, i);
    const float rotated = i < half ? -load_float(x, dt, i + half) : load_float(x, dt, i - half);
    store_float(out, dt, i, round_to(dt, xi * c[i]) + round_to(dt, rotated * s[i]));
  }
}

void add_rows_scalar(const void* a, const void* b, DType dt, int64_t n, void* out) {
  for (int64_t i = 0; i < n; ++i) store_float(out, dt, i, load_float(a, dt, i) + load_float(b, dt, i));
}

void quantize_rows(const Kernels& kern, const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1,
                   int64_t k, int64_t k_pad, int8_t* xq, int64_t ldq, float* a, int32_t* xsum,
                   const RowNorm* norm) {
  const bool direct = dt == DType::F32 && norm == nullptr;  // quantize the input rows in place
  std::vector<float> row(direct ? 0 : size_t(k));
  int32_t unused_sum;
  for (int64_t m = m0; m < m1; ++m) {
    const float* src;
    if (direct) {
      src = static_cast<const float*>(x) + m * ldx;
    } else {
      kern.load_row(static_cast<const char*>(x) + m * ldx * (dt == DType::F32 ? 4 : 2), dt, k, norm, row.data());
      src = row.data();
    }
    a[m] = kern.quantize_row(src, k, k_pad, xq + m * ldq, xsum ? xsum + m : &unused_sum);
  }
}

void relu2_gate_scalar(void* g, const void* u, DType dt, int64_t n) {
  switch (dt) {
    case DType::BF16: {
      uint16_t* gp = static_cast<uint16_t*>(g);
      const uint16_t* up = static_cast<const uint16_t*>(u);
      for (int64_t i = 0; i < n; ++i) {
        const float r = std::max(bf16_to_float(gp[i]), 0.f);
        gp[i] = float_to_bf16(bf16_to_float(float_to_bf16(r * r)) * bf16_to_float(up[i]));
      }
      break;
    }
    case DType::F16: {
      uint16_t* gp = static_cast<uint16_t*>(g);
      const uint16_t* up = static_cast<const uint16_t*>(u);
      for (int64_t i = 0; i < n; ++i) {
        const float r = std::max(f16_to_float(gp[i]), 0.f);
        gp[i] = float_to_f16(f16_to_float(float_to_f16(r * r)) * f16_to_float(up[i]));
      }
      break;
    }
    case DType::F32: {
      float* gp = static_cast<float*>(g);
      const float* up = static_cast<const float*>(u);
      for (int64_t i = 0; i < n; ++i) {
        const float r = std::max(gp[i], 0.f);
        gp[i] = (r * r) * up[i];
      }
      break;
    }
  }
}

}  // namespace tbn
