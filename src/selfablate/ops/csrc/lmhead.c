/* The chunked LM head's pass over its logits (`fused._LinearCrossEntropy`): 2^x in place and each
 * row's sum, in one pass instead of two (exp2_, then sum). Rows are shared by OpenMP threads. */
#include <math.h>

#include "vec.h"

/* x: (rows, cols) contiguous, replaced by 2^x; sums: (rows,) */
void exp2_rowsum(float *x, float *sums, long rows, long cols, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        float *row = x + r * cols;
        vf acc = bc(0.f);
        long i = 0;
        for (; i + VL <= cols; i += VL) {
            vf y = vexp2(ld(row + i));
            st(row + i, y);
            acc += y;
        }
        float tail = 0.f;
        for (; i < cols; i++) { row[i] = exp2f(row[i]); tail += row[i]; }
        sums[r] = hsum(acc) + tail;
    }
}

/* out[i] = 2^x[i] for n (a multiple of VL) floats: vexp2 on its own, for its accuracy test. */
void exp2_array(const float *x, float *out, int n) {
    for (int i = 0; i < n; i += VL) st(out + i, vexp2(ld(x + i)));
}
