/* A decoder layer's row-wise float32 operations in one pass each (engine/pointwise_kernel.py).

   kvlib_rms_norm_f32: out[i] = w * (x[i] * (1 / sqrt(sum(x[i]^2) / n + eps))), each row on its
   own (the same sums in the same order whatever the other rows: batch-invariant).
   kvlib_silu_mul_f32: out[i][j] = silu(gu[i][j]) * gu[i][inter + j], silu(g) = g / (1 + e^-g),
   the gate and up halves of one fused product's rows. Rows split over OpenMP threads (torch's
   own workers: kernels.py) once there are enough of them to pay for the fork. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "exp2_avx2.h"

#define PARALLEL_MIN 65536 /* elements below which one thread does it all */

int kvlib_rms_norm_f32(const float *x, int64_t m, int64_t n, const float *w, float eps, float *out, int n_threads) {
    if (m <= 0 || n <= 0 || n_threads < 1) return -1;
    const int threads = m * n < PARALLEL_MIN ? 1 : n_threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < m; i++) {
        const float *r = x + i * n;
        float *o = out + i * n;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t j = 0;
        for (; j + 32 <= n; j += 32)
            for (int a = 0; a < 4; a++) {
                const __m256 v = _mm256_loadu_ps(r + j + 8 * a);
                acc[a] = _mm256_fmadd_ps(v, v, acc[a]);
            }
        for (; j + 8 <= n; j += 8) {
            const __m256 v = _mm256_loadu_ps(r + j);
            acc[0] = _mm256_fmadd_ps(v, v, acc[0]);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        float ss = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        for (; j < n; j++) ss += r[j] * r[j];
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);
        const __m256 vinv = _mm256_set1_ps(inv);
        for (j = 0; j + 8 <= n; j += 8)
            _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_loadu_ps(w + j), _mm256_mul_ps(_mm256_loadu_ps(r + j), vinv)));
        for (; j < n; j++) o[j] = w[j] * (r[j] * inv);
    }
    return 0;
}

/* e^x = 2^(x log2 e) (exp2_avx2.h: finite for any x, so 1 + e^-g is too). */
static inline __m256 exp_clamped(__m256 x) { return exp2_avx2(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f))); }

static inline float silu_one(float g) {
    float lanes[8];
    _mm256_storeu_ps(lanes, exp_clamped(_mm256_set1_ps(-g)));
    return g / (1.0f + lanes[0]);
}

int kvlib_silu_mul_f32(const float *gu, int64_t m, int64_t inter, int64_t stride, float *out, int n_threads) {
    if (m <= 0 || inter <= 0 || stride < 2 * inter || n_threads < 1) return -1;
    const int threads = m * inter < PARALLEL_MIN ? 1 : n_threads;
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < m; i++) {
        const float *g = gu + i * stride, *u = g + inter;
        float *o = out + i * inter;
        int64_t j = 0;
        for (; j + 8 <= inter; j += 8) {
            const __m256 v = _mm256_loadu_ps(g + j);
            const __m256 s = _mm256_div_ps(v, _mm256_add_ps(one, exp_clamped(_mm256_sub_ps(zero, v))));
            _mm256_storeu_ps(o + j, _mm256_mul_ps(s, _mm256_loadu_ps(u + j)));
        }
        for (; j < inter; j++) o[j] = silu_one(g[j]) * u[j];
    }
    return 0;
}
