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
// The fp32 kernel is built for AVX512 or, without it, AVX2 with FMA; the bf16 one needs
// AVX512-BF16. Without them at build time, or for a size it does not take, fits() is false and
// the callers keep ATen's GEMM.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define CHARLM_STEP_GEMM 1
#endif

namespace {

using bf16_bits = uint16_t;  // the raw bits of a bfloat16

#if defined(CHARLM_STEP_GEMM)
// One vector of W fp32 sums and the register file it lives in: AVX512 (16 lanes, 32 registers)
// where the build targets it, else AVX2 with FMA (8 lanes, 16 registers), what most laptops have.
#if defined(__AVX512F__)
struct Lanes {
  using V = __m512;
  static constexpr int64_t W = 16;
  static constexpr int MAX_SUMS = 24;  // registers for sums, leaving room for A and B
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline V fmadd(float a, const float* b, V acc) { return _mm512_fmadd_ps(_mm512_set1_ps(a), _mm512_loadu_ps(b), acc); }
};
#else
struct Lanes {
  using V = __m256;
  static constexpr int64_t W = 8;
  static constexpr int MAX_SUMS = 12;
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline V fmadd(float a, const float* b, V acc) { return _mm256_fmadd_ps(_mm256_set1_ps(a), _mm256_loadu_ps(b), acc); }
};
#endif

// How one element type multiplies: D values of K per 32-bit lane, and the fused multiply-add of
// one broadcast A group with one W-column B vector into W fp32 sums.
template <typename E>
struct StepKernel;

template <>
struct StepKernel<float> {
  static constexpr int64_t D = 1;
  static constexpr bool available = true;
  static inline Lanes::V madd(Lanes::V acc, const float* a, const float* b) { return Lanes::fmadd(*a, b, acc); }
};

template <>
struct StepKernel<bf16_bits> {
  static constexpr int64_t D = 2;  // vdpbf16ps: each lane sums the products of two bf16 pairs
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  static constexpr bool available = true;
  static inline __m512 madd(__m512 acc, const bf16_bits* a, const bf16_bits* b) {
    int32_t pair;
    std::memcpy(&pair, a, sizeof(pair));
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(pair), (__m512bh)_mm512_loadu_si512(b));
  }
#else
  static constexpr bool available = false;
  static inline Lanes::V madd(Lanes::V acc, const bf16_bits*, const bf16_bits*) { return acc; }  // never called
#endif
};

template <typename E>
class StepGemm {
  using Kernel = StepKernel<E>;
  static constexpr int64_t D = Kernel::D;
  static constexpr int64_t W = Lanes::W;
  using Columns = std::array<int64_t, 8>;  // where each W-column vector of a panel goes in C

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
    Columns cols{};
    const int64_t vectors = panel_width(p) / W;
    // Each 16 columns of a panel are 16 consecutive columns of C (one gate, 16 units).
    for (int64_t v = 0; v < vectors; ++v) cols[v] = (v * W / U_) * units_ + p * U_ + v * W % U_;
    switch (vectors * W / 16) {
      case 1: rows<1 * 16 / W>(a, M, panel, c, cols); break;
      case 2: rows<2 * 16 / W>(a, M, panel, c, cols); break;
      case 3: rows<3 * 16 / W>(a, M, panel, c, cols); break;
      case 4: rows<4 * 16 / W>(a, M, panel, c, cols); break;
      default: TORCH_CHECK(false, "StepGemm: unexpected panel width");
    }
  }

  // The panel's NW vectors in passes of at most as many as the registers hold sums for (with
  // AVX512 one pass; with AVX2's 16 registers an LSTM panel of 8 vectors takes two).
  template <int NW, int J0 = 0>
  void rows(const E* a, int64_t M, const E* panel, float* c, const Columns& cols) const {
    constexpr int PASS = W == 16 ? NW : 4;
    constexpr int NJ = NW - J0 < PASS ? NW - J0 : PASS;
    constexpr int MR = W == 16 ? (NJ >= 4 ? 6 : 8) : (Lanes::MAX_SUMS / NJ < 8 ? Lanes::MAX_SUMS / NJ : 8);
    const E* first = panel + J0 * W * D;  // vector J0 of group 0
    const int64_t stride = NW * W * D;    // one group of the panel
    int64_t m = 0;
    for (; m + MR <= M; m += MR) tile<MR, NJ>(a + m * K_, first, stride, c + m * N_, cols.data() + J0);
    rows_left<NJ, MR - 1>(M - m, a + m * K_, first, stride, c + m * N_, cols.data() + J0);
    if constexpr (J0 + NJ < NW) rows<NW, J0 + NJ>(a, M, panel, c, cols);
  }

  template <int NJ, int MR>
  void rows_left(int64_t left, const E* a, const E* first, int64_t stride, float* c, const int64_t* out) const {
    if constexpr (MR > 0) {
      if (left == MR) {
        tile<MR, NJ>(a, first, stride, c, out);
      } else {
        rows_left<NJ, MR - 1>(left, a, first, stride, c, out);
      }
    }
  }

  // MR rows by NJ vectors of W columns, summed over all K in registers.
  template <int MR, int NJ>
  void tile(const E* a, const E* first, int64_t stride, float* c, const int64_t* out) const {
    Lanes::V acc[MR][NJ];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NJ; ++j) acc[i][j] = Lanes::zero();
    for (int64_t q = 0; q < K_ / D; ++q) {
      const E* bq = first + q * stride;
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NJ; ++j) acc[i][j] = Kernel::madd(acc[i][j], a + i * K_ + q * D, bq + j * W * D);
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NJ; ++j) Lanes::store(c + i * N_ + out[j], acc[i][j]);
  }

  int64_t K_, N_, G_, units_, U_;
  std::vector<E> packed_;
};
#else
template <typename E>
class StepGemm {  // neither AVX512 nor AVX2 at build time (or not x86): never used (fits() is false)
 public:
  static bool fits(int64_t, int64_t, int64_t, int64_t) { return false; }
  StepGemm(const E*, int64_t, int64_t, int64_t, int64_t, int64_t) {}
  template <typename Finish>
  void run(const E*, int64_t, float*, const Finish&) const {}
};
#endif

}  // namespace
