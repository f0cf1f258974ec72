// ATen adapters of the bitnet:: operators: every schema is declared here, once.
// Each adapter checks its arguments (messages a user can act on), makes inputs contiguous,
// allocates outputs and scratch, splits the work over torch's intra-op thread pool and calls
// the torch-free kernels of the selected ISA (kernels.h, cpu_features.h).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "kernels.h"

namespace tbn {
namespace {

constexpr int64_t kBlockK = 256;
constexpr int64_t kMaxInFeatures = int64_t(1) << 17;  // |acc| <= 128 K <= 2^24: exact in float32
// Output rows handed to a thread at a time: a multiple of every kernel's NR.
constexpr int64_t kRowTile = 16;
// int8_attention: rows (query heads x queries of one kv head) per task, a multiple of
// kAttentionGroup; at least this many tasks per thread (small tasks even out threads that
// another process delays), splitting positions if needed, but into parts of at least
// kAttentionMinPart positions (the merge and the per-part setup cost about as much as a few
// dozen positions).
constexpr int64_t kAttentionRowsPerTask = 32;
constexpr int64_t kAttentionTasksPerThread = 8;
constexpr int64_t kAttentionMinPart = 256;
// Below this much work (rows x positions x head_dim over all units: ~10 us) one thread does
// everything: waking the pool would cost as much, and more when other processes hold cores.
constexpr int64_t kAttentionMinParallelWork = int64_t(1) << 18;

int64_t pad_k(int64_t k) { return (k + kBlockK - 1) / kBlockK * kBlockK; }
int64_t pad_k5(int64_t k) { return (k + kBlockK5 - 1) / kBlockK5 * kBlockK5; }

DType dtype_of(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat:
      return DType::F32;
    case at::kBFloat16:
      return DType::BF16;
    case at::kHalf:
      return DType::F16;
    default:
      TORCH_CHECK_TYPE(false, "bitnet: ", what, " must be float32, bfloat16 or float16, got ", t);
  }
}

DType dtype_of(const at::Tensor& t, const char* what) { return dtype_of(t.scalar_type(), what); }

int64_t dtype_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

void check_sizes(int64_t in_features, int64_t out_features) {
  TORCH_CHECK_VALUE(in_features >= 1 && out_features >= 1,
                    "bitnet: in_features and out_features must be >= 1, got in_features=", in_features,
                    ", out_features=", out_features);
  TORCH_CHECK_VALUE(in_features <= kMaxInFeatures, "bitnet: in_features=", in_features,
                    " exceeds the supported maximum ", kMaxInFeatures);
}

void check_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "bitnet: ", what, " must be on the CPU, got device ", t.device());
}

void check_input(const at::Tensor& x, int64_t in_features, const char* what) {
  check_cpu(x, what);
  TORCH_CHECK_VALUE(x.dim() >= 1, "bitnet: ", what, " must have at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(x.size(-1) == in_features, "bitnet: ", what, " has ", x.size(-1),
                    " features in its last dimension, expected in_features=", in_features);
}

// The packed formats (torch_bitnet/packing.py).
enum class Packing { Bit2, Trit5, Trit3 };

// A packed weight's format is its rank (torch_bitnet/packing.py): 2-D (N, Kp/4) is the 2-bit
// format, 3-D (N, Kp5/320, 64) the 5-trit one, 4-D (ceil(N/32), Kp3/9, 32, 2) the 3-trit one.
Packing packing_of(const at::Tensor& packed) {
  return packed.dim() == 4 ? Packing::Trit3 : packed.dim() == 3 ? Packing::Trit5 : Packing::Bit2;
}

// The weight's format, after checking its dtype and its shape for the sizes.
Packing check_packed(const at::Tensor& packed, int64_t in_features, int64_t out_features) {
  check_cpu(packed, "packed weight");
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "bitnet: packed weight must be uint8, got ",
                   packed.scalar_type());
  const int64_t row_bytes = pad_k(in_features) / 4, blocks5 = pad_k5(in_features) / kBlockK5;
  const int64_t tiles3 = (out_features + kTileN3 - 1) / kTileN3, words3 = pad_k3(in_features) / kGroupK3;
  const Packing f = packing_of(packed);
  const bool ok = f == Packing::Trit3
                      ? packed.size(0) == tiles3 && packed.size(1) == words3 && packed.size(2) == kTileN3 &&
                            packed.size(3) == 2
                  : f == Packing::Trit5
                      ? packed.size(0) == out_features && packed.size(1) == blocks5 && packed.size(2) == 64
                      : packed.dim() == 2 && packed.size(0) == out_features && packed.size(1) == row_bytes;
  TORCH_CHECK_VALUE(ok, "bitnet: packed weight has shape ", packed.sizes(), ", expected [", out_features, ", ",
                    row_bytes, "] (2-bit), [", out_features, ", ", blocks5, ", 64] (5-trit) or [", tiles3, ", ",
                    words3, ", 32, 2] (3-trit) for in_features=", in_features, ", out_features=", out_features);
  return f;
}

// The activation length the kernels read for a weight of this format (zero beyond K): the
// 5-trit and 3-trit products may run the 2-bit kernels on unpacked rows, so they need the 2-bit
// padding too; the 3-trit panels run to Kp3 rounded up to 64.
int64_t pad_k_for(int64_t k, Packing f) {
  return f == Packing::Trit5 ? std::max(pad_k(k), pad_k5(k)) : f == Packing::Trit3 ? pad_k(pad_k3(k)) : pad_k(k);
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// Quantize m contiguous rows of k values of dtype dt into xq (m, Kp) with scales a and row
// sums, normalising each row first if norm is non-null.
void quantize_parallel(const void* src, DType dt, int64_t m, int64_t k, int64_t k_pad, int8_t* xq, float* a,
                       int32_t* xsum, const RowNorm* norm = nullptr) {
  const Kernels& kern = kernels();
  at::parallel_for(0, m, std::max<int64_t>(1, (int64_t(1) << 16) / k), [&](int64_t m0, int64_t m1) {
    quantize_rows(kern, src, dt, k, m0, m1, k, k_pad, xq, k_pad, a, xsum, norm);
  });
}

// Output rows unpacked at a time from the 5-trit format: one panel of the AVX-512 prefill kernel.
constexpr int64_t kUnpackRows = 64;
// parallel_rows hands out no fewer rows at a time: a call of the AVX-512 prefill kernel or of
// the 5-trit unpacking with fewer would fill only part of a panel.
constexpr int64_t kMinChunkRows = kUnpackRows;

// One thread's share of a parallel_rows range, [front, back) in row tiles packed into one word
// (front in the low 32 bits; a weight has far fewer than 2^32 tiles): its owner takes chunks
// from the front, a thread that has run out of work takes them from the back. One cache line
// each, so owners never write a shared line.
struct alignas(64) Share {
  std::atomic<uint64_t> range{0};
};

// Take the next chunk of at most `step` tiles from the front (owner) or the back (thief) of a
// share; false once it is empty.
bool take(std::atomic<uint64_t>& share, uint64_t step, bool from_front, uint64_t& t0, uint64_t& t1) {
  uint64_t r = share.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t front = r & 0xFFFFFFFFu, back = r >> 32;
    if (front >= back) return false;
    const uint64_t size = std::min(step, back - front);
    t0 = from_front ? front : back - size;
    t1 = t0 + size;
    const uint64_t next = from_front ? t1 | (back << 32) : front | (t0 << 32);
    if (share.compare_exchange_weak(r, next, std::memory_order_relaxed)) return true;
  }
}

// Call run(n0, n1) over all n output rows in tiles of row_tile rows, over the thread pool. The
// grain keeps at least ~1M multiply-adds per thread so small layers do not pay for waking
// threads. Each thread starts on its own contiguous share of the tiles and walks it front to
// back in chunks of ~256K multiply-adds and at least min_chunk_rows rows (one weight stream per
// thread, as the hardware prefetchers and the kernels' prefetches want); a thread that
// finishes early takes chunks from the back of the others' shares. A static split left the
// second thread of a 2-core decode waiting in libgomp ~15% of a token (the threads' speeds
// differ from moment to moment on a shared machine); handing every chunk out from one shared
// counter instead interleaved the threads' streams and was slower (BENCHMARKS.md, 2026-12-07).
template <class Run>
void parallel_rows(int64_t n, int64_t macs_per_row, int64_t row_tile, const Run& run,
                   int64_t min_chunk_rows = kMinChunkRows) {
  const int64_t tiles = (n + row_tile - 1) / row_tile;
  const int64_t work_per_tile = std::max<int64_t>(1, macs_per_row * row_tile);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / work_per_tile);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (tiles + grain - 1) / grain);
  if (threads <= 1) {
    run(0, n);
    return;
  }
  const uint64_t step = uint64_t(
      std::max({int64_t(1), (int64_t(1) << 18) / work_per_tile, (min_chunk_rows + row_tile - 1) / row_tile}));
  std::vector<Share> shares(static_cast<size_t>(threads));
  const int64_t per = (tiles + threads - 1) / threads;
  for (int64_t t = 0; t < threads; ++t) {
    const uint64_t front = uint64_t(std::min(tiles, t * per)), back = uint64_t(std::min(tiles, (t + 1) * per));
    shares[size_t(t)].range.store(front | (back << 32), std::memory_order_relaxed);
  }
  auto rows = [&](uint64_t t0, uint64_t t1) { run(int64_t(t0) * row_tile, std::min(n, int64_t(t1) * row_tile)); };
  at::parallel_for(0, threads, 1, [&](int64_t s0, int64_t s1) {
    uint64_t t0, t1;
    for (int64_t s = s0; s < s1; ++s)
      while (take(shares[size_t(s)].range, step, true, t0, t1)) rows(t0, t1);
    for (int64_t v = 1; v < threads; ++v)
      while (take(shares[size_t((s0 + v) % threads)].range, step, false, t0, t1)) rows(t0, t1);
  });
}

