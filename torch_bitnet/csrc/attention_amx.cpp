// AMX attention over an int8 KV cache for many query rows (prefill): the int16 products of
// attention_avx512.cpp (read its header) on int8 tiles, with the same integers.
//
// A 16-bit query q16 = 256 hi + lo splits into a signed byte hi and an unsigned byte lo, so
//   q16 . k = 256 (hi . k) + (lo . k),
// two tile products over the int8 keys; likewise each block's int16 softmax weights w16
// (0 .. 32767) against the int8 values. Both are exact int32 sums, the ones block_group16 forms
// with VPDPWSSD, at 16K multiply-adds per instruction instead of 32.
//
// Everything is computed transposed, one row tile (16 query rows) per vector: the products
// give key-major scores S^T (a vector = one key for 16 rows), so the online softmax's maxima
// and sums are element-wise across keys, and the row state (m, l, a (d, 16) accumulator) is
// vectors; no horizontal reductions or per-row scalar steps (which made a row-major version
// latency-bound: 55% of its time in the softmax). Per row tile and block of 64 positions:
//   1. scores S^T = K Q^T: A = 16 keys x 64 dims straight from the cache (signed), B = the row
//      tile's queries transposed once per task (row i: dims 4i .. 4i + 3 of each of the 16
//      rows; hi bytes signed, lo bytes unsigned);
//   2. softmax across the 64 key vectors; the weights to int16, their bytes in B layout (row
//      i: keys 4i .. 4i + 3 of each of the 16 rows);
//   3. values O^T = V^T W^T: A = 16 dims x 64 keys of the values transposed (once per kv head
//      and thread, KvTiles), B = the weights' bytes; the int32 sums rescaled into the state.
// Tiles, in both products: A tmm4-5 (two key tiles, or two dim tiles), B tmm6 (hi bytes) and
// tmm7 (lo bytes), C tmm0-3 (A4 x B6, A4 x B7, A5 x B6, A5 x B7); always 16 x 64 bytes.
//
// Bounds: head_dim <= 256, so 256 |hi . k| <= 256 * 128 * 128 * 256 = 2^30 and the whole sum
// stays within int32; the values' sums are at most 32767 * 128 * 64 < 2^28.
#if defined(__x86_64__) || defined(_M_X64)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "amx_common.h"
#include "attention_avx512.h"
#include "kernels.h"

