/* y = x W^T + b (+ r) in float32 on weights packed in panels of 16 output columns (engine/linear_kernel.py).

   wp holds W [n x k] as ceil(n / 16) panels, each [k x 16] (column j of a panel is row
   16 * panel + j of W; columns past n are zero). A tile of up to 6 rows of x against one panel
   is 12 AVX2 accumulators over k; every output is the same chain of fused multiply-adds in k
   order, then the bias, whatever the number of rows or the tile it falls in (batch-invariant).
   Rows go in blocks of RB (the block of x stays in cache while the panels stream past); the
   panels of a block are split over OpenMP threads (torch's own workers: kernels.py). A residual r
   [m x n], when given, is added last: (x W^T + b) + r, the sums a layer's `h + linear(...)` takes.
   With one tile of rows (decode: at most 6), the panels are read once each from memory and that
   read is the product's whole cost: the tile prefetches the next panel as it goes (1 row, SmolLM2's
   120 layer products streaming: 18.6 -> 16.7 ms; no gain measured at 25 or 128 rows, not done there).

   Panels come in two storage types: float32 (kvlib_linear_f32), and bfloat16 bits
   (kvlib_linear_bf16w) for weights that bfloat16 holds exactly, as a bf16 checkpoint's do. A
   bfloat16 is the top half of a float32, so widening it is a 16-bit shift, exact: both entry
   points run the same float32 fused multiply-adds on the same values and give the same bits,
   while the bf16 panels are half the bytes to stream from memory. */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define RB 96

/* Line c of a panel (16 weights) as two vectors of 8 floats; bf16: widened exactly. */
static inline __attribute__((always_inline)) void panel_line(const void *panel, int64_t c, int bf16, __m256 *b0,
                                                             __m256 *b1) {
    if (bf16) {
        const __m256i bits = _mm256_loadu_si256((const __m256i *)((const uint16_t *)panel + c * 16));
        *b0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(bits)), 16));
        *b1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(bits, 1)), 16));
    } else {
        *b0 = _mm256_loadu_ps((const float *)panel + c * 16);
        *b1 = _mm256_loadu_ps((const float *)panel + c * 16 + 8);
    }
}

static inline __attribute__((always_inline)) void tile(const float *x, int64_t nr, int64_t k, const void *panel,
                                                       int bf16, const float *bias, const float *res, float *y,
                                                       int64_t n, int64_t cols, const char *next) {
    const float *row[6];
    const int64_t line = bf16 ? 32 : 64; /* bytes of one panel line */
    for (int i = 0; i < 6; i++) row[i] = x + (i < nr ? i : 0) * k;
    __m256 acc[6][2];
#pragma GCC unroll 6
    for (int i = 0; i < 6; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t c = 0; c < k; c++) {
        if (next) _mm_prefetch(next + c * line, _MM_HINT_T1); /* line c of the next panel */
        __m256 b0, b1;
        panel_line(panel, c, bf16, &b0, &b1);
#pragma GCC unroll 6
        for (int i = 0; i < 6; i++) {
            const __m256 a = _mm256_broadcast_ss(row[i] + c);
            acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
        }
    }
    float out[6][16];
#pragma GCC unroll 6
    for (int i = 0; i < 6; i++) {
        _mm256_storeu_ps(out[i], acc[i][0]);
        _mm256_storeu_ps(out[i] + 8, acc[i][1]);
    }
    for (int64_t i = 0; i < nr; i++)
        for (int64_t j = 0; j < cols; j++) {
            const float v = bias ? out[i][j] + bias[j] : out[i][j];
            y[i * n + j] = res ? v + res[i * n + j] : v;
        }
}

static inline __attribute__((always_inline)) int linear(const float *x, int64_t m, int64_t k, const void *wp,
                                                        int bf16, int64_t n, const float *bias, const float *res,
                                                        float *y, int n_threads) {
    if (m <= 0 || k <= 0 || n <= 0 || n_threads < 1) return -1;
    const int64_t panels = (n + 15) / 16, panel_bytes = k * 16 * (bf16 ? 2 : 4);
    for (int64_t r0 = 0; r0 < m; r0 += RB) {
        const int64_t rows = m - r0 < RB ? m - r0 : RB, tiles = (rows + 5) / 6;
#pragma omp parallel for schedule(static) num_threads(n_threads)
        for (int64_t p = 0; p < panels; p++) {
            const int64_t cols = n - p * 16 < 16 ? n - p * 16 : 16;
            const char *panel = (const char *)wp + p * panel_bytes;
            int64_t r = r0;
            for (int64_t t = 0; t < tiles; t++) { /* tiles as even as the rows allow: 25 rows are 5 x 5 */
                const int64_t nr = rows / tiles + (t < rows % tiles);
                tile(x + r * k, nr, k, panel, bf16, bias ? bias + p * 16 : 0, res ? res + r * n + p * 16 : 0,
                     y + r * n + p * 16, n, cols, tiles == 1 && p + 1 < panels ? panel + panel_bytes : 0);
                r += nr;
            }
        }
    }
    return 0;
}

int kvlib_linear_f32(const float *x, int64_t m, int64_t k, const float *wp, int64_t n, const float *bias,
                     const float *res, float *y, int n_threads) {
    return linear(x, m, k, wp, 0, n, bias, res, y, n_threads);
}

int kvlib_linear_bf16w(const float *x, int64_t m, int64_t k, const uint16_t *wp, int64_t n, const float *bias,
                       const float *res, float *y, int n_threads) {
    return linear(x, m, k, wp, 1, n, bias, res, y, n_threads);
}
