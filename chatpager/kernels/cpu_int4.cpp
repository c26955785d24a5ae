// y[M, N] = f(x)[M, K] @ W^T for grouped affine int4 weights (w = d * q + m, q in 0..15, groups
// of 32 along K), with the activations quantized to int8 per group of 32 on the way in, and the
// int4 x int8 dot products done by AVX512-VNNI (vpdpbusd: unsigned bytes x signed bytes). f, the
// prologue, is the identity, the model's RMSNorm or SwiGLU's silu(gate) * up, computed as the
// row is quantized so that it is never written out.
//
// Activations as two int8 digits per group: s = max|x| / 127, a coarse digit qc = round(x / s)
// and a fine one qf = round((x - s * qc) / (s / 254)), so x ~= (s / 254) * (254 qc + qf) to
// ~15 bits of the group's range (one digit alone, as llama.cpp's Q8_1 does, cost the default
// model 7 points of teacher-forced agreement: 93.1 % against 99.96 %). Per output n, activation
// row r and group g:
//   sum_k w[n,k] x[r,k] ~= d[n,g] * (s / 254) * sum_k q[n,k] (254 qc + qf)[r,k] + m[n,g] * sum_k x[r,k]
// The minimum's term uses the exact float sum of x: only the digits' rounding is approximate.
//
// Weight layout (made once at load by cpu_int4_pack below, streamed linearly by the kernel): output rows in tiles
// of TILE_N = 16, each tile all its groups in order, TILE_BYTES per (tile, group):
//   4 x 64 bytes of codes: byte [j][row * 4 + b] = q[row][4j + b] | q[row][16 + 4j + b] << 4
//   16 x fp16 d, then 16 x fp16 m
// so one 64-byte load, split into low and high nibbles, gives two vpdpbusd operands whose 16
// 32-bit lanes are the 16 output rows, each holding 4 consecutive k: a broadcast of 4 int8
// activations multiplies all 16 rows at once and no horizontal sums are needed.
//
// Each weight tile is unpacked once per group for up to MAX_ROWS activation rows held in
// registers; more rows re-read the tile from cache, not memory. Threads take tiles in chunks.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "cpu_simd.h"

namespace {

constexpr int GROUP = 32;
constexpr int TILE_N = 16;
constexpr int CODE_BYTES = TILE_N * GROUP / 2;           // 256
constexpr int TILE_BYTES = CODE_BYTES + 2 * TILE_N * 2;  // + fp16 d and m: 320
constexpr int MAX_ROWS = 8;                              // activation rows per register block
constexpr int64_t ROW_BLOCK = 256;                       // activation rows kept hot in L2 per sweep
constexpr int FINE = 254;                                // second activation digit: steps of step / FINE

// The activations of one call, quantized: per row and group 32 coarse then 32 fine int8 digits
// [M, 2 K], the fine digit's scale and the exact sum per group [M, K / 32].
struct Quantized {
  std::vector<int8_t> q;
  std::vector<float> d, s;
};
thread_local Quantized scratch;  // per calling thread: ctypes releases the GIL

// Work below which one thread is faster than two. It depends on how OpenMP's idle threads wait:
// spinning (OMP_WAIT_POLICY=ACTIVE) they start within a microsecond, and two threads win from
// ~8 us of work (a 576 x 576 matmul at one row); asleep (PASSIVE, or the default) waking one
// costs ~10-20 us and two threads lost on every layer matmul of the default model at one row
// (measured 2026-11-23: gate_up 44 -> 59 us), so only calls of ~150 us or more are split.
int64_t min_parallel_macs() {
  return omp_threads_spin() ? int64_t(1) << 18 : int64_t(1) << 23;
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}

// silu(gate) * up, the SwiGLU MLP's activation
inline __m512 swiglu_ps(__m512 gate, __m512 up) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_mul_ps(_mm512_div_ps(gate, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate)))), up);
}

// What the kernel multiplies, computed from the row it is given as it is quantized, so that it is
// never written out: the row itself, the model's rms_norm of it (x * rsqrt(mean(x^2) + eps) *
// norm), or silu(gate) * up of a row [gate (k), up (k)] (the gate_up projection's output).
enum Prologue : int { PLAIN = 0, RMS_NORM = 1, SWIGLU = 2 };

