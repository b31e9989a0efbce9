/* Int8 weight-only matrix products for decoding: y = x W^T with W stored as int8 rows and a scale per row.
 *
 * Built and loaded by int8_kernel.py (`cc -O3 -march=native -fopenmp`); used for products of at most 16
 * rows, where the time goes into reading the weights, not into arithmetic.
 *
 *     y[m, o] = scale[o] * sum_i q[o, i] * x[m, i]      x, y, scale: bf16;  q: int8 (out x in)
 *
 * Two things make it fast on a CPU:
 *
 * 1. Blocks of four weight rows and up to four activation rows: each step widens 16 weights of each of
 *    the four rows to float32 once (exactly: int8 -> int32 -> float32) and multiplies them with 16 values
 *    of every activation row into up to 16 independent accumulators, which keep the FMA units busy. The
 *    sums are float32 sums of the exact products, added in another order than a plain loop would.
 * 2. Software prefetch PREFETCH_BYTES ahead. The rows of one matrix lie one after another, so the kernel
 *    reads one long stream; the hardware prefetcher stops at every 4 KiB page and restarts slowly, which
 *    left PyTorch's int8 kernel well below the memory bandwidth on the project's VM. Asking for the
 *    cache line 8 KiB ahead keeps enough reads in flight (bench/kernels.json: ours against PyTorch's).
 *    A prefetch never faults, so reading ahead past the end of a matrix is harmless.
 *
 * Needs AVX-512 F, BW and VL (int8_kernel.py checks the CPU first and uses PyTorch's kernel otherwise).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define PREFETCH_BYTES 8192

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;  /* bf16 is the top half of a float32 */
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest, ties to even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((bits >> 16) | 0x40);  /* NaN stays a NaN */
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

/* sums[m][r] = dot(weight row r, activation row m) for w_rows (<= 4) consecutive weight rows and x_rows
 * (<= 4) activation rows. Each step widens 16 weights of each row once and uses them for every activation
 * row. Inlined with constant w_rows and x_rows, so that the 16 accumulators live in registers.
 * The prefetch walks the block's bytes linearly, 64 per step, while the four rows are read 16 bytes per
 * step each: it stays ahead of the last row while 3 * in < PREFETCH_BYTES (in <= 2048, as in SmolLM2). */
static inline __attribute__((always_inline)) void dot_block(const int8_t *w, const uint16_t *x, int64_t in,
                                                            int w_rows, int x_rows, int prefetch,
                                                            float sums[4][4]) {
    __m512 acc[4][4];
    for (int m = 0; m < x_rows; m++)
        for (int r = 0; r < w_rows; r++) acc[m][r] = _mm512_setzero_ps();
    const char *ahead = (const char *)w + PREFETCH_BYTES;
    for (int64_t i = 0; i < in; i += 16, ahead += 64) {
        if (prefetch) _mm_prefetch(ahead, _MM_HINT_T0);  /* 4 rows x 16 weights: one cache line per step */
        __mmask16 mask = in - i >= 16 ? 0xFFFF : (__mmask16)((1u << (in - i)) - 1);
        __m512 wv[4];
        for (int r = 0; r < w_rows; r++) wv[r] = load_weights(w + r * in + i, mask);
        for (int m = 0; m < x_rows; m++) {
            __m512 xv = load_activations(x + m * in + i, mask);
            for (int r = 0; r < w_rows; r++) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
        }
    }
    for (int m = 0; m < x_rows; m++)
        for (int r = 0; r < w_rows; r++) sums[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}

/* x: rows x in (bf16), q: out x in (int8), scale: out (bf16), y: rows x out (bf16). */
void int8_matmul(const uint16_t *x, const int8_t *q, const uint16_t *scale, uint16_t *y,
                 int64_t rows, int64_t in, int64_t out, int threads) {
    int64_t blocks = (out + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads) if(blocks >= 64)  /* tiny: not worth a team */
    for (int64_t b = 0; b < blocks; b++) {
        int64_t o = 4 * b;
        int w_rows = out - o < 4 ? (int)(out - o) : 4;
        const int8_t *w = q + o * in;
        for (int64_t m = 0; m < rows; m += 4) {  /* activation rows four at a time */
            int x_rows = rows - m < 4 ? (int)(rows - m) : 4;
            float sums[4][4];
            int prefetch = m == 0;  /* later groups find these weight rows in the cache */
            if (w_rows == 4 && x_rows == 4) dot_block(w, x + m * in, in, 4, 4, prefetch, sums);
            else if (w_rows == 4 && x_rows == 1) dot_block(w, x + m * in, in, 4, 1, prefetch, sums);
            else dot_block(w, x + m * in, in, w_rows, x_rows, prefetch, sums);
            for (int j = 0; j < x_rows; j++)
                for (int r = 0; r < w_rows; r++)
                    y[(m + j) * out + o + r] = float_to_bf16(sums[j][r] * bf16_to_float(scale[o + r]));
        }
    }
}
