// A decode step for a few sequences in two calls: every layer of the stack in one, the output
// head in the other.
//
// One decoding row runs ~27 small ops per layer through torch (norms, four linear layers, RoPE,
// the cache writes, attention, residual adds): ~800 dispatches a step, each a few microseconds of
// Python and ATen for a few microseconds of arithmetic, so a one-row step spent most of its time
// dispatching. Here a layer is a few loops in C++ around the same Q4_1 tiles (q4_tiles.h) and the
// same paged attention (paged_attention.h) that the per-op path calls, with the residual stream,
// norms and RoPE in fp32 and keys and values stored in bf16 as the torch path stores them.
//
// The head is the file's own Q8_0 codes when the checkpoint has them (int8 per input, one scale per
// 32): 1 byte a weight instead of bf16's 2, and each logit is the exact dot of the fp32 hidden
// state with the dequantized row, so there is nothing to re-score afterwards.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "paged_attention.h"
#include "q4_tiles.h"

#ifdef TIERFLOW_HAS_Q4

namespace {

using tierflow_q4::GROUP;
using tierflow_q4::TILE;

// A stacked Q4_1 weight: codes [L, N / 16, K / 32, 256], scale and offset [L, N / 16, K / 32, 16].
struct Q4Stack {
  const uint8_t* codes;
  const float *scale, *offset;
  int64_t N, K;

  Q4Stack(const at::Tensor& c, const at::Tensor& s, const at::Tensor& o, int64_t layers, const char* name)
      : codes(c.data_ptr<uint8_t>()), scale(s.data_ptr<float>()), offset(o.data_ptr<float>()),
        N(c.size(1) * TILE), K(c.size(2) * GROUP) {
    TORCH_CHECK(c.dim() == 4 && c.scalar_type() == at::kByte && c.is_contiguous() && c.size(0) == layers
                && c.size(3) == TILE * GROUP / 2, name, " codes: contiguous uint8 [layers, out / 16, in / 32, 256]");
    for (const at::Tensor* t : {&s, &o})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 4 && t->size(0) == layers
                  && t->size(1) == c.size(1) && t->size(2) == c.size(2) && t->size(3) == TILE,
                  name, " scale, offset: contiguous float32 [layers, out / 16, in / 32, 16]");
  }

  // out [M, N] = x [M, K] @ layer l's weight.T, x rounded to bf16 first (xb, xsum: scratch)
  void apply(int64_t l, const float* x, int64_t M, uint16_t* xb, float* xsum, float* out) const {
    const int64_t per_layer = (N / TILE) * (K / GROUP);
    tierflow_q4::round_rows(x, M, K, xb, xsum);
    tierflow_q4::matmul(xb, xsum, M, K, codes + l * per_layer * TILE * GROUP / 2, scale + l * per_layer * TILE,
                        offset + l * per_layer * TILE, N, out);
  }
};

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16) does
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// out = x * rsqrt(mean(x^2) + eps) * weight, row by row
void rms_norm(const float* x, const float* weight, int64_t M, int64_t D, float eps, float* out) {
  for (int64_t r = 0; r < M; ++r) {
    const float* row = x + r * D;
    float squares = 0.f;
    for (int64_t d = 0; d < D; ++d) squares += row[d] * row[d];
    const float inv = 1.f / std::sqrt(squares / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d) out[r * D + d] = row[d] * inv * weight[d];
  }
}

