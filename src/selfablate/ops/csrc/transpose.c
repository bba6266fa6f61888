/* dst (cols, rows) = src (rows, cols)^T for float32, in TILE x TILE tiles (both sides of a tile
 * stay in L1), tiles shared by OpenMP threads. PyTorch's strided copy moves 6-8 GB/s here. */
#define TILE 32

void transpose(const float *src, float *dst, long rows, long cols, int threads) {
    long tr = (rows + TILE - 1) / TILE, tc = (cols + TILE - 1) / TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < tr * tc; t++) {
        long r0 = t / tc * TILE, c0 = t % tc * TILE;
        long r1 = r0 + TILE < rows ? r0 + TILE : rows, c1 = c0 + TILE < cols ? c0 + TILE : cols;
        if (r1 - r0 == TILE && c1 - c0 == TILE) {
            for (long c = 0; c < TILE; c++)
                for (long r = 0; r < TILE; r++) dst[(c0 + c) * rows + r0 + r] = src[(r0 + r) * cols + c0 + c];
        } else {
            for (long c = c0; c < c1; c++)
                for (long r = r0; r < r1; r++) dst[c * rows + r] = src[r * cols + c];
        }
    }
}