namespace tbn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Tasks of fewer rows go to attention_partial_avx512, whose groups of 4 rows win at 4 (a decode
// step of 4 query heads per kv head: 0.78-0.92x on AMX) and lose from 5 (1.13-1.14x on AMX,
// 1.3-1.5x at 8; BENCHMARKS.md, "AMX attention, ...").
constexpr int64_t kAmxMinRows = 5;
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kBlock = kAttentionBlock;  // 64 positions: one tile row of bytes

// Dword lanes of 4 vectors transposed by 128-bit lane: out[i] lane j = in[j] lane i.
TB_AVX512_INLINE void transpose_lanes(__m512i* v) {
  const __m512i e0 = _mm512_shuffle_i32x4(v[0], v[1], 0x44), e1 = _mm512_shuffle_i32x4(v[0], v[1], 0xEE);
  const __m512i e2 = _mm512_shuffle_i32x4(v[2], v[3], 0x44), e3 = _mm512_shuffle_i32x4(v[2], v[3], 0xEE);
  v[0] = _mm512_shuffle_i32x4(e0, e2, 0x88);
  v[1] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
  v[2] = _mm512_shuffle_i32x4(e1, e3, 0x88);
  v[3] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
}

// 64 bytes of row j of a (rows, stride) matrix, zeros for rows at or past `rows`.
TB_AVX512_INLINE __m512i load_row64(const void* base, int64_t j, int64_t rows, int64_t stride) {
  return j < rows ? _mm512_loadu_si512(static_cast<const int8_t*>(base) + j * stride) : _mm512_setzero_si512();
}

// The values of positions [c0, c0 + 64) (zeros from c1 on) transposed, as A tiles: tile f
// (dims 16 f .. 16 f + 15), 1 KiB at vt + f * 1024, row n = dim 16 f + n of the 64 positions.
// Interleaving 4 positions per dword (byte unpacks), then a dword transpose per tile.
TB_AVX512 void transpose_values(const int8_t* v, int64_t d, int64_t c0, int64_t c1, uint8_t* vt) {
  for (int64_t h = 0; h < d / 64; ++h) {
    __m512i quads[4][16];  // [L][i]: dims 64 h + 16 L + n (dword n) of positions c0 + 4 i .. + 3
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t j = c0 + 4 * i;
      const __m512i a = load_row64(v + 64 * h, j, c1, d), b = load_row64(v + 64 * h, j + 1, c1, d);
      const __m512i c = load_row64(v + 64 * h, j + 2, c1, d), e = load_row64(v + 64 * h, j + 3, c1, d);
      const __m512i ab_lo = _mm512_unpacklo_epi8(a, b), ab_hi = _mm512_unpackhi_epi8(a, b);
      const __m512i ce_lo = _mm512_unpacklo_epi8(c, e), ce_hi = _mm512_unpackhi_epi8(c, e);
      // x[m] lane L: dims 16 L + 4 m .. + 3, 4 positions each; lane L of x[0..3] is dims 16 L ..
      __m512i x[4] = {_mm512_unpacklo_epi16(ab_lo, ce_lo), _mm512_unpackhi_epi16(ab_lo, ce_lo),
                      _mm512_unpacklo_epi16(ab_hi, ce_hi), _mm512_unpackhi_epi16(ab_hi, ce_hi)};
      transpose_lanes(x);
      for (int L = 0; L < 4; ++L) quads[L][i] = x[L];
    }
    for (int L = 0; L < 4; ++L) {
      transpose16(quads[L]);
      for (int n = 0; n < 16; ++n) _mm512_store_si512(vt + (4 * h + L) * 1024 + 64 * n, quads[L][n]);
    }
  }
}

// One kv head's values of positions [j0, done) as A tiles, block b (positions j0 + 64 b ..) at
// tiles + 64 d b. A thread keeps them from task to task of one call (p.call): the tasks of a kv
// head run in the order of their rows, whose reach grows (causal prefill) or starts over (the
// next query head), so a thread transposes each kv head's values once per call, not per task.
struct KvTiles {
  uint64_t call = 0;
  const int8_t* v = nullptr;
  int64_t j0 = 0, done = 0;
  uint8_t* tiles = nullptr;
  AlignedBuffer buffer;

  // Makes positions [first, c1) ready; j1 (>= c1) ends the task's range.
  TB_AVX512 void prepare(const AttentionProblem& p, int64_t first, int64_t j1, int64_t c1) {
    if (call != p.call || v != p.v || j0 != first) {
      call = p.call;
      v = p.v;
      j0 = done = first;
      tiles = static_cast<uint8_t*>(buffer.get(size_t((j1 - first + kBlock - 1) / kBlock * kBlock * p.d)));
    }
    // from the block holding `done`, whose positions from there on were zeros
    for (int64_t b = (done - j0) / kBlock; done < c1 && j0 + b * kBlock < c1; ++b)
      transpose_values(p.v, p.d, j0 + b * kBlock, c1, tiles + b * kBlock * p.d);
    done = std::max(done, c1);
  }
};

// The state and inputs of one row tile.
struct RowTile {
  // B tiles of the queries: step s (dims 64 s ..) at 1024 s, hi bytes then (at 1024 d / 64) lo.
  alignas(64) uint8_t q[2 * kMaxHeadDim / 64 * 1024];
  alignas(64) float q_scale[16];
  alignas(64) float m[16], l[16];
  alignas(64) float acc[kMaxHeadDim * 16];  // transposed: dim n of row r at 16 n + r
};

