/* Causal softmax attention with unscaled scores, for small head dims on CPUs: forward and backward.
 *
 * Tensors are float32, (batch, pos, n_heads, d_head) contiguous, as a projection's output viewed
 * per head; lse is (batch, n_heads, pos), in base 2. Query t sees the keys j < t, and at j = t a
 * "diagonal" key kd_t and value vd_t: kd = k, vd = v for ordinary causal attention; a
 * self-ablating model's ablated stream passes the clean stream's keys as k, v and its own as kd, vd.
 *
 * PyTorch's fused kernels spend most of their time on per-block overhead at d_head 8. Here each
 * (batch, head) pair is a task, and the work is vectorised VL wide without horizontal sums: the
 * forward over VL queries (the keys broadcast), the backward in VL x VL tiles with the keys in
 * lanes (the queries broadcast) and each tile transposed once for dQ. Scores are kept in base 2
 * (queries scaled by log2 e) for vexp2.
 * Tasks are shared by OpenMP threads: built with -fopenmp, the kernel uses the libgomp that
 * PyTorch has loaded (same soname), so its threads are the ones PyTorch's own kernels use.
 * Functions return 0, or 1 when a buffer cannot be allocated.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<d_head>"
#endif
#define D HEAD_DIM
#define NEG (-1e30f) /* a masked score: its exp is 0 */

static inline vf lane_ids(int base) { vf v; for (int i = 0; i < VL; i++) v[i] = base + i; return v; }

void exp_array(const float *x, float *out, int n) { exp_into(x, out, n); }

typedef struct { int T, H, Tp; } Dims; /* Tp: pos rounded up to a multiple of VL */
static inline size_t at(Dims z, int b, int t, int h) { return (((size_t)b * z.T + t) * z.H + h) * D; }
static inline const float *col(const float *xt, Dims z, int d, int t0) { return xt + (size_t)d * z.Tp + t0; }

#define LOG2E 1.44269504f /* queries are scaled by it: scores in base 2, for vexp2 */

/* p = 2^x, or 0 where x < p_floor. The backward takes p_floor -64 when asked to flush (the CPU policy's
 * flush_subnormal_grads): an unscaled, peaked attention puts many p far below 2^-64, and each
 * product of one with a small gradient is a subnormal, which costs x86 cores a microcode assist;
 * p below 2^-64 is below float32's resolution of the row's sum (>= 1) at any context length. */
static inline vf p_of(vf x, float p_floor) { return sel(x < bc(p_floor), bc(0.f), vexp2(x)); }

/* scale * x[b, :, h, :] -> xt (D, Tp), zero padded */
static void to_cols(const float *x, float *xt, Dims z, int b, int h, float scale) {
    memset(xt, 0, sizeof(float) * D * z.Tp);
    for (int j = 0; j < z.T; j++)
        for (int d = 0; d < D; d++) xt[(size_t)d * z.Tp + j] = scale * x[at(z, b, j, h) + d];
}
/* D columns of VL lanes for positions t0.. -> x[b, t0 + i, h, :] (written, or added to) */
static void from_cols(const vf *cols, float *x, Dims z, int b, int h, int t0, int add) {
    for (int i = 0; i < VL && t0 + i < z.T; i++)
        for (int d = 0; d < D; d++) {
            float *dst = x + at(z, b, t0 + i, h) + d;
            *dst = add ? *dst + cols[d][i] : cols[d][i];
        }
}
static float *buffer(size_t floats) { return aligned_alloc(64, sizeof(float) * floats); } /* floats: a multiple of VL */

/* One task's forward: VL queries t0.. at a time, in lanes. Two passes over the keys (scores and
 * their max, then exp and the weighted values); the scores wait in s (VL per key). */
static void fwd_task(const float *k, const float *v, const float *qt, const float *kdt,
                     const float *vdt, float *s, float *o, float *lse_bh, Dims z, int b, int h) {
    for (int t0 = 0; t0 < z.T; t0 += VL) {
        vf Q[D], acc[D], qpos = lane_ids(t0), sd = bc(0.f), l = bc(0.f);
        for (int d = 0; d < D; d++) {
            Q[d] = ld(col(qt, z, d, t0)); sd += Q[d] * ld(col(kdt, z, d, t0)); acc[d] = bc(0.f);
        }
        vf m = sd;
        int nk = t0 + VL - 1 < z.T ? t0 + VL - 1 : z.T - 1; /* keys j < t for some query t of the block */
        for (int j = 0; j < nk; j++) {
            const float *kj = k + at(z, b, j, h);
            vf x = bc(0.f);
            for (int d = 0; d < D; d++) x += Q[d] * kj[d];
            if (j >= t0) x = sel(bc((float)j) < qpos, x, bc(NEG));
            st(s + (size_t)j * VL, x);
            m = vmax(m, x);
        }
        for (int j = 0; j < nk; j++) {
            const float *vj = v + at(z, b, j, h);
            vf p = vexp2(ld(s + (size_t)j * VL) - m);
            l += p;
            for (int d = 0; d < D; d++) acc[d] += p * vj[d];
        }
        vf pd = vexp2(sd - m);
        l += pd;
        for (int d = 0; d < D; d++) acc[d] = (acc[d] + pd * ld(col(vdt, z, d, t0))) / l;
        from_cols(acc, o, z, b, h, t0, 0);
        for (int i = 0; i < VL && t0 + i < z.T; i++) lse_bh[t0 + i] = m[i] + log2f(l[i]);
    }
}

