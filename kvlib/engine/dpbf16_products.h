/* The products of bf16_attn_kernel.c on an AVX-512 BF16 CPU without AMX: S = Q K^T and O += P V as
   VDPBF16PS dot products (each lane adds two bf16 products to a float32 sum) over the operand
   layouts that file prepares for AMX's tiles, rows ROW_ALIGN (4) at a time:
   - scores: lanes are 16 keys; row p of a 16-key block of w->kt holds each key's pair p, met by
     the query's pair p broadcast; 4 rows x up to 4 key blocks of sums held while the pairs pass;
   - values: lanes are 16 dims; pair i of w->vi interleaves value rows 2i and 2i + 1, met by the
     row's probability pair i broadcast; 4 rows x up to 4 dim groups of outputs held while the
     block's pairs pass.
   The sums' order differs from the tiles', within float32 rounding (tests: against float64, as
   SDPA). Needs no configuration or permission: tiles_on/off do nothing. */

#ifndef KVLIB_DPBF16_PRODUCTS_H
#define KVLIB_DPBF16_PRODUCTS_H

#define INLINE static inline __attribute__((always_inline))

static void tiles_on(void) {}

static void tiles_off(void) {}

INLINE __m512bh pair_of(const uint16_t *x) { return (__m512bh)_mm512_set1_epi32(*(const int32_t *)x); }

/* Scores of rows [g, g + 4) against key blocks [sb, sb + nb) (nb <= 4, a constant once inlined). */
INLINE void scores_tile(scratch_t *w, int64_t d, int64_t g, int64_t sb, const int nb) {
    const int64_t block = d / 32 * 512; /* uint16 per 16 keys' B operand */
    const uint16_t *kt = w->kt + sb * block, *qa = w->qa + g * d;
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < nb; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < d / 2; p++) {
        __m512bh b[4];
        for (int j = 0; j < nb; j++) b[j] = (__m512bh)_mm512_loadu_si512(kt + j * block + p * 32);
        for (int r = 0; r < 4; r++) {
            const __m512bh a = pair_of(qa + r * d + 2 * p);
            for (int j = 0; j < nb; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < nb; j++) _mm512_storeu_ps(w->s + (g + r) * BK + (sb + j) * 16, acc[r][j]);
}

static void scores(const attn16_t *a, scratch_t *w, int64_t rp, int64_t nk) {
    const int64_t blocks = (nk + 15) / 16;
    for (int64_t g = 0; g < rp; g += 4) {
        int64_t sb = 0;
        for (; sb + 4 <= blocks; sb += 4) scores_tile(w, a->d, g, sb, 4);
        for (; sb < blocks; sb++) scores_tile(w, a->d, g, sb, 1);
    }
}

/* O[g, g + 4) dims [c, c + 16 nc) += P V over `pairs` key pairs (nc <= 4, a constant once inlined). */
INLINE void values_tile(const scratch_t *w, int64_t d, int64_t g, int64_t c, const int nc, int64_t pairs, float *o) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < nc; j++) acc[r][j] = _mm512_loadu_ps(o + (g + r) * d + c + 16 * j);
    for (int64_t i = 0; i < pairs; i++) {
        __m512bh b[4];
        for (int j = 0; j < nc; j++) b[j] = (__m512bh)_mm512_loadu_si512(w->vi + (i * d + c + 16 * j) * 2);
        for (int r = 0; r < 4; r++) {
            const __m512bh p = pair_of(w->pb + (g + r) * BK + 2 * i);
            for (int j = 0; j < nc; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], p, b[j]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < nc; j++) _mm512_storeu_ps(o + (g + r) * d + c + 16 * j, acc[r][j]);
}

static void values(const attn16_t *a, scratch_t *w, int64_t rp, int64_t nk, float *o) {
    const int64_t d = a->d, pairs = (nk + 31) / 32 * 16; /* the probabilities are zero up to 32 keys */
    for (int64_t g = 0; g < rp; g += 4) {
        int64_t c = 0;
        for (; c + 64 <= d; c += 64) values_tile(w, d, g, c, 4, pairs, o);
        if (c < d) values_tile(w, d, g, c, 2, pairs, o); /* d is a multiple of 32 */
    }
}

#endif
