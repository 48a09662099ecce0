// Mixed-precision (bf16) step loops of the RNN, LSTM and GRU layers, on the CPU.
//
// The matmuls run on bf16 operands (ATen's bf16 GEMM: oneDNN on CPUs with bf16 units, which
// accumulates in fp32 and rounds the result to bf16); everything the recurrence carries or
// differentiates through runs in fp32: the gate pre-activations are summed in fp32 (input part,
// bias, recurrent part), the gate nonlinearities, the LSTM cell state c_t, the GRU state h_t
// and the gradient of c are fp32. What is stored in bf16 is only what feeds a GEMM next: h_t
// (the next step's and the next layer's input, and dW_hh's operand) and the gate gradients
// (dW_ih, dW_hh, dx and dh_{t-1} are GEMMs over them). The weights arrive as bf16 copies of
// the fp32 master weights; their gradients leave as bf16 GEMM results (one rounding of an
// fp32-accumulated sum) and autograd casts them back onto the fp32 parameters.
//
// Shapes as in recurrent.cpp: T time, B batch, H hidden, gates i f g o (LSTM), r z n (GRU).
// gx [T, B, G*H] bf16 is W_ih x_t for every step (without bias: the bias is added here in fp32).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

using at::Tensor;

namespace {

using bf16 = uint16_t;  // the raw bits of a bfloat16: the top half of a float

// Forced inline: a called (not inlined) exp keeps the gate loops scalar, 7x slower.
#define CHARLM_INLINE inline __attribute__((always_inline))

CHARLM_INLINE float from_bf16(bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, as c10::BFloat16 does; NaN stays NaN (a quiet one).
CHARLM_INLINE bf16 to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounded = bits + 0x7FFFu + ((bits >> 16) & 1u);
  return f != f ? bf16(0x7FC0) : static_cast<bf16>(rounded >> 16);
}

// exp with a NaN-propagating clamp and a degree-6 polynomial, as in recurrent.cpp (so the
// two files agree on every activation to float's precision).
CHARLM_INLINE float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = __builtin_nearbyintf(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
CHARLM_INLINE float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }
CHARLM_INLINE float tanh_(float x) { return 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f); }

template <typename F>
void for_each_row(int64_t B, int64_t values_per_row, const F& row) {
  const int64_t grain = std::max<int64_t>(1, 16384 / values_per_row);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) row(b);
  });
}

inline const bf16* raw(const Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>()); }
inline bf16* raw_mut(Tensor& t) { return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>()); }

void check_bf16(const Tensor& gx, const Tensor& h0, const Tensor& w_hh, int64_t gates) {
  TORCH_CHECK(gx.dim() == 3 && gx.is_contiguous() && gx.scalar_type() == at::kBFloat16,
              "gx must be a contiguous bf16 [T, B, G*H] tensor");
  TORCH_CHECK(w_hh.scalar_type() == at::kBFloat16 && h0.scalar_type() == at::kFloat, "w_hh bf16, state fp32");
  const int64_t H = w_hh.size(1);
  TORCH_CHECK(w_hh.size(0) == gates * H && gx.size(2) == gates * H, "gate sizes do not match");
  TORCH_CHECK(h0.size(0) == gx.size(1) && h0.size(1) == H, "state must be [B, H]");
}

// W_hh^T [H, G*H] as the per-step GEMM operand: a contiguous copy pays for itself over a long
// window (~20% faster GEMMs) but not over one step, where it would cost more than the step.
Tensor recurrent_operand(const Tensor& w_hh, int64_t steps) {
  return steps >= 16 ? w_hh.t().contiguous() : w_hh.t();
}

// [h0, h_0 .. h_{T-2}] in bf16 as [T*B, H]: the operand of dW_hh's single GEMM.
Tensor previous_states(const Tensor& h0, const Tensor& hs) {
  const int64_t T = hs.size(0);
  return at::cat({h0.to(at::kBFloat16).unsqueeze(0), hs.narrow(0, 0, T - 1)}, 0).view({-1, hs.size(2)});
}

