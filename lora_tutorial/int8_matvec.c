/* Int8 weight-only matrix products for decoding: y = x W^T with W stored as int8 rows and a scale per row.
 *
 * Built and loaded by int8_kernel.py (`cc -O3 -march=native -fopenmp`); used for products of at most 16
 * rows, where the time goes into reading the weights, not into arithmetic.
 *
 *     y[m, o] = scale[o] * sum_i q[o, i] * x[m, i]      x, y, scale: bf16;  q: int8 (out x in)
 *
 * Two things make it fast on a CPU:
 *
 * 1. Four weight rows at a time: every 16 activations loaded feed four fused multiply-adds, and four
 *    independent accumulators keep the FMA units busy. The int8 weights are widened to float32 in
 *    registers (exactly: int8 -> int32 -> float32), so the sums are the float32 sums of the dequantized
 *    products, summed in a different order than a reference loop.
 * 2. Software prefetch PREFETCH_BYTES ahead. The rows of one matrix lie one after another, so the kernel
 *    reads one long stream; the hardware prefetcher stops at every 4 KiB page and restarts slowly, which
 *    left PyTorch's int8 kernel at about half of the memory bandwidth on the project's VM. Asking for the
 *    cache line 8 KiB ahead keeps enough reads in flight (bench/README: 2x on the model's matrices).
 *    A prefetch never faults, so reading ahead past the end of a matrix is harmless.
 *
 * Needs AVX-512 F and BW (int8_kernel.py checks the CPU first and uses PyTorch's kernel otherwise).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PREFETCH_BYTES 8192

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;  /* bf16 is the top half of a float32 */
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest, ties to even (as torch does) */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* 16 int8 weights (fewer under `mask`, the rest zero) as 16 float32 lanes: exact (int8 -> int32 -> float32). */
static inline __m512 load_weights(const int8_t *p, __mmask16 mask) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

/* 16 bf16 activations as 16 float32 lanes (exact: bf16 is the top half of a float32). */
static inline __m512 load_activations(const uint16_t *p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

/* sums[m][r] = dot(weight row r, activation row m) for N_ROWS (<= 4) consecutive weight rows and N_X (<= 4)
 * activation rows. Each step widens 16 weights of each row once and uses them for every activation row.
 * Inlined with constant N_ROWS and N_X, so that the 16 accumulators live in registers. */
static inline __attribute__((always_inline)) void dot_block(const int8_t *w, const uint16_t *x, int64_t in,
                                                            int N_ROWS, int N_X, int prefetch, float sums[4][4]) {
    __m512 acc[4][4];
    for (int m = 0; m < N_X; m++)
        for (int r = 0; r < N_ROWS; r++) acc[m][r] = _mm512_setzero_ps();
    const char *ahead = (const char *)w + PREFETCH_BYTES;
    for (int64_t i = 0; i < in; i += 16, ahead += 64) {
        if (prefetch) _mm_prefetch(ahead, _MM_HINT_T0);  /* 4 rows x 16 weights: one cache line per step */
        __mmask16 mask = in - i >= 16 ? 0xFFFF : (__mmask16)((1u << (in - i)) - 1);
        __m512 wv[4];
        for (int r = 0; r < N_ROWS; r++) wv[r] = load_weights(w + r * in + i, mask);
        for (int m = 0; m < N_X; m++) {
            __m512 xv = load_activations(x + m * in + i, mask);
            for (int r = 0; r < N_ROWS; r++) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
        }
    }
    for (int m = 0; m < N_X; m++)
        for (int r = 0; r < N_ROWS; r++) sums[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}

/* x: rows x in (bf16), q: out x in (int8), scale: out (bf16), y: rows x out (bf16). */
void int8_matmul(const uint16_t *x, const int8_t *q, const uint16_t *scale, uint16_t *y,
                 int64_t rows, int64_t in, int64_t out, int threads) {
    int64_t blocks = (out + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t o = 4 * b;
        int n_rows = out - o < 4 ? (int)(out - o) : 4;
        const int8_t *w = q + o * in;
        for (int64_t m = 0; m < rows; m += 4) {  /* activation rows four at a time */
            int n_x = rows - m < 4 ? (int)(rows - m) : 4;
            float sums[4][4];
            int prefetch = m == 0;  /* later groups find these weight rows in the cache */
            if (n_rows == 4 && n_x == 4) dot_block(w, x + m * in, in, 4, 4, prefetch, sums);
            else if (n_rows == 4 && n_x == 1) dot_block(w, x + m * in, in, 4, 1, prefetch, sums);
            else dot_block(w, x + m * in, in, n_rows, n_x, prefetch, sums);
            for (int j = 0; j < n_x; j++)
                for (int r = 0; r < n_rows; r++)
                    y[(m + j) * out + o + r] = float_to_bf16(sums[j][r] * bf16_to_float(scale[o + r]));
        }
    }
}