void quantize_row(const float* x, int64_t k, Prologue prologue, const float* norm, float eps, int8_t* q, float* d,
                  float* s) {
  __m512 r = _mm512_set1_ps(1.f);
  if (prologue == RMS_NORM) {
    __m512 sq = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) sq = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), sq);
    r = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(sq) / (float)k + eps));
  }
  for (int64_t g = 0; g < k / GROUP; ++g, q += 2 * GROUP) {
    const float* xg = x + g * GROUP;
    __m512 a = _mm512_loadu_ps(xg), b = _mm512_loadu_ps(xg + 16);
    if (prologue == RMS_NORM) {
      a = _mm512_mul_ps(_mm512_mul_ps(a, r), _mm512_loadu_ps(norm + g * GROUP));
      b = _mm512_mul_ps(_mm512_mul_ps(b, r), _mm512_loadu_ps(norm + g * GROUP + 16));
    } else if (prologue == SWIGLU) {
      a = swiglu_ps(a, _mm512_loadu_ps(xg + k));
      b = swiglu_ps(b, _mm512_loadu_ps(xg + k + 16));
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float step = amax / 127.f, fine = step / FINE;
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512 inv_fine = _mm512_set1_ps(amax > 0.f ? FINE / step : 0.f);
    __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    // the second digit: what the first left over, |x - step * q| <= step / 2, in steps of step / FINE
    __m512 ra = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qa), _mm512_set1_ps(step), a);
    __m512 rb = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qb), _mm512_set1_ps(step), b);
    _mm_storeu_si128((__m128i*)q, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtsepi32_epi8(qb));
    _mm_storeu_si128((__m128i*)(q + 32), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(ra, inv_fine))));
    _mm_storeu_si128((__m128i*)(q + 48), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(rb, inv_fine))));
    d[g] = fine;
    s[g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  }
}

// R activation rows x one tile of 16 output columns, over all K.
template <int R>
void tile_rows(const uint8_t* tile, int64_t groups, const int8_t* q, const float* d, const float* s,
               const float* bias, float* y, int64_t ldy, __mmask16 mask) {
  const int64_t k = groups * GROUP;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, tile += TILE_BYTES) {
    __m512i w[8];  // w[c]: k = 4c..4c+3 of this group for the 16 rows
    for (int j = 0; j < 4; ++j) {
      __m512i v = _mm512_loadu_si512(tile + 64 * j);
      w[j] = _mm512_and_si512(v, low);
      w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(tile + CODE_BYTES)));
    __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(tile + CODE_BYTES + 2 * TILE_N)));
    for (int r = 0; r < R; ++r) {
      const int8_t* xr = q + 2 * (r * k + g * GROUP);
      // one chain per digit, so consecutive vpdpbusd do not wait on each other
      __m512i coarse = _mm512_setzero_si512(), fine = _mm512_setzero_si512();
      for (int c = 0; c < 8; ++c) {
        coarse = _mm512_dpbusd_epi32(coarse, w[c], _mm512_set1_epi32(load4(xr + 4 * c)));
        fine = _mm512_dpbusd_epi32(fine, w[c], _mm512_set1_epi32(load4(xr + GROUP + 4 * c)));
      }
      // |coarse| <= 32 * 15 * 127, so coarse * FINE + fine is exact in int32 and in float32
      __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_mullo_epi32(coarse, _mm512_set1_epi32(FINE)), fine));
      acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, _mm512_set1_ps(d[r * groups + g])), acc[r]);
      acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(s[r * groups + g]), acc[r]);
    }
  }
  __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy, mask, _mm512_add_ps(acc[r], b));
}

using TileFn = void (*)(const uint8_t*, int64_t, const int8_t*, const float*, const float*, const float*,
                        float*, int64_t, __mmask16);
constexpr TileFn TILE_FOR_ROWS[MAX_ROWS + 1] = {nullptr,         tile_rows<1>, tile_rows<2>, tile_rows<3>,
                                                tile_rows<4>,    tile_rows<5>, tile_rows<6>, tile_rows<7>,
                                                tile_rows<8>};

}  // namespace

