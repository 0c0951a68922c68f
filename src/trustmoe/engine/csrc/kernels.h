/* Shared pieces of the CPU decode kernels: weight descriptors, dot products, attention.
 *
 * A dot product of an input row with a weight row always runs the same arithmetic in the
 * same order (four 8-wide FMA accumulators over k in stripes of 32, a fixed reduction tree,
 * then the scalar tail), whoever calls it and whether or not it shares its weight loads with a
 * second input row: that is what makes every kernel batch-invariant.
 */
#ifndef TRUSTMOE_KERNELS_H
#define TRUSTMOE_KERNELS_H
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef int8_t v8b __attribute__((vector_size(8)));
typedef uint8_t v8u __attribute__((vector_size(8)));

enum { TM_F32 = 0, TM_INT8 = 1, TM_INT4 = 2 };

/* One weight matrix W (N, K) as stored:
 *   TM_F32  w: float (N, K)
 *   TM_INT8 w: int8 (N, K), scale (N,): W = q * scale[n]
 *   TM_INT4 w: uint8 (N, K/2), low nibble = even k; scale, zero (N, K/gs):
 *           W = (code - 8) * scale + zero per group of gs inputs (gs % 16 == 0) */
typedef struct {
    int kind, N, K, gs;
    const void* w;
    const float* scale;
    const float* zero;
} tm_weight;

