/* y = x W^T + b (+ r) in bf16, the products summed in float32, on an AVX-512 BF16 CPU
   (engine/linear_kernel.py).

   wp holds W [n x k] (k even) as ceil(n / 16) panels, each [k/2 x 16 x 2]: pair c of a panel's
   column j is W[16 * panel + j, 2c : 2c + 2] (columns past n zero), what one VDPBF16PS takes beside
   a row's pair c broadcast. A tile of up to 4 rows of x against four panels holds 16 float32 sums
   over k (6 x 2, 12 x 2, 8 x 3, 5 x 4 and 3 x 4 ran alike or slower at 1, 26 and 64 rows). Every
   output is the same chain of pair sums in k order, then the bias, rounded once to bf16, whatever
   the number of rows or the tile it falls in (batch-invariant). A residual r [m x n], when given,
   is added to that rounded value and the sum rounded again: torch's bf16 `h + linear(...)`. Rows
   go in blocks of RB (the block of x stays in cache while the panels stream past). Each OpenMP
   thread (torch's own workers: kernels.py) takes an even, contiguous share of the panels in groups
   of four, and fetches the next group into L2 while the current one's tiles run (SmolLM2's 120
   products streaming, 26 rows: 18.6 -> 15.7 ms; 1 row 8.4 -> 7.5; two groups ahead was slower). */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define RB 96
#define ROWS 4   /* a tile's rows ... */
#define PANELS 4 /* ... against this many panels (64 columns): 16 sums */

static inline __m512 widen(__m256i bf) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf), 16)); }

static inline void finish(__m512 acc, const uint16_t *bias, const uint16_t *res, uint16_t *y, __mmask16 cols) {
    if (bias) acc = _mm512_add_ps(acc, widen(_mm256_maskz_loadu_epi16(cols, bias)));
    __m256i out = (__m256i)_mm512_cvtneps_pbh(acc);
    if (res) out = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(widen(out), widen(_mm256_maskz_loadu_epi16(cols, res))));
    _mm256_mask_storeu_epi16(y, cols, out);
}

#define INLINE static inline __attribute__((always_inline))

/* Rows [0, nr) of x against panels [p0, p0 + np) (np <= PANELS, a constant once inlined), fetching
   `lines` cache lines from pf into L2 as it goes. */
INLINE void tile_n(const uint16_t *x, int64_t nr, int64_t k, const uint16_t *panel, const uint16_t *bias,
                   const uint16_t *res, uint16_t *y, int64_t n, int64_t p0, const char *pf, int64_t lines,
                   const int np) {
    const int32_t *row[ROWS];
    for (int i = 0; i < ROWS; i++) row[i] = (const int32_t *)(x + (i < nr ? i : 0) * k);
    const int64_t pairs = k / 2, stride = pairs * 32; /* uint16 per panel */
    __m512 acc[ROWS][PANELS];
    for (int i = 0; i < ROWS; i++)
        for (int j = 0; j < np; j++) acc[i][j] = _mm512_setzero_ps();
    const int64_t per = (lines + pairs - 1) / pairs; /* lines fetched a step */
    for (int64_t c = 0; c < pairs; c++) {
        for (int64_t q = 0; q < per && lines > 0; q++, lines--, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
        __m512bh b[PANELS];
        for (int j = 0; j < np; j++) b[j] = (__m512bh)_mm512_loadu_si512(panel + j * stride + c * 32);
        for (int i = 0; i < ROWS; i++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(row[i][c]);
            for (int j = 0; j < np; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
        }
    }
    for (int j = 0; j < np; j++) {
        const int64_t col0 = (p0 + j) * 16, cols = n - col0 < 16 ? n - col0 : 16;
        const __mmask16 mask = (__mmask16)((1u << cols) - 1u);
        for (int64_t i = 0; i < nr; i++)
            finish(acc[i][j], bias ? bias + col0 : 0, res ? res + i * n + col0 : 0, y + i * n + col0, mask);
    }
}

static void tile(const uint16_t *x, int64_t nr, int64_t k, const uint16_t *panel, int64_t np, const uint16_t *bias,
                 const uint16_t *res, uint16_t *y, int64_t n, int64_t p0, const char *pf, int64_t lines) {
    switch (np) {
    case 4: tile_n(x, nr, k, panel, bias, res, y, n, p0, pf, lines, 4); break;
    case 3: tile_n(x, nr, k, panel, bias, res, y, n, p0, pf, lines, 3); break;
    case 2: tile_n(x, nr, k, panel, bias, res, y, n, p0, pf, lines, 2); break;
    default: tile_n(x, nr, k, panel, bias, res, y, n, p0, pf, lines, 1);
    }
}

int kvlib_linear_bf16(const uint16_t *x, int64_t m, int64_t k, const uint16_t *wp, int64_t n, const uint16_t *bias,
                      const uint16_t *res, uint16_t *y, int n_threads) {
    if (m <= 0 || k <= 0 || k % 2 || n <= 0 || n_threads < 1) return -1;
    const int64_t panels = (n + 15) / 16;
    for (int64_t r0 = 0; r0 < m; r0 += RB) {
        const int64_t rows = m - r0 < RB ? m - r0 : RB, tiles = (rows + ROWS - 1) / ROWS;
#pragma omp parallel num_threads(n_threads)
        { /* each thread an even, contiguous share of the panels, in groups of PANELS and one narrower */
            const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
            const int64_t begin = panels * id / nt, end = panels * (id + 1) / nt;
            for (int64_t p = begin; p < end; p += PANELS) {
                const int64_t np = end - p < PANELS ? end - p : PANELS, after = p + np;
                /* the next group's panels, fetched while this one's tiles run: the weights stream
                   from memory while the products compute instead of before */
                const int64_t next = end - after < PANELS ? end - after : PANELS, lines = next * k * 32 / 64;
                const char *pf = (const char *)(wp + after * k * 16);
                int64_t r = r0;
                for (int64_t t = 0; t < tiles; t++) { /* as even as the rows allow: 26 rows are 5 x 4 + 2 x 3 */
                    const int64_t nr = rows / tiles + (t < rows % tiles);
                    const int64_t first = lines * t / tiles, count = lines * (t + 1) / tiles - first;
                    tile(x + r * k, nr, k, wp + p * k * 16, np, bias, res ? res + r * n : 0, y + r * n, n, p,
                         pf + first * 64, count);
                    r += nr;
                }
            }
        }
    }
    return 0;
}
