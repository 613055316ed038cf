// Q4_1 dot products on AVX-512 BF16, shared by the Q4_1 linear layer (q4_linear.cpp) and the
// whole-stack decode step (decode_step.cpp).
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
// Packing (q4_pack in tasks/lm/int4.py): 16 outputs make a tile; per tile and group, 8 runs of 32
// bytes; byte e of run j holds, for output e / 2 and input pair position h = e % 2, the code of input
// 4j + h (low nibble) and 4j + 2 + h (high nibble). Zero-extending a run to 16 bits then gives two
// vectors whose 32-bit lane i is output i's (input 2p, input 2p + 1) pair, ready for vdpbf16ps
// against a broadcast of the row's (x_2p, x_2p+1).

#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define TIERFLOW_HAS_Q4 1

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace tierflow_q4 {

constexpr int TILE = 16, GROUP = 32, ROWS = 8;  // ROWS: accumulators for 8 rows + their dots fit the registers

template <int M>
inline void tile_rows(const uint16_t* xb, const float* xsum, int64_t K, int64_t n_groups, const uint8_t* codes,
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

// x [M, K] float32 to bf16 (round to nearest even, as torch rounds) and each group's sum of the
// rounded values; xb holds M * K, xsum M * K / GROUP.
inline void round_rows(const float* x, int64_t M, int64_t K, uint16_t* xb, float* xsum) {
  const int64_t n_groups = K / GROUP;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < n_groups; ++g) {
      const __m512 lo = _mm512_loadu_ps(x + r * K + g * GROUP), hi = _mm512_loadu_ps(x + r * K + g * GROUP + 16);
      const __m512bh both = _mm512_cvtne2ps_pbh(hi, lo);  // lo in the low half
      _mm512_storeu_si512(xb + r * K + g * GROUP, (__m512i)both);
      const __m512 back_lo = _mm512_cvtpbh_ps((__m256bh)_mm512_castsi512_si256((__m512i)both));
      const __m512 back_hi = _mm512_cvtpbh_ps((__m256bh)_mm512_extracti64x4_epi64((__m512i)both, 1));
      xsum[r * n_groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(back_lo, back_hi));
    }
}

// out [M, N] = rows xb (rounded by round_rows) times the packed weight's transpose, parallel over
// the weight's tiles; codes [N / 16, K / 32, 256], scale and offset [N / 16, K / 32, 16].
inline void matmul(const uint16_t* xb, const float* xsum, int64_t M, int64_t K, const uint8_t* codes,
                   const float* scale, const float* offset, int64_t N, float* out) {
  const int64_t n_tiles = N / TILE, n_groups = K / GROUP;
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t r = 0; r < M; r += ROWS) {
        const int64_t rows = std::min<int64_t>(ROWS, M - r);
        TILE_FNS[rows - 1](xb + r * K, xsum + r * n_groups, K, n_groups, codes + t * n_groups * TILE * GROUP / 2,
                           scale + t * n_groups * TILE, offset + t * n_groups * TILE, out + r * N + t * TILE, N);
      }
  });
}

}  // namespace tierflow_q4

#endif  // AVX-512 BF16