// ---- the recurrent GEMM of one step -------------------------------------------------------
// A step's GEMM is small ([32, 256] x [256, 256] for the RNN of the benchmark) and is repeated
// T times with the same weight. ATen hands each one to oneDNN, which on this class of CPU takes
// as long in bf16 as in fp32 (~28 us: per-call set-up and re-packing of the weight), so the bf16
// RNN was no faster than the fp32 one where it matters most. StepGemm packs the weight once per
// layer call into the layout the AVX512-BF16 dot-product instruction (vdpbf16ps) reads, keeps
// the fp32 sums in registers, and lets each thread finish its own columns with the step's
// pointwise work, so one parallel region covers the whole step. Without AVX512-BF16 (or for a
// size it does not take) the callers keep ATen's path.
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

class StepGemm {
 public:
  static constexpr int64_t kPanel = 32;  // columns per packed panel: two 16-float vectors

  // The sizes taken: K pairs up, N splits into 16-column vectors, and the packing (one pass over
  // the weight) is shared by enough steps to pay for itself.
  static bool fits(int64_t K, int64_t N, int64_t steps) {
    return K % 2 == 0 && N % 16 == 0 && K > 0 && N > 0 && steps >= 8;
  }

  // B [K, N] bf16 with element (k, n) at b[k * row_stride + n * column_stride].
  StepGemm(const bf16* b, int64_t K, int64_t N, int64_t row_stride, int64_t column_stride)
      : K_(K), N_(N), packed_(static_cast<size_t>(K * N)) {
    // Panel p (columns n0 .. n0 + w) starts at n0 * K; in it, pair q of rows holds for each
    // column c the two values (b[2q][c], b[2q+1][c]) side by side.
    for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
      const int64_t w = std::min(kPanel, N - n0);
      bf16* panel = packed_.data() + n0 * K;
      for (int64_t q = 0; q < K / 2; ++q)
        for (int64_t c = 0; c < w; ++c)
          for (int64_t r = 0; r < 2; ++r)
            panel[(q * w + c) * 2 + r] = b[(2 * q + r) * row_stride + (n0 + c) * column_stride];
    }
  }

  // C [M, N] fp32 = A [M, K] bf16 (rows contiguous) x B. Each thread computes whole panels,
  // then calls finish(n0, n1) for its columns [n0, n1): the step's pointwise work on C.
  template <typename Finish>
  void run(const bf16* a, int64_t M, float* c, const Finish& finish) const {
    const int64_t panels = (N_ + kPanel - 1) / kPanel;
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) panel_product(a, M, p * kPanel, c);
      finish(p0 * kPanel, std::min(N_, p1 * kPanel));
    });
  }

 private:
  void panel_product(const bf16* a, int64_t M, int64_t n0, float* c) const {
    const bf16* panel = packed_.data() + n0 * K_;
    if (N_ - n0 >= kPanel) {
      rows<2>(a, M, panel, c + n0);
    } else {
      rows<1>(a, M, panel, c + n0);
    }
  }

  template <int NV>
  void rows(const bf16* a, int64_t M, const bf16* panel, float* c) const {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) tile<8, NV>(a + m * K_, panel, c + m * N_);
    switch (M - m) {
      case 7: tile<7, NV>(a + m * K_, panel, c + m * N_); break;
      case 6: tile<6, NV>(a + m * K_, panel, c + m * N_); break;
      case 5: tile<5, NV>(a + m * K_, panel, c + m * N_); break;
      case 4: tile<4, NV>(a + m * K_, panel, c + m * N_); break;
      case 3: tile<3, NV>(a + m * K_, panel, c + m * N_); break;
      case 2: tile<2, NV>(a + m * K_, panel, c + m * N_); break;
      case 1: tile<1, NV>(a + m * K_, panel, c + m * N_); break;
      default: break;
    }
  }

  // MR rows by NV*16 columns, summed over all K in registers.
  template <int MR, int NV>
  void tile(const bf16* a, const bf16* panel, float* c) const {
    __m512 acc[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t q = 0; q < K_ / 2; ++q) {
      __m512bh bv[NV];
      for (int j = 0; j < NV; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(panel + (q * NV + j) * 32);
      for (int i = 0; i < MR; ++i) {
        int32_t pair;
        std::memcpy(&pair, a + i * K_ + 2 * q, sizeof(pair));
        const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
        for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + i * N_ + j * 16, acc[i][j]);
  }

  int64_t K_, N_;
  std::vector<bf16> packed_;
};
#else
class StepGemm {  // no AVX512-BF16 at build time: never used (fits() is false)
 public:
  static bool fits(int64_t, int64_t, int64_t) { return false; }
  StepGemm(const bf16*, int64_t, int64_t, int64_t, int64_t) {}
  template <typename Finish>
  void run(const bf16*, int64_t, float*, const Finish&) const {}
};
#endif

// ---- LSTM ---------------------------------------------------------------------------------

void lstm_cell_forward(const bf16* gx, const float* bias, const bf16* gh, const float* c_prev, float* acts,
                       float* c, bf16* h, int64_t B, int64_t H) {
  for_each_row(B, 4 * H, [&](int64_t b) {
    const bf16* x = gx + b * 4 * H;
    const bf16* g = gh + b * 4 * H;
    float* a = acts + b * 4 * H;
    const float* cp = c_prev + b * H;
    float* cb = c + b * H;
    bf16* hb = h + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float i = sigmoid(from_bf16(x[j]) + bias[j] + from_bf16(g[j]));
      const float f = sigmoid(from_bf16(x[H + j]) + bias[H + j] + from_bf16(g[H + j]));
      const float gg = tanh_(from_bf16(x[2 * H + j]) + bias[2 * H + j] + from_bf16(g[2 * H + j]));
      const float o = sigmoid(from_bf16(x[3 * H + j]) + bias[3 * H + j] + from_bf16(g[3 * H + j]));
      const float cn = f * cp[j] + i * gg;
      a[j] = i; a[H + j] = f; a[2 * H + j] = gg; a[3 * H + j] = o;
      cb[j] = cn;
      hb[j] = to_bf16(o * tanh_(cn));
    }
  });
}

