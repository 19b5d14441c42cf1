/* New tokens through every decoder layer in one call (engine/layer_loop.py): per layer, the C kernels
   forward.py's Python path calls, with the same arguments, in the same order, so the same bits:
     RMSNorm -> fused q/k/v product -> q and k rotated, k and v written into the cache at `start`
     -> attention behind the cache -> output product + residual -> RMSNorm -> fused gate/up product
     -> SiLU(gate) * up -> down product + residual.
   Only the Python between the kernels is gone (about 0.29 ms a layer of it for a 25-token question
   on a 2-core EPYC: 8.7 ms a forward of SmolLM2's 30 layers). The kernels live in their own
   libraries; this one is handed their addresses (model_t), so it links none of them. Float32 or
   bf16 (elem 4 or 2) activations; attention's float32 output rounded to bf16 as torch's copy does
   (nearest even) for a bf16 model. kvlib_layers_batch runs a decode step of several sequences, each
   over its own cache, as forward.decode_batch's Python does: the products on all rows at once. */

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "bf16_avx2.h"

typedef int (*norm_fn)(const void *x, int64_t m, int64_t n, const void *w, float eps, void *out, int threads);
typedef int (*linear_fn)(const void *x, int64_t m, int64_t k, const void *wp, int64_t n, const void *bias,
                         const void *res, void *out, int threads);
typedef int (*rope_qkv_fn)(const void *qkv, int64_t t, int64_t n_q, int64_t n_kv, int64_t d, const float *cos_t,
                           const float *sin_t, void *q_out, void *k_out, void *v_out, int64_t k_hs, int64_t v_hs);
typedef int (*attend_fn)(const void *q, int64_t q_hs, int64_t q_ts, const void *k, int64_t k_hs, const void *v,
                         int64_t v_hs, float *out, int64_t o_hs, int64_t o_ts, int64_t n_heads, int64_t n_kv,
                         int64_t t, const int64_t *last, int64_t d, float scale, int threads);
typedef int (*silu_fn)(const void *gu, int64_t m, int64_t inter, int64_t stride, void *out, int threads);

typedef struct { /* one layer's weights: panels (linear_kernel.py) and norm weights, biases or NULL */
    const void *ln1, *ln2, *qkv, *qkv_bias, *o, *o_bias, *gate_up, *gate_up_bias, *down, *down_bias;
    float eps1, eps2, scale;
} layer_t;

typedef struct { /* the model's shapes and kernels */
    norm_fn norm;
    linear_fn linear;
    rope_qkv_fn rope;
    attend_fn attend;
    silu_fn silu;
    int64_t n_layers, hidden, n_q, n_kv, d, inter, elem;
} model_t;

typedef struct { /* this call's cache: keys and values of layer l, head h, slot s at base + l ls + h hs + s d */
    void *k, *v;
    int64_t k_ls, v_ls, k_hs, v_hs;
} cache_t;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Attention's float32 output rounded to bf16 for the output product (nearest even, as torch's copy). */
static void to_bf16(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) bf16x8_store(_mm256_loadu_ps(x + i), out + i);
    for (; i < n; i++) out[i] = f32_to_bf16(x[i]);
}

#define AT(p, i) ((char *)(p) + (i) * m->elem)

/* One layer on h [rows, hidden] in place (h2 holds the stream between the two halves): n_seq sequences of
   tps new tokens each, row r = i tps + j being sequence i's token j, written into caches[i] at starts[i] + j
   and seeing the slots up to last[r]. The products run on all rows together (batch-invariant kernels);
   rotation and attention run per sequence, each on its own cache. skip (one sequence only): the first rows
   whose output nobody reads (the last layer's, where only the last tokens' logits are asked): their K/V
   are written, their attention, output product and MLP not run, their rows of h left as they came. */