static inline v8f tm_ld(const float* p) { v8f v; memcpy(&v, p, 32); return v; }
static inline void tm_st(float* p, v8f v) { memcpy(p, &v, 32); }
#if defined(__AVX2__)
#include <immintrin.h>
/* 8 int8 -> 8 floats (vpmovsxbd + vcvtdq2ps; the generic form compiles to scalar code) */
static inline v8f tm_ldi8(const int8_t* p) {
    return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
/* 8 bytes -> their low and high nibbles as floats */
static inline void tm_ld_nibbles(const uint8_t* p, v8f* lo, v8f* hi) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    *lo = (v8f)_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    *hi = (v8f)_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
#else
static inline v8f tm_ldi8(const int8_t* p) { v8b v; memcpy(&v, p, 8); return __builtin_convertvector(v, v8f); }
static inline void tm_ld_nibbles(const uint8_t* p, v8f* lo, v8f* hi) {
    const v8u mask = {15, 15, 15, 15, 15, 15, 15, 15};
    v8u b;
    memcpy(&b, p, 8);
    *lo = __builtin_convertvector(b & mask, v8f);
    *hi = __builtin_convertvector(b >> 4, v8f);
}
#endif
/* 8 fp16 values -> 8 floats (one F16C instruction where the build has it) */
#if defined(__F16C__)
#include <immintrin.h>
static inline v8f tm_ldh(const _Float16* p) {
    return (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}
#else
static inline v8f tm_ldh(const _Float16* p) {
    v8f v;
    for (int i = 0; i < 8; i++) v[i] = (float)p[i];
    return v;
}
#endif

static inline float tm_hsum(v8f a) {
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

#if defined(__FMA__) && defined(__AVX__)
#include <immintrin.h>
static inline v8f tm_fma(v8f a, v8f b, v8f c) {
    return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
#else
static inline v8f tm_fma(v8f a, v8f b, v8f c) { return a * b + c; }
#endif

/* One weight row w against R (1..TM_ROWS) input rows x[0..R-1]: o[i] = dot(x[i], w).
 * Each dot product keeps its own accumulators, so its arithmetic is the same alone or grouped;
 * grouping only shares the weight loads (and, for int8, their conversion to float).
 *   AVX-512: two 16-wide accumulators (k = 0 and 16 mod 32), up to 8 rows at once;
 *   otherwise: four 8-wide accumulators (k = 0, 8, 16, 24 mod 32), up to 4 rows at once;
 * then a fixed reduction tree and the scalar tail in k order.
 * WT: 0 = float weights, 1 = int8 weights (scaled by the caller).
 * Call with constant WT and R (tm_tile_r) so each combination compiles to its own tile. */
#define TM_LDW(WT, p, k) ((WT) ? tm_ldi8((const int8_t*)(p) + (k)) : tm_ld((const float*)(p) + (k)))
#define TM_SCALAR_W(WT, p, k) ((WT) ? (float)((const int8_t*)(p))[k] : ((const float*)(p))[k])
#if defined(__AVX512F__)
#define TM_ROWS 8
typedef float v16f __attribute__((vector_size(64)));
static inline v16f tm_ld16(const float* p) { v16f v; memcpy(&v, p, 64); return v; }
static inline v16f tm_ldi8_16(const int8_t* p) {
    return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline v16f tm_fma16(v16f a, v16f b, v16f c) {
    return (v16f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
#define TM_LDW16(WT, p, k) ((WT) ? tm_ldi8_16((const int8_t*)(p) + (k)) : tm_ld16((const float*)(p) + (k)))

__attribute__((always_inline)) static inline void tm_tile(int WT, int R, const float* const* x,
                                                          const void* w, int K, float* o) {
    int K32 = K & ~31, k = 0;
    v16f acc[TM_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = (v16f){0};
    for (; k < K32; k += 32) {
        v16f w0 = TM_LDW16(WT, w, k), w1 = TM_LDW16(WT, w, k + 16);
        for (int r = 0; r < R; r++) {
            acc[r][0] = tm_fma16(tm_ld16(x[r] + k), w0, acc[r][0]);
            acc[r][1] = tm_fma16(tm_ld16(x[r] + k + 16), w1, acc[r][1]);
        }
    }
    float s[TM_ROWS];
    for (int r = 0; r < R; r++) {
        v16f t = acc[r][0] + acc[r][1];
        v8f lo, hi;
        memcpy(&lo, &t, 32);
        memcpy(&hi, (const char*)&t + 32, 32);
        s[r] = tm_hsum(lo + hi);
    }
    for (; k < K; k++) {
        float wk = TM_SCALAR_W(WT, w, k);
        for (int r = 0; r < R; r++) s[r] += x[r][k] * wk;
    }
    for (int r = 0; r < R; r++) o[r] = s[r];
}
#else
#define TM_ROWS 4
__attribute__((always_inline)) static inline void tm_tile(int WT, int R, const float* const* x,
                                                          const void* w, int K, float* o) {
    int K32 = K & ~31, K8 = K & ~7, k = 0;
    v8f acc[TM_ROWS][4];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = (v8f){0};
    for (; k < K32; k += 32) {
        v8f w0 = TM_LDW(WT, w, k), w1 = TM_LDW(WT, w, k + 8);
        v8f w2 = TM_LDW(WT, w, k + 16), w3 = TM_LDW(WT, w, k + 24);
        for (int r = 0; r < R; r++) {
            acc[r][0] = tm_fma(tm_ld(x[r] + k), w0, acc[r][0]);
            acc[r][1] = tm_fma(tm_ld(x[r] + k + 8), w1, acc[r][1]);
            acc[r][2] = tm_fma(tm_ld(x[r] + k + 16), w2, acc[r][2]);
            acc[r][3] = tm_fma(tm_ld(x[r] + k + 24), w3, acc[r][3]);
        }
    }
    for (; k < K8; k += 8) {
        v8f w0 = TM_LDW(WT, w, k);
        for (int r = 0; r < R; r++) acc[r][0] = tm_fma(tm_ld(x[r] + k), w0, acc[r][0]);
    }
    float s[TM_ROWS];
    for (int r = 0; r < R; r++) s[r] = tm_hsum((acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]));
    for (; k < K; k++) {
        float wk = TM_SCALAR_W(WT, w, k);
        for (int r = 0; r < R; r++) s[r] += x[r][k] * wk;
    }
    for (int r = 0; r < R; r++) o[r] = s[r];
}
#endif

/* tm_tile with R known at compile time in each branch */
#define TM_TILE_CASE(WT, n) case n: tm_tile(WT, n, x, w, K, o); break;
static inline void tm_tile_r(int WT, int R, const float* const* x, const void* w, int K, float* o) {
    if (WT) {
        switch (R) {
            TM_TILE_CASE(1, 1) TM_TILE_CASE(1, 2) TM_TILE_CASE(1, 3) TM_TILE_CASE(1, 4)
#if TM_ROWS > 4
            TM_TILE_CASE(1, 5) TM_TILE_CASE(1, 6) TM_TILE_CASE(1, 7) TM_TILE_CASE(1, 8)
#endif
        }
    } else {
        switch (R) {
            TM_TILE_CASE(0, 1) TM_TILE_CASE(0, 2) TM_TILE_CASE(0, 3) TM_TILE_CASE(0, 4)
#if TM_ROWS > 4
            TM_TILE_CASE(0, 5) TM_TILE_CASE(0, 6) TM_TILE_CASE(0, 7) TM_TILE_CASE(0, 8)
#endif
        }
    }
}

/* One input row x against two weight rows wa, wb: o[j] = dot(x, w_j), each with exactly the
 * arithmetic of tm_tile(WT, 1, ...) (the rows only share the loads of x and run side by side:
 * at one input row the dot products are bound by instructions, not memory). */
__attribute__((always_inline)) static inline void tm_tile_2w(int WT, const float* x, const void* wa,
                                                             const void* wb, int K, float* o) {
#if defined(__AVX512F__)
    int K32 = K & ~31, k = 0;
    v16f a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};
    const char* ahead = (const char*)wb + (WT ? K : 4 * K);  /* the next pair of rows */
    for (; k < K32; k += 32) {
        if (WT) {
            __builtin_prefetch(ahead + 2 * k);
        } else {
            __builtin_prefetch(ahead + 8 * k);
            __builtin_prefetch(ahead + 8 * k + 64);
            __builtin_prefetch(ahead + 8 * k + 128);
            __builtin_prefetch(ahead + 8 * k + 192);
        }
        v16f x0 = tm_ld16(x + k), x1 = tm_ld16(x + k + 16);
        a0 = tm_fma16(x0, TM_LDW16(WT, wa, k), a0);
        a1 = tm_fma16(x1, TM_LDW16(WT, wa, k + 16), a1);
        b0 = tm_fma16(x0, TM_LDW16(WT, wb, k), b0);
        b1 = tm_fma16(x1, TM_LDW16(WT, wb, k + 16), b1);
    }
    v16f ta = a0 + a1, tb = b0 + b1;
    v8f la, ha, lb, hb;
    memcpy(&la, &ta, 32);
    memcpy(&ha, (const char*)&ta + 32, 32);
    memcpy(&lb, &tb, 32);
    memcpy(&hb, (const char*)&tb + 32, 32);
    float sa = tm_hsum(la + ha), sb = tm_hsum(lb + hb);
#else
    int K32 = K & ~31, K8 = K & ~7, k = 0;
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    for (; k < K32; k += 32) {
        v8f x0 = tm_ld(x + k), x1 = tm_ld(x + k + 8), x2 = tm_ld(x + k + 16), x3 = tm_ld(x + k + 24);
        a0 = tm_fma(x0, TM_LDW(WT, wa, k), a0);
        a1 = tm_fma(x1, TM_LDW(WT, wa, k + 8), a1);
        a2 = tm_fma(x2, TM_LDW(WT, wa, k + 16), a2);
        a3 = tm_fma(x3, TM_LDW(WT, wa, k + 24), a3);
        b0 = tm_fma(x0, TM_LDW(WT, wb, k), b0);
        b1 = tm_fma(x1, TM_LDW(WT, wb, k + 8), b1);
        b2 = tm_fma(x2, TM_LDW(WT, wb, k + 16), b2);
        b3 = tm_fma(x3, TM_LDW(WT, wb, k + 24), b3);
    }
    for (; k < K8; k += 8) {
        v8f x0 = tm_ld(x + k);
        a0 = tm_fma(x0, TM_LDW(WT, wa, k), a0);
        b0 = tm_fma(x0, TM_LDW(WT, wb, k), b0);
    }
    float sa = tm_hsum((a0 + a1) + (a2 + a3)), sb = tm_hsum((b0 + b1) + (b2 + b3));
#endif
    for (; k < K; k++) {
        sa += x[k] * TM_SCALAR_W(WT, wa, k);
        sb += x[k] * TM_SCALAR_W(WT, wb, k);
    }
    o[0] = sa;
    o[1] = sb;
}

static inline float tm_dot_f32(const float* x, const float* w, int K) {
    float o[1];
    tm_tile(0, 1, &x, w, K, o);
    return o[0];
}

static inline float tm_dot_i8(const float* x, const int8_t* q, int K) {
    float o[1];
    tm_tile(1, 1, &x, q, K, o);
    return o[0];
}

/* xd: x de-interleaved per group ([x0 x2 ... | x1 x3 ...]); xsum: per-group sums of x. */
static inline float tm_dot_i4(const float* xd, const float* xsum, const uint8_t* p,
                              const float* scale, const float* zero, int K, int gs) {
    int half = gs / 2;
    float s = 0.0f;
    for (int g = 0; g < K / gs; g++) {
        const float* xe = xd + g * gs;
        const float* xo = xe + half;
        const uint8_t* pg = p + g * half;
        v8f a0 = {0}, a1 = {0};
        for (int i = 0; i < half; i += 8) {
            v8f lo, hi;
            tm_ld_nibbles(pg + i, &lo, &hi);
            a0 = tm_fma(tm_ld(xe + i), lo, a0);
            a1 = tm_fma(tm_ld(xo + i), hi, a1);
        }
        s += scale[g] * tm_hsum(a0 + a1) + (zero[g] - 8.0f * scale[g]) * xsum[g];
    }
    return s;
}

/* De-interleave one input row per group and sum each group (int4 inputs). */
static inline void tm_int4_prepare(const float* x, int K, int gs, float* xd, float* xsum) {
    int half = gs / 2;
    for (int g = 0; g < K / gs; g++) {
        const float* xg = x + g * gs;
        float s = 0.0f;
        for (int i = 0; i < half; i++) {
            xd[g * gs + i] = xg[2 * i];
            xd[g * gs + half + i] = xg[2 * i + 1];
        }
        for (int i = 0; i < gs; i++) s += xg[i];
        xsum[g] = s;
    }
}

/* Row n of W dotted with an input row (x for f32/int8; xd, xsum for int4). */
static inline float tm_row_dot(const tm_weight* w, int n, const float* x, const float* xd,
                               const float* xsum) {
    if (w->kind == TM_F32) return tm_dot_f32(x, (const float*)w->w + (int64_t)n * w->K, w->K);
    if (w->kind == TM_INT8)
        return tm_dot_i8(x, (const int8_t*)w->w + (int64_t)n * w->K, w->K) * w->scale[n];
    int G = w->K / w->gs;
    return tm_dot_i4(xd, xsum, (const uint8_t*)w->w + (int64_t)n * (w->K / 2),
                     w->scale + (int64_t)n * G, w->zero + (int64_t)n * G, w->K, w->gs);
}

/* Row n of W against R input rows (x for f32/int8; x4, xs for int4): o[i] = dot(x_i, W[n]),
 * the same bits as tm_row_dot gives for each. */
static inline void tm_row_multi(const tm_weight* w, int n, int R, const float* const* x,
                                const float* const* x4, const float* const* xs, float* o) {
    if (w->kind == TM_INT4) {
        for (int r = 0; r < R; r++) o[r] = tm_row_dot(w, n, x[r], x4[r], xs[r]);
        return;
    }
    int K = w->K;
    if (w->kind == TM_INT8) {
        tm_tile_r(1, R, x, (const int8_t*)w->w + (int64_t)n * K, K, o);
        for (int r = 0; r < R; r++) o[r] *= w->scale[n];
    } else {
        tm_tile_r(0, R, x, (const float*)w->w + (int64_t)n * K, K, o);
    }
}

/* Rows n and n + 1 of W against one input row (f32/int8 only): the same bits as
 * tm_row_multi gives for each. */
static inline void tm_rows2_one(const tm_weight* w, int n, const float* x, float* o) {
    int64_t K = w->K;
    if (w->kind == TM_INT8) {
        const int8_t* q = (const int8_t*)w->w + n * K;
        tm_tile_2w(1, x, q, q + K, (int)K, o);
        o[0] *= w->scale[n];
        o[1] *= w->scale[n + 1];
    } else {
        const float* f = (const float*)w->w + n * K;
        tm_tile_2w(0, x, f, f + K, (int)K, o);
    }
}

/* y[m, n] (+)= dot(x[m], W[n]) for n in [n0, n1) and all M rows, TM_ROWS input rows at a time.
 * (Pairs of weight rows would share input loads too, but two weight streams per thread read
 * memory ~35% slower than one: the weights are what decode waits for.)
 * x4 / xs (rows ld4 / lds apart): the int4 inputs of each row, else unused. */
static inline void tm_lin_rows(const tm_weight* w, int n0, int n1, const float* x, int ldx,
                               const float* x4, int ld4, const float* xs, int lds, int M,
                               float* y, int ldy, int accumulate) {
    const float *xr[64], *x4r[64], *xsr[64];  /* row pointers, set once (M <= 64) */
    for (int m = 0; m < M; m++) {
        xr[m] = x + (int64_t)m * ldx;
        x4r[m] = x4 + (int64_t)m * ld4;
        xsr[m] = xs + (int64_t)m * lds;
    }
    int n = n0;
    if (M == 1 && w->kind != TM_INT4)  /* one input row: two weight rows side by side */
        for (; n + 1 < n1; n += 2) {
            float o[2];
            tm_rows2_one(w, n, x, o);
            y[n] = accumulate ? y[n] + o[0] : o[0];
            y[n + 1] = accumulate ? y[n + 1] + o[1] : o[1];
        }
    for (; n < n1; n++) {
        for (int m = 0; m < M; m += TM_ROWS) {
            int R = M - m < TM_ROWS ? M - m : TM_ROWS;
            float o[TM_ROWS];
            tm_row_multi(w, n, R, xr + m, x4r + m, xsr + m, o);
            for (int i = 0; i < R; i++) {
                float* dst = y + (int64_t)(m + i) * ldy + n;
                *dst = accumulate ? *dst + o[i] : o[i];
            }
        }
    }
}

/* exp(x) for 8 floats at once (x <= 88; below -87.3 it gives 0): Cephes' expf, a degree-5
 * polynomial on x - n ln2 times 2^n; within ~2 ulp of expf, and the same bits on every call. */
typedef int32_t v8i __attribute__((vector_size(32)));
static inline v8f tm_exp8(v8f x) {
    const v8f lo = {-87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f};
    v8i dead = x < lo;                               /* all-ones where exp underflows */
    x = (v8f)((v8i)x & ~dead) + (v8f)((v8i)lo & dead);
    v8f fx = x * 1.44269504088896341f + 0.5f;
    v8f t = __builtin_convertvector(__builtin_convertvector(fx, v8i), v8f);
    t = t - __builtin_convertvector((v8i)(t > fx) & 1, v8f);  /* floor */
    v8f r = x - t * 0.693359375f;
    r = r - t * -2.12194440e-4f;
    v8f y = (v8f){0} + 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    v8i e = (__builtin_convertvector(t, v8i) + 127) << 23;
    return (v8f)((v8i)(y * (v8f)e) & ~dead);
}

/* out (nr, hd) = sum_s p[r * S + s] * V[slot s] for nr query heads, the accumulators of a
 * head size known at compile time (NR heads x HD8 vectors) kept in registers over all slots.
 * Each output element is a fused multiply-add chain over the slots in order, as in
 * tm_attend_v_any. */
__attribute__((always_inline)) static inline void tm_attend_v(int NRH, int HD8, int KV16,
                                                              const float* p, int64_t S,
                                                              const void* vg, const int64_t* slots,
                                                              float* out) {
    v8f acc[2][16];
    for (int r = 0; r < NRH; r++)
        for (int j = 0; j < HD8; j++) acc[r][j] = (v8f){0};
    for (int64_t s = 0; s < S; s++) {
        int64_t off = slots[s] * (HD8 * 8);
        for (int r = 0; r < NRH; r++) {
            v8f ps = (v8f){0} + p[r * S + s];
            for (int j = 0; j < HD8; j++)
                acc[r][j] = tm_fma(ps, KV16 ? tm_ldh((const _Float16*)vg + off + 8 * j)
                                            : tm_ld((const float*)vg + off + 8 * j), acc[r][j]);
        }
    }
    for (int r = 0; r < NRH; r++)
        for (int j = 0; j < HD8; j++) tm_st(out + r * HD8 * 8 + 8 * j, acc[r][j]);
}

static inline void tm_attend_v_any(int nr, int hd, int kv16, const float* p, int64_t S,
                                   const void* vg, const int64_t* slots, float* out) {
    int d8 = hd & ~7;
    for (int i = 0; i < nr * hd; i++) out[i] = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        const float* v = (const float*)vg + slots[s] * hd;
        const _Float16* vh = (const _Float16*)vg + slots[s] * hd;
        for (int r = 0; r < nr; r++) {
            float* o = out + (int64_t)r * hd;
            float pv = p[r * S + s];
            v8f ps = (v8f){0} + pv;
            int d = 0;
            for (; d < d8; d += 8) tm_st(o + d, tm_fma(ps, kv16 ? tm_ldh(vh + d) : tm_ld(v + d), tm_ld(o + d)));
            for (; d < hd; d++) o[d] += pv * (kv16 ? (float)vh[d] : v[d]);
        }
    }
}

/* The sums of 8 vectors' lanes, one per output lane: out[i] = ((a_i[0] + a_i[1]) +
 * (a_i[2] + a_i[3])) + ((a_i[4] + a_i[5]) + (a_i[6] + a_i[7])), the same order for every lane
 * and every build (three horizontal adds and a cross-half add where AVX has them), so a key's
 * score does not depend on which keys share its block. */
static inline v8f tm_hsum8(const v8f* a) {
#if defined(__AVX__)
    __m256 t0 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]), t1 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
    __m256 t2 = _mm256_hadd_ps((__m256)a[4], (__m256)a[5]), t3 = _mm256_hadd_ps((__m256)a[6], (__m256)a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  /* lanes 0-3: low halves */
    return (v8f)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
    v8f o;
    for (int i = 0; i < 8; i++)
        o[i] = ((a[i][0] + a[i][1]) + (a[i][2] + a[i][3])) + ((a[i][4] + a[i][5]) + (a[i][6] + a[i][7]));
    return o;
#endif
}

/* pr[s] = dot(q, K[slot s]) * scale for one query head, HD8 * 8 = hd known at compile time:
 * 8 keys at a time, each key's dot one FMA chain over hd in order, then tm_hsum8. */
__attribute__((always_inline)) static inline void tm_scores(int HD8, int KV16, const float* q,
                                                            const void* kg, const int64_t* slots,
                                                            int64_t S, float scale, float* pr) {
    v8f qv[16];
    for (int j = 0; j < HD8; j++) qv[j] = tm_ld(q + 8 * j);
    for (int64_t s0 = 0; s0 < S; s0 += 8) {
        int n = S - s0 < 8 ? (int)(S - s0) : 8;
        v8f acc[8];
        for (int i = 0; i < 8; i++) acc[i] = (v8f){0};
        for (int i = 0; i < n; i++) {
            int64_t off = slots[s0 + i] * (HD8 * 8);
            for (int j = 0; j < HD8; j++)
                acc[i] = tm_fma(qv[j], KV16 ? tm_ldh((const _Float16*)kg + off + 8 * j)
                                            : tm_ld((const float*)kg + off + 8 * j), acc[i]);
        }
        v8f sc = tm_hsum8(acc) * scale;
        if (n == 8) tm_st(pr + s0, sc);
        else for (int i = 0; i < n; i++) pr[s0 + i] = sc[i];
    }
}

/* The `rep` query heads q (rep, hd) that share kv head g, over S cached slots:
 * out (rep, hd) = softmax(q.K * scale) V, reading each cached key and value once for all of
 * them. kc, vc: (Hkv, nslots, hd) floats, or fp16 values when kv16; p: rep * S floats of
 * scratch. Each head's result does not
 * depend on the others (its own dot products, exponentials and sums in a fixed order). */
static inline void tm_attend(const float* q, int rep, const void* kc, const void* vc, int kv16,
                             int64_t nslots, const int64_t* slots, int64_t S, int g, int hd,
                             float scale, float* out, float* p) {
    int64_t es = kv16 ? 2 : 4, base = (int64_t)g * nslots * hd * es;
    const void* kg = (const char*)kc + base;
    const void* vg = (const char*)vc + base;
    if (hd == 64 || hd == 128) {  /* 8 keys at a time */
        for (int r = 0; r < rep; r++) {
            const float* qr = q + (int64_t)r * hd;
            if (hd == 64 && kv16) tm_scores(8, 1, qr, kg, slots, S, scale, p + r * S);
            else if (hd == 64) tm_scores(8, 0, qr, kg, slots, S, scale, p + r * S);
            else if (kv16) tm_scores(16, 1, qr, kg, slots, S, scale, p + r * S);
            else tm_scores(16, 0, qr, kg, slots, S, scale, p + r * S);
        }
    } else for (int64_t s = 0; s < S; s++) {  /* other head sizes: one key at a time */
        if (kv16) {  /* fp16 keys: widened once, then the float dot product */
            const _Float16* k = (const _Float16*)kg + slots[s] * hd;
            float kf[512];
            int d = 0;
            for (; d + 8 <= hd; d += 8) tm_st(kf + d, tm_ldh(k + d));
            for (; d < hd; d++) kf[d] = (float)k[d];
            for (int r = 0; r < rep; r++) p[r * S + s] = tm_dot_f32(q + (int64_t)r * hd, kf, hd) * scale;
        } else {
            const float* k = (const float*)kg + slots[s] * hd;
            for (int r = 0; r < rep; r++) p[r * S + s] = tm_dot_f32(q + (int64_t)r * hd, k, hd) * scale;
        }
    }
    float inv[64];
    int64_t S8 = S & ~7;
    for (int r = 0; r < rep; r++) {
        float* pr = p + r * S;
        float mx = -INFINITY;
        int64_t s = 0;
#if defined(__AVX__)
        __m256 mv = _mm256_set1_ps(-INFINITY);
        for (; s < S8; s += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(pr + s));
        for (int i = 0; i < 8; i++) mx = ((v8f)mv)[i] > mx ? ((v8f)mv)[i] : mx;
#endif
        for (; s < S; s++) mx = pr[s] > mx ? pr[s] : mx;
        v8f m8 = (v8f){0} + mx, acc = {0};
        s = 0;
        for (; s < S8; s += 8) {
            v8f e = tm_exp8(tm_ld(pr + s) - m8);
            tm_st(pr + s, e);
            acc += e;
        }
        float sum = tm_hsum(acc), tail[8] = {0};
        for (int64_t i = s; i < S; i++) tail[i - s] = pr[i] - mx;
        v8f et = tm_exp8(tm_ld(tail));
        for (int64_t i = s; i < S; i++) {
            pr[i] = et[i - s];
            sum += pr[i];
        }
        inv[r] = 1.0f / sum;
    }
    for (int r = 0; r < rep; r += 2) {  /* values: two query heads per pass over them */
        int nr = rep - r < 2 ? rep - r : 2;
        const float* pr = p + (int64_t)r * S;
        float* o = out + (int64_t)r * hd;
        if (hd == 64 && nr == 2 && !kv16) tm_attend_v(2, 8, 0, pr, S, vg, slots, o);
        else if (hd == 64 && nr == 2) tm_attend_v(2, 8, 1, pr, S, vg, slots, o);
        else if (hd == 64 && !kv16) tm_attend_v(1, 8, 0, pr, S, vg, slots, o);
        else if (hd == 64) tm_attend_v(1, 8, 1, pr, S, vg, slots, o);
        else if (hd == 128 && nr == 2 && !kv16) tm_attend_v(2, 16, 0, pr, S, vg, slots, o);
        else if (hd == 128 && nr == 2) tm_attend_v(2, 16, 1, pr, S, vg, slots, o);
        else if (hd == 128 && !kv16) tm_attend_v(1, 16, 0, pr, S, vg, slots, o);
        else if (hd == 128) tm_attend_v(1, 16, 1, pr, S, vg, slots, o);
        else tm_attend_v_any(nr, hd, kv16, pr, S, vg, slots, o);
    }
    for (int r = 0; r < rep; r++)
        for (int d = 0; d < hd; d++) out[(int64_t)r * hd + d] *= inv[r];
}

/* Threads of the enclosing OpenMP region (torch's pool), and this thread's share of a range. */
#ifdef _OPENMP
extern int omp_get_num_threads(void);
extern int omp_get_thread_num(void);
#define TID omp_get_thread_num()
#define NTH omp_get_num_threads()
#define BARRIER _Pragma("omp barrier")
#else
#define TID 0
#define NTH 1
#define BARRIER
#endif

static inline void range(int n, int t, int T, int* a, int* b) {
    *a = (int)((int64_t)n * t / T);
    *b = (int)((int64_t)n * (t + 1) / T);
}

/* This thread's share (blocks of 4 output rows) of y[m, n] (+)= dot(x[m], W[n]); call inside
 * a parallel region. x4 / xs: the int4 inputs of each row (rows K and K/gs apart), else unused. */
static inline void tm_lin_part(const tm_weight* w, const float* x, int ldx, const float* x4,
                               const float* xs, int M, float* y, int ldy, int accumulate) {
    int nb = (w->N + 3) / 4, b0, b1;
    range(nb, TID, NTH, &b0, &b1);
    int n0 = b0 * 4, n1 = b1 * 4 < w->N ? b1 * 4 : w->N;
    tm_lin_rows(w, n0, n1, x, ldx, x4, w->K, xs, w->gs ? w->K / w->gs : 0, M, y, ldy, accumulate);
}

#endif
