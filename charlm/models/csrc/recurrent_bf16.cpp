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

#include "tile_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
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

// ---- the recurrent GEMM of one step: AMX tiles or vdpbf16ps (tile_gemm.h, step_gemm.h) -------
using BF16StepGemm = Bf16StepGemm;

// Which kernel the bf16 steps' GEMM runs on in this process, for `charlm doctor` and the tests.
std::string bf16_step_gemm() {
  switch (bf16_kernel()) {
    case Bf16Kernel::Tiles: return tiles_packed() ? "amx-tiles" : "brgemm";
    case Bf16Kernel::Dot: return "vdpbf16ps";
    default: return "aten";
  }
}

// ---- LSTM ---------------------------------------------------------------------------------

// One row's units [j0, j1) of a step. gh(g, j) is the recurrent GEMM's part of gate g of unit j:
// a bf16 [B, 4H] row from ATen's GEMM, or a packed fp32 panel from StepGemm.
template <typename GH>
CHARLM_INLINE void lstm_row_forward(const bf16* x, const float* bias, const GH& gh, const float* cp, float* a,
                                    float* cb, bf16* hb, int64_t H, int64_t j0, int64_t j1) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    const float i = sigmoid(from_bf16(x[j]) + bias[j] + gh(0, j));
    const float f = sigmoid(from_bf16(x[H + j]) + bias[H + j] + gh(1, j));
    const float gg = tanh_(from_bf16(x[2 * H + j]) + bias[2 * H + j] + gh(2, j));
    const float o = sigmoid(from_bf16(x[3 * H + j]) + bias[3 * H + j] + gh(3, j));
    const float cn = f * cp[j] + i * gg;
    a[j] = i; a[H + j] = f; a[2 * H + j] = gg; a[3 * H + j] = o;
    cb[j] = cn;
    hb[j] = to_bf16(o * tanh_(cn));
  }
}

// dh = dh_out + dh_next(j) (the GEMM over the step after's gate grads); dc in/out fp32.
template <typename DH>
CHARLM_INLINE void lstm_row_backward(const float* a, const float* cb, const float* cp, const bf16* dho,
                                     const DH& dh_next, float* dcb, bf16* d, int64_t H, int64_t j0, int64_t j1) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    const float i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
    const float dh = from_bf16(dho[j]) + dh_next(j);
    const float tc = tanh_(cb[j]);
    const float dct = dcb[j] + dh * o * (1.0f - tc * tc);
    d[j] = to_bf16(dct * g * i * (1.0f - i));
    d[H + j] = to_bf16(dct * cp[j] * f * (1.0f - f));
    d[2 * H + j] = to_bf16(dct * i * (1.0f - g * g));
    d[3 * H + j] = to_bf16(dh * tc * o * (1.0f - o));
    dcb[j] = dct * f;
  }
}