// dh = dh_out + dh_next (both bf16: a layer above and a GEMM produced them); dc in/out fp32.
void lstm_cell_backward(const float* acts, const float* c, const float* c_prev, const bf16* dh_out,
                        const bf16* dh_next, float* dc, bf16* dg, int64_t B, int64_t H) {
  for_each_row(B, 4 * H, [&](int64_t b) {
    const float* a = acts + b * 4 * H;
    const float* cb = c + b * H;
    const float* cp = c_prev + b * H;
    const bf16* dho = dh_out + b * H;
    const bf16* dhn = dh_next + b * H;
    float* dcb = dc + b * H;
    bf16* d = dg + b * 4 * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
      const float dh = from_bf16(dho[j]) + from_bf16(dhn[j]);
      const float tc = tanh_(cb[j]);
      const float dct = dcb[j] + dh * o * (1.0f - tc * tc);
      d[j] = to_bf16(dct * g * i * (1.0f - i));
      d[H + j] = to_bf16(dct * cp[j] * f * (1.0f - f));
      d[2 * H + j] = to_bf16(dct * i * (1.0f - g * g));
      d[3 * H + j] = to_bf16(dh * tc * o * (1.0f - o));
      dcb[j] = dct * f;
    }
  });
}

// Returns acts fp32 [T, B, 4H] (i f g o), hs bf16 [T, B, H], cs fp32 [T, B, H].
std::tuple<Tensor, Tensor, Tensor> lstm_forward_bf16(const Tensor& gx, const Tensor& bias, const Tensor& h0,
                                                     const Tensor& c0, const Tensor& w_hh) {
  check_bf16(gx, h0, w_hh, 4);
  const int64_t T = gx.size(0), B = gx.size(1), H = w_hh.size(1);
  const auto f32 = gx.options().dtype(at::kFloat);
  Tensor acts = at::empty({T, B, 4 * H}, f32), cs = at::empty({T, B, H}, f32);
  Tensor hs = at::empty({T, B, H}, gx.options());
  Tensor gh = at::empty({B, 4 * H}, gx.options());
  const Tensor w_t = recurrent_operand(w_hh, T), b = bias.contiguous();
  Tensor h_prev = h0.to(at::kBFloat16).contiguous(), c_prev = c0.contiguous();
  for (int64_t t = 0; t < T; ++t) {
    at::mm_out(gh, h_prev, w_t);
    Tensor x = gx[t], a = acts[t], c = cs[t], h = hs[t];
    lstm_cell_forward(raw(x), b.data_ptr<float>(), raw(gh), c_prev.data_ptr<float>(), a.data_ptr<float>(),
                      c.data_ptr<float>(), raw_mut(h), B, H);
    h_prev = h;
    c_prev = c;
  }
  return {acts, hs, cs};
}

