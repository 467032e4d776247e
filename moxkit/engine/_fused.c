/* The CPU arithmetic of moxkit, fused: one pass over memory per chunk.
 *
 * Computes the contract of moxkit/formula.py bit for bit (the torch path and the Triton kernel
 * compute the same bits):
 *
 *   base = RN32(RN32(a*ref) - RN32(b*mem));   out = RN_out(base)
 *   or   = RN_out(RN32(RN32(e*base) + RN32(c*prev)))
 *
 * Built with -ffp-contract=off (no fused multiply-add) and without fast-math; the call runs
 * with the default MXCSR (round to nearest even, no flush-to-zero, no denormals-are-zero)
 * whatever the calling thread had set. NaN results are stored as the canonical NaN the
 * caller passes (moxkit.engine.dtypes.CANONICAL_NAN_BITS).
 *
 * One build serves every CPU: the loop exists in three paths, chosen at run time:
 *   generic  plain C (whatever the compiler makes of it for the baseline target)
 *   avx2     AVX2 + F16C: 8 lanes, hardware fp16 conversion
 *   avx512   AVX-512 F/BW/VL: 16 lanes, hardware fp16 conversion, masked NaN fix-up
 * All three widen every operand to fp32 exactly, do the same fp32 operations, and round with
 * the same rules: bf16 by integer round-to-nearest-even (the AVX-512-BF16 instruction is not
 * used: it flushes subnormals), fp16 by VCVTPS2PH with an explicit round-to-nearest-even
 * immediate (it keeps subnormals) or the compiler's _Float16 cast. Tests force each path.
 *
 * Large outputs are written with non-temporal stores: a plain store first reads the line it
 * writes, which costs a third more memory traffic than the copy we are measured against.
 *
 * An input mapped from a file that another process truncates faults (SIGBUS) when the loop
 * reads past the new end; a per-thread guard turns that into the MOX_INPUT_CHANGED result.
 *
 * moxkit_extrapolate_to_file writes the result into a file itself: block by block into a
 * buffer that stays in cache, each block then copied into the page cache with pwrite. The
 * result never goes to memory and back, and each write is small (see moxkit/writer.py,
 * WRITE_BLOCK, for why the size of a write matters).
 *
 * Loaded with ctypes: no Python C API, so one binary serves every Python version.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { MOX_F32 = 0, MOX_BF16 = 1, MOX_F16 = 2 };
enum { PATH_GENERIC = 0, PATH_AVX2 = 1, PATH_AVX512 = 2, N_PATHS = 3 };
#define MOX_INPUT_CHANGED (-1)
#define MOX_WRITE_FAILED (-2) /* moxkit_extrapolate_to_file: a write failed; errno in *error */
#define STAGE 1024              /* elements per fp32 staging block (mixed input dtypes) */
#define COUNT_SPAN (1 << 20)    /* elements per 32-bit non-finite count (no lane overflows) */
#define STREAM_MIN_BYTES (4 << 20) /* outputs at least this large use non-temporal stores */

typedef struct {
    float a, b, e, c;
    uint32_t nan; /* the output dtype's canonical NaN */
    int momentum;
} coeffs_t;

static const int ITEMSIZE[3] = {4, 2, 2};

static inline uint32_t f32_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float bits_f32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
static inline const void *at(const void *p, int dtype, int64_t i) {
    return p ? (const char *)p + i * ITEMSIZE[dtype] : 0;
}

/* ------------------------------------------------------------------ generic: one element */

#define G_INLINE static inline __attribute__((always_inline))

G_INLINE float g_ld_F32(const void *p, int64_t i) { return ((const float *)p)[i]; }
G_INLINE float g_ld_BF16(const void *p, int64_t i) {
    return bits_f32((uint32_t)((const uint16_t *)p)[i] << 16);
}
G_INLINE float g_ld_F16(const void *p, int64_t i) { return (float)((const _Float16 *)p)[i]; }

/* Each store rounds, writes the canonical NaN for NaN, and returns 1 if the stored value is
 * not finite. */
