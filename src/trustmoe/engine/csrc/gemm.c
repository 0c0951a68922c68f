/* Prompt-sized matrix products on the CPU: y = x @ W.T for any number of rows of x.
 *
 * Why: prefill is bound by arithmetic, not by reading W. A blocked GEMM (packed panels of W
 * that stay in cache, a register-tiled micro-kernel) reaches most of the machine's FMA peak,
 * where the few-row kernels of matvec.c stream W once per pair of rows. Written here rather
 * than taken from the BLAS because of batch invariance:
 *
 *   every output y[m, n] is ONE fused multiply-add chain over k = 0, 1, ..., K-1 in order
 *   (then, for int8, one multiply by the row scale), whatever M is, wherever row m sits in
 *   the tile grid, and however the K range is blocked (a partial sum kept in y between K
 *   blocks is an exact float, so the chain goes on unchanged).
 *
 * So a row's result has the same bits alone, inside any batch, or inside any expert's share of
 * a step's rows, with no padding to a fixed block size. (MKL picks its kernels by shape and
 * rounds differently for different row counts; it also leaves AVX-512 unused on some CPUs.)
 *
 * Weights are any `tm_weight` (kernels.h): int8 panels are converted to float while packing
 * (exact), the row scale is applied after the chain; int4 panels are dequantized while packing.
 * Threads (torch's OpenMP team) split the output columns in NR-wide panels.
 *
 * Micro-kernel: MR rows x NR columns of accumulators kept in registers; per k one broadcast of
 * each row's x and NR/VW vector loads of the packed W panel. AVX-512: 8 x 32 (16 zmm
 * accumulators); otherwise 6 x 16 on 8-wide vectors (12 ymm with AVX2).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define VW 16
#define MR 8
typedef float vgf __attribute__((vector_size(64)));
static inline vgf g_fma(vgf a, vgf b, vgf c) { return (vgf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#else
#define VW 8
#define MR 6
typedef float vgf __attribute__((vector_size(32)));
static inline vgf g_fma(vgf a, vgf b, vgf c) { return tm_fma(a, b, c); }
#endif
#define NV 2            /* vectors per micro-tile row */
#define NR (NV * VW)    /* micro-tile columns */
#define KC 256          /* K block: one MR x KC panel of x and one KC x NR panel of W in L1 */
#define NC 512          /* columns per packed block of W (KC x NC floats = 512 KiB in L2) */
#define MC 96           /* rows per packed block of x (a multiple of MR) */

static inline vgf g_ld(const float* p) { vgf v; memcpy(&v, p, sizeof v); return v; }
static inline void g_st(float* p, vgf v) { memcpy(p, &v, sizeof v); }

typedef int32_t v8i_t __attribute__((vector_size(32)));

/* Transpose 8 vectors of 8 floats: out[i][j] = in[j][i]. */
static inline void transpose8(v8f r[8]) {
    const v8i_t lo1 = {0, 8, 1, 9, 4, 12, 5, 13}, hi1 = {2, 10, 3, 11, 6, 14, 7, 15};
    const v8i_t lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8i_t lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    v8f t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shuffle(r[i], r[i + 1], lo1);
        t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi1);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = __builtin_shuffle(t[i], t[i + 2], lo2);
        u[i + 1] = __builtin_shuffle(t[i], t[i + 2], hi2);
        u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], lo2);
        u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], hi2);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = __builtin_shuffle(u[i], u[i + 4], lo4);
        r[i + 4] = __builtin_shuffle(u[i], u[i + 4], hi4);
    }
}

/* One weight value W[n][k] as float (int8: the code, unscaled; int4: dequantized). */
static inline float w_at(const tm_weight* w, int n, int k) {
    if (w->kind == TM_F32) return ((const float*)w->w)[(int64_t)n * w->K + k];
    if (w->kind == TM_INT8) return (float)((const int8_t*)w->w)[(int64_t)n * w->K + k];
    const uint8_t* src = (const uint8_t*)w->w + (int64_t)n * (w->K / 2);
    int64_t g = (int64_t)n * (w->K / w->gs) + k / w->gs;
    int code = k & 1 ? src[k >> 1] >> 4 : src[k >> 1] & 15;
    return (float)(code - 8) * w->scale[g] + w->zero[g];
}

/* W rows n0..n0+nc-1, inputs k0..k0+kc-1 as floats, in NR-column panels: panel j holds
 * dst[j*kc*NR + k*NR + c] = W[n0 + j*NR + c][k0 + k] (0 past the last row). Float and int8
 * rows go 8 x 8 at a time through a register transpose; the rest one value at a time. */
static void pack_w(const tm_weight* w, int n0, int nc, int k0, int kc, float* dst) {
    int vec = w->kind != TM_INT4;
    for (int j = 0; j < nc; j += NR) {
        float* pj = dst + (int64_t)j / NR * kc * NR;
        for (int c = 0; c < NR; c += 8) {
            int cols = nc - j - c < 8 ? (nc - j - c > 0 ? nc - j - c : 0) : 8, k = 0;
            if (vec && cols == 8)
                for (; k + 8 <= kc; k += 8) {
                    v8f r[8];
                    for (int i = 0; i < 8; i++) {
                        int64_t off = (int64_t)(n0 + j + c + i) * w->K + k0 + k;
                        r[i] = w->kind == TM_F32 ? tm_ld((const float*)w->w + off)
                                                 : tm_ldi8((const int8_t*)w->w + off);
                    }
                    transpose8(r);
                    for (int i = 0; i < 8; i++) tm_st(pj + (int64_t)(k + i) * NR + c, r[i]);
                }
            for (; k < kc; k++)
                for (int i = 0; i < 8; i++)
                    pj[(int64_t)k * NR + c + i] = i < cols ? w_at(w, n0 + j + c + i, k0 + k) : 0.0f;
        }
    }
}

