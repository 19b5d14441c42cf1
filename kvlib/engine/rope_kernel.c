/* Stored float16 pre-RoPE keys, rotated into a float32 KV cache in one pass (engine/rope_kernel.py).

   For each of n_mat matrices (layer x KV head) of t rows of d values, row r:
     out[j]     = x[j] * cos[r][j] + x[j + h] * -sin[r][j]
     out[j + h] = x[j + h] * cos[r][j] + x[j] * sin[r][j]        (h = d / 2, j < h)
   each product rounded to float32, then the sum: the operations, in order, of the torch
   passes in rope.rope_into_ (x * [c, c] + swap(x) * [-s, s]), so the same bits. Built with
   -ffp-contract=off and without FMA so that no product and sum fuse into one rounding; AVX2 and
   F16C intrinsics, eight values at a time.
   Rows are split over n_threads OpenMP threads (torch's own workers: kernels.py).
   kvlib_rope_bf16_into_bf16 does the same for a bfloat16 model (an AVX-512 BF16 CPU computes in
   bf16 and stores bf16 KV): each bfloat16 key widened exactly (a 16-bit shift), the same float32
   arithmetic, then one rounding to nearest even back to bfloat16 (NaN to 0x7fc0), which is
   torch's float32 -> bfloat16 conversion: the bits of the torch passes, which rotate a bf16
   cache through a float32 copy.
   Built twice (rope_kernel.py): for AVX2 and F16C, and for AVX-512 (F/BW/VL), where a bf16 row is
   rotated sixteen values at a time with the same operations and the same integer rounding
   (bf16_avx512.h). kvlib_rope_run_bf16 rotates a run of stored chunks' keys and copies their values
   into a cache in one parallel pass. */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "bf16_avx2.h"
#ifdef __AVX512BW__
#include "bf16_avx512.h"
#endif

typedef struct {
    const uint16_t *src; /* float16 or bfloat16 bits */
    void *dst;           /* float32, or bfloat16 bits */
    const float *cos_t, *sin_t;
    int64_t first, last, t, d, src_stride, dst_stride;
} job_t;

/* out1 = x1 * c + x2 * -s, out2 = x2 * c + x1 * s, each product rounded, then the sum. */
static inline void rotate8(__m256 x1, __m256 x2, const float *c, const float *s, __m256 *out1, __m256 *out2) {
    const __m256 cj = _mm256_loadu_ps(c), sj = _mm256_loadu_ps(s);
    const __m256 a = _mm256_mul_ps(x1, cj), b = _mm256_mul_ps(x2, _mm256_xor_ps(sj, _mm256_set1_ps(-0.0f)));
    const __m256 e = _mm256_mul_ps(x2, cj), f = _mm256_mul_ps(x1, sj);
    *out1 = _mm256_add_ps(a, b);
    *out2 = _mm256_add_ps(e, f);
}

static inline void rotate1(float x1, float x2, float c, float s, float *out1, float *out2) {
    const float a = x1 * c, b = x2 * -s;
    const float e = x2 * c, f = x1 * s;
    *out1 = a + b;
    *out2 = e + f;
}

/* What a row is read from and written as: float32 (KIND_F32), bfloat16 (KIND_BF16), or float16
   read into float32 (KIND_F16_F32: stored keys into a float32 cache). */
enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16_F32 = 2 };

static inline __attribute__((always_inline)) __m256 read8(const void *x, int64_t j, int kind) {
    if (kind == KIND_F16_F32) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + j)));
    return load8_as(x, j, kind == KIND_BF16);
}

static inline __attribute__((always_inline)) float read1(const void *x, int64_t j, int kind) {
    return kind == KIND_F16_F32 ? _cvtsh_ss(((const uint16_t *)x)[j]) : load1_as(x, j, kind == KIND_BF16);
}

/* One row of d = 2h values rotated, eight pairs at a time, then the pairs left over. */
static inline __attribute__((always_inline)) void rotate_row(const void *x, void *out, const float *c, const float *s,
                                                            int64_t h, int kind) {
    const int bf16 = kind == KIND_BF16;
#ifdef __AVX512BW__
    if (bf16) {
        rotate_row_bf16x16((const uint16_t *)x, (uint16_t *)out, c, s, h, 0);
        return;
    }
#endif
    int64_t j = 0;
    for (; j + 8 <= h; j += 8) {
        __m256 o1, o2;
        rotate8(read8(x, j, kind), read8(x, j + h, kind), c + j, s + j, &o1, &o2);
        store8_as(out, j, o1, bf16);
        store8_as(out, j + h, o2, bf16);
    }
    for (; j < h; j++) {
        float o1, o2;
        rotate1(read1(x, j, kind), read1(x, j + h, kind), c[j], s[j], &o1, &o2);
        store1_as(out, j, o1, bf16);
        store1_as(out, j + h, o2, bf16);
    }
}