extern "C" {

// One packed weight, described once at load so that a call passes a single pointer for it.
struct Int4Weight {
  const uint8_t* packed;
  int64_t n, k;
  const float* bias;  // [n] or null
};

// Bytes of the packed layout for an [n, k] weight (n padded up to a whole tile).
int64_t cpu_int4_packed_bytes(int64_t n, int64_t k) {
  return (n + TILE_N - 1) / TILE_N * (k / GROUP) * TILE_BYTES;
}

// The layout above from codes [n, k] (uint8, 0..15) and d, m [n, k / 32] (float16 bits); `out`
// holds cpu_int4_packed_bytes(n, k) zeroed bytes (the rows that pad the last tile stay zero).
void cpu_int4_pack(const uint8_t* codes, const uint16_t* d, const uint16_t* m, int64_t n, int64_t k, uint8_t* out) {
  const int64_t groups = k / GROUP, tiles = (n + TILE_N - 1) / TILE_N;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* o = out + (t * groups + g) * TILE_BYTES;
      uint16_t* od = (uint16_t*)(o + CODE_BYTES);
      for (int row = 0; row < TILE_N && t * TILE_N + row < n; ++row) {
        const int64_t nr = t * TILE_N + row;
        const uint8_t* c = codes + nr * k + g * GROUP;
        for (int j = 0; j < 4; ++j)
          for (int b = 0; b < 4; ++b) o[64 * j + 4 * row + b] = (c[4 * j + b] & 15) | (c[16 + 4 * j + b] << 4);
        od[row] = d[nr * groups + g];
        od[TILE_N + row] = m[nr * groups + g];
      }
    }
  }
}

// y = f(x) @ W^T, f the prologue (see quantize_row); x [m, k] float32 contiguous ([m, 2 k] for
// SWIGLU), norm [k] for RMS_NORM, y [m, n] float32 contiguous; k a multiple of 32 (the caller
// checks). Runs omp_get_max_threads() threads: what torch's own ops use on the calling thread.
void cpu_int4_mm(const float* x, int64_t m, const Int4Weight* w, float* y, int prologue, const float* norm,
                 float eps) {
  const uint8_t* packed = w->packed;
  const int64_t n = w->n, k = w->k;
  const float* bias = w->bias;
  const int threads = omp_get_max_threads();
  const int64_t groups = k / GROUP, tiles = (n + TILE_N - 1) / TILE_N;
  const int64_t row_blocks = (m + ROW_BLOCK - 1) / ROW_BLOCK, stride = prologue == SWIGLU ? 2 * k : k;
  Quantized& qa = scratch;
  if ((int64_t)qa.q.size() < 2 * m * k) qa.q.resize(2 * m * k);
  if ((int64_t)qa.d.size() < m * groups) qa.d.resize(m * groups), qa.s.resize(m * groups);
  int8_t* q = qa.q.data();
  float *d = qa.d.data(), *s = qa.s.data();
  static const int64_t min_parallel = min_parallel_macs();
  const bool parallel = threads > 1 && m * n * k >= min_parallel;
  // dynamic, in ~8 chunks a thread: a thread that starts late (woken from sleep, or sharing its
  // core) takes fewer chunks instead of holding the others at the end; each tile is still
  // computed whole by one thread, so the result does not depend on who took it
  const int64_t chunk = std::max<int64_t>(1, row_blocks * tiles / (8 * threads));
#pragma omp parallel num_threads(threads) if (parallel)
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m; ++r)
      quantize_row(x + r * stride, k, (Prologue)prologue, norm, eps, q + 2 * r * k, d + r * groups, s + r * groups);
    // blocks of activation rows outermost: a thread's tiles sweep one block while it sits in L2
#pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t item = 0; item < row_blocks * tiles; ++item) {
      const int64_t t = item % tiles, r0 = item / tiles * ROW_BLOCK, r1 = std::min(m, r0 + ROW_BLOCK);
      const int64_t n0 = t * TILE_N;
      const __mmask16 mask = n - n0 >= TILE_N ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - n0)) - 1);
      const uint8_t* tile = packed + t * groups * TILE_BYTES;
      for (int64_t r = r0; r < r1; r += MAX_ROWS) {
        const int rows = (int)std::min<int64_t>(MAX_ROWS, r1 - r);
        TILE_FOR_ROWS[rows](tile, groups, q + 2 * r * k, d + r * groups, s + r * groups, bias ? bias + n0 : nullptr,
                            y + r * n + n0, n, mask);
      }
    }
  }
}

}  // extern "C"