// Rows [n0, n1) of a problem whose weight is not 2-bit, through the 2-bit kernels: each
// kUnpackRows rows are unpacked by unpack(n, rows, dst) to 2-bit rows (k_pad2 = K rounded up to
// 256, row stride k_pad2 / 4) and the ISA's gemm runs on them, its outputs shifted to the rows'
// place. (Unpacking costs one pass over the weight per call: little against M tokens of
// multiply-adds in prefill.)
template <class Unpack>
void gemm_unpacked(const Kernels& kern, const GemmProblem& p, int64_t n0, int64_t n1, int64_t k_pad2,
                   const Unpack& unpack) {
  // One thread's 2-bit rows (kUnpackRows x Kp/4 bytes), grown to the largest K seen.
  thread_local std::vector<uint8_t> buffer;
  const int64_t ld2 = k_pad2 / 4;
  if (buffer.size() < size_t(kUnpackRows * ld2)) buffer.resize(size_t(kUnpackRows * ld2));
  const int64_t elem = dtype_size(p.ep.out_dtype);
  for (int64_t n = n0; n < n1; n += kUnpackRows) {
    const int64_t rows = std::min(kUnpackRows, n1 - n);
    unpack(n, rows, buffer.data());
    GemmProblem q = p;
    q.w = buffer.data();
    q.ldw = ld2;
    q.k_pad = k_pad2;
    if (q.ep.acc) q.ep.acc += n;
    if (q.ep.out) q.ep.out = static_cast<char*>(q.ep.out) + n * elem;
    if (q.ep.bias) q.ep.bias += n;
    kern.gemm(q, 0, rows);
  }
}

// Rows [n0, n1) of a problem whose weight is 5-trit (p.w, p.ldw = Kp5 / 5, p.k_pad = Kp5): one
// token streams through the ISA's 5-trit kernel if it has one, several through its gemm5 if it
// takes them; otherwise gemm_unpacked.
void gemm_trit5(const Kernels& kern, const GemmProblem& p, int64_t n0, int64_t n1, int64_t k_pad2) {
  if (p.m == 1 && kern.gemv5) {
    kern.gemv5(p, n0, n1);
    return;
  }
  if (kern.gemm5 && kern.gemm5(p, n0, n1)) return;
  gemm_unpacked(kern, p, n0, n1, k_pad2, [&](int64_t n, int64_t rows, uint8_t* dst) {
    kern.unpack5(p.w + n * p.ldw, p.k_pad, rows, dst, k_pad2);
  });
}

// Rows [n0, n1) of a problem whose weight is 3-trit (p as for Kernels::unpack3): one token
// through the ISA's table lookup if it has one, several through its gemm3; otherwise
// gemm_unpacked. `call` identifies the gemm_parallel call, whose products all share one
// quantized input.
void gemm_trit3(const Kernels& kern, const GemmProblem& p, int64_t n0, int64_t n1, int64_t k_pad2, uint64_t call) {
  if (p.m == 1 && kern.gemv3) {
    // Each thread builds the table of the call's input once, itself (~1 us at K = 2560): no
    // serial step before the parallel region, and no thread reads the 55 KB another core wrote.
    thread_local AlignedBuffer lut_buffer;
    thread_local uint64_t lut_call = 0;
    thread_local int16_t* lut = nullptr;
    if (lut_call != call) {
      const int64_t k_pad3 = p.ldw / 64 * kGroupK3;
      lut = static_cast<int16_t*>(lut_buffer.get(size_t(k_pad3 / 3 * kLut3Entries * 2)));
      kern.lut3(p.xq, k_pad3, lut);
      lut_call = call;
    }
    GemmProblem q = p;
    q.lut = lut;
    kern.gemv3(q, n0, n1);
    return;
  }
  if (p.m > 1 && kern.gemm3) {
    kern.gemm3(p, n0, n1);
    return;
  }
  gemm_unpacked(kern, p, n0, n1, k_pad2,
                [&](int64_t n, int64_t rows, uint8_t* dst) { kern.unpack3(p, n, rows, dst, k_pad2); });
}

// A product of the quantized input with one packed weight of N output rows: its format, and
// the 2-bit padded K (the 5-trit and 3-trit products' unpacking needs it).
struct Product {
  GemmProblem p;
  int64_t n = 0;
  Packing format = Packing::Bit2;
  int64_t k_pad2 = 0;
};

// Run each product over its output rows, all in one parallel region: the row tiles of every
// product (same M) form one range split over the threads, so a layer's q/k/v or gate/up
// products cost one fork/join, and a thread's range may span two weights.
void gemm_parallel(const std::vector<Product>& ps) {
  const Kernels& kern = kernels();
  static std::atomic<uint64_t> calls{0};
  const uint64_t call = ++calls;  // never 0
  // One token against 3-trit weights: threads take whole 32-row tiles, at least kTiles3 of them
  // at a time, so the lookup kernel streams kTiles3 side by side and no tile is computed twice
  // (16-row units and the usual chunks ran 2-3 tiles at a time: 1.06 ms per 2B-4T token slower
  // at 2 threads; larger chunks changed nothing; BENCHMARKS.md, "3-trit weights").
  bool lookup = false;
  for (const Product& pr : ps) lookup = lookup || (pr.format == Packing::Trit3 && pr.p.m == 1 && kern.gemv3);
  const int64_t row_tile = lookup ? kTileN3 : kRowTile, min_chunk = lookup ? kTiles3 * kTileN3 : kMinChunkRows;
  std::vector<int64_t> first(ps.size() + 1, 0);  // index of each product's first tile
  for (size_t i = 0; i < ps.size(); ++i) first[i + 1] = first[i] + (ps[i].n + row_tile - 1) / row_tile;
  parallel_rows(first.back() * row_tile, ps[0].p.m * ps[0].p.k_pad, row_tile, [&](int64_t r0, int64_t r1) {
    const int64_t t0 = r0 / row_tile, t1 = (r1 + row_tile - 1) / row_tile;
    for (size_t i = 0; i < ps.size(); ++i) {
      const int64_t a = std::max(t0, first[i]), b = std::min(t1, first[i + 1]);
      if (a >= b) continue;
      const int64_t n0 = (a - first[i]) * row_tile, n1 = std::min(ps[i].n, (b - first[i]) * row_tile);
      if (ps[i].format == Packing::Trit5)
        gemm_trit5(kern, ps[i].p, n0, n1, ps[i].k_pad2);
      else if (ps[i].format == Packing::Trit3)
        gemm_trit3(kern, ps[i].p, n0, n1, ps[i].k_pad2, call);
      else
        kern.gemm(ps[i].p, n0, n1);
    }
  }, min_chunk);
}

// The product of quantized activations (M, ldq) with a packed weight, results in ep.
Product product(const int8_t* xq, int64_t ldq, const int32_t* xsum, int64_t m, const at::Tensor& w,
                Packing format, int64_t in_features, int64_t n, const Epilogue& ep) {
  Product pr;
  pr.n = n;
  pr.format = format;
  pr.p.xq = xq;
  pr.p.ldq = ldq;
  pr.p.xsum = xsum;
  pr.p.w = w.data_ptr<uint8_t>();
  pr.p.m = m;
  if (format == Packing::Trit3) {
    // kernels.h: ldw is a tile's bytes, k_pad Kp3 rounded up to 64 (the activations run to
    // pad_k_for, a multiple of 256 past Kp3)
    pr.p.k_pad = (pad_k3(in_features) + 63) / 64 * 64;
    pr.p.ldw = pad_k3(in_features) / kGroupK3 * 64;
  } else {
    pr.p.k_pad = format == Packing::Trit5 ? pad_k5(in_features) : pad_k(in_features);
    pr.p.ldw = format == Packing::Trit5 ? pr.p.k_pad / 5 : pr.p.k_pad / 4;
  }
  pr.p.ep = ep;
  pr.k_pad2 = pad_k(in_features);
  return pr;
}

