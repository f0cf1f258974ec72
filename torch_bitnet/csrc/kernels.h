// Torch-free kernel interface of torch_bitnet.
//
// Every kernel family has one implementation per ISA (scalar, avx2, avx512) with the same
// signature; ops.cpp (the ATen adapter) checks arguments, allocates, splits the work over
// threads and calls the entry of the table chosen by cpu_features.cpp.
//
// Packed ternary weight (documented in torch_bitnet/packing.py): uint8 rows of Kp/4 bytes,
// Kp = K rounded up to 256. Byte j of 64-byte block b holds, at bits 2i+1:2i, the code
// u = w + 1 of weight k = 256*b + 64*i + j. Kernels compute sum_k u*x and subtract sum_k x
// (the "offset trick"): u is unsigned, which is what the u8 x s8 multiply-adds want.
#pragma once

#include <cstdint>
#include <cstring>

namespace tbn {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// ---- float <-> 16-bit float, round to nearest even (bit-compatible with c10) ----

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7FC0;  // c10 returns this one quiet NaN
  uint32_t u = float_to_bits(f);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (mant << 13));
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24, exact in float32
    return bits_to_float(sign | float_to_bits(float(mant) * 5.9604644775390625e-8f));
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}

inline uint16_t float_to_f16(float f) {
  uint32_t x = float_to_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return sign | (x > 0x7F800000u ? 0x7E00 : 0x7C00);  // NaN, Inf
  if (x >= 0x477FF000u) return sign | 0x7C00;  // >= 65520 rounds to Inf
  if (x < 0x38800000u) {
    // |f| < 2^-14: half subnormal. Adding 0.5f rounds |f| to a multiple of 2^-24 (the
    // ulp of 0.5f) with the FPU's round-to-nearest-even; the low bits are the mantissa.
    float t = bits_to_float(x) + 0.5f;
    return sign | uint16_t(float_to_bits(t) - 0x3F000000u);
  }
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xC8000FFFu + odd;  // rebias exponent by -112, add rounding bias
  return sign | uint16_t(x >> 13);
}

// ---- GEMM problem description shared by all ISAs ----

// Where the results of one (token m, output n) go. Either raw int32 accumulators
// (ternary_mm), or float: y = float(acc) * row_factor[m] (+ bias[n]) stored as out_dtype.
struct Epilogue {
  int32_t* acc = nullptr;            // (M, ld) int32, used when non-null
  void* out = nullptr;               // (M, ld) of out_dtype otherwise
  DType out_dtype = DType::F32;
  const float* row_factor = nullptr; // (M,) scale / a_m
  const float* bias = nullptr;       // (N,) float32 or null
  int64_t ld = 0;                    // output row stride, elements
};

struct GemmProblem {
  const int8_t* xq = nullptr;   // (M, ldq) int8 activations, zero from K to Kp
  int64_t ldq = 0;
  const int32_t* xsum = nullptr;  // (M,) sum of each activation row
  const uint8_t* w = nullptr;   // (N, ldw) packed weight, ldw = Kp / 4 bytes
  int64_t ldw = 0;
  int64_t m = 0;                // tokens
  int64_t k_pad = 0;            // Kp, a multiple of 256
  Epilogue ep;
};

// Store one result given sum_k u*x (codes u = w + 1): subtracts the activation sum.
inline void store_result(const GemmProblem& p, int64_t m, int64_t n, int32_t sum_ux) {
  const int32_t acc = sum_ux - p.xsum[m];
  const Epilogue& e = p.ep;
  if (e.acc) {
    e.acc[m * e.ld + n] = acc;
    return;
  }
  float y = float(acc) * e.row_factor[m];
  if (e.bias) y += e.bias[n];
  switch (e.out_dtype) {
    case DType::F32:
      static_cast<float*>(e.out)[m * e.ld + n] = y;
      break;
    case DType::BF16:
      static_cast<uint16_t*>(e.out)[m * e.ld + n] = float_to_bf16(y);
      break;
    case DType::F16:
      static_cast<uint16_t*>(e.out)[m * e.ld + n] = float_to_f16(y);
      break;
  }
}

// ---- the per-ISA kernel table ----

struct Kernels {
  // Quantize one float row of k values into xq[0..k_pad) (zero padded) and return
  // a = 127 * (1 / max(amax, 1e-5)); *xsum = sum of xq. A row whose amax is NaN or Inf
  // yields xq = 0, *xsum = 0 and a = NaN.
  float (*quantize_row)(const float* x, int64_t k, int64_t k_pad, int8_t* xq, int32_t* xsum);
  // Results for output rows [n0, n1) and all M tokens of p.
  void (*gemm)(const GemmProblem& p, int64_t n0, int64_t n1);
  // Maximum of n bytes.
  uint8_t (*stream_max)(const uint8_t* p, int64_t n);
  // Attention of one query row over an int8 KV cache: see int8_attention_row below.
  void (*attention_row)(const float* q, const int8_t* k, const float* k_scale, const int8_t* v, const float* v_scale,
                        const uint8_t* mask, int64_t n, int64_t d, float scale, float* scores, float* out);
};

extern const Kernels kScalarKernels;
#if defined(__x86_64__) || defined(_M_X64)
extern const Kernels kAvx2Kernels;
extern const Kernels kAvx512Kernels;
#endif

// ---- helpers shared by the ISA files ----

// Absmax -> scale, in exactly the float32 operations torch performs for 127 / t.
inline float act_scale_from_amax(float amax) {
  const float clamped = amax < 1e-5f ? 1e-5f : amax;
  return (1.0f / clamped) * 127.0f;
}

// Quantize rows [m0, m1) of a (M, ldx) matrix of dtype dt, converting 16-bit rows to
// float first. xq rows have stride ldq; a and xsum (if non-null) get one value per row.
void quantize_rows(const Kernels& kern, const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1,
                   int64_t k, int64_t k_pad, int8_t* xq, int64_t ldq, float* a, int32_t* xsum);

// ---- int8 KV cache (attention_scalar.cpp; the AVX-512 attention row is in kernels_avx512.cpp,
// the AVX2 table uses the portable one) ----

// One key or value vector of d floats -> int8 q and scale s with q * s ~ x:
// s = max|x| / 127, q = round(x / s) (0 when s == 0).
void kv_quantize_row(const float* x, int64_t d, int8_t* q, float* scale);

// Attention of one query row q (d floats) over the first n cached positions: k, v int8 (n, d)
// with per-position scales. mask: null (all n visible) or n bytes, 0 = position hidden;
// hidden positions get no weight, and a row that sees no position at all gets out = 0.
// scores is scratch of n floats; out gets d floats.
void int8_attention_row(const float* q, const int8_t* k, const float* k_scale, const int8_t* v,
                        const float* v_scale, const uint8_t* mask, int64_t n, int64_t d, float scale, float* scores,
                        float* out);

}  // namespace tbn
