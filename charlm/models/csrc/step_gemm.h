// The recurrent GEMM of one step, shared by the fp32 (recurrent.cpp) and bf16 (recurrent_bf16.cpp)
// step loops.
//
// A step's GEMM is small ([32, 256] x [256, 1024] for the LSTM of the benchmark) and is repeated
// T times with the same weight. ATen hands each one to oneDNN, which on the development machine
// ran such a GEMM at 120-140 GFLOP/s in fp32 against ~200 for a packed one, and took as long in
// bf16 as in fp32 at [32, 256] x [256, 256] (~28 us: per-call set-up and re-packing of the
// weight). StepGemm packs the weight once per layer call into the layout its register tiles
// read (for bf16, the pair-interleaved layout of the AVX512-BF16 dot-product instruction
// vdpbf16ps), keeps the fp32 sums in registers, and lets each thread finish its own hidden
// units with the step's pointwise work, so one parallel region covers the whole step.
//
// The output's columns are G gates of `units` hidden units each (gate g of unit u in column
// g * units + u, as W_hh's rows are laid out). Packed, a panel holds all G gates of U units
// (U = 16, or 32 for a single gate), so a thread that owns a panel owns whole units; each
// 16-column vector of a panel is 16 consecutive columns of C, which comes out in that layout.
// Without AVX512 (AVX512-BF16 for bf16) at build time, or for a size it does not take,
// fits() is false and the callers keep ATen's GEMM.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using bf16_bits = uint16_t;  // the raw bits of a bfloat16

// How one element type multiplies: D values of K per 32-bit lane, and the fused multiply-add of
// one broadcast A group with one 16-column B vector into 16 fp32 sums.
template <typename E>
struct StepKernel;

#if defined(__AVX512F__)
template <>
struct StepKernel<float> {
  static constexpr int64_t D = 1;
  static constexpr bool available = true;
  static inline __m512 madd(__m512 acc, const float* a, const float* b) {
    return _mm512_fmadd_ps(_mm512_set1_ps(*a), _mm512_loadu_ps(b), acc);
  }
};

template <>
struct StepKernel<bf16_bits> {
  static constexpr int64_t D = 2;  // vdpbf16ps: each lane sums the products of two bf16 pairs
#if defined(__AVX512BF16__)
  static constexpr bool available = true;
  static inline __m512 madd(__m512 acc, const bf16_bits* a, const bf16_bits* b) {
    int32_t pair;
    std::memcpy(&pair, a, sizeof(pair));
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(pair), (__m512bh)_mm512_loadu_si512(b));
  }
#else
  static constexpr bool available = false;
  static inline __m512 madd(__m512 acc, const bf16_bits*, const bf16_bits*) { return acc; }  // never called
#endif
};

template <typename E>
class StepGemm {
  using Kernel = StepKernel<E>;
  static constexpr int64_t D = Kernel::D;
  using Columns = std::array<int64_t, 4>;

 public:
  // The sizes taken: K groups into D, the units split into 16-unit panels, and the packing (one
  // pass over the weight) is shared by enough steps to pay for itself.
  static bool fits(int64_t K, int64_t N, int64_t gates, int64_t steps) {
    return Kernel::available && K > 0 && K % D == 0 && N > 0 && N % gates == 0 && (N / gates) % 16 == 0 &&
           steps >= 8;
  }

  // B [K, N] with element (k, n) at b[k * row_stride + n * column_stride].
  StepGemm(const E* b, int64_t K, int64_t N, int64_t row_stride, int64_t column_stride, int64_t gates)
      : K_(K), N_(N), G_(gates), units_(N / gates), U_(gates == 1 ? 32 : 16), packed_(static_cast<size_t>(K * N)) {
    // In a panel (starting at n0 * K for its first packed column n0), group q of B's rows holds,
    // for each packed column c, the D values b[q * D + r][n] side by side.
    for (int64_t p = 0; p < panels(); ++p) {
      const int64_t n0 = p * U_ * G_, w = panel_width(p);
      E* panel = packed_.data() + n0 * K;
      for (int64_t c = 0; c < w; ++c) {
        const int64_t n = (c / U_) * units_ + p * U_ + c % U_;  // gate c / U, unit p * U + c % U
        for (int64_t q = 0; q < K / D; ++q)
          for (int64_t r = 0; r < D; ++r) panel[(q * w + c) * D + r] = b[(q * D + r) * row_stride + n * column_stride];
      }
    }
  }

