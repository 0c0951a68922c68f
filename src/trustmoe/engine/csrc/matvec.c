/* Small-batch matrix products for CPU decoding: y = x @ W.T for few rows of x.
 *
 * Why: at decode time x has 1..16 rows and the product is bound by reading W from memory.
 * MKL's GEMV uses one thread (~12 GB/s here, half the machine's read bandwidth) and its
 * few-row GEMM is ~3x slower per row than its GEMV. These loops read W once, as one
 * sequential stream per thread, and split the output rows across torch's own OpenMP threads
 * (this file is linked against the libgomp that torch has already loaded).
 *
 * Batch invariance: every output y[m, n] is summed in the same order whatever M is (four
 * 8-wide accumulators over k in stripes of 32, combined in a fixed tree, then the scalar
 * tail), so a row's result has the same bits alone or inside any batch.
 *
 * Layouts (all row-major, contiguous rows):
 *   f32:  W (N, K) float.
 *   int8: Q (N, K) int8, scale (N,): W = Q * scale[n].
 *   int4: P (N, K/2) uint8, two 4-bit codes a byte, low nibble = even k (gpt-fast layout);
 *         scale, zero (N, K/gs): W = (code - 8) * scale + zero per group of gs inputs.
 *         The caller passes x de-interleaved per row ([x0 x2 x4 ...| x1 x3 ...] per group)
 *         and the per-group sums of x.
 */
#include "kernels.h"

#define PAR_MIN_WORK 32768  /* below this many multiply-adds one thread is faster */

void tm_mm_f32(const float* x, int ldx, const float* w, int K, int N, float* y, int ldy, int M) {
    tm_weight d = {TM_F32, N, K, 0, w, 0, 0};
    #pragma omp parallel if ((int64_t)N * K * M > PAR_MIN_WORK)
    {
        tm_lin_part(&d, x, ldx, x, x, M, y, ldy, 0);
    }
}

void tm_mm_i8(const float* x, int ldx, const int8_t* q, const float* scale, int K, int N,
              float* y, int ldy, int M) {
    tm_weight d = {TM_INT8, N, K, 0, q, scale, 0};
    #pragma omp parallel if ((int64_t)N * K * M > PAR_MIN_WORK)
    {
        tm_lin_part(&d, x, ldx, x, x, M, y, ldy, 0);
    }
}

/* xd: (M, K) de-interleaved x; xsum: (M, K/gs) group sums of x. */
void tm_mm_i4(const float* xd, const float* xsum, const uint8_t* p, const float* scale,
              const float* zero, int K, int N, int gs, float* y, int ldy, int M) {
    tm_weight d = {TM_INT4, N, K, gs, p, scale, zero};
    #pragma omp parallel if ((int64_t)N * K * M > PAR_MIN_WORK)
    {
        tm_lin_part(&d, xd, K, xd, xsum, M, y, ldy, 0);
    }
}

/* Which vector code this build holds: bit 0 AVX2 integer unpacking, bit 1 FMA (0: the
   portable path, e.g. built with TRUSTMOE_KERNEL_MARCH=x86-64). */
int tm_vector_path(void) {
    int bits = 0;
#if defined(__AVX2__)
    bits |= 1;
#endif
#if defined(__FMA__) && defined(__AVX__)
    bits |= 2;
#endif
    return bits;
}

int tm_num_threads(void) {
    int n = 1;
#ifdef _OPENMP
    #pragma omp parallel
    {
        #pragma omp master
        n = omp_get_num_threads();
    }
#endif
    return n;
}