// Rows [g0, g0 + rt) of the task's queries (q16 per row, split in bytes) into rt's B tiles.
// Returns false if a row holds a NaN or an infinity.
TB_AVX512 bool load_queries(const AttentionProblem& p, int64_t g0, int rt, RowTile& t) {
  const int64_t d = p.d, steps = d / 64;
  alignas(64) int8_t hi[16 * kMaxHeadDim];
  alignas(64) uint8_t lo[16 * kMaxHeadDim];
  alignas(64) int16_t q16[kMaxHeadDim];
  for (int r = 0; r < rt; ++r) {
    t.q_scale[r] = to_int16(p.q + (g0 + r) * d, d, q16);
    if (std::isnan(t.q_scale[r])) return false;
    for (int64_t k = 0; k < d; k += 32) {
      const __m512i x = _mm512_load_si512(q16 + k);
      _mm256_store_si256(reinterpret_cast<__m256i*>(hi + r * d + k), _mm512_cvtepi16_epi8(_mm512_srai_epi16(x, 8)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(lo + r * d + k), _mm512_cvtepi16_epi8(x));
    }
  }
  for (int r = rt; r < 16; ++r) t.q_scale[r] = 0.f;
  for (int64_t s = 0; s < steps; ++s) {
    __m512i x[16], y[16];
    for (int r = 0; r < 16; ++r) {
      x[r] = load_row64(hi + 64 * s, r, rt, d);
      y[r] = load_row64(lo + 64 * s, r, rt, d);
    }
    transpose16(x);
    transpose16(y);
    for (int i = 0; i < 16; ++i) {
      _mm512_store_si512(t.q + 1024 * s + 64 * i, x[i]);
      _mm512_store_si512(t.q + 1024 * (steps + s) + 64 * i, y[i]);
    }
  }
  return true;
}

// Row tile t over the block of positions [c0, c0 + 64). vis[r]: bit j set if row r sees position
// c0 + j; nk (1 .. 64): the furthest any row sees; keys: the block's first key row (64 rows
// readable); vt: the block's value tiles.
TB_AVX512 void tile_block(const AttentionProblem& p, RowTile& t, int64_t c0, int64_t nk, const uint64_t* vis,
                          const int8_t* keys, const uint8_t* vt) {
  const int64_t d = p.d, steps = d / 64;
  // 1. scores of the key tiles up to nk, two at a time: hi[j] / lo[j] = row lanes of key j
  alignas(64) int32_t hi[kBlock * 16], lo[kBlock * 16];
  const int64_t pairs = (nk + 31) / 32;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    TB_TILE_ZERO(0);
    TB_TILE_ZERO(1);
    TB_TILE_ZERO(2);
    TB_TILE_ZERO(3);
    for (int64_t s = 0; s < steps; ++s) {
      TB_TILE_LOAD(4, keys + 32 * kp * d + 64 * s, d);
      TB_TILE_LOAD(5, keys + (32 * kp + 16) * d + 64 * s, d);
      TB_TILE_LOAD(6, t.q + 1024 * s, 64);
      TB_TILE_LOAD(7, t.q + 1024 * (steps + s), 64);
      TB_TILE_DPBSSD(0, 4, 6);
      TB_TILE_DPBSUD(1, 4, 7);
      TB_TILE_DPBSSD(2, 5, 6);
      TB_TILE_DPBSUD(3, 5, 7);
    }
    TB_TILE_STORE(0, hi + 512 * kp, 64);
    TB_TILE_STORE(1, lo + 512 * kp, 64);
    TB_TILE_STORE(2, hi + 512 * kp + 256, 64);
    TB_TILE_STORE(3, lo + 512 * kp + 256, 64);
  }
  // 2. scores (-inf where hidden), their maximum per row, then the weights
  const __m512i vis_lo = _mm512_loadu_si512(vis), vis_hi = _mm512_loadu_si512(vis + 8);
  const __m512 qs = _mm512_load_ps(t.q_scale), hidden = _mm512_set1_ps(kNegInf);
  alignas(64) float w[kBlock * 16];
  __m512 vmax = hidden;
  for (int64_t j = 0; j < nk; ++j) {
    const __m512i bit = _mm512_set1_epi64(int64_t(uint64_t(1) << j));
    const __mmask16 live = __mmask16(_mm512_test_epi64_mask(vis_lo, bit) | (_mm512_test_epi64_mask(vis_hi, bit) << 8));
    const __m512i dot =
        _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(hi + 16 * j), 8), _mm512_load_si512(lo + 16 * j));
    const __m512 sc = _mm512_mask_mul_ps(hidden, live, _mm512_mul_ps(_mm512_cvtepi32_ps(dot), qs),
                                         _mm512_set1_ps(p.k_scale[c0 + j] * p.scale));
    _mm512_store_ps(w + 16 * j, sc);
    vmax = _mm512_max_ps(vmax, sc);
  }
  const __m512 m_old = _mm512_load_ps(t.m), m_new = _mm512_max_ps(m_old, vmax);
  _mm512_store_ps(t.m, m_new);
  // A row that has seen nothing yet keeps m = -inf: its weights e^(-inf - 0) = 0.
  const __m512 shift = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m_new, hidden, _CMP_NEQ_OQ), m_new);
  const __m512 alpha = exp_avx512(_mm512_sub_ps(m_old, shift));  // 0 for a row that saw nothing before
  __m512 vsum = _mm512_setzero_ps(), wmax = _mm512_setzero_ps();
  for (int64_t j = 0; j < nk; ++j) {
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_load_ps(w + 16 * j), shift));
    vsum = _mm512_add_ps(vsum, e);
    const __m512 wj = _mm512_mul_ps(e, _mm512_set1_ps(p.v_scale[c0 + j]));
    wmax = _mm512_max_ps(wmax, wj);
    _mm512_store_ps(w + 16 * j, wj);
  }
  _mm512_store_ps(t.l, _mm512_add_ps(_mm512_mul_ps(_mm512_load_ps(t.l), alpha), vsum));
  const __m512 w_scale = _mm512_div_ps(wmax, _mm512_set1_ps(32767.f));
  const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(w_scale, _mm512_setzero_ps(), _CMP_GT_OQ),
                                         _mm512_set1_ps(1.f), w_scale);
  // The weights to int16 (keys past nk: 0), bytes of 4 keys per row lane: B tiles, hi then lo.
  alignas(64) uint32_t wt[2 * 16 * 16];
  const __m512i byte = _mm512_set1_epi32(0xFF);
  for (int64_t i = 0; i < 16; ++i) {
    __m512i h = _mm512_setzero_si512(), o = _mm512_setzero_si512();
    for (int k = 0; k < 4 && 4 * i + k < nk; ++k) {
      const __m512i q = _mm512_cvt_roundps_epi32(
          _mm512_min_ps(_mm512_mul_ps(_mm512_load_ps(w + 16 * (4 * i + k)), inv), _mm512_set1_ps(32767.f)),
          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      h = _mm512_or_si512(h, _mm512_slli_epi32(_mm512_srli_epi32(q, 8), 8 * k));
      o = _mm512_or_si512(o, _mm512_slli_epi32(_mm512_and_si512(q, byte), 8 * k));
    }
    _mm512_store_si512(wt + 16 * i, h);
    _mm512_store_si512(wt + 256 + 16 * i, o);
  }
  // 3. values, two tiles of 16 dims at a time: acc = acc * alpha + (256 hi + lo) * w_scale
  TB_TILE_LOAD(6, wt, 64);
  TB_TILE_LOAD(7, wt + 256, 64);
  alignas(64) int32_t o[4][16 * 16];
  for (int64_t f = 0; f < d / 16; f += 2) {
    TB_TILE_ZERO(0);
    TB_TILE_ZERO(1);
    TB_TILE_ZERO(2);
    TB_TILE_ZERO(3);
    TB_TILE_LOAD(4, vt + f * 1024, 64);
    TB_TILE_LOAD(5, vt + (f + 1) * 1024, 64);
    TB_TILE_DPBSUD(0, 4, 6);
    TB_TILE_DPBSUD(1, 4, 7);
    TB_TILE_DPBSUD(2, 5, 6);
    TB_TILE_DPBSUD(3, 5, 7);
    TB_TILE_STORE(0, o[0], 64);
    TB_TILE_STORE(1, o[1], 64);
    TB_TILE_STORE(2, o[2], 64);
    TB_TILE_STORE(3, o[3], 64);
    for (int h = 0; h < 2; ++h)
      for (int n = 0; n < 16; ++n) {
        const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(o[2 * h] + 16 * n), 8),
                                             _mm512_load_si512(o[2 * h + 1] + 16 * n));
        float* a = t.acc + 16 * (16 * (f + h) + n);
        const __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), w_scale);
        _mm512_store_ps(a, _mm512_add_ps(_mm512_mul_ps(_mm512_load_ps(a), alpha), y));
      }
  }
}

}  // namespace