  // C [M, N] fp32 = A [M, K] (rows contiguous) x B. Each thread computes whole panels, then
  // calls finish(u0, u1) for its units [u0, u1): columns g * units + [u0, u1) of C.
  template <typename Finish>
  void run(const E* a, int64_t M, float* c, const Finish& finish) const {
    at::parallel_for(0, panels(), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) panel_product(a, M, p, c);
      finish(p0 * U_, std::min(units_, p1 * U_));
    });
  }

 private:
  int64_t panels() const { return (units_ + U_ - 1) / U_; }
  // A single gate's last panel may hold 16 units of 32; with more gates units_ % 16 == 0.
  int64_t panel_width(int64_t p) const { return std::min(U_, units_ - p * U_) * G_; }

  void panel_product(const E* a, int64_t M, int64_t p, float* c) const {
    const E* panel = packed_.data() + p * U_ * G_ * K_;
    Columns cols{};  // where each of the panel's vectors goes in C
    const int64_t vectors = panel_width(p) / 16;
    for (int64_t v = 0; v < vectors; ++v) cols[v] = (v * 16 / U_) * units_ + p * U_ + v * 16 % U_;
    switch (vectors) {
      case 1: rows<1>(a, M, panel, c, cols); break;
      case 2: rows<2>(a, M, panel, c, cols); break;
      case 3: rows<3>(a, M, panel, c, cols); break;
      case 4: rows<4>(a, M, panel, c, cols); break;
      default: TORCH_CHECK(false, "StepGemm: unexpected panel width");
    }
  }

  // Row tiles as tall as the 32 vector registers allow: MR * NV sums, NV panel vectors, one A group.
  template <int NV>
  void rows(const E* a, int64_t M, const E* panel, float* c, const Columns& cols) const {
    constexpr int MR = NV >= 4 ? 6 : 8;
    int64_t m = 0;
    for (; m + MR <= M; m += MR) tile<MR, NV>(a + m * K_, panel, c + m * N_, cols);
    rows_left<NV, MR - 1>(M - m, a + m * K_, panel, c + m * N_, cols);
  }

  template <int NV, int MR>
  void rows_left(int64_t left, const E* a, const E* panel, float* c, const Columns& cols) const {
    if constexpr (MR > 0) {
      if (left == MR) {
        tile<MR, NV>(a, panel, c, cols);
      } else {
        rows_left<NV, MR - 1>(left, a, panel, c, cols);
      }
    }
  }

  // MR rows by NV*16 columns, summed over all K in registers.
  template <int MR, int NV>
  void tile(const E* a, const E* panel, float* c, const Columns& cols) const {
    __m512 acc[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t q = 0; q < K_ / D; ++q) {
      const E* bq = panel + q * NV * 16 * D;
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j) acc[i][j] = Kernel::madd(acc[i][j], a + i * K_ + q * D, bq + j * 16 * D);
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + i * N_ + cols[j], acc[i][j]);
  }

  int64_t K_, N_, G_, units_, U_;
  std::vector<E> packed_;
};
#else
template <typename E>
class StepGemm {  // no AVX512 at build time: never used (fits() is false)
 public:
  static bool fits(int64_t, int64_t, int64_t, int64_t) { return false; }
  StepGemm(const E*, int64_t, int64_t, int64_t, int64_t, int64_t) {}
  template <typename Finish>
  void run(const E*, int64_t, float*, const Finish&) const {}
};
#endif

}  // namespace
