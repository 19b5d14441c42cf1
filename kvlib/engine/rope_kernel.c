/* Stored float16 pre-RoPE keys, rotated into a float32 KV cache in one pass (engine/rope_kernel.py).

   For each of n_mat matrices (layer x KV head) of t rows of d values, row r:
     out[j]     = x[j] * cos[r][j] + x[j + h] * -sin[r][j]
     out[j + h] = x[j + h] * cos[r][j] + x[j] * sin[r][j]        (h = d / 2, j < h)
   each product rounded to float32, then the sum: the operations, in order, of the torch
   passes in rope.rope_into_ (x * [c, c] + swap(x) * [-s, s]), so the same bits. Built with
   -ffp-contract=off and without FMA so that no product and sum fuse into one rounding; AVX2 and
   F16C intrinsics, eight values at a time.
   Rows are split over n_threads OpenMP threads (torch's own workers: kernels.py). */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

typedef struct {
    const uint16_t *src; /* float16 bits */
    float *dst;
    const float *cos_t, *sin_t;
    int64_t first, last, t, d, src_stride, dst_stride;
} job_t;

static void rotate_row(const uint16_t *x, float *out, const float *c, const float *s, int64_t h) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int64_t j = 0;
    for (; j + 8 <= h; j += 8) {
        const __m256 x1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + j)));
        const __m256 x2 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + j + h)));
        const __m256 cj = _mm256_loadu_ps(c + j), sj = _mm256_loadu_ps(s + j);
        const __m256 a = _mm256_mul_ps(x1, cj), b = _mm256_mul_ps(x2, _mm256_xor_ps(sj, sign));
        const __m256 e = _mm256_mul_ps(x2, cj), f = _mm256_mul_ps(x1, sj);
        _mm256_storeu_ps(out + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(out + j + h, _mm256_add_ps(e, f));
    }
    for (; j < h; j++) {
        const float x1 = _cvtsh_ss(x[j]), x2 = _cvtsh_ss(x[j + h]);
        const float a = x1 * c[j], b = x2 * -s[j];
        const float e = x2 * c[j], f = x1 * s[j];
        out[j] = a + b;
        out[j + h] = e + f;
    }
}

static void rotate_rows(const job_t *job) {
    const int64_t h = job->d / 2;
    for (int64_t row = job->first; row < job->last; row++) {
        const int64_t m = row / job->t, r = row % job->t;
        rotate_row(job->src + m * job->src_stride + r * job->d, job->dst + m * job->dst_stride + r * job->d,
                   job->cos_t + r * h, job->sin_t + r * h, h);
    }
}

int kvlib_rope_f16_into_f32(const uint16_t *src, float *dst, const float *cos_t, const float *sin_t,
                            int64_t n_mat, int64_t t, int64_t d, int64_t src_stride, int64_t dst_stride,
                            int n_threads) {
    const int64_t rows = n_mat * t;
    if (n_threads < 1) n_threads = 1;
    if (rows < n_threads) n_threads = 1;
#pragma omp parallel num_threads(n_threads)
    {
        const int64_t i = omp_get_thread_num(), n = omp_get_num_threads();
        const job_t job = {src, dst, cos_t, sin_t, rows * i / n, rows * (i + 1) / n, t, d, src_stride, dst_stride};
        rotate_rows(&job);
    }
    return 0;
}