// bias (optional, (out_features,), any float dtype) as a contiguous float32 tensor, or undefined.
at::Tensor float_bias(const std::optional<at::Tensor>& bias, int64_t out_features) {
  if (!bias.has_value()) return at::Tensor();
  check_cpu(*bias, "bias");
  dtype_of(*bias, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, "bitnet: bias has shape ", bias->sizes(),
                    ", expected [", out_features, "]");
  return bias->to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor> quantize_act_cpu(const at::Tensor& x) {
  check_cpu(x, "quantize_act input");
  dtype_of(x, "quantize_act input");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1,
                    "bitnet: quantize_act input needs a non-empty last dimension, got shape ", x.sizes());
  auto xq = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto a = at::empty(with_last(x.sizes(), 1), x.options().dtype(at::kFloat));
  const int64_t k = x.size(-1);
  if (x.numel() == 0) return {xq, a};
  const auto x2d = x.contiguous().view({-1, k});
  quantize_parallel(x2d.data_ptr(), dtype_of(x2d, "input"), x2d.size(0), k, k, xq.data_ptr<int8_t>(),
                    a.data_ptr<float>(), nullptr);
  return {xq, a};
}

at::Tensor ternary_mm_cpu(const at::Tensor& xq, const at::Tensor& packed, int64_t in_features,
                          int64_t out_features) {
  check_sizes(in_features, out_features);
  check_input(xq, in_features, "ternary_mm input");
  TORCH_CHECK_TYPE(xq.scalar_type() == at::kChar, "bitnet: ternary_mm input must be int8, got ", xq.scalar_type());
  const Packing format = check_packed(packed, in_features, out_features);
  auto out = at::empty(with_last(xq.sizes(), out_features), xq.options().dtype(at::kInt));
  const int64_t m = xq.numel() / in_features;
  if (m == 0) return out;
  const int64_t k_pad = pad_k_for(in_features, format);
  // The kernels read Kp activations per row, zero beyond K.
  auto x2d = xq.reshape({m, in_features});
  if (k_pad != in_features) x2d = at::constant_pad_nd(x2d, {0, k_pad - in_features}, 0);
  x2d = x2d.contiguous();
  auto xsum = x2d.sum(1, /*keepdim=*/false, at::kInt);
  const auto w = packed.contiguous();
  Epilogue ep;
  ep.acc = out.data_ptr<int32_t>();
  ep.ld = out_features;
  gemm_parallel(
      {product(x2d.data_ptr<int8_t>(), k_pad, xsum.data_ptr<int32_t>(), m, w, format, in_features, out_features, ep)});
  return out;
}

void check_scale(const at::Tensor& scale, const char* what) {
  check_cpu(scale, what);
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.numel() == 1, "bitnet: ", what,
                    " must be a float32 tensor with one element, got ", scale.scalar_type(), " of shape ",
                    scale.sizes());
}

// The optional fused RMSNorm weight: (in_features,) of the input's dtype, made contiguous.
at::Tensor norm_weight_of(const std::optional<at::Tensor>& norm_weight, const at::Tensor& x, int64_t in_features) {
  if (!norm_weight.has_value()) return at::Tensor();
  check_cpu(*norm_weight, "norm_weight");
  TORCH_CHECK_TYPE(norm_weight->scalar_type() == x.scalar_type(), "bitnet: norm_weight must have the input's dtype ",
                   x.scalar_type(), ", got ", norm_weight->scalar_type());
  TORCH_CHECK_VALUE(norm_weight->dim() == 1 && norm_weight->size(0) == in_features, "bitnet: norm_weight has shape ",
                    norm_weight->sizes(), ", expected [", in_features, "]");
  return norm_weight->contiguous();
}

// The input of a bitlinear-family or table op, (optionally normalised and) quantized once for
// every weight it is multiplied with: xq (M, Kp) int8 (zero from K to Kp), a (M) float32,
// xsum (M) int32, in one buffer: `scratch` (quantize_input), or the caller's (quantize_rows_into).
struct QuantizedInput {
  at::Tensor scratch;
  int8_t* xq = nullptr;
  float* a = nullptr;
  int32_t* xsum = nullptr;
  int64_t m = 0;
  int64_t k_pad = 0;
};

// Bytes of a QuantizedInput's buffer for m rows padded to k_pad.
int64_t quantized_bytes(int64_t m, int64_t k_pad) { return (m * k_pad + 63) / 64 * 64 + 8 * m + 64; }

// m contiguous rows of x (dtype dt, in_features each), normalised by norm_weight (of dt, or
// null) and quantized into buffer (quantized_bytes(m, k_pad) bytes, 64-byte aligned).
QuantizedInput quantize_rows_into(const void* x, DType dt, int64_t m, int64_t in_features, int64_t k_pad,
                                  const void* norm_weight, double norm_eps, uint8_t* buffer) {
  QuantizedInput q;
  q.m = m;
  q.k_pad = k_pad;
  q.xq = reinterpret_cast<int8_t*>(buffer);
  q.a = reinterpret_cast<float*>(q.xq + (m * k_pad + 63) / 64 * 64);
  q.xsum = reinterpret_cast<int32_t*>(q.a + m);
  RowNorm norm;
  if (norm_weight) {
    TORCH_CHECK_VALUE(norm_eps >= 0, "bitnet: norm_eps must be >= 0, got ", norm_eps);
    norm.weight = norm_weight;
    norm.eps = float(norm_eps);
  }
  quantize_parallel(x, dt, m, in_features, k_pad, q.xq, q.a, q.xsum, norm_weight ? &norm : nullptr);
  return q;
}

QuantizedInput quantize_input(const at::Tensor& x, int64_t in_features, int64_t k_pad,
                              const at::Tensor& norm_weight = at::Tensor(), double norm_eps = 0.0) {
  const int64_t m = x.numel() / in_features;
  const at::Tensor scratch = at::empty({quantized_bytes(m, k_pad)}, x.options().dtype(at::kByte));
  const at::Tensor xc = x.contiguous();
  QuantizedInput q = quantize_rows_into(xc.data_ptr(), dtype_of(x, "input"), m, in_features, k_pad,
                                        norm_weight.defined() ? norm_weight.data_ptr() : nullptr, norm_eps,
                                        scratch.data_ptr<uint8_t>());
  q.scratch = scratch;
  return q;
}

// outs[i] (M, out_features[i]) of dtype out_dt = the ternary product of the quantized input
// with packed[i], times scales[i] / a_m, plus bias (float32 or undefined; first weight only):
// every product in one parallel region.
void ternary_into(const QuantizedInput& q, at::TensorList packed, at::TensorList scales, const at::Tensor& bias,
                  const std::vector<void*>& outs, DType out_dt, int64_t in_features, at::IntArrayRef out_features) {
  const size_t n = packed.size();
  std::vector<float> factors(n * size_t(q.m));  // (n, M): scale_i / a_m
  std::vector<at::Tensor> weights(n);
  std::vector<Product> ps(n);
  for (size_t i = 0; i < n; ++i) {
    // check_scale made it a CPU float32 tensor of one element: read it directly (item() is a
    // dispatcher call, ~3 us, 210 times per decode token at the 2B-4T shape).
    const float s = *scales[i].data_ptr<float>();
    for (int64_t m = 0; m < q.m; ++m) factors[i * q.m + m] = s / q.a[m];
    weights[i] = packed[i].contiguous();
    Epilogue ep;
    ep.out = outs[i];
    ep.out_dtype = out_dt;
    ep.row_factor = factors.data() + i * q.m;
    ep.bias = i == 0 && bias.defined() ? bias.data_ptr<float>() : nullptr;
    ep.ld = out_features[i];
    ps[i] = product(q.xq, q.k_pad, q.xsum, q.m, weights[i], packing_of(weights[i]), in_features, out_features[i], ep);
  }
  gemm_parallel(ps);
}

at::Tensor bitlinear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         const std::optional<at::Tensor>& bias, int64_t in_features, int64_t out_features,
                         const std::optional<at::Tensor>& norm_weight, double norm_eps) {
  check_sizes(in_features, out_features);
  dtype_of(x, "bitlinear input");
  check_input(x, in_features, "bitlinear input");
  const Packing format = check_packed(packed, in_features, out_features);
  check_scale(scale, "weight scale");
  const at::Tensor bias_f = float_bias(bias, out_features);
  const at::Tensor norm_w = norm_weight_of(norm_weight, x, in_features);
  auto out = at::empty(with_last(x.sizes(), out_features), x.options());
  if (out.numel() == 0) return out;
  const QuantizedInput q = quantize_input(x, in_features, pad_k_for(in_features, format), norm_w, norm_eps);
  ternary_into(q, packed, scale, bias_f, {out.data_ptr()}, dtype_of(out, "output"), in_features, out_features);
  return out;
}