// The forward. For the backward (keep) it returns acts fp32 [T, B, 4H] (i f g o), hs bf16
// [T, B, H] and cs fp32 [T, B, H]. Without gradients (sampling, evaluation) acts and cs are
// only scratch, [1, B, 4H] and [2, B, H] reused step after step (kept, they are 20x the bytes
// of hs and their stores bound the step), and the last cell state is cs[(T - 1) % 2].
std::tuple<Tensor, Tensor, Tensor> lstm_steps_bf16(const Tensor& gx, const Tensor& bias, const Tensor& h0,
                                                   const Tensor& c0, const Tensor& w_hh, bool keep) {
  check_bf16(gx, h0, w_hh, 4);
  const int64_t T = gx.size(0), B = gx.size(1), H = w_hh.size(1), G = 4 * H;
  const auto f32 = gx.options().dtype(at::kFloat);
  Tensor acts = at::empty({keep ? T : 1, B, G}, f32), cs = at::empty({keep ? T : 2, B, H}, f32);
  Tensor hs = at::empty({T, B, H}, gx.options());
  auto a_at = [keep](int64_t t) { return keep ? t : 0; };
  auto c_at = [keep](int64_t t) { return keep ? t : t % 2; };
  const Tensor b = bias.contiguous(), c0c = c0.contiguous(), h0b = h0.to(at::kBFloat16).contiguous();
  const float* bp = b.data_ptr<float>();
  const bf16* xs = raw(gx);
  float *ap = acts.data_ptr<float>(), *cp = cs.data_ptr<float>();
  bf16* hp = raw_mut(hs);
  // the step t's row b: inputs, previous cell and outputs
  auto row = [&](int64_t t, int64_t r, int64_t j0, int64_t j1, const auto& gh) {
    const float* c_prev = t > 0 ? cp + c_at(t - 1) * B * H : c0c.data_ptr<float>();
    lstm_row_forward(xs + (t * B + r) * G, bp, gh, c_prev + r * H, ap + (a_at(t) * B + r) * G,
                     cp + (c_at(t) * B + r) * H, hp + (t * B + r) * H, H, j0, j1);
  };
  if (BF16StepGemm::fits(H, G, 4, T)) {
    const BF16StepGemm gemm(raw(w_hh.contiguous()), H, G, /*row_stride=*/1, /*column_stride=*/H, /*gates=*/4);
    Tensor acc = at::empty({B, G}, f32);
    float* accp = acc.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      gemm.run(t == 0 ? raw(h0b) : hp + (t - 1) * B * H, B, accp, [&](int64_t u0, int64_t u1) {
        for (int64_t r = 0; r < B; ++r) {
          const float* g = accp + r * G;
          row(t, r, u0, u1, [g, H](int k, int64_t j) { return g[k * H + j]; });
        }
      });
    }
    return {acts, hs, cs};
  }
  Tensor gh = at::empty({B, G}, gx.options());
  const Tensor w_t = recurrent_operand(w_hh, T);
  for (int64_t t = 0; t < T; ++t) {
    at::mm_out(gh, t == 0 ? h0b : hs[t - 1], w_t);
    const bf16* ghp = raw(gh);
    for_each_row(B, G, [&](int64_t r) {
      const bf16* g = ghp + r * G;
      row(t, r, 0, H, [g, H](int k, int64_t j) { return from_bf16(g[k * H + j]); });
    });
  }
  return {acts, hs, cs};
}

std::tuple<Tensor, Tensor, Tensor> lstm_forward_bf16(const Tensor& gx, const Tensor& bias, const Tensor& h0,
                                                     const Tensor& c0, const Tensor& w_hh) {
  return lstm_steps_bf16(gx, bias, h0, c0, w_hh, /*keep=*/true);
}

// Without gradients: returns hs bf16 [T, B, H] and the last cell state fp32 [B, H].
std::tuple<Tensor, Tensor> lstm_infer_bf16(const Tensor& gx, const Tensor& bias, const Tensor& h0, const Tensor& c0,
                                           const Tensor& w_hh) {
  auto [acts, hs, cs] = lstm_steps_bf16(gx, bias, h0, c0, w_hh, /*keep=*/false);
  return {hs, cs[(gx.size(0) - 1) % 2]};
}

