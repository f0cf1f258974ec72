// Torch-free kernel interface of torch_bitnet.
//
// Every kernel family has one implementation per ISA (scalar, avx2, avx512) with the same
// signature, and the amx table replaces avx512's products of several tokens; ops.cpp (the ATen
// adapter) checks arguments, allocates, splits the work over threads and calls the entry of
// the table chosen by cpu_features.cpp.
//
// Packed ternary weight (documented in torch_bitnet/packing.py): uint8 rows of Kp/4 bytes,
// Kp = K rounded up to 256. Byte j of 64-byte block b holds, at bits 2i+1:2i, the code
// u = w + 1 of weight k = 256*b + 64*i + j. Kernels compute sum_k u*x and subtract sum_k x
// (the "offset trick"): u is unsigned, which is what the u8 x s8 multiply-adds want.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

namespace tbn {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// A 64-byte aligned scratch buffer kept from call to call by its owner (a thread_local, one per
// thread): get(bytes) grows it, and replaces it with one of the asked size when a call needs
// under a quarter of it, so a long prompt's buffer does not outlive the prompt. Keeping it
// spares the allocator: decoder_layer's ~15 MB per layer at 256-token prefill chunks,
// allocated per call, let glibc's heap grow 20-100 MB past the live memory (its mmap threshold
// rises to the size of a freed mapping, so later blocks come from the heap and fragment it;
// BENCHMARKS.md, 2026-12-07, fifth session).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(data_); }