G_INLINE uint32_t g_st_F32(void *p, int64_t i, float x, const coeffs_t *k) {
    uint32_t u = f32_bits(x);
    ((uint32_t *)p)[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? k->nan : u;
    return (u & 0x7F800000u) == 0x7F800000u;
}
G_INLINE uint32_t g_st_BF16(void *p, int64_t i, float x, const coeffs_t *k) {
    uint32_t u = f32_bits(x);
    uint32_t r = (u & 0x7FFFFFFFu) > 0x7F800000u ? k->nan : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    ((uint16_t *)p)[i] = (uint16_t)r;
    return (r & 0x7F80u) == 0x7F80u;
}
G_INLINE uint32_t g_st_F16(void *p, int64_t i, float x, const coeffs_t *k) {
    _Float16 h = (_Float16)x;
    uint16_t r;
    memcpy(&r, &h, 2);
    if (x != x) r = (uint16_t)k->nan;
    ((uint16_t *)p)[i] = r;
    return (r & 0x7C00u) == 0x7C00u;
}

/* The fused loop of one (input dtype, output dtype) pair; all inputs share IN. */
#define G_KERNEL(IN, OUT)                                                                    \
    static int64_t g_k_##IN##_##OUT(void *out, const void *ref, const void *mem,            \
                                    const void *prev, int64_t n, const coeffs_t *k,         \
                                    int stream) {                                           \
        (void)stream;                                                                       \
        const float a = k->a, b = k->b, e = k->e, c = k->c;                                 \
        int64_t bad = 0;                                                                    \
        for (int64_t s = 0; s < n; s += COUNT_SPAN) {                                       \
            int64_t stop = n - s < COUNT_SPAN ? n : s + COUNT_SPAN;                         \
            uint32_t count = 0;                                                             \
            if (prev == 0) {                                                                \
                for (int64_t i = s; i < stop; i++) {                                        \
                    float x = a * g_ld_##IN(ref, i);                                        \
                    float y = b * g_ld_##IN(mem, i);                                        \
                    count += g_st_##OUT(out, i, x - y, k);                                  \
                }                                                                           \
            } else {                                                                        \
                for (int64_t i = s; i < stop; i++) {                                        \
                    float x = a * g_ld_##IN(ref, i);                                        \
                    float y = b * g_ld_##IN(mem, i);                                        \
                    float base = x - y;                                                     \
                    float u = e * base;                                                     \
                    float v = c * g_ld_##IN(prev, i);                                       \
                    count += g_st_##OUT(out, i, u + v, k);                                  \
                }                                                                           \
            }                                                                               \
            bad += count;                                                                   \
        }                                                                                   \
        return bad;                                                                         \
    }

#define G_WIDEN(IN)                                                                          \
    static void g_w_##IN(float *dst, const void *src, int64_t n) {                          \
        for (int64_t i = 0; i < n; i++) dst[i] = g_ld_##IN(src, i);                         \
    }

typedef int64_t (*kernel_fn)(void *, const void *, const void *, const void *, int64_t,
                             const coeffs_t *, int);
typedef void (*widen_fn)(float *, const void *, int64_t);
typedef struct {
    kernel_fn kernel[3][3]; /* [input dtype][output dtype] */
    widen_fn widen[3];      /* an input dtype to fp32 */
} path_t;