// Returns dg bf16 [T, B, 4H] (the gate pre-activations' grads), dh0, dc0 (fp32) and dw_hh (bf16).
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_backward_bf16(const Tensor& dhs, const Tensor& dh_last,
                                                              const Tensor& dc_last, const Tensor& acts,
                                                              const Tensor& cs, const Tensor& h0, const Tensor& c0,
                                                              const Tensor& hs, const Tensor& w_hh) {
  const int64_t T = acts.size(0), B = acts.size(1), H = w_hh.size(1), G = 4 * H;
  Tensor dhs_c = dhs.to(at::kBFloat16).contiguous();
  Tensor dg = at::empty({T, B, G}, hs.options());
  Tensor dc = dc_last.to(at::kFloat).contiguous().clone();
  const Tensor c0c = c0.contiguous();
  const float *ap = acts.data_ptr<float>(), *cp = cs.data_ptr<float>();
  const bf16* dop = raw(dhs_c);
  bf16* dgp = raw_mut(dg);
  float* dcp = dc.data_ptr<float>();
  auto row = [&](int64_t t, int64_t r, int64_t j0, int64_t j1, const auto& dh_next) {
    const float* c_prev = t > 0 ? cp + (t - 1) * B * H : c0c.data_ptr<float>();
    lstm_row_backward(ap + (t * B + r) * G, cp + (t * B + r) * H, c_prev + r * H, dop + (t * B + r) * H, dh_next,
                      dcp + r * H, dgp + (t * B + r) * G, H, j0, j1);
  };
  if (BF16StepGemm::fits(G, H, 1, T)) {
    // dh_{t-1} = dg_t W_hh, then step t-1's cell backward on the same thread's units
    const BF16StepGemm gemm(raw(w_hh.contiguous()), G, H, /*row_stride=*/H, /*column_stride=*/1, /*gates=*/1);
    Tensor dh = dh_last.to(at::kFloat).contiguous().clone();
    float* dhp = dh.data_ptr<float>();
    for_each_row(B, G, [&](int64_t r) { row(T - 1, r, 0, H, [dhp, r, H](int64_t j) { return dhp[r * H + j]; }); });
    for (int64_t t = T - 1; t >= 0; --t) {
      gemm.run(dgp + t * B * G, B, dhp, [&](int64_t u0, int64_t u1) {
        if (t == 0) return;
        for (int64_t r = 0; r < B; ++r) row(t - 1, r, u0, u1, [dhp, r, H](int64_t j) { return dhp[r * H + j]; });
      });
    }
    Tensor dw = dg.view({T * B, G}).t().mm(previous_states(h0, hs));
    return {dg, dh, dc, dw};
  }
  Tensor dh_next = dh_last.to(at::kBFloat16).contiguous().clone();
  for (int64_t t = T - 1; t >= 0; --t) {
    const bf16* dnp = raw(dh_next);
    for_each_row(B, G, [&](int64_t r) { row(t, r, 0, H, [dnp, r, H](int64_t j) { return from_bf16(dnp[r * H + j]); }); });
    at::mm_out(dh_next, dg[t], w_hh);
  }
  Tensor dw = dg.view({T * B, G}).t().mm(previous_states(h0, hs));
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
  if (BF16StepGemm::fits(H, H, 1, T)) {
    // h_t = tanh(x_t + b + h_{t-1} W_hh^T): W_hh^T's element (k, n) is w_hh[n][k]
    const BF16StepGemm gemm(raw(w_hh.contiguous()), H, H, /*row_stride=*/1, /*column_stride=*/H, /*gates=*/1);
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
  if (BF16StepGemm::fits(H, H, 1, T)) {
    // dh_{t-1} = dg_t W_hh, and dg_{t-1} follows from it column by column, in the same pass
    const BF16StepGemm gemm(raw(w_hh.contiguous()), H, H, /*row_stride=*/H, /*column_stride=*/1, /*gates=*/1);
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

// One row's units [j0, j1) of a step; gh(g, j) as for the LSTM.
template <typename GH>
CHARLM_INLINE void gru_row_forward(const bf16* x, const float* bias, const GH& gh, const float* b_hn,
                                   const float* hp, float* a, float* gn, float* hb, bf16* hbb, int64_t H, int64_t j0,
                                   int64_t j1) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    const float r = sigmoid(from_bf16(x[j]) + bias[j] + gh(0, j));
    const float z = sigmoid(from_bf16(x[H + j]) + bias[H + j] + gh(1, j));
    const float hn = gh(2, j) + b_hn[j];
    const float n = tanh_(from_bf16(x[2 * H + j]) + bias[2 * H + j] + r * hn);
    const float hv = (1.0f - z) * n + z * hp[j];
    a[j] = r; a[H + j] = z; a[2 * H + j] = n;
    gn[j] = hn;
    hb[j] = hv;
    hbb[j] = to_bf16(hv);
  }
}

// dh = dh_out + dh_direct (fp32, z * dh of the step after) + dh_gemm(j) (the GEMM over dgh).
template <typename DH>
CHARLM_INLINE void gru_row_backward(const float* a, const float* gn, const float* hp, const bf16* dho,
                                    const float* ddi, const DH& dh_gemm, bf16* dx, bf16* dhh, float* ddo, float* dn,
                                    int64_t H, int64_t j0, int64_t j1) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    const float r = a[j], z = a[H + j], n = a[2 * H + j];
    const float dh = from_bf16(dho[j]) + ddi[j] + dh_gemm(j);
    const float dpn = dh * (1.0f - z) * (1.0f - n * n);
    const float dpr = dpn * gn[j] * r * (1.0f - r);
    const float dpz = dh * (hp[j] - n) * z * (1.0f - z);
    dx[j] = to_bf16(dpr); dx[H + j] = to_bf16(dpz); dx[2 * H + j] = to_bf16(dpn);
    dhh[j] = to_bf16(dpr); dhh[H + j] = to_bf16(dpz); dhh[2 * H + j] = to_bf16(dpn * r);
    dn[j] = dpn * r;
    ddo[j] = dh * z;
  }
}