/* The job's rows; kind is decided once a row, so each arm runs rotate_row compiled for its kind. */
static void rotate_rows(const job_t *job, int kind) {
    const int64_t h = job->d / 2;
    for (int64_t row = job->first; row < job->last; row++) {
        const int64_t m = row / job->t, r = row % job->t, to = m * job->dst_stride + r * job->d;
        const uint16_t *x = job->src + m * job->src_stride + r * job->d;
        const float *c = job->cos_t + r * h, *s = job->sin_t + r * h;
        if (kind == KIND_BF16)
            rotate_row(x, (uint16_t *)job->dst + to, c, s, h, KIND_BF16);
        else
            rotate_row(x, (float *)job->dst + to, c, s, h, KIND_F16_F32);
    }
}

static int rope_rows(const uint16_t *src, void *dst, const float *cos_t, const float *sin_t, int64_t n_mat,
                     int64_t t, int64_t d, int64_t src_stride, int64_t dst_stride, int n_threads, int kind) {
    const int64_t rows = n_mat * t;
    if (n_threads < 1) n_threads = 1;
    if (rows < n_threads) n_threads = 1;
#pragma omp parallel num_threads(n_threads)
    {
        const int64_t i = omp_get_thread_num(), n = omp_get_num_threads();
        const job_t job = {src, dst, cos_t, sin_t, rows * i / n, rows * (i + 1) / n, t, d, src_stride, dst_stride};
        rotate_rows(&job, kind);
    }
    return 0;
}

int kvlib_rope_f16_into_f32(const uint16_t *src, float *dst, const float *cos_t, const float *sin_t,
                            int64_t n_mat, int64_t t, int64_t d, int64_t src_stride, int64_t dst_stride,
                            int n_threads) {
    return rope_rows(src, dst, cos_t, sin_t, n_mat, t, d, src_stride, dst_stride, n_threads, KIND_F16_F32);
}

int kvlib_rope_bf16_into_bf16(const uint16_t *src, uint16_t *dst, const float *cos_t, const float *sin_t,
                              int64_t n_mat, int64_t t, int64_t d, int64_t src_stride, int64_t dst_stride,
                              int n_threads) {
    return rope_rows(src, dst, cos_t, sin_t, n_mat, t, d, src_stride, dst_stride, n_threads, KIND_BF16);
}

/* New tokens' projections [t rows of (n_q + 2 n_kv) heads x d: q, k, v], rotated and laid out in one
   pass: q to q_out [t, n_q, d], k to k_out and v copied to v_out ([n_kv heads kv_hs apart] x [t, d]:
   a cache's slots), with the same arithmetic as above: float32, or bfloat16 (each rotated value
   rounded once, as rope.apply_rope's cast back does). */
static inline __attribute__((always_inline)) int rope_qkv(const void *qkv, int64_t t, int64_t n_q, int64_t n_kv,
                                                          int64_t d, const float *cos_t, const float *sin_t,
                                                          void *q_out, void *k_out, void *v_out, int64_t k_hs,
                                                          int64_t v_hs, int bf16) {
    const int64_t h = d / 2, width = (n_q + 2 * n_kv) * d, size = bf16 ? 2 : 4;
    if (t <= 0 || n_q <= 0 || n_kv <= 0 || d <= 0 || d % 2) return -1;
    for (int64_t r = 0; r < t; r++) {
        const char *row = (const char *)qkv + r * width * size;
        const float *c = cos_t + r * h, *s = sin_t + r * h;
        for (int64_t i = 0; i < n_kv + n_q; i++) { /* q heads, then k heads */
            const void *x = row + i * d * size;
            char *out = i < n_q ? (char *)q_out + (r * n_q + i) * d * size
                                : (char *)k_out + ((i - n_q) * k_hs + r * d) * size;
            rotate_row(x, out, c, s, h, bf16 ? KIND_BF16 : KIND_F32);
        }
        for (int64_t i = 0; i < n_kv; i++)
            memcpy((char *)v_out + (i * v_hs + r * d) * size, row + (n_q + n_kv + i) * d * size, d * size);
    }
    return 0;
}