#define KERNELS_OF(P, IN) {P##_k_##IN##_F32, P##_k_##IN##_BF16, P##_k_##IN##_F16}
#define PATH_TABLE(P)                                                                        \
    {{KERNELS_OF(P, F32), KERNELS_OF(P, BF16), KERNELS_OF(P, F16)},                          \
     {P##_w_F32, P##_w_BF16, P##_w_F16}}
#define ALL_PAIRS(M)                                                                         \
    M(F32, F32) M(F32, BF16) M(F32, F16) M(BF16, F32) M(BF16, BF16) M(BF16, F16)             \
    M(F16, F32) M(F16, BF16) M(F16, F16)

ALL_PAIRS(G_KERNEL)
G_WIDEN(F32) G_WIDEN(BF16) G_WIDEN(F16)

/* --------------------------------------------------------- vector paths (x86-64, GCC/clang) */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_VECTOR_PATHS 1

/* A vector kernel: the head up to a 64-byte-aligned output (when streaming) and the tail
 * shorter than a vector go through the generic kernel of the same pair (same bits). */
#define V_KERNEL(P, W, ACC_T, ACC_ZERO, ACC_SUM, IN, OUT)                                   \
    P##_FN int64_t P##_k_##IN##_##OUT(void *out, const void *ref, const void *mem,          \
                                      const void *prev, int64_t n, const coeffs_t *k,       \
                                      int stream) {                                         \
        int64_t head = 0, bad = 0;                                                          \
        if (stream) {                                                                       \
            uintptr_t addr = (uintptr_t)out;                                                \
            if (addr % ITEMSIZE[MOX_##OUT]) stream = 0;                                     \
            else head = (int64_t)((64 - addr % 64) % 64) / ITEMSIZE[MOX_##OUT];             \
            if (head > n) head = n;                                                         \
        }                                                                                   \
        if (head) bad += g_k_##IN##_##OUT(out, ref, mem, prev, head, k, 0);                 \
        P##_CONSTS(k);                                                                      \
        int64_t body = head + (n - head) / W * W;                                           \
        for (int64_t s = head; s < body; s += COUNT_SPAN) {                                 \
            int64_t stop = body - s < COUNT_SPAN ? body : s + COUNT_SPAN;                   \
            ACC_T acc = ACC_ZERO;                                                           \
            if (prev == 0) {                                                                \
                for (int64_t i = s; i < stop; i += W)                                       \
                    P##_st_##OUT(out, i, P##_sub(P##_mul(va, P##_ld_##IN(ref, i)),          \
                                                 P##_mul(vb, P##_ld_##IN(mem, i))),         \
                                 vnan, &acc, stream);                                       \
            } else {                                                                        \
                for (int64_t i = s; i < stop; i += W) {                                     \
                    P##_V base = P##_sub(P##_mul(va, P##_ld_##IN(ref, i)),                  \
                                         P##_mul(vb, P##_ld_##IN(mem, i)));                 \
                    P##_st_##OUT(out, i, P##_add(P##_mul(ve, base),                         \
                                                 P##_mul(vc, P##_ld_##IN(prev, i))),        \
                                 vnan, &acc, stream);                                       \
                }                                                                           \
            }                                                                               \
            bad += ACC_SUM(acc);                                                            \
        }                                                                                   \
        if (stream) _mm_sfence();                                                           \
        if (body < n)                                                                       \
            bad += g_k_##IN##_##OUT((char *)out + body * ITEMSIZE[MOX_##OUT], at(ref, MOX_##IN, body),      \
                                    at(mem, MOX_##IN, body), at(prev, MOX_##IN, body),      \
                                    n - body, k, 0);                                        \
        return bad;                                                                         \
    }

#define V_WIDEN(P, W, IN)                                                                    \
    P##_FN void P##_w_##IN(float *dst, const void *src, int64_t n) {                        \
        int64_t i = 0;                                                                      \
        for (; i + W <= n; i += W) P##_stf(dst + i, P##_ld_##IN(src, i));                   \
        g_w_##IN(dst + i, at(src, MOX_##IN, i), n - i);                                     \
    }

/* ---- AVX2 + F16C: 8 lanes ---- */
#define a2_FN __attribute__((target("avx2,f16c"))) static
#define A2 static inline __attribute__((always_inline, target("avx2,f16c")))
typedef __m256 a2_V;
#define a2_mul _mm256_mul_ps
#define a2_sub _mm256_sub_ps
#define a2_add _mm256_add_ps
#define a2_stf _mm256_storeu_ps
#define a2_CONSTS(k)                                                                          \
    const __m256 va = _mm256_set1_ps(k->a), vb = _mm256_set1_ps(k->b);                       \
    const __m256 ve = _mm256_set1_ps(k->e), vc = _mm256_set1_ps(k->c);                       \
    const __m256i vnan = _mm256_set1_epi32((int)k->nan)

A2 __m128i a2_ld16(const void *p, int64_t i) {
    return _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
}
A2 __m256 a2_ld_F32(const void *p, int64_t i) { return _mm256_loadu_ps((const float *)p + i); }
A2 __m256 a2_ld_BF16(const void *p, int64_t i) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a2_ld16(p, i)), 16));
}
A2 __m256 a2_ld_F16(const void *p, int64_t i) { return _mm256_cvtph_ps(a2_ld16(p, i)); }

A2 void a2_put32(void *p, int64_t i, __m256i v, int stream) {
    __m256i *d = (__m256i *)((uint32_t *)p + i);
    if (stream) _mm256_stream_si256(d, v); else _mm256_storeu_si256(d, v);
}
A2 void a2_put16(void *p, int64_t i, __m128i v, int stream) {
    __m128i *d = (__m128i *)((uint16_t *)p + i);
    if (stream) _mm_stream_si128(d, v); else _mm_storeu_si128(d, v);
}
/* 8 x 32-bit lanes holding 0..0xFFFF, or 0 / -1 masks -> 8 x 16-bit lanes, in order */
A2 __m128i a2_narrow(__m256i v) {
    return _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}