// Returns hs bf16 [T, B, H] (the layer's output), hs fp32 (the state), acts fp32 [T, B, 3H], ghn fp32 [T, B, H].
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_forward_bf16(const Tensor& gx, const Tensor& bias, const Tensor& h0,
                                                            const Tensor& w_hh, const Tensor& b_hn) {
  check_bf16(gx, h0, w_hh, 3);
  const int64_t T = gx.size(0), B = gx.size(1), H = w_hh.size(1), G = 3 * H;
  const auto f32 = gx.options().dtype(at::kFloat);
  Tensor acts = at::empty({T, B, G}, f32), ghn = at::empty({T, B, H}, f32), hs = at::empty({T, B, H}, f32);
  Tensor hs_b = at::empty({T, B, H}, gx.options());
  const Tensor b = bias.contiguous(), bn = b_hn.to(at::kFloat).contiguous(), h0c = h0.contiguous();
  const Tensor h0b = h0.to(at::kBFloat16).contiguous();
  const float *bp = b.data_ptr<float>(), *bnp = bn.data_ptr<float>();
  const bf16* xs = raw(gx);
  float *ap = acts.data_ptr<float>(), *gnp = ghn.data_ptr<float>(), *hp = hs.data_ptr<float>();
  bf16* hbp = raw_mut(hs_b);
  auto row = [&](int64_t t, int64_t r, int64_t j0, int64_t j1, const auto& gh) {
    const float* h_prev = t > 0 ? hp + (t - 1) * B * H : h0c.data_ptr<float>();
    const int64_t at_h = (t * B + r) * H;
    gru_row_forward(xs + (t * B + r) * G, bp, gh, bnp, h_prev + r * H, ap + (t * B + r) * G, gnp + at_h, hp + at_h,
                    hbp + at_h, H, j0, j1);
  };
  if (BF16StepGemm::fits(H, G, 3, T)) {
    const BF16StepGemm gemm(raw(w_hh.contiguous()), H, G, /*row_stride=*/1, /*column_stride=*/H, /*gates=*/3);
    Tensor acc = at::empty({B, G}, f32);
    float* accp = acc.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      gemm.run(t == 0 ? raw(h0b) : hbp + (t - 1) * B * H, B, accp, [&](int64_t u0, int64_t u1) {
        for (int64_t r = 0; r < B; ++r) {
          const float* g = accp + r * G;
          row(t, r, u0, u1, [g, H](int k, int64_t j) { return g[k * H + j]; });
        }
      });
    }
    return {hs_b, hs, acts, ghn};
  }
  Tensor gh = at::empty({B, G}, gx.options());
  const Tensor w_t = recurrent_operand(w_hh, T);
  for (int64_t t = 0; t < T; ++t) {
    at::mm_out(gh, t == 0 ? h0b : hs_b[t - 1], w_t);
    const bf16* ghp = raw(gh);
    for_each_row(B, G, [&](int64_t r) {
      const bf16* g = ghp + r * G;
      row(t, r, 0, H, [g, H](int k, int64_t j) { return from_bf16(g[k * H + j]); });
    });
  }
  return {hs_b, hs, acts, ghn};
}