// x [B, dim] float32, the residual stream after the embeddings, becomes the stream after the last
// layer. norms [L, 2, dim] (attention norm, feed-forward norm); the four stacked Q4_1 weights
// (q|k|v fused, o, gate|up fused, down); rope_cos, rope_sin [context, head_dim] (rotate-half
// form); positions, slots (flat cache slot of each row's key and value), lengths [B] and table
// [B, width] (each row's cache blocks); caches [L, KV heads, blocks, block_size, head_dim] bf16.
void decode_layers(at::Tensor x, const at::Tensor& norms, const at::Tensor& qkv_codes, const at::Tensor& qkv_scale,
                   const at::Tensor& qkv_offset, const at::Tensor& o_codes, const at::Tensor& o_scale,
                   const at::Tensor& o_offset, const at::Tensor& gate_up_codes, const at::Tensor& gate_up_scale,
                   const at::Tensor& gate_up_offset, const at::Tensor& down_codes, const at::Tensor& down_scale,
                   const at::Tensor& down_offset, const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                   const at::Tensor& positions, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& slots, const at::Tensor& table, const at::Tensor& lengths, int64_t n_heads,
                   double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [rows, dim]");
  const int64_t B = x.size(0), D = x.size(1), L = norms.size(0);
  TORCH_CHECK(norms.dim() == 3 && norms.size(1) == 2 && norms.size(2) == D && norms.scalar_type() == at::kFloat
              && norms.is_contiguous(), "norms: contiguous float32 [layers, 2, dim]");
  const Q4Stack qkv(qkv_codes, qkv_scale, qkv_offset, L, "qkv"), o(o_codes, o_scale, o_offset, L, "o");
  const Q4Stack gate_up(gate_up_codes, gate_up_scale, gate_up_offset, L, "gate_up");
  const Q4Stack down(down_codes, down_scale, down_offset, L, "down");
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(0) == L && k_cache.sizes() == v_cache.sizes()
              && k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16
              && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches: contiguous bfloat16 [layers, KV heads, blocks, block_size, head_dim], keys and values alike");
  const int64_t kvh = k_cache.size(1), n_blocks = k_cache.size(2), block_size = k_cache.size(3), hd = k_cache.size(4);
  const int64_t h = n_heads, ffn = down.K;
  TORCH_CHECK(h % kvh == 0 && h / kvh <= tierflow_attention::MAX_GROUPS && hd <= tierflow_attention::MAX_HEAD_DIM
              && hd % 2 == 0, "heads: a multiple of the KV heads, up to ", tierflow_attention::MAX_GROUPS,
              " per KV head, head_dim even and up to ", tierflow_attention::MAX_HEAD_DIM);
  TORCH_CHECK(qkv.K == D && qkv.N == (h + 2 * kvh) * hd && o.K == h * hd && o.N == D && gate_up.K == D
              && gate_up.N == 2 * ffn && down.N == D, "weights do not fit dim ", D, ", ", h, " heads, ", kvh,
              " KV heads of ", hd);
  TORCH_CHECK(rope_cos.scalar_type() == at::kFloat && rope_cos.is_contiguous() && rope_sin.is_contiguous()
              && rope_cos.sizes() == rope_sin.sizes() && rope_cos.size(1) == hd, "rope: contiguous float32 [context, head_dim]");
  for (const at::Tensor* index : {&positions, &slots, &table, &lengths})
    TORCH_CHECK(index->scalar_type() == at::kLong && index->is_contiguous(), "positions, slots, table, lengths: contiguous int64");
  TORCH_CHECK(positions.numel() == B && slots.numel() == B && lengths.numel() == B && table.size(0) == B,
              "one position, slot, length and block-table row per row of x");

  float* xp = x.data_ptr<float>();
  const float* np_ = norms.data_ptr<float>();
  const float *cos_table = rope_cos.data_ptr<float>(), *sin_table = rope_sin.data_ptr<float>();
  const int64_t *pos = positions.data_ptr<int64_t>(), *slot = slots.data_ptr<int64_t>();
  auto* kp = reinterpret_cast<uint16_t*>(k_cache.data_ptr());
  auto* vp = reinterpret_cast<uint16_t*>(v_cache.data_ptr());
  const int64_t pool = kvh * n_blocks * block_size * hd;  // one layer's keys (or values)
  std::vector<int64_t> rows(B);
  for (int64_t b = 0; b < B; ++b) rows[b] = b;
  const tierflow_attention::Sequences seqs{rows.data(), table.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), B,
                                           table.size(1)};
  const int64_t widest = std::max({D, h * hd, 2 * ffn});
  std::vector<float> normed(B * D), qkv_out(B * qkv.N), query(B * h * hd), att(B * h * hd), proj(B * D), gu(B * 2 * ffn), hidden(B * ffn);
  std::vector<uint16_t> xb(B * widest);
  std::vector<float> xsum(B * widest / GROUP);
  const float eps_f = static_cast<float>(eps), scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t half = hd / 2;

  for (int64_t l = 0; l < L; ++l) {
    rms_norm(xp, np_ + (l * 2) * D, B, D, eps_f, normed.data());
    qkv.apply(l, normed.data(), B, xb.data(), xsum.data(), qkv_out.data());
    for (int64_t b = 0; b < B; ++b) {
      // rotate-half RoPE on the query and key heads, in place: v * cos + rotate_half(v) * sin
      const float *c = cos_table + pos[b] * hd, *s = sin_table + pos[b] * hd;
      for (int64_t head = 0; head < h + kvh; ++head) {
        float* v = qkv_out.data() + (b * (h + 2 * kvh) + head) * hd;
        float rotated[tierflow_attention::MAX_HEAD_DIM];
        for (int64_t d = 0; d < half; ++d) {
          rotated[d] = v[d] * c[d] - v[d + half] * s[d];
          rotated[d + half] = v[d + half] * c[d + half] + v[d] * s[d + half];
        }
        std::memcpy(v, rotated, hd * sizeof(float));
      }
      // this row's key and value into its cache slot, [KV head, block * block_size + offset, head_dim]
      const float* keys = qkv_out.data() + (b * (h + 2 * kvh) + h) * hd;
      const float* values = keys + kvh * hd;
      for (int64_t head = 0; head < kvh; ++head)
        for (int64_t d = 0; d < hd; ++d) {
          const int64_t at = l * pool + (head * n_blocks * block_size + slot[b]) * hd + d;
          kp[at] = to_bf16(keys[head * hd + d]);
          vp[at] = to_bf16(values[head * hd + d]);
        }
    }
    // attention reads the query heads as [B, h, hd]: they lead each row of q|k|v
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(query.data() + b * h * hd, qkv_out.data() + b * (h + 2 * kvh) * hd, h * hd * sizeof(float));
    tierflow_attention::attend_sequences<uint16_t>(query.data(), kp + l * pool, vp + l * pool, kvh, n_blocks, block_size,
                                                   static_cast<int>(h), static_cast<int>(hd), seqs, scale, att.data());
    o.apply(l, att.data(), B, xb.data(), xsum.data(), proj.data());
    for (int64_t i = 0; i < B * D; ++i) xp[i] += proj[i];

    rms_norm(xp, np_ + (l * 2 + 1) * D, B, D, eps_f, normed.data());
    gate_up.apply(l, normed.data(), B, xb.data(), xsum.data(), gu.data());
    for (int64_t b = 0; b < B; ++b) {
      const float *gate = gu.data() + b * 2 * ffn, *up = gate + ffn;
      float* out = hidden.data() + b * ffn;
      for (int64_t i = 0; i < ffn; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];  // silu(gate) * up
    }
    down.apply(l, hidden.data(), B, xb.data(), xsum.data(), proj.data());
    for (int64_t i = 0; i < B * D; ++i) xp[i] += proj[i];
  }
}