A2 __m128i a2_narrow_u(__m256i v) {
    return _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}
A2 __m256i a2_isnan(__m256 x) { return _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }

/* Stores: round, canonical NaN, and count the non-finite lanes (a match is -1: subtract it). */
A2 void a2_st_F32(void *p, int64_t i, __m256 x, __m256i vnan, __m256i *acc, int stream) {
    const __m256i expo = _mm256_set1_epi32(0x7F800000);
    __m256i u = _mm256_castps_si256(x);
    *acc = _mm256_sub_epi32(*acc, _mm256_cmpeq_epi32(_mm256_and_si256(u, expo), expo));
    a2_put32(p, i, _mm256_blendv_epi8(u, vnan, a2_isnan(x)), stream);
}
A2 void a2_st_BF16(void *p, int64_t i, __m256 x, __m256i vnan, __m256i *acc, int stream) {
    const __m256i expo = _mm256_set1_epi32(0x7F80), one = _mm256_set1_epi32(1);
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    __m256i r = _mm256_blendv_epi8(rounded, vnan, a2_isnan(x));
    *acc = _mm256_sub_epi32(*acc, _mm256_cmpeq_epi32(_mm256_and_si256(r, expo), expo));
    a2_put16(p, i, a2_narrow_u(r), stream);
}
A2 void a2_st_F16(void *p, int64_t i, __m256 x, __m256i vnan, __m256i *acc, int stream) {
    const __m128i expo = _mm_set1_epi16(0x7C00);
    __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    h = _mm_blendv_epi8(h, a2_narrow(vnan), a2_narrow(a2_isnan(x)));
    __m128i bad = _mm_cmpeq_epi16(_mm_and_si128(h, expo), expo);
    *acc = _mm256_sub_epi32(*acc, _mm256_cvtepi16_epi32(bad));
    a2_put16(p, i, h, stream);
}
A2 int64_t a2_sum(__m256i acc) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return (uint32_t)_mm_cvtsi128_si32(s);
}
#define A2_KERNEL(IN, OUT) V_KERNEL(a2, 8, __m256i, _mm256_setzero_si256(), a2_sum, IN, OUT)
ALL_PAIRS(A2_KERNEL)
V_WIDEN(a2, 8, F32) V_WIDEN(a2, 8, BF16) V_WIDEN(a2, 8, F16)

/* ---- AVX-512 F/BW/VL: 16 lanes ---- */
#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx2,f16c"
#define a5_FN __attribute__((target(AVX512_TARGET))) static
#define A5 static inline __attribute__((always_inline, target(AVX512_TARGET)))
typedef __m512 a5_V;
#define a5_mul _mm512_mul_ps
#define a5_sub _mm512_sub_ps
#define a5_add _mm512_add_ps
#define a5_stf _mm512_storeu_ps
#define a5_CONSTS(k)                                                                          \
    const __m512 va = _mm512_set1_ps(k->a), vb = _mm512_set1_ps(k->b);                       \
    const __m512 ve = _mm512_set1_ps(k->e), vc = _mm512_set1_ps(k->c);                       \
    const __m512i vnan = _mm512_set1_epi32((int)k->nan)

A5 __m256i a5_ld16(const void *p, int64_t i) {
    return _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
}
A5 __m512 a5_ld_F32(const void *p, int64_t i) { return _mm512_loadu_ps((const float *)p + i); }
A5 __m512 a5_ld_BF16(const void *p, int64_t i) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a5_ld16(p, i)), 16));
}
A5 __m512 a5_ld_F16(const void *p, int64_t i) { return _mm512_cvtph_ps(a5_ld16(p, i)); }