TB_AVX512 void attention_partial_amx(const AttentionProblem& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1,
                                     float* m, float* l, float* acc) {
  const int64_t d = p.d, rows = r1 - r0;
  if (!p.int16_products || d % 64 != 0 || d > kMaxHeadDim || rows < kAmxMinRows) {
    attention_partial_avx512(p, r0, r1, j0, j1, m, l, acc);
    return;
  }
  // Positions [j0, c1) are seen by some row of the task (causal: up to its last query).
  int64_t c1 = j0;
  for (int64_t r = r0; r < r1; ++r) c1 = std::max(c1, std::min(j1, p.end[r % p.nq]));
  thread_local KvTiles kv;
  kv.prepare(p, j0, j1, c1);
  // A last block reaching past j1 (maybe past the cache) takes its keys from a zero-padded copy,
  // made once for all row tiles.
  const int64_t last = j0 + (c1 - j0 - 1) / kBlock * kBlock;  // the last block's first position
  alignas(64) int8_t tail[kBlock * kMaxHeadDim];
  if (last + kBlock > j1) {
    std::memset(tail, 0, size_t(kBlock * d));
    std::memcpy(tail, p.k + last * d, size_t((j1 - last) * d));
  }
  RowTile t;
  bool configured = false;
  for (int64_t g0 = r0; g0 < r1; g0 += 16) {
    const int rt = int(std::min<int64_t>(16, r1 - g0));
    if (!load_queries(p, g0, rt, t)) {  // NaN or infinity: the float path carries them
      if (configured) release_tiles();
      attention_partial_avx512(p, r0, r1, j0, j1, m, l, acc);
      return;
    }
    std::fill(t.m, t.m + 16, kNegInf);
    std::fill(t.l, t.l + 16, 0.f);
    std::fill(t.acc, t.acc + 16 * d, 0.f);
    for (int64_t c0 = j0; c0 < c1; c0 += kBlock) {
      alignas(64) uint64_t vis[16] = {};
      int64_t nk = 0;
      for (int r = 0; r < rt; ++r) {
        const int64_t q = (g0 + r) % p.nq;
        const int64_t seen = std::clamp<int64_t>(std::min(c1, p.end[q]) - c0, 0, kBlock);
        vis[r] = seen == kBlock ? ~uint64_t(0) : (uint64_t(1) << seen) - 1u;
        if (p.mask && vis[r]) {
          const __m512i bytes = _mm512_maskz_loadu_epi8(vis[r], p.mask + q * p.ld_mask + c0);
          vis[r] &= _mm512_test_epi8_mask(bytes, bytes);
        }
        if (vis[r]) nk = std::max<int64_t>(nk, 64 - __builtin_clzll(vis[r]));
      }
      if (nk == 0) continue;  // no row of the tile sees the block
      const int8_t* keys = c0 + kBlock > j1 ? tail : p.k + c0 * d;
      if (!configured) {
        configure_tiles({16, 16, 16, 16, 16, 16, 16, 16});
        configured = true;
      }
      tile_block(p, t, c0, nk, vis, keys, kv.tiles + (c0 - j0) * d);
    }
    // the state back to rows: m, l and the transposed accumulators
    for (int r = 0; r < rt; ++r) {
      m[g0 - r0 + r] = t.m[r];
      l[g0 - r0 + r] = t.l[r];
    }
    for (int64_t n = 0; n < d; n += 16) {
      __m512i x[16];
      for (int i = 0; i < 16; ++i) x[i] = _mm512_load_si512(t.acc + 16 * (n + i));
      transpose16(x);
      for (int r = 0; r < rt; ++r) _mm512_storeu_si512(acc + (g0 - r0 + r) * d + n, x[r]);
    }
  }
  if (configured) release_tiles();
}

}  // namespace tbn

#endif  // x86-64