// Returns dg bf16 [T, B, 4H] (the gate pre-activations' grads), dh0, dc0 (fp32) and dw_hh (bf16).
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_backward_bf16(const Tensor& dhs, const Tensor& dh_last,
                                                              const Tensor& dc_last, const Tensor& acts,
                                                              const Tensor& cs, const Tensor& h0, const Tensor& c0,
                                                              const Tensor& hs, const Tensor& w_hh) {
  const int64_t T = acts.size(0), B = acts.size(1), H = w_hh.size(1);
  Tensor dhs_c = dhs.to(at::kBFloat16).contiguous();
  Tensor dg = at::empty({T, B, 4 * H}, hs.options());
  Tensor dh_next = dh_last.to(at::kBFloat16).contiguous().clone();
  Tensor dc = dc_last.to(at::kFloat).contiguous().clone();
  Tensor c0c = c0.contiguous();
  for (int64_t t = T - 1; t >= 0; --t) {
    Tensor c_prev = t > 0 ? cs[t - 1] : c0c;
    Tensor dgt = dg[t], dho = dhs_c[t], a = acts[t], c = cs[t];
    lstm_cell_backward(a.data_ptr<float>(), c.data_ptr<float>(), c_prev.data_ptr<float>(), raw(dho), raw(dh_next),
                       dc.data_ptr<float>(), raw_mut(dgt), B, H);
    at::mm_out(dh_next, dgt, w_hh);
  }
  Tensor dw = dg.view({T * B, 4 * H}).t().mm(previous_states(h0, hs));
  return {dg, dh_next.to(at::kFloat), dc, dw};
}

// ---- RNN (tanh) ---------------------------------------------------------------------------

// Returns hs bf16 [T, B, H].
Tensor rnn_forward_bf16(const Tensor& gx, const Tensor& bias, const Tensor& h0, const Tensor& w_hh) {
  check_bf16(gx, h0, w_hh, 1);
  const int64_t T = gx.size(0), B = gx.size(1), H = w_hh.size(1);
  Tensor hs = at::empty({T, B, H}, gx.options());
  const Tensor b = bias.contiguous();
  const float* bp = b.data_ptr<float>();
  Tensor h_prev = h0.to(at::kBFloat16).contiguous();
  if (StepGemm::fits(H, H, T)) {
    // h_t = tanh(x_t + b + h_{t-1} W_hh^T): W_hh^T's element (k, n) is w_hh[n][k]
    const StepGemm gemm(raw(w_hh.contiguous()), H, H, /*row_stride=*/1, /*column_stride=*/H);
    Tensor acc = at::empty({B, H}, b.options());
    float* ap = acc.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      const bf16* xp = raw(gx) + t * B * H;
      bf16* hp = raw_mut(hs) + t * B * H;
      gemm.run(t == 0 ? raw(h_prev) : hp - B * H, B, ap, [&](int64_t n0, int64_t n1) {
        for (int64_t row = 0; row < B; ++row) {
          const int64_t base = row * H;
#pragma omp simd
          for (int64_t j = n0; j < n1; ++j)
            hp[base + j] = to_bf16(tanh_(from_bf16(xp[base + j]) + bp[j] + ap[base + j]));
        }
      });
    }
    return hs;
  }
  Tensor gh = at::empty({B, H}, gx.options());
  const Tensor w_t = recurrent_operand(w_hh, T);
  for (int64_t t = 0; t < T; ++t) {
    at::mm_out(gh, h_prev, w_t);
    Tensor x = gx[t], h = hs[t];
    const bf16 *xp = raw(x), *gp = raw(gh);
    bf16* hp = raw_mut(h);
    for_each_row(B, H, [&](int64_t row) {
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const int64_t k = row * H + j;
        hp[k] = to_bf16(tanh_(from_bf16(xp[k]) + bp[j] + from_bf16(gp[k])));
      }
    });
    h_prev = h;
  }
  return hs;
}

