/* One decoding step of one transformer block of an int8 model, in one call (decode_step.py calls it);
 * and, at the end of this file, its pieces on their own for glued_blocks.py, which calls them between the
 * weight products of any bf16 model (prompts and steps).
 *
 * Built into the same library as int8_matvec.c (int8_kernel.py compiles both). decode_block computes what
 * model.py's Block computes for one new token per row under bf16 autocast (precision.py), in the same
 * precisions:
 *
 *     h = bf16(rms_norm(x) * norm_1)                 x: the float32 residual stream, rows x d
 *     q, k, v = split(int8_matmul(h, qkv))           bf16
 *     q, k = bf16(rope(q)), bf16(rope(k))            rotated in float32 at each row's position
 *     cache[column] = k, v                           the bf16 KV cache gets one new column
 *     a = bf16(softmax(q . K^T / sqrt(D)) V)         over the visible cached columns; grouped-query heads
 *     x = x + int8_matmul(a, dense)
 *     h = bf16(rms_norm(x) * norm_2)
 *     g, u = split(int8_matmul(h, fc1))
 *     x = x + int8_matmul(bf16(bf16(silu(g)) * u), fc2)
 *
 * Why: at one token per row, dispatching a block's ~40 small PyTorch operations (norms, rotations,
 * casts, views, the cache copy, attention, SwiGLU) took 8.4 ms of a 23.0 ms step for SmolLM2's 30 blocks
 * (bench/decode_breakdown.json). Here the small work takes microseconds of vector loops.
 * The results agree with PyTorch's to float32 rounding before each bf16 rounding (sums run in another
 * order, exp is another implementation), so now and then a bf16 value lands one step apart; the tests
 * compare the two paths.
 *
 * Needs AVX-512 F, BW and VL, head_dim a multiple of 32 (at most 512), d_model and d_ff multiples of 16
 * (glued_blocks.unglued_reason checks all of it).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void int8_matmul(const uint16_t *x, const int8_t *q, const uint16_t *scale, uint16_t *y,
                 int64_t rows, int64_t in, int64_t out, int threads);

/* 16 bf16 values as float32 lanes (exact: bf16 is the top half of a float32). */
static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* 16 float32 lanes rounded to bf16 (to nearest, ties to even, NaN kept a NaN: as torch rounds). */
static inline void store_bf16(uint16_t *p, __m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

/* e^x in 16 lanes to about 1 float32 ulp (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7
 * polynomial for e^r, then scaled by 2^n); libm's expf is scalar and was the slowest part of SwiGLU. */
static inline __m512 exp_ps(__m512 x) {
    /* Clamped to where e^x is a finite float32 or underflows to 0; a NaN stays a NaN (it is the second
     * operand, the one max and min pass on when either is a NaN). */
    x = _mm512_min_ps(_mm512_set1_ps(88.7f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  /* ln 2 in two parts: exact n * hi */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* The model's sizes, in the order decode_step.py and glued_blocks.py pass them. */
enum { D_MODEL, N_HEAD, N_KV_HEAD, HEAD_DIM, D_FF, MAX_LEN, N_SIZES };

/* out = bf16(x / rms(x) * weight), as RMSNorm.forward (d: a multiple of 16). The mean of squares is
 * summed in double (8 lanes at a time): closer to the exact value than any float32 order of summation. */
static void rms_norm(const float *x, const float *weight, float eps, int64_t d, uint16_t *out) {
    __m512d low = _mm512_setzero_pd(), high = _mm512_setzero_pd();
    for (int64_t i = 0; i < d; i += 16) {
        __m512d a = _mm512_cvtps_pd(_mm256_loadu_ps(x + i)), b = _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8));
        low = _mm512_fmadd_pd(a, a, low);
        high = _mm512_fmadd_pd(b, b, high);
    }
    double squares = _mm512_reduce_add_pd(_mm512_add_pd(low, high));
    __m512 inverse = _mm512_set1_ps(1.0f / sqrtf((float)(squares / d) + eps));
    for (int64_t i = 0; i < d; i += 16)
        store_bf16(out + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), inverse), _mm512_loadu_ps(weight + i)));
}

/* x += y (float32 residual stream plus a bf16 block output), n: a multiple of 16. */
static void add_residual(float *x, const uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16)
        _mm512_storeu_ps(x + i, _mm512_add_ps(_mm512_loadu_ps(x + i), load_bf16(y + i)));
}

/* Rotate one head in place, as model.apply_rope: x * cos + roll(x, D/2) * sin_signed in float32, then
 * bf16 (dim: a multiple of 32, so that each half is whole vectors). */
