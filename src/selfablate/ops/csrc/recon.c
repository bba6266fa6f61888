/* One term of the reconstruction loss, forward and backward, over rows of d floats:
 *     sum_rows |c/nc - a/na|^2,  nc = max(|c|, eps), na = max(|a|, eps)   (F.normalize's rule)
 * = sum_rows (qc + qa - 2r),  qc = |c|^2 / nc^2, qa = |a|^2 / na^2, r = c.a / (nc na).
 * Its gradient is, per row, alpha c + beta a: with I_c = [|c| >= eps],
 *     d/dc = c (2 / nc^2) (1 - I_c (qc - r)) - a 2 / (nc na)   (and symmetrically d/da),
 * one pass over the rows each way where autograd through F.normalize and F.mse_loss takes a
 * dozen small ops. Rows are shared by OpenMP threads. */
#include <math.h>

#include "vec.h"

typedef struct { float nc, na, r, qc, qa, ic, ia; } RowStats; /* ic, ia: I_c, I_a */

static RowStats stats(const float *c, const float *a, int d, float eps) {
    vf vcc = bc(0.f), vaa = bc(0.f), vca = bc(0.f);
    int i = 0;
    for (; i + VL <= d; i += VL) {
        vf x = ld(c + i), y = ld(a + i);
        vcc += x * x; vaa += y * y; vca += x * y;
    }
    float cc = hsum(vcc), aa = hsum(vaa), ca = hsum(vca);
    for (; i < d; i++) { cc += c[i] * c[i]; aa += a[i] * a[i]; ca += c[i] * a[i]; }
    float lc = sqrtf(cc), la = sqrtf(aa);
    RowStats s;
    s.nc = lc > eps ? lc : eps; s.na = la > eps ? la : eps;
    s.qc = cc / (s.nc * s.nc); s.qa = aa / (s.na * s.na); s.r = ca / (s.nc * s.na);
    s.ic = lc >= eps; s.ia = la >= eps; /* where clamp_min passes the gradient */
    return s;
}

double recon_fwd(const float *c, const float *a, long rows, int d, float eps, int threads) {
    double total = 0.0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : total)
    for (long r = 0; r < rows; r++) {
        RowStats s = stats(c + r * d, a + r * d, d, eps);
        total += (double)(s.qc + s.qa - 2.f * s.r);
    }
    return total;
}

/* grad_c, grad_a = scale * d/dc, d/da of the sum above */
void recon_bwd(const float *c, const float *a, long rows, int d, float eps, float scale, float *grad_c,
               float *grad_a, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *cr = c + r * d, *ar = a + r * d;
        RowStats s = stats(cr, ar, d, eps);
        float cross = -2.f * scale / (s.nc * s.na);
        float alpha_c = 2.f * scale / (s.nc * s.nc) * (1.f - s.ic * (s.qc - s.r));
        float alpha_a = 2.f * scale / (s.na * s.na) * (1.f - s.ia * (s.qa - s.r));
        for (int i = 0; i < d; i++) {
            grad_c[r * d + i] = alpha_c * cr[i] + cross * ar[i];
            grad_a[r * d + i] = alpha_a * ar[i] + cross * cr[i];
        }
    }
}
