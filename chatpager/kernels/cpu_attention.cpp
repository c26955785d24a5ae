// Decode attention over a paged KV cache, read in place through the block table: each row has one
// query (all its heads) and attends to keys first..len-1 of its sequence, in float32 with an
// online softmax. Cache [num_blocks, block_size, num_kv_heads, head_dim], float32, bfloat16 or
// float16; table entries before the block of `first` (a sliding window's start) are never read.
//
// Work item: one (row, kv head). Its group of G query heads (GQA) shares one pass over the
// kv head's keys, in tiles of up to TILE keys that do not cross a block:
//   load the group's queries -> per tile: scores of all G heads (each key read once, a partial dot
//   product per key in one zmm, 16 of them summed across lanes by one shuffle tree) -> running max,
//   rescale, p = exp(s - max) -> out += p v (each value read once for the G heads) -> out / sum.
// Groups of more than MAX_GROUP heads are done MAX_GROUP at a time.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

#include "cpu_simd.h"

namespace {

constexpr int TILE = 16;  // keys scored together: one zmm of scores
constexpr int MAX_GROUP = 8;
constexpr int MAX_HEADS = 8;  // kv heads in one work item
constexpr int MAX_HEAD_DIM = 256;
enum CacheType : int { F32 = 0, BF16 = 1, F16 = 2 };

// 16 (or, masked, fewer) cache elements as float32
inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
template <CacheType C>
inline __m512 load(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  if constexpr (C == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}
template <CacheType C>
inline __m512 load_cache(const void* p, int64_t i, __mmask16 m) {
  if constexpr (C == F32) return load((const float*)p + i, m);
  else return load<C>((const uint16_t*)p + i, m);
}

// r[j] = the sum of a[j]'s 16 lanes: halve the vectors' width while doubling the keys per vector.
inline __m512 sum_lanes16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int j = 0; j < 8; ++j)  // 256-bit halves: key j (low), key j + 8 (high), 8 partial sums each
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[j], a[j + 8], 0x44), _mm512_shuffle_f32x4(a[j], a[j + 8], 0xEE));
  for (int j = 0; j < 4; ++j)  // 128-bit lanes: keys j, j + 8, j + 4, j + 12, 4 partial sums each
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[j], b[j + 4], 0x88), _mm512_shuffle_f32x4(b[j], b[j + 4], 0xDD));
  for (int j = 0; j < 2; ++j)  // per lane: [c[j]'s key, c[j + 2]'s key] x 2 partial sums
    d[j] = _mm512_add_ps(_mm512_unpacklo_ps(c[j], c[j + 2]), _mm512_unpackhi_ps(c[j], c[j + 2]));
  // per lane: the keys of c[0], c[2], c[1], c[3]; lane l holds keys 4 * {0, 2, 1, 3}[l] + {0, 2, 1, 3}
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x44), _mm512_shuffle_ps(d[0], d[1], 0xEE));
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(order, e);
}

struct Item {
  const float* q;      // the first kv head's queries: G x head_dim
  const void* k;       // the cache at the first kv head: key (block b, slot s) at (b * bs + s) * stride
  const void* v;
  int64_t stride;      // elements from one key to the next: num_kv_heads * head_dim
  int64_t q_step;      // floats from one kv head's queries (and outputs) to the next
  int heads;           // consecutive kv heads, done together: each tile's keys are read in one sweep
  const int32_t* table;
  int block_size, first, len;
  float scale;
  float* out;          // like q
  float* lse;          // [heads x q_step / head_dim] or null: log-sum-exp of the scaled scores
};

// Ask for the keys and values of the tile at `pos` while this one is computed.
template <CacheType C>
inline void prefetch_tile(const Item& it, int pos, int d) {
  const int slot = pos % it.block_size, n = std::min({TILE, it.block_size - slot, it.len - pos});
  const int64_t key0 = ((int64_t)it.table[pos / it.block_size] * it.block_size + slot) * it.stride;
  const int64_t elem = C == F32 ? 4 : 2, bytes = it.heads * d * elem;
  for (int j = 0; j < n; ++j)
    for (int64_t b = 0; b < bytes; b += 64) {
      _mm_prefetch((const char*)it.k + (key0 + j * it.stride) * elem + b, _MM_HINT_T0);
      _mm_prefetch((const char*)it.v + (key0 + j * it.stride) * elem + b, _MM_HINT_T0);
    }
}