A5 void a5_put16(void *p, int64_t i, __m256i v, int stream) {
    __m256i *d = (__m256i *)((uint16_t *)p + i);
    if (stream) _mm256_stream_si256(d, v); else _mm256_storeu_si256(d, v);
}
A5 __mmask16 a5_isnan(__m512 x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); }
/* Stores: round, canonical NaN, count the non-finite lanes (masked +1 on 32-bit counters). */
A5 void a5_st_F32(void *p, int64_t i, __m512 x, __m512i vnan, __m512i *acc, int stream) {
    const __m512i expo = _mm512_set1_epi32(0x7F800000), one = _mm512_set1_epi32(1);
    __m512i u = _mm512_castps_si512(x);
    __mmask16 bad = _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, expo), expo);
    *acc = _mm512_mask_add_epi32(*acc, bad, *acc, one);
    __m512i r = _mm512_mask_blend_epi32(a5_isnan(x), u, vnan);
    void *d = (uint32_t *)p + i;
    if (stream) _mm512_stream_si512(d, r); else _mm512_storeu_si512(d, r);
}
A5 void a5_st_BF16(void *p, int64_t i, __m512 x, __m512i vnan, __m512i *acc, int stream) {
    const __m512i expo = _mm512_set1_epi32(0x7F80), one = _mm512_set1_epi32(1);
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    __m512i r = _mm512_mask_blend_epi32(a5_isnan(x), rounded, vnan);
    __mmask16 bad = _mm512_cmpeq_epi32_mask(_mm512_and_si512(r, expo), expo);
    *acc = _mm512_mask_add_epi32(*acc, bad, *acc, one);
    a5_put16(p, i, _mm512_cvtepi32_epi16(r), stream);
}
A5 void a5_st_F16(void *p, int64_t i, __m512 x, __m512i vnan, __m512i *acc, int stream) {
    const __m256i expo = _mm256_set1_epi16(0x7C00);
    const __m512i one = _mm512_set1_epi32(1);
    __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    h = _mm256_mask_blend_epi16(a5_isnan(x), h, _mm512_cvtepi32_epi16(vnan));
    __mmask16 bad = _mm256_cmpeq_epi16_mask(_mm256_and_si256(h, expo), expo);
    *acc = _mm512_mask_add_epi32(*acc, bad, *acc, one);
    a5_put16(p, i, h, stream);
}
A5 int64_t a5_sum(__m512i acc) { return (uint32_t)_mm512_reduce_add_epi32(acc); }
#define A5_KERNEL(IN, OUT) V_KERNEL(a5, 16, __m512i, _mm512_setzero_si512(), a5_sum, IN, OUT)
ALL_PAIRS(A5_KERNEL)
V_WIDEN(a5, 16, F32) V_WIDEN(a5, 16, BF16) V_WIDEN(a5, 16, F16)
#endif /* x86-64 vector paths */

static const path_t PATHS[N_PATHS] = {
    PATH_TABLE(g),
#ifdef HAVE_VECTOR_PATHS
    PATH_TABLE(a2),
    PATH_TABLE(a5),
#endif
};

/* ------------------------------------------------------------------------ path selection */

static int path_supported(int path) {
    if (path == PATH_GENERIC) return 1;
#ifdef HAVE_VECTOR_PATHS
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    if (path == PATH_AVX2) return avx2;
    if (path == PATH_AVX512)
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
#endif
    return 0;
}

static int forced_path = -1; /* -1: the best path this CPU runs */

/* Bit i set: this CPU runs path i (0 generic, 1 avx2, 2 avx512). */
int moxkit_cpu_paths(void) {
    int mask = 0;
    for (int p = 0; p < N_PATHS; p++) mask |= path_supported(p) << p;
    return mask;
}

/* Force a path for every later call (-1: back to the best). Returns 0, or -1 where this CPU
 * cannot run it. Meant for tests and benchmarks; not thread-safe against running calls. */
int moxkit_set_cpu_path(int path) {
    if (path != -1 && (path < 0 || path >= N_PATHS || !path_supported(path))) return -1;
    forced_path = path;
    return 0;
}

/* The path calls use now. */
int moxkit_cpu_path(void) {
    static int best = -1;
    if (forced_path >= 0) return forced_path;
    if (best < 0) {
        int p = N_PATHS - 1;
        while (!path_supported(p)) p--;
        best = p;
    }
    return best;
}

/* ------------------------------------------------------------------------- the SIGBUS guard */

static __thread sigjmp_buf *guard_jump; /* set while this thread runs the loop */
static pthread_mutex_t guard_lock = PTHREAD_MUTEX_INITIALIZER;
static int guard_users;
static struct sigaction guard_previous;

