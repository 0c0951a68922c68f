/* Whole decode steps for CPU decode rows: every layer in one call (tm_decode_step).
 *
 * Why: at decode time a layer is ~50 small torch ops whose dispatch costs about as much as
 * reading the weights, and even one foreign call and one OpenMP fork/join per block cost ~10%
 * of a small model's token. tm_decode_step runs every layer's attention and MoE/MLP block for
 * M decode rows (M <= 16 rows, one token of one sequence each) in a single OpenMP parallel
 * region, splitting each matrix product over output rows and synchronising with barriers
 * between phases (each block is an SPMD body: every thread runs it on its share).
 *
 * Every output element is computed by the same code in the same order whatever M is and
 * whichever rows share the call, so results are batch-invariant. Numerics follow Hugging Face
 * Llama/Mixtral in fp32: RMSNorm x * rsqrt(mean(x^2) + eps) * w; RoPE
 * x * cos + rotate_half(x) * sin (the caller passes sin with its first half negated, so
 * rotate_half becomes a roll by hd/2); softmax router in fp32, top-k, optional renormalising;
 * SwiGLU experts; a Qwen2-style sigmoid-gated shared expert.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* int4 inputs for rows of x (only the rows this thread owns; caller barriers after). */
static void prep_int4(const tm_weight* w, const float* x, int ldx, int M, float* x4, float* xs) {
    if (w->kind != TM_INT4) return;
    int a, b;
    range(M, TID, NTH, &a, &b);
    for (int m = a; m < b; m++) tm_int4_prepare(x + (int64_t)m * ldx, w->K, w->gs, x4 + (int64_t)m * w->K,
                                                xs + (int64_t)m * (w->K / w->gs));
}

/* h[m] = RMSNorm(x[m]) * g for rows a..b-1 */
static void rms_range(const float* x, int a, int b, int d, const float* g, float eps, float* h) {
    for (int m = a; m < b; m++) {
        const float* xm = x + (int64_t)m * d;
        float ss = 0.0f;
        for (int i = 0; i < d; i++) ss += xm[i] * xm[i];
        float r = 1.0f / sqrtf(ss / (float)d + eps);
        for (int i = 0; i < d; i++) h[(int64_t)m * d + i] = g[i] * (xm[i] * r);
    }
}

/* This thread's share of the rows (the caller barriers before they are read). */
static void rms_rows(const float* x, int M, int d, const float* g, float eps, float* h) {
    int a, b;
    range(M, TID, NTH, &a, &b);
    rms_range(x, a, b, d, g, eps, h);
}

/* The normalised rows every thread reads next. When M x d floats fit OWN_ROWS_MAX, every
 * thread normalises every row into `own` (its own buffer, at least that size), so the
 * products after it need no barrier; otherwise each thread does its share into `shared`
 * and all wait at a barrier. Returns the buffer that holds them. */
#define OWN_ROWS_MAX 32768
#define OWN_ROWS(M, d) ((int64_t)(M) * (d) <= OWN_ROWS_MAX ? (M) * (d) : 1)

static float* norm_rows(const float* x, int M, int d, const float* g, float eps, float* shared,
                        float* own) {
    if ((int64_t)M * d <= OWN_ROWS_MAX) {  /* the same for every thread */
        rms_range(x, 0, M, d, g, eps, own);
        return own;
    }
    rms_rows(x, M, d, g, eps, shared);
    BARRIER;
    return shared;
}

/* x (M, d) += o_proj(attention(rope(qkv(rms(x))))) for M decode rows.
 * kc, vc: (Hkv, nslots, hd) this layer's cache; row m's new K/V go to slot new_slot[m], and it
 * attends to slots[offs[m] .. offs[m+1]) (which include new_slot[m]).
 * scratch: at least M * (d + (H + 2 Hkv) hd + H hd) + 2 M max(d, H hd) floats. */
