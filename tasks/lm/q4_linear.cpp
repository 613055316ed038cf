// A linear layer on Q4_1 weights (w = scale * code + minimum per 32 inputs) for the few rows of a
// decode step, with AVX-512 BF16 dot products: the kernel and the packing are described in
// q4_tiles.h.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "q4_tiles.h"

#ifdef TIERFLOW_HAS_Q4

namespace {

using tierflow_q4::GROUP;
using tierflow_q4::TILE;

// x [M, K] float32; codes [N / 16, K / 32, 256] uint8; scale, offset [N / 16, K / 32, 16] float32
// (offset = minimum - 128 * scale). Returns x @ w.T [M, N] float32.
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& offset) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [rows, in]");
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous()
              && codes.size(2) == TILE * GROUP / 2, "codes: contiguous uint8 [out / 16, in / 32, 256] from q4_pack");
  const int64_t M = x.size(0), K = x.size(1), n_tiles = codes.size(0), n_groups = codes.size(1), N = n_tiles * TILE;
  TORCH_CHECK(K == n_groups * GROUP, "x has ", K, " inputs; the weight has ", n_groups * GROUP);
  for (const at::Tensor* t : {&scale, &offset})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(0) == n_tiles
                && t->size(1) == n_groups && t->size(2) == TILE, "scale, offset: contiguous float32 [out / 16, in / 32, 16]");
  std::vector<uint16_t> xb(M * K);
  std::vector<float> xsum(M * n_groups);
  tierflow_q4::round_rows(x.data_ptr<float>(), M, K, xb.data(), xsum.data());
  at::Tensor out = at::empty({M, N}, x.options());
  tierflow_q4::matmul(xb.data(), xsum.data(), M, K, codes.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                      offset.data_ptr<float>(), N, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tierflow, m) {
  m.def("q4_linear(Tensor x, Tensor codes, Tensor scale, Tensor offset) -> Tensor");
  m.impl("q4_linear", c10::DispatchKey::CPU, &q4_linear);
}

#endif  // AVX-512 BF16: elsewhere the op is absent and the model keeps torch's int4 kernel
