/* Int8 weight-only matrix products for decoding: y = x W^T with W stored as int8 rows and a scale per row.
 *
 * Built and loaded by int8_kernel.py (`cc -O3 -march=native -fopenmp`); used for products of at most 16
 * rows (a decoding step of up to 16 sequences).
 *
 *     y[m, o] = scale[o] * sum_i q[o, i] * x[m, i]      x, y, scale: bf16;  q: int8 (out x in)
 *
 * With one row the time goes into reading the weights; two things make that fast:
 *
 * 1. Blocks of four weight rows and up to four activation rows (`dot_block`): each step widens 16
 *    weights of each of the four rows to float32 once (exactly: int8 -> int32 -> float32) and multiplies
 *    them with 16 values of every activation row into up to 16 independent accumulators, which keep the
 *    FMA units busy. The sums are float32 sums of the exact products, added in another order than a plain
 *    loop would.
 * 2. Software prefetch PREFETCH_BYTES ahead. The rows of one matrix lie one after another, so the kernel
 *    reads one long stream; the hardware prefetcher stops at every 4 KiB page and restarts slowly, which
 *    left PyTorch's int8 kernel well below the memory bandwidth on the project's VM. Asking for the
 *    cache line 8 KiB ahead keeps enough reads in flight (bench/kernels.json: ours against PyTorch's).
 *    A prefetch never faults, so reading ahead past the end of a matrix is harmless.
 *
 * With more rows the FMA loop becomes bound by arithmetic (every widened weight is multiplied once per
 * row); on a CPU with AMX, products of `amx_min_rows` (5) to 16 rows go to the matrix unit instead (the
 * section "Several rows on AMX" below).
 *
 * Needs AVX-512 F, BW and VL (int8_kernel.py checks the CPU first and uses PyTorch's kernel otherwise);
 * the AMX path is compiled where `-march=native` also has AMX-TILE, AMX-BF16 and AVX512-BF16.
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

/* ---- Several rows on AMX ------------------------------------------------------------------------------
 *
 * With 16 activation rows, `int8_matmul`'s FMA loop (below) multiplies every widened weight 16 times and is
 * bound by arithmetic, not by memory (bench/kernels.json: `fma_ms`). A CPU with AMX (Intel Sapphire Rapids
 * and later) has a matrix unit that multiplies 16 x 32 bf16 by 32 x 16 bf16 in one instruction, summing
 * the products in float32. So for several rows: widen each group of 16 weight rows once, int8 -> bf16
 * (exact: every int8 value is a bf16 value), into a small buffer, and let the matrix unit multiply it with
 * the activations, 32 inputs at a time. The weights are still read once from memory; the arithmetic is no
 * longer the bottleneck.
 *
 * The matrix unit computes C += A B on "tiles" (up to 16 rows of 64 bytes each). Here
 *
 *     A = 16 weight rows x 32 inputs (bf16, row-major: the widened weights as they are)
 *     B = the same 32 inputs x 16 activation rows, stored as 16 rows of pairs of consecutive inputs
 *         (AMX's "VNNI" layout: B[p][2m + j] = x[m][2p + j]), built once per call
 *     C = 16 weight rows x 16 activation rows, float32
 *
 * so C is y transposed; it is scaled and rounded to bf16 as the FMA loop does. Rows past `rows` in B are
 * zero and are not written out. The products are exact and summed in float32 as in the FMA loop, in
 * another order, except that the matrix unit treats denormal numbers (below 1.2e-38) as zero; so a
 * sequence's int8 results can differ in the last bf16 bit between a batch of 4 rows (FMA loop) and one of
 * 5 or more (AMX). Linux hands out the tile registers only to a process that asks (arch_prctl), which
 * int8_amx_set does. Needs `in` to be a multiple of 32 and `out` of 16 (SmolLM2's are); other shapes use
 * the FMA loop. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define HAVE_AMX 1

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* Tile 0: C, 1: A, 2: B; each 16 rows x 64 bytes. */
static void configure_tiles(void) {
    tile_config config = {0};
    config.palette = 1;
    for (int t = 0; t < 3; t++) {
        config.bytes_per_row[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

/* n int8 weights (n a multiple of 64) as bf16, reading ahead as the FMA loop does. */
static void widen_to_bf16(const int8_t *w, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i += 64) {
        _mm_prefetch((const char *)w + i + PREFETCH_BYTES, _MM_HINT_T0);
        for (int half = 0; half < 64; half += 32) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + i + half));
            __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
            __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
            _mm512_store_si512((__m512i *)(out + i + half), (__m512i)_mm512_cvtne2ps_pbh(high, low));
        }
    }
}

