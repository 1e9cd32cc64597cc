/* Float32 row kernels for the CPU platform's named-op overrides (platforms/kernels.py):
 * RMSNorm, residual add + RMSNorm, neox rotary in place, SiLU-and-mul.
 *
 * Why: the torch references take five to eight passes over each row (pow, mean, rsqrt, mul,
 * mul; chunk, mul, addcmul, copy) and allocate a temporary for most of them. Here each row is
 * read once into cache and written once, and one ctypes call replaces the op chain, which
 * matters as much as the bandwidth for the small decode steps.
 *
 * Semantics follow the references exactly (same formulas, float32 accumulation); only the
 * summation order differs. Rows are split over threads when a call has enough work to pay
 * for the fork (min_parallel elements); strides are in elements and the last dimension is
 * always contiguous.
 */
#include <math.h>
#include <stdint.h>

#define MIN_PARALLEL 32768 /* elements below which one thread is faster than two */

static inline float inv_rms(const float *restrict x, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  return 1.f / sqrtf(ss / (float)n + eps);
}

/* out[r, :] = w * (x[r, :] * inv_rms(x[r, :])), rows r = (i0, i1) of x with strides s0, s1.
 * out is contiguous [n0 * n1, n]. */
void rms_norm_f32(const float *x, int64_t n0, int64_t n1, int64_t s0, int64_t s1,
                  const float *w, float eps, int64_t n, float *out, int num_threads) {
  const int64_t rows = n0 * n1;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * n >= MIN_PARALLEL)
  for (int64_t r = 0; r < rows; ++r) {
    const float *restrict xr = x + (r / n1) * s0 + (r % n1) * s1;
    float *restrict o = out + r * n;
    const float inv = inv_rms(xr, n, eps);
    for (int64_t i = 0; i < n; ++i) o[i] = w[i] * (xr[i] * inv);
  }
}

/* sum = x + res (contiguous [rows, n]); out = rms_norm(sum). x, res rows at strides xs, rs. */
void fused_add_rms_norm_f32(const float *x, int64_t xs, const float *res, int64_t rs,
                            int64_t rows, int64_t n, const float *w, float eps, float *out,
                            float *sum, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * n >= MIN_PARALLEL)
  for (int64_t r = 0; r < rows; ++r) {
    const float *restrict xr = x + r * xs, *restrict rr = res + r * rs;
    float *restrict s = sum + r * n, *restrict o = out + r * n;
    for (int64_t i = 0; i < n; ++i) s[i] = xr[i] + rr[i];
    const float inv = inv_rms(s, n, eps);
    for (int64_t i = 0; i < n; ++i) o[i] = w[i] * (s[i] * inv);
  }
}

static inline void rotate_head(float *restrict x, const float *restrict cos,
                               const float *restrict sin, int64_t half) {
  float *restrict x2 = x + half;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x2[i];
    x[i] = a * cos[i] - b * sin[i];
    x2[i] = b * cos[i] + a * sin[i];
  }
}

/* Rotates q [T, hq, D] (strides qs0, qs1) and k [T, hk, D] (strides ks0, ks1) in place by
 * cache[positions[t]] ([P, D]: cos in the first half, sin in the second). Returns 0, or
 * -1 - t for the first token t whose position is outside [0, P) (nothing is written then). */
int rotary_neox_f32(const int64_t *positions, int64_t T, float *q, int64_t hq, int64_t qs0,
                    int64_t qs1, float *k, int64_t hk, int64_t ks0, int64_t ks1,
                    const float *cache, int64_t P, int64_t D, int num_threads) {
  for (int64_t t = 0; t < T; ++t)
    if (positions[t] < 0 || positions[t] >= P) return (int)(-1 - t);
  const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (T * (hq + hk) * D >= MIN_PARALLEL)
  for (int64_t t = 0; t < T; ++t) {
    const float *cos = cache + positions[t] * D, *sin = cos + half;
    for (int64_t h = 0; h < hq; ++h) rotate_head(q + t * qs0 + h * qs1, cos, sin, half);
    for (int64_t h = 0; h < hk; ++h) rotate_head(k + t * ks0 + h * ks1, cos, sin, half);
  }
  return 0;
}

/* out [rows, d] contiguous = silu(x[:, :d]) * x[:, d:], x rows at stride xs. */
void silu_and_mul_f32(const float *x, int64_t xs, int64_t rows, int64_t d, float *out,
                      int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * d >= MIN_PARALLEL)
  for (int64_t r = 0; r < rows; ++r) {
    const float *restrict g = x + r * xs, *restrict u = g + d;
    float *restrict o = out + r * d;
    for (int64_t i = 0; i < d; ++i) {
      /* Clamped so exp stays finite (-ffast-math assumes no infinities); silu(g) for
       * g < -88 is below 1e-36 either way. */
      const float e = expf(fminf(-g[i], 88.f));
      o[i] = g[i] / (1.f + e) * u[i];
    }
  }
}
