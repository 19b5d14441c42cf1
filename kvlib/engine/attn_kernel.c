/* Attention of T new float32 queries over a float32 KV cache (engine/attn_kernel.py). New token
   t, in every head, sees slots [0, last[t]]: past + t for a question behind `past` cached
   slots, its own slot for tokens recomputed in the middle of a prompt.

   Grouped-query: the G query heads of a KV head form one operand of G * T rows (t-major), so
   one pass over a block of keys serves all of them. Flash-style, per block of BK keys:
   - scores with keys down and query rows along the vector lanes (st[j][r] = k[j] . q[r], q
     scaled and transposed once per item), a 6-key x 16-row register tile over the head
     dimension that reads the keys where they lie in the cache;
   - an online softmax eight rows at a time (running maximum and sum per row; the slots a row
     may not see are -inf, then 0 after the exponential), in base 2: log2(e) is folded into the
     queries' scale, so each score takes exp2 (exp2_avx2.h); a row whose maximum did not move
     in a block keeps its outputs unscaled;
   - the probabilities times the block's values added to the rows' outputs (6 rows x 16 values
     a tile, the values read where they lie);
   at most 8 rows (decode's one token) take dot products over the head dimension for the scores.
   Work items are (KV head, block of at most RB rows, range of keys); the key ranges of a row
   block are merged at the end by their maxima and sums (attn_merge.h, as split-K flash decoding
   does), so few rows still spread over threads. Items run under OpenMP on torch's own worker threads
   (the libgomp torch loaded). */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attn_merge.h"
#include "exp2_avx2.h"

#define BK 96 /* keys per block */
#define RB 96 /* rows per row block, a multiple of 16 */

typedef struct {
    const float *q, *k, *v;
    int64_t q_hs, q_ts, k_hs, v_hs;
    const int64_t *last; /* per new token, the last slot it sees */
    int64_t group, t, d;
    float scale_log2; /* the scale times log2(e): scores in base 2 */
    int64_t row_blocks, splits, split_len;
    float *m, *l, *o; /* per item: RB maxima, RB sums, RB x d outputs */
} attn_t;

/* 2^x for x <= 0 (a score minus its row's maximum, in base 2: log2(e) is folded into the
   queries' scale); 0 below -126 and for -inf. */
static inline __m256 exp2_neg(__m256 x) {
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_LT_OQ), exp2_avx2(x));
}

/* st[j][r] = k[j] . qt[:, r] for the block's nk keys; qt [d x rp], st [BK x rp]. */
static void score_block(const float *qt, const float *k, float *st, int64_t nk, int64_t d, int64_t rp) {
    for (int64_t r = 0; r < rp; r += 16) {
        int64_t j = 0;
        for (; j + 6 <= nk; j += 6) {
            __m256 acc[6][2];
#pragma GCC unroll 6
            for (int i = 0; i < 6; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
            for (int64_t c = 0; c < d; c++) {
                const __m256 a0 = _mm256_loadu_ps(qt + c * rp + r), a1 = _mm256_loadu_ps(qt + c * rp + r + 8);
#pragma GCC unroll 6
                for (int i = 0; i < 6; i++) {
                    const __m256 b = _mm256_broadcast_ss(k + (j + i) * d + c);
                    acc[i][0] = _mm256_fmadd_ps(b, a0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(b, a1, acc[i][1]);
                }
            }
#pragma GCC unroll 6
            for (int i = 0; i < 6; i++) {
                _mm256_storeu_ps(st + (j + i) * rp + r, acc[i][0]);
                _mm256_storeu_ps(st + (j + i) * rp + r + 8, acc[i][1]);
            }
        }
        for (; j < nk; j++) {
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
            for (int64_t c = 0; c < d; c++) {
                const __m256 b = _mm256_broadcast_ss(k + j * d + c);
                acc0 = _mm256_fmadd_ps(b, _mm256_loadu_ps(qt + c * rp + r), acc0);
                acc1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(qt + c * rp + r + 8), acc1);
            }
            _mm256_storeu_ps(st + j * rp + r, acc0);
            _mm256_storeu_ps(st + j * rp + r + 8, acc1);
        }
    }
}

/* The same scores for at most 8 rows (one new token: decode), as dot products over the head
   dimension, four keys at a time; qs [rows x d] row-major, st [BK x 8]. */
static void score_few(const float *qs, int64_t nrows, const float *k, float *st, int64_t nk, int64_t d) {
    int64_t j = 0;
    for (; j + 4 <= nk; j += 4)
        for (int64_t r = 0; r < 8; r++) {
            if (r >= nrows) {
                for (int i = 0; i < 4; i++) st[(j + i) * 8 + r] = 0.0f;
                continue;
            }
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t c = 0; c < d; c += 8) {
                const __m256 q = _mm256_loadu_ps(qs + r * d + c);
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) acc[i] = _mm256_fmadd_ps(q, _mm256_loadu_ps(k + (j + i) * d + c), acc[i]);
            }
            const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
            float sums[4];
            _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1)));
            for (int i = 0; i < 4; i++) st[(j + i) * 8 + r] = sums[i];
        }
    for (; j < nk; j++)
        for (int64_t r = 0; r < 8; r++) {
            float sum = 0.0f;
            for (int64_t c = 0; r < nrows && c < d; c++) sum += qs[r * d + c] * k[j * d + c];
            st[j * 8 + r] = sum;
        }
}

