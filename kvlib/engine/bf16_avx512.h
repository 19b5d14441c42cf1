/* bfloat16 rows rotated on AVX-512 (F/BW/VL), sixteen values at a time, as rope_kernel.c's AVX2 code
   does eight: each bfloat16 widened exactly (a 16-bit shift), each product rounded to float32, then
   the sum (built with -ffp-contract=off), then torch's float32 -> bfloat16 rounding done on the
   integers (nearest even, NaN to 0x7fc0): VCVTNEPS2BF16 would flush denormals, torch does not. */

#ifndef KVLIB_BF16_AVX512_H
#define KVLIB_BF16_AVX512_H

#include <immintrin.h>
#include <stdint.h>

static inline __m512 bf16x16_load(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* stream: a full row of sixteen at a 32-byte boundary goes around the caches (a non-temporal store:
   a cache written in one pass is read back layer by layer, long after) */
static inline __attribute__((always_inline)) void bf16x16_store(uint16_t *p, __m512 v, __mmask16 m, int stream) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    if (stream && m == (__mmask16)0xffff && ((uintptr_t)p & 31) == 0)
        _mm256_stream_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
    else
        _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

/* out[j] = x[j] c[j] - x[j + h] s[j], out[j + h] = x[j + h] c[j] + x[j] s[j] for j < h: x[j + h] * -s[j]
   rounds to exactly -(x[j + h] * s[j]), so the subtraction gives the bits of rope_kernel.c's sum. */
static inline __attribute__((always_inline)) void rotate_row_bf16x16(const uint16_t *x, uint16_t *out, const float *c,
                                                                    const float *s, int64_t h, int stream) {
    for (int64_t j = 0; j < h; j += 16) {
        const __mmask16 m = h - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (h - j)) - 1u);
        const __m512 x1 = bf16x16_load(x + j, m), x2 = bf16x16_load(x + j + h, m);
        const __m512 cj = _mm512_maskz_loadu_ps(m, c + j), sj = _mm512_maskz_loadu_ps(m, s + j);
        bf16x16_store(out + j, _mm512_sub_ps(_mm512_mul_ps(x1, cj), _mm512_mul_ps(x2, sj)), m, stream);
        bf16x16_store(out + j + h, _mm512_add_ps(_mm512_mul_ps(x2, cj), _mm512_mul_ps(x1, sj)), m, stream);
    }
}

#endif
