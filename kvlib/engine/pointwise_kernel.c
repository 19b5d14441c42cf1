/* A decoder layer's row-wise float32 operations in one pass each (engine/pointwise_kernel.py).

   kvlib_rms_norm_f32: out[i] = w * (x[i] * (1 / sqrt(sum(x[i]^2) / n + eps))), each row on its
   own (the same sums in the same order whatever the other rows: batch-invariant).
   kvlib_silu_mul_f32: out[i][j] = silu(gu[i][j]) * gu[i][inter + j], silu(g) = g / (1 + e^-g),
   the gate and up halves of one fused product's rows. Rows split over OpenMP threads (torch's
   own workers: kernels.py) once there are enough of them to pay for the fork.
   The _bf16 twins take and give a bf16 model's tensors: values widened exactly, the same float32
   arithmetic, and the roundings to bfloat16 where torch's bf16 ops round (forward.norm: the
   normalised row, then its product with the weight; forward.gated: silu(gate), then its product
   with up), so they differ from torch's by the sum's order and the exponential, not by a rounding
   step more or less. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "bf16_avx2.h"
#include "exp2_avx2.h"

#define PARALLEL_MIN 65536 /* elements below which one thread does it all */

static inline __attribute__((always_inline)) float sum_squares(const void *r, int64_t n, int bf16) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t j = 0;
    for (; j + 32 <= n; j += 32)
        for (int a = 0; a < 4; a++) {
            const __m256 v = load8_as(r, j + 8 * a, bf16);
            acc[a] = _mm256_fmadd_ps(v, v, acc[a]);
        }
    for (; j + 8 <= n; j += 8) {
        const __m256 v = load8_as(r, j, bf16);
        acc[0] = _mm256_fmadd_ps(v, v, acc[0]);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    float ss = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (; j < n; j++) ss += load1_as(r, j, bf16) * load1_as(r, j, bf16);
    return ss;
}

static inline __attribute__((always_inline)) int rms_norm(const void *x, int64_t m, int64_t n, const void *w,
                                                          float eps, void *out, int n_threads, int bf16) {
    if (m <= 0 || n <= 0 || n_threads < 1) return -1;
    const int threads = m * n < PARALLEL_MIN ? 1 : n_threads;
    const int64_t size = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < m; i++) {
        const char *r = (const char *)x + i * n * size;
        char *o = (char *)out + i * n * size;
        const float inv = 1.0f / sqrtf(sum_squares(r, n, bf16) / (float)n + eps);
        const __m256 vinv = _mm256_set1_ps(inv);
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) {
            __m256 y = _mm256_mul_ps(load8_as(r, j, bf16), vinv);
            if (bf16) y = bf16x8_round(y);
            store8_as(o, j, _mm256_mul_ps(load8_as(w, j, bf16), y), bf16);
        }
        for (; j < n; j++) {
            const float y = load1_as(r, j, bf16) * inv;
            store1_as(o, j, load1_as(w, j, bf16) * (bf16 ? bf16_round1(y) : y), bf16);
        }
    }
    return 0;
}

int kvlib_rms_norm_f32(const float *x, int64_t m, int64_t n, const float *w, float eps, float *out, int n_threads) {
    return rms_norm(x, m, n, w, eps, out, n_threads, 0);
}

int kvlib_rms_norm_bf16(const uint16_t *x, int64_t m, int64_t n, const uint16_t *w, float eps, uint16_t *out,
                        int n_threads) {
    return rms_norm(x, m, n, w, eps, out, n_threads, 1);
}

/* e^x = 2^(x log2 e) (exp2_avx2.h: finite for any x, so 1 + e^-g is too). */
static inline __m256 exp_clamped(__m256 x) { return exp2_avx2(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f))); }

static inline float silu_one(float g) {
    float lanes[8];
    _mm256_storeu_ps(lanes, exp_clamped(_mm256_set1_ps(-g)));
    return g / (1.0f + lanes[0]);
}

static inline __attribute__((always_inline)) int silu_mul(const void *gu, int64_t m, int64_t inter, int64_t stride,
                                                          void *out, int n_threads, int bf16) {
    if (m <= 0 || inter <= 0 || stride < 2 * inter || n_threads < 1) return -1;
    const int threads = m * inter < PARALLEL_MIN ? 1 : n_threads;
    const int64_t size = bf16 ? 2 : 4;
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < m; i++) {
        const char *g = (const char *)gu + i * stride * size, *u = g + inter * size;
        char *o = (char *)out + i * inter * size;
        int64_t j = 0;
        for (; j + 8 <= inter; j += 8) {
            const __m256 v = load8_as(g, j, bf16);
            __m256 s = _mm256_div_ps(v, _mm256_add_ps(one, exp_clamped(_mm256_sub_ps(zero, v))));
            if (bf16) s = bf16x8_round(s);
            store8_as(o, j, _mm256_mul_ps(s, load8_as(u, j, bf16)), bf16);
        }
        for (; j < inter; j++) {
            const float s = silu_one(load1_as(g, j, bf16));
            store1_as(o, j, (bf16 ? bf16_round1(s) : s) * load1_as(u, j, bf16), bf16);
        }
    }
    return 0;
}

int kvlib_silu_mul_f32(const float *gu, int64_t m, int64_t inter, int64_t stride, float *out, int n_threads) {
    return silu_mul(gu, m, inter, stride, out, n_threads, 0);
}

int kvlib_silu_mul_bf16(const uint16_t *gu, int64_t m, int64_t inter, int64_t stride, uint16_t *out, int n_threads) {
    return silu_mul(gu, m, inter, stride, out, n_threads, 1);
}
