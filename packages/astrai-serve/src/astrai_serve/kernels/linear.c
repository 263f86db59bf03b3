/* Linear layers for decode steps of a few sequences on x86 CPUs with AVX2 and FMA, fp32 and
 * int8 (the serving kernels' overview: small_batch.h).
 *
 * y (M, N) = x (M, K) W (N, K)^T + b, W in torch's plain row-major layout. With few rows the
 * product is a read of W: each W row is streamed once, and dotted with every x row while it is
 * in L1. Threads split W's rows (OpenMP, the runtime torch already loaded).
 *
 * Batch invariance: each output y[m][n] is computed in one fixed order that does not depend on
 * M or on where the row falls in a tile, so a row's result is bit-identical alone or in any
 * batch the kernel serves:
 *   f32: one 8-lane accumulator over k ascending in steps of 8, a fixed horizontal sum, then
 *        the K % 8 tail in order, then the bias;
 *   q8:  exact int32 integer dots (order-free), then sw[n] * sx[m] * dot + b[n].
 */
#include "simd.h"
#include "small_batch.h"

#define F32_GROUP 24      /* W rows per thread task: 8 tiles of 3 rows, or 24 single rows */
#define F32_PREFETCH 4096 /* floats (16 KB) ahead in W; 1 KB and 4 KB were slower, 32 KB equal */

/* The end of one f32 output: horizontal sum, the K % 8 tail, the bias. */
static inline float f32_finish(__m256 acc, const float *x, const float *w, int64_t K8, int64_t K,
                               const float *bias, int64_t n) {
    float s = hsum_ps(acc);
    for (int64_t k = K8; k < K; k++) s += x[k] * w[k];
    return bias ? s + bias[n] : s;
}

/* One W row against one x row. W is read as one sequential stream (row n + 1 follows row n),
 * prefetched F32_PREFETCH floats ahead: against tiles of 8 rows (8 streams at once) this read
 * 5-15% faster at one x row on a 2-core AMD EPYC Milan; the hardware prefetcher alone keeps
 * too few lines in flight for the memory's speed. A prefetch past the end of W never faults. */
static inline float f32_row(const float *x, const float *w, int64_t K, const float *bias, int64_t n) {
    const int64_t K8 = K & ~(int64_t)7;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
        if (!(k & 15)) _mm_prefetch((const char *)(w + k + F32_PREFETCH), _MM_HINT_T0); /* a line per 16 floats */
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), acc);
    }
    return f32_finish(acc, x, w, K8, K, bias, n);
}

/* Three W rows against four x rows: twelve FMA chains (two FMA units of 4-cycle latency need
 * at least eight in flight), seven loads per twelve FMAs. Measured against 2x4, 2x6, 3x3, 3x6,
 * 4x3, 4x4 and 4x6 tiles on a 2-core AMD EPYC: the fastest at 12 and 24 rows. */
static void f32_tile_3x4(const float *x, int64_t ldy, const float *w, float *y, int64_t n, int64_t K,
                         const float *bias) {
    const int64_t K8 = K & ~(int64_t)7;
    __m256 c[4][3];
    for (int i = 0; i < 4; i++) c[i][0] = c[i][1] = c[i][2] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
        __m256 b0 = _mm256_loadu_ps(w + k), b1 = _mm256_loadu_ps(w + K + k), b2 = _mm256_loadu_ps(w + 2 * K + k);
        for (int i = 0; i < 4; i++) {
            __m256 a = _mm256_loadu_ps(x + i * K + k);
            c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
            c[i][2] = _mm256_fmadd_ps(a, b2, c[i][2]);
        }
    }
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < 3; r++) y[i * ldy + n + r] = f32_finish(c[i][r], x + i * K, w + r * K, K8, K, bias, n + r);
}

void astrai_linear_f32(const float *x, const float *W, const float *bias, float *y, int64_t M,
                       int64_t N, int64_t K, int threads) {
    const int64_t groups = (N + F32_GROUP - 1) / F32_GROUP;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t n0 = g * F32_GROUP;
        const int64_t R = N - n0 < F32_GROUP ? N - n0 : F32_GROUP;
        int64_t m = 0;
        if (R == F32_GROUP)
            for (; m + 4 <= M; m += 4)
                for (int64_t r = 0; r < R; r += 3) f32_tile_3x4(x + m * K, N, W + (n0 + r) * K, y + m * N, n0 + r, K, bias);
        for (; m < M; m++)
            for (int64_t r = 0; r < R; r++) y[m * N + n0 + r] = f32_row(x + m * K, W + (n0 + r) * K, K, bias, n0 + r);
    }
}