/* o[r][:] += sum_j pt[j][r] * v[j][:] over the block's nk keys, in tiles of 6 rows (the last one
   short: its missing rows repeat the first and are not stored); pt rows rp apart. */
static void value_block(const float *pt, const float *v, float *o, int64_t nk, int64_t d, int64_t rp,
                        int64_t nrows) {
    for (int64_t r = 0; r < nrows;) { /* padding rows (their probabilities are 0) are skipped */
        const int nr = nrows - r < 6 ? (int)(nrows - r) : 6;
        for (int64_t c = 0; c < d; c += 16) {
            __m256 acc[6][2];
#pragma GCC unroll 6
            for (int i = 0; i < 6; i++) {
                const int64_t row = r + (i < nr ? i : 0);
                acc[i][0] = _mm256_loadu_ps(o + row * d + c);
                acc[i][1] = _mm256_loadu_ps(o + row * d + c + 8);
            }
            for (int64_t j = 0; j < nk; j++) {
                const __m256 v0 = _mm256_loadu_ps(v + j * d + c), v1 = _mm256_loadu_ps(v + j * d + c + 8);
                const float *p = pt + j * rp + r;
#pragma GCC unroll 6
                for (int i = 0; i < 6; i++) {
                    const __m256 b = _mm256_broadcast_ss(p + (i < nr ? i : 0));
                    acc[i][0] = _mm256_fmadd_ps(b, v0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(b, v1, acc[i][1]);
                }
            }
#pragma GCC unroll 6
            for (int i = 0; i < 6; i++)
                if (i < nr) {
                    _mm256_storeu_ps(o + (r + i) * d + c, acc[i][0]);
                    _mm256_storeu_ps(o + (r + i) * d + c + 8, acc[i][1]);
                }
        }
        r += nr;
    }
}

/* The online softmax over one block, eight rows at a time. Where `masked`, slot kb + j beyond a
   row's last (lim) scores -inf. Maxima m, sums l and outputs o are carried over from the blocks
   before; scores become probabilities in place. */
static void softmax_block(float *st, int64_t nk, int64_t kb, int masked, const float *lim, float *m, float *l,
                          float *o, int64_t d, int64_t rp) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    for (int64_t r = 0; r < rp; r += 8) {
        const __m256 limit = _mm256_loadu_ps(lim + r);
        __m256 mx = _mm256_loadu_ps(m + r);
        for (int64_t j = 0; j < nk; j++) {
            __m256 s = _mm256_loadu_ps(st + j * rp + r);
            if (masked) {
                s = _mm256_blendv_ps(s, ninf, _mm256_cmp_ps(_mm256_set1_ps((float)(kb + j)), limit, _CMP_GT_OQ));
                _mm256_storeu_ps(st + j * rp + r, s);
            }
            mx = _mm256_max_ps(mx, s);
        }
        const __m256 base = _mm256_blendv_ps(mx, _mm256_setzero_ps(), _mm256_cmp_ps(mx, ninf, _CMP_EQ_OQ));
        const __m256 before = _mm256_loadu_ps(m + r);
        const __m256 corr = exp2_neg(_mm256_sub_ps(before, base)); /* 0 before any slot */
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < nk; j++) {
            const __m256 p = exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(st + j * rp + r), base));
            _mm256_storeu_ps(st + j * rp + r, p);
            sum = _mm256_add_ps(sum, p);
        }
        _mm256_storeu_ps(l + r, _mm256_fmadd_ps(_mm256_loadu_ps(l + r), corr, sum));
        _mm256_storeu_ps(m + r, mx);
        /* rows whose maximum moved rescale their outputs; past the first blocks few do (a factor
           of exactly 1 would change nothing) */
        const int moved = ~_mm256_movemask_ps(_mm256_cmp_ps(mx, before, _CMP_EQ_OQ)) & 0xff;
        if (!moved) continue;
        float factor[8];
        _mm256_storeu_ps(factor, corr);
        for (int i = 0; i < 8; i++) {
            if (!(moved >> i & 1)) continue;
            const __m256 f = _mm256_set1_ps(factor[i]);
            for (int64_t c = 0; c < d; c += 8)
                _mm256_storeu_ps(o + (r + i) * d + c, _mm256_mul_ps(_mm256_loadu_ps(o + (r + i) * d + c), f));
        }
    }
}