static void attn_body(float* x, int M, int d, const float* ln, float eps,
                   const tm_weight* wqkv, const tm_weight* wo, const float* cos, const float* sin,
                   void* kc, void* vc, int kv16, int64_t nslots, const int64_t* new_slot,
                   const int64_t* slots, const int64_t* offs, int H, int Hkv, int hd,
                   float* scratch, int64_t max_slots) {
    int nq = (H + 2 * Hkv) * hd, wid = d > H * hd ? d : H * hd;
    float* h = scratch;                      /* (M, d) */
    float* qkv = h + (int64_t)M * d;         /* (M, nq) */
    float* att = qkv + (int64_t)M * nq;      /* (M, H hd) */
    float* x4 = att + (int64_t)M * H * hd;   /* (M, wid) int4 helpers */
    float* xs = x4 + (int64_t)M * wid;       /* (M, wid) */
    float own_h[OWN_ROWS(M, d)];
    float* hn = norm_rows(x, M, d, ln, eps, h, own_h);
    if (wqkv->kind == TM_INT4) {
        prep_int4(wqkv, hn, d, M, x4, xs);
        BARRIER;
    }
    tm_lin_part(wqkv, hn, d, x4, xs, M, qkv, nq, 0);
    BARRIER;
    /* per (row, kv head): RoPE on its query heads and its key head, its key and value into the
       cache, then attention over the row's slots (the query heads that share the kv head
       together); no other task reads what a task writes, so no barrier between */
    int nh = H + Hkv, rep = H / Hkv, a, b;
    range(M * Hkv, TID, NTH, &a, &b);
    float* p = b > a ? (float*)malloc((size_t)max_slots * rep * sizeof(float)) : NULL;
    for (int t = a; t < b; t++) {
        int m = t / Hkv, g = t % Hkv, half = hd / 2;
        const float *c = cos + (int64_t)m * hd, *sn = sin + (int64_t)m * hd;
        float* row = qkv + (int64_t)m * nq;
        for (int r = 0; r <= rep; r++) {  /* the group's query heads, then its key head */
            float* v = row + (int64_t)(r < rep ? g * rep + r : H + g) * hd;
            float tmp[512];
            for (int i = 0; i < hd; i++) tmp[i] = v[i] * c[i] + v[(i + half) % hd] * sn[i];
            memcpy(v, tmp, (size_t)hd * sizeof(float));
        }
        int64_t at = ((int64_t)g * nslots + new_slot[m]) * hd;
        const float *kr = row + (int64_t)(H + g) * hd, *vr = row + (int64_t)(nh + g) * hd;
        if (kv16) {  /* rounded to fp16 once, as the torch path's cache write does */
            for (int i = 0; i < hd; i++) {
                ((_Float16*)kc)[at + i] = (_Float16)kr[i];
                ((_Float16*)vc)[at + i] = (_Float16)vr[i];
            }
        } else {
            memcpy((float*)kc + at, kr, (size_t)hd * sizeof(float));
            memcpy((float*)vc + at, vr, (size_t)hd * sizeof(float));
        }
        float* o = att + (int64_t)m * H * hd + (int64_t)g * rep * hd;
        if (p == NULL) {  /* out of memory: NaN rows, never a crash */
            for (int i = 0; i < rep * hd; i++) o[i] = NAN;
            continue;
        }
        tm_attend(qkv + (int64_t)m * nq + (int64_t)g * rep * hd, rep, kc, vc, kv16, nslots,
                  slots + offs[m], offs[m + 1] - offs[m], g, hd, 1.0f / sqrtf((float)hd), o, p);
    }
    free(p);
    BARRIER;
    if (wo->kind == TM_INT4) {
        prep_int4(wo, att, H * hd, M, x4, xs);
        BARRIER;
    }
    tm_lin_part(wo, att, H * hd, x4, xs, M, x, d, 1);
}


/* x (M, d) += MoE(rms(x)) (or the dense MLP when router is NULL) for M decode rows.
 * w13[e]: (2 hdim, d) gate rows then up rows; w2[e]: (d, hdim). Expert E (index E) is the
 * shared expert when sh13 is given, gated by sigmoid(h . sh_gate).
 * scratch: at least M*d + M*E + 2*M*k + M*(k+1)*(2*hmax + d) + 2*M*max(d, hmax) floats
 */
