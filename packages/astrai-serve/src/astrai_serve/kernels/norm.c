#include "simd.h"
#include "small_batch.h"

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
