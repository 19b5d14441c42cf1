/* A block of keys for bf16_attn_kernel.c on an AVX-512 BF16 CPU without AMX, as VDPBF16PS dot
   products (each lane adds two bf16 products to a float32 sum), with the query rows in the lanes:
   - scores transposed, S^T = K Q^T: lanes are 16 rows; w->qt[p] holds the rows' pair p (the row block's
     queries transposed once per item, in registers), met by a key's pair p broadcast straight from the
     cache: no layout of the keys is built at all (the tiles' layout cost a transpose of every key);
   - the online softmax runs sixteen rows at a time down the keys (maxima, sums and rescaling per lane,
     no reduction across lanes); the probabilities are rounded to bf16 as before and stored as pairs of
     keys per row (w->pb as [BK/2][RB] of 32 bits: keys 2i and 2i + 1 of row r);
   - values: O += P V with lanes the 16 dims, the row's probability pair broadcast, w->vi as before.
   The products are the same per score as the tiles' (the same pairs summed in the same order); the
   sums of the probabilities are added in another order, within float32 rounding (tests: against
   float64, as SDPA). Needs no configuration or permission: tiles_on/off do nothing. */

#ifndef KVLIB_DPBF16_PRODUCTS_H
#define KVLIB_DPBF16_PRODUCTS_H

#define INLINE static inline __attribute__((always_inline))

static void tiles_on(void) {}

static void tiles_off(void) {}

INLINE __m512bh pair_at(const void *x) { return (__m512bh)_mm512_set1_epi32(*(const int32_t *)x); }

/* Rows of a row block are padded to a multiple of this (load_rows): 16 where the rows fill lanes. */
static inline int64_t row_align(int64_t rows) { return rows >= 16 ? 16 : 4; }

static inline int rows_in_lanes(int64_t rp) { return rp >= 16 && rp % 16 == 0; }

/* The row block's queries (w->qa, rp rows, a multiple of 16) as w->qt: [d/2 pairs][RB rows] of 32 bits. */
static void prepare_rows(scratch_t *w, int64_t rp, int64_t d) {
    if (!rows_in_lanes(rp)) return;
    const int32_t *qa = (const int32_t *)w->qa;
    int32_t *qt = (int32_t *)w->qt;
    for (int64_t g = 0; g < rp; g += 16)
        for (int64_t pc = 0; pc < d / 2; pc += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(qa + (g + i) * (d / 2) + pc);
            transpose16(r);
            for (int p = 0; p < 16; p++) _mm512_storeu_si512(qt + (pc + p) * RB + g, r[p]);
        }
}

/* S^T rows j0 .. j0 + nj - 1 (keys k[j]) for row groups g0 .. g0 + ng - 1 (nj <= 4, ng <= 3: constants
   once inlined). */
INLINE void scores_tile(const uint16_t *k, int64_t d, const int32_t *qt, float *st, int64_t j0, const int nj,
                        int64_t g0, const int ng) {
    __m512 acc[4][3];
    for (int j = 0; j < nj; j++)
        for (int g = 0; g < ng; g++) acc[j][g] = _mm512_setzero_ps();
    for (int64_t p = 0; p < d / 2; p++) {
        __m512bh q[3];
        for (int g = 0; g < ng; g++) q[g] = (__m512bh)_mm512_loadu_si512(qt + p * RB + (g0 + g) * 16);
        for (int j = 0; j < nj; j++) {
            const __m512bh key = pair_at(k + (j0 + j) * d + 2 * p);
            for (int g = 0; g < ng; g++) acc[j][g] = _mm512_dpbf16_ps(acc[j][g], key, q[g]);
        }
    }
    for (int j = 0; j < nj; j++)
        for (int g = 0; g < ng; g++) _mm512_storeu_ps(st + (j0 + j) * RB + (g0 + g) * 16, acc[j][g]);
}

INLINE void scores_keys(const uint16_t *k, int64_t d, const int32_t *qt, float *st, int64_t j0, const int nj,
                        int64_t groups) {
    int64_t g = 0;
    for (; g + 3 <= groups; g += 3) scores_tile(k, d, qt, st, j0, nj, g, 3);
    if (groups - g == 2) scores_tile(k, d, qt, st, j0, nj, g, 2);
    if (groups - g == 1) scores_tile(k, d, qt, st, j0, nj, g, 1);
}