static void moe_body(float* x, int M, int d, const float* ln, float eps,
                  const tm_weight* router, int E, int topk, int norm_topk,
                  const tm_weight* w13, const tm_weight* w2, int hdim,
                  const tm_weight* sh13, const tm_weight* sh2, const tm_weight* sh_gate, int sh_hdim,
                  float* scratch, int* route_out) {
    int k = router ? topk : 1;
    int S = k + (sh13 ? 1 : 0);   /* slots per row */
    int hmax = hdim > sh_hdim ? hdim : sh_hdim, wid = d > hmax ? d : hmax;
    float* h = scratch;                            /* (M, d) */
    float* logits = h + (int64_t)M * d;            /* (M, E) */
    float* act = logits + (int64_t)M * (E + 1) + (int64_t)M * S;  /* (M, S, hmax) */
    float* outs = act + (int64_t)M * S * hmax;     /* (M, S, d) */
    float* x4 = outs + (int64_t)M * S * d;         /* (M*S, wid) */
    float* xs = x4 + (int64_t)M * S * wid;
    int int4_up = sh13 && sh13->kind == TM_INT4, int4_down = sh2 && sh2->kind == TM_INT4;
    for (int e = 0; e < (router ? E : 1); e++) {
        int4_up |= w13[e].kind == TM_INT4;
        int4_down |= w2[e].kind == TM_INT4;
    }
    float own_h[OWN_ROWS(M, d)];
    float* hn = norm_rows(x, M, d, ln, eps, h, own_h);
    if (router) {
        const tm_weight* wr[2] = {router, sh_gate};
        for (int r = 0; r < (sh_gate ? 2 : 1); r++) {
            if (wr[r]->kind == TM_INT4) {
                prep_int4(wr[r], hn, d, M, x4, xs);
                BARRIER;
            }
            tm_lin_part(wr[r], hn, d, x4, xs, M, logits + r * E, E + 1, 0);
            BARRIER;
        }
    } else if (sh_gate) {
        if (sh_gate->kind == TM_INT4) {
            prep_int4(sh_gate, hn, d, M, x4, xs);
            BARRIER;
        }
        tm_lin_part(sh_gate, hn, d, x4, xs, M, logits, E + 1, 0);
        BARRIER;
    }
    /* routing: fp32 softmax, top-k (descending); every thread routes every row into its own
       arrays (a few floats a row), so no barrier is needed before the experts */
    int ids[M * S];
    float wts[M * S];
    for (int m = 0; m < M; m++) {
        float* lg = logits + (int64_t)m * (E + 1);
        int* id = ids + (int64_t)m * S;
        float* wt = wts + (int64_t)m * S;
        if (router) {
            float mx = lg[0];
            for (int e = 1; e < E; e++) mx = lg[e] > mx ? lg[e] : mx;
            float pr[256], sum = 0.0f;
            for (int e = 0; e < E; e++) { pr[e] = expf(lg[e] - mx); sum += pr[e]; }
            int used[256] = {0};
            float tsum = 0.0f;
            for (int j = 0; j < k; j++) {
                int best = -1;
                for (int e = 0; e < E; e++)
                    if (!used[e] && (best < 0 || lg[e] > lg[best])) best = e;
                used[best] = 1;
                id[j] = best;
                wt[j] = pr[best] / sum;
                tsum += wt[j];
            }
            if (norm_topk)
                for (int j = 0; j < k; j++) wt[j] /= tsum;
            if (route_out && TID == 0)
                for (int j = 0; j < k; j++) route_out[(int64_t)m * k + j] = id[j];
        } else {
            id[0] = 0;
            wt[0] = 1.0f;
        }
        if (sh13) {
            float gl = router ? lg[E] : lg[0];
            id[k] = -1;
            wt[k] = 1.0f / (1.0f + expf(-gl));
        }
    }
    /* gate/up rows with SwiGLU: one task per (row, slot); its hidden units split */
    if (int4_up) {
        if (TID == 0)
            for (int ms = 0; ms < M * S; ms++) {
                const tm_weight* wg = ids[ms] < 0 ? sh13 : &w13[ids[ms]];
                if (wg->kind == TM_INT4)
                    tm_int4_prepare(hn + (int64_t)(ms / S) * d, d, wg->gs, x4 + (int64_t)ms * wid,
                                    xs + (int64_t)ms * wid);
            }
        BARRIER;
    }
    /* tasks (row, slot) grouped by expert, so each weight row is read once for all the
       rows routed to it (the shared expert, key -1, first); every thread builds the same
       order locally */
    int nt = M * S, ord[nt], cnt[E + 2];
    memset(cnt, 0, sizeof(cnt));
    for (int ms = 0; ms < nt; ms++) cnt[ids[ms] + 2]++;
    for (int e = 1; e < E + 2; e++) cnt[e] += cnt[e - 1];
    for (int ms = 0; ms < nt; ms++) ord[cnt[ids[ms] + 1]++] = ms;
    for (int g0 = 0; g0 < nt;) {
        int e = ids[ord[g0]], g1 = g0;
        while (g1 < nt && ids[ord[g1]] == e) g1++;
        const tm_weight* wg = e < 0 ? sh13 : &w13[e];
        int hd_ = e < 0 ? sh_hdim : hdim, u0, u1;
        range(hd_, TID, NTH, &u0, &u1);
        const float *xr[64], *x4r[64], *xsr[64];  /* this expert's rows: at most M <= 16 */
        for (int j = 0; j < g1 - g0; j++) {
            int ms = ord[g0 + j];
            xr[j] = hn + (int64_t)(ms / S) * d;
            x4r[j] = x4 + (int64_t)ms * wid;
            xsr[j] = xs + (int64_t)ms * wid;
        }
        int one = g1 - g0 == 1 && wg->kind != TM_INT4;  /* one row: two weight rows at once */
        for (int pass = 0; pass < 2; pass++) {  /* gate rows, then up rows: one stream each */
            int u = u0;
            if (one)
                for (; u + 1 < u1; u += 2) {
                    float o[2];
                    tm_rows2_one(wg, (pass ? hd_ : 0) + u, xr[0], o);
                    float* a = act + (int64_t)ord[g0] * hmax + u;
                    for (int j = 0; j < 2; j++)
                        a[j] = pass ? a[j] / (1.0f + expf(-a[j])) * o[j] : o[j];
                }
            for (; u < u1; u++)
                for (int i = 0; i < g1 - g0; i += TM_ROWS) {
                    int R = g1 - g0 - i < TM_ROWS ? g1 - g0 - i : TM_ROWS;
                    float o[TM_ROWS];
                    tm_row_multi(wg, pass ? hd_ + u : u, R, xr + i, x4r + i, xsr + i, o);
                    for (int j = 0; j < R; j++) {
                        float* a = act + (int64_t)ord[g0 + i + j] * hmax + u;
                        float v = o[j];
                        *a = pass ? *a / (1.0f + expf(-*a)) * v : v;  /* silu(gate) * up */
                    }
                }
        }
        g0 = g1;
    }
    BARRIER;
    if (int4_down) {
        if (TID == 0)
            for (int ms = 0; ms < M * S; ms++) {
                const tm_weight* wd = ids[ms] < 0 ? sh2 : &w2[ids[ms]];
                if (wd->kind == TM_INT4)
                    tm_int4_prepare(act + (int64_t)ms * hmax, wd->K, wd->gs, x4 + (int64_t)ms * wid,
                                    xs + (int64_t)ms * wid);
            }
        BARRIER;
    }
    for (int g0 = 0; g0 < nt;) {
        int e = ids[ord[g0]], g1 = g0, n0, n1;
        while (g1 < nt && ids[ord[g1]] == e) g1++;
        const tm_weight* wd = e < 0 ? sh2 : &w2[e];
        range(d, TID, NTH, &n0, &n1);
        const float *xr[64], *x4r[64], *xsr[64];
        for (int j = 0; j < g1 - g0; j++) {
            int ms = ord[g0 + j];
            xr[j] = act + (int64_t)ms * hmax;
            x4r[j] = x4 + (int64_t)ms * wid;
            xsr[j] = xs + (int64_t)ms * wid;
        }
        int n = n0;
        if (g1 - g0 == 1 && wd->kind != TM_INT4)  /* one row: two weight rows at once */
            for (; n + 1 < n1; n += 2) {
                float o[2];
                tm_rows2_one(wd, n, xr[0], o);
                outs[(int64_t)ord[g0] * d + n] = o[0];
                outs[(int64_t)ord[g0] * d + n + 1] = o[1];
            }
        for (; n < n1; n++)
            for (int i = 0; i < g1 - g0; i += TM_ROWS) {
                int R = g1 - g0 - i < TM_ROWS ? g1 - g0 - i : TM_ROWS;
                float o[TM_ROWS];
                tm_row_multi(wd, n, R, xr + i, x4r + i, xsr + i, o);
                for (int j = 0; j < R; j++) outs[(int64_t)ord[g0 + i + j] * d + n] = o[j];
            }
        g0 = g1;
    }
    /* x += sum_j wts_j * out_j (routed slots, then shared) over this thread's columns, which
       it computed for every row above: no barrier needed */
    int n0, n1;
    range(d, TID, NTH, &n0, &n1);
    for (int m = 0; m < M; m++)
        for (int n = n0; n < n1; n++) {
            float y = 0.0f;
            for (int j = 0; j < S; j++) y += outs[((int64_t)m * S + j) * d + n] * wts[(int64_t)m * S + j];
            x[(int64_t)m * d + n] += y;
        }
}