int attn_fwd(const float *q, const float *k, const float *v, const float *kd, const float *vd,
             float *o, float *lse, int B, int T, int H, int threads) {
    Dims z = {T, H, (T + VL - 1) / VL * VL};
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *qt = buffer(D * z.Tp), *kdt = buffer(D * z.Tp), *vdt = buffer(D * z.Tp), *s = buffer(VL * z.Tp);
        int ok = qt && kdt && vdt && s;
#pragma omp for schedule(static)
        for (int task = 0; task < B * H; task++) {
            int b = task / H, h = task % H;
            if (!ok) { failed = 1; continue; }
            to_cols(q, qt, z, b, h, LOG2E); to_cols(kd, kdt, z, b, h, 1.f); to_cols(vd, vdt, z, b, h, 1.f);
            fwd_task(k, v, qt, kdt, vdt, s, o, lse + ((size_t)b * H + h) * T, z, b, h);
        }
        free(qt); free(kdt); free(vdt); free(s);
    }
    return failed;
}

/* A VL x VL tile transposed in registers: log2(VL) stages, each swapping the off-diagonal halves
 * of 2k x 2k blocks with two-source shuffles (GCC); elsewhere (or with -DPORTABLE), through memory. */
static inline void transpose_tile(vf *r) {
#if defined(__GNUC__) && !defined(__clang__) && !defined(PORTABLE)
    for (int k = VL / 2; k >= 1; k >>= 1) {
        vi ma, mb;
        for (int l = 0; l < VL; l++) { ma[l] = (l & k) ? VL + l - k : l; mb[l] = (l & k) ? VL + l : l + k; }
        for (int i = 0; i < VL; i++)
            if (!(i & k)) {
                vf a = r[i], c = r[i + k];
                r[i] = __builtin_shuffle(a, c, ma);
                r[i + k] = __builtin_shuffle(a, c, mb);
            }
    }
#else
    float t[VL][VL];
    for (int i = 0; i < VL; i++) for (int l = 0; l < VL; l++) t[l][i] = r[i][l];
    for (int i = 0; i < VL; i++) memcpy(&r[i], t[i], sizeof(vf));
#endif
}

/* dQ, dK, dV of the keys j < t in VL x VL tiles, keys j0.. in lanes against queries t0..: per query,
 * p = 2^(s - lse_t) (kt is scaled by LOG2E), ds = p (dp - delta_t); dK += ds q_t and dV += p g_t
 * build up in registers over the key block's queries, and the tile's ds, transposed to queries in
 * lanes, adds dQ += ds k_j into dqt (D, Tp). Each p is computed once; two passes, keys in lanes
 * for dK and dV and queries in lanes for dQ, computed it twice and took 1.13x as long. */
static void bwd_tiles(const float *q, const float *k, const float *kt, const float *vt, const float *lse_p,
                      const float *delta, const float *dout, float *dqt, float *dk, float *dv, float p_floor, Dims z,
                      int b, int h) {
    memset(dqt, 0, sizeof(float) * D * z.Tp);
    for (int j0 = 0; j0 < z.T; j0 += VL) {
        vf dK[D], dV[D], kpos = lane_ids(j0);
        int nj = z.T - j0 < VL ? z.T - j0 : VL;
        for (int d = 0; d < D; d++) dK[d] = dV[d] = bc(0.f);
        for (int t0 = j0; t0 < z.T; t0 += VL) {
            vf tile[VL];
            for (int i = 0; i < VL; i++) {
                int t = t0 + i;
                if (t >= z.T) { tile[i] = bc(0.f); continue; }
                const float *qv = q + at(z, b, t, h), *g = dout + at(z, b, t, h);
                vf s = bc(0.f), dp = bc(0.f);
                for (int d = 0; d < D; d++) { s += ld(col(kt, z, d, j0)) * qv[d]; dp += ld(col(vt, z, d, j0)) * g[d]; }
                if (t0 == j0) s = sel(kpos < bc((float)t), s, bc(NEG));
                vf p = p_of(s - lse_p[t], p_floor), ds = p * (dp - delta[t]);
                for (int d = 0; d < D; d++) { dK[d] += ds * qv[d]; dV[d] += p * g[d]; }
                tile[i] = ds;
            }
            transpose_tile(tile); /* tile[j]: key j0 + j against the queries t0.. */
            for (int d = 0; d < D; d++) {
                vf acc = ld(col(dqt, z, d, t0));
                for (int j = 0; j < nj; j++) acc += tile[j] * k[at(z, b, j0 + j, h) + d];
                st(dqt + (size_t)d * z.Tp + t0, acc);
            }
        }
        from_cols(dK, dk, z, b, h, j0, 0);
        from_cols(dV, dv, z, b, h, j0, 0);
    }
}

