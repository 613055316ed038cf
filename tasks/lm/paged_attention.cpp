// Decode attention straight from the paged KV cache: each decoding sequence's one query attends its
// keys and values where they lie in the block pool, with no gather into a padded copy first.
//
// torch's own ops need the keys contiguous per sequence, so the plain path gathers every block of
// every sequence (padded to the longest), converts them to fp32 and runs two bmm calls plus a
// softmax per layer: ~18 ms of a 60 ms step at 16 sequences on a 2-core CPU. Here one pass per
// (sequence, KV head) reads each key and value once, for the KV head's G query heads together.
//
// Built at first use by torch.utils.cpp_extension (tasks/lm/attention_kernel.py); registered as
// torch.ops.tierflow.paged_decode_attention; parallel over (sequence, KV head) on torch's own
// OpenMP threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

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

template <typename KV, int HD, int G>
void attend_all(const at::Tensor& q, const at::Tensor& rows, const at::Tensor& k_pool, const at::Tensor& v_pool,
                const at::Tensor& table, const at::Tensor& lengths, at::Tensor& out, double scale) {
  const int64_t n_heads = q.size(1), n_kv_heads = k_pool.size(0), n_blocks = k_pool.size(1);
  const int64_t block_size = k_pool.size(2), width = table.size(1);
  const int hd = static_cast<int>(q.size(2)), groups = static_cast<int>(n_heads / n_kv_heads);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const KV* kp = reinterpret_cast<const KV*>(k_pool.data_ptr());
  const KV* vp = reinterpret_cast<const KV*>(v_pool.data_ptr());
  const int64_t *rp = rows.data_ptr<int64_t>(), *tp = table.data_ptr<int64_t>(), *lp = lengths.data_ptr<int64_t>();
  at::parallel_for(0, table.size(0) * n_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_kv_heads, kv_head = item % n_kv_heads;
      const int64_t offset = (rp[b] * n_heads + kv_head * groups) * hd;
      scores.resize(groups * lp[b]);
      attend<KV, HD, G>(qp + offset, kp, vp, tp + b * width, lp[b], kv_head, n_blocks, block_size, hd, groups,
                        static_cast<float>(scale), scores.data(), op + offset);
    }
  });
}

template <typename KV>
void dispatch_shape(const at::Tensor& q, const at::Tensor& rows, const at::Tensor& k_pool, const at::Tensor& v_pool,
                    const at::Tensor& table, const at::Tensor& lengths, at::Tensor& out, double scale) {
  const int64_t hd = q.size(2), groups = q.size(1) / k_pool.size(0);
  if (hd == 64 && groups == 3) return attend_all<KV, 64, 3>(q, rows, k_pool, v_pool, table, lengths, out, scale);
  if (hd == 64 && groups == 4) return attend_all<KV, 64, 4>(q, rows, k_pool, v_pool, table, lengths, out, scale);
  if (hd == 64 && groups == 8) return attend_all<KV, 64, 8>(q, rows, k_pool, v_pool, table, lengths, out, scale);
  if (hd == 128 && groups == 4) return attend_all<KV, 128, 4>(q, rows, k_pool, v_pool, table, lengths, out, scale);
  if (hd == 128 && groups == 8) return attend_all<KV, 128, 8>(q, rows, k_pool, v_pool, table, lengths, out, scale);
  attend_all<KV, 0, 0>(q, rows, k_pool, v_pool, table, lengths, out, scale);
}

// q [rows, heads, head_dim] float32; rows [B] the query row of each sequence; pools [KV heads, blocks,
// block_size, head_dim] bfloat16 or float32; table [B, width] each sequence's blocks in order;
// lengths [B] keys each sequence attends (its position + 1); out [rows, heads * head_dim] float32,
// written at each sequence's row only.
void paged_decode_attention(const at::Tensor& q, const at::Tensor& rows, const at::Tensor& k_pool,
                            const at::Tensor& v_pool, const at::Tensor& table, const at::Tensor& lengths,
                            at::Tensor out, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3, "q: contiguous float32 [rows, heads, head_dim]");
  TORCH_CHECK(q.size(2) <= MAX_HEAD_DIM && q.size(1) % k_pool.size(0) == 0 && q.size(1) / k_pool.size(0) <= MAX_GROUPS,
              "head_dim up to ", MAX_HEAD_DIM, " and up to ", MAX_GROUPS, " query heads per KV head");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(1) == q.size(1) * q.size(2),
              "out: contiguous float32 [rows, heads * head_dim]");
  TORCH_CHECK(k_pool.dim() == 4 && k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.sizes() == v_pool.sizes()
              && k_pool.scalar_type() == v_pool.scalar_type() && k_pool.size(3) == q.size(2),
              "pools: contiguous [KV heads, blocks, block_size, head_dim], keys and values alike");
  for (const at::Tensor* index : {&rows, &table, &lengths})
    TORCH_CHECK(index->scalar_type() == at::kLong && index->is_contiguous(), "rows, table, lengths: contiguous int64");
  if (k_pool.scalar_type() == at::kBFloat16) return dispatch_shape<uint16_t>(q, rows, k_pool, v_pool, table, lengths, out, scale);
  TORCH_CHECK(k_pool.scalar_type() == at::kFloat, "pools: bfloat16 or float32");
  dispatch_shape<float>(q, rows, k_pool, v_pool, table, lengths, out, scale);
}

}  // namespace

TORCH_LIBRARY(tierflow, m) {
  m.def("paged_decode_attention(Tensor q, Tensor rows, Tensor k_pool, Tensor v_pool, Tensor table, "
        "Tensor lengths, Tensor(a!) out, float scale) -> ()");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, &paged_decode_attention);
}
