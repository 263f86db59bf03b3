/* Serving kernels for decode steps of a few sequences on x86 CPUs with AVX2 and FMA: linear
 * layers (fp32, int8), RMSNorm and attention over the paged KV cache.
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
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define F32_ROWS 8   /* W rows per tile at one x row: 8 independent FMA chains */
#define F32_GROUP 24 /* W rows per thread task: 3 tiles of 8 rows, or 8 tiles of 3 */

static inline float hsum_ps(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

static inline int32_t hsum_epi32(__m256i v) {
    __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    a = _mm_hadd_epi32(a, a);
    a = _mm_hadd_epi32(a, a);
    return _mm_cvtsi128_si32(a);
}

/* The end of one f32 output: horizontal sum, the K % 8 tail, the bias. */
static inline float f32_finish(__m256 acc, const float *x, const float *w, int64_t K8, int64_t K,
                               const float *bias, int64_t n) {
    float s = hsum_ps(acc);
    for (int64_t k = K8; k < K; k++) s += x[k] * w[k];
    return bias ? s + bias[n] : s;
}

/* R W rows (w .. w + (R-1) K) against one x row. */
static void f32_rows(const float *x, const float *w, int R, float *y, int64_t n, int64_t K,
                     const float *bias) {
    const int64_t K8 = K & ~(int64_t)7;
    __m256 acc[F32_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k);
        for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + k), xv, acc[r]);
    }
    for (int r = 0; r < R; r++) y[n + r] = f32_finish(acc[r], x, w + r * K, K8, K, bias, n + r);
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
            for (int64_t r = 0; r < R; r += F32_ROWS)
                f32_rows(x + m * K, W + (n0 + r) * K, (int)(R - r < F32_ROWS ? R - r : F32_ROWS), y + m * N, n0 + r, K, bias);
    }
}

/* Each x row as int8 with one scale, s = max|x| / 127: |q| <= 127, so the u8 x s8 products
 * below sum in pairs to at most 2 * 127 * 127 < 2^15 and never saturate. */
static void quantize_rows(const float *x, int8_t *qx, float *sx, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        float peak = 0.0f;
        for (int64_t k = 0; k < K; k++) peak = fmaxf(peak, fabsf(row[k]));
        const float s = peak / 127.0f, inv = peak > 0.0f ? 127.0f / peak : 0.0f;
        sx[m] = s;
        for (int64_t k = 0; k < K; k++) qx[m * K + k] = (int8_t)lrintf(row[k] * inv);
    }
}

/* One int8 W row against up to 4 quantized x rows: exact int32 dots. The sign trick (as in
 * llama.cpp's q8_0 dot) makes x non-negative for the u8 x s8 multiply-add. */
static void q8_row(const int8_t *qx, int M, const int8_t *w, int64_t K, int32_t *dot) {
    const int64_t K32 = K & ~(int64_t)31;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4];
    for (int i = 0; i < M; i++) acc[i] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K32; k += 32) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
        for (int i = 0; i < M; i++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(qx + i * K + k));
            __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv));
            acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(p, ones));
        }
    }
    for (int i = 0; i < M; i++) {
        int32_t s = hsum_epi32(acc[i]);
        for (int64_t k = K32; k < K; k++) s += (int32_t)qx[i * K + k] * (int32_t)w[k];
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

/* RMSNorm over the last axis, y = x / sqrt(mean(x^2) + eps) * w: one pass per row instead of
 * the five tensor ops (and their allocations) of the unfused form, which cost more than the
 * arithmetic for a decode step's few rows. Rows split over threads only when there are many. */
void astrai_rms_norm(const float *x, const float *w, float eps, float *y, int64_t M, int64_t K,
                     int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (M * K >= (1 << 16))
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        const int64_t K8 = K & ~(int64_t)7;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t k = 0; k < K8; k += 8) {
            __m256 v = _mm256_loadu_ps(row + k);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum_ps(acc);
        for (int64_t k = K8; k < K; k++) ss += row[k] * row[k];
        const float inv = 1.0f / sqrtf(ss / (float)K + eps);
        const __m256 vinv = _mm256_set1_ps(inv);
        float *out = y + m * K;
        for (int64_t k = 0; k < K8; k += 8)
            _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + k), vinv),
                                                    _mm256_loadu_ps(w + k)));
        for (int64_t k = K8; k < K; k++) out[k] = row[k] * inv * w[k];
    }
}

/* e^x for x <= 0 (softmax after the max is subtracted), 8 lanes: x = n ln2 + r with
 * |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7 there, about
 * an fp32 ulp), times 2^n built in the exponent bits. Below -87 the result flushes to 0, where
 * e^x is under fp32's smallest normal anyway. */