// D: the head dim when known at compile time (0: `d` at run time, masked tails)
template <int D, int G, CacheType C>
void attend(const Item& it, int d) {
  if constexpr (D) d = D;
  constexpr int MAX_CHUNKS = (D ? D : MAX_HEAD_DIM) / 16;
  const int chunks = (d + 15) / 16;
  const __mmask16 tail = (__mmask16)(d % 16 ? (1u << (d % 16)) - 1 : 0xFFFF);
  auto mask = [&](int c) { return c == chunks - 1 ? tail : (__mmask16)0xFFFF; };
  alignas(64) float acc[MAX_HEADS][G][MAX_CHUNKS * 16];  // per kv head: the online softmax's state
  alignas(64) float p[G][TILE];
  float m[MAX_HEADS][G], l[MAX_HEADS][G];
  for (int h = 0; h < it.heads; ++h)
    for (int g = 0; g < G; ++g) {
      m[h][g] = -INFINITY, l[h][g] = 0.f;
      for (int c = 0; c < chunks; ++c) _mm512_store_ps(acc[h][g] + 16 * c, _mm512_setzero_ps());
    }
  for (int pos = it.first; pos < it.len;) {
    const int slot = pos % it.block_size;
    const int n = std::min({TILE, it.block_size - slot, it.len - pos});
    const int64_t key0 = ((int64_t)it.table[pos / it.block_size] * it.block_size + slot) * it.stride;
    const __mmask16 valid = (__mmask16)((1u << n) - 1);
    if (pos + n < it.len) prefetch_tile<C>(it, pos + n, d);  // the next block may be anywhere in the cache
    for (int h = 0; h < it.heads; ++h) {
      const int64_t kh = key0 + h * d;
      for (int g = 0; g < G; ++g) {
        __m512 part[TILE];
        const float* qg = it.q + h * it.q_step + g * d;
        for (int j = 0; j < TILE; ++j) {  // keys past n repeat the last one (no branch); their scores are masked
          const int64_t key = kh + std::min(j, n - 1) * it.stride;
          part[j] = _mm512_setzero_ps();
          for (int c = 0; c < chunks; ++c)
            part[j] = _mm512_fmadd_ps(load(qg + 16 * c, mask(c)), load_cache<C>(it.k, key + 16 * c, mask(c)), part[j]);
        }
        const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid,
                                            _mm512_mul_ps(sum_lanes16(part), _mm512_set1_ps(it.scale)));
        const float top = std::max(m[h][g], _mm512_reduce_max_ps(s));
        const __m512 e = _mm512_maskz_mov_ps(valid, exp_ps(_mm512_sub_ps(s, _mm512_set1_ps(top))));
        const float alpha = expf(m[h][g] - top);  // 0 on the first tile (m = -inf)
        l[h][g] = l[h][g] * alpha + _mm512_reduce_add_ps(e);
        m[h][g] = top;
        if (alpha != 1.f)
          for (int c = 0; c < chunks; ++c)
            _mm512_store_ps(acc[h][g] + 16 * c,
                            _mm512_mul_ps(_mm512_load_ps(acc[h][g] + 16 * c), _mm512_set1_ps(alpha)));
        _mm512_store_ps(p[g], e);
      }
      for (int c = 0; c < chunks; ++c) {  // a chunk of every head's output stays in registers over the tile
        __m512 o[G];
        for (int g = 0; g < G; ++g) o[g] = _mm512_load_ps(acc[h][g] + 16 * c);
        for (int j = 0; j < n; ++j) {
          const __m512 vj = load_cache<C>(it.v, kh + j * it.stride + 16 * c, mask(c));
          for (int g = 0; g < G; ++g) o[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g][j]), vj, o[g]);
        }
        for (int g = 0; g < G; ++g) _mm512_store_ps(acc[h][g] + 16 * c, o[g]);
      }
    }
    pos += n;
  }
  for (int h = 0; h < it.heads; ++h)
    for (int g = 0; g < G; ++g) {
      const __m512 inv = _mm512_set1_ps(l[h][g] > 0.f ? 1.f / l[h][g] : 0.f);
      float* o = it.out + h * it.q_step + g * d;
      for (int c = 0; c < chunks; ++c)
        _mm512_mask_storeu_ps(o + 16 * c, mask(c), _mm512_mul_ps(_mm512_load_ps(acc[h][g] + 16 * c), inv));
      if (it.lse) it.lse[h * it.q_step / d + g] = m[h][g] + logf(l[h][g]);
    }
}

using AttendFn = void (*)(const Item&, int);

template <int D, CacheType C>
AttendFn pick_group(int g) {
  constexpr AttendFn fns[MAX_GROUP] = {attend<D, 1, C>, attend<D, 2, C>, attend<D, 3, C>, attend<D, 4, C>,
                                       attend<D, 5, C>, attend<D, 6, C>, attend<D, 7, C>, attend<D, 8, C>};
  return fns[g - 1];
}