/* Each query t against its own key kd_t, queries in lanes: dq = dqt + the diagonal's dQ; the
 * diagonal's dK and dV go to dkd, dvd (added in when they are dk, dv). qt is scaled by LOG2E. */
static void bwd_diagonal(const float *qt, const float *gt, const float *kdt, const float *vdt, const float *lse_p,
                         const float *delta, const float *dqt, float *dq, float *dkd, float *dvd, int self,
                         float p_floor, Dims z, int b, int h) {
    for (int t0 = 0; t0 < z.T; t0 += VL) {
        vf Q[D], G[D], KD[D], dQ[D], L = ld(lse_p + t0), Dt = ld(delta + t0), sd = bc(0.f), dpd = bc(0.f);
        for (int d = 0; d < D; d++) {
            Q[d] = ld(col(qt, z, d, t0)); G[d] = ld(col(gt, z, d, t0)); KD[d] = ld(col(kdt, z, d, t0));
            sd += Q[d] * KD[d]; dpd += G[d] * ld(col(vdt, z, d, t0));
        }
        vf pd = p_of(sd - L, p_floor), dsd = pd * (dpd - Dt);
        for (int d = 0; d < D; d++) { /* KD and G become the diagonal's dK and dV */
            dQ[d] = ld(col(dqt, z, d, t0)) + dsd * KD[d];
            KD[d] = dsd * Q[d] * bc(1.f / LOG2E); G[d] = pd * G[d];
        }
        from_cols(dQ, dq, z, b, h, t0, 0);
        from_cols(KD, dkd, z, b, h, t0, self);
        from_cols(G, dvd, z, b, h, t0, self);
    }
}

/* dkd, dvd == dk, dv for ordinary causal attention: the diagonal's gradients are added in. flush: p below
 * 2^-64 counts as 0 (`p_of`). */
int attn_bwd(const float *q, const float *k, const float *v, const float *kd, const float *vd,
             const float *o, const float *lse, const float *dout,
             float *dq, float *dk, float *dv, float *dkd, float *dvd, int B, int T, int H, int flush, int threads) {
    Dims z = {T, H, (T + VL - 1) / VL * VL};
    float p_floor = flush ? -64.f : -INFINITY;
    size_t n = (size_t)D * z.Tp;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *qt = buffer(n), *kt = buffer(n), *vt = buffer(n), *gt = buffer(n), *kdt = buffer(n), *vdt = buffer(n);
        float *dqt = buffer(n), *lse_p = buffer(z.Tp), *delta = buffer(z.Tp);
        int ok = qt && kt && vt && gt && kdt && vdt && dqt && lse_p && delta;
#pragma omp for schedule(static)
        for (int task = 0; task < B * H; task++) {
            int b = task / H, h = task % H;
            if (!ok) { failed = 1; continue; }
            to_cols(q, qt, z, b, h, LOG2E); to_cols(k, kt, z, b, h, LOG2E); to_cols(v, vt, z, b, h, 1.f);
            to_cols(dout, gt, z, b, h, 1.f); to_cols(kd, kdt, z, b, h, 1.f); to_cols(vd, vdt, z, b, h, 1.f);
            memset(lse_p, 0, sizeof(float) * z.Tp);
            memcpy(lse_p, lse + ((size_t)b * H + h) * T, sizeof(float) * T);
            memset(delta, 0, sizeof(float) * z.Tp);
            for (int t = 0; t < T; t++) /* delta_t = dO_t . O_t = sum_j p_tj dp_tj */
                for (int d = 0; d < D; d++) delta[t] += dout[at(z, b, t, h) + d] * o[at(z, b, t, h) + d];
            bwd_tiles(q, k, kt, vt, lse_p, delta, dout, dqt, dk, dv, p_floor, z, b, h);
            bwd_diagonal(qt, gt, kdt, vdt, lse_p, delta, dqt, dq, dkd, dvd, dkd == dk, p_floor, z, b, h);
        }
        free(qt); free(kt); free(vt); free(gt); free(kdt); free(vdt); free(dqt); free(lse_p); free(delta);
    }
    return failed;
}