static void rope(uint16_t *head, const float *cos, const float *sin_signed, int64_t dim) {
    int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i += 16) {
        __m512 a = load_bf16(head + i), b = load_bf16(head + half + i);  /* a rotating pair */
        __m512 new_a = _mm512_fmadd_ps(b, _mm512_loadu_ps(sin_signed + i), _mm512_mul_ps(a, _mm512_loadu_ps(cos + i)));
        __m512 new_b = _mm512_fmadd_ps(a, _mm512_loadu_ps(sin_signed + half + i),
                                       _mm512_mul_ps(b, _mm512_loadu_ps(cos + half + i)));
        store_bf16(head + i, new_a);
        store_bf16(head + half + i, new_b);
    }
}

/* v with each lane rounded to the nearest bf16 value (ties to even), kept as float32 lanes. */
static inline __m512 bf16_rounded_ps(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32((int)0xFFFF0000u)));
}

#define MAX_GROUP 4  /* query heads attended together: each key and value is widened once for all of them */

/* For `group` (<= MAX_GROUP) query heads that share one key/value head:
 * out[t] = bf16(softmax(q[t] . K^T / sqrt(dim)) V) over the columns `visible` marks (all when NULL).
 * As PyTorch's CPU attention for bf16 computes a block of keys: scores and their exponentials in float32,
 * each weight rounded to bf16 before it multiplies V, the float32 sum of the exponentials divides at the
 * end. (PyTorch splits long caches into blocks of keys, each against its own running maximum; here one
 * maximum serves all columns, so beyond its first block the rounding may differ slightly.)
 * q, out: group x dim (consecutive heads); scores: group x columns of scratch; dim: a multiple of 16. */
static inline __attribute__((always_inline)) void attend_heads(
        const uint16_t *q, int group, const uint16_t *keys, const uint16_t *values, const uint8_t *visible,
        int64_t columns, int64_t vectors, float *scores, uint16_t *out) {
    const int64_t dim = 16 * vectors;
    __m512 qv[MAX_GROUP][32], acc[MAX_GROUP][32], kv[32];
    float best[MAX_GROUP], total[MAX_GROUP], scale = 1.0f / sqrtf((float)dim);
    for (int t = 0; t < group; t++) {
        best[t] = -INFINITY;
        for (int64_t i = 0; i < vectors; i++) {
            qv[t][i] = load_bf16(q + t * dim + 16 * i);
            acc[t][i] = _mm512_setzero_ps();
        }
    }
    for (int64_t j = 0; j < columns; j++) {  /* scores: each key widened once for the group */
        if (visible && !visible[j]) {
            for (int t = 0; t < group; t++) scores[t * columns + j] = -INFINITY;
            continue;
        }
        for (int64_t i = 0; i < vectors; i++) kv[i] = load_bf16(keys + j * dim + 16 * i);
        for (int t = 0; t < group; t++) {
            __m512 dot = _mm512_mul_ps(qv[t][0], kv[0]);
            for (int64_t i = 1; i < vectors; i++) dot = _mm512_fmadd_ps(qv[t][i], kv[i], dot);
            float score = _mm512_reduce_add_ps(dot) * scale;
            scores[t * columns + j] = score;
            if (score > best[t]) best[t] = score;
        }
    }
    for (int t = 0; t < group; t++) {  /* exponentials (hidden columns weigh 0), summed, then rounded */
        float *row = scores + t * columns;
        __m512 sums = _mm512_setzero_ps();
        for (int64_t j = 0; j < columns; j += 16) {
            __mmask16 lanes = columns - j >= 16 ? 0xFFFF : (__mmask16)((1u << (columns - j)) - 1);
            __m512 s = _mm512_maskz_loadu_ps(lanes, row + j);
            __mmask16 shown = lanes & _mm512_cmp_ps_mask(s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            __m512 weight = _mm512_maskz_mov_ps(shown, exp_ps(_mm512_sub_ps(s, _mm512_set1_ps(best[t]))));
            sums = _mm512_add_ps(sums, weight);
            _mm512_mask_storeu_ps(row + j, lanes, bf16_rounded_ps(weight));
        }
        total[t] = _mm512_reduce_add_ps(sums);
    }
    for (int64_t j = 0; j < columns; j++) {  /* weighted values: each value widened once for the group */
        if (visible && !visible[j]) continue;
        for (int64_t i = 0; i < vectors; i++) kv[i] = load_bf16(values + j * dim + 16 * i);
        for (int t = 0; t < group; t++) {
            __m512 weight = _mm512_set1_ps(scores[t * columns + j]);
            for (int64_t i = 0; i < vectors; i++) acc[t][i] = _mm512_fmadd_ps(weight, kv[i], acc[t][i]);
        }
    }
    for (int t = 0; t < group; t++) {
        __m512 inverse = _mm512_set1_ps(1.0f / total[t]);
        for (int64_t i = 0; i < vectors; i++) store_bf16(out + t * dim + 16 * i, _mm512_mul_ps(acc[t][i], inverse));
    }
}

/* bf16(bf16(silu(gate)) * up) for n values (a multiple of 16), as MLP.forward: F.silu rounds to bf16. */
static void swiglu(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t n) {
    uint16_t silu[16];
    for (int64_t i = 0; i < n; i += 16) {
        __m512 g = load_bf16(gate + i);
        __m512 one_plus_exp = _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g)));
        store_bf16(silu, _mm512_div_ps(g, one_plus_exp));  /* silu(g) = g / (1 + e^-g) */
        store_bf16(out + i, _mm512_mul_ps(load_bf16(silu), load_bf16(up + i)));
    }
}