// One input (optionally normalised), quantized once, times several packed weights (q/k/v).
std::vector<at::Tensor> bitlinear_shared_cpu(const at::Tensor& x, at::TensorList packed, at::TensorList scales,
                                             int64_t in_features, at::IntArrayRef out_features,
                                             const std::optional<at::Tensor>& norm_weight, double norm_eps) {
  const int64_t n = int64_t(packed.size());
  TORCH_CHECK_VALUE(n >= 1 && int64_t(scales.size()) == n && int64_t(out_features.size()) == n,
                    "bitnet: bitlinear_shared needs as many weights, scales and out_features (at least one), got ",
                    n, ", ", scales.size(), " and ", out_features.size());
  dtype_of(x, "bitlinear_shared input");
  check_input(x, in_features, "bitlinear_shared input");
  int64_t k_pad = 0;
  for (int64_t i = 0; i < n; ++i) {
    check_sizes(in_features, out_features[i]);
    k_pad = std::max(k_pad, pad_k_for(in_features, check_packed(packed[i], in_features, out_features[i])));
    check_scale(scales[i], "weight scale");
  }
  const at::Tensor norm_w = norm_weight_of(norm_weight, x, in_features);
  std::vector<at::Tensor> outs;
  for (int64_t i = 0; i < n; ++i) outs.push_back(at::empty(with_last(x.sizes(), out_features[i]), x.options()));
  if (x.numel() == 0) return outs;
  const QuantizedInput q = quantize_input(x, in_features, k_pad, norm_w, norm_eps);
  std::vector<void*> ptrs;
  for (const at::Tensor& o : outs) ptrs.push_back(o.data_ptr());
  ternary_into(q, packed, scales, at::Tensor(), ptrs, dtype_of(x, "output"), in_features, out_features);
  return outs;
}

// g (M, N) of dtype dt = relu(gate(x))^2 * up(x) from the quantized input, u (M, N) scratch.
void relu2_glu_into(const QuantizedInput& q, const at::Tensor& gate, const at::Tensor& gate_scale, const at::Tensor& up,
                    const at::Tensor& up_scale, int64_t in_features, int64_t out_features, DType dt, void* g,
                    void* u) {
  ternary_into(q, {gate, up}, {gate_scale, up_scale}, at::Tensor(), {g, u}, dt, in_features,
               {out_features, out_features});
  const int64_t elem = dtype_size(dt);
  char* gp = static_cast<char*>(g);
  const char* up_p = static_cast<const char*>(u);
  at::parallel_for(0, q.m * out_features, int64_t(1) << 16, [&](int64_t i0, int64_t i1) {
    kernels().relu2_gate(gp + i0 * elem, up_p + i0 * elem, dt, i1 - i0);
  });
}

// BitNet's MLP input side: relu(gate(x))^2 * up(x) with x (optionally normalised) quantized once.
at::Tensor bitlinear_relu2_glu_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& gate_scale,
                                   const at::Tensor& up, const at::Tensor& up_scale, int64_t in_features,
                                   int64_t out_features, const std::optional<at::Tensor>& norm_weight,
                                   double norm_eps) {
  check_sizes(in_features, out_features);
  const DType dt = dtype_of(x, "bitlinear_relu2_glu input");
  check_input(x, in_features, "bitlinear_relu2_glu input");
  const int64_t k_pad = std::max(pad_k_for(in_features, check_packed(gate, in_features, out_features)),
                                 pad_k_for(in_features, check_packed(up, in_features, out_features)));
  check_scale(gate_scale, "gate weight scale");
  check_scale(up_scale, "up weight scale");
  const at::Tensor norm_w = norm_weight_of(norm_weight, x, in_features);
  auto out = at::empty(with_last(x.sizes(), out_features), x.options());
  if (out.numel() == 0) return out;
  const QuantizedInput q = quantize_input(x, in_features, k_pad, norm_w, norm_eps);
  const at::Tensor up_out = at::empty_like(out);
  relu2_glu_into(q, gate, gate_scale, up, up_scale, in_features, out_features, dt, out.data_ptr(), up_out.data_ptr());
  return out;
}

at::Tensor stream_max_cpu(const at::Tensor& buf) {
  check_cpu(buf, "stream_max input");
  TORCH_CHECK_TYPE(buf.scalar_type() == at::kByte, "bitnet: stream_max expects a uint8 tensor, got ",
                   buf.scalar_type());
  const auto b = buf.contiguous();
  const uint8_t* data = b.data_ptr<uint8_t>();
  const int64_t n = b.numel();
  const Kernels& kern = kernels();
  // Each thread reads one contiguous range (an equal share of the bytes) and keeps its own
  // partial maximum; ranges below 256 KiB are not worth a thread.
  std::vector<uint8_t> partial(size_t(at::get_num_threads()), 0);
  at::parallel_for(0, n, int64_t(1) << 18, [&](int64_t b0, int64_t b1) {
    uint8_t& slot = partial[size_t(at::get_thread_num())];
    slot = std::max(slot, kern.stream_max(data + b0, b1 - b0));
  });
  const uint8_t mx = *std::max_element(partial.begin(), partial.end());
  return at::full({}, mx, buf.options());
}

// ---- int8 / int4 tables: the lm_head and the embedding (formats: torch_bitnet/int8.py, int4.py) ----

constexpr int64_t kTableBlockK = 64;  // both formats pad K to one 64-byte vector of int8 activations
constexpr int64_t kTableMaxFeatures = int64_t(1) << 16;  // sum (w + 128) x stays below 255 * 128 * K < 2^31
// Output rows per thread task: a multiple of every table kernel's rows per tile, and 64 rows of
// 16-bit outputs are 128 bytes, so at M = 1 two threads never write into the same cache line.
constexpr int64_t kTableRowTile = 64;

int64_t pad_table(int64_t k) { return (k + kTableBlockK - 1) / kTableBlockK * kTableBlockK; }

// The checks both table formats share (messages as int8.check_int8_weight / int4.check_int4_weight).
void check_table_sizes(const at::Tensor& weight, const at::Tensor& scale, int64_t features, int64_t rows,
                       const char* what) {
  TORCH_CHECK_VALUE(features >= 1 && rows >= 1, "bitnet: ", what, " sizes must be >= 1, got ", features,
                    " features and ", rows, " rows");
  TORCH_CHECK_VALUE(features <= kTableMaxFeatures, "bitnet: ", what, " has ", features,
                    " features; the supported maximum is ", kTableMaxFeatures, " (int32 accumulation must stay exact)");
  check_cpu(weight, "weight");
  check_cpu(scale, "weight scale");
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kByte, "bitnet: ", what, " weight must be uint8 codes, got ",
                   weight.scalar_type());
}

// weight: uint8 codes (rows, Kp); scale: float32 (rows,). Messages as int8.check_int8_weight.
void check_int8_weight(const at::Tensor& weight, const at::Tensor& scale, int64_t features, int64_t rows,
                       const char* what) {
  check_table_sizes(weight, scale, features, rows, what);
  const int64_t k_pad = pad_table(features);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == rows && weight.size(1) == k_pad, "bitnet: ", what,
                    " weight has shape ", weight.sizes(), ", expected [", rows, ", ", k_pad, "]");
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == rows, "bitnet: ", what,
                    " scale must be float32 of shape (", rows, ",), got ", scale.scalar_type(), " of shape ",
                    scale.sizes());
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                           int64_t in_features, int64_t out_features, const std::optional<at::Tensor>& bias) {
  check_int8_weight(weight, scale, in_features, out_features, "int8_linear");
  const DType dt = dtype_of(x, "int8_linear input");
  check_input(x, in_features, "int8_linear input");
  const at::Tensor bias_f = float_bias(bias, out_features);
  auto out = at::empty(with_last(x.sizes(), out_features), x.options());
  const int64_t m = x.numel() / in_features;
  if (m == 0) return out;

  const int64_t k_pad = pad_table(in_features);
  const QuantizedInput q = quantize_input(x, in_features, k_pad);

  const auto w = weight.contiguous();
  const auto s = scale.contiguous();
  Int8Problem p;
  p.xq = q.xq;
  p.ldq = k_pad;
  p.xsum = q.xsum;
  p.a = q.a;
  p.w = w.data_ptr<uint8_t>();
  p.w_scale = s.data_ptr<float>();
  p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  p.m = m;
  p.k_pad = k_pad;
  p.out = out.data_ptr();
  p.out_dtype = dt;
  p.ld = out_features;
  const Kernels& kern = kernels();
  parallel_rows(out_features, m * k_pad, kTableRowTile, [&](int64_t n0, int64_t n1) { kern.int8_gemm(p, n0, n1); });
  return out;
}