template <CacheType C>
AttendFn pick(int d, int g) {
  return d == 64 ? pick_group<64, C>(g) : d == 128 ? pick_group<128, C>(g) : pick_group<0, C>(g);
}

// Work (multiply-adds) below which one thread is faster than two: see omp_threads_spin. Asleep,
// from ~100 us of work (~23 multiply-adds a ns): 16 rows x 300 keys of the default model, 5.5 M,
// took 38 ms a step kept on one thread (2^23) and 33 ms split (2^21), PASSIVE, 2 threads.
int64_t min_parallel_macs() { return omp_threads_spin() ? int64_t(1) << 18 : int64_t(1) << 21; }

}  // namespace

extern "C" {

// q [num_tokens, num_heads, head_dim] float32; out likewise (only the rows named are written);
// rows [num_rows, 4] int32: (token in q / out, sequence in block_tables, its length, its first
// visible key); block_tables [num_seqs, table_stride]; lse [num_tokens, num_heads] or null.
// Runs omp_get_max_threads() threads (torch's, on the calling thread) when the work is large.
int cpu_attention_decode(const float* q, float* out, float* lse, int64_t num_heads, int64_t head_dim,
                         const void* k_cache, const void* v_cache, int cache_type, int64_t block_size,
                         int64_t num_kv_heads, const int32_t* block_tables, int64_t table_stride,
                         const int32_t* rows, int64_t num_rows, float scale) {
  if (head_dim > MAX_HEAD_DIM || num_heads % num_kv_heads || cache_type < F32 || cache_type > F16) return 1;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t passes = (group + MAX_GROUP - 1) / MAX_GROUP;  // heads per pass: as even as can be
  const int per_pass = (int)((group + passes - 1) / passes);
  const int elem = cache_type == F32 ? 4 : 2;
  int64_t macs = 0;
  for (int64_t r = 0; r < num_rows; ++r) macs += rows[4 * r + 2] - rows[4 * r + 3];
  macs *= 2 * num_heads * head_dim;
  const int threads = omp_get_max_threads();
  static const int64_t min_parallel = min_parallel_macs();
  const bool parallel = threads > 1 && macs >= min_parallel;
  // a row's kv heads in one item (one sweep through each tile's keys), unless the threads need
  // more items than the rows give, or a group takes several passes
  const int64_t heads = passes > 1 || (parallel && num_rows < 2 * threads) ? 1 : std::min<int64_t>(num_kv_heads, MAX_HEADS);
  const int64_t per_row = (num_kv_heads + heads - 1) / heads * passes, items = num_rows * per_row;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (parallel && items > 1)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t r = i / per_row, h = i % per_row / passes * heads, pass = i % passes;
    const int32_t* row = rows + 4 * r;
    const int64_t h0 = h * group + pass * per_pass;  // first query head of this item
    const int g = (int)std::min<int64_t>(per_pass, (h + 1) * group - h0);
    const int64_t head_offset = h * head_dim * elem;
    Item it{q + (row[0] * num_heads + h0) * head_dim, (const char*)k_cache + head_offset,
            (const char*)v_cache + head_offset, num_kv_heads * head_dim, group * head_dim,
            (int)std::min<int64_t>(heads, num_kv_heads - h), block_tables + row[1] * table_stride,
            (int)block_size, row[3], row[2], scale, out + (row[0] * num_heads + h0) * head_dim,
            lse ? lse + row[0] * num_heads + h0 : nullptr};
    const AttendFn fn = cache_type == F32 ? pick<F32>((int)head_dim, g)
                        : cache_type == BF16 ? pick<BF16>((int)head_dim, g) : pick<F16>((int)head_dim, g);
    fn(it, (int)head_dim);
  }
  return 0;
}

// The step's new K and V into their slots (slot = block * block_size + offset; -1: skip the
// token): k, v [num_tokens, row_bytes] already in the cache's type, caches of num_slots rows.
// One call a layer instead of two index_copy_ and a check for skipped slots. 1: a slot out of range.
int cpu_attention_write_kv(const void* k, const void* v, void* k_cache, void* v_cache, const int64_t* slots,
                           int64_t num_tokens, int64_t row_bytes, int64_t num_slots) {
  for (int64_t t = 0; t < num_tokens; ++t)
    if (slots[t] >= num_slots) return 1;
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (slots[t] < 0) continue;
    memcpy((char*)k_cache + slots[t] * row_bytes, (const char*)k + t * row_bytes, row_bytes);
    memcpy((char*)v_cache + slots[t] * row_bytes, (const char*)v + t * row_bytes, row_bytes);
  }
  return 0;
}

}  // extern "C"
