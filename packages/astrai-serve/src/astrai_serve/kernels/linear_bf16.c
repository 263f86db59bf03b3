/* bf16-weight linear layers for decode steps of a few sequences, on x86 CPUs with AVX512-BF16
 * (the serving kernels' overview: small_batch.h). Only called where astrai_core's capability
 * check found the instructions; the rest of the library runs on AVX2, so these functions alone
 * are compiled for AVX512 (the target attribute) and the library still loads everywhere.
 *
 * y (M, N) = x (M, K) W (N, K)^T + b with W bf16 in torch's row-major layout and x, b, y fp32:
 * weight-only bf16, as llama.cpp's BF16 files. x is rounded to bf16 once per call (to nearest
 * even, VCVTNE2PS2BF16) into the caller's scratch; VDPBF16PS multiplies pairs of bf16 exactly
 * and adds them into fp32 accumulators. At a few rows the product is a read of W, and W is half
 * the bytes of fp32, so a decode step reads half the memory.
 *
 * Batch invariance, as linear.c's: each output y[m][n] has its own 16-lane accumulator over k
 * ascending in steps of 32 (the K % 32 tail masked into the last step), one fixed horizontal
 * sum, then the bias, whatever M is and wherever the row falls in a tile. */
#include <immintrin.h>
#include <stdint.h>

#include "small_batch.h"

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define BF16_ROWS 4          /* W rows per tile; with up to 4 x rows, 16 accumulators in flight */
#define BF16_GROUP 32        /* W rows per thread task */
#define BF16_PREFETCH 16384  /* bf16 values (16 KB) ahead in W, as linear.c's f32 read */

/* x (M, K) fp32 -> xb (M, K) bf16, rounding to nearest even. */
BF16_TARGET static void round_rows(const float *x, uint16_t *xb, int64_t n) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
        _mm512_storeu_si512((void *)(xb + i), (__m512i)v);
    }
    for (; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + i));
        _mm256_mask_storeu_epi16((void *)(xb + i), m, (__m256i)v);
    }
}

/* R W rows (1..BF16_ROWS) against C x rows (1..4): R x C dot products, each its own chain.
 * Always inlined with constant R and C (the callers' switch), so the accumulators stay in
 * registers. */
BF16_TARGET static inline __attribute__((always_inline)) void bf16_tile(const uint16_t *xb, int C, const uint16_t *w, int R, int64_t K,
                                  const float *bias, int64_t n, float *y, int64_t ldy) {
    __m512 acc[4][BF16_ROWS];
    for (int i = 0; i < C; i++)
        for (int r = 0; r < R; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 mask = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
        __m512i wv[BF16_ROWS];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(w + r * K + k + BF16_PREFETCH), _MM_HINT_T0);
            wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * K + k);
        }
        for (int i = 0; i < C; i++) {
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, xb + i * K + k);
            for (int r = 0; r < R; r++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, (__m512bh)wv[r]);
        }
    }
    for (int i = 0; i < C; i++)
        for (int r = 0; r < R; r++) {
            const float s = _mm512_reduce_add_ps(acc[i][r]);
            y[i * ldy + n + r] = bias ? s + bias[n + r] : s;
        }
}

/* xb: the caller's scratch of M * K bf16 values. */
BF16_TARGET void astrai_linear_bf16(const float *x, uint16_t *xb, const uint16_t *W, const float *bias,
                                    float *y, int64_t M, int64_t N, int64_t K, int threads) {
    round_rows(x, xb, M * K);
    const int64_t groups = (N + BF16_GROUP - 1) / BF16_GROUP;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t n1 = (g + 1) * BF16_GROUP < N ? (g + 1) * BF16_GROUP : N;
        for (int64_t n = g * BF16_GROUP; n < n1; n += BF16_ROWS) {
            const int R = (int)(n1 - n < BF16_ROWS ? n1 - n : BF16_ROWS);
            for (int64_t m = 0; m < M; m += 4) {
                const uint16_t *xm = xb + m * K;
                float *ym = y + m * N;
                const int C = (int)(M - m < 4 ? M - m : 4);
                if (C == 4 && R == BF16_ROWS) {
                    bf16_tile(xm, 4, W + n * K, BF16_ROWS, K, bias, n, ym, N);
                    continue;
                }
                /* Under 4 x rows (and the group's last W rows), one W row at a time: one
                 * sequential stream, 1.3-1.4x faster than 4-row tiles at one x row (2-core AMD
                 * EPYC Turin). */
                for (int r = 0; r < R; r++) {
                    const uint16_t *wr = W + (n + r) * K;
                    switch (C) {
                    case 1: bf16_tile(xm, 1, wr, 1, K, bias, n + r, ym, N); break;
                    case 2: bf16_tile(xm, 2, wr, 1, K, bias, n + r, ym, N); break;
                    case 3: bf16_tile(xm, 3, wr, 1, K, bias, n + r, ym, N); break;
                    default: bf16_tile(xm, 4, wr, 1, K, bias, n + r, ym, N);
                    }
                }
            }
        }
    }
}
