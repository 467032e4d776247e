/* The CPU arithmetic of moxkit, fused: one pass over memory per chunk.
 *
 * Each block of elements is widened to fp32 into small on-stack buffers (they stay in L1),
 * combined in the order fixed in moxkit/backends.py and rounded once to the output dtype, so
 * the result is bit-identical to the torch path and to the Triton kernel:
 *
 *   base = RN32(RN32(a*ref) - RN32(b*mem));   out = RN_out(base)
 *   or   = RN_out(RN32(RN32(e*base) + RN32(c*prev)))
 *
 * Built with -ffp-contract=off (no fused multiply-add) and without fast-math. NaN results are
 * written as the canonical quiet NaN of the output dtype, as every backend does.
 * Loaded with ctypes: no Python C API, so one binary serves every Python version.
 */
#include <stdint.h>
#include <string.h>

enum { MOX_F32 = 0, MOX_BF16 = 1, MOX_F16 = 2 };
#define BLOCK 1024

/* fp16 <-> fp32: the compiler's _Float16 casts are correct but call a software routine per
 * element; on x86-64 CPUs with F16C the hardware converts 8 at a time, rounding to nearest
 * even like the casts (the CPU is asked once, at the first call). */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOX_HAVE_F16C_PATH 1
__attribute__((target("avx,f16c"))) static void load_f16_hw(float *dst, const uint16_t *s, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    for (; i < n; i++) dst[i] = _cvtsh_ss(s[i]);
}
__attribute__((target("avx,f16c"))) static void store_f16_hw(uint16_t *d, const float *src, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) d[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
static int has_f16c(void) {
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
    return cached;
}
#endif

static inline uint32_t f32_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float bits_f32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* The helpers are forced inline so that each target clone of moxkit_extrapolate gets its own
 * vector code for them (a called helper would stay at the baseline target). */
#define MOX_INLINE static inline __attribute__((always_inline))

MOX_INLINE void load_block(float *dst, const void *src, int dtype, size_t start, size_t n) {
    if (dtype == MOX_F32) {
        memcpy(dst, (const float *)src + start, n * sizeof(float));
    } else if (dtype == MOX_BF16) {
        const uint16_t *s = (const uint16_t *)src + start;
        for (size_t i = 0; i < n; i++) dst[i] = bits_f32((uint32_t)s[i] << 16);
    } else {
#ifdef MOX_HAVE_F16C_PATH
        if (has_f16c()) {
            load_f16_hw(dst, (const uint16_t *)src + start, n);
            return;
        }
#endif
        const _Float16 *s = (const _Float16 *)src + start;
        for (size_t i = 0; i < n; i++) dst[i] = (float)s[i];
    }
}

/* Round to the output dtype; returns how many stored values are not finite (a 32-bit count:
 * n <= BLOCK, and 32-bit lanes keep the loops as wide as the data). */
MOX_INLINE uint32_t store_block(void *dst, int dtype, size_t start, const float *src, size_t n) {
    uint32_t bad = 0;
    if (dtype == MOX_F32) {
        uint32_t *d = (uint32_t *)dst + start;
        for (size_t i = 0; i < n; i++) {
            uint32_t u = f32_bits(src[i]);
            int nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
            d[i] = nan ? 0x7FC00000u : u;
            bad += (uint32_t)((u & 0x7F800000u) == 0x7F800000u);
        }
    } else if (dtype == MOX_BF16) {
        uint16_t *d = (uint16_t *)dst + start;
        for (size_t i = 0; i < n; i++) {
            uint32_t u = f32_bits(src[i]);
            uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
            int nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
            uint32_t r = nan ? 0x7FC0u : rounded;
            d[i] = (uint16_t)r;
            bad += (uint32_t)((r & 0x7F80u) == 0x7F80u);
        }
    } else {
        uint16_t *d = (uint16_t *)dst + start;
#ifdef MOX_HAVE_F16C_PATH
        if (has_f16c()) {
            store_f16_hw(d, src, n);
        } else
#endif
        {
            for (size_t i = 0; i < n; i++) {
                _Float16 h = (_Float16)src[i];
                memcpy(&d[i], &h, 2);
            }
        }
        for (size_t i = 0; i < n; i++) {
            int nan = src[i] != src[i];
            uint16_t r = nan ? (uint16_t)0x7E00u : d[i];
            d[i] = r;
            bad += (uint32_t)((r & 0x7C00u) == 0x7C00u);
        }
    }
    return bad;
}

/* All-bf16, the common case of real checkpoints: one straight loop, no staging blocks
 * (about 1.5x the per-element rate of the general path here). Same operations, same bits. */
MOX_INLINE uint32_t bf16_round(float v) {
    uint32_t u = f32_bits(v);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return ((u & 0x7FFFFFFFu) > 0x7F800000u) ? 0x7FC0u : rounded;
}

MOX_INLINE uint32_t all_bf16_part(uint16_t *restrict out, const uint16_t *restrict ref,
                                  const uint16_t *restrict mem, const uint16_t *restrict prev,
                                  int64_t n, float a, float b, float e, float c) {
    uint32_t bad = 0; /* n <= 2^20 per part: a 32-bit count keeps the loop at full width */
    if (prev == 0) {
        for (int64_t i = 0; i < n; i++) {
            float x = a * bits_f32((uint32_t)ref[i] << 16);
            float y = b * bits_f32((uint32_t)mem[i] << 16);
            uint32_t r = bf16_round(x - y);
            out[i] = (uint16_t)r;
            bad += (uint32_t)((r & 0x7F80u) == 0x7F80u);
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            float x = a * bits_f32((uint32_t)ref[i] << 16);
            float y = b * bits_f32((uint32_t)mem[i] << 16);
            float base = x - y;
            float s = e * base;
            float t = c * bits_f32((uint32_t)prev[i] << 16);
            uint32_t r = bf16_round(s + t);
            out[i] = (uint16_t)r;
            bad += (uint32_t)((r & 0x7F80u) == 0x7F80u);
        }
    }
    return bad;
}

MOX_INLINE int64_t all_bf16(uint16_t *out, const uint16_t *ref, const uint16_t *mem,
                            const uint16_t *prev, int64_t n, float a, float b, float e, float c) {
    int64_t bad = 0;
    for (int64_t start = 0; start < n; start += (1 << 20)) {
        int64_t k = n - start < (1 << 20) ? n - start : (1 << 20);
        bad += all_bf16_part(out + start, ref + start, mem + start, prev ? prev + start : 0, k,
                             a, b, e, c);
    }
    return bad;
}

/* An AVX2 clone of the whole loop nest (helpers inline into it), chosen at load time where
 * the CPU has AVX2: twice the throughput of the SSE2 baseline. Contraction stays off, so the
 * clones compute the same bits. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
int64_t moxkit_extrapolate(void *out, int out_dtype, const void *ref, int ref_dtype,
                           const void *mem, int mem_dtype, const void *prev, int prev_dtype,
                           int64_t n, float a, float b, float e, float c) {
    if (out_dtype == MOX_BF16 && ref_dtype == MOX_BF16 && mem_dtype == MOX_BF16 &&
        (prev == 0 || prev_dtype == MOX_BF16))
        return all_bf16((uint16_t *)out, (const uint16_t *)ref, (const uint16_t *)mem,
                        (const uint16_t *)prev, n, a, b, e, c);
    float r[BLOCK], m[BLOCK];
    int64_t bad = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        size_t k = (size_t)(n - start < BLOCK ? n - start : BLOCK);
        load_block(r, ref, ref_dtype, (size_t)start, k);
        load_block(m, mem, mem_dtype, (size_t)start, k);
        for (size_t i = 0; i < k; i++) {
            float x = a * r[i];
            float y = b * m[i];
            r[i] = x - y;
        }
        if (prev != 0) {
            load_block(m, prev, prev_dtype, (size_t)start, k);
            for (size_t i = 0; i < k; i++) {
                float x = e * r[i];
                float y = c * m[i];
                r[i] = x + y;
            }
        }
        bad += store_block(out, out_dtype, (size_t)start, r, k);
    }
    return bad;
}
