#include "simd.h"
#include "small_batch.h"

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
 * 2.9-3.3x on two. A split keeps its max m, sum l = sum e^(s - m) and o = sum e^(s - m) v; the splits
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

/* Floats of scratch one astrai_rope_decode_attention call needs: the rotated queries, the
 * scores, each split's partial result (max, sum, Dv values). */
int64_t astrai_attention_scratch(int64_t B, int64_t H, int64_t D, int64_t Dv, int64_t page_size,
                                 int64_t max_pages, int64_t splits) {
    return B * H * (D + max_pages * page_size + splits * (Dv + 2));
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
