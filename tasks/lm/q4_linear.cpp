// A linear layer on Q4_1 weights (w = scale * code + minimum per 32 inputs) for the few rows of a
// decode step, with AVX-512 BF16 dot products.
//
// torch's int4 CPU kernel converts weights to fp32 and multiplies in fp32 (16 multiply-adds per
// instruction); at 16 rows it is compute-bound at ~140 GFLOP/s on a 2-core CPU, 45% of a decode
// step. vdpbf16ps does 32 per instruction, and a 4-bit code needs no arithmetic to become a bf16
// operand: 128 + code is exactly representable, and its bf16 bits are 0x4300 | code. So per group
// of 32 inputs,
//     sum_k x_k w_k = scale * sum_k x_k (128 + code_k) + (minimum - 128 scale) * sum_k x_k,
// the dot runs on bf16 x (as torch's kernel rounds them) in fp32 accumulation, and scale, offset and
// the row sums of x are fp32.
//
// Packing (q4_pack in tasks/lm/model.py): 16 outputs make a tile; per tile and group, 8 runs of 32
// bytes; byte e of run j holds, for output e / 2 and input pair position h = e % 2, the code of input
// 4j + h (low nibble) and 4j + 2 + h (high nibble). Zero-extending a run to 16 bits then gives two
// vectors whose 32-bit lane i is output i's (input 2p, input 2p + 1) pair, ready for vdpbf16ps
// against a broadcast of the row's (x_2p, x_2p+1).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

namespace {

constexpr int TILE = 16, GROUP = 32, ROWS = 8;  // ROWS: accumulators for 8 rows + their dots fit the registers

template <int M>
void tile_rows(const uint16_t* xb, const float* xsum, int64_t K, int64_t n_groups, const uint8_t* codes,
               const float* scale, const float* offset, float* out, int64_t N) {
  const __m512i low = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
  __m512 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < n_groups; ++g) {
    __m512 dot[M];
    for (int r = 0; r < M; ++r) dot[r] = _mm512_setzero_ps();
    const uint8_t* run = codes + g * TILE * GROUP / 2;
    for (int j = 0; j < 8; ++j) {
      const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(run + 32 * j)));
      const __m512bh first = (__m512bh)_mm512_or_si512(_mm512_and_si512(bytes, low), bias);
      const __m512bh second = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(bytes, 4), bias);
      for (int r = 0; r < M; ++r) {
        const int32_t* pairs = reinterpret_cast<const int32_t*>(xb + r * K + g * GROUP) + 2 * j;
        dot[r] = _mm512_dpbf16_ps(dot[r], first, (__m512bh)_mm512_set1_epi32(pairs[0]));
        dot[r] = _mm512_dpbf16_ps(dot[r], second, (__m512bh)_mm512_set1_epi32(pairs[1]));
      }
    }
    const __m512 s = _mm512_loadu_ps(scale + g * TILE), o = _mm512_loadu_ps(offset + g * TILE);
    for (int r = 0; r < M; ++r)
      acc[r] = _mm512_fmadd_ps(s, dot[r], _mm512_fmadd_ps(o, _mm512_set1_ps(xsum[r * n_groups + g]), acc[r]));
  }
  for (int r = 0; r < M; ++r) _mm512_storeu_ps(out + r * N, acc[r]);
}

using TileFn = void (*)(const uint16_t*, const float*, int64_t, int64_t, const uint8_t*, const float*, const float*,
                        float*, int64_t);
constexpr TileFn TILE_FNS[ROWS] = {tile_rows<1>, tile_rows<2>, tile_rows<3>, tile_rows<4>,
                                   tile_rows<5>, tile_rows<6>, tile_rows<7>, tile_rows<8>};

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
  // x to bf16 once (round to nearest even), and each group's sum of the rounded values
  std::vector<uint16_t> xb(M * K);
  std::vector<float> xsum(M * n_groups);
  const float* xp = x.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < n_groups; ++g) {
      const __m512 lo = _mm512_loadu_ps(xp + r * K + g * GROUP), hi = _mm512_loadu_ps(xp + r * K + g * GROUP + 16);
      const __m512bh both = _mm512_cvtne2ps_pbh(hi, lo);  // lo in the low half
      _mm512_storeu_si512(xb.data() + r * K + g * GROUP, (__m512i)both);
      const __m512 back_lo = _mm512_cvtpbh_ps((__m256bh)_mm512_castsi512_si256((__m512i)both));
      const __m512 back_hi = _mm512_cvtpbh_ps((__m256bh)_mm512_extracti64x4_epi64((__m512i)both, 1));
      xsum[r * n_groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(back_lo, back_hi));
    }
  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *fp = offset.data_ptr<float>();
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t r = 0; r < M; r += ROWS) {
        const int64_t rows = std::min<int64_t>(ROWS, M - r);
        TILE_FNS[rows - 1](xb.data() + r * K, xsum.data() + r * n_groups, K, n_groups,
                           cp + t * n_groups * TILE * GROUP / 2, sp + t * n_groups * TILE, fp + t * n_groups * TILE,
                           op + r * N + t * TILE, N);
      }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tierflow, m) {
  m.def("q4_linear(Tensor x, Tensor codes, Tensor scale, Tensor offset) -> Tensor");
  m.impl("q4_linear", c10::DispatchKey::CPU, &q4_linear);
}

#endif  // AVX-512 BF16: elsewhere the op is absent and the model keeps torch's int4 kernel