/* Row pairs (e0: key 2i, e1: key 2i + 1) of probabilities rounded to bf16, as 32-bit lanes. */
INLINE __m512i bf16_pairs(__m512 e0, __m512 e1) {
    const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(e0));
    const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(e1));
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

/* Whether key kb + j is one row's to see, per lane; every lane where all_in (a constant once inlined). */
INLINE __mmask16 seen(__m512 lim, int64_t key, const int all_in) {
    return all_in ? (__mmask16)0xffff : _mm512_cmp_ps_mask(_mm512_set1_ps((float)key), lim, _CMP_LE_OQ);
}

/* Sixteen rows' probabilities for keys [kb, kb + nk): those a row sees (key <= its last slot) as
   exp2(score * scale log2 e - the row's running maximum), else 0; maxima, sums and outputs carried over.
   A block every real row sees whole (all but the causal corner's) skips the per-key masks: padding rows
   (last slot -1) then compute finite values of zero queries, which nothing reads. */
INLINE void softmax_lanes(const attn16_t *a, scratch_t *w, int64_t g, int64_t kb, int64_t nk, float *m, float *l,
                          float *o, const int all_in) {
    const float *st = w->s + g * 16;
    int32_t *pt = (int32_t *)w->pb + g * 16;
    const __m512 lim = _mm512_loadu_ps(w->lim + g * 16), sl = _mm512_set1_ps(a->scale_log2);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 mx = ninf;
    for (int64_t j = 0; j < nk; j++) mx = _mm512_mask_max_ps(mx, seen(lim, kb + j, all_in), mx, _mm512_loadu_ps(st + j * RB));
    const __m512 before = _mm512_loadu_ps(m + g * 16), top = _mm512_max_ps(before, _mm512_mul_ps(mx, sl));
    const __mmask16 moved = _mm512_cmp_ps_mask(top, before, _CMP_NEQ_OQ) & _mm512_cmp_ps_mask(before, ninf, _CMP_NEQ_OQ);
    const __m512 corr = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), moved, exp2_neg16(_mm512_sub_ps(before, top)));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < nk; j += 2) {
        __m512 e[2];
        for (int i = 0; i < 2; i++) {
            const __mmask16 in = j + i < nk ? seen(lim, kb + j + i, all_in) : 0;
            e[i] = _mm512_maskz_mov_ps(in, exp2_neg16(_mm512_fmsub_ps(_mm512_loadu_ps(st + (j + i) * RB), sl, top)));
            sum = _mm512_add_ps(sum, e[i]);
        }
        _mm512_storeu_si512(pt + j / 2 * RB, bf16_pairs(e[0], e[1]));
    }
    for (int64_t j = (nk + 1) / 2 * 2; j < (nk + 31) / 32 * 32; j += 2) /* pairs values() reads: zero */
        _mm512_storeu_si512(pt + j / 2 * RB, _mm512_setzero_si512());
    _mm512_storeu_ps(l + g * 16, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(l + g * 16), corr), sum));
    _mm512_storeu_ps(m + g * 16, top);
    float f[16];
    _mm512_storeu_ps(f, corr);
    for (int r = 0; r < 16; r++)
        if (moved >> r & 1)
            for (int64_t c = 0; c < a->d; c += 16) {
                float *row = o + (g * 16 + r) * a->d + c;
                _mm512_storeu_ps(row, _mm512_mul_ps(_mm512_loadu_ps(row), _mm512_set1_ps(f[r])));
            }
}

static void softmax_group(const attn16_t *a, scratch_t *w, int64_t g, int64_t kb, int64_t nk, float *m, float *l,
                          float *o) {
    const __m512 lim = _mm512_loadu_ps(w->lim + g * 16);
    const __mmask16 real = _mm512_cmp_ps_mask(lim, _mm512_setzero_ps(), _CMP_GE_OQ);
    if (real && (float)(kb + nk - 1) <= _mm512_mask_reduce_min_ps(real, lim))
        softmax_lanes(a, w, g, kb, nk, m, l, o, 1);
    else
        softmax_lanes(a, w, g, kb, nk, m, l, o, 0);
}

/* O[g, g + 4) dims [c, c + 16 nc) += P V over `pairs` key pairs (nc <= 4, a constant once inlined); row r's
   pair i of probabilities is w->pb's 32-bit element i * ps + r * rs (rows in lanes: ps RB, rs 1; keys in
   lanes, row-major: ps 1, rs BK / 2). */
