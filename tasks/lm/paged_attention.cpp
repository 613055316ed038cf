// Decode attention straight from the paged KV cache: each decoding sequence's one query attends its
// keys and values where they lie in the block pool, with no gather into a padded copy first.
//
// torch's own ops need the keys contiguous per sequence, so the plain path gathers every block of
// every sequence (padded to the longest), converts them to fp32 and runs two bmm calls plus a
// softmax per layer: ~18 ms of a 60 ms step at 16 sequences on a 2-core CPU. Here one pass per
// (sequence, KV head) reads each key and value once, for the KV head's G query heads together
// (paged_attention.h).
//
// Built at first use by torch.utils.cpp_extension (tasks/lm/kernels.py); registered as
// torch.ops.tierflow.paged_decode_attention.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "paged_attention.h"

namespace {

using tierflow_attention::MAX_GROUPS;
using tierflow_attention::MAX_HEAD_DIM;

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
  const tierflow_attention::Sequences seqs{rows.data_ptr<int64_t>(), table.data_ptr<int64_t>(),
                                           lengths.data_ptr<int64_t>(), table.size(0), table.size(1)};
  const int n_heads = static_cast<int>(q.size(1)), hd = static_cast<int>(q.size(2));
  const auto attend = [&](auto* k, auto* v) {
    tierflow_attention::attend_sequences(q.data_ptr<float>(), k, v, k_pool.size(0), k_pool.size(1), k_pool.size(2),
                                         n_heads, hd, seqs, static_cast<float>(scale), out.data_ptr<float>());
  };
  if (k_pool.scalar_type() == at::kBFloat16)
    return attend(reinterpret_cast<const uint16_t*>(k_pool.data_ptr()), reinterpret_cast<const uint16_t*>(v_pool.data_ptr()));
  TORCH_CHECK(k_pool.scalar_type() == at::kFloat, "pools: bfloat16 or float32");
  attend(k_pool.data_ptr<float>(), v_pool.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY(tierflow, m) {
  m.def("paged_decode_attention(Tensor q, Tensor rows, Tensor k_pool, Tensor v_pool, Tensor table, "
        "Tensor lengths, Tensor(a!) out, float scale) -> ()");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, &paged_decode_attention);
}