/* logits (M, V) = head(rms(x)) for M decode rows; scratch: 3 * M * d floats. */
static void final_body(const float* x, int M, int d, const float* ln, float eps, const tm_weight* head,
              float* scratch, float* logits) {
    float* h = scratch;
    float* x4 = h + (int64_t)M * d;
    float* xs = x4 + (int64_t)M * d;
    rms_rows(x, M, d, ln, eps, h);
    BARRIER;
    if (head->kind == TM_INT4) {
        prep_int4(head, h, d, M, x4, xs);
        BARRIER;
    }
    tm_lin_part(head, h, d, x4, xs, M, logits, head->N, 0);
}

void tm_final(const float* x, int M, int d, const float* ln, float eps, const tm_weight* head,
              float* scratch, float* logits) {
    #pragma omp parallel if (M * (int64_t)d * head->N > 32768)
    final_body(x, M, d, ln, eps, head, scratch, logits);
}

/* One decode step of M rows through every layer, and optionally the LM head, in ONE parallel
 * region: per layer the attention block, then the MoE/MLP block, barriers between; the same
 * arithmetic as calling tm_attn_block, tm_moe_block and tm_final one by one, without a
 * fork/join and a foreign call for each (at batch 1 on small models those cost ~10% of a token).
 * routes (L, M, topk) or NULL: the expert ids each MoE layer chose; logits (M, V) or NULL;
 * kv16: the cache holds fp16 keys and values (else floats). */
