/* Serving kernels for decode steps of a few sequences on x86 CPUs with AVX2 and FMA: linear
 * layers (fp32, int8), RMSNorm, RoPE and attention over the paged KV cache, and a whole
 * decoder block made of them.
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

#define F32_GROUP 24      /* W rows per thread task: 8 tiles of 3 rows, or 24 single rows */
#define F32_PREFETCH 4096 /* floats (16 KB) ahead in W; 1 KB and 4 KB were slower, 32 KB equal */

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

/* Eight dot products q . k_i, k_i = k + i * ks, as one vector: eight independent FMA chains
 * (one per key), then one transposing horizontal sum for all eight. */
static inline __m256 dot8(const float *q, const float *k, int64_t ks, int64_t D) {
    const int64_t D8 = D & ~(int64_t)7;
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i * ks + d), a[i]);
    }
    /* hadd twice leaves each key's low-half sum in one 128-bit lane and its high-half sum in the
     * other; adding the lanes gives keys 0-3 from u0 and 4-7 from u1. */
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    if (D8 < D) {
        float tail[8];
        for (int i = 0; i < 8; i++) {
            tail[i] = 0.0f;
            for (int64_t d = D8; d < D; d++) tail[i] += q[d] * k[i * ks + d];
        }
        r = _mm256_add_ps(r, _mm256_loadu_ps(tail));
    }
    return r;
}

/* The largest of s[0..n), -inf for none. */
static inline float max_f32(const float *s, int64_t n) {
    const int64_t n8 = n & ~(int64_t)7;
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n8; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float peak = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
    for (int64_t j = n8; j < n; j++) peak = s[j] > peak ? s[j] : peak;
    return peak;
}

#define V_HEADS 3 /* query heads per pass over the values */