// dg_t = (dh_out_t + dh_next) * (1 - h_t^2) over the columns [n0, n1) of every row.
CHARLM_INLINE void rnn_gate_grad(const bf16* h, const bf16* dh_out, const float* dh_next, bf16* dg, int64_t B,
                                 int64_t H, int64_t n0, int64_t n1) {
  for (int64_t row = 0; row < B; ++row) {
    const int64_t base = row * H;
#pragma omp simd
    for (int64_t j = n0; j < n1; ++j) {
      const float hv = from_bf16(h[base + j]);
      dg[base + j] = to_bf16((from_bf16(dh_out[base + j]) + dh_next[base + j]) * (1.0f - hv * hv));
    }
  }
}

// Returns dg bf16 [T, B, H], dh0 fp32, dw_hh bf16.
std::tuple<Tensor, Tensor, Tensor> rnn_backward_bf16(const Tensor& dhs, const Tensor& dh_last, const Tensor& hs,
                                                     const Tensor& h0, const Tensor& w_hh) {
  const int64_t T = hs.size(0), B = hs.size(1), H = w_hh.size(1);
  Tensor dhs_c = dhs.to(at::kBFloat16).contiguous();
  Tensor dg = at::empty_like(hs);
  if (StepGemm::fits(H, H, T)) {
    // dh_{t-1} = dg_t W_hh, and dg_{t-1} follows from it column by column, in the same pass
    const StepGemm gemm(raw(w_hh.contiguous()), H, H, /*row_stride=*/H, /*column_stride=*/1);
    Tensor dh = dh_last.to(at::kFloat).contiguous().clone();
    const bf16 *hp = raw(hs), *dop = raw(dhs_c);
    bf16* dgp = raw_mut(dg);
    float* dhp = dh.data_ptr<float>();
    const int64_t step = B * H;
    rnn_gate_grad(hp + (T - 1) * step, dop + (T - 1) * step, dhp, dgp + (T - 1) * step, B, H, 0, H);
    for (int64_t t = T - 1; t >= 0; --t) {
      gemm.run(dgp + t * step, B, dhp, [&](int64_t n0, int64_t n1) {
        if (t > 0) rnn_gate_grad(hp + (t - 1) * step, dop + (t - 1) * step, dhp, dgp + (t - 1) * step, B, H, n0, n1);
      });
    }
    Tensor dw = dg.view({T * B, H}).t().mm(previous_states(h0, hs));
    return {dg, dh, dw};
  }
  Tensor dh_next = dh_last.to(at::kBFloat16).contiguous().clone();
  for (int64_t t = T - 1; t >= 0; --t) {
    Tensor dgt = dg[t], h = hs[t], dho = dhs_c[t];
    const bf16 *hp = raw(h), *dop = raw(dho), *dnp = raw(dh_next);
    bf16* dp = raw_mut(dgt);
    for_each_row(B, H, [&](int64_t row) {
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const int64_t k = row * H + j;
        const float hv = from_bf16(hp[k]);
        dp[k] = to_bf16((from_bf16(dop[k]) + from_bf16(dnp[k])) * (1.0f - hv * hv));
      }
    });
    at::mm_out(dh_next, dgt, w_hh);
  }
  Tensor dw = dg.view({T * B, H}).t().mm(previous_states(h0, hs));
  return {dg, dh_next.to(at::kFloat), dw};
}

// ---- GRU ----------------------------------------------------------------------------------
// r = sigmoid(gx_r + b_r + gh_r), z = sigmoid(gx_z + b_z + gh_z), n = tanh(gx_n + b_n + r * (gh_n + b_hn)),
// h = (1 - z) * n + z * h_prev: h is the state carried through time, so it stays fp32.

void gru_cell_forward(const bf16* gx, const float* bias, const bf16* gh, const float* b_hn, const float* h_prev,
                      float* acts, float* ghn, float* h, bf16* h_b, int64_t B, int64_t H) {
  for_each_row(B, 3 * H, [&](int64_t b) {
    const bf16* x = gx + b * 3 * H;
    const bf16* g = gh + b * 3 * H;
    const float* hp = h_prev + b * H;
    float* a = acts + b * 3 * H;
    float* gn = ghn + b * H;
    float* hb = h + b * H;
    bf16* hbb = h_b + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float r = sigmoid(from_bf16(x[j]) + bias[j] + from_bf16(g[j]));
      const float z = sigmoid(from_bf16(x[H + j]) + bias[H + j] + from_bf16(g[H + j]));
      const float hn = from_bf16(g[2 * H + j]) + b_hn[j];
      const float n = tanh_(from_bf16(x[2 * H + j]) + bias[2 * H + j] + r * hn);
      const float hv = (1.0f - z) * n + z * hp[j];
      a[j] = r; a[H + j] = z; a[2 * H + j] = n;
      gn[j] = hn;
      hb[j] = hv;
      hbb[j] = to_bf16(hv);
    }
  });
}

