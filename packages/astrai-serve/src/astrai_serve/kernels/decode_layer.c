/* A whole decoder block of a decode step: pre-norm GQA + SwiGLU, as astrai_core's DecoderBlock
 * with fused projections,
 *   h = x + o(attn(rope(qk_norm(qkv(norm1(x))))) [* sigmoid(g)]),  out = h + down(silu(gate) * up)
 * with gate/up = gate_up(norm2(h)). One call per layer instead of about forty tensor ops and
 * module calls: on a decode step's few rows their Python and dispatch cost more than the
 * arithmetic between the weight reads. The linear layers, norms and attention are the other
 * files' kernels, so the results equal the unfused serving path's to float rounding. */

#include "simd.h"
#include "small_batch.h"

/* qx: the rounded activations' scratch (int8 or bf16), sx: the int8 rows' scales. */
static void linear_ref(const astrai_linear_ref *l, const float *x, float *y, int64_t M, void *qx,
                       float *sx, int threads) {
    if (l->format == ASTRAI_Q8)
        astrai_linear_q8(x, (int8_t *)qx, sx, (const int8_t *)l->weight, l->scales, l->bias, y, M, l->n, l->k, threads);
    else if (l->format == ASTRAI_BF16)
        astrai_linear_bf16(x, (uint16_t *)qx, (const uint16_t *)l->weight, l->bias, y, M, l->n, l->k, threads);
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
 * activations' scale (1) and the rounded activations (the widest linear input at 2 bytes, room
 * for int8 or bf16, as floats' worth of bytes). */
static int64_t layer_row_floats(const astrai_decode_layer *L) {
    const int64_t dim = L->o.n, ffn = L->down.k, hd = L->heads * L->head_dim;
    int64_t widest = dim > ffn ? dim : ffn;
    widest = widest > hd ? widest : hd;
    return dim + L->qkv.n + hd + 3 * ffn + 1 + (2 * widest + 3) / 4;
}

/* Floats of scratch one call needs: the layer's activations, then the attention's. */
int64_t astrai_decode_layer_scratch(const astrai_decode_layer *L, int64_t rows, int64_t page_size,
                                    int64_t max_pages, int64_t splits) {
    return rows * layer_row_floats(L)
         + astrai_attention_scratch(rows, L->heads, L->head_dim, L->head_dim, page_size, max_pages, splits);
}

void astrai_decode_layer_forward(const astrai_decode_layer *L, const astrai_decode_step *S,
                                 const float *x, float *out) {
    const int64_t B = S->rows, dim = L->o.n, ffn = L->down.k, H = L->heads, Hkv = L->kv_heads;
    const int64_t D = L->head_dim, nqkv = L->qkv.n;
    float *normed = S->scratch, *qkv = normed + B * dim, *attn = qkv + B * nqkv;
    float *gate_up = attn + B * H * D, *act = gate_up + 2 * B * ffn, *sx = act + B * ffn;
    void *qx = sx + B;
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