INLINE void values_tile(const scratch_t *w, int64_t d, int64_t g, int64_t c, const int nc, int64_t pairs, int64_t ps,
                        int64_t rs, float *o) {
    const int32_t *pt = (const int32_t *)w->pb;
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < nc; j++) acc[r][j] = _mm512_loadu_ps(o + (g + r) * d + c + 16 * j);
    for (int64_t i = 0; i < pairs; i++) {
        __m512bh b[4];
        for (int j = 0; j < nc; j++) b[j] = (__m512bh)_mm512_loadu_si512(w->vi + (i * d + c + 16 * j) * 2);
        for (int r = 0; r < 4; r++) {
            const __m512bh p = pair_at(pt + i * ps + (g + r) * rs);
            for (int j = 0; j < nc; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], p, b[j]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < nc; j++) _mm512_storeu_ps(o + (g + r) * d + c + 16 * j, acc[r][j]);
}

/* With keys in the lanes instead (fewer than 16 rows: a decode step's few query heads, where rows in
   lanes would leave most lanes empty): the tiles' layouts (keys_to_b, w->pb row-major), 4 rows at a time. */
/* Scores of rows [g, g + 4) against key blocks [sb, sb + nb) (nb <= 4, a constant once inlined). */
INLINE void key_scores_tile(scratch_t *w, int64_t d, int64_t g, int64_t sb, const int nb) {
    const int64_t block = d / 32 * 512; /* uint16 per 16 keys' B operand */
    const uint16_t *kt = w->kt + sb * block, *qa = w->qa + g * d;
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < nb; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < d / 2; p++) {
        __m512bh b[4];
        for (int j = 0; j < nb; j++) b[j] = (__m512bh)_mm512_loadu_si512(kt + j * block + p * 32);
        for (int r = 0; r < 4; r++) {
            const __m512bh a = pair_at(qa + r * d + 2 * p);
            for (int j = 0; j < nb; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < nb; j++) _mm512_storeu_ps(w->s + (g + r) * BK + (sb + j) * 16, acc[r][j]);
}

static void key_scores(const attn16_t *a, scratch_t *w, int64_t rp, int64_t nk) {
    const int64_t blocks = (nk + 15) / 16;
    for (int64_t g = 0; g < rp; g += 4) {
        int64_t sb = 0;
        for (; sb + 4 <= blocks; sb += 4) key_scores_tile(w, a->d, g, sb, 4);
        for (; sb < blocks; sb++) key_scores_tile(w, a->d, g, sb, 1);
    }
}

static void values(const attn16_t *a, scratch_t *w, int64_t rp, int64_t nk, int64_t ps, int64_t rs, float *o) {
    const int64_t d = a->d, pairs = (nk + 31) / 32 * 16; /* the probabilities are zero up to 32 keys */
    const int64_t rows = w->live < rp ? w->live : rp; /* padding rows past the last 4 real ones: never read */
    for (int64_t g = 0; g < rows; g += 4) {
        int64_t c = 0;
        for (; c + 64 <= d; c += 64) values_tile(w, d, g, c, 4, pairs, ps, rs, o);
        if (c < d) values_tile(w, d, g, c, 2, pairs, ps, rs, o); /* d is a multiple of 32 */
    }
}

/* One block of nk keys (k: the block's first; w->vi: its values' pairs) for the rp rows. */
static void block(const attn16_t *a, scratch_t *w, const uint16_t *k, int64_t kb, int64_t nk, int64_t rp, float *m,
                  float *l, float *o) {
    if (!rows_in_lanes(rp)) {
        keys_to_b(k, nk, a->d, w->kt);
        key_scores(a, w, rp, nk);
        for (int64_t r = 0; r < rp; r++) softmax_row(a, w, r, kb, nk, m, l, o);
        values(a, w, rp, nk, 1, BK / 2, o);
        return;
    }
    const int64_t d = a->d, groups = rp / 16;
    int64_t j = 0;
    for (; j + 4 <= nk; j += 4) scores_keys(k, d, (const int32_t *)w->qt, w->s, j, 4, groups);
    for (; j < nk; j++) scores_keys(k, d, (const int32_t *)w->qt, w->s, j, 1, groups);
    for (int64_t g = 0; g < groups; g++) softmax_group(a, w, g, kb, nk, m, l, o);
    values(a, w, rp, nk, RB, 1, o);
}

#endif