// dh = dh_out + dh_direct (fp32, z * dh of the step after) + dh_gemm (bf16, the GEMM over dgh).
void gru_cell_backward(const float* acts, const float* ghn, const float* h_prev, const bf16* dh_out,
                       const float* dh_direct_in, const bf16* dh_gemm, bf16* dgx, bf16* dgh, float* dh_direct_out,
                       float* dbn, int64_t B, int64_t H) {
  for_each_row(B, 3 * H, [&](int64_t b) {
    const float* a = acts + b * 3 * H;
    const float* gn = ghn + b * H;
    const float* hp = h_prev + b * H;
    const bf16* dho = dh_out + b * H;
    const float* ddi = dh_direct_in + b * H;
    const bf16* dgm = dh_gemm + b * H;
    bf16* dx = dgx + b * 3 * H;
    bf16* dhh = dgh + b * 3 * H;
    float* ddo = dh_direct_out + b * H;
    float* dn = dbn + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float r = a[j], z = a[H + j], n = a[2 * H + j];
      const float dh = from_bf16(dho[j]) + ddi[j] + from_bf16(dgm[j]);
      const float dpn = dh * (1.0f - z) * (1.0f - n * n);
      const float dpr = dpn * gn[j] * r * (1.0f - r);
      const float dpz = dh * (hp[j] - n) * z * (1.0f - z);
      dx[j] = to_bf16(dpr); dx[H + j] = to_bf16(dpz); dx[2 * H + j] = to_bf16(dpn);
      dhh[j] = to_bf16(dpr); dhh[H + j] = to_bf16(dpz); dhh[2 * H + j] = to_bf16(dpn * r);
      dn[j] = dpn * r;
      ddo[j] = dh * z;
    }
  });
}

// Returns hs bf16 [T, B, H] (the layer's output), hs fp32 (the state), acts fp32 [T, B, 3H], ghn fp32 [T, B, H].
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_forward_bf16(const Tensor& gx, const Tensor& bias, const Tensor& h0,
                                                            const Tensor& w_hh, const Tensor& b_hn) {
  check_bf16(gx, h0, w_hh, 3);
  const int64_t T = gx.size(0), B = gx.size(1), H = w_hh.size(1);
  const auto f32 = gx.options().dtype(at::kFloat);
  Tensor acts = at::empty({T, B, 3 * H}, f32), ghn = at::empty({T, B, H}, f32), hs = at::empty({T, B, H}, f32);
  Tensor hs_b = at::empty({T, B, H}, gx.options());
  Tensor gh = at::empty({B, 3 * H}, gx.options());
  const Tensor w_t = recurrent_operand(w_hh, T), b = bias.contiguous(), bn = b_hn.to(at::kFloat).contiguous();
  Tensor h_prev = h0.contiguous(), h_prev_b = h0.to(at::kBFloat16).contiguous();
  for (int64_t t = 0; t < T; ++t) {
    at::mm_out(gh, h_prev_b, w_t);
    Tensor x = gx[t], a = acts[t], gn = ghn[t], h = hs[t], hb = hs_b[t];
    gru_cell_forward(raw(x), b.data_ptr<float>(), raw(gh), bn.data_ptr<float>(), h_prev.data_ptr<float>(),
                     a.data_ptr<float>(), gn.data_ptr<float>(), h.data_ptr<float>(), raw_mut(hb), B, H);
    h_prev = h;
    h_prev_b = hb;
  }
  return {hs_b, hs, acts, ghn};
}

