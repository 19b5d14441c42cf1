/* Split-K attention's plan and last step, shared by attn_kernel.c and bf16_attn_kernel.c (kernels.py
   hashes it with each). The plan: key ranges per (KV head, row block), doubled until there are
   enough work items for the threads. The last step: every work item (KV head, row block, range of
   keys) left per row its running maximum m (base 2), sum l and unnormalised outputs o; a row's
   ranges are merged by their maxima and sums, and the rows written to out (query row r0 + r of a
   KV head is its head (r0 + r) % group, token (r0 + r) / group). */

#ifndef KVLIB_ATTN_MERGE_H
#define KVLIB_ATTN_MERGE_H

#include <math.h>
#include <stdint.h>

typedef struct {
    const float *m, *l, *o; /* per item: rb maxima, rb sums, rb x d outputs */
    int64_t rb, splits, row_blocks, group, rows_all, d;
} partials_t;

/* The slots the new tokens see (1 + the largest last), or -1 when a last is negative or too large to
   compare exactly as a float. */
static int64_t slots_seen(const int64_t *last, int64_t t) {
    int64_t slots = 0;
    for (int64_t i = 0; i < t; i++) {
        if (last[i] < 0 || last[i] >= (1 << 24)) return -1;
        slots = last[i] + 1 > slots ? last[i] + 1 : slots;
    }
    return slots;
}

/* The work items of n_kv heads of `rows_all` rows in blocks of rb: key ranges per (KV head, row block)
   doubled while the items are fewer than `want` and each range keeps at least 4 blocks of bk keys
   (*split_len a multiple of bk). Returns the item count; *row_blocks and *splits as planned. */
static int64_t plan_items(int64_t n_kv, int64_t rows_all, int64_t rb, int64_t slots, int64_t want, int64_t bk,
                          int64_t *row_blocks, int64_t *splits, int64_t *split_len) {
    *row_blocks = (rows_all + rb - 1) / rb;
    *splits = 1;
    while (n_kv * *row_blocks * *splits < want && slots / (*splits * 2) >= 4 * bk) *splits *= 2;
    *split_len = ((slots + *splits - 1) / *splits + bk - 1) / bk * bk;
    return n_kv * *row_blocks * *splits;
}

static void merge_row(const partials_t *p, int64_t first_item, int64_t r, float *dst) {
    const int64_t d = p->d;
    float top = -INFINITY, sum = 0.0f;
    for (int64_t sp = 0; sp < p->splits; sp++) {
        const float mi = p->m[(first_item + sp) * p->rb + r];
        top = mi > top ? mi : top;
    }
    for (int64_t c = 0; c < d; c++) dst[c] = 0.0f;
    for (int64_t sp = 0; sp < p->splits; sp++) {
        const int64_t it = first_item + sp;
        if (p->l[it * p->rb + r] == 0.0f) continue; /* a range this row sees nothing of */
        const float w = exp2f(p->m[it * p->rb + r] - top);
        sum += p->l[it * p->rb + r] * w;
        for (int64_t c = 0; c < d; c++) dst[c] += p->o[(it * p->rb + r) * d + c] * w;
    }
    for (int64_t c = 0; c < d; c++) dst[c] /= sum;
}

static void write_rows(const partials_t *p, int64_t n_kv, float *out, int64_t o_hs, int64_t o_ts) {
    for (int64_t kv = 0; kv < n_kv; kv++)
        for (int64_t rb = 0; rb < p->row_blocks; rb++) {
            const int64_t r0 = rb * p->rb, nrows = p->rows_all - r0 < p->rb ? p->rows_all - r0 : p->rb;
            for (int64_t r = 0; r < nrows; r++) {
                const int64_t t = (r0 + r) / p->group, h = kv * p->group + (r0 + r) % p->group;
                merge_row(p, (kv * p->row_blocks + rb) * p->splits, r, out + h * o_hs + t * o_ts);
            }
        }
}

#endif
