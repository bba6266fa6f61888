/* gelu_new (GPT-2's and GPT-Neo's tanh approximation) and its derivative, elementwise, with an
 * optional unit mask multiplied in (the ablated stream's neurons) in the same pass:
 *     y = gelu(x) m,  gelu(x) = 0.5 x (1 + tanh(u/2)) = x sigmoid(u),  u = 2 sqrt(2/pi) (x + 0.044715 x^3)
 *     dx = g m gelu'(x),  gelu'(x) = s + x s (1 - s) u',  s = sigmoid(u),  u' = 2 sqrt(2/pi) (1 + 3 0.044715 x^2)
 *     dm = g gelu(x)
 * The sigmoid form has no cancellation where tanh is near -1. m == NULL: no mask; dm == NULL: no dm.
 * Shared by OpenMP threads. */
#include <math.h>

#include "vec.h"

#define C1 1.5957691216057308f /* 2 sqrt(2/pi) */
#define C3 0.044715f

static inline vf sigmoid_of(vf u) { return bc(1.f) / (bc(1.f) + vexp(-u)); }
static inline float sigmoid1(float u) { return 1.f / (1.f + expf(-u)); }

void gelu_fwd(const float *x, const float *m, float *y, long n, int threads) {
    long nv = n / VL * VL;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < nv; i += VL) {
        vf v = ld(x + i), out = v * sigmoid_of(bc(C1) * (v + bc(C3) * v * v * v));
        st(y + i, m ? out * ld(m + i) : out);
    }
    for (long i = nv; i < n; i++) {
        float out = x[i] * sigmoid1(C1 * (x[i] + C3 * x[i] * x[i] * x[i]));
        y[i] = m ? out * m[i] : out;
    }
}

void gelu_bwd(const float *x, const float *m, const float *g, float *dx, float *dm, long n, int threads) {
    long nv = n / VL * VL;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < nv; i += VL) {
        vf v = ld(x + i), v2 = v * v, s = sigmoid_of(bc(C1) * (v + bc(C3) * v2 * v)), gi = ld(g + i);
        vf slope = s + v * s * (bc(1.f) - s) * (bc(C1) * (bc(1.f) + bc(3.f * C3) * v2));
        if (m) {
            st(dx + i, gi * ld(m + i) * slope);
            if (dm) st(dm + i, gi * v * s);
        } else {
            st(dx + i, gi * slope);
        }
    }
    for (long i = nv; i < n; i++) {
        float v = x[i], s = sigmoid1(C1 * (v + C3 * v * v * v));
        float slope = s + v * s * (1.f - s) * C1 * (1.f + 3.f * C3 * v * v);
        dx[i] = g[i] * (m ? m[i] : 1.f) * slope;
        if (m && dm) dm[i] = g[i] * v * s;
    }
}
