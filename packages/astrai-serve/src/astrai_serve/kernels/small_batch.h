/* The small-batch serving kernels' entry points (ctypes binds them by name, native.py) and the
 * structs `decode_layer.c` takes. Each file is one concept: linear.c (fp32 and int8 products),
 * linear_bf16.c (bf16 weights, AVX512-BF16 only), norm.c (RMSNorm), attention.c (RoPE, the cache write and decode attention over the paged KV
 * cache), decode_layer.c (a whole decoder block of them). */
#ifndef ASTRAI_SMALL_BATCH_H
#define ASTRAI_SMALL_BATCH_H

#include <stdint.h>

void astrai_linear_f32(const float *x, const float *W, const float *bias, float *y, int64_t M,
                       int64_t N, int64_t K, int threads);
void astrai_linear_q8(const float *x, int8_t *qx, float *sx, const int8_t *W, const float *sw,
                      const float *bias, float *y, int64_t M, int64_t N, int64_t K, int threads);
void astrai_linear_bf16(const float *x, uint16_t *xb, const uint16_t *W, const float *bias, float *y,
                        int64_t M, int64_t N, int64_t K, int threads);
void astrai_rms_norm(const float *x, const float *w, float eps, float *y, int64_t M, int64_t K,
                     int threads);
void astrai_paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                                   const int64_t *pages, const int64_t *lengths, float *out,
                                   float *scratch, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                                   int64_t Dv, int64_t page_size, int64_t max_pages, int64_t splits,
                                   float scale, int threads);
void astrai_rope_decode_attention(const float *q, const float *k, const float *v, int64_t q_stride,
                                  int64_t k_stride, int64_t v_stride, const float *cos, const float *sin,
                                  float *k_cache, float *v_cache, const int64_t *slots,
                                  const int64_t *pages, const int64_t *lengths, float *out,
                                  float *scratch, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                                  int64_t Dv, int64_t page_size, int64_t max_pages, int64_t splits,
                                  float scale, int threads);

enum { ASTRAI_F32 = 0, ASTRAI_Q8 = 1, ASTRAI_BF16 = 2 }; /* astrai_linear_ref.format */

typedef struct {
    const void *weight;  /* (n, k): fp32, int8 with per-row scales, or bf16 */
    const float *scales; /* the int8 rows' scales; NULL otherwise */
    const float *bias;   /* or NULL */
    int64_t n, k;
    int64_t format;      /* ASTRAI_F32, ASTRAI_Q8 or ASTRAI_BF16 (only where the CPU has AVX512-BF16) */
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

int64_t astrai_attention_scratch(int64_t B, int64_t H, int64_t D, int64_t Dv, int64_t page_size,
                                 int64_t max_pages, int64_t splits);
int64_t astrai_decode_layer_scratch(const astrai_decode_layer *L, int64_t rows, int64_t page_size,
                                    int64_t max_pages, int64_t splits);
void astrai_decode_layer_forward(const astrai_decode_layer *L, const astrai_decode_step *S,
                                 const float *x, float *out);

#endif