/* attend_heads, compiled separately for SmolLM2's shape (3 query heads per key/value head, head_dim 64):
 * with constant sizes the compiler keeps the group's queries and sums in registers (by hand: 21 -> 10 us
 * for 9 heads over 240 columns). */
static void attend(const uint16_t *q, int group, const uint16_t *keys, const uint16_t *values,
                   const uint8_t *visible, int64_t columns, int64_t dim, float *scores, uint16_t *out) {
    if (group == 3 && dim == 64) attend_heads(q, 3, keys, values, visible, columns, 4, scores, out);
    else attend_heads(q, group, keys, values, visible, columns, dim / 16, scores, out);
}

/* ---- The pieces of a block, each for every row at once (decode_block below; glued_blocks.py calls them
 * between PyTorch's products for bf16 models) --------------------------------------------------------- */

/* x += y where y is not NULL (float32 residual stream plus a bf16 block output), then out = the RMSNorm of
 * each of the `rows` rows of x: the residual add and the next block's norm in one pass. */
void add_and_norm(float *x, const uint16_t *y, const float *weight, float eps, int64_t rows, int64_t d,
                  uint16_t *out, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(rows >= 64)
    for (int64_t m = 0; m < rows; m++) {
        if (y) add_residual(x + m * d, y + m * d, d);
        rms_norm(x + m * d, weight, eps, d, out + m * d);
    }
}

/* A prompt's part of attention before the scores: rotate the queries and keys of qkv (batch x length rows of
 * (n_head + 2 n_kv) x dim, bf16) in place at each row's position, and copy the keys and values into the
 * cache's columns start .. start + length - 1. */
void rope_and_cache(uint16_t *qkv, uint16_t *keys, uint16_t *values, const int64_t *sizes, int64_t batch,
                    int64_t length, const int64_t *positions, int64_t start, const float *cos,
                    const float *sin_signed, int threads) {
    const int64_t n_head = sizes[N_HEAD], n_kv = sizes[N_KV_HEAD], dim = sizes[HEAD_DIM], max_len = sizes[MAX_LEN];
    const int64_t width = (n_head + 2 * n_kv) * dim;
    #pragma omp parallel for schedule(static) num_threads(threads) if(batch * length >= 64)
    for (int64_t m = 0; m < batch * length; m++) {
        uint16_t *row = qkv + m * width;
        const float *c = cos + positions[m] * dim, *s = sin_signed + positions[m] * dim;
        for (int64_t head = 0; head < n_head + n_kv; head++) rope(row + head * dim, c, s, dim);
        const int64_t b = m / length, column = start + m % length;
        for (int64_t g = 0; g < n_kv; g++) {
            int64_t at = ((b * n_kv + g) * max_len + column) * dim;
            memcpy(keys + at, row + (n_head + g) * dim, sizeof(uint16_t) * dim);
            memcpy(values + at, row + (n_head + n_kv + g) * dim, sizeof(uint16_t) * dim);
        }
    }
}

/* out = bf16(bf16(silu(gate)) * up) for every row of the fc1 output (rows x 2 ff, gate first). */
void swiglu_all(const uint16_t *gate_up, int64_t rows, int64_t ff, uint16_t *out, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(rows >= 16)
    for (int64_t m = 0; m < rows; m++) swiglu(gate_up + m * 2 * ff, gate_up + m * 2 * ff + ff, out + m * ff, ff);
}

/* The attention of one decoding step from the QKV projection's output (rows x (n_head + 2 n_kv) x dim,
 * bf16, rotated in place): rotate queries and keys at each row's position, write keys and values into the
 * cache's `column`, attend over the columns `visible` marks (rows x (column + 1) bytes; NULL: all).
 * keys, values: the layer's cache (rows x n_kv x max_len x dim, bf16); out: rows x n_head x dim, bf16.
 * Returns 0, or 1 where scratch memory could not be allocated. */