/* The keys [j0, j1) of one row, page by page: calls body(first key, count, key 0's slot). */
#define FOR_PAGE_RUNS(j0, j1, row_pages, page_size, body)                                          \
    for (int64_t j = (j0); j < (j1);) {                                                           \
        const int64_t off = j % (page_size), n = ((page_size) - off) < (j1) - j ? (page_size) - off : (j1) - j; \
        const int64_t slot0 = (row_pages)[j / (page_size)] * (page_size) + off;                   \
        body(j, n, slot0);                                                                         \
        j += n;                                                                                    \
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
 * (split-K, as flash-decoding does), always for all heads. Within a page a run of keys is
 * evenly strided, so scores go eight keys at a time per head (`dot8`) and each head's output
 * stays in registers over all its keys: one FMA chain per 8 output lanes, no loads and stores
 * of the running sum; up to 3 query heads of a KV group share each load of V. Against the
 * one-key-at-a-time loop (131 keys, 12/4 heads of 64, AMD EPYC Milan): 2.3x on one thread,
 * 3.3x on two. A split keeps its max m, sum l = sum e^(s - m) and o = sum e^(s - m) v; the splits
 * then merge exactly (rescaled by e^(m - max m)). Softmax in fp32 with the max subtracted. */
void astrai_paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                                   const int64_t *pages, const int64_t *lengths, float *out,
                                   float *scratch, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                                   int64_t Dv, int64_t page_size, int64_t max_pages, int64_t splits,
                                   float scale, int threads) {
    const int64_t rep = H / Hkv, stride = max_pages * page_size, part = Dv + 2;
    const int64_t ks = Hkv * D, vs = Hkv * Dv; /* floats between consecutive slots */
    float *partial = scratch + B * H * stride;
    const __m256 vscale = _mm256_set1_ps(scale);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t task = 0; task < B * splits; task++) {
        const int64_t b = task / splits, sp = task % splits, L = lengths[b];
        const int64_t j0 = L * sp / splits, j1 = L * (sp + 1) / splits;
        const int64_t *row_pages = pages + b * max_pages;
        const float *qb = q + b * H * D;
        float *scores = scratch + b * H * stride, *res = partial + (b * splits + sp) * H * part;
#define SCORE_RUN(j, n, slot0)                                                                     \
        for (int64_t h = 0; h < H; h++) {                                                         \
            const float *kh = k_cache + (slot0) * ks + (h / rep) * D, *qh = qb + h * D;           \
            float *sc = scores + h * stride + (j);                                                \
            int64_t i = 0;                                                                         \
            for (; i + 8 <= (n); i += 8) _mm256_storeu_ps(sc + i, _mm256_mul_ps(vscale, dot8(qh, kh + i * ks, ks, D))); \
            for (; i < (n); i++) sc[i] = scale * dot_f32(qh, kh + i * ks, D);                     \
        }
        FOR_PAGE_RUNS(j0, j1, row_pages, page_size, SCORE_RUN)
#undef SCORE_RUN
        for (int64_t h = 0; h < H; h++) {
            float *sc = scores + h * stride + j0, peak = -INFINITY, *o = res + h * part;
            peak = max_f32(sc, j1 - j0);
            o[Dv] = peak;
            o[Dv + 1] = j1 > j0 ? exp_shifted_sum(sc, j1 - j0, peak) : 0.0f;
        }
        /* o = sum_j p_j v_j, in registers: up to 3 heads of one KV group share each load of v,
         * 32 lanes at a time (12 accumulators of 16 registers). */
        int64_t nh; /* heads in this pass: at most V_HEADS, never across a group */
        for (int64_t h0 = 0; h0 < H; h0 += nh) {
            const int64_t g = h0 / rep;
            nh = rep - h0 % rep < V_HEADS ? rep - h0 % rep : V_HEADS;
            const float *vg = v_cache + g * Dv;
            int64_t d = 0;
            for (; d + 32 <= Dv; d += 32) {
                __m256 acc[V_HEADS][4];
                for (int e = 0; e < V_HEADS; e++)
                    for (int r = 0; r < 4; r++) acc[e][r] = _mm256_setzero_ps();
#define V_RUN(j, n, slot0)                                                                         \
                for (int64_t i = 0; i < (n); i++) {                                               \
                    const float *v = vg + ((slot0) + i) * vs + d;                                  \
                    const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);            \
                    const __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);       \
                    for (int e = 0; e < nh; e++) {                                                 \
                        const __m256 p = _mm256_set1_ps(scores[(h0 + e) * stride + (j) + i]);     \
                        acc[e][0] = _mm256_fmadd_ps(p, v0, acc[e][0]);                             \
                        acc[e][1] = _mm256_fmadd_ps(p, v1, acc[e][1]);                             \
                        acc[e][2] = _mm256_fmadd_ps(p, v2, acc[e][2]);                             \
                        acc[e][3] = _mm256_fmadd_ps(p, v3, acc[e][3]);                             \
                    }                                                                              \
                }
                FOR_PAGE_RUNS(j0, j1, row_pages, page_size, V_RUN)
#undef V_RUN
                for (int e = 0; e < nh; e++)
                    for (int r = 0; r < 4; r++) _mm256_storeu_ps(res + (h0 + e) * part + d + 8 * r, acc[e][r]);
            }
            for (; d < Dv; d++) /* a head dim that is not a multiple of 32 */
                for (int64_t e = 0; e < nh; e++) {
                    const float *sc = scores + (h0 + e) * stride;
                    float acc = 0.0f;
#define V_TAIL(j, n, slot0) for (int64_t i = 0; i < (n); i++) acc += sc[(j) + i] * vg[((slot0) + i) * vs + d];
                    FOR_PAGE_RUNS(j0, j1, row_pages, page_size, V_TAIL)
#undef V_TAIL
                    res[(h0 + e) * part + d] = acc;
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

/* RoPE in the half-rotation layout (Llama, Qwen) on one head: out = x cos + rotate_half(x) sin,
 * rotate_half(x) = (-x[D/2:], x[:D/2]); cos/sin hold D values, their halves equal. */
static inline void rope_head(const float *x, const float *cos, const float *sin, float *out, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t d = 0; d < half; d++) {
        const float lo = x[d], hi = x[d + half];
        out[d] = lo * cos[d] - hi * sin[d];
        out[d + half] = hi * cos[d + half] + lo * sin[d + half];
    }
}

/* A whole GQA decode step of one layer after its projections, in one call: RoPE on each row's
 * query and key heads, the key and value written at the row's cache slot, then the paged
 * attention above. The unfused form is about ten tensor ops a layer (two RoPEs, a cache write,
 * layout copies), which cost more than their arithmetic on a decode step's few rows.
 *
 * q (B, H, D), k (B, Hkv, D) and v (B, Hkv, Dv) are rows `q_stride` / `kv_stride` floats apart,
 * heads contiguous within a row (they may be column slices of one fused projection); cos/sin
 * (B, D); slots (B,) flat cache slots (page * page_size + offset). scratch holds the rotated
 * queries (B, H, D), then what the attention needs. */