static void guard_handler(int sig, siginfo_t *info, void *context) {
    sigjmp_buf *jump = guard_jump;
    if (jump && info && info->si_code > 0) siglongjmp(*jump, 1); /* a fault in our loop */
    /* not ours: what would have happened without moxkit */
    if (guard_previous.sa_flags & SA_SIGINFO) {
        guard_previous.sa_sigaction(sig, info, context);
    } else if (guard_previous.sa_handler == SIG_IGN) {
        if (!info || info->si_code <= 0) return; /* sent by a process: ignored, as it was */
        signal(sig, SIG_DFL); /* a fault cannot be ignored: returning re-runs it, fatally */
    } else if (guard_previous.sa_handler == SIG_DFL) {
        signal(sig, SIG_DFL);
        if (!info || info->si_code <= 0) raise(sig);
    } else {
        guard_previous.sa_handler(sig);
    }
}

/* The handler is installed while any thread is inside the loop, and the previous one is put
 * back when the last leaves. */
static void guard_enter(void) {
    pthread_mutex_lock(&guard_lock);
    if (guard_users++ == 0) {
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_sigaction = guard_handler;
        action.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&action.sa_mask);
        sigaction(SIGBUS, &action, &guard_previous);
    }
    pthread_mutex_unlock(&guard_lock);
}

static void guard_leave(void) {
    pthread_mutex_lock(&guard_lock);
    if (--guard_users == 0) sigaction(SIGBUS, &guard_previous, 0);
    pthread_mutex_unlock(&guard_lock);
}

/* ------------------------------------------------------------------------------ the entry */

static int64_t run(const path_t *path, void *out, int out_dtype, const void *ref, int ref_dtype,
                   const void *mem, int mem_dtype, const void *prev, int prev_dtype, int64_t n,
                   const coeffs_t *k) {
    int stream = (int64_t)n * ITEMSIZE[out_dtype] >= STREAM_MIN_BYTES;
    if (ref_dtype == mem_dtype && (prev == 0 || prev_dtype == ref_dtype))
        return path->kernel[ref_dtype][out_dtype](out, ref, mem, prev, n, k, stream);
    /* mixed input dtypes: widen each block to fp32 (kept in L1), then the fp32 kernel */
    float r[STAGE], m[STAGE], p[STAGE];
    kernel_fn kernel = path->kernel[MOX_F32][out_dtype];
    int64_t bad = 0;
    for (int64_t s = 0; s < n; s += STAGE) {
        int64_t len = n - s < STAGE ? n - s : STAGE;
        path->widen[ref_dtype](r, at(ref, ref_dtype, s), len);
        path->widen[mem_dtype](m, at(mem, mem_dtype, s), len);
        if (prev) path->widen[prev_dtype](p, at(prev, prev_dtype, s), len);
        bad += kernel((char *)out + s * ITEMSIZE[out_dtype], r, m, prev ? p : 0, len, k, 0);
    }
    return bad;
}

/* Where results go when the caller gives a file: computed `block` bytes at a time, each block
 * written at `offset` onwards. */
typedef struct {
    int fd;
    int64_t offset;
    int64_t block;
    char *buffer; /* two blocks: one can wait for the write lock while the next is computed */
    int error;    /* errno of the failed write */
} sink_t;

typedef struct {
    const char *data;
    int64_t nbytes, offset;
} pending_t;

/* One write at a time. Two threads writing one file meet on its inode lock, where the kernel
 * spins the waiter on its CPU (rwsem_spin_on_owner: 13% of a run's samples) and sleeping on a
 * mutex instead costs a wake-up per block; so a thread that finds the lock taken computes its
 * next block, and waits only when both its buffers hold blocks to write. */
static pthread_mutex_t write_lock = PTHREAD_MUTEX_INITIALIZER;

static int pwrite_all(int fd, const char *data, int64_t nbytes, int64_t offset) {
    while (nbytes > 0) {
        ssize_t done = pwrite(fd, data, (size_t)nbytes, offset);
        if (done < 0 && errno == EINTR) continue;
        if (done <= 0) return done < 0 ? errno : EIO; /* 0: no progress, do not spin */
        data += done, offset += done, nbytes -= done;
    }
    return 0;
}

/* Write the pending blocks, if the lock is free (or, with wait, once it is). Returns 0 or the
 * errno of a failed write. */
static int flush(int fd, pending_t *pending, int *count, int wait) {
    if (*count == 0) return 0;
    if (wait) pthread_mutex_lock(&write_lock);
    else if (pthread_mutex_trylock(&write_lock) != 0) return 0;
    int error = 0;
    for (int i = 0; i < *count && !error; i++)
        error = pwrite_all(fd, pending[i].data, pending[i].nbytes, pending[i].offset);
    pthread_mutex_unlock(&write_lock);
    *count = 0;
    return error;
}

