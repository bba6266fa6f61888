/* k-winners-take-all over rows of float32 scores, and the straight-through soft top-k's gradient.
 *
 * Forward: the hard mask (exactly k ones per row) and the k-th and (k+1)-th largest scores with
 * their positions. Per row, the scores become order-preserving unsigned keys, and the (k+1)-th
 * largest key's top 16 bits are found bit by bit: the largest T with count(key >= T) >= k + 1,
 * each count a pass of vector comparisons over the row (no branches that depend on the data; a
 * heap of the k+1 largest scores mispredicted its way to 4x slower); then its low bits from the
 * few keys that share those 16 (`low_bits`). The winners are the keys above T, and as many keys
 * equal to T as are still needed, earliest first.
 *
 * Backward: the soft top-k's vector-Jacobian product (see `masks._HardTopkSoftGrad`) in two
 * passes over each row. Rows are shared by OpenMP threads; widths are multiples of VL.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "vec.h"

static inline int count_ge(const vu *keys, int nv, uint32_t t) {
    vi acc = {0};
    vu tv = (vu){} + t;
    for (int v = 0; v < nv; v++) acc -= (vi)(keys[v] >= tv);
    int c = 0;
    for (int l = 0; l < VL; l++) c += acc[l];
    return c;
}

static inline float value_of(uint32_t key) {
    uint32_t u = key ^ ((key >> 31) ? 0x80000000u : 0xFFFFFFFFu);
    float x; memcpy(&x, &u, sizeof x);
    return x;
}

/* The row's keys above t as 1s in mask; their count and smallest key. */
static int mask_above(const vu *keys, int nv, uint32_t t, float *mask, uint32_t *smallest) {
    vu tv = (vu){} + t, amin = (vu){} + UINT32_MAX;
    vi above = {0};
    for (int v = 0; v < nv; v++) {
        vi win = (vi)(keys[v] > tv), lower = win & (vi)(keys[v] < amin);
        st(mask + v * VL, (vf)(win & (vi)bc(1.f)));
        above -= win;
        amin = (vu)(((vi)keys[v] & lower) | ((vi)amin & ~lower));
    }
    int n = 0;
    *smallest = UINT32_MAX;
    for (int l = 0; l < VL; l++) { n += above[l]; if (amin[l] < *smallest) *smallest = amin[l]; }
    return n;
}

/* The (k+1)-th largest key, given t: its top 16 bits (low bits 0). Usually a handful of keys share
 * that prefix: the answer is the r-th largest of them, r = k + 1 - count(keys above the prefix),
 * found by sorting them. With more than MAX_SHARED (ties, or scores packed closely), the bit-by-bit
 * search goes on over the low 16 bits. */
#define MAX_SHARED 64
static uint32_t low_bits(const vu *keys, int nv, uint32_t t, int k) {
    int above = t == 0xFFFF0000u ? 0 : count_ge(keys, nv, t + 0x10000u);
    const uint32_t *kk = (const uint32_t *)keys;
    uint32_t shared[MAX_SHARED];
    int n = 0;
    vu prefix = (vu){} + (t >> 16);
    for (int v = 0; v < nv && n <= MAX_SHARED; v++) {
        vi hit = (vi)((keys[v] >> 16) == prefix);
        int any = 0;
        for (int l = 0; l < VL; l++) any |= hit[l];
        if (!any) continue;
        for (int l = 0; l < VL; l++)
            if ((kk[v * VL + l] >> 16) == (t >> 16)) {
                if (n == MAX_SHARED) { n++; break; }
                shared[n++] = kk[v * VL + l];
            }
    }
    if (n > MAX_SHARED) {
        for (int bit = 15; bit >= 0; bit--)
            if (count_ge(keys, nv, t | (1u << bit)) >= k + 1) t |= 1u << bit;
        return t;
    }
    for (int i = 1; i < n; i++) /* insertion sort, largest first */
        for (int j = i; j > 0 && shared[j] > shared[j - 1]; j--) { uint32_t x = shared[j]; shared[j] = shared[j - 1]; shared[j - 1] = x; }
    return shared[k - above]; /* the (k + 1 - above)-th largest */
}

