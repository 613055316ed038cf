// Many LoRA adapters over the rows of one batch, each row with its own (Punica's BGMV): for every row
// n whose slot s is not 0,   y[n] += B[s] (A[s] x[n]),   reading A[s] and B[s] where they lie in the
// adapter pool (tasks/lm/lora.py: A [slots, R, in], B [slots, out, R], float32).
//
// torch needs two matmuls (and a slice, an add and a copy) per run of same-adapter rows; decoding
// rows of sixteen adapters are sixteen runs in each of 120 layers a step, ~26 ms of small ops on a
// 2-core CPU. Here one call per layer does every row: first t = A x for every (row, rank), then
// y += B t for every (row, block of outputs), each spread over torch's threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t OUT_BLOCK = 64;

void lora_bgmv(at::Tensor y, const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
               const at::Tensor& row_slots) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && a_pool.scalar_type() == at::kFloat
              && b_pool.scalar_type() == at::kFloat, "y, x and the pools: float32");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && a_pool.is_contiguous() && b_pool.is_contiguous()
              && row_slots.is_contiguous() && row_slots.scalar_type() == at::kLong, "contiguous tensors; row_slots int64");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && a_pool.dim() == 3 && b_pool.dim() == 3, "y [rows, out], x [rows, in], "
              "a_pool [slots, R, in], b_pool [slots, out, R]");
  const int64_t rows = x.size(0), in = x.size(1), out = y.size(1), rank = a_pool.size(1), slots = a_pool.size(0);
  TORCH_CHECK(y.size(0) == rows && row_slots.size(0) == rows && a_pool.size(2) == in && b_pool.size(0) == slots
              && b_pool.size(1) == out && b_pool.size(2) == rank, "shapes do not match: y [", y.size(0), ", ", out,
              "], x [", rows, ", ", in, "], a_pool ", a_pool.sizes(), ", b_pool ", b_pool.sizes());
  const int64_t* slot = row_slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < rows; ++n) TORCH_CHECK(0 <= slot[n] && slot[n] < slots, "row ", n, ": slot ", slot[n], " is not in the pool");
  const float *xp = x.data_ptr<float>(), *ap = a_pool.data_ptr<float>(), *bp = b_pool.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<float> t(rows * rank, 0.f);
  at::parallel_for(0, rows * rank, 8, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / rank, r = item % rank;
      if (!slot[n]) continue;
      const float* __restrict a = ap + (slot[n] * rank + r) * in;
      const float* __restrict xr = xp + n * in;
      float dot = 0.f;
      for (int64_t i = 0; i < in; ++i) dot += a[i] * xr[i];
      t[item] = dot;
    }
  });
  const int64_t blocks = (out + OUT_BLOCK - 1) / OUT_BLOCK;
  at::parallel_for(0, rows * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, first = (item % blocks) * OUT_BLOCK, last = std::min(out, first + OUT_BLOCK);
      if (!slot[n]) continue;
      const float* __restrict tr = t.data() + n * rank;
      for (int64_t o = first; o < last; ++o) {
        const float* __restrict b = bp + (slot[n] * out + o) * rank;
        float dot = 0.f;
        for (int64_t r = 0; r < rank; ++r) dot += b[r] * tr[r];
        yp[n * out + o] += dot;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tierflow, m) {
  m.def("lora_bgmv(Tensor(a!) y, Tensor x, Tensor a_pool, Tensor b_pool, Tensor row_slots) -> ()");
  m.impl("lora_bgmv", c10::DispatchKey::CPU, &lora_bgmv);
}