// The shared half of the embedding ops: ids (any shape, int64, each in [0, rows)) -> out
// (*ids.shape, embedding_dim) of dtype, filled over the threads by
// lookup(ids, count, out_rows, out_dtype) for consecutive ranges of ids.
template <class Lookup>
at::Tensor embedding_lookup(const at::Tensor& ids, int64_t rows, int64_t embedding_dim, at::ScalarType dtype,
                            const char* what, const Lookup& lookup) {
  check_cpu(ids, "ids");
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "bitnet: ", what, " ids must be int64, got ", ids.scalar_type());
  const DType dt = dtype_of(dtype, (std::string(what) + " dtype").c_str());
  std::vector<int64_t> sizes(ids.sizes().begin(), ids.sizes().end());
  sizes.push_back(embedding_dim);
  auto out = at::empty(sizes, ids.options().dtype(dtype));
  const int64_t count = ids.numel();
  if (count == 0) return out;
  const auto idc = ids.contiguous();
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK_INDEX(id[i] >= 0 && id[i] < rows, "bitnet: ", what, " id ", id[i],
                      " is out of range: the table has ", rows, " rows");
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = embedding_dim * out.element_size();
  at::parallel_for(0, count, std::max<int64_t>(1, (int64_t(1) << 16) / embedding_dim),
                   [&](int64_t i0, int64_t i1) { lookup(id + i0, i1 - i0, dst + i0 * row_bytes, dt); });
  return out;
}

at::Tensor int8_embedding_cpu(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& scale,
                              int64_t embedding_dim, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "bitnet: int8_embedding weight must be 2-D (rows, Kp), got shape ",
                    weight.sizes());
  const int64_t rows = weight.size(0);
  check_int8_weight(weight, scale, embedding_dim, rows, "int8_embedding");
  const auto w = weight.contiguous();
  const auto s = scale.contiguous();
  return embedding_lookup(ids, rows, embedding_dim, dtype, "int8_embedding",
                          [&](const int64_t* id, int64_t count, char* out, DType dt) {
                            int8_embedding_rows(id, count, w.data_ptr<uint8_t>(), w.size(1), s.data_ptr<float>(),
                                                embedding_dim, out, dt);
                          });
}

// weight: uint8 codes (ceil(rows/16), Kp/8, 64); scale: bfloat16 (rows, Kp/32). Messages as
// int4.check_int4_weight.
void check_int4_weight(const at::Tensor& weight, const at::Tensor& scale, int64_t features, int64_t rows,
                       const char* what) {
  check_table_sizes(weight, scale, features, rows, what);
  const int64_t k_pad = pad_table(features), tiles = (rows + kInt4Tile - 1) / kInt4Tile;
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(0) == tiles && weight.size(1) == k_pad / 8 && weight.size(2) == 64,
                    "bitnet: ", what, " weight has shape ", weight.sizes(), ", expected (", tiles, ", ", k_pad / 8,
                    ", 64)");
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kBFloat16 && scale.dim() == 2 && scale.size(0) == rows &&
                        scale.size(1) == k_pad / kInt4Group,
                    "bitnet: ", what, " scale must be bfloat16 of shape (", rows, ", ", k_pad / kInt4Group, "), got ",
                    scale.scalar_type(), " of shape ", scale.sizes());
}

// The scales as a contiguous tensor whose data is 4-byte aligned: the kernels read them as
// 32-bit pairs (a fresh allocation is; only an odd-offset view needs the copy).
at::Tensor aligned_scales(const at::Tensor& scale) {
  at::Tensor s = scale.contiguous();
  if (reinterpret_cast<uintptr_t>(s.data_ptr()) % 4) s = s.clone();
  return s;
}

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                           int64_t in_features, int64_t out_features, const std::optional<at::Tensor>& bias) {
  check_int4_weight(weight, scale, in_features, out_features, "int4_linear");
  const DType dt = dtype_of(x, "int4_linear input");
  check_input(x, in_features, "int4_linear input");
  const at::Tensor bias_f = float_bias(bias, out_features);
  auto out = at::empty(with_last(x.sizes(), out_features), x.options());
  const int64_t m = x.numel() / in_features;
  if (m == 0) return out;

  const int64_t k_pad = pad_table(in_features), groups = k_pad / kInt4Group;
  const QuantizedInput q = quantize_input(x, in_features, k_pad);
  const int8_t* xq = q.xq;
  auto offsets = at::empty({m, groups}, x.options().dtype(at::kInt));  // (M, Kp/32)
  int32_t* offset = offsets.data_ptr<int32_t>();
  // Each group's accumulator starts at -8 * sum x over the group (codes are w + 8).
  at::parallel_for(0, m, std::max<int64_t>(1, (int64_t(1) << 16) / k_pad), [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0; i < m1; ++i)
      for (int64_t g = 0; g < groups; ++g) {
        int32_t sum = 0;
        for (int64_t k = g * kInt4Group; k < (g + 1) * kInt4Group; ++k) sum += xq[i * k_pad + k];
        offset[i * groups + g] = -8 * sum;
      }
  });

  const auto w = weight.contiguous();
  const auto s = aligned_scales(scale);
  Int4Problem p;
  p.xq = q.xq;
  p.ldq = k_pad;
  p.offset = offset;
  p.a = q.a;
  p.w = w.data_ptr<uint8_t>();
  p.w_scale = reinterpret_cast<const uint16_t*>(s.data_ptr());
  p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  p.m = m;
  p.k_pad = k_pad;
  p.out = out.data_ptr();
  p.out_dtype = dt;
  p.ld = out_features;
  const Kernels& kern = kernels();
  parallel_rows(out_features, m * k_pad, kTableRowTile, [&](int64_t n0, int64_t n1) { kern.int4_gemm(p, n0, n1); });
  return out;
}

at::Tensor int4_embedding_cpu(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& scale,
                              int64_t embedding_dim, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(scale.dim() == 2, "bitnet: int4_embedding scale must be 2-D (rows, Kp/32), got shape ",
                    scale.sizes());
  const int64_t rows = scale.size(0);
  check_int4_weight(weight, scale, embedding_dim, rows, "int4_embedding");
  const auto w = weight.contiguous();
  const auto s = scale.contiguous();
  return embedding_lookup(ids, rows, embedding_dim, dtype, "int4_embedding",
                          [&](const int64_t* id, int64_t count, char* out, DType dt) {
                            int4_embedding_rows(id, count, w.data_ptr<uint8_t>(),
                                                reinterpret_cast<const uint16_t*>(s.data_ptr()),
                                                pad_table(embedding_dim), embedding_dim, out, dt);
                          });
}

// ---- int8 KV cache ----

void check_cache(const at::Tensor& cache, const at::Tensor& scale, const char* what) {
  check_cpu(cache, what);
  TORCH_CHECK_TYPE(cache.scalar_type() == at::kChar, "bitnet: ", what, " must be int8, got ", cache.scalar_type());
  TORCH_CHECK_VALUE(cache.dim() == 4 && cache.is_contiguous(), "bitnet: ", what,
                    " must be a contiguous (batch, kv_heads, max_len, head_dim) tensor, got shape ", cache.sizes());
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, "bitnet: ", what, " scales must be float32, got ",
                   scale.scalar_type());
  TORCH_CHECK_VALUE(scale.is_contiguous() && scale.sizes() == cache.sizes().slice(0, 3), "bitnet: ", what,
                    " scales have shape ", scale.sizes(), ", expected ", cache.sizes().slice(0, 3));
}

// Positions as int64 values, each checked to lie in [0, max_len).
std::vector<int64_t> check_positions(const at::Tensor& positions, int64_t count, int64_t max_len) {
  check_cpu(positions, "positions");
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong, "bitnet: positions must be int64, got ",
                   positions.scalar_type());
  TORCH_CHECK_VALUE(positions.dim() == 1 && positions.size(0) == count, "bitnet: positions has shape ",
                    positions.sizes(), ", expected [", count, "] (one per query / new token)");
  const auto p = positions.contiguous();
  std::vector<int64_t> out(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + count);
  for (int64_t v : out)
    TORCH_CHECK_VALUE(v >= 0 && v < max_len, "bitnet: position ", v, " is outside the cache (0 .. ", max_len - 1, ")");
  return out;
}

// Where the d values of vector (batch bi, head hi, token i) of some (B, H, Q, D) keys or values
// start: element bi * sb + hi * sh + i * si of data (dtype dt).
struct VectorLayout {
  const void* data;
  DType dt;
  int64_t sb, sh, si;
};

// Quantize the new keys / values (B, H, Q, D) into rows pos[i] of the checked caches.
void kv_write_into(at::Tensor& k_cache, at::Tensor& k_scale, at::Tensor& v_cache, at::Tensor& v_scale,
                   const VectorLayout& k, const VectorLayout& v, int64_t b, int64_t h, int64_t n, int64_t d,
                   const std::vector<int64_t>& pos) {
  const Kernels& kern = kernels();
  const int64_t len = k_cache.size(2), k_elem = dtype_size(k.dt), v_elem = dtype_size(v.dt);
  const char* kp = static_cast<const char*>(k.data);
  const char* vp = static_cast<const char*>(v.data);
  int8_t* const kq = k_cache.data_ptr<int8_t>();
  int8_t* const vq = v_cache.data_ptr<int8_t>();
  float* const ks = k_scale.data_ptr<float>();
  float* const vs = v_scale.data_ptr<float>();
  // (b, h, i) -> row pos[i] of cache (b, h): one quantized vector each. A decode step's few
  // vectors (2B-4T: 5 x 128 values each for keys and values) are quantized by one thread.
  const int64_t heads_per_thread = std::max<int64_t>(1, kAttentionMinParallelWork / std::max<int64_t>(1, n * d));
  at::parallel_for(0, b * h, heads_per_thread, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t bi = r / h, hi = r % h, dst = r * len + pos[size_t(i)];
        kern.kv_quantize(kp + (bi * k.sb + hi * k.sh + i * k.si) * k_elem, k.dt, d, kq + dst * d, ks + dst);
        kern.kv_quantize(vp + (bi * v.sb + hi * v.sh + i * v.si) * v_elem, v.dt, d, vq + dst * d, vs + dst);
      }
  });
}