static void row_topk(const float *s, int width, int k, float *mask, float *ab, int64_t *ab_idx, vu *keys) {
    int nv = width / VL;
    for (int v = 0; v < nv; v++) { /* order-preserving keys: negatives reversed, below the positives */
        vu u; memcpy(&u, s + v * VL, sizeof u);
        keys[v] = u ^ ((vu)((vi)u >> 31) | 0x80000000u);
    }
    uint32_t t = 0, a_key;
    for (int bit = 31; bit >= 16; bit--)
        if (count_ge(keys, nv, t | (1u << bit)) >= k + 1) t |= 1u << bit;
    t = low_bits(keys, nv, t, k);
    int ties = k - mask_above(keys, nv, t, mask, &a_key);
    /* then ties at t in order; b = the first tie left out; a = the smallest winner */
    const uint32_t *kk = (const uint32_t *)keys;
    int64_t idx_a = -1, idx_b = -1;
    for (int i = 0; i < width && idx_b < 0; i++) {
        if (kk[i] != t) continue;
        if (ties > 0) { mask[i] = 1.f; ties--; idx_a = i; a_key = t; }
        else idx_b = i;
    }
    if (idx_a < 0) /* no ties taken: the smallest key above t, first occurrence */
        for (int i = 0; i < width; i++) if (kk[i] == a_key) { idx_a = i; break; }
    ab[0] = value_of(a_key); ab[1] = value_of(t);
    ab_idx[0] = idx_a; ab_idx[1] = idx_b;
}

/* scores, mask: (rows, width); ab, ab_idx: (rows, 2), s_(k) then s_(k+1); 1 <= k < width. */
int topk_mask(const float *scores, float *mask, float *ab, int64_t *ab_idx, long rows, int width, int k,
              int threads) {
    if (width % VL) return 2;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        vu *keys = aligned_alloc(64, sizeof(uint32_t) * width);
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            if (!keys) { failed = 1; continue; }
            row_topk(scores + r * width, width, k, mask + r * width, ab + 2 * r, ab_idx + 2 * r, keys);
        }
        free(keys);
    }
    return failed;
}

/* One row of the soft top-k's backward: with D = T (a - b) + eps, u = (s - (a + b) / 2) / D,
 * w = sigmoid(u): ds = k / sum(w) * (g - <g, w> / sum(w)) * w (1 - w) / D, then through a and b:
 * dm = -sum(ds), dD = -sum(ds u), ds[a] += dm / 2 + T dD, ds[b] += dm / 2 - T dD.
 * With flush, no subnormal float is made (on x86 cores each costs a microcode assist, about 100
 * cycles, and far below a narrow cut nearly every w would be one): w below 2^-64 is taken as 0,
 * below float32's resolution of sum(w) >= k / 2 however wide the row, and so is a result below
 * FLT_MIN (the caller's policy, `flush_subnormal_grads`). */
#define W_FLOOR_LN 44.3614195558365f /* 64 ln 2: e^-u below it means w < 2^-64 */
static void row_soft_grad(const float *s, const float *g, const float *ab, const int64_t *ab_idx, int width,
                          int k, float temperature, float eps, int flush, float *ds) {
    float D = temperature * (ab[0] - ab[1]) + eps, m = (ab[0] + ab[1]) / 2;
    vf w_sum = bc(0.f), gw = bc(0.f), zmax = bc(flush ? W_FLOOR_LN : INFINITY);
    for (int i = 0; i < width; i += VL) { /* ds holds w for now */
        vf z = (bc(m) - ld(s + i)) / D;
        vi gone = z > zmax;
        vf w = sel(gone, bc(0.f), bc(1.f) / (bc(1.f) + vexp(sel(gone, zmax, z))));
        st(ds + i, w);
        w_sum += w;
        gw += ld(g + i) * w;
    }
    float W = hsum(w_sum), mean_g = hsum(gw) / W, scale = k / (W * D);
    vf dm = bc(0.f), du = bc(0.f);
    for (int i = 0; i < width; i += VL) {
        vf w = ld(ds + i), d = (ld(g + i) - mean_g) * w * (bc(1.f) - w) * scale;
        if (flush) d = sel((d < bc(FLT_MIN)) & (d > bc(-FLT_MIN)), bc(0.f), d);
        st(ds + i, d);
        dm -= d;
        du -= d * ((ld(s + i) - m) / D);
    }
    float dmv = hsum(dm), dDv = hsum(du);
    ds[ab_idx[0]] += dmv / 2 + temperature * dDv;
    ds[ab_idx[1]] += dmv / 2 - temperature * dDv;
    for (int j = 0; j < 2 && flush; j++)
        if (ds[ab_idx[j]] < FLT_MIN && ds[ab_idx[j]] > -FLT_MIN) ds[ab_idx[j]] = 0.f;
}

int topk_soft_grad(const float *scores, const float *grad, const float *ab, const int64_t *ab_idx, float *ds,
                   long rows, int width, int k, float temperature, float eps, int flush, int threads) {
    if (width % VL) return 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++)
        row_soft_grad(scores + r * width, grad + r * width, ab + 2 * r, ab_idx + 2 * r, width, k, temperature, eps,
                      flush, ds + r * width);
    return 0;
}