/* Rows of a row block: query row r0 + r is head (r0 + r) % group of the KV head, token (r0 + r) / group. */
static void load_rows(const attn_t *a, int64_t kv, int64_t r0, int64_t nrows, int64_t rp, float *qt, float *lim,
                      float *m, float *l, float *o) {
    const int64_t d = a->d;
    memset(qt, 0, d * rp * sizeof(float));
    memset(o, 0, rp * d * sizeof(float));
    for (int64_t r = 0; r < rp; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        lim[r] = -1.0f; /* padding rows see nothing */
        if (r >= nrows) continue;
        const int64_t t = (r0 + r) / a->group, h = kv * a->group + (r0 + r) % a->group;
        const float *src = a->q + h * a->q_hs + t * a->q_ts;
        lim[r] = (float)a->last[t];
        for (int64_t c = 0; c < d; c++) qt[c * rp + r] = src[c] * a->scale_log2;
        if (rp == 8) /* the few-row path reads rows: qs after qt */
            for (int64_t c = 0; c < d; c++) qt[8 * d + r * d + c] = src[c] * a->scale_log2;
    }
}

static void run_item(const attn_t *a, int64_t item, float *qt, float *st, float *lim) {
    const int64_t d = a->d, rows_all = a->group * a->t;
    const int64_t split = item % a->splits, rb = (item / a->splits) % a->row_blocks;
    const int64_t kv = item / (a->splits * a->row_blocks);
    const int64_t r0 = rb * RB, nrows = rows_all - r0 < RB ? rows_all - r0 : RB;
    const int64_t rp = nrows <= 8 ? 8 : (nrows + 15) / 16 * 16;
    float *m = a->m + item * RB, *l = a->l + item * RB, *o = a->o + item * RB * d;
    load_rows(a, kv, r0, nrows, rp, qt, lim, m, l, o);
    const float *k = a->k + kv * a->k_hs, *v = a->v + kv * a->v_hs;
    int64_t lowest = a->last[r0 / a->group], highest = lowest;
    for (int64_t t = r0 / a->group; t <= (r0 + nrows - 1) / a->group; t++) {
        lowest = a->last[t] < lowest ? a->last[t] : lowest;
        highest = a->last[t] > highest ? a->last[t] : highest;
    }
    const int64_t k_begin = split * a->split_len;
    int64_t k_end = k_begin + a->split_len;
    if (k_end > highest + 1) k_end = highest + 1;
    for (int64_t kb = k_begin; kb < k_end; kb += BK) {
        const int64_t nk = k_end - kb < BK ? k_end - kb : BK;
        if (rp == 8)
            score_few(qt + 8 * d, nrows, k + kb * d, st, nk, d);
        else
            score_block(qt, k + kb * d, st, nk, d, rp);
        softmax_block(st, nk, kb, kb + nk - 1 > lowest, lim, m, l, o, d, rp);
        value_block(st, v + kb * d, o, nk, d, rp, nrows);
    }
}

int kvlib_attend_f32(const float *q, int64_t q_hs, int64_t q_ts, const float *k, int64_t k_hs, const float *v,
                     int64_t v_hs, float *out, int64_t o_hs, int64_t o_ts, int64_t n_heads, int64_t n_kv, int64_t t,
                     const int64_t *last, int64_t d, float scale, int n_threads) {
    if (d % 16 || n_kv <= 0 || n_heads % n_kv || t <= 0 || n_threads < 1) return -1;
    const int64_t slots = slots_seen(last, t);
    if (slots < 0) return -1;
    const float scale_log2 = scale * 1.44269504088896341f;
    attn_t a = {q, k, v, q_hs, q_ts, k_hs, v_hs, last, n_heads / n_kv, t, d, scale_log2, 0, 1, 0, 0, 0, 0};
    const int64_t rows_all = a.group * t;
    const int64_t items =
        plan_items(n_kv, rows_all, RB, slots, 2 * n_threads, BK, &a.row_blocks, &a.splits, &a.split_len);
    a.m = malloc(items * RB * sizeof(float));
    a.l = malloc(items * RB * sizeof(float));
    a.o = malloc(items * RB * d * sizeof(float));
    float *scratch = malloc((size_t)n_threads * (RB * d + BK * RB + RB) * sizeof(float));
    if (!a.m || !a.l || !a.o || !scratch) {
        free(a.m), free(a.l), free(a.o), free(scratch);
        return -2;
    }
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t item = 0; item < items; item++) {
        float *qt = scratch + (size_t)omp_get_thread_num() * (RB * d + BK * RB + RB);
        run_item(&a, item, qt, qt + RB * d, qt + RB * d + BK * RB);
    }
    const partials_t parts = {a.m, a.l, a.o, RB, a.splits, a.row_blocks, a.group, rows_all, d};
    write_rows(&parts, n_kv, out, o_hs, o_ts);
    free(a.m), free(a.l), free(a.o), free(scratch);
    return 0;
}
