// Decode attention over the paged KV cache, shared by the attention op (paged_attention.cpp) and
// the whole-stack decode step (decode_step.cpp): each decoding sequence's one query attends its keys
// and values where they lie in the block pool, one pass per (sequence, KV head) for the KV head's G
// query heads together, parallel over (sequence, KV head) on torch's own OpenMP threads.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace tierflow_attention {

inline float to_float(float x) { return x; }
inline float to_float(uint16_t bf16) {  // bfloat16 is the upper half of a float32
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

constexpr int MAX_HEAD_DIM = 256;
constexpr int MAX_GROUPS = 16;

// One (sequence, KV head): softmax(q k^T * scale) v for the G query heads that share the KV head.
// HD and G are compile-time for the common shapes (the loops then vectorize fully), 0 for any other.
template <typename KV, int HD, int G>
void attend(const float* __restrict q, const KV* __restrict k_pool, const KV* __restrict v_pool,
            const int64_t* __restrict blocks, int64_t length, int64_t kv_head, int64_t n_blocks,
            int64_t block_size, int hd_runtime, int g_runtime, float scale, float* __restrict scores,
            float* __restrict out) {
  const int hd = HD > 0 ? HD : hd_runtime, groups = G > 0 ? G : g_runtime;
  const int64_t block_elems = block_size * hd, n_used = (length + block_size - 1) / block_size;
  // block b of this sequence and KV head; blocks lie anywhere in the pool, so the next one is
  // prefetched while this one is read (the hardware prefetcher only follows a block's own lines)
  const auto block_at = [&](const KV* pool, int64_t b) { return pool + (kv_head * n_blocks + blocks[b]) * block_elems; };
  const auto prefetch = [&](const KV* pool, int64_t b) {
    if (b >= n_used) return;
    const char* start = reinterpret_cast<const char*>(block_at(pool, b));
    for (int64_t byte = 0; byte < block_elems * static_cast<int64_t>(sizeof(KV)); byte += 64) __builtin_prefetch(start + byte);
  };
  float qs[MAX_GROUPS][MAX_HEAD_DIM], top[MAX_GROUPS], inv[MAX_GROUPS];
  for (int g = 0; g < groups; ++g) {
    for (int d = 0; d < hd; ++d) qs[g][d] = q[g * hd + d] * scale;
    top[g] = -INFINITY;
  }
  prefetch(k_pool, 0);
  for (int64_t b = 0; b < n_used; ++b) {
    prefetch(k_pool, b + 1);
    const KV* __restrict keys = block_at(k_pool, b);
    const int64_t first = b * block_size, count = std::min(block_size, length - first);
    for (int64_t i = 0; i < count; ++i) {
      float k[MAX_HEAD_DIM];
      for (int d = 0; d < hd; ++d) k[d] = to_float(keys[i * hd + d]);
      for (int g = 0; g < groups; ++g) {
        float dot = 0.f;
        for (int d = 0; d < hd; ++d) dot += qs[g][d] * k[d];
        scores[g * length + first + i] = dot;
        top[g] = dot > top[g] ? dot : top[g];
      }
    }
  }
  prefetch(v_pool, 0);
  for (int g = 0; g < groups; ++g) {
    float* s = scores + g * length;
    float total = 0.f;
    for (int64_t j = 0; j < length; ++j) {
      s[j] = std::exp(s[j] - top[g]);
      total += s[j];
    }
    inv[g] = 1.f / total;
  }
  float acc[MAX_GROUPS][MAX_HEAD_DIM];
  for (int g = 0; g < groups; ++g)
    for (int d = 0; d < hd; ++d) acc[g][d] = 0.f;
  for (int64_t b = 0; b < n_used; ++b) {
    prefetch(v_pool, b + 1);
    const KV* __restrict values = block_at(v_pool, b);
    const int64_t first = b * block_size, count = std::min(block_size, length - first);
    for (int64_t i = 0; i < count; ++i) {
      float v[MAX_HEAD_DIM];
      for (int d = 0; d < hd; ++d) v[d] = to_float(values[i * hd + d]);
      for (int g = 0; g < groups; ++g) {
        const float p = scores[g * length + first + i];
        for (int d = 0; d < hd; ++d) acc[g][d] += p * v[d];
      }
    }
  }
  for (int g = 0; g < groups; ++g)
    for (int d = 0; d < hd; ++d) out[g * hd + d] = acc[g][d] * inv[g];
}

// The pool [KV heads, n_blocks, block_size, head_dim] of one layer and the sequences that attend it.
struct Sequences {
  const int64_t* rows;     // [B] each sequence's query row
  const int64_t* table;    // [B, width] its blocks in order
  const int64_t* lengths;  // [B] keys it attends: its position + 1
  int64_t count, width;
};

template <typename KV, int HD, int G>
void attend_each(const float* q, const KV* k_pool, const KV* v_pool, int64_t n_kv_heads, int64_t n_blocks,
                 int64_t block_size, int n_heads, int hd, const Sequences& seqs, float scale, float* out) {
  const int groups = n_heads / static_cast<int>(n_kv_heads);
  at::parallel_for(0, seqs.count * n_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_kv_heads, kv_head = item % n_kv_heads;
      const int64_t offset = (seqs.rows[b] * n_heads + kv_head * groups) * hd;
      scores.resize(groups * seqs.lengths[b]);
      attend<KV, HD, G>(q + offset, k_pool, v_pool, seqs.table + b * seqs.width, seqs.lengths[b], kv_head, n_blocks,
                        block_size, hd, groups, scale, scores.data(), out + offset);
    }
  });
}

// q [rows, n_heads, hd] float32; out [rows, n_heads * hd] float32, written at the sequences' rows only.
template <typename KV>
void attend_sequences(const float* q, const KV* k_pool, const KV* v_pool, int64_t n_kv_heads, int64_t n_blocks,
                      int64_t block_size, int n_heads, int hd, const Sequences& seqs, float scale, float* out) {
  const int groups = n_heads / static_cast<int>(n_kv_heads);
  const auto run = [&](auto kernel) { kernel(q, k_pool, v_pool, n_kv_heads, n_blocks, block_size, n_heads, hd, seqs, scale, out); };
  if (hd == 64 && groups == 3) return run(attend_each<KV, 64, 3>);
  if (hd == 64 && groups == 4) return run(attend_each<KV, 64, 4>);
  if (hd == 64 && groups == 8) return run(attend_each<KV, 64, 8>);
  if (hd == 128 && groups == 4) return run(attend_each<KV, 128, 4>);
  if (hd == 128 && groups == 8) return run(attend_each<KV, 128, 8>);
  run(attend_each<KV, 0, 0>);
}

}  // namespace tierflow_attention
