/* gelu_new (GPT-2's and GPT-Neo's tanh approximation) and its derivative, elementwise:
 *     gelu(x) = 0.5 x (1 + tanh(y)) = x sigmoid(2y),  y = sqrt(2/pi) (x + 0.044715 x^3)
 * The sigmoid form has no cancellation where tanh(y) is near -1. Shared by OpenMP threads. */
#include <math.h>

#include "vec.h"

#define C1 1.5957691216057308f /* 2 sqrt(2/pi) */
#define C3 0.044715f

static inline vf sigmoid_of(vf u) { return bc(1.f) / (bc(1.f) + vexp(-u)); }
static inline float sigmoid1(float u) { return 1.f / (1.f + expf(-u)); }

void gelu_fwd(const float *x, float *y, long n, int threads) {
    long nv = n / VL * VL;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < nv; i += VL) {
        vf v = ld(x + i);
        st(y + i, v * sigmoid_of(bc(C1) * (v + bc(C3) * v * v * v)));
    }
    for (long i = nv; i < n; i++) y[i] = x[i] * sigmoid1(C1 * (x[i] + C3 * x[i] * x[i] * x[i]));
}

/* dx = g * d gelu / dx = g * (s + x s (1 - s) u'),  s = sigmoid(u), u = 2y, u' = C1 (1 + 3 C3 x^2) */
void gelu_bwd(const float *x, const float *g, float *dx, long n, int threads) {
    long nv = n / VL * VL;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < nv; i += VL) {
        vf v = ld(x + i), v2 = v * v, s = sigmoid_of(bc(C1) * (v + bc(C3) * v2 * v));
        st(dx + i, ld(g + i) * (s + v * s * (bc(1.f) - s) * (bc(C1) * (bc(1.f) + bc(3.f * C3) * v2))));
    }
    for (long i = nv; i < n; i++) {
        float v = x[i], s = sigmoid1(C1 * (v + C3 * v * v * v));
        dx[i] = g[i] * (s + v * s * (1.f - s) * C1 * (1.f + 3.f * C3 * v * v));
    }
}
