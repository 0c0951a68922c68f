/* Shared pieces of the CPU decode kernels: weight descriptors, dot products, attention.
 *
 * A dot product of an input row with a weight row always runs the same arithmetic in the
 * same order (two 8-wide FMA accumulators over k in stripes of 16, a fixed reduction tree,
 * then the scalar tail), whoever calls it and in whichever 2x2 tile of rows it is computed:
 * that is what makes every kernel batch-invariant.
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
static inline v8f tm_ldi8(const int8_t* p) { v8b v; memcpy(&v, p, 8); return __builtin_convertvector(v, v8f); }
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

/* Up to 2 input rows (xa, xb) against up to 2 weight rows (wa, wb) at once: o[i*2 + j] =
 * dot(x_i, w_j). Each of the four dot products keeps its own two accumulators (k = 0 and 8
 * mod 16), so its arithmetic is the same whatever tile it is computed in; the tile only
 * shares the loads. WT: 0 = float weights, 1 = int8 weights (scaled by the caller). */
#define TM_LDW(WT, p, k) ((WT) ? tm_ldi8((const int8_t*)(p) + (k)) : tm_ld((const float*)(p) + (k)))
#define TM_SCALAR_W(WT, p, k) ((WT) ? (float)((const int8_t*)(p))[k] : ((const float*)(p))[k])

__attribute__((always_inline)) static inline void tm_tile(int WT, const float* xa, const float* xb,
                                                          const void* wa, const void* wb, int K,
                                                          float o[4]) {
    int K16 = K & ~15, K8 = K & ~7, k = 0;
    v8f a00 = {0}, a01 = {0}, b00 = {0}, b01 = {0}, a10 = {0}, a11 = {0}, b10 = {0}, b11 = {0};
    for (; k < K16; k += 16) {
        v8f w0 = TM_LDW(WT, wa, k), w1 = TM_LDW(WT, wa, k + 8);
        v8f x0 = tm_ld(xa + k), x1 = tm_ld(xa + k + 8);
        a00 = tm_fma(x0, w0, a00);
        a01 = tm_fma(x1, w1, a01);
        if (xb) {
            v8f y0 = tm_ld(xb + k), y1 = tm_ld(xb + k + 8);
            a10 = tm_fma(y0, w0, a10);
            a11 = tm_fma(y1, w1, a11);
            if (wb) {
                v8f u0 = TM_LDW(WT, wb, k), u1 = TM_LDW(WT, wb, k + 8);
                b00 = tm_fma(x0, u0, b00);
                b01 = tm_fma(x1, u1, b01);
                b10 = tm_fma(y0, u0, b10);
                b11 = tm_fma(y1, u1, b11);
            }
        } else if (wb) {
            v8f u0 = TM_LDW(WT, wb, k), u1 = TM_LDW(WT, wb, k + 8);
            b00 = tm_fma(x0, u0, b00);
            b01 = tm_fma(x1, u1, b01);
        }
    }
    if (k < K8) {
        v8f w0 = TM_LDW(WT, wa, k), x0 = tm_ld(xa + k);
        a00 = tm_fma(x0, w0, a00);
        if (xb) a10 = tm_fma(tm_ld(xb + k), w0, a10);
        if (wb) {
            v8f u0 = TM_LDW(WT, wb, k);
            b00 = tm_fma(x0, u0, b00);
            if (xb) b10 = tm_fma(tm_ld(xb + k), u0, b10);
        }
        k += 8;
    }
    float s00 = tm_hsum(a00 + a01), s01 = tm_hsum(b00 + b01);
    float s10 = tm_hsum(a10 + a11), s11 = tm_hsum(b10 + b11);
    for (; k < K; k++) {
        float w0 = TM_SCALAR_W(WT, wa, k), u0 = wb ? TM_SCALAR_W(WT, wb, k) : 0.0f;
        s00 += xa[k] * w0;
        s01 += xa[k] * u0;
        if (xb) {
            s10 += xb[k] * w0;
            s11 += xb[k] * u0;
        }
    }
    o[0] = s00;
    o[1] = s01;
    o[2] = s10;
    o[3] = s11;
}

static inline float tm_dot_f32(const float* x, const float* w, int K) {
    float o[4];
    tm_tile(0, x, 0, w, 0, K, o);
    return o[0];
}

static inline float tm_dot_i8(const float* x, const int8_t* q, int K) {
    float o[4];
    tm_tile(1, x, 0, q, 0, K, o);
    return o[0];
}