/* x rows m0..m0+mc-1, inputs k0..k0+kc-1 in MR-row panels: dst[i*kc*MR + k*MR + r] (0 past M) */
static void pack_x(const float* x, int ldx, int m0, int mc, int k0, int kc, float* dst) {
    for (int i = 0; i < mc; i += MR) {
        float* pi = dst + (int64_t)i / MR * kc * MR;
        for (int r = 0; r < MR; r++) {
            if (i + r >= mc) {
                for (int k = 0; k < kc; k++) pi[k * MR + r] = 0.0f;
                continue;
            }
            const float* src = x + (int64_t)(m0 + i + r) * ldx + k0;
            for (int k = 0; k < kc; k++) pi[k * MR + r] = src[k];
        }
    }
}

/* One MR x NR tile: acc = (first ? 0 : y) + sum_k a[k] b[k] (one FMA chain per element);
 * last: times scale[col] when scale is given. Only mr x nr of the tile is read and written. */
static void micro(int kc, const float* a, const float* b, float* y, int ldy, int mr, int nr,
                  int first, const float* scale) {
    float tile[MR * NR] __attribute__((aligned(64)));
    vgf acc[MR][NV];
    if (first) {
        memset(acc, 0, sizeof acc);
    } else {
        memset(tile, 0, sizeof tile);
        for (int r = 0; r < mr; r++) memcpy(tile + r * NR, y + (int64_t)r * ldy, (size_t)nr * sizeof(float));
#pragma GCC unroll 16
        for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) acc[r][v] = g_ld(tile + r * NR + v * VW);
    }
    for (int k = 0; k < kc; k++) {
        vgf b0 = g_ld(b + k * NR), b1 = g_ld(b + k * NR + VW);
#pragma GCC unroll 16
        for (int r = 0; r < MR; r++) {
            vgf av = (vgf){0} + a[k * MR + r];
            acc[r][0] = g_fma(av, b0, acc[r][0]);
            acc[r][1] = g_fma(av, b1, acc[r][1]);
        }
    }
    if (scale) {
        float sc[NR] __attribute__((aligned(64)));
        memset(sc, 0, sizeof sc);
        memcpy(sc, scale, (size_t)nr * sizeof(float));
#pragma GCC unroll 16
        for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) acc[r][v] = acc[r][v] * g_ld(sc + v * VW);
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) g_st(tile + r * NR + v * VW, acc[r][v]);
    for (int r = 0; r < mr; r++) memcpy(y + (int64_t)r * ldy, tile + r * NR, (size_t)nr * sizeof(float));
}

static float* grow(float** buf, int64_t* cap, int64_t n) {
    if (*cap < n) {
        free(*buf);
        *buf = (float*)aligned_alloc(64, (size_t)((n * 4 + 63) / 64 * 64));
        *cap = *buf ? n : 0;
    }
    return *buf;
}

/* y (M, ldy) = x (M, ldx) @ W.T for columns [c0, c1) (a multiple of NR from c0); thread-local
 * packing buffers. Returns 0, or -1 when out of memory (nothing written then). */
static int gemm_part(const tm_weight* w, const float* x, int ldx, int M, float* y, int ldy,
                     int c0, int c1) {
    static __thread float *bp = 0, *ap = 0;
    static __thread int64_t bcap = 0, acap = 0;
    if (c1 <= c0) return 0;
    if (!grow(&bp, &bcap, (int64_t)KC * NC) || !grow(&ap, &acap, (int64_t)KC * MC)) return -1;
    int K = w->K;
    const float* scale = w->kind == TM_INT8 ? w->scale : 0;
    for (int jc = c0; jc < c1; jc += NC) {
        int nc = c1 - jc < NC ? c1 - jc : NC;
        for (int pc = 0; pc < K; pc += KC) {
            int kc = K - pc < KC ? K - pc : KC, first = pc == 0, last = pc + kc == K;
            pack_w(w, jc, nc, pc, kc, bp);
            for (int ic = 0; ic < M; ic += MC) {
                int mc = M - ic < MC ? M - ic : MC;
                pack_x(x, ldx, ic, mc, pc, kc, ap);
                for (int jr = 0; jr < nc; jr += NR) {
                    int nr = nc - jr < NR ? nc - jr : NR;
                    const float* bpan = bp + (int64_t)jr / NR * kc * NR;
                    for (int ir = 0; ir < mc; ir += MR) {
                        int mr = mc - ir < MR ? mc - ir : MR;
                        micro(kc, ap + (int64_t)ir / MR * kc * MR, bpan,
                              y + (int64_t)(ic + ir) * ldy + jc + jr, ldy, mr, nr, first,
                              last && scale ? scale + jc + jr : 0);
                    }
                }
            }
        }
    }
    return 0;
}

/* y (M, ldy) = x (M, ldx) @ W.T, W any tm_weight; M >= 1. Returns 0, or -1 when a thread
 * could not get its packing buffers (the caller falls back). */
int tm_gemm(const tm_weight* w, const float* x, int ldx, int M, float* y, int ldy) {
    int panels = (w->N + NR - 1) / NR, err = 0;
    #pragma omp parallel if ((int64_t)M * w->N * w->K > 262144) reduction(| : err)
    {
        int p0, p1;
        range(panels, TID, NTH, &p0, &p1);
        int c1 = p1 * NR < w->N ? p1 * NR : w->N;
        err |= gemm_part(w, x, ldx, M, y, ldy, p0 * NR, c1) != 0;
    }
    return err ? -1 : 0;
}

int tm_gemm_tile(int* mr, int* nr) {
    *mr = MR;
    *nr = NR;
    return VW;
}