void kv_cache_write_cpu(at::Tensor& k_cache, at::Tensor& k_scale, at::Tensor& v_cache, at::Tensor& v_scale,
                        const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions) {
  check_cache(k_cache, k_scale, "key cache");
  check_cache(v_cache, v_scale, "value cache");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "bitnet: key cache ", k_cache.sizes(),
                    " and value cache ", v_cache.sizes(), " differ in shape");
  for (const at::Tensor* t : {&k, &v}) {
    check_cpu(*t, "new keys/values");
    dtype_of(*t, "new keys/values");
    TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == k_cache.size(0) && t->size(1) == k_cache.size(1) &&
                          t->size(3) == k_cache.size(3),
                      "bitnet: new keys/values have shape ", t->sizes(), ", expected [", k_cache.size(0), ", ",
                      k_cache.size(1), ", Q, ", k_cache.size(3), "] for the cache");
  }
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "bitnet: new keys ", k.sizes(), " and values ", v.sizes(), " differ");
  const int64_t b = k.size(0), h = k.size(1), n = k.size(2), d = k.size(3);
  const auto pos = check_positions(positions, n, k_cache.size(2));
  // Read in their own dtype by the kernel: a whole-tensor .to(float) would be two more
  // dispatcher calls and copies per layer and decode step.
  const auto kc = k.contiguous(), vc = v.contiguous();
  const VectorLayout lk{kc.data_ptr(), dtype_of(kc, "new keys"), h * n * d, n * d, d};
  const VectorLayout lv{vc.data_ptr(), dtype_of(vc, "new values"), h * n * d, n * d, d};
  kv_write_into(k_cache, k_scale, v_cache, v_scale, lk, lv, b, h, n, d, pos);
}

// The optional attention mask as a contiguous bool (batch, Q, Lm) tensor, Lm in (max(pos), max_len];
// transformers' sdpa layout (batch, 1, Q, Lm) is accepted and squeezed.
at::Tensor check_mask(const at::Tensor& mask, int64_t b, int64_t n, int64_t len, const std::vector<int64_t>& pos) {
  check_cpu(mask, "mask");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "bitnet: mask must be bool (True = may attend), got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 3 || (mask.dim() == 4 && mask.size(1) == 1), "bitnet: mask must be (batch, Q, Lm) ",
                    "or (batch, 1, Q, Lm), got shape ", mask.sizes());
  const at::Tensor m = mask.dim() == 4 ? mask.squeeze(1) : mask;
  TORCH_CHECK_VALUE(m.size(0) == b && m.size(1) == n, "bitnet: mask has shape ", mask.sizes(), ", expected batch ", b,
                    " and Q ", n, " (batch, Q, Lm)");
  const int64_t needed = n ? *std::max_element(pos.begin(), pos.end()) + 1 : 1;
  TORCH_CHECK_VALUE(m.size(2) >= needed && m.size(2) <= len, "bitnet: mask covers ", m.size(2),
                    " cache positions; it must cover at least max(positions) + 1 = ", needed,
                    " and at most the cache length ", len);
  return m.contiguous();
}

// out (B, H, Q, D) float32 = attention of the float32 queries qf (B, H, Q, D) over the checked
// int8 caches at positions pos, with the optional mask (batch, Q, mask_len) bytes.
// int16_products: the queries came from a 16-bit float (AttentionProblem::int16_products).
void attention_into(const float* qf, int64_t b, int64_t h, int64_t n, int64_t d, const at::Tensor& k_cache,
                    const at::Tensor& k_scale, const at::Tensor& v_cache, const at::Tensor& v_scale,
                    const std::vector<int64_t>& pos, double scale, const uint8_t* mask_data, int64_t mask_len,
                    bool int16_products, float* out_data) {
  const int64_t kvh = k_cache.size(1), len = k_cache.size(2);
  // Work unit: one (batch, kv head) with its rows = G query heads x Q queries, which in q's
  // (batch, heads, Q, head_dim) layout are contiguous (G * Q, head_dim) rows, as in out.
  const int64_t units = b * kvh, rows = (h / kvh) * n;
  std::vector<int64_t> end(pos.size());
  for (size_t i = 0; i < pos.size(); ++i) end[i] = pos[i] + 1;
  const int64_t reach = *std::max_element(end.begin(), end.end());
  const int64_t row_tasks = (rows + kAttentionRowsPerTask - 1) / kAttentionRowsPerTask;
  // Decode has few units (2B-4T: 5 kv heads for 2 threads): then each unit's positions are also
  // split (flash-decoding), each part kept as its own softmax state and merged at the end.
  const int64_t threads = at::get_num_threads();
  const bool parallel = threads > 1 && units * rows * reach * d >= kAttentionMinParallelWork;
  int64_t parts = 1;
  if (parallel && units * row_tasks < kAttentionTasksPerThread * threads) {
    parts = (kAttentionTasksPerThread * threads + units * row_tasks - 1) / (units * row_tasks);
    parts = std::min({parts, std::max<int64_t>(1, reach / kAttentionMinPart), kMaxAttentionParts});
  }
  const int64_t part_len = (reach + parts - 1) / parts;
  const int64_t part_span = (part_len + kAttentionBlock - 1) / kAttentionBlock * kAttentionBlock;
  // Softmax states (unit, part, row): running max, sum, and for parts > 1 the (d,) accumulators
  // (with one part they accumulate in out directly and are normalised in place).
  std::vector<float> m_state(size_t(units * parts * rows)), l_state(m_state.size());
  std::vector<float> acc_state(parts > 1 ? m_state.size() * size_t(d) : 0);
  const Kernels& kern = kernels();
  static std::atomic<uint64_t> calls{0};
  const uint64_t call = ++calls;
  auto problem = [&](int64_t u) {
    AttentionProblem p;
    p.q = qf + u * rows * d;
    p.nq = n;
    p.d = d;
    p.scale = float(scale);
    p.end = end.data();
    p.mask = mask_data ? mask_data + (u / kvh) * n * mask_len : nullptr;
    p.ld_mask = mask_len;
    p.k = k_cache.data_ptr<int8_t>() + u * len * d;
    p.k_scale = k_scale.data_ptr<float>() + u * len;
    p.v = v_cache.data_ptr<int8_t>() + u * len * d;
    p.v_scale = v_scale.data_ptr<float>() + u * len;
    p.int16_products = int16_products;
    p.call = call;
    return p;
  };
  // Tasks (unit, row range, part) differ in cost (causal rows see different lengths): each
  // thread takes the next task from a shared counter until none is left.
  const int64_t tasks = units * row_tasks * parts;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, tasks, parallel ? 1 : tasks, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < tasks; t = next++) {
      const int64_t u = t / (row_tasks * parts), rt = t / parts % row_tasks, s = t % parts;
      const int64_t r0 = rt * kAttentionRowsPerTask, r1 = std::min(rows, r0 + kAttentionRowsPerTask);
      const int64_t state = (u * parts + s) * rows + r0;
      float* acc = parts > 1 ? acc_state.data() + state * d : out_data + (u * rows + r0) * d;
      kern.attention_partial(problem(u), r0, r1, s * part_span, std::min(reach, (s + 1) * part_span),
                             m_state.data() + state, l_state.data() + state, acc);
      if (parts == 1)
        for (int64_t r = 0; r < r1 - r0; ++r)
          attention_merge(m_state.data() + state + r, l_state.data() + state + r, acc + r * d, 1, 0, d, acc + r * d);
    }
  });
  // The merge reads parts x d floats per row: for a decode token (2B-4T: 20 rows, 2 parts) a
  // few microseconds on the calling thread, less than another fork / join of the pool.
  if (parts > 1)
    at::parallel_for(0, units * rows, std::max<int64_t>(1, kAttentionMinParallelWork / (parts * d)),
                     [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t first = (i / rows) * parts * rows + i % rows;  // state of part 0
        attention_merge(m_state.data() + first, l_state.data() + first, acc_state.data() + first * d, parts, rows, d,
                        out_data + i * d);
      }
    });
}