  // At least `bytes` bytes, valid until the next get. Throws std::bad_alloc (at::parallel_for
  // and the dispatcher rethrow it in the caller).
  void* get(size_t bytes) {
    if (bytes > size_ || bytes < size_ / 4) {
      std::free(data_);
      data_ = nullptr;
      size_ = 0;
      const size_t size = std::max<size_t>(64, (bytes + 63) / 64 * 64);  // aligned_alloc: a multiple of 64
      data_ = std::aligned_alloc(64, size);
      if (!data_) throw std::bad_alloc();
      size_ = size;
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

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

// n values of dtype dt -> float.
inline void to_float(const void* src, DType dt, int64_t n, float* dst) {
  if (dt == DType::F32) {
    std::memcpy(dst, src, size_t(n) * sizeof(float));
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(src);
  if (dt == DType::BF16)
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(h[i]);
  else
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(h[i]);
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
  // 3-trit weights, one token: kLut3Entries int16 sums per group of 3 activations (lut3)
  const int16_t* lut = nullptr;
  int64_t m = 0;                // tokens
  int64_t k_pad = 0;            // Kp, a multiple of 256
  Epilogue ep;
};

// Element i of an output array of dtype dt = y, rounded once.
inline void store_float(void* out, DType dt, int64_t i, float y) {
  switch (dt) {
    case DType::F32:
      static_cast<float*>(out)[i] = y;
      break;
    case DType::BF16:
      static_cast<uint16_t*>(out)[i] = float_to_bf16(y);
      break;
    case DType::F16:
      static_cast<uint16_t*>(out)[i] = float_to_f16(y);
      break;
  }
}

// Element i of an array of dtype dt, as float.
inline float load_float(const void* in, DType dt, int64_t i) {
  switch (dt) {
    case DType::BF16:
      return bf16_to_float(static_cast<const uint16_t*>(in)[i]);
    case DType::F16:
      return f16_to_float(static_cast<const uint16_t*>(in)[i]);
    default:
      return static_cast<const float*>(in)[i];
  }
}

// Rounds float y to dtype dt and back (what storing an intermediate in dt does).
inline float round_to(DType dt, float y) {
  if (dt == DType::BF16) return bf16_to_float(float_to_bf16(y));
  if (dt == DType::F16) return f16_to_float(float_to_f16(y));
  return y;
}

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
  store_float(e.out, e.out_dtype, m * e.ld + n, y);
}

// ---- 5-trit packed ternary weight (documented in torch_bitnet/packing.py) ----
// uint8 (N, Kp5/320, 64), Kp5 = K rounded up to 320: byte j of 64-byte block b encodes the codes
// u_i = w + 1 of weights k = 320*b + 64*i + j (i = 0..4) as c = 64*(t/21) + 21*u4 + t%21 with
// t = u0 + 3*u1 + 9*u2 + 27*u3. So u4 = kTrit5.u4[c & 63] and kTrit5.low4[c] is the 2-bit
// format's byte u0 | u1 << 2 | u2 << 4 | u3 << 6. Bytes no weights produce decode through the
// same tables on every path (u0..u3 = 1).

constexpr int64_t kBlockK5 = 320;

struct Trit5Tables {
  uint8_t low4[256];
  uint8_t u4[64];
};

constexpr Trit5Tables make_trit5_tables() {
  Trit5Tables t{};
  for (int c = 0; c < 256; ++c) t.low4[c] = 0x55;
  for (int idx = 0; idx < 81; ++idx)
    for (int u4 = 0; u4 < 3; ++u4)
      t.low4[64 * (idx / 21) + 21 * u4 + idx % 21] =
          uint8_t(idx % 3 | (idx / 3 % 3) << 2 | (idx / 9 % 3) << 4 | (idx / 27) << 6);
  for (int lo = 0; lo < 64; ++lo) t.u4[lo] = uint8_t(lo / 21 < 2 ? lo / 21 : 2);
  return t;
}

inline constexpr Trit5Tables kTrit5 = make_trit5_tables();

// The code of weight 64*i + j of a block (chunk i = 0..4) from its byte c.
inline uint8_t trit5_code(uint8_t c, int i) { return i < 4 ? (kTrit5.low4[c] >> (2 * i)) & 3 : kTrit5.u4[c & 63]; }

// ---- 3-trit packed ternary weight (documented in torch_bitnet/packing.py) ----
// uint8 (ceil(N/32), Kp3/9, 32, 2), Kp3 = K rounded up to 9: tiles of 32 output rows, each
// Kp3/9 vectors of 32 little-endian 16-bit words; word r of vector j of tile t holds three 5-bit
// indices, at bits 0, 5 and 10, of the codes u = w + 1 of row 32t + r at k = 9j + 3m + (0, 1, 2)
// (m = 0, 1, 2): i_m = u0 + 3 u1 + 9 u2. Bit 15 is ignored; indices 27-31 (which no weights
// produce) read as three zero weights on every path; rows past N are zero weights. A vector of
// words is one tile's 32 rows, so one VPERMW looks up 32 rows' sums at once (ternary3_avx512.cpp).

constexpr int64_t kGroupK3 = 9;    // weights per word
constexpr int64_t kTileN3 = 32;    // rows per tile
constexpr int64_t kLut3Entries = 32;  // int16 entries per group of 3 activations (27 used)
// Tiles the decode kernel streams side by side, sharing each table vector they load (4: 1.5 ms
// per 2B-4T token faster than 2 at 2 threads; BENCHMARKS.md, "3-trit weights").
constexpr int kTiles3 = 4;

inline int64_t pad_k3(int64_t k) { return (k + kGroupK3 - 1) / kGroupK3 * kGroupK3; }

// Code d (0..2) of index i: its base-3 digit d, or 1 (a zero weight) for i >= 27.
constexpr uint8_t trit3_code(unsigned i, int d) { return i >= 27 ? 1 : uint8_t(d == 0 ? i % 3 : d == 1 ? i / 3 % 3 : i / 9); }
// The three codes of index i as bytes 0-2 of a word (byte 3 zero): the kernels' tables start here.
constexpr uint32_t trit3_codes(unsigned i) {
  return uint32_t(trit3_code(i, 0)) | uint32_t(trit3_code(i, 1)) << 8 | uint32_t(trit3_code(i, 2)) << 16;
}

// ---- int8 per-row weights: the lm_head / embedding table (format: torch_bitnet/int8.py) ----
// codes uint8 (N, Kp), Kp = K rounded up to 64, code = w + 128 with w in [-127, 127] (128 in
// the padding), one float32 scale per row: W[n, k] ~ (code - 128) * scale[n].

struct Int8Problem {
  const int8_t* xq = nullptr;      // (M, ldq) int8 activations from quantize_row, zero from K to Kp
  int64_t ldq = 0;
  const int32_t* xsum = nullptr;   // (M,) sum of each activation row
  const float* a = nullptr;        // (M,) activation scales 127 / amax (NaN for a non-finite row)
  const uint8_t* w = nullptr;      // (N, Kp) codes, row stride Kp
  const float* w_scale = nullptr;  // (N,)
  const float* bias = nullptr;     // (N,) float32 or null
  int64_t m = 0;                   // tokens
  int64_t k_pad = 0;               // Kp, a multiple of 64
  void* out = nullptr;             // (M, ld) of out_dtype
  DType out_dtype = DType::F32;
  int64_t ld = 0;
};

// y[m, n] from the exact acc = sum_k w*x: one float32 expression, rounded once to out_dtype
// (the SIMD epilogues evaluate the same operations lane by lane).
inline void store_int8_result(const Int8Problem& p, int64_t m, int64_t n, int32_t acc) {
  float y = float(acc) * (p.w_scale[n] / p.a[m]);
  if (p.bias) y += p.bias[n];
  store_float(p.out, p.out_dtype, m * p.ld + n, y);
}

// ---- int4 group weights: the compact lm_head / embedding table (format: torch_bitnet/int4.py) ----
// codes uint8 (ceil(N/16), Kp/8, 64), Kp = K rounded up to 64: byte 4r + j of 64-byte line c of
// tile t holds u[16t + r, 8c + j] in bits 3:0 and u[16t + r, 8c + 4 + j] in bits 7:4, u = w + 8
// with w in [-7, 7] (8 in the padding); scale bf16 (N, Kp/32): W[n, k] ~ (u - 8) * scale[n, k / 32].

constexpr int64_t kInt4Group = 32;  // weights per scale
constexpr int64_t kInt4Tile = 16;   // rows interleaved in one 64-byte line

struct Int4Problem {
  const int8_t* xq = nullptr;         // (M, ldq) int8 activations from quantize_row, zero from K to Kp
  int64_t ldq = 0;
  const int32_t* offset = nullptr;    // (M, Kp/32): -8 * the sum of each group's activations
  const float* a = nullptr;           // (M,) activation scales 127 / amax (NaN for a non-finite row)
  const uint8_t* w = nullptr;         // (ceil(N/16), Kp/8, 64) codes
  const uint16_t* w_scale = nullptr;  // (N, Kp/32) bf16 bits, 4-byte aligned
  const float* bias = nullptr;        // (N,) float32 or null
  int64_t m = 0;                      // tokens
  int64_t k_pad = 0;                  // Kp, a multiple of 64
  void* out = nullptr;                // (M, ld) of out_dtype
  DType out_dtype = DType::F32;
  int64_t ld = 0;
};

// y[m, n] from s = sum over groups g, in increasing g from +0, of float(d_g) * scale[n, g]
// (d_g the exact int32 dot of group g; one rounding per product and per sum): s / a + bias,
// rounded once to out_dtype. The SIMD kernels compute the same sequence lane by lane.
inline void store_int4_result(const Int4Problem& p, int64_t m, int64_t n, float s) {
  float y = s / p.a[m];
  if (p.bias) y += p.bias[n];
  store_float(p.out, p.out_dtype, m * p.ld + n, y);
}

// ---- attention over an int8 KV cache, shared by all ISAs ----

// One (batch, kv head) of int8_attention: its G query heads x Q queries as `rows` rows
// (row r = query r % nq of group head r / nq, the order of q's (batch, heads, Q, head_dim)
// layout), and its cache. Key j is visible to row r, query i = r % nq, iff j < end[i] and
// (mask is null or mask[i * ld_mask + j] != 0).
struct AttentionProblem {
  const float* q = nullptr;        // (rows, d) float32 queries
  int64_t nq = 0;                  // queries per head (Q)
  int64_t d = 0;                   // head_dim
  float scale = 1.f;               // softmax scale: score_j = (q . k_j) * k_scale_j * scale
  const int64_t* end = nullptr;    // (nq,) query i sees positions < end[i] (its position + 1)
  const uint8_t* mask = nullptr;   // null, or (nq, ld_mask) bytes, 0 = position hidden
  int64_t ld_mask = 0;             // >= max(end)
  const int8_t* k = nullptr;       // (len, d) int8 keys, row j = position j
  const float* k_scale = nullptr;  // (len,)
  const int8_t* v = nullptr;       // (len, d) int8 values
  const float* v_scale = nullptr;  // (len,)
  // The queries were 16-bit (bf16 / fp16): a kernel may then form q . k and the weighted sum of
  // values from int16 products (attention_avx512.cpp), whose error (~1e-5 relative) is far
  // below the 2^-9 rounding of the 16-bit result. float32 queries keep float products.
  bool int16_products = false;
  // Distinct for every int8_attention call (never 0): a kernel may keep work on a (batch, kv
  // head)'s cache from one task of the call to the next on the same thread (attention_amx.cpp),
  // since the cache cannot change within a call.
  uint64_t call = 0;
};

// Positions per inner block of the attention kernels: the block's int8 keys and values
// (2 * 64 * d bytes) stay in L1 while every row of the task uses them.
constexpr int64_t kAttentionBlock = 64;

// Keys ahead of the one being scored whose d bytes the SIMD kernels prefetch (16-64 measured
// alike on the Zen 3).
constexpr int64_t kPrefetchKeys = 16;

// Prefetch key j + kPrefetchKeys and the value of key j into L1. A decode token reads each
// layer's cache from DRAM (the weights streamed in between evict it), and without this a third
// (AVX2 on a Zen 3) to two thirds (AVX-512 on the Xeon) of the kernel's time stalled on the
// loads of the keys and of the values (step 3 reads the block's values right after its
// scores). Prefetches past the cache's end do not fault.
inline void prefetch_key(const AttentionProblem& p, int64_t j) {
  const int8_t* k = p.k + (j + kPrefetchKeys) * p.d;
  const int8_t* v = p.v + j * p.d;
  for (int64_t o = 0; o < p.d; o += 64) {
    __builtin_prefetch(k + o, 0, 3);
    __builtin_prefetch(v + o, 0, 3);
  }
}

// Most partial states attention_merge combines for one row.
constexpr int64_t kMaxAttentionParts = 64;

// e^x of the SIMD kernels (x <= 0 there: scores minus their running maximum), as Cephes'
// expf: x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2 (ln2 split in a part exact in
// float and a correction), e^r = 1 + r + r^2 P(r), then times 2^n. Below kExpMin (where 2^n
// would leave the normal range) the result is 0: within 1e-38 of e^x, and exactly 0 for -inf.
constexpr float kExpMin = -87.3f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// An RMSNorm applied to each row before it is quantized (the fused norm of bitlinear and
// the shared-input ops), in the operations of transformers' BitNetRMSNorm / LlamaRMSNorm:
//   var = mean(x^2), accumulated in double and rounded once to float32 (so every ISA and the
//         reference agree bit for bit in practice: their summation orders differ only in
//         double rounding, ~1e-16 relative, far below float32's half-ulp);
//   r   = 1 / sqrt(var + eps)                      (the sum in float32; sqrt and division in
//         double, rounded once to float32: correctly rounded, unlike torch's vectorised rsqrt)
//   h   = round_dt(x * r)                          (float32 product rounded to the row's dtype dt)
//   y   = round_dt(weight * h)                     (weight: K values of dtype dt)
struct RowNorm {
  const void* weight = nullptr;  // (K,) of the rows' dtype
  float eps = 0.f;
};

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
  // Partial softmax state of rows [r0, r1) of p over cache positions [j0, j1): for row r,
  // at index r - r0, m = the largest visible score (-inf if it sees none), l = sum_j e^(s_j - m)
  // and acc (d floats) = sum_j e^(s_j - m) v_scale_j v_j over its visible positions j.
  // Partials over disjoint position ranges combine with attention_merge.
  void (*attention_partial)(const AttentionProblem& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1, float* m,
                            float* l, float* acc);
  // int8 per-row weights: results for output rows [n0, n1) and all M tokens of p.
  void (*int8_gemm)(const Int8Problem& p, int64_t n0, int64_t n1);
  // Squared-ReLU gating of n elements in place (see relu2_gate_scalar below).
  void (*relu2_gate)(void* g, const void* u, DType dt, int64_t n);
  // int4 group weights: results for output rows [n0, n1) (n0 a multiple of kInt4Tile) and all
  // M tokens of p.
  void (*int4_gemm)(const Int4Problem& p, int64_t n0, int64_t n1);
  // 5-trit weights -> 2-bit weights: `rows` rows of w5 (Kp5 = k_pad5 weights, k_pad5 / 5 bytes
  // per row) are written to w2 (row stride k_pad2 / 4 bytes) in the 2-bit format, weights
  // k_pad5 <= k < k_pad2 as zeros. Lossless: the ISA's gemm then multiplies them.
  void (*unpack5)(const uint8_t* w5, int64_t k_pad5, int64_t rows, uint8_t* w2, int64_t k_pad2);
  // One token (p.m == 1) against 5-trit weights, streamed without unpacking: results for output
  // rows [n0, n1) of p, whose w is 5-trit (p.ldw = Kp5 / 5, p.k_pad = Kp5). Null on the paths
  // without such a kernel (ops.cpp then unpacks and calls gemm).
  void (*gemv5)(const GemmProblem& p, int64_t n0, int64_t n1);
  // Several tokens against 5-trit weights without the 2-bit copy (p as for gemv5): results for
  // output rows [n0, n1) of p, or false, having done nothing, where the path prefers the 2-bit
  // route for p.m tokens. Null on the paths without such a kernel (both then take that route).
  bool (*gemm5)(const GemmProblem& p, int64_t n0, int64_t n1);
  // The small per-token steps of a decoder layer (a decode token runs them on one thread
  // between the parallel products): AVX-512 versions in rows_avx512.cpp, the portable ones on
  // the other paths (AVX2 included: ~1 ms per token was the scalar cost at 2 threads):
  // One row of k values of dtype dt -> k floats in out, RMS-normalised (RowNorm) when norm is
  // non-null.
  void (*load_row)(const void* x, DType dt, int64_t k, const RowNorm* norm, float* out);
  // Rotary embedding of one head of d values of dtype dt (rotate-half form) into out (dtype dt),
  // with the token's cos c and sin s as floats: out_i = round_dt(round_dt(x_i c_i) +
  // round_dt(r_i s_i)), r = cat(-x[d/2:], x[:d/2]); the roundings of eager PyTorch in dt.
  void (*rope_row)(const void* x, const float* c, const float* s, DType dt, int64_t d, void* out);
  // One key or value vector of d values of dtype dt -> int8 q and scale s with q * s ~ x:
  // s = max|x| / 127, q = round(x / s) (0 when s == 0); NaNs do not enter the maximum.
  void (*kv_quantize)(const void* x, DType dt, int64_t d, int8_t* q, float* scale);
  // The residual add of n elements of dtype dt: out = round_dt(a + b) (out may alias a or b).
  void (*add_rows)(const void* a, const void* b, DType dt, int64_t n, void* out);
  // 3-trit weights (p.w its tiles, p.ldw = Kp3 / 9 * 64 bytes per tile, p.k_pad = Kp3 rounded
  // up to 64, the activations zero from K) -> 2-bit weights: rows [n, n + rows) into w2 (row
  // stride k_pad2 / 4 bytes), weights k >= Kp3 as zeros and k >= k_pad2 dropped (K padding:
  // zero weights). Lossless; the ISA's gemm then multiplies them.
  void (*unpack3)(const GemmProblem& p, int64_t n, int64_t rows, uint8_t* w2, int64_t k_pad2);
  // One token against 3-trit weights (p as for unpack3, p.lut built by lut3 from p.xq): results
  // for output rows [n0, n1). Null on the paths without it (which take gemm3 or the 2-bit route).
  void (*gemv3)(const GemmProblem& p, int64_t n0, int64_t n1);
  // The table gemv3 reads, over k < k_pad3 (a multiple of 3): for each group g of 3 activations,
  // kLut3Entries int16 lut[32 g + i] = sum_d (digit d of i - 1) * xq[3 g + d], 0 for i >= 27.
  void (*lut3)(const int8_t* xq, int64_t k_pad3, int16_t* lut);
  // Several tokens against 3-trit weights without the 2-bit copy (p as for unpack3): results for
  // output rows [n0, n1). Null on the paths without it (which unpack3, then gemm).
  void (*gemm3)(const GemmProblem& p, int64_t n0, int64_t n1);
};

extern const Kernels kScalarKernels;
#if defined(__x86_64__) || defined(_M_X64)
extern const Kernels kAvx2Kernels;
extern const Kernels kAvx512Kernels;
// kAvx512Kernels plus the AVX-512 VBMI kernels of the 5-trit and 3-trit weights.
extern const Kernels kAvx512VbmiKernels;
// kAvx512VbmiKernels with the AMX prefill gemm (kernels_amx.cpp).
extern const Kernels kAmxKernels;
// k with the VBMI 5-trit kernels (ternary5_avx512.cpp) and the 3-trit prefill panels
// (gemm3_panels_avx512): kAvx512VbmiKernels is
// with_vbmi(kAvx512Kernels), and kAmxKernels starts from the same.
Kernels with_vbmi(Kernels k);
#endif

// ---- the AVX-512 prefill panel (kernels_avx512.cpp), shared with the AMX kernel ----
// Output rows go kPanelRows at a time (a panel). Their codes u are unpacked for all of K into
// kPanelRows x Kp bytes laid out for one output row per 32-bit lane: for each group q of 4
// consecutive k, kPanelVecs vectors of 64 bytes, lane l of vector v holding the codes of row
// 16 v + l at k = 4q .. 4q + 3 (vector (q, v) at byte (q * kPanelVecs + v) * 64).
constexpr int64_t kPanelVecs = 4;
constexpr int64_t kPanelRows = 16 * kPanelVecs;
#if defined(__x86_64__) || defined(_M_X64)
// Rows [n, n + rows) of p's weight, rows <= kPanelRows, into panel (64-byte aligned); the
// lanes of rows past `rows` in the last vector hold zero codes.
void unpack_panel_avx512(const GemmProblem& p, int64_t n, int64_t rows, uint8_t* panel);
// As unpack_panel_avx512, from a 5-trit weight (p.w, p.ldw = Kp5 / 5) over Kp5 = p.k_pad: chunk i
// of 5-trit block b is the 64 k of step 5 b + i (ternary5_avx512.cpp; needs AVX-512 VBMI).
void unpack5_panel_vbmi(const GemmProblem& p, int64_t n, int64_t rows, uint8_t* panel);
// As unpack_panel_avx512, from a 3-trit weight (p as for Kernels::unpack3) over p.k_pad
// (ternary3_avx512.cpp; needs AVX-512 VBMI), and the AVX-512 gemm over such panels for any M
// (kernels_avx512.cpp): the VBMI table's gemm3.
void unpack3_panel_avx512(const GemmProblem& p, int64_t n, int64_t rows, uint8_t* panel);
void gemm3_panels_avx512(const GemmProblem& p, int64_t n0, int64_t n1);
// The AVX-512 BW gemv3 and its table (ternary3_avx512.cpp).
void gemv3_avx512(const GemmProblem& p, int64_t n0, int64_t n1);
void lut3_avx512(const int8_t* xq, int64_t k_pad3, int16_t* lut);
// The int8 table's codes (rows [n, n + rows) of p.w, rows <= kPanelRows) in the same layout
// over p.k_pad (int8_avx512.cpp); and its epilogue for `count` tokens from m x 16 rows from n,
// only the rows in keep, from sum_ux[t * ld_sums + j] = sum of code * x: store_int8_result.
void unpack_int8_panel_avx512(const Int8Problem& p, int64_t n, int64_t rows, uint8_t* panel);
void store_int8_rows_avx512(const Int8Problem& p, int64_t m, int64_t count, int64_t n, const int32_t* sum_ux,
                            int64_t ld_sums, uint16_t keep);
// store_result for `count` tokens from m x 16 rows from n, only the rows whose bit is set in
// keep: sum_ux[t * ld_sums + j] is token m + t's sum for row n + j.
void store_rows_avx512(const GemmProblem& p, int64_t m, int64_t count, int64_t n, const int32_t* sum_ux,
                       int64_t ld_sums, uint16_t keep);
#endif

// One row of k_pad2 code bytes (u = w + 1, one per k) -> its 2-bit row (k_pad2 / 4 bytes): byte
// 64 b + j holds the codes of k = 256 b + 64 i + j at bits 2i. The portable unpackings' last step.
inline void pack_codes_2bit(const uint8_t* codes, int64_t k_pad2, uint8_t* dst) {
  for (int64_t b = 0; b < k_pad2 / 256; ++b) {
    const uint8_t* s = codes + 256 * b;
    for (int j = 0; j < 64; ++j)
      dst[64 * b + j] = uint8_t(s[j] | s[64 + j] << 2 | s[128 + j] << 4 | s[192 + j] << 6);
  }
}

// The portable unpack3 (ternary3_scalar.cpp), used by every table.
void unpack3_scalar(const GemmProblem& p, int64_t n, int64_t rows, uint8_t* w2, int64_t k_pad2);

// The portable unpack5 (ternary5_scalar.cpp), used by every table but the VBMI one.
void unpack5_scalar(const uint8_t* w5, int64_t k_pad5, int64_t rows, uint8_t* w2, int64_t k_pad2);

// ---- helpers shared by the ISA files ----

// Absmax -> scale, in exactly the float32 operations torch performs for 127 / t.
inline float act_scale_from_amax(float amax) {
  const float clamped = amax < 1e-5f ? 1e-5f : amax;
  return (1.0f / clamped) * 127.0f;
}

// Quantize rows [m0, m1) of a (M, ldx) matrix of dtype dt, converting 16-bit rows to
// float first (and normalising them first if norm is non-null). xq rows have stride ldq;
// a and xsum (if non-null) get one value per row.
void quantize_rows(const Kernels& kern, const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1,
                   int64_t k, int64_t k_pad, int8_t* xq, int64_t ldq, float* a, int32_t* xsum,
                   const RowNorm* norm = nullptr);

// The squared-ReLU gate of BitNet's MLP over n elements of dtype dt, in place (the Kernels
// table's relu2_gate): g = round_dt(round_dt(relu(g)^2) * u), the roundings of transformers'
// relu2(gate) * up. The SIMD versions (gate_avx2.cpp, gate_avx512.cpp) finish their tails with
// the portable one.
void relu2_gate_scalar(void* g, const void* u, DType dt, int64_t n);
#if defined(__x86_64__) || defined(_M_X64)
void relu2_gate_avx2(void* g, const void* u, DType dt, int64_t n);
void relu2_gate_avx512(void* g, const void* u, DType dt, int64_t n);
#endif

// ---- int8 per-row weights (int8_scalar.cpp, int8_avx2.cpp, int8_avx512.cpp) ----

void int8_gemm_scalar(const Int8Problem& p, int64_t n0, int64_t n1);
#if defined(__x86_64__) || defined(_M_X64)
void int8_gemm_avx2(const Int8Problem& p, int64_t n0, int64_t n1);
void int8_gemm_avx512(const Int8Problem& p, int64_t n0, int64_t n1);
#endif

// Embedding lookup: out row i (d values of dtype dt) = (codes[ids[i]] - 128) * scale[ids[i]]
// for i in [0, count); ids must already be checked to lie in [0, N). w has row stride ldw.
void int8_embedding_rows(const int64_t* ids, int64_t count, const uint8_t* w, int64_t ldw, const float* scale,
                         int64_t d, void* out, DType dt);

// ---- int4 group weights (int4_scalar.cpp, int4_avx2.cpp, int4_avx512.cpp) ----

void int4_gemm_scalar(const Int4Problem& p, int64_t n0, int64_t n1);
#if defined(__x86_64__) || defined(_M_X64)
void int4_gemm_avx2(const Int4Problem& p, int64_t n0, int64_t n1);
void int4_gemm_avx512(const Int4Problem& p, int64_t n0, int64_t n1);
void int4_gemm_avx512_prefetch(const Int4Problem& p, int64_t n0, int64_t n1);  // the AMX path's
#endif

// Embedding lookup: out row i (d values of dtype dt) = (u[ids[i], k] - 8) * scale[ids[i], k / 32]
// for i in [0, count); ids must already be checked to lie in [0, N). Kp is the padded row length.
void int4_embedding_rows(const int64_t* ids, int64_t count, const uint8_t* w, const uint16_t* scale, int64_t k_pad,
                         int64_t d, void* out, DType dt);

// ---- int8 KV cache (attention_scalar.cpp: quantization, the portable attention kernel and
// the merge; SIMD attention kernels in attention_avx2.cpp, attention_avx512.cpp and
// attention_amx.cpp) ----

// The portable entries of the Kernels table's per-token steps (load_row, rope_row,
// kv_quantize, add_rows), and their AVX2 and AVX-512 versions (rows_avx2.cpp, rows_avx512.cpp).
void load_row_scalar(const void* x, DType dt, int64_t k, const RowNorm* norm, float* out);
void rope_row_scalar(const void* x, const float* c, const float* s, DType dt, int64_t d, void* out);
void kv_quantize_scalar(const void* x, DType dt, int64_t d, int8_t* q, float* scale);
void add_rows_scalar(const void* a, const void* b, DType dt, int64_t n, void* out);
#if defined(__x86_64__) || defined(_M_X64)
void load_row_avx2(const void* x, DType dt, int64_t k, const RowNorm* norm, float* out);
void rope_row_avx2(const void* x, const float* c, const float* s, DType dt, int64_t d, void* out);
void kv_quantize_avx2(const void* x, DType dt, int64_t d, int8_t* q, float* scale);
void add_rows_avx2(const void* a, const void* b, DType dt, int64_t n, void* out);
void load_row_avx512(const void* x, DType dt, int64_t k, const RowNorm* norm, float* out);
void rope_row_avx512(const void* x, const float* c, const float* s, DType dt, int64_t d, void* out);
void kv_quantize_avx512(const void* x, DType dt, int64_t d, int8_t* q, float* scale);
void add_rows_avx512(const void* a, const void* b, DType dt, int64_t n, void* out);
#endif

// The portable attention_partial (the scalar table's entry; the SIMD kernels fall back to it
// for head_dims their vectors do not divide).
void attention_partial_scalar(const AttentionProblem& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1, float* m,
                              float* l, float* acc);
#if defined(__x86_64__) || defined(_M_X64)
void attention_partial_avx2(const AttentionProblem& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1, float* m,
                            float* l, float* acc);
void attention_partial_avx512(const AttentionProblem& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1, float* m,
                              float* l, float* acc);
// attention_partial_avx512's int16 products on AMX tiles, for tasks of 5 rows or more
// (attention_amx.cpp); hands the others to attention_partial_avx512.
void attention_partial_amx(const AttentionProblem& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1, float* m,
                           float* l, float* acc);
#endif

// The loop the SIMD attention kernels share: initialises the state of rows [r0, r1) (m = -inf,
// l = 0, acc = 0), then for every block of kAttentionBlock positions of [j0, j1) and every
// group of up to kAttentionGroup rows calls
//   group(rows, g0, c0, nk, key_rows, m, l, acc)
// for rows g0 .. g0 + rows - 1 over positions [c0, c0 + nk), nk the furthest any of them sees
// (groups that see nothing, by position or mask, are skipped). key_rows[j] has bit r set if row g0 + r sees
// position c0 + j; it is null when every row sees all nk. m, l, acc point at row g0's state.
constexpr int kAttentionGroup = 4;

template <class Group>
inline void for_each_attention_group(const AttentionProblem& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1,
                                     float* m, float* l, float* acc, Group&& group) {
  const int64_t d = p.d;
  std::fill(m, m + (r1 - r0), -std::numeric_limits<float>::infinity());
  std::fill(l, l + (r1 - r0), 0.f);
  std::fill(acc, acc + (r1 - r0) * d, 0.f);
  uint8_t key_rows[kAttentionBlock];
  for (int64_t c0 = j0; c0 < j1; c0 += kAttentionBlock) {
    const int64_t c1 = std::min(j1, c0 + kAttentionBlock);
    for (int64_t g0 = r0; g0 < r1; g0 += kAttentionGroup) {
      const int rows = int(std::min<int64_t>(kAttentionGroup, r1 - g0));
      int64_t seen[kAttentionGroup], nk = 0;  // row r sees [c0, c0 + seen[r]) before its mask
      for (int r = 0; r < rows; ++r) {
        seen[r] = std::max<int64_t>(0, std::min(c1, p.end[(g0 + r) % p.nq]) - c0);
        nk = std::max(nk, seen[r]);
      }
      if (nk == 0) continue;
      bool uniform = p.mask == nullptr;
      for (int r = 0; r < rows; ++r) uniform = uniform && seen[r] == nk;
      if (!uniform) {
        std::fill(key_rows, key_rows + nk, uint8_t(0));
        uint8_t any = 0;
        for (int r = 0; r < rows; ++r) {
          const uint8_t* visible = p.mask ? p.mask + ((g0 + r) % p.nq) * p.ld_mask + c0 : nullptr;
          for (int64_t j = 0; j < seen[r]; ++j)
            if (!visible || visible[j]) key_rows[j] |= uint8_t(1u << r);
        }
        for (int64_t j = 0; j < nk; ++j) any |= key_rows[j];
        if (!any) continue;  // the mask hides the whole block from the group
      }
      group(rows, g0, c0, nk, uniform ? nullptr : key_rows, m + (g0 - r0), l + (g0 - r0), acc + (g0 - r0) * d);
    }
  }
}

// One row's attention output from `parts` partial states over disjoint position ranges:
// state s is m[s * stride], l[s * stride] and acc + s * stride * d. With M = max_s m_s,
// out (d floats) = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s; zeros when no part saw a
// position (M = -inf). parts <= kMaxAttentionParts; out may alias any part's acc.
void attention_merge(const float* m, const float* l, const float* acc, int64_t parts, int64_t stride, int64_t d,
                     float* out);

}  // namespace tbn
