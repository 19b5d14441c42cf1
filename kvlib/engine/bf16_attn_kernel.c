/* Attention of a few bf16 queries behind a long bf16 past (engine/attn_kernel.py), built twice:
   with AMX (-mamx-tile: the products on tiles) and without it for AVX-512 BF16 CPUs (the same
   products as VDPBF16PS dot products on sixteen lanes). They share everything but the products
   (amx_products.h, dpbf16_products.h) and, with 16 rows or more, the dot products' layout (below).

   New token t, in every head, sees slots [0, last[t]]. The G query heads of a KV head form one
   operand of G * T rows (t-major, as attn_kernel.c), in row blocks of at most RB; each work item
   is (KV head, row block, range of keys), its ranges merged at the end by their maxima and sums
   (attn_merge.h).
   Per block of BK keys:
   - scores S = Q K^T (bf16 products summed in float32, exact products), the keys' 32-bit pairs
     transposed 16 keys at a time into the layout a tile's B operand takes (in registers, from the
     cache, where they lie: 4.8 ms fewer over 30 layers at 4k than per-pair gathers): row p of 16
     keys' block holds each key's pair p, what one dot product instruction takes beside a query's
     pair p broadcast;
   - an online softmax per row in base 2 (scale and log2 e applied to the float32 scores), the
     probabilities rounded once to bf16 to meet the values (as SDPA's CPU kernel does);
   - O += P V, the values' row pairs interleaved into the B layout per block.
   That is the layout of both builds for fewer than 16 rows; with more, the dot products' build puts 16
   rows in the lanes instead and reads each key's pairs straight from the cache (dpbf16_products.h: no
   layout of the keys built, the softmax down the keys sixteen rows at a time; 30.1 -> 27.1 ms for 30
   layers of 25 queries over 4k slots). Each products header gives row_align (rows padded to it),
   prepare_rows (per item) and block (per block of keys).
   Outputs are float32, divided by the sums at the end. Tiles need the process's permission
   (arch_prctl XCOMP_PERM, kvlib_amx_permit) and each thread's own configuration (set in each
   OpenMP worker before it runs items, released after). */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attn_merge.h"
#include "exp2_avx2.h"

#define BK 128 /* keys per block */
#define RB 96  /* rows per row block: six groups of 16 */
#define DMAX 256

typedef struct {
    const uint16_t *q, *k, *v;
    int64_t q_hs, q_ts, k_hs, v_hs;
    const int64_t *last;
    int64_t group, t, d;
    float scale_log2;
    int64_t row_blocks, splits, split_len, blocks; /* blocks: of BK keys over the slots seen */
    float *m, *l, *o; /* per item: RB maxima, RB sums, RB x d outputs */
} attn16_t;

typedef struct {
    uint16_t *qa; /* [RB x d] the row block's queries */
    uint16_t *kt; /* [BK/16][d/32][16 pairs x 16 keys x 2] */
    float *s;     /* [RB x BK] scores */
    uint16_t *pb; /* [RB x BK] probabilities, bf16 (dot products: [BK/2][RB] pairs of keys per row) */
    uint16_t *vi; /* [BK/2 pairs][d][2] values, row pairs interleaved */
    float *lim;   /* [RB] each row's last slot */
    uint16_t *qt; /* [d/2][RB x 2] the row block's queries, pairs transposed (dot products) */
    int64_t live; /* the item's real rows rounded up to 4: the rows whose outputs are read */
} scratch_t;

/* 2^x for x <= 0 (a score minus its row's maximum, in base 2), 0 below -126 and for -inf: exp2_avx512's
   polynomial and rounding, its clamps left out (x never exceeds 126, and below -126 the lane is zeroed) and
   2^n applied by VSCALEFPS instead of building it in the exponent bits: the same values for every x in
   [-126, 126] (both scale y exactly by a power of two, correctly rounded), five operations fewer. A NaN
   score stays NaN (the clamps made it 2^-126). */
static inline __m512 exp2_neg16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 y = _mm512_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 7; i++) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(EXP2_POLY[i]));
    return _mm512_maskz_scalef_ps(~_mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_LT_OQ), y, n);
}

static inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u); }

/* r[0..15] (rows of sixteen 32-bit elements) transposed in registers: r[c] becomes column c. Two
   interleaves leave, in 128-bit lane L of r[4i + j], column 4L + j of rows 4i .. 4i + 3; two 128-bit
   shuffles then gather each column's four lanes. */
static inline void transpose16(__m512i r[16]) {
    __m512i a[16];
    for (int i = 0; i < 8; i++) {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        const __m512i u0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), u1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xee);
        const __m512i u2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
        const __m512i u3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xee);
        a[j] = _mm512_shuffle_i32x4(u0, u2, 0x88), a[4 + j] = _mm512_shuffle_i32x4(u0, u2, 0xdd);
        a[8 + j] = _mm512_shuffle_i32x4(u1, u3, 0x88), a[12 + j] = _mm512_shuffle_i32x4(u1, u3, 0xdd);
    }
    for (int c = 0; c < 16; c++) r[c] = a[c];
}

/* Keys [kb, kb + nk) (nk <= BK) as the B operand of S = Q K^T: for each 16 keys and 32 dims, a
   [16 pairs x 16 keys] matrix of 32-bit (two bf16) elements, the keys' rows transposed in registers;
   keys past nk are zero. */
static void keys_to_b(const uint16_t *k, int64_t nk, int64_t d, uint16_t *kt) {
    const int64_t chunks = d / 32;
    for (int64_t sb = 0; sb * 16 < nk; sb++)
        for (int64_t ch = 0; ch < chunks; ch++) {
            __m512i r[16];
            for (int n = 0; n < 16; n++)
                r[n] = sb * 16 + n < nk ? _mm512_loadu_si512(k + (sb * 16 + n) * d + ch * 32) : _mm512_setzero_si512();
            transpose16(r);
            for (int p = 0; p < 16; p++) _mm512_storeu_si512(kt + ((sb * chunks + ch) * 16 + p) * 32, r[p]);
        }
}

/* Values [kb, kb + nk) as the B operand of O += P V: row pairs (2i, 2i + 1) interleaved per dim. */
static void values_to_b(const uint16_t *v, int64_t nk, int64_t d, uint16_t *vi) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t i = 0; i < BK / 2; i++)
        for (int64_t c = 0; c < d; c += 32) {
            const __m512i a = 2 * i < nk ? _mm512_loadu_si512(v + 2 * i * d + c) : _mm512_setzero_si512();
            const __m512i b = 2 * i + 1 < nk ? _mm512_loadu_si512(v + (2 * i + 1) * d + c) : _mm512_setzero_si512();
            _mm512_storeu_si512(vi + (i * d + c) * 2, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(vi + (i * d + c) * 2 + 32, _mm512_permutex2var_epi16(a, hi, b));
        }
}

/* The online softmax of one block for row r: scores to bf16 probabilities (0 past the keys the row
   sees, up to the block's keys rounded to 32, what values() reads), the row's maximum, sum and
   outputs carried over. */
