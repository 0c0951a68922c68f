/* Shared pieces of the CPU decode kernels: weight descriptors, dot products, attention.
 *
 * A dot product of an input row with a weight row always runs the same instructions in the
 * same order (four 8-wide accumulators over k in stripes of 32, a fixed reduction tree, then
 * the scalar tail), whoever calls it: that is what makes every kernel batch-invariant.
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

static inline float tm_dot_f32(const float* x, const float* w, int K) {
    int K32 = K & ~31, K8 = K & ~7, k = 0;
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (; k < K32; k += 32) {
        a0 += tm_ld(x + k) * tm_ld(w + k);
        a1 += tm_ld(x + k + 8) * tm_ld(w + k + 8);
        a2 += tm_ld(x + k + 16) * tm_ld(w + k + 16);
        a3 += tm_ld(x + k + 24) * tm_ld(w + k + 24);
    }
    for (; k < K8; k += 8) a0 += tm_ld(x + k) * tm_ld(w + k);
    float s = tm_hsum((a0 + a1) + (a2 + a3));
    for (; k < K; k++) s += x[k] * w[k];
    return s;
}

static inline float tm_dot_i8(const float* x, const int8_t* q, int K) {
    int K32 = K & ~31, K8 = K & ~7, k = 0;
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (; k < K32; k += 32) {
        a0 += tm_ld(x + k) * tm_ldi8(q + k);
        a1 += tm_ld(x + k + 8) * tm_ldi8(q + k + 8);
        a2 += tm_ld(x + k + 16) * tm_ldi8(q + k + 16);
        a3 += tm_ld(x + k + 24) * tm_ldi8(q + k + 24);
    }
    for (; k < K8; k += 8) a0 += tm_ld(x + k) * tm_ldi8(q + k);
    float s = tm_hsum((a0 + a1) + (a2 + a3));
    for (; k < K; k++) s += x[k] * (float)q[k];
    return s;
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
