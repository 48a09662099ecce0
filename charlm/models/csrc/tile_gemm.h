// The bf16 step GEMM on AMX tiles, and the choice between it and StepGemm<bf16> (step_gemm.h).
//
// Where the CPU has AMX-BF16, its tiles multiply bf16 several times faster than vdpbf16ps, but
// only on a weight packed for them. torch exposes oneDNN's batch-reduce GEMM micro-kernel and its
// packing as at::native::cpublas::brgemm / pack; could_pack(kBFloat16) says whether this CPU
// wants the packed (VNNI) layout, which it does where the micro-kernel uses AMX. TileStepGemm
// packs W_hh once per layer call, in blocks of 32 hidden units per gate (the layout the
// micro-kernel reads 16 or 32 columns wide), and each thread multiplies its blocks and then
// finishes its units' cell work, as StepGemm does.
//
// It is taken only where could_pack(kBFloat16) is true (AMX), CHARLM_MAX_ISA allows amx, and a
// small product checked against exact sums at first use agrees; elsewhere Bf16StepGemm is
// StepGemm<bf16>. CHARLM_BF16_GEMM=brgemm forces the micro-kernel on a CPU without AMX (in its
// unpacked layout), which is how the tests check this code where no AMX exists.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <strings.h>
#include <vector>

#include "step_gemm.h"

namespace {

inline bool env_is(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && strcasecmp(set, value) == 0;
}

// CHARLM_MAX_ISA below amx keeps the tiles off, as on a CPU without them.
inline bool amx_allowed() {
  const char* cap = std::getenv("CHARLM_MAX_ISA");
  return cap == nullptr || cap[0] == '\0' || strcasecmp(cap, "amx") == 0;
}

class TileStepGemm {
 public:
  static constexpr int64_t UB = 32;  // hidden units per block and gate: the columns of one call

  // B [K, N] with element (k, n) at b[k * row_stride + n * column_stride]; N = gates * units.
  TileStepGemm(const bf16_bits* b, int64_t K, int64_t N, int64_t row_stride, int64_t column_stride, int64_t gates,
               bool packed)
      : K_(K), N_(N), G_(gates), units_(N / gates), vnni_(packed), packed_(static_cast<size_t>(K * N)) {
    std::vector<bf16_bits> plain(static_cast<size_t>(K * UB));
    for (int64_t p = 0; p < blocks(); ++p) {
      const int64_t nb = width(p);
      for (int64_t g = 0; g < G_; ++g) {
        for (int64_t k = 0; k < K; ++k)
          for (int64_t c = 0; c < nb; ++c) plain[k * nb + c] = b[k * row_stride + (g * units_ + p * UB + c) * column_stride];
        bf16_bits* out = block(p, g);
        if (vnni_) {
          at::native::cpublas::pack(K, nb, nb, nb, at::kBFloat16, at::kBFloat16, plain.data(), out);
        } else {
          std::memcpy(out, plain.data(), sizeof(bf16_bits) * K * nb);
        }
      }
    }
  }

  // C [M, N] fp32 = A [M, K] (rows contiguous) x B, then finish(u0, u1) for each thread's units.
  template <typename Finish>
  void run(const bf16_bits* a, int64_t M, float* c, const Finish& finish) const {
    const auto* A = reinterpret_cast<const at::BFloat16*>(a);
    at::parallel_for(0, blocks(), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t nb = width(p);
        for (int64_t g = 0; g < G_; ++g)
          at::native::cpublas::brgemm(M, nb, K_, /*ld_a=*/K_, /*ld_b=*/nb, /*ld_c=*/N_, /*add_C=*/false, A,
                                      reinterpret_cast<const at::BFloat16*>(block(p, g)), c + g * units_ + p * UB,
                                      vnni_);
      }
      at::native::cpublas::brgemm_release(vnni_);
      finish(p0 * UB, std::min(units_, p1 * UB));
    });
  }

 private:
  int64_t blocks() const { return (units_ + UB - 1) / UB; }
  int64_t width(int64_t p) const { return std::min(UB, units_ - p * UB); }
  // Block p's gates lie side by side, each K x width(p).
  bf16_bits* block(int64_t p, int64_t g) const {
    return const_cast<bf16_bits*>(packed_.data()) + (p * UB * G_ + g * width(p)) * K_;
  }

  int64_t K_, N_, G_, units_;
  bool vnni_;
  std::vector<bf16_bits> packed_;
};