static void softmax_row(const attn16_t *a, scratch_t *w, int64_t r, int64_t kb, int64_t nk, float *m, float *l,
                        float *o) {
    const float *s = w->s + r * BK;
    uint16_t *p = w->pb + r * BK;
    const int64_t seen = (int64_t)w->lim[r] - kb + 1, padded = (nk + 31) / 32 * 32;
    const int64_t n = seen < nk ? (seen < 0 ? 0 : seen) : nk; /* keys of the block the row sees */
    if (n == 0) {
        memset(p, 0, padded * sizeof(uint16_t));
        return;
    }
    const __m512 sl = _mm512_set1_ps(a->scale_log2);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
    if (j < n) vmax = _mm512_mask_max_ps(vmax, first_lanes(n - j), vmax, _mm512_loadu_ps(s + j));
    const float before = m[r], top_new = _mm512_reduce_max_ps(vmax) * a->scale_log2;
    const float top = top_new > before ? top_new : before;
    const __m512 base = _mm512_set1_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (j = 0; j < padded; j += 16) {
        const __mmask16 in = j >= n ? 0 : first_lanes(n - j);
        const __m512 e = _mm512_maskz_mov_ps(in, exp2_neg16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), sl, base)));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256((__m256i *)(p + j), (__m256i)_mm512_cvtneps_pbh(e));
    }
    const float total = _mm512_reduce_add_ps(sum);
    if (top == before) { /* the maximum did not move: nothing to rescale */
        l[r] += total;
        return;
    }
    const float corr = before == -INFINITY ? 0.0f : exp2f(before - top);
    l[r] = l[r] * corr + total;
    m[r] = top;
    if (before != -INFINITY) {
        const __m512 f = _mm512_set1_ps(corr);
        for (int64_t c = 0; c < a->d; c += 16)
            _mm512_storeu_ps(o + r * a->d + c, _mm512_mul_ps(_mm512_loadu_ps(o + r * a->d + c), f));
    }
}

/* Rows of a row block: query row r0 + r is head (r0 + r) % group of the KV head, token (r0 + r) / group. */
static void load_rows(const attn16_t *a, int64_t kv, int64_t r0, int64_t nrows, int64_t rp, scratch_t *w, float *m,
                      float *l, float *o) {
    const int64_t d = a->d;
    memset(o, 0, rp * d * sizeof(float));
    for (int64_t r = 0; r < rp; r++) {
        m[r] = -INFINITY, l[r] = 0.0f, w->lim[r] = -1.0f; /* padding rows see nothing */
        if (r >= nrows) {
            memset(w->qa + r * d, 0, d * sizeof(uint16_t));
            continue;
        }
        const int64_t t = (r0 + r) / a->group, h = kv * a->group + (r0 + r) % a->group;
        memcpy(w->qa + r * d, a->q + h * a->q_hs + t * a->q_ts, d * sizeof(uint16_t));
        w->lim[r] = (float)a->last[t];
    }
}

#ifdef __AMX_TILE__
#include "amx_products.h"
#else
#include "dpbf16_products.h"
#endif

/* The keys and values of the next block, fetched into L2 while this one computes. With few rows (a decode
   step's 3 a KV head) a block's products are short beside the time its 64 KB take to come from memory one
   demand miss at a time: 30 layers of one token over 4k slots 9.01 -> 7.83 ms (in-process A/B; two or four
   blocks ahead 8.04 / 8.20). A question's 75 rows compute long enough that it cost there (29.5 -> 30.2). */
static inline void fetch_ahead(const uint16_t *k, const uint16_t *v, int64_t kb, int64_t k_end, int64_t d) {
    const int64_t end = kb + BK < k_end ? kb + BK : k_end;
    for (int64_t j = kb; j < end; j++)
        for (int64_t c = 0; c < d; c += 32) {
            _mm_prefetch((const char *)(k + j * d + c), _MM_HINT_T1);
            _mm_prefetch((const char *)(v + j * d + c), _MM_HINT_T1);
        }
}

static void run_item(const attn16_t *a, int64_t item, scratch_t *w) {
    const int64_t d = a->d, rows_all = a->group * a->t;
    const int64_t split = item % a->splits, rb = (item / a->splits) % a->row_blocks;
    const int64_t kv = item / (a->splits * a->row_blocks);
    const int64_t r0 = rb * RB, nrows = rows_all - r0 < RB ? rows_all - r0 : RB;
    const int64_t align = row_align(nrows), rp = (nrows + align - 1) / align * align;
    float *m = a->m + item * RB, *l = a->l + item * RB, *o = a->o + item * RB * d;
    load_rows(a, kv, r0, nrows, rp, w, m, l, o);
    w->live = (nrows + 3) / 4 * 4;
    int64_t highest = 0;
    for (int64_t t = r0 / a->group; t <= (r0 + nrows - 1) / a->group; t++)
        highest = a->last[t] > highest ? a->last[t] : highest;
    /* the split's share of the blocks, as even as whole blocks allow (9 8 8 8 of 33, not plan_items' 9 9 9 6):
       a thread's items then hold as many keys as the other's (an idle thread was 7% of a question's profile) */
    const int64_t k_begin = split * a->blocks / a->splits * BK, split_end = (split + 1) * a->blocks / a->splits * BK;
    const int64_t k_end = split_end < highest + 1 ? split_end : highest + 1;
    const uint16_t *k = a->k + kv * a->k_hs, *v = a->v + kv * a->v_hs;
    prepare_rows(w, rp, d);
    for (int64_t kb = k_begin; kb < k_end; kb += BK) {
        const int64_t nk = k_end - kb < BK ? k_end - kb : BK;
        if (rp < 16) fetch_ahead(k, v, kb + BK, k_end, d); /* few rows (decode): see fetch_ahead */
        values_to_b(v + kb * d, nk, d, w->vi);
        block(a, w, k + kb * d, kb, nk, rp, m, l, o);
    }
}

