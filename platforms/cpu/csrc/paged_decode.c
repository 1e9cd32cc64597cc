/* Decode attention straight from the paged KV cache (float32), one query token per request.
 *
 * Why: gathering each request's blocks into a padded tensor and then running SDPA reads the
 * cache, writes a copy, and reads the copy again. Decode attention is bound by memory
 * traffic, so reading each block once, in place, is the whole win. The query heads that share
 * a KV head are processed together so each key and value row is loaded once for all of them.
 * Loops walk block by block (no division per token), and the head size is a compile-time
 * constant for the common sizes so the dot products vectorize fully.
 *
 * Layout: q [num_decodes, num_heads, head_size]; k_cache, v_cache [num_blocks, block_size,
 * num_kv_heads, head_size]; block_tables [num_decodes, table_stride]; seq_lens
 * [num_decodes]; out like q. Heads h of a KV head g are g * group .. (g + 1) * group - 1.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline __attribute__((always_inline)) void decode_one(const float *restrict qd, const float *restrict k_cache,
                              const float *restrict v_cache, const int32_t *restrict table,
                              int64_t seq_len, float *restrict out, int64_t group,
                              const int64_t head_size, int64_t block_size,
                              int64_t token_stride, int64_t block_stride, float scale,
                              float *restrict scores /* [group * seq_len] */,
                              float *restrict acc /* [group * head_size] */) {
  float maxes[16], sums[16];
  for (int64_t r = 0; r < group; ++r) maxes[r] = -INFINITY;
  for (int64_t start = 0, b = 0; start < seq_len; start += block_size, ++b) {
    const int64_t n = seq_len - start < block_size ? seq_len - start : block_size;
    const float *kb = k_cache + (int64_t)table[b] * block_stride;
    for (int64_t s = 0; s < n; ++s) {
      const float *k = kb + s * token_stride;
      for (int64_t r = 0; r < group; ++r) {
        const float *qr = qd + r * head_size;
        float dot = 0.f;
        for (int64_t i = 0; i < head_size; ++i) dot += qr[i] * k[i];
        dot *= scale;
        scores[r * seq_len + start + s] = dot;
        maxes[r] = dot > maxes[r] ? dot : maxes[r];
      }
    }
  }
  for (int64_t r = 0; r < group; ++r) {
    float *sr = scores + r * seq_len;
    const float m = maxes[r];
    float s = 0.f;
    for (int64_t t = 0; t < seq_len; ++t) {
      sr[t] = expf(sr[t] - m);
      s += sr[t];
    }
    sums[r] = s;
  }
  for (int64_t i = 0; i < group * head_size; ++i) acc[i] = 0.f;
  for (int64_t start = 0, b = 0; start < seq_len; start += block_size, ++b) {
    const int64_t n = seq_len - start < block_size ? seq_len - start : block_size;
    const float *vb = v_cache + (int64_t)table[b] * block_stride;
    for (int64_t s = 0; s < n; ++s) {
      const float *v = vb + s * token_stride;
      for (int64_t r = 0; r < group; ++r) {
        const float p = scores[r * seq_len + start + s];
        float *ar = acc + r * head_size;
        for (int64_t i = 0; i < head_size; ++i) ar[i] += p * v[i];
      }
    }
  }
  for (int64_t r = 0; r < group; ++r) {
    const float inv = 1.f / sums[r];
    for (int64_t i = 0; i < head_size; ++i) out[r * head_size + i] = acc[r * head_size + i] * inv;
  }
}

/* Returns 0 on success, -1 if a KV head has more than 16 query heads (caller falls back). */
int paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                     const int32_t *block_tables, int64_t table_stride,
                     const int32_t *seq_lens, float *out, int64_t num_decodes,
                     int64_t num_heads, int64_t num_kv_heads, int64_t head_size,
                     int64_t block_size, float scale, int num_threads) {
  const int64_t group = num_heads / num_kv_heads;
  if (group > 16) return -1;
  const int64_t token_stride = num_kv_heads * head_size; /* one slot of a block */
  const int64_t block_stride = block_size * token_stride;

#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t d = 0; d < num_decodes; ++d) {
    for (int64_t g = 0; g < num_kv_heads; ++g) {
      const int64_t seq_len = seq_lens[d];
      float *scores = (float *)malloc(sizeof(float) * (group * seq_len + group * head_size));
      float *acc = scores + group * seq_len;
      const int32_t *table = block_tables + d * table_stride;
      const float *qd = q + (d * num_heads + g * group) * head_size;
      float *o = out + (d * num_heads + g * group) * head_size;
      const float *kc = k_cache + g * head_size, *vc = v_cache + g * head_size;
      /* Constant head sizes let the compiler unroll and vectorize the inner loops. */
      if (head_size == 64)
        decode_one(qd, kc, vc, table, seq_len, o, group, 64, block_size, token_stride,
                   block_stride, scale, scores, acc);
      else if (head_size == 128)
        decode_one(qd, kc, vc, table, seq_len, o, group, 128, block_size, token_stride,
                   block_stride, scale, scores, acc);
      else
        decode_one(qd, kc, vc, table, seq_len, o, group, head_size, block_size, token_stride,
                   block_stride, scale, scores, acc);
      free(scores);
    }
  }
  return 0;
}