// Returns dgx bf16 [T, B, 3H], dh0 fp32, dw_hh bf16, db_hn fp32.
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_backward_bf16(const Tensor& dhs, const Tensor& dh_last,
                                                             const Tensor& acts, const Tensor& ghn, const Tensor& hs,
                                                             const Tensor& hs_b, const Tensor& h0,
                                                             const Tensor& w_hh) {
  const int64_t T = acts.size(0), B = acts.size(1), H = w_hh.size(1), G = 3 * H;
  Tensor dhs_c = dhs.to(at::kBFloat16).contiguous();
  Tensor dgx = at::empty({T, B, G}, hs_b.options()), dgh = at::empty({T, B, G}, hs_b.options());
  Tensor dbn = at::empty({T, B, H}, acts.options());
  // the direct path (z * dh) of each step, double-buffered: step t reads one and writes the other
  Tensor direct = dh_last.to(at::kFloat).contiguous().clone(), direct_next = at::empty_like(direct);
  const Tensor h0c = h0.contiguous();
  const float *ap = acts.data_ptr<float>(), *gnp = ghn.data_ptr<float>(), *hp = hs.data_ptr<float>();
  const bf16* dop = raw(dhs_c);
  bf16 *dxp = raw_mut(dgx), *dhp = raw_mut(dgh);
  float* dnp = dbn.data_ptr<float>();
  auto row = [&](int64_t t, int64_t r, int64_t j0, int64_t j1, const auto& dh_gemm) {
    const float* h_prev = t > 0 ? hp + (t - 1) * B * H : h0c.data_ptr<float>();
    const int64_t at_h = (t * B + r) * H, at_g = (t * B + r) * G;
    gru_row_backward(ap + at_g, gnp + at_h, h_prev + r * H, dop + at_h, direct.data_ptr<float>() + r * H, dh_gemm,
                     dxp + at_g, dhp + at_g, direct_next.data_ptr<float>() + r * H, dnp + at_h, H, j0, j1);
  };
  auto no_gemm = [](int64_t) { return 0.0f; };
  if (BF16StepGemm::fits(G, H, 1, T)) {
    const BF16StepGemm gemm(raw(w_hh.contiguous()), G, H, /*row_stride=*/H, /*column_stride=*/1, /*gates=*/1);
    Tensor dh = at::empty({B, H}, acts.options());
    float* dh_p = dh.data_ptr<float>();
    for_each_row(B, G, [&](int64_t r) { row(T - 1, r, 0, H, no_gemm); });
    for (int64_t t = T - 1; t >= 0; --t) {
      std::swap(direct, direct_next);
      gemm.run(dhp + t * B * G, B, dh_p, [&](int64_t u0, int64_t u1) {
        if (t == 0) return;
        for (int64_t r = 0; r < B; ++r) row(t - 1, r, u0, u1, [dh_p, r, H](int64_t j) { return dh_p[r * H + j]; });
      });
    }
    Tensor dw = dgh.view({T * B, G}).t().mm(previous_states(h0, hs_b));
    return {dgx, direct.add(dh), dw, dbn.view({T * B, H}).sum(0)};
  }
  Tensor gemm = at::zeros({B, H}, hs_b.options());
  for (int64_t t = T - 1; t >= 0; --t) {
    const bf16* gp = raw(gemm);
    if (t == T - 1) {
      for_each_row(B, G, [&](int64_t r) { row(t, r, 0, H, no_gemm); });
    } else {
      for_each_row(B, G, [&](int64_t r) { row(t, r, 0, H, [gp, r, H](int64_t j) { return from_bf16(gp[r * H + j]); }); });
    }
    at::mm_out(gemm, dgh[t], w_hh);
    std::swap(direct, direct_next);
  }
  Tensor dw = dgh.view({T * B, G}).t().mm(previous_states(h0, hs_b));
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
  m.def("lstm_infer_bf16(Tensor gx, Tensor bias, Tensor h0, Tensor c0, Tensor w_hh) -> (Tensor, Tensor)");
  m.def("lstm_backward_bf16(Tensor dhs, Tensor dh_last, Tensor dc_last, Tensor acts, Tensor cs, Tensor h0, "
        "Tensor c0, Tensor hs, Tensor w_hh) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rnn_forward_bf16(Tensor gx, Tensor bias, Tensor h0, Tensor w_hh) -> Tensor");
  m.def("rnn_backward_bf16(Tensor dhs, Tensor dh_last, Tensor hs, Tensor h0, Tensor w_hh) -> (Tensor, Tensor, Tensor)");
  m.def("gru_forward_bf16(Tensor gx, Tensor bias, Tensor h0, Tensor w_hh, Tensor b_hn) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("gru_backward_bf16(Tensor dhs, Tensor dh_last, Tensor acts, Tensor ghn, Tensor hs, Tensor hs_b, Tensor h0, "
        "Tensor w_hh) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("column_sums_bf16(Tensor m) -> Tensor");
  m.def("bf16_step_gemm() -> str", &bf16_step_gemm);
}

TORCH_LIBRARY_IMPL(charlm, CPU, m) {
  m.impl("lstm_forward_bf16", &lstm_forward_bf16);
  m.impl("lstm_infer_bf16", &lstm_infer_bf16);
  m.impl("lstm_backward_bf16", &lstm_backward_bf16);
  m.impl("rnn_forward_bf16", &rnn_forward_bf16);
  m.impl("rnn_backward_bf16", &rnn_backward_bf16);
  m.impl("gru_forward_bf16", &gru_forward_bf16);
  m.impl("gru_backward_bf16", &gru_backward_bf16);
  m.impl("column_sums_bf16", &column_sums_bf16);
}