int attention_of_step(uint16_t *qkv, uint16_t *keys, uint16_t *values, const int64_t *sizes, int64_t rows,
                      const int64_t *positions, int64_t column, const uint8_t *visible, const float *cos,
                      const float *sin_signed, uint16_t *out, int threads) {
    const int64_t n_head = sizes[N_HEAD], n_kv = sizes[N_KV_HEAD], dim = sizes[HEAD_DIM], max_len = sizes[MAX_LEN];
    const int64_t width = (n_head + 2 * n_kv) * dim, group = n_head / n_kv, columns = column + 1;
    rope_and_cache(qkv, keys, values, sizes, rows, 1, positions, column, cos, sin_signed, threads);
    float *scores = malloc(sizeof(float) * rows * n_head * columns);
    if (!scores) return 1;
    const int64_t parts = (group + MAX_GROUP - 1) / MAX_GROUP;  /* query heads per key/value head, in parts */
    #pragma omp parallel for schedule(static) num_threads(threads) if(rows * n_head * columns >= 4096)
    for (int64_t task = 0; task < rows * n_kv * parts; task++) {  /* one (row, key/value head, part) each */
        int64_t m = task / (n_kv * parts), g = task / parts % n_kv, first = g * group + task % parts * MAX_GROUP;
        int count = (int)(g * group + group - first < MAX_GROUP ? g * group + group - first : MAX_GROUP);
        int64_t cached = (m * n_kv + g) * max_len * dim;
        attend(qkv + m * width + first * dim, count, keys + cached, values + cached,
               visible ? visible + m * columns : NULL, columns, dim, scores + (m * n_head + first) * columns,
               out + (m * n_head + first) * dim);
    }
    free(scores);
    return 0;
}

/* ---- A whole block: the parts above around int8_matmul ------------------------------------------------ */

/* The block's tensors, in the order decode_step.py passes their addresses. */
enum { NORM_1, QKV, QKV_SCALE, DENSE, DENSE_SCALE, NORM_2, FC1, FC1_SCALE, FC2, FC2_SCALE, KEYS, VALUES };

/* One block for `rows` new tokens: x (rows x d, float32) updated in place; the other arguments as for
 * attention_of_step. Returns 0, or 1 where scratch memory could not be allocated (x is left as it was). */
int decode_block(void *const *tensors, const int64_t *sizes, float eps, float *x, int64_t rows,
                  const int64_t *positions, int64_t column, const uint8_t *visible,
                  const float *cos, const float *sin_signed, int threads) {
    const int64_t d = sizes[D_MODEL], inner = sizes[N_HEAD] * sizes[HEAD_DIM], ff = sizes[D_FF];
    const int64_t width = (sizes[N_HEAD] + 2 * sizes[N_KV_HEAD]) * sizes[HEAD_DIM];
    uint16_t *h = malloc(sizeof(uint16_t) * rows * d), *y = malloc(sizeof(uint16_t) * rows * d);
    uint16_t *qkv = malloc(sizeof(uint16_t) * rows * width), *attended = malloc(sizeof(uint16_t) * rows * inner);
    uint16_t *gate_up = malloc(sizeof(uint16_t) * rows * 2 * ff), *hidden = malloc(sizeof(uint16_t) * rows * ff);
    int failed = !(h && y && qkv && attended && gate_up && hidden);
    if (failed) goto done;

    add_and_norm(x, NULL, tensors[NORM_1], eps, rows, d, h, threads);
    int8_matmul(h, tensors[QKV], tensors[QKV_SCALE], qkv, rows, d, width, threads);
    failed = attention_of_step(qkv, tensors[KEYS], tensors[VALUES], sizes, rows, positions, column, visible, cos,
                               sin_signed, attended, threads);
    if (failed) goto done;
    int8_matmul(attended, tensors[DENSE], tensors[DENSE_SCALE], y, rows, inner, d, threads);
    add_and_norm(x, y, tensors[NORM_2], eps, rows, d, h, threads);  /* x += attention; h = norm_2(x) */
    int8_matmul(h, tensors[FC1], tensors[FC1_SCALE], gate_up, rows, d, 2 * ff, threads);
    swiglu_all(gate_up, rows, ff, hidden, threads);
    int8_matmul(hidden, tensors[FC2], tensors[FC2_SCALE], y, rows, ff, d, threads);
    add_residual(x, y, rows * d);

done:
    free(h); free(y); free(qkv); free(attended); free(gate_up); free(hidden);  /* free(NULL) does nothing */
    return failed;
}