// One product of small integers / 8 (exact in bf16 and in fp32 sums) through the tiles, against
// the exact result: a micro-kernel or packing this code misreads never reaches a model.
inline bool tiles_agree(bool packed) {
  const int64_t K = 64, N = 64, M = 5, gates = 2;
  auto bits = [](float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    return static_cast<bf16_bits>(u >> 16);
  };
  auto value = [](int64_t i) { return static_cast<float>(i * 37 % 17 - 8) / 8.0f; };
  std::vector<bf16_bits> a(M * K), b(K * N);
  for (int64_t i = 0; i < M * K; ++i) a[i] = bits(value(i));
  for (int64_t i = 0; i < K * N; ++i) b[i] = bits(value(i + 5));
  std::vector<float> c(M * N, -1.0f);
  const TileStepGemm gemm(b.data(), K, N, /*row_stride=*/N, /*column_stride=*/1, gates, packed);
  gemm.run(a.data(), M, c.data(), [](int64_t, int64_t) {});
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += static_cast<double>(value(m * K + k)) * value(k * N + n + 5);
      if (std::abs(c[m * N + n] - sum) > 1e-3) return false;
    }
  return true;
}

enum class Bf16Kernel { Tiles, Dot, None };

// Which bf16 step GEMM this process uses (decided once): AMX tiles, vdpbf16ps, or ATen's.
inline Bf16Kernel bf16_kernel() {
  static const Bf16Kernel kind = [] {
#if defined(__x86_64__)
    const bool forced = env_is("CHARLM_BF16_GEMM", "brgemm");
    if (amx_allowed() && !env_is("CHARLM_BF16_GEMM", "dot")) {
      try {
        const bool packed = at::native::cpublas::could_pack(at::kBFloat16);
        if ((packed || forced) && tiles_agree(packed)) return Bf16Kernel::Tiles;
        if (packed) TORCH_WARN("charlm: the AMX step GEMM disagreed with exact sums; using vdpbf16ps or ATen's GEMM");
      } catch (const std::exception&) {
        // no micro-kernel in this torch build or for this CPU: the other paths
      }
    }
#endif
    return StepKernel<bf16_bits>::available ? Bf16Kernel::Dot : Bf16Kernel::None;
  }();
  return kind;
}

inline bool tiles_packed() {
  static const bool packed = at::native::cpublas::could_pack(at::kBFloat16);
  return packed;
}

// The bf16 step GEMM the loops use: TileStepGemm where bf16_kernel() chose the tiles, else StepGemm<bf16>.
class Bf16StepGemm {
 public:
  static bool fits(int64_t K, int64_t N, int64_t gates, int64_t steps) {
    if (bf16_kernel() == Bf16Kernel::Tiles)
      return K > 0 && K % 2 == 0 && N > 0 && N % gates == 0 && (N / gates) % 16 == 0 && steps >= 8;
    return StepGemm<bf16_bits>::fits(K, N, gates, steps);
  }

  Bf16StepGemm(const bf16_bits* b, int64_t K, int64_t N, int64_t row_stride, int64_t column_stride, int64_t gates) {
    if (bf16_kernel() == Bf16Kernel::Tiles) {
      tiles_.emplace(b, K, N, row_stride, column_stride, gates, tiles_packed());
    } else {
      dot_.emplace(b, K, N, row_stride, column_stride, gates);
    }
  }

  template <typename Finish>
  void run(const bf16_bits* a, int64_t M, float* c, const Finish& finish) const {
    if (tiles_) {
      tiles_->run(a, M, c, finish);
    } else {
      dot_->run(a, M, c, finish);
    }
  }

 private:
  std::optional<TileStepGemm> tiles_;
  std::optional<StepGemm<bf16_bits>> dot_;
};

}  // namespace