static int alloc_scratch(scratch_t *w, int64_t d) {
    const size_t sizes[7] = {RB * d * 2, BK * d * 2, RB * BK * 4, RB * BK * 2, BK * d * 2, RB * 4, RB * d * 2};
    void *p[7];
    for (int i = 0; i < 7; i++) {
        p[i] = aligned_alloc(64, (sizes[i] + 63) / 64 * 64);
        if (!p[i]) {
            for (int j = 0; j < i; j++) free(p[j]);
            return -1;
        }
    }
    *w = (scratch_t){p[0], p[1], p[2], p[3], p[4], p[5], p[6], 0};
    return 0;
}

static void free_scratch(scratch_t *w) {
    free(w->qa), free(w->kt), free(w->s), free(w->pb), free(w->vi), free(w->lim), free(w->qt);
}

int kvlib_attend_bf16(const uint16_t *q, int64_t q_hs, int64_t q_ts, const uint16_t *k, int64_t k_hs,
                          const uint16_t *v, int64_t v_hs, float *out, int64_t o_hs, int64_t o_ts, int64_t n_heads,
                          int64_t n_kv, int64_t t, const int64_t *last, int64_t d, float scale, int n_threads) {
    if (d % 32 || d > DMAX || n_kv <= 0 || n_heads % n_kv || t <= 0 || n_threads < 1) return -1;
    const int64_t slots = slots_seen(last, t);
    if (slots < 0) return -1;
    attn16_t a = {q, k, v, q_hs, q_ts, k_hs, v_hs, last, n_heads / n_kv, t, d, scale * 1.44269504088896341f, 0, 1, 0};
    const int64_t rows_all = a.group * t;
    const int64_t items =
        plan_items(n_kv, rows_all, RB, slots, 4 * n_threads, BK, &a.row_blocks, &a.splits, &a.split_len);
    a.blocks = (slots + BK - 1) / BK;
    a.m = malloc(items * RB * sizeof(float));
    a.l = malloc(items * RB * sizeof(float));
    a.o = malloc(items * RB * d * sizeof(float));
    scratch_t *work = calloc(n_threads, sizeof(scratch_t));
    int failed = !a.m || !a.l || !a.o || !work, made = 0; /* made: threads whose scratch is held */
    while (!failed && made < n_threads) {
        if (alloc_scratch(&work[made], d) != 0)
            failed = 1;
        else
            made++;
    }
    if (!failed) {
#pragma omp parallel num_threads(n_threads)
        {
            scratch_t *w = &work[omp_get_thread_num()];
            tiles_on();
#pragma omp for schedule(static)
            for (int64_t item = 0; item < items; item++) run_item(&a, item, w);
            tiles_off();
        }
    }
    if (!failed) {
        const partials_t parts = {a.m, a.l, a.o, RB, a.splits, a.row_blocks, a.group, rows_all, d};
        write_rows(&parts, n_kv, out, o_hs, o_ts);
    }
    for (int i = 0; i < made; i++) free_scratch(&work[i]);
    free(work), free(a.m), free(a.l), free(a.o);
    return failed ? -2 : 0;
}