int kvlib_rope_qkv_f32(const float *qkv, int64_t t, int64_t n_q, int64_t n_kv, int64_t d, const float *cos_t,
                       const float *sin_t, float *q_out, float *k_out, float *v_out, int64_t k_hs, int64_t v_hs) {
    return rope_qkv(qkv, t, n_q, n_kv, d, cos_t, sin_t, q_out, k_out, v_out, k_hs, v_hs, 0);
}

int kvlib_rope_qkv_bf16(const uint16_t *qkv, int64_t t, int64_t n_q, int64_t n_kv, int64_t d, const float *cos_t,
                        const float *sin_t, uint16_t *q_out, uint16_t *k_out, uint16_t *v_out, int64_t k_hs,
                        int64_t v_hs) {
    return rope_qkv(qkv, t, n_q, n_kv, d, cos_t, sin_t, q_out, k_out, v_out, k_hs, v_hs, 1);
}

/* A run of n stored chunks into a bf16 cache, in one parallel pass: chunk i's keys (n_mat matrices
   [layer x KV head] of t[i] rows of d, k_src[i] with matrices k_stride[i] apart) rotated into the
   cache's keys and its values (v_src[i], v_stride[i]) copied into the cache's values, at the slots
   after the chunks before it (dst_k / dst_v: the run's first slot of matrix 0; matrices dst_stride
   apart); cos_t / sin_t hold the run's rows in order. The rows are split evenly over the threads in
   chunk-major order, so each thread's table rows stay in its cache across the matrices. The AVX-512
   build writes the cache with non-temporal stores: 94 MB (a 4k SmolLM2 prompt) in 6.0 against
   7.0 ms with plain ones, the buffer just zeroed (in-process A/B, 2-core EPYC). */
int kvlib_rope_run_bf16(int64_t n, const uint16_t *const *k_src, const uint16_t *const *v_src, const int64_t *t,
                        const int64_t *k_stride, const int64_t *v_stride, uint16_t *dst_k, uint16_t *dst_v,
                        int64_t dst_stride, int64_t n_mat, int64_t d, const float *cos_t, const float *sin_t,
                        int n_threads) {
    int64_t rows = 0;
    for (int64_t i = 0; i < n; i++) {
        if (t[i] < 0) return -1;
        rows += n_mat * t[i];
    }
    if (d <= 0 || d % 2) return -1;
    if (n_threads < 1 || rows < n_threads) n_threads = 1;
#pragma omp parallel num_threads(n_threads)
    {
        const int64_t id = omp_get_thread_num(), nt = omp_get_num_threads(), h = d / 2;
        const int64_t first = rows * id / nt, last = rows * (id + 1) / nt;
        int64_t base = 0, slot = 0; /* the chunk's first global row and first slot of the run */
        for (int64_t i = 0; i < n; base += n_mat * t[i], slot += t[i], i++) {
            const int64_t lo = first > base ? first : base, end = base + n_mat * t[i];
            for (int64_t g = lo; g < (last < end ? last : end); g++) {
                const int64_t m = (g - base) / t[i], r = (g - base) % t[i], to = m * dst_stride + (slot + r) * d;
                const uint16_t *k = k_src[i] + m * k_stride[i] + r * d, *v = v_src[i] + m * v_stride[i] + r * d;
                const float *c = cos_t + (slot + r) * h, *s = sin_t + (slot + r) * h;
#ifdef __AVX512BW__
                rotate_row_bf16x16(k, dst_k + to, c, s, h, 1);
                if (d % 32 == 0 && ((uintptr_t)(dst_v + to) & 63) == 0) {
                    for (int64_t j = 0; j < d; j += 32)
                        _mm512_stream_si512((__m512i *)(dst_v + to + j), _mm512_loadu_si512(v + j));
                    continue;
                }
#else
                rotate_row(k, dst_k + to, c, s, h, KIND_BF16);
#endif
                memcpy(dst_v + to, v, d * sizeof(uint16_t));
            }
        }
        _mm_sfence(); /* the streamed stores reach memory before the cache is read */
    }
    return 0;
}