static int64_t run_to_file(const path_t *path, sink_t *sink, int out_dtype, const void *ref,
                           int ref_dtype, const void *mem, int mem_dtype, const void *prev,
                           int prev_dtype, int64_t n, const coeffs_t *k) {
    int64_t step = sink->block / ITEMSIZE[out_dtype], bad = 0;
    pending_t pending[2];
    int count = 0, error = 0, half = 0;
    for (int64_t s = 0; s < n && !error; s += step, half ^= 1) {
        int64_t len = n - s < step ? n - s : step;
        char *buffer = sink->buffer + half * sink->block;
        bad += run(path, buffer, out_dtype, at(ref, ref_dtype, s), ref_dtype,
                   at(mem, mem_dtype, s), mem_dtype, at(prev, prev_dtype, s), prev_dtype, len, k);
        pending[count++] = (pending_t){buffer, len * ITEMSIZE[out_dtype],
                                       sink->offset + s * ITEMSIZE[out_dtype]};
        error = flush(sink->fd, pending, &count, count == 2);
    }
    if (!error) error = flush(sink->fd, pending, &count, 1);
    if (error) {
        sink->error = error;
        return MOX_WRITE_FAILED;
    }
    return bad;
}

/* The loop (into `out`, or through `sink` where given) under the SIGBUS guard and the
 * default MXCSR. */
static int64_t guarded(void *out, sink_t *sink, int out_dtype, const void *ref, int ref_dtype,
                       const void *mem, int mem_dtype, const void *prev, int prev_dtype,
                       int64_t n, float a, float b, float e, float c, uint32_t nan_bits) {
    coeffs_t k = {a, b, e, c, nan_bits, prev != 0};
    const path_t *path = &PATHS[moxkit_cpu_path()];
#ifdef HAVE_VECTOR_PATHS
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(0x1F80); /* all exceptions masked, round to nearest even, no FTZ/DAZ */
#endif
    sigjmp_buf jump;
    volatile int64_t result = MOX_INPUT_CHANGED;
    guard_enter();
    if (sigsetjmp(jump, 1) == 0) {
        guard_jump = &jump;
        if (sink)
            result = run_to_file(path, sink, out_dtype, ref, ref_dtype, mem, mem_dtype, prev,
                                 prev_dtype, n, &k);
        else
            result = run(path, out, out_dtype, ref, ref_dtype, mem, mem_dtype, prev, prev_dtype,
                         n, &k);
    }
    guard_jump = 0;
    guard_leave();
#ifdef HAVE_VECTOR_PATHS
    _mm_setcsr(csr);
#endif
    return result;
}

/* out = the contract applied to ref, mem (and prev, unless NULL), n elements of the given
 * dtypes (0 fp32, 1 bf16, 2 fp16). Returns how many stored values are not finite, or
 * MOX_INPUT_CHANGED (-1) when reading an input faulted (its file shrank while mapped). */
int64_t moxkit_extrapolate(void *out, int out_dtype, const void *ref, int ref_dtype,
                           const void *mem, int mem_dtype, const void *prev, int prev_dtype,
                           int64_t n, float a, float b, float e, float c, uint32_t nan_bits) {
    return guarded(out, 0, out_dtype, ref, ref_dtype, mem, mem_dtype, prev, prev_dtype, n, a, b,
                   e, c, nan_bits);
}

/* The same result written to file descriptor fd at byte `offset` onwards, `block` bytes per
 * write (a multiple of 4). Returns as moxkit_extrapolate, or MOX_WRITE_FAILED (-2) with the
 * write's errno in *error; bytes before the failed write may have been written. */
int64_t moxkit_extrapolate_to_file(int fd, int64_t offset, int64_t block, int out_dtype,
                                   const void *ref, int ref_dtype, const void *mem,
                                   int mem_dtype, const void *prev, int prev_dtype, int64_t n,
                                   float a, float b, float e, float c, uint32_t nan_bits,
                                   int *error) {
    sink_t sink = {fd, offset, block, malloc(2 * (size_t)block), 0};
    if (!sink.buffer) {
        *error = ENOMEM;
        return MOX_WRITE_FAILED;
    }
    int64_t result = guarded(0, &sink, out_dtype, ref, ref_dtype, mem, mem_dtype, prev,
                             prev_dtype, n, a, b, e, c, nan_bits);
    free(sink.buffer);
    *error = sink.error;
    return result;
}