at::Tensor int8_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& k_scale,
                              const at::Tensor& v_cache, const at::Tensor& v_scale, const at::Tensor& positions,
                              double scale, const std::optional<at::Tensor>& mask) {
  check_cpu(q, "queries");
  dtype_of(q, "queries");
  check_cache(k_cache, k_scale, "key cache");
  check_cache(v_cache, v_scale, "value cache");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "bitnet: key cache ", k_cache.sizes(),
                    " and value cache ", v_cache.sizes(), " differ in shape");
  TORCH_CHECK_VALUE(q.dim() == 4, "bitnet: queries must be (batch, heads, Q, head_dim), got shape ", q.sizes());
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t kvh = k_cache.size(1), len = k_cache.size(2);
  TORCH_CHECK_VALUE(b == k_cache.size(0), "bitnet: queries have batch ", b, ", the cache ", k_cache.size(0));
  TORCH_CHECK_VALUE(d == k_cache.size(3), "bitnet: queries have head_dim ", d, ", the cache ", k_cache.size(3));
  TORCH_CHECK_VALUE(h % kvh == 0, "bitnet: ", h, " query heads are not a multiple of ", kvh, " kv heads");
  const auto pos = check_positions(positions, n, len);
  const at::Tensor mk = mask ? check_mask(*mask, b, n, len, pos) : at::Tensor();
  // (batch, Q, Lm) bytes, bool stored as 0 / 1.
  const uint8_t* mask_data = mk.defined() ? reinterpret_cast<const uint8_t*>(mk.data_ptr<bool>()) : nullptr;
  const int64_t mask_len = mk.defined() ? mk.size(2) : 0;
  const auto qf = q.to(at::kFloat).contiguous();
  auto out = at::empty({b, h, n, d}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.to(q.scalar_type());
  attention_into(qf.data_ptr<float>(), b, h, n, d, k_cache, k_scale, v_cache, v_scale, pos, scale, mask_data,
                 mask_len, q.scalar_type() != at::kFloat, out.data_ptr<float>());
  return out.to(q.scalar_type());
}

// ---- one BitNet decoder layer ----

// Rotary embedding (rotate-half form) of x (B, Q, heads, D) values of dtype dt, rows of ld_x
// elements per token, into out (B, heads, Q, D) contiguous, with cos / sin (B, Q, D) of dt:
// out = x * cos + cat(-x[D/2:], x[:D/2]) * sin, both products and the sum rounded to dt, as
// eager PyTorch computes it in dt (and inductor with emulate_precision_casts).
void rope_into(const void* x, int64_t ld_x, DType dt, int64_t b, int64_t q, const void* cos, const void* sin,
               int64_t heads, int64_t d, void* out) {
  const Kernels& kern = kernels();
  const int64_t elem = dtype_size(dt);
  const char* xp = static_cast<const char*>(x);
  const char* cp = static_cast<const char*>(cos);
  const char* sp = static_cast<const char*>(sin);
  char* op = static_cast<char*>(out);
  at::parallel_for(0, b * q, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, heads * d)),
                   [&](int64_t t0, int64_t t1) {
    std::vector<float> cs(static_cast<size_t>(d)), ss(static_cast<size_t>(d));
    for (int64_t t = t0; t < t1; ++t) {  // token t = (batch, query)
      const int64_t bi = t / q, qi = t % q;
      to_float(cp + t * d * elem, dt, d, cs.data());
      to_float(sp + t * d * elem, dt, d, ss.data());
      for (int64_t h = 0; h < heads; ++h)
        kern.rope_row(xp + (t * ld_x + h * d) * elem, cs.data(), ss.data(), dt, d,
                      op + ((bi * heads + h) * q + qi) * d * elem);
    }
  });
}

// out[i] = a[i] + b[i] over n values of dtype dt, the sum in float32 rounded once to dt: what
// at::add computes for these dtypes (the residual adds of a layer).
void add_into(const void* a, const void* b, DType dt, int64_t n, void* out) {
  const Kernels& kern = kernels();
  const int64_t elem = dt == DType::F32 ? 4 : 2;
  at::parallel_for(0, n, int64_t(1) << 16, [&](int64_t i0, int64_t i1) {
    kern.add_rows(static_cast<const char*>(a) + i0 * elem, static_cast<const char*>(b) + i0 * elem, dt, i1 - i0,
                  static_cast<char*>(out) + i0 * elem);
  });
}

// x (B, Q, hidden) -> the layer's output (B, Q, hidden), writing the Q new keys / values into
// the int8 cache at `positions`. packed / scales: q, k, v, o, gate, up, down; norms / eps:
// input_layernorm, attn_sub_norm, post_attention_layernorm, ffn_sub_norm. The steps and their
// roundings are those of torch_bitnet.fuse's layer forward over the separate ops (the same
// kernels, in the same order, on raw buffers); one call instead of ten op and kernel calls per
// layer and token (see reference.decoder_layer).
at::Tensor decoder_layer_cpu(const at::Tensor& x, at::TensorList packed, at::TensorList scales, at::TensorList norms,
                             at::ArrayRef<double> eps, const at::Tensor& cos, const at::Tensor& sin,
                             at::Tensor& k_cache, at::Tensor& k_scale, at::Tensor& v_cache, at::Tensor& v_scale,
                             const at::Tensor& positions, double scaling, int64_t num_heads,
                             int64_t intermediate_size, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(packed.size() == 7 && scales.size() == 7, "bitnet: decoder_layer needs 7 packed weights and ",
                    "7 scales (q, k, v, o, gate, up, down), got ", packed.size(), " and ", scales.size());
  TORCH_CHECK_VALUE(norms.size() == 4 && eps.size() == 4, "bitnet: decoder_layer needs 4 norm weights and 4 eps ",
                    "(input, attention sub-norm, post-attention, ffn sub-norm), got ", norms.size(), " and ",
                    eps.size());
  check_cpu(x, "decoder_layer input");
  const DType dt = dtype_of(x, "decoder_layer input");
  TORCH_CHECK_VALUE(x.dim() == 3, "bitnet: decoder_layer input must be (batch, Q, hidden), got shape ", x.sizes());
  check_cache(k_cache, k_scale, "key cache");
  check_cache(v_cache, v_scale, "value cache");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "bitnet: key cache ", k_cache.sizes(),
                    " and value cache ", v_cache.sizes(), " differ in shape");
  const int64_t b = x.size(0), q = x.size(1), hidden = x.size(2);
  const int64_t kvh = k_cache.size(1), len = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK_VALUE(num_heads > 0 && num_heads % kvh == 0, "bitnet: ", num_heads,
                    " query heads are not a positive multiple of ", kvh, " kv heads");
  TORCH_CHECK_VALUE(d % 2 == 0, "bitnet: head_dim must be even for the rotary embedding, got ", d);
  TORCH_CHECK_VALUE(b == k_cache.size(0), "bitnet: the input has batch ", b, ", the cache ", k_cache.size(0));
  for (const at::Tensor* t : {&cos, &sin}) {
    check_cpu(*t, "cos / sin");
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "bitnet: cos / sin must have the input's dtype ",
                     x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == b && t->size(1) == q && t->size(2) == d,
                      "bitnet: cos / sin have shape ", t->sizes(), ", expected [", b, ", ", q, ", ", d, "]");
  }
  const int64_t hd = num_heads * d, kvd = kvh * d, inter = intermediate_size;
  // (in, out) of q, k, v, o, gate, up, down, and which input each quantization reads
  const int64_t ins[7] = {hidden, hidden, hidden, hd, hidden, hidden, inter};
  const int64_t outs[7] = {hd, kvd, kvd, hidden, inter, inter, hidden};
  int64_t k_pads[7];  // the activation length each weight's format needs
  for (int i = 0; i < 7; ++i) {
    check_sizes(ins[i], outs[i]);
    k_pads[i] = pad_k_for(ins[i], check_packed(packed[i], ins[i], outs[i]));
    check_scale(scales[i], "weight scale");
  }
  at::Tensor norm_w[4];
  const int64_t norm_in[4] = {hidden, hd, hidden, inter};
  for (int i = 0; i < 4; ++i) norm_w[i] = norm_weight_of(norms[i], x, norm_in[i]);
  const auto pos = check_positions(positions, q, len);
  const at::Tensor mk = mask ? check_mask(*mask, b, q, len, pos) : at::Tensor();
  auto out = at::empty(x.sizes(), x.options());
  const int64_t m = b * q;
  if (m == 0) return out;
  const auto xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  const int64_t elem = dtype_size(dt);
  // K padded for each quantized input: q/k/v share one, gate/up another.
  const int64_t kp_qkv = std::max({k_pads[0], k_pads[1], k_pads[2]}), kp_o = k_pads[3];
  const int64_t kp_gu = std::max(k_pads[4], k_pads[5]), kp_down = k_pads[6];
  // The intermediates, in one buffer (a dozen tensors cost ~1 us of allocator and dispatcher
  // each, 30 layers per decode token, on the thread the others wait for):
  // the quantized input (reused by all four quantizations), h = x + attention (kept to the
  // end), then the attention's buffers, and over the same bytes the MLP's.
  auto aligned = [](int64_t bytes) { return (bytes + 63) / 64 * 64; };
  const int64_t o_h = aligned(quantized_bytes(m, std::max({kp_qkv, kp_o, kp_gu, kp_down})));
  const int64_t o_qkv = o_h + aligned(m * hidden * elem);  // q (M, hd), k (M, kvd), v (M, kvd)
  const int64_t o_qrot = o_qkv + aligned(m * (hd + 2 * kvd) * elem);  // (B, H, Q, D)
  const int64_t o_krot = o_qrot + aligned(m * hd * elem);              // (B, KVH, Q, D)
  const int64_t o_qf = o_krot + aligned(m * kvd * elem);               // float (B, H, Q, D)
  const int64_t o_att = o_qf + aligned(m * hd * 4);                    // float (B, H, Q, D)
  const int64_t o_att_in = o_att + aligned(m * hd * 4);                // (B, Q, H * D): o_proj's input
  const int64_t o_o = o_att_in + aligned(m * hd * elem);               // (M, hidden)
  const int64_t o_gate = o_qkv, o_up = o_gate + aligned(m * inter * elem);  // (M, inter) each
  const int64_t o_down = o_up + aligned(m * inter * elem);                  // (M, hidden)
  const int64_t bytes = std::max(o_o + aligned(m * hidden * elem), o_down + aligned(m * hidden * elem));
  thread_local AlignedBuffer workspace;  // kept between calls (see AlignedBuffer)
  char* const base = static_cast<char*>(workspace.get(size_t(bytes)));
  uint8_t* const xq_buf = reinterpret_cast<uint8_t*>(base);
  void* const h = base + o_h;
  char* const qo = base + o_qkv;
  char* const ko = qo + m * hd * elem;
  char* const vo = ko + m * kvd * elem;
  char* const q_rot = base + o_qrot;
  char* const k_rot = base + o_krot;

  // Attention: q, k, v (B, Q, heads * D) from the normalised input, quantized once.
  QuantizedInput qi = quantize_rows_into(xc.data_ptr(), dt, m, hidden, kp_qkv, norm_w[0].data_ptr(), eps[0], xq_buf);
  ternary_into(qi, packed.slice(0, 3), scales.slice(0, 3), at::Tensor(), {qo, ko, vo}, dt, hidden, {hd, kvd, kvd});
  rope_into(qo, hd, dt, b, q, cc.data_ptr(), sc.data_ptr(), num_heads, d, q_rot);
  rope_into(ko, kvd, dt, b, q, cc.data_ptr(), sc.data_ptr(), kvh, d, k_rot);
  // keys (B, KVH, Q, D) from the rotation; values straight from v's (B, Q, KVH, D) rows
  const VectorLayout lk{k_rot, dt, kvh * q * d, q * d, d};
  const VectorLayout lv{vo, dt, q * kvd, d, kvd};
  kv_write_into(k_cache, k_scale, v_cache, v_scale, lk, lv, b, kvh, q, d, pos);
  float* const qf = reinterpret_cast<float*>(base + o_qf);
  float* const att = reinterpret_cast<float*>(base + o_att);
  to_float(q_rot, dt, m * hd, qf);
  attention_into(qf, b, num_heads, q, d, k_cache, k_scale, v_cache, v_scale, pos, scaling,
                 mk.defined() ? reinterpret_cast<const uint8_t*>(mk.data_ptr<bool>()) : nullptr,
                 mk.defined() ? mk.size(2) : 0, dt != DType::F32, att);
  // (B, H, Q, D) float -> (B, Q, H * D) in dt: the attention output's rounding, then o_proj's layout
  char* const att_in = base + o_att_in;
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t hi = 0; hi < num_heads; ++hi)
      for (int64_t t = 0; t < q; ++t) {
        const float* src = att + ((bi * num_heads + hi) * q + t) * d;
        char* dst = att_in + ((bi * q + t) * hd + hi * d) * elem;
        for (int64_t j = 0; j < d; ++j) store_float(dst, dt, j, src[j]);
      }
  qi = quantize_rows_into(att_in, dt, m, hd, kp_o, norm_w[1].data_ptr(), eps[1], xq_buf);
  void* const o = base + o_o;
  ternary_into(qi, packed.slice(3, 1), scales.slice(3, 1), at::Tensor(), {o}, dt, hd, {hidden});
  add_into(xc.data_ptr(), o, dt, m * hidden, h);
  // MLP: down(ffn_sub_norm(relu(gate(n))^2 * up(n))), n = post_attention_layernorm(h).
  qi = quantize_rows_into(h, dt, m, hidden, kp_gu, norm_w[2].data_ptr(), eps[2], xq_buf);
  void* const gate = base + o_gate;
  relu2_glu_into(qi, packed[4], scales[4], packed[5], scales[5], hidden, inter, dt, gate, base + o_up);
  qi = quantize_rows_into(gate, dt, m, inter, kp_down, norm_w[3].data_ptr(), eps[3], xq_buf);
  void* const down = base + o_down;
  ternary_into(qi, packed.slice(6, 1), scales.slice(6, 1), at::Tensor(), {down}, dt, inter, {hidden});
  add_into(h, down, dt, m * hidden, out.data_ptr());
  return out;
}