void astrai_rope_decode_attention(const float *q, const float *k, const float *v, int64_t q_stride,
                                  int64_t k_stride, int64_t v_stride, const float *cos, const float *sin,
                                  float *k_cache, float *v_cache, const int64_t *slots,
                                  const int64_t *pages, const int64_t *lengths, float *out,
                                  float *scratch, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                                  int64_t Dv, int64_t page_size, int64_t max_pages, int64_t splits,
                                  float scale, int threads) {
    float *qr = scratch;
    for (int64_t b = 0; b < B; b++) {
        const float *cb = cos + b * D, *sb = sin + b * D;
        for (int64_t h = 0; h < H; h++) rope_head(q + b * q_stride + h * D, cb, sb, qr + (b * H + h) * D, D);
        float *kc = k_cache + slots[b] * Hkv * D, *vc = v_cache + slots[b] * Hkv * Dv;
        for (int64_t h = 0; h < Hkv; h++) rope_head(k + b * k_stride + h * D, cb, sb, kc + h * D, D);
        for (int64_t i = 0; i < Hkv * Dv; i++) vc[i] = v[b * v_stride + i];
    }
    astrai_paged_decode_attention(qr, k_cache, v_cache, pages, lengths, out, scratch + B * H * D, B, H,
                                  Hkv, D, Dv, page_size, max_pages, splits, scale, threads);
}

/* ---- A whole decoder block of a decode step ------------------------------------------------
 * Pre-norm GQA + SwiGLU, as astrai_core's DecoderBlock with fused projections:
 *   h = x + o(attn(rope(qk_norm(qkv(norm1(x))))) [* sigmoid(g)]),  out = h + down(silu(gate) * up)
 * with gate/up = gate_up(norm2(h)). One call per layer instead of about forty tensor ops and
 * module calls: on a decode step's few rows their Python and dispatch cost more than the
 * arithmetic between the weight reads. The linear layers, norms and attention are the kernels
 * above, so the results equal the unfused serving path's to float rounding. */

typedef struct {
    const void *weight;  /* fp32 (n, k), or int8 (n, k) with per-row scales */
    const float *scales; /* NULL for fp32 */
    const float *bias;   /* or NULL */
    int64_t n, k;
} astrai_linear_ref;

typedef struct {
    astrai_linear_ref qkv, o, gate_up, down; /* qkv: q, k, v (and the gate) in one product */
    const float *input_norm, *post_norm, *q_norm, *k_norm; /* q_norm/k_norm NULL without qk-norm */
    float norm_eps, qk_norm_eps;
    int64_t layer, heads, kv_heads, head_dim, gated;
} astrai_decode_layer;

typedef struct {
    const float *cos, *sin;    /* (rows, head_dim) */
    float *k_cache, *v_cache;  /* every layer's: (layers, n_pages, page_size, kv_heads, head_dim) */
    int64_t k_layer_stride, v_layer_stride; /* floats between layers */
    const int64_t *slots, *pages, *lengths;
    int64_t rows, page_size, max_pages, splits;
    float scale;
    float *scratch; /* astrai_decode_layer_scratch() floats */
    int threads;
} astrai_decode_step;

static void linear_ref(const astrai_linear_ref *l, const float *x, float *y, int64_t M, int8_t *qx,
                       float *sx, int threads) {
    if (l->scales)
        astrai_linear_q8(x, qx, sx, (const int8_t *)l->weight, l->scales, l->bias, y, M, l->n, l->k, threads);
    else
        astrai_linear_f32(x, (const float *)l->weight, l->bias, y, M, l->n, l->k, threads);
}

/* e^-|x| (in (0, 1], where exp_ps is exact to an ulp), so sigmoid(x) = 1 / (1 + e) for x >= 0
 * and e / (1 + e) below, never overflowing. */
static inline __m256 sigmoid_ps(__m256 x) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x)));
    const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    return _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}

