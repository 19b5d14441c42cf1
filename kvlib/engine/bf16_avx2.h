/* bfloat16 <-> float32 on AVX2, as torch converts: widening is exact (a bfloat16 is the top half
   of a float32: a 16-bit shift); narrowing rounds to nearest even, NaN to 0x7fc0. Shared by the
   C kernels that read or write a bf16 model's tensors (rope_kernel.c, pointwise_kernel.c,
   layer_loop.c);
   kernels.py hashes it with each of them. */

#ifndef KVLIB_BF16_AVX2_H
#define KVLIB_BF16_AVX2_H

#include <immintrin.h>
#include <stdint.h>

static inline __m256 bf16x8_load(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Eight floats rounded to bfloat16 precision, kept as float32 bits (low halves zero). */
static inline __m256 bf16x8_round(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    r = _mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc00000), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    return _mm256_castsi256_ps(r);
}

static inline void bf16x8_store(__m256 v, uint16_t *p) {
    const __m256i r = _mm256_srli_epi32(_mm256_castps_si256(bf16x8_round(v)), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } x = {(uint32_t)h << 16};
    return x.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } x = {f};
    if (f != f) return 0x7fc0;
    return (uint16_t)((x.u + 0x7fff + ((x.u >> 16) & 1)) >> 16);
}

static inline float bf16_round1(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* Eight values (or one) at index j of float32 storage, or of bfloat16 storage where bf16, as
   float32, and back: one kernel body for a float32 and a bf16 model's tensors (the flag is a
   constant where the body is inlined, so each twin compiles to its own straight code). */
static inline __attribute__((always_inline)) __m256 load8_as(const void *p, int64_t j, int bf16) {
    return bf16 ? bf16x8_load((const uint16_t *)p + j) : _mm256_loadu_ps((const float *)p + j);
}

static inline __attribute__((always_inline)) float load1_as(const void *p, int64_t j, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[j]) : ((const float *)p)[j];
}

static inline __attribute__((always_inline)) void store8_as(void *p, int64_t j, __m256 v, int bf16) {
    if (bf16)
        bf16x8_store(v, (uint16_t *)p + j);
    else
        _mm256_storeu_ps((float *)p + j, v);
}

static inline __attribute__((always_inline)) void store1_as(void *p, int64_t j, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[j] = f32_to_bf16(v);
    else
        ((float *)p)[j] = v;
}

#endif
