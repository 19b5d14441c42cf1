/* 2^x on eight float32 lanes, x clamped to [-126, 126] (finite, normal results): Cephes' exp2f,
   2^n times a degree-6 polynomial of the fraction, ~1 ulp. Shared by the C kernels that take an
   exponential (attn_kernel.c, pointwise_kernel.c; bf16_attn_kernel.c takes the same polynomial on
   sixteen lanes, exp2_avx512, where AVX-512 is on); kernels.py hashes it with each of them. */

#ifndef KVLIB_EXP2_AVX2_H
#define KVLIB_EXP2_AVX2_H

#include <immintrin.h>

/* 2^f for f in [-0.5, 0.5], highest power first (Cephes) */
static const float EXP2_POLY[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                   5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.0f};

static inline __m256 exp2_avx2(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(126.0f));
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, n);
    __m256 y = _mm256_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 7; i++) y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(EXP2_POLY[i]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

#ifdef __AVX512F__
static inline __m512 exp2_avx512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 y = _mm512_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 7; i++) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(EXP2_POLY[i]));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}
#endif

#endif