std::vector<std::string> supported_isas_op() { return supported_isa_names(); }
std::string get_isa_op() { return current_isa_name(); }
void set_isa_op(const std::string& name) { select_isa(name); }

}  // namespace
}  // namespace tbn

TORCH_LIBRARY(bitnet, m) {
  m.def("quantize_act(Tensor x) -> (Tensor, Tensor)");
  m.def("ternary_mm(Tensor xq, Tensor packed, int in_features, int out_features) -> Tensor");
  m.def(
      "bitlinear(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int in_features, int out_features, "
      "Tensor? norm_weight=None, float norm_eps=1e-06) -> Tensor");
  m.def(
      "bitlinear_shared(Tensor x, Tensor[] packed, Tensor[] scales, int in_features, int[] out_features, "
      "Tensor? norm_weight=None, float norm_eps=1e-06) -> Tensor[]");
  m.def(
      "bitlinear_relu2_glu(Tensor x, Tensor gate, Tensor gate_scale, Tensor up, Tensor up_scale, int in_features, "
      "int out_features, Tensor? norm_weight=None, float norm_eps=1e-06) -> Tensor");
  m.def("stream_max(Tensor buf) -> Tensor");
  m.def(
      "int8_linear(Tensor x, Tensor weight, Tensor scale, int in_features, int out_features, Tensor? bias=None) "
      "-> Tensor");
  m.def("int8_embedding(Tensor ids, Tensor weight, Tensor scale, int embedding_dim, ScalarType dtype) -> Tensor");
  m.def(
      "int4_linear(Tensor x, Tensor weight, Tensor scale, int in_features, int out_features, Tensor? bias=None) "
      "-> Tensor");
  m.def("int4_embedding(Tensor ids, Tensor weight, Tensor scale, int embedding_dim, ScalarType dtype) -> Tensor");
  m.def(
      "kv_cache_write(Tensor(a!) k_cache, Tensor(b!) k_scale, Tensor(c!) v_cache, Tensor(d!) v_scale, Tensor k, "
      "Tensor v, Tensor positions) -> ()");
  m.def(
      "int8_attention(Tensor q, Tensor k_cache, Tensor k_scale, Tensor v_cache, Tensor v_scale, Tensor positions, "
      "float scale, Tensor? mask=None) -> Tensor");
  m.def(
      "decoder_layer(Tensor x, Tensor[] packed, Tensor[] scales, Tensor[] norms, float[] eps, Tensor cos, "
      "Tensor sin, Tensor(a!) k_cache, Tensor(b!) k_scale, Tensor(c!) v_cache, Tensor(d!) v_scale, "
      "Tensor positions, float scaling, int num_heads, int intermediate_size, Tensor? mask=None) -> Tensor");
  // Kernel-path control (no tensors, so they are not traced by torch.compile).
  m.def("supported_isas() -> str[]", &tbn::supported_isas_op);
  m.def("get_isa() -> str", &tbn::get_isa_op);
  m.def("set_isa(str isa) -> ()", &tbn::set_isa_op);
}

TORCH_LIBRARY_IMPL(bitnet, CPU, m) {
  m.impl("quantize_act", &tbn::quantize_act_cpu);
  m.impl("ternary_mm", &tbn::ternary_mm_cpu);
  m.impl("bitlinear", &tbn::bitlinear_cpu);
  m.impl("bitlinear_shared", &tbn::bitlinear_shared_cpu);
  m.impl("bitlinear_relu2_glu", &tbn::bitlinear_relu2_glu_cpu);
  m.impl("stream_max", &tbn::stream_max_cpu);
  m.impl("int8_linear", &tbn::int8_linear_cpu);
  m.impl("int8_embedding", &tbn::int8_embedding_cpu);
  m.impl("int4_linear", &tbn::int4_linear_cpu);
  m.impl("int4_embedding", &tbn::int4_embedding_cpu);
  m.impl("kv_cache_write", &tbn::kv_cache_write_cpu);
  m.impl("int8_attention", &tbn::int8_attention_cpu);
  m.impl("decoder_layer", &tbn::decoder_layer_cpu);
}

// The library is imported as the Python module torch_bitnet._C; importing it runs the
// registrations above. It defines no Python functions of its own.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