static inline __m256 exp_ps(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* r = x - n ln2 in two parts (Cody-Waite), so r keeps its low bits. */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

/* s[0..n) = e^(s - peak), returning their sum. */
static inline float exp_shifted_sum(float *s, int64_t n, float peak) {
    const int64_t n8 = n & ~(int64_t)7;
    const __m256 vpeak = _mm256_set1_ps(peak);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < n8; j += 8) {
        __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), vpeak));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    float total = hsum_ps(acc);
    for (int64_t j = n8; j < n; j++) total += (s[j] = expf(s[j] - peak));
    return total;
}

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    const int64_t n8 = n & ~(int64_t)7;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n8; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum_ps(acc);
    for (int64_t i = n8; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Decode attention straight from the paged cache: one query token per row b, over its
 * lengths[b] cached keys, which live on pages[b][0..], without first copying those pages into
 * a contiguous buffer (the copy cost more than the attention at decode).
 *
 * q (B, H, D); k_cache (n_pages, page_size, Hkv, D) and v_cache (n_pages, page_size, Hkv, Dv),
 * one layer's storage; pages (B, max_pages); out (B, H, Dv). scratch holds the scores
 * (B, H, max_pages * page_size) and each split's partial result (B, splits, H, Dv + 2).
 *
 * A task is one row's keys, or with fewer rows than 2 per thread a contiguous share of them
 * (split-K, as flash-decoding does), always for all heads: each cached token's K and V are
 * read as one contiguous run of Hkv x D values, and each KV head once for its H / Hkv query
 * heads. A split keeps its max m, sum l = sum e^(s - m) and o = sum e^(s - m) v; the splits
 * then merge exactly (rescaled by e^(m - max m)). Softmax in fp32 with the max subtracted. */
void astrai_paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                                   const int64_t *pages, const int64_t *lengths, float *out,
                                   float *scratch, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                                   int64_t Dv, int64_t page_size, int64_t max_pages, int64_t splits,
                                   float scale, int threads) {
    const int64_t rep = H / Hkv, stride = max_pages * page_size, part = Dv + 2;
    float *partial = scratch + B * H * stride;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t task = 0; task < B * splits; task++) {
        const int64_t b = task / splits, sp = task % splits, L = lengths[b];
        const int64_t j0 = L * sp / splits, j1 = L * (sp + 1) / splits;
        const int64_t *row_pages = pages + b * max_pages;
        const float *qb = q + b * H * D;
        float *scores = scratch + b * H * stride, *res = partial + (b * splits + sp) * H * part;
        for (int64_t j = j0; j < j1; j++) {
            const int64_t slot = row_pages[j / page_size] * page_size + j % page_size;
            const float *kj = k_cache + slot * Hkv * D;
            for (int64_t h = 0; h < H; h++)
                scores[h * stride + j] = scale * dot_f32(qb + h * D, kj + (h / rep) * D, D);
        }
        for (int64_t h = 0; h < H; h++) {
            float *sc = scores + h * stride + j0, peak = -INFINITY, *o = res + h * part;
            for (int64_t j = 0; j < j1 - j0; j++) peak = fmaxf(peak, sc[j]);
            o[Dv] = peak;
            o[Dv + 1] = j1 > j0 ? exp_shifted_sum(sc, j1 - j0, peak) : 0.0f;
            for (int64_t d = 0; d < Dv; d++) o[d] = 0.0f;
        }
        for (int64_t j = j0; j < j1; j++) {
            const int64_t slot = row_pages[j / page_size] * page_size + j % page_size;
            const float *vj = v_cache + slot * Hkv * Dv;
            for (int64_t h = 0; h < H; h++) {
                const float pj = scores[h * stride + j];
                const __m256 p = _mm256_set1_ps(pj);
                const float *v = vj + (h / rep) * Dv;
                float *o = res + h * part;
                int64_t d = 0;
                for (; d + 8 <= Dv; d += 8)
                    _mm256_storeu_ps(o + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(v + d), _mm256_loadu_ps(o + d)));
                for (; d < Dv; d++) o[d] += pj * v[d];
            }
        }
    }
    for (int64_t bh = 0; bh < B * H; bh++) { /* merge the splits */
        const int64_t b = bh / H, h = bh % H;
        const float *res = partial + b * splits * H * part + h * part;
        float peak = -INFINITY, total = 0.0f, *o = out + bh * Dv;
        for (int64_t sp = 0; sp < splits; sp++)
            if (res[sp * H * part + Dv + 1] > 0.0f) peak = fmaxf(peak, res[sp * H * part + Dv]);
        for (int64_t d = 0; d < Dv; d++) o[d] = 0.0f;
        for (int64_t sp = 0; sp < splits; sp++) {
            const float *r = res + sp * H * part;
            if (r[Dv + 1] == 0.0f) continue; /* an empty share of the keys */
            const float w = expf(r[Dv] - peak);
            total += w * r[Dv + 1];
            for (int64_t d = 0; d < Dv; d++) o[d] += w * r[d];
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < Dv; d++) o[d] *= inv;
    }
}