/* Each x row as int8 with one scale, s = max|x| / 127: |q| <= 127, so the u8 x s8 products
 * below sum in pairs to at most 2 * 127 * 127 < 2^15 and never saturate. Rounding is to
 * nearest even (the default mode, as lrintf), 8 lanes at a time. */
static void quantize_rows(const float *x, int8_t *qx, float *sx, int64_t M, int64_t K) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const int64_t K8 = K & ~(int64_t)7;
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        int8_t *out = qx + m * K;
        __m256 vpeak = _mm256_setzero_ps();
        for (int64_t k = 0; k < K8; k += 8) vpeak = _mm256_max_ps(vpeak, _mm256_andnot_ps(sign, _mm256_loadu_ps(row + k)));
        __m128 p4 = _mm_max_ps(_mm256_castps256_ps128(vpeak), _mm256_extractf128_ps(vpeak, 1));
        p4 = _mm_max_ps(p4, _mm_movehl_ps(p4, p4));
        p4 = _mm_max_ss(p4, _mm_shuffle_ps(p4, p4, 1));
        float peak = _mm_cvtss_f32(p4);
        for (int64_t k = K8; k < K; k++) peak = row[k] > peak ? row[k] : (-row[k] > peak ? -row[k] : peak);
        const float inv = peak > 0.0f ? 127.0f / peak : 0.0f;
        sx[m] = peak / 127.0f;
        const __m256 vinv = _mm256_set1_ps(inv);
        for (int64_t k = 0; k < K8; k += 8) {
            const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k), vinv));
            const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            _mm_storel_epi64((__m128i *)(out + k), _mm_packs_epi16(q16, q16));
        }
        for (int64_t k = K8; k < K; k++) out[k] = (int8_t)_mm_cvtss_si32(_mm_set_ss(row[k] * inv));
    }
}

/* One int8 W row against up to 4 quantized x rows: exact int32 dots. The sign trick (as in
 * llama.cpp's q8_0 dot) makes x non-negative for the u8 x s8 multiply-add. Each row count has
 * its own loop so the accumulators stay in registers. */
#define Q8_STEP(i)                                                                                 \
    do {                                                                                           \
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(qx + (i) * K + k));                \
        a##i = _mm256_add_epi32(a##i, _mm256_madd_epi16(_mm256_maddubs_epi16(                      \
                   _mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv)), ones));                     \
    } while (0)
/* W is one sequential stream (row n + 1 follows row n), read far ahead: without the software
 * prefetch, the one-row product read 14-16 GB/s; with it 20 (2-core AMD EPYC Milan; 1-16 KB
 * ahead measured, 4 KB and beyond equal). A prefetch past the end of W never faults. */
#define Q8_PREFETCH 4096
#define Q8_LOAD_W                                                                                  \
    _mm_prefetch((const char *)(w + k + Q8_PREFETCH), _MM_HINT_T0);                                \
    const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k))
static void q8_row(const int8_t *qx, int M, const int8_t *w, int64_t K, int32_t *dot) {
    const int64_t K32 = K & ~(int64_t)31;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    switch (M) {
    case 1: for (; k < K32; k += 32) { Q8_LOAD_W; Q8_STEP(0); } break;
    case 2: for (; k < K32; k += 32) { Q8_LOAD_W; Q8_STEP(0); Q8_STEP(1); } break;
    case 3: for (; k < K32; k += 32) { Q8_LOAD_W; Q8_STEP(0); Q8_STEP(1); Q8_STEP(2); } break;
    default: for (; k < K32; k += 32) { Q8_LOAD_W; Q8_STEP(0); Q8_STEP(1); Q8_STEP(2); Q8_STEP(3); }
    }
    const __m256i acc[4] = {a0, a1, a2, a3};
    for (int i = 0; i < M; i++) {
        int32_t s = hsum_epi32(acc[i]);
        for (int64_t j = K32; j < K; j++) s += (int32_t)qx[i * K + j] * (int32_t)w[j];
        dot[i] = s;
    }
}

/* x (M, K) fp32 is quantized into qx (M, K) and sx (M) first (the caller's scratch). */
void astrai_linear_q8(const float *x, int8_t *qx, float *sx, const int8_t *W, const float *sw,
                      const float *bias, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    quantize_rows(x, qx, sx, M, K);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        int32_t dot[4];
        for (int64_t m = 0; m < M; m += 4) {
            const int rows = (int)(M - m < 4 ? M - m : 4);
            q8_row(qx + m * K, rows, W + n * K, K, dot);
            for (int i = 0; i < rows; i++) {
                const float v = sw[n] * sx[m + i] * (float)dot[i];
                y[(m + i) * N + n] = bias ? v + bias[n] : v;
            }
        }
    }
}
