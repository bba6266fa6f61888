/* VL-wide float32 vectors (GCC/Clang vector extensions) and their exp, shared by the kernels.
 * Built with -march=native, they become whatever vectors the machine has. */
#ifndef SELFABLATE_VEC_H
#define SELFABLATE_VEC_H
#include <stdint.h>
#include <string.h>

#define VL 16
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(VL * sizeof(uint32_t))));

static inline vf bc(float x) { return (vf){} + x; } /* a broadcast, with -fno-signed-zeros */
static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf sel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vmax(vf a, vf b) { return sel(a > b, a, b); }
static inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < VL; i++) s += v[i]; return s; }

/* e^x within 2 ulp (3.7 x 2^-24 relative at most, measured) for x >= -87, and 0 below:
 * x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, Cody-Waite), e^r by its degree-6 Taylor
 * polynomial (error < 2e-7), 2^n in the exponent bits. Needs IEEE float addition (no -ffast-math):
 * the rounding to n adds and subtracts 1.5 * 2^23. */
static inline vf vexp(vf x) {
    vi tiny = x < bc(-87.f);
    x = sel(x > bc(88.f), bc(88.f), sel(tiny, bc(0.f), x));
    vf n = (x * bc(1.44269504f) + bc(12582912.f)) - bc(12582912.f); /* round to nearest */
    vf r = (x - n * bc(0.693359375f)) - n * bc(-2.12194440e-4f);
    vf p = bc(1.f / 720);
    p = p * r + bc(1.f / 120); p = p * r + bc(1.f / 24); p = p * r + bc(1.f / 6);
    p = p * r + bc(0.5f); p = p * r + bc(1.f); p = p * r + bc(1.f);
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return sel(tiny, bc(0.f), p * (vf)e);
}

/* 2^x within 4 ulp (3.6 x 2^-24 relative at most, measured) for x >= -126, and 0 below:
 * x = n + f with |f| <= 1/2 (exact), 2^f by a degree-5 polynomial fitted for least maximum
 * relative error (1.3 x 2^-24 before float32 rounding), 2^n in the exponent bits. Cheaper than
 * vexp by the scaling of x and one polynomial term: the attention kernel's scores come in base 2. */
static inline vf vexp2(vf x) {
    vi tiny = x < bc(-126.f);
    x = sel(x > bc(127.f), bc(127.f), sel(tiny, bc(0.f), x));
    vf n = (x + bc(12582912.f)) - bc(12582912.f); /* round to nearest */
    vf f = x - n;
    vf p = bc(1.3276471519102426e-3f);
    p = p * f + bc(9.675541330666448e-3f); p = p * f + bc(5.550713274962157e-2f);
    p = p * f + bc(2.4022119723934282e-1f); p = p * f + bc(6.931469670638642e-1f); p = p * f + bc(1.f);
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return sel(tiny, bc(0.f), p * (vf)e);
}

/* out[i] = e^x[i] for n (a multiple of VL) floats: vexp on its own, for its accuracy test. */
static inline void exp_into(const float *x, float *out, int n) {
    for (int i = 0; i < n; i += VL) st(out + i, vexp(ld(x + i)));
}
#endif