static int layer(const model_t *m, const layer_t *w, const cache_t *caches, int64_t n_seq, int64_t tps, int64_t l,
                 void **buf, const int64_t *starts, const float *cos_t, const float *sin_t, const int64_t *last,
                 int64_t skip, int threads, double *seconds) {
    void *h = buf[0], *x = buf[1], *qkv = buf[2], *q = buf[3], *att = buf[5], *h2 = buf[6], *gu = buf[7], *act = buf[8];
    float *att32 = (float *)buf[4];
    const int64_t qd = m->n_q * m->d, width = (m->n_q + 2 * m->n_kv) * m->d, half = m->d / 2, rows = n_seq * tps;
    const int64_t s = skip, n = rows - skip; /* the rows carried past the rotation */
    int rc = m->norm(h, rows, m->hidden, w->ln1, w->eps1, x, threads);
    rc = rc ? rc : m->linear(x, rows, m->hidden, w->qkv, width, w->qkv_bias, NULL, qkv, threads);
    for (int64_t i = 0; i < n_seq && !rc; i++) {
        const cache_t *c = &caches[i];
        char *k = (char *)c->k + l * c->k_ls * m->elem, *v = (char *)c->v + l * c->v_ls * m->elem;
        const int64_t r = i * tps;
        rc = m->rope(AT(qkv, r * width), tps, m->n_q, m->n_kv, m->d, cos_t + r * half, sin_t + r * half,
                     AT(q, r * qd), k + starts[i] * m->d * m->elem, v + starts[i] * m->d * m->elem, c->k_hs, c->v_hs);
    }
    if (rc || n == 0) return rc;
    const double t0 = seconds ? now() : 0.0;
    for (int64_t i = 0; i < n_seq && !rc; i++) {
        const cache_t *c = &caches[i];
        const int64_t r = i * tps + s;
        rc = m->attend(AT(q, r * qd), m->d, qd, (char *)c->k + l * c->k_ls * m->elem, c->k_hs,
                       (char *)c->v + l * c->v_ls * m->elem, c->v_hs, att32 + r * qd, m->d, qd, m->n_q, m->n_kv,
                       tps - s, last + r, m->d, w->scale, threads);
    }
    if (m->elem == 2) to_bf16(att32 + s * qd, n * qd, (uint16_t *)att + s * qd);
    if (seconds) *seconds += now() - t0;
    const int64_t hs = s * m->hidden;
    rc = rc ? rc : m->linear(m->elem == 2 ? AT(att, s * qd) : (void *)(att32 + s * qd), n, qd, w->o, m->hidden,
                             w->o_bias, AT(h, hs), AT(h2, hs), threads);
    rc = rc ? rc : m->norm(AT(h2, hs), n, m->hidden, w->ln2, w->eps2, AT(x, hs), threads);
    rc = rc ? rc : m->linear(AT(x, hs), n, m->hidden, w->gate_up, 2 * m->inter, w->gate_up_bias, NULL,
                             AT(gu, s * 2 * m->inter), threads);
    rc = rc ? rc : m->silu(AT(gu, s * 2 * m->inter), n, m->inter, 2 * m->inter, AT(act, s * m->inter), threads);
    return rc ? rc : m->linear(AT(act, s * m->inter), n, m->inter, w->down, m->hidden, w->down_bias, AT(h2, hs),
                               AT(h, hs), threads);
}

static int layers_of(const model_t *m, const layer_t *layers, const cache_t *caches, int64_t n_seq, int64_t tps,
                     void *h, const int64_t *starts, const float *cos_t, const float *sin_t, const int64_t *last,
                     int64_t keep, int threads, double *seconds) {
    const int64_t rows = n_seq * tps;
    if (rows <= 0 || keep < 0 || keep > rows || (keep < rows && n_seq != 1) || (m->elem != 2 && m->elem != 4)
        || m->d <= 0 || m->n_q % m->n_kv)
        return -1;
    const int64_t qd = m->n_q * m->d, width = (m->n_q + 2 * m->n_kv) * m->d;
    const int64_t sizes[9] = {0, m->hidden, width, qd, 2 * qd /* float32 */, qd, m->hidden, 2 * m->inter, m->inter};
    void *buf[9] = {h};
    int rc = 0;
    for (int i = 1; i < 9 && !rc; i++)
        if (!(buf[i] = malloc((size_t)(rows * sizes[i] * m->elem) + 64))) rc = -2;
    for (int64_t l = 0; l < m->n_layers && !rc; l++)
        rc = layer(m, &layers[l], caches, n_seq, tps, l, buf, starts, cos_t, sin_t, last,
                   l == m->n_layers - 1 ? rows - keep : 0, threads, seconds);
    for (int i = 1; i < 9; i++) free(buf[i]);
    return rc;
}

/* h [t, hidden]: the new tokens' hidden states entering layer 0; its last `keep` rows are left as they
   leave the last layer (the others' last layer is not run past writing their K/V: nobody reads them).
   start: their first slot; last [t]: the last slot each sees; cos_t / sin_t [t, d/2]: their
   positions' tables; seconds (NULL, or added to): the time in attention. */
int kvlib_layers(const model_t *m, const layer_t *layers, const cache_t *c, void *h, int64_t t, int64_t start,
                 const float *cos_t, const float *sin_t, const int64_t *last, int64_t keep, int threads,
                 double *seconds) {
    return layers_of(m, layers, c, 1, t, h, &start, cos_t, sin_t, last, keep, threads, seconds);
}

/* A decode step of b sequences, one new token each: h [b, hidden] (row i sequence i's token), caches [b],
   starts [b] (each token's slot, which is also the last slot it sees), cos_t / sin_t [b, d/2]. */
int kvlib_layers_batch(const model_t *m, const layer_t *layers, const cache_t *caches, void *h, int64_t b,
                       const int64_t *starts, const float *cos_t, const float *sin_t, int threads, double *seconds) {
    return layers_of(m, layers, caches, b, 1, h, starts, cos_t, sin_t, starts, b, threads, seconds);
}