// x [M, K] float32 @ w.T for w = scale * code per 32 inputs: codes [N, K] int8, scale [N, K / 32]
// float32. Each output is the dot of the fp32 row with the dequantized weight row, in fp32.
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [rows, in]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous() && codes.size(1) == x.size(1)
              && x.size(1) % GROUP == 0, "codes: contiguous int8 [out, in], in a multiple of 32 and equal to x's");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2
              && scale.size(0) == codes.size(0) && scale.size(1) == codes.size(1) / GROUP,
              "scale: contiguous float32 [out, in / 32]");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), n_groups = K / GROUP;
  at::Tensor out = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scale.data_ptr<float>();
  const int8_t* cp = codes.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  constexpr int CHUNK = 4;  // rows of x per pass over the weights: their accumulators stay in registers
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* w = cp + n * K;
      const float* s = sp + n * n_groups;
      for (int64_t r0 = 0; r0 < M; r0 += CHUNK) {
        const int rows = static_cast<int>(std::min<int64_t>(CHUNK, M - r0));
        __m512 acc[CHUNK];
        for (int r = 0; r < CHUNK; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t g = 0; g < n_groups; ++g) {
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * GROUP))));
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * GROUP + 16))));
          const __m512 group_scale = _mm512_set1_ps(s[g]);
          for (int r = 0; r < rows; ++r) {
            const float* row = xp + (r0 + r) * K + g * GROUP;
            const __m512 dot = _mm512_fmadd_ps(hi, _mm512_loadu_ps(row + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(row)));
            acc[r] = _mm512_fmadd_ps(dot, group_scale, acc[r]);
          }
        }
        for (int r = 0; r < rows; ++r) op[(r0 + r) * N + n] = _mm512_reduce_add_ps(acc[r]);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tierflow, m) {
  m.def("decode_layers(Tensor(a!) x, Tensor norms, Tensor qkv_codes, Tensor qkv_scale, Tensor qkv_offset, "
        "Tensor o_codes, Tensor o_scale, Tensor o_offset, Tensor gate_up_codes, Tensor gate_up_scale, "
        "Tensor gate_up_offset, Tensor down_codes, Tensor down_scale, Tensor down_offset, Tensor rope_cos, "
        "Tensor rope_sin, Tensor positions, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slots, Tensor table, "
        "Tensor lengths, int n_heads, float eps) -> ()");
  m.impl("decode_layers", c10::DispatchKey::CPU, &decode_layers);
  m.def("q8_linear(Tensor x, Tensor codes, Tensor scale) -> Tensor");
  m.impl("q8_linear", c10::DispatchKey::CPU, &q8_linear);
}

#endif  // AVX-512 BF16: elsewhere the ops are absent and decoding runs op by op in torch
