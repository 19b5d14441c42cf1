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
   120 layer products streaming: 18.6 -> 16.7 ms; no gain measured at 25 or 128 rows, not done there). */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define RB 96

static inline __attribute__((always_inline)) void tile_n(const float *x, const int nr, int64_t k, const float *panel,
                                                        const float *bias, const float *res, float *y, int64_t n,
                                                        int64_t cols, const float *next) {
    const float *row[6];
    for (int i = 0; i < nr; i++) row[i] = x + i * k;
    __m256 acc[6][2];
#pragma GCC unroll 6
    for (int i = 0; i < nr; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t c = 0; c < k; c++) {
        if (next) _mm_prefetch((const char *)(next + c * 16), _MM_HINT_T1); /* line c of the next panel */
        const __m256 b0 = _mm256_loadu_ps(panel + c * 16), b1 = _mm256_loadu_ps(panel + c * 16 + 8);
#pragma GCC unroll 6
        for (int i = 0; i < nr; i++) {
            const __m256 a = _mm256_broadcast_ss(row[i] + c);
            acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
        }
    }
    float out[6][16];
#pragma GCC unroll 6
    for (int i = 0; i < nr; i++) {
        _mm256_storeu_ps(out[i], acc[i][0]);
        _mm256_storeu_ps(out[i] + 8, acc[i][1]);
    }
    for (int i = 0; i < nr; i++)
        for (int64_t j = 0; j < cols; j++) {
            const float v = bias ? out[i][j] + bias[j] : out[i][j];
            y[i * n + j] = res ? v + res[i * n + j] : v;
        }
}

/* tile_n with the row count a constant: a lone row (decode, the head's last token) runs a sixth of a full
   tile's multiply-adds. */
static void tile(const float *x, int64_t nr, int64_t k, const float *panel, const float *bias, const float *res,
                 float *y, int64_t n, int64_t cols, const float *next) {
    switch (nr) {
    case 6: tile_n(x, 6, k, panel, bias, res, y, n, cols, next); break;
    case 5: tile_n(x, 5, k, panel, bias, res, y, n, cols, next); break;
    case 4: tile_n(x, 4, k, panel, bias, res, y, n, cols, next); break;
    case 3: tile_n(x, 3, k, panel, bias, res, y, n, cols, next); break;
    case 2: tile_n(x, 2, k, panel, bias, res, y, n, cols, next); break;
    default: tile_n(x, 1, k, panel, bias, res, y, n, cols, next);
    }
}

int kvlib_linear_f32(const float *x, int64_t m, int64_t k, const float *wp, int64_t n, const float *bias,
                     const float *res, float *y, int n_threads) {
    if (m <= 0 || k <= 0 || n <= 0 || n_threads < 1) return -1;
    const int64_t panels = (n + 15) / 16;
    for (int64_t r0 = 0; r0 < m; r0 += RB) {
        const int64_t rows = m - r0 < RB ? m - r0 : RB, tiles = (rows + 5) / 6;
#pragma omp parallel for schedule(static) num_threads(n_threads)
        for (int64_t p = 0; p < panels; p++) {
            const int64_t cols = n - p * 16 < 16 ? n - p * 16 : 16;
            int64_t r = r0;
            for (int64_t t = 0; t < tiles; t++) { /* tiles as even as the rows allow: 25 rows are 5 x 5 */
                const int64_t nr = rows / tiles + (t < rows % tiles);
                tile(x + r * k, nr, k, wp + p * k * 16, bias ? bias + p * 16 : 0,
                     res ? res + r * n + p * 16 : 0, y + r * n + p * 16, n, cols,
                     tiles == 1 && p + 1 < panels ? wp + (p + 1) * k * 16 : 0);
                r += nr;
            }
        }
    }
    return 0;
}