typedef struct {
    const float* ln1;
    const float* ln2;
    const tm_weight* wqkv;
    const tm_weight* wo;
    const tm_weight* router;
    const tm_weight* w13;
    const tm_weight* w2;
    int hdim;
    const tm_weight* sh13;
    const tm_weight* sh2;
    const tm_weight* sh_gate;
    int sh_hdim;
    void* kc;
    void* vc;
} tm_layer;

void tm_decode_step(float* x, int M, int d, float eps, const tm_layer* layers, int L,
                    const float* cos, const float* sin, int64_t nslots, const int64_t* new_slot,
                    const int64_t* slots, const int64_t* offs, int H, int Hkv, int hd, int E,
                    int topk, int norm_topk, float* scratch, int64_t max_slots, int* routes,
                    const float* norm, const tm_weight* head, float* logits, int kv16) {
    int hmax = 0;
    for (int l = 0; l < L; l++) hmax = layers[l].hdim > hmax ? layers[l].hdim : hmax;
    #pragma omp parallel if (M * (int64_t)d * hmax > 16384)
    {
        int moe_layer = 0;
        for (int l = 0; l < L; l++) {
            const tm_layer* ly = &layers[l];
            attn_body(x, M, d, ly->ln1, eps, ly->wqkv, ly->wo, cos, sin, ly->kc, ly->vc, kv16, nslots,
                      new_slot, slots, offs, H, Hkv, hd, scratch, max_slots);
            BARRIER;
            int* ro = routes && ly->router ? routes + (int64_t)moe_layer * M * topk : NULL;
            moe_body(x, M, d, ly->ln2, eps, ly->router, E, topk, norm_topk, ly->w13, ly->w2,
                     ly->hdim, ly->sh13, ly->sh2, ly->sh_gate, ly->sh_hdim, scratch, ro);
            moe_layer += ly->router != NULL;
            BARRIER;
        }
        if (logits) final_body(x, M, d, norm, eps, head, scratch, logits);
    }
}
