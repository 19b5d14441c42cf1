/* The products of bf16_attn_kernel.c on AMX tiles (TDPBF16PS), included there when built with
   -mamx-tile: S = Q K^T and O += P V over the operand layouts that file prepares, the tiles' own
   configuration per thread, and the process's permission to use them. */

#ifndef KVLIB_AMX_PRODUCTS_H
#define KVLIB_AMX_PRODUCTS_H

#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg_t;

int kvlib_amx_permit(void) { return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18); }

static void tiles_on(void) {
    tilecfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) c.rows[i] = 16, c.colsb[i] = 64; /* every tile 16 rows of 64 bytes */
    _tile_loadconfig(&c);
}

/* S = Q K^T for the block's keys (B operand in w->kt), rows in groups of 16, keys in sixteens. With
   64 or 128 dims the keys' B tiles stay loaded while the row groups pass; otherwise each is
   reloaded. */
static void scores(const attn16_t *a, scratch_t *w, int64_t rp, int64_t nk) {
    const int64_t d = a->d, chunks = d / 32, qs = d * sizeof(uint16_t), ss = BK * sizeof(float);
    for (int64_t sb = 0; sb * 16 < nk; sb++) {
        const uint16_t *kt = w->kt + sb * chunks * 512;
        float *st = w->s + sb * 16;
        if (chunks == 2 || chunks == 4) {
            _tile_loadd(2, kt, 64);
            _tile_loadd(3, kt + 512, 64);
            if (chunks == 4) {
                _tile_loadd(4, kt + 1024, 64);
                _tile_loadd(5, kt + 1536, 64);
            }
            for (int64_t g = 0; g < rp; g += 16) {
                const uint16_t *qa = w->qa + g * d;
                _tile_zero(0);
                _tile_loadd(1, qa, qs);
                _tile_dpbf16ps(0, 1, 2);
                _tile_loadd(1, qa + 32, qs);
                _tile_dpbf16ps(0, 1, 3);
                if (chunks == 4) {
                    _tile_loadd(1, qa + 64, qs);
                    _tile_dpbf16ps(0, 1, 4);
                    _tile_loadd(1, qa + 96, qs);
                    _tile_dpbf16ps(0, 1, 5);
                }
                _tile_stored(0, st + g * BK, ss);
            }
            continue;
        }
        for (int64_t g = 0; g < rp; g += 16) {
            _tile_zero(0);
            for (int64_t ch = 0; ch < chunks; ch++) {
                _tile_loadd(1, w->qa + g * d + ch * 32, qs);
                _tile_loadd(2, kt + ch * 512, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, st + g * BK, ss);
        }
    }
}

/* O += P V for the block (B operand in w->vi), outputs in tiles of 16 rows x 16 dims: four of them
   (64 dims) held while the block's key steps pass, each step's probabilities loaded once. */
static void values(const attn16_t *a, scratch_t *w, int64_t rp, int64_t nk, float *o) {
    const int64_t d = a->d, steps = (nk + 31) / 32, os = d * sizeof(float), vs = d * 2 * sizeof(uint16_t);
    const int64_t ps = BK * sizeof(uint16_t);
    for (int64_t g = 0; g < rp; g += 16)
        for (int64_t c = 0; c < d; c += 64) {
            float *og = o + g * d + c;
            if (d - c >= 64) {
                _tile_loadd(0, og, os);
                _tile_loadd(1, og + 16, os);
                _tile_loadd(2, og + 32, os);
                _tile_loadd(3, og + 48, os);
                for (int64_t ks = 0; ks < steps; ks++) {
                    const uint16_t *vb = w->vi + (ks * 16 * d + c) * 2;
                    _tile_loadd(4, w->pb + g * BK + ks * 32, ps);
                    _tile_loadd(5, vb, vs);
                    _tile_dpbf16ps(0, 4, 5);
                    _tile_loadd(5, vb + 32, vs);
                    _tile_dpbf16ps(1, 4, 5);
                    _tile_loadd(5, vb + 64, vs);
                    _tile_dpbf16ps(2, 4, 5);
                    _tile_loadd(5, vb + 96, vs);
                    _tile_dpbf16ps(3, 4, 5);
                }
                _tile_stored(0, og, os);
                _tile_stored(1, og + 16, os);
                _tile_stored(2, og + 32, os);
                _tile_stored(3, og + 48, os);
                continue;
            }
            for (int64_t cc = c; cc < d; cc += 16) { /* a last 32 dims */
                _tile_loadd(0, o + g * d + cc, os);
                for (int64_t ks = 0; ks < steps; ks++) {
                    _tile_loadd(4, w->pb + g * BK + ks * 32, ps);
                    _tile_loadd(5, w->vi + (ks * 16 * d + cc) * 2, vs);
                    _tile_dpbf16ps(0, 4, 5);
                }
                _tile_stored(0, o + g * d + cc, os);
            }
        }
}

static void tiles_off(void) { _tile_release(); }

static inline int64_t row_align(int64_t rows) { return (void)rows, 16; } /* a tile's rows */

static void prepare_rows(scratch_t *w, int64_t rp, int64_t d) { (void)w, (void)rp, (void)d; }

/* One block of nk keys (k: the block's first; w->vi: its values' pairs) for the rp rows: the keys in
   the B layout, the scores on tiles, each row's online softmax, the values on tiles. */
static void block(const attn16_t *a, scratch_t *w, const uint16_t *k, int64_t kb, int64_t nk, int64_t rp, float *m,
                  float *l, float *o) {
    keys_to_b(k, nk, a->d, w->kt);
    scores(a, w, rp, nk);
    for (int64_t r = 0; r < rp; r++) softmax_row(a, w, r, kb, nk, m, l, o);
    values(a, w, rp, nk, o);
}

#endif