// Returns dgx bf16 [T, B, 3H], dh0 fp32, dw_hh bf16, db_hn fp32.
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_backward_bf16(const Tensor& dhs, const Tensor& dh_last,
                                                             const Tensor& acts, const Tensor& ghn, const Tensor& hs,
                                                             const Tensor& hs_b, const Tensor& h0,
                                                             const Tensor& w_hh) {
  const int64_t T = acts.size(0), B = acts.size(1), H = w_hh.size(1);
  Tensor dhs_c = dhs.to(at::kBFloat16).contiguous();
  Tensor dgx = at::empty({T, B, 3 * H}, hs_b.options()), dgh = at::empty({T, B, 3 * H}, hs_b.options());
  Tensor dbn = at::empty({T, B, H}, acts.options());
  Tensor direct = dh_last.to(at::kFloat).contiguous().clone(), direct_next = at::empty_like(direct);
  Tensor gemm = at::zeros({B, H}, hs_b.options());
  Tensor h0c = h0.contiguous();
  for (int64_t t = T - 1; t >= 0; --t) {
    Tensor h_prev = t > 0 ? hs[t - 1] : h0c;
    Tensor a = acts[t], gn = ghn[t], dho = dhs_c[t], dxt = dgx[t], dht = dgh[t], dnt = dbn[t];
    gru_cell_backward(a.data_ptr<float>(), gn.data_ptr<float>(), h_prev.data_ptr<float>(), raw(dho),
                      direct.data_ptr<float>(), raw(gemm), raw_mut(dxt), raw_mut(dht), direct_next.data_ptr<float>(),
                      dnt.data_ptr<float>(), B, H);
    at::mm_out(gemm, dht, w_hh);
    std::swap(direct, direct_next);
  }
  Tensor dw = dgh.view({T * B, 3 * H}).t().mm(previous_states(h0, hs_b));
  return {dgx, direct.add(gemm.to(at::kFloat)), dw, dbn.view({T * B, H}).sum(0)};
}

// ---- bias gradients ------------------------------------------------------------------------

// fp32 sums of the columns of a bf16 [N, C] matrix: a bias's gradient, summed over every step
// and row. at::sum(dtype=float) would first copy all N*C values to fp32 (a fresh 25 MB buffer
// at T*B = 4096, 4H = 1536: 3-6 ms per layer, 6% of a training step); here each thread sums its
// own block of columns straight from the bf16 values.
Tensor column_sums_bf16(const Tensor& m) {
  TORCH_CHECK(m.dim() == 2 && m.scalar_type() == at::kBFloat16, "column_sums_bf16 takes a bf16 [N, C] matrix");
  const Tensor mc = m.contiguous();
  const int64_t N = mc.size(0), C = mc.size(1);
  Tensor sums = at::zeros({C}, mc.options().dtype(at::kFloat));
  const bf16* src = raw(mc);
  float* out = sums.data_ptr<float>();
  at::parallel_for(0, C, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = 0; n < N; ++n) {
      const bf16* row = src + n * C;
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) out[j] += from_bf16(row[j]);
    }
  });
  return sums;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(charlm, m) {
  m.def("lstm_forward_bf16(Tensor gx, Tensor bias, Tensor h0, Tensor c0, Tensor w_hh) -> (Tensor, Tensor, Tensor)");
  m.def("lstm_backward_bf16(Tensor dhs, Tensor dh_last, Tensor dc_last, Tensor acts, Tensor cs, Tensor h0, "
        "Tensor c0, Tensor hs, Tensor w_hh) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rnn_forward_bf16(Tensor gx, Tensor bias, Tensor h0, Tensor w_hh) -> Tensor");
  m.def("rnn_backward_bf16(Tensor dhs, Tensor dh_last, Tensor hs, Tensor h0, Tensor w_hh) -> (Tensor, Tensor, Tensor)");
  m.def("gru_forward_bf16(Tensor gx, Tensor bias, Tensor h0, Tensor w_hh, Tensor b_hn) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("gru_backward_bf16(Tensor dhs, Tensor dh_last, Tensor acts, Tensor ghn, Tensor hs, Tensor hs_b, Tensor h0, "
        "Tensor w_hh) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("column_sums_bf16(Tensor m) -> Tensor");
}

TORCH_LIBRARY_IMPL(charlm, CPU, m) {
  m.impl("lstm_forward_bf16", &lstm_forward_bf16);
  m.impl("lstm_backward_bf16", &lstm_backward_bf16);
  m.impl("rnn_forward_bf16", &rnn_forward_bf16);
  m.impl("rnn_backward_bf16", &rnn_backward_bf16);
  m.impl("gru_forward_bf16", &gru_forward_bf16);
  m.impl("gru_backward_bf16", &gru_backward_bf16);
  m.impl("column_sums_bf16", &column_sums_bf16);
}