/* x (rows x in, bf16) as AMX's B operand for all of `in`: packed[p][m] = the pair x[m][2p], x[m][2p + 1]. */
static void pack_activations(const uint16_t *x, int64_t rows, int64_t in, uint32_t *packed) {
    memset(packed, 0, (size_t)in / 2 * 16 * sizeof(uint32_t));
    for (int64_t m = 0; m < rows; m++)
        for (int64_t p = 0; p < in / 2; p++) memcpy(&packed[p * 16 + m], x + m * in + 2 * p, sizeof(uint32_t));
}

/* C for one group of 16 weight rows: their sums with every activation row, c[r][m] (float32). */
static void multiply_group(const int8_t *q, const uint32_t *packed, int64_t in, uint16_t *wide, float c[16][16]) {
    widen_to_bf16(q, 16 * in, wide);
    _tile_zero(0);
    for (int64_t k = 0; k < in; k += 32) {
        _tile_loadd(1, wide + k, in * 2);
        _tile_loadd(2, packed + k * 8, 64);  /* pairs k/2 .. k/2 + 15, 16 rows each */
        _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, c, 64);
}

/* Scale and round c (16 weight rows x 16 activation rows) to bf16 (to nearest even, as float_to_bf16) and
 * write it into columns o .. o + 15 of y's first `rows` rows: y is c transposed. */
static void write_group(float c[16][16], const uint16_t *scale, int64_t o, uint16_t *y, int64_t rows,
                        int64_t out) {
    uint16_t rounded[16][16];  /* rounded[r][m]: weight row o + r, activation row m */
    for (int r = 0; r < 16; r++) {
        __m512 scaled = _mm512_mul_ps(_mm512_loadu_ps(c[r]), _mm512_set1_ps(bf16_to_float(scale[o + r])));
        _mm256_storeu_si256((__m256i *)rounded[r], (__m256i)_mm512_cvtneps_pbh(scaled));
    }
    for (int64_t m = 0; m < rows; m++)
        for (int r = 0; r < 16; r++) y[m * out + o + r] = rounded[r][m];
}

static int amx_min_rows = 0;     /* products of this many rows or more use AMX; 0: none */
static int64_t amx_calls = 0;    /* products computed on AMX so far (tests read it: int8_amx_calls) */

int64_t int8_amx_calls(void) { return __atomic_load_n(&amx_calls, __ATOMIC_RELAXED); }
int int8_amx_min_rows(void) { return __atomic_load_n(&amx_min_rows, __ATOMIC_RELAXED); }

/* Use AMX for products of min_rows (1-16) to 16 rows, or not at all (0). Asks Linux for the tile registers
 * first; returns the threshold in effect (0: AMX off, or not allowed here). */
int int8_amx_set(int min_rows) {
    int allowed = min_rows > 0 && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    __atomic_store_n(&amx_min_rows, allowed ? min_rows : 0, __ATOMIC_RELAXED);
    return allowed ? min_rows : 0;
}

/* As int8_matmul for rows <= 16, `in` a multiple of 32, `out` of 16. Returns 1 when out of memory (then
 * part of y may be written; the caller computes all of it again). */
static int int8_matmul_amx(const uint16_t *x, const int8_t *q, const uint16_t *scale, uint16_t *y,
                           int64_t rows, int64_t in, int64_t out, int threads) {
    uint32_t *packed = aligned_alloc(64, (size_t)in * 32);  /* in / 2 pairs x 16 rows x 4 bytes */
    if (packed == NULL) return 1;
    pack_activations(x, rows, in, packed);
    int64_t groups = out / 16;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if(groups >= 16)
    {
        uint16_t *wide = aligned_alloc(64, (size_t)in * 32);  /* 16 widened weight rows */
        if (wide == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        configure_tiles();  /* per thread: the tile registers are each thread's own */
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            if (wide == NULL) continue;
            float c[16][16];
            multiply_group(q + g * 16 * in, packed, in, wide, c);
            write_group(c, scale, g * 16, y, rows, out);
        }
        _tile_release();
        free(wide);
    }
    free(packed);
    if (!failed) __atomic_fetch_add(&amx_calls, 1, __ATOMIC_RELAXED);
    return failed;
}
#else
int int8_amx_set(int min_rows) { (void)min_rows; return 0; }  /* built without AMX: always the FMA loop */
int64_t int8_amx_calls(void) { return 0; }
int int8_amx_min_rows(void) { return 0; }
#endif

/* x: rows x in (bf16), q: out x in (int8), scale: out (bf16), y: rows x out (bf16). */
void int8_matmul(const uint16_t *x, const int8_t *q, const uint16_t *scale, uint16_t *y,
                 int64_t rows, int64_t in, int64_t out, int threads) {
#ifdef HAVE_AMX
    int min_rows = __atomic_load_n(&amx_min_rows, __ATOMIC_RELAXED);
    if (min_rows > 0 && rows >= min_rows && rows <= 16 && in % 32 == 0 && out % 16 == 0 &&
        int8_matmul_amx(x, q, scale, y, rows, in, out, threads) == 0)
        return;
#endif
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