static inline float sigmoid_f(float x) {
    const float e = expf(-fabsf(x));
    return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

/* y[i] = a[i] * sigmoid(g[i]) * (u ? u[i] : 1): the attention gate, and SwiGLU's
 * silu(gate) * up with a == g. */
static void mul_sigmoid(const float *a, const float *g, const float *u, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(a + i), sigmoid_ps(_mm256_loadu_ps(g + i)));
        _mm256_storeu_ps(y + i, u ? _mm256_mul_ps(v, _mm256_loadu_ps(u + i)) : v);
    }
    for (; i < n; i++) y[i] = a[i] * sigmoid_f(g[i]) * (u ? u[i] : 1.0f);
}

/* Per row: normed (dim), qkv, attn (heads x head_dim), gate_up (2 ffn), act (ffn), the int8
 * activations' scale (1) and values (the widest linear input, as floats' worth of bytes). */
static int64_t layer_row_floats(const astrai_decode_layer *L) {
    const int64_t dim = L->o.n, ffn = L->down.k, hd = L->heads * L->head_dim;
    int64_t widest = dim > ffn ? dim : ffn;
    widest = widest > hd ? widest : hd;
    return dim + L->qkv.n + hd + 3 * ffn + 1 + (widest + 3) / 4;
}

/* Floats of scratch one call needs: the layer's activations, then the attention's. */
int64_t astrai_decode_layer_scratch(const astrai_decode_layer *L, int64_t rows, int64_t page_size,
                                    int64_t max_pages, int64_t splits) {
    return rows * layer_row_floats(L)
         + rows * L->heads * (L->head_dim + max_pages * page_size + splits * (L->head_dim + 2));
}

void astrai_decode_layer_forward(const astrai_decode_layer *L, const astrai_decode_step *S,
                                 const float *x, float *out) {
    const int64_t B = S->rows, dim = L->o.n, ffn = L->down.k, H = L->heads, Hkv = L->kv_heads;
    const int64_t D = L->head_dim, nqkv = L->qkv.n;
    float *normed = S->scratch, *qkv = normed + B * dim, *attn = qkv + B * nqkv;
    float *gate_up = attn + B * H * D, *act = gate_up + 2 * B * ffn, *sx = act + B * ffn;
    int8_t *qx = (int8_t *)(sx + B);
    float *att_scratch = S->scratch + B * layer_row_floats(L);
    const int T = S->threads;

    astrai_rms_norm(x, L->input_norm, L->norm_eps, normed, B, dim, T);
    linear_ref(&L->qkv, normed, qkv, B, qx, sx, T);
    if (L->q_norm) /* Qwen3: each head of q and of k normed over its head_dim, before RoPE */
        for (int64_t b = 0; b < B; b++) {
            float *qb = qkv + b * nqkv;
            astrai_rms_norm(qb, L->q_norm, L->qk_norm_eps, qb, H, D, 1);
            astrai_rms_norm(qb + H * D, L->k_norm, L->qk_norm_eps, qb + H * D, Hkv, D, 1);
        }
    astrai_rope_decode_attention(qkv, qkv + H * D, qkv + (H + Hkv) * D, nqkv, nqkv, nqkv, S->cos, S->sin,
                                 S->k_cache + L->layer * S->k_layer_stride, S->v_cache + L->layer * S->v_layer_stride,
                                 S->slots, S->pages, S->lengths, attn, att_scratch, B, H, Hkv, D, D,
                                 S->page_size, S->max_pages, S->splits, S->scale, T);
    if (L->gated) /* the output gate: attn * sigmoid(g), g after q, k and v */
        for (int64_t b = 0; b < B; b++)
            mul_sigmoid(attn + b * H * D, qkv + b * nqkv + (H + 2 * Hkv) * D, NULL, attn + b * H * D, H * D);
    linear_ref(&L->o, attn, out, B, qx, sx, T);
    for (int64_t i = 0; i < B * dim; i++) out[i] += x[i]; /* h, the residual stream */

    astrai_rms_norm(out, L->post_norm, L->norm_eps, normed, B, dim, T);
    linear_ref(&L->gate_up, normed, gate_up, B, qx, sx, T);
    for (int64_t b = 0; b < B; b++) {
        const float *g = gate_up + b * 2 * ffn;
        mul_sigmoid(g, g, g + ffn, act + b * ffn, ffn);
    }
    linear_ref(&L->down, act, normed, B, qx, sx, T);
    for (int64_t i = 0; i < B * dim; i++) out[i] += normed[i];
}