/* xd: x de-interleaved per group ([x0 x2 ... | x1 x3 ...]); xsum: per-group sums of x. */
static inline float tm_dot_i4(const float* xd, const float* xsum, const uint8_t* p,
                              const float* scale, const float* zero, int K, int gs) {
    const v8u lo_mask = {15, 15, 15, 15, 15, 15, 15, 15};
    int half = gs / 2;
    float s = 0.0f;
    for (int g = 0; g < K / gs; g++) {
        const float* xe = xd + g * gs;
        const float* xo = xe + half;
        const uint8_t* pg = p + g * half;
        v8f a0 = {0}, a1 = {0};
        for (int i = 0; i < half; i += 8) {
            v8u b;
            memcpy(&b, pg + i, 8);
            a0 += tm_ld(xe + i) * __builtin_convertvector(b & lo_mask, v8f);
            a1 += tm_ld(xo + i) * __builtin_convertvector(b >> 4, v8f);
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

/* Rows na and nb (nb < 0: none) of W against input rows a and b (xb == NULL: none):
 * o[i*2 + j] = dot(x_i, W[n_j]), the same bits as tm_row_dot gives for each. */
static inline void tm_row_tile(const tm_weight* w, int na, int nb, const float* xa, const float* xb,
                               const float* x4a, const float* x4b, const float* xsa, const float* xsb,
                               float o[4]) {
    if (w->kind == TM_INT4) {
        o[0] = tm_row_dot(w, na, xa, x4a, xsa);
        o[1] = nb >= 0 ? tm_row_dot(w, nb, xa, x4a, xsa) : 0.0f;
        o[2] = xb ? tm_row_dot(w, na, xb, x4b, xsb) : 0.0f;
        o[3] = xb && nb >= 0 ? tm_row_dot(w, nb, xb, x4b, xsb) : 0.0f;
        return;
    }
    int K = w->K, i8 = w->kind == TM_INT8;
    size_t es = i8 ? 1 : 4;
    const char* base = (const char*)w->w;
    const void* wa = base + (size_t)na * K * es;
    const void* wb = nb >= 0 ? base + (size_t)nb * K * es : 0;
    if (i8) {
        tm_tile(1, xa, xb, wa, wb, K, o);
        o[0] *= w->scale[na];
        o[2] *= w->scale[na];
        if (nb >= 0) {
            o[1] *= w->scale[nb];
            o[3] *= w->scale[nb];
        }
    } else {
        tm_tile(0, xa, xb, wa, wb, K, o);
    }
}

/* y[m, n] (+)= dot(x[m], W[n]) for n in [n0, n1) and all M rows, in 2x2 tiles.
 * x4 / xs (rows ld4 / lds apart): the int4 inputs of each row, else unused. */
static inline void tm_lin_rows(const tm_weight* w, int n0, int n1, const float* x, int ldx,
                               const float* x4, int ld4, const float* xs, int lds, int M,
                               float* y, int ldy, int accumulate) {
    for (int n = n0; n < n1; n += 2) {
        int nb = n + 1 < n1 ? n + 1 : -1;
        for (int m = 0; m < M; m += 2) {
            int two = m + 1 < M;
            float o[4];
            tm_row_tile(w, n, nb, x + (int64_t)m * ldx, two ? x + (int64_t)(m + 1) * ldx : 0,
                        x4 + (int64_t)m * ld4, x4 + (int64_t)(m + 1) * ld4, xs + (int64_t)m * lds,
                        xs + (int64_t)(m + 1) * lds, o);
            for (int i = 0; i <= two; i++)
                for (int j = 0; j <= (nb >= 0); j++) {
                    float* dst = y + (int64_t)(m + i) * ldy + n + j;
                    *dst = accumulate ? *dst + o[i * 2 + j] : o[i * 2 + j];
                }
        }
    }
}

/* One query head over S cached slots of kv head g: out (hd) = softmax(q.K * scale) V.
 * kc, vc: (Hkv, nslots, hd); p: S floats of scratch. */
static inline void tm_attend(const float* q, const float* kc, const float* vc, int64_t nslots,
                             const int64_t* slots, int64_t S, int g, int hd, float scale,
                             float* out, float* p) {
    const float* kg = kc + (int64_t)g * nslots * hd;
    const float* vg = vc + (int64_t)g * nslots * hd;
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        p[s] = tm_dot_f32(q, kg + slots[s] * hd, hd) * scale;
        if (p[s] > mx) mx = p[s];
    }
    float sum = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        p[s] = expf(p[s] - mx);
        sum += p[s];
    }
    int d8 = hd & ~7;
    for (int d = 0; d < hd; d++) out[d] = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        const float* v = vg + slots[s] * hd;
        v8f ps = {p[s], p[s], p[s], p[s], p[s], p[s], p[s], p[s]};
        int d = 0;
        for (; d < d8; d += 8) tm_st(out + d, tm_ld(out + d) + ps * tm_ld(v + d));
        for (; d < hd; d++) out[d] += p[s] * v[d];
    }
    float inv = 1.0f / sum;
    for (int d = 0; d < hd; d++) out[d] *= inv;
}

#endif
