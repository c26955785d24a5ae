// AVX512 helpers shared by chatpager's CPU kernels (included by each .cpp; the build key hashes it).
#pragma once
#include <immintrin.h>
#include <stdlib.h>
#include <strings.h>

namespace {

// e^x to ~2e-7 relative: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^6.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: n * hi is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// Whether OpenMP's idle threads spin between parallel regions (OMP_WAIT_POLICY=ACTIVE, as libgomp
// read it when torch loaded it): then a region starts within a microsecond. Asleep (PASSIVE, or the
// default once its spin runs out) a woken thread starts ~10-20 us late, so only long calls split.
inline bool omp_threads_spin() {
  const char* policy = getenv("OMP_WAIT_POLICY");
  return policy && strcasecmp(policy, "active") == 0;
}

}  // namespace
