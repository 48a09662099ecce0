// The native step loops of charlm's RNN, LSTM and GRU layers: forward over T steps and the
// hand-written backward, on the CPU. Registered as torch.ops.charlm.* (no pybind).
//
// Shapes: T time, B batch, H hidden, G gates (RNN 1, LSTM 4 in order i f g o, GRU 3 in order
// r z n). gx [T, B, G*H] holds the input side of every step, W_ih x_t + biases, computed by
// the caller in one matmul. Per step the loop does one [B, H] x [H, G*H] matmul into a
// preallocated buffer and one fused pass over the gates; the backward does one fused pass and
// one [B, G*H] x [G*H, H] matmul per step, and the weight gradient of all T steps in a single
// matmul at the end. The equations are those of charlm/cells.py (the readable reference).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "step_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

using at::Tensor;

namespace {

// exp for float: Cody-Waite range reduction and a degree-6 polynomial (relative error ~2e-7,
// float's own precision). Unlike a libm call it inlines, so gcc vectorises the gate loops
// fully. double keeps std::exp: the float64 tests compare to 1e-10.
// The clamp keeps 2^n representable. It is written with comparisons, which are false for NaN,
// so a NaN passes through (fmin/fmax would replace it by the bound) and comes out NaN, as in
// torch's kernels; +-Inf clamp to the bounds, where sigmoid and tanh saturate as torch's do.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;  // x - n ln2, in two parts
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + fast_exp(-x)); }

template <typename T>
inline T tanh_(T x) { return T(1) - T(2) / (fast_exp(T(2) * x) + T(1)); }
inline double tanh_(double x) { return std::tanh(x); }

// Runs row(b) for every batch row b, split across threads when each part has enough work
// (about 32k gate values) to pay for waking a thread; MKL's threads would only spin meanwhile.
template <typename F>
void for_each_row(int64_t B, int64_t values_per_row, const F& row) {
  const int64_t grain = std::max<int64_t>(1, 32768 / values_per_row);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) row(b);
  });
}

// ---- LSTM ---------------------------------------------------------------------------------

// One row's units [j0, j1). row: gate pre-activations [4H] (the input part, W_ih x_t + b),
// overwritten with the activations i f g o; gh(g, j) is the recurrent part still to add (0 when
// ATen's GEMM has already added it in place).
template <typename T, typename GH>
inline void lstm_row_forward(T* row, const T* cp, T* hb, T* cb, int64_t H, int64_t j0, int64_t j1, const GH& gh) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    T i = sigmoid(row[j] + gh(0, j)), f = sigmoid(row[H + j] + gh(1, j)), g = tanh_(row[2 * H + j] + gh(2, j));
    T o = sigmoid(row[3 * H + j] + gh(3, j));
    T cn = f * cp[j] + i * g;
    row[j] = i; row[H + j] = f; row[2 * H + j] = g; row[3 * H + j] = o;
    cb[j] = cn;
    hb[j] = o * tanh_(cn);
  }
}

// One row back over units [j0, j1): dh = dh_out + dh_next(j) (the grad of h_t from the step
// after), dc (in/out) becomes the grad of c_{t-1}; writes the gate pre-activation grads drow [4H].
template <typename T, typename DH>
inline void lstm_row_backward(const T* row, const T* cb, const T* cp, const T* dho, const DH& dh_next, T* dcb,
                              T* drow, int64_t H, int64_t j0, int64_t j1) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    T i = row[j], f = row[H + j], g = row[2 * H + j], o = row[3 * H + j];
    T dh = dho[j] + dh_next(j);
    T tc = tanh_(cb[j]);
    T dct = dcb[j] + dh * o * (T(1) - tc * tc);
    drow[j] = dct * g * i * (T(1) - i);
    drow[H + j] = dct * cp[j] * f * (T(1) - f);
    drow[2 * H + j] = dct * i * (T(1) - g * g);
    drow[3 * H + j] = dh * tc * o * (T(1) - o);
    dcb[j] = dct * f;
  }
}

template <typename T>
struct Zero {
  T operator()(int, int64_t) const { return T(0); }
};

void check_inputs(const Tensor& gx, const Tensor& h0, const Tensor& w_hh, int64_t gates) {
  TORCH_CHECK(gx.dim() == 3 && gx.is_contiguous(), "gx must be a contiguous [T, B, G*H] tensor");
  TORCH_CHECK(gx.device().is_cpu(), "the native step loop runs on the CPU");
  const int64_t H = w_hh.size(1);
  TORCH_CHECK(w_hh.size(0) == gates * H && gx.size(2) == gates * H, "gate sizes do not match");
  TORCH_CHECK(h0.size(0) == gx.size(1) && h0.size(1) == H, "state must be [B, H]");
}

// W_hh^T as the per-step GEMM operand [H, G*H]. A contiguous copy makes each step's GEMM
// ~20% faster, which pays for the copy over a long window but not over one step (generation).
Tensor recurrent_operand(const Tensor& w_hh, int64_t steps) {
  return steps >= 16 ? w_hh.t().contiguous() : w_hh.t();
}

// Previous hidden states of every step: [h0, h_0 .. h_{T-2}] as [T*B, H], for dW_hh in one matmul.
Tensor previous_states(const Tensor& h0, const Tensor& hs) {
  const int64_t T = hs.size(0);
  return at::cat({h0.unsqueeze(0), hs.narrow(0, 0, T - 1)}, 0).view({-1, hs.size(2)});
}

// The packed step GEMM where it applies (fp32 with AVX512 or AVX2, see step_gemm.h); double never.
template <typename T>
constexpr bool packable() { return std::is_same<T, float>::value; }

// The forward over T steps for one dtype: gates (in/out) as lstm_forward, hs and cs filled.
template <typename T>
void lstm_forward_steps(Tensor& gates, const Tensor& h0, const Tensor& c0, const Tensor& w_hh, Tensor& hs, Tensor& cs) {
  const int64_t steps = gates.size(0), B = gates.size(1), H = w_hh.size(1), G = 4 * H;
  const Tensor h0c = h0.contiguous(), c0c = c0.contiguous();
  T *ap = gates.data_ptr<T>(), *hp = hs.data_ptr<T>(), *cp = cs.data_ptr<T>();
  auto row = [&](int64_t t, int64_t r, int64_t j0, int64_t j1, const auto& gh) {
    const T* c_prev = t > 0 ? cp + (t - 1) * B * H : c0c.data_ptr<T>();
    const int64_t at = t * B + r;
    lstm_row_forward(ap + at * G, c_prev + r * H, hp + at * H, cp + at * H, H, j0, j1, gh);
  };
  if constexpr (packable<T>()) {
    if (StepGemm<T>::fits(H, G, 4, steps)) {
      const StepGemm<T> gemm(w_hh.contiguous().data_ptr<T>(), H, G, /*row_stride=*/1, /*column_stride=*/H, 4);
      Tensor acc = at::empty({B, G}, gates.options());
      T* accp = acc.data_ptr<T>();
      for (int64_t t = 0; t < steps; ++t) {
        gemm.run(t == 0 ? h0c.data_ptr<T>() : hp + (t - 1) * B * H, B, accp, [&](int64_t u0, int64_t u1) {
          for (int64_t r = 0; r < B; ++r) {
            const T* g = accp + r * G;
            row(t, r, u0, u1, [g, H](int k, int64_t j) { return g[k * H + j]; });
          }
        });
      }
      return;
    }
  }
  const Tensor w_t = recurrent_operand(w_hh, steps);
  for (int64_t t = 0; t < steps; ++t) {
    Tensor a = gates[t];
    a.addmm_(t == 0 ? h0c : hs[t - 1], w_t);  // in place: no copy of the input part
    for_each_row(B, G, [&](int64_t r) { row(t, r, 0, H, Zero<T>()); });
  }
}

// gates [T, B, 4H] holds W_ih x_t + b on entry and the gate activations i f g o on return.
std::tuple<Tensor, Tensor> lstm_forward(Tensor gates, const Tensor& h0, const Tensor& c0, const Tensor& w_hh) {
  check_inputs(gates, h0, w_hh, 4);
  const int64_t T = gates.size(0), B = gates.size(1), H = w_hh.size(1);
  Tensor hs = at::empty({T, B, H}, gates.options());
  Tensor cs = at::empty({T, B, H}, gates.options());
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_forward",
                             [&] { lstm_forward_steps<scalar_t>(gates, h0, c0, w_hh, hs, cs); });
  return {hs, cs};
}

// The backward for one dtype: fills dg [T, B, 4H], dh (grad of h, ends as dh0) and dc (ends as dc0).
template <typename T>
void lstm_backward_steps(const Tensor& dhs, const Tensor& acts, const Tensor& cs, const Tensor& c0,
                         const Tensor& w_hh, Tensor& dg, Tensor& dh, Tensor& dc) {
  const int64_t steps = acts.size(0), B = acts.size(1), H = w_hh.size(1), G = 4 * H;
  const Tensor c0c = c0.contiguous();
  const T *ap = acts.data_ptr<T>(), *cp = cs.data_ptr<T>(), *dop = dhs.data_ptr<T>();
  T *dgp = dg.data_ptr<T>(), *dhp = dh.data_ptr<T>(), *dcp = dc.data_ptr<T>();
  auto row = [&](int64_t t, int64_t r, int64_t j0, int64_t j1) {
    const T* c_prev = t > 0 ? cp + (t - 1) * B * H : c0c.data_ptr<T>();
    const T* dn = dhp + r * H;
    const int64_t at = t * B + r;
    lstm_row_backward(ap + at * G, cp + at * H, c_prev + r * H, dop + at * H, [dn](int64_t j) { return dn[j]; },
                      dcp + r * H, dgp + at * G, H, j0, j1);
  };
  if constexpr (packable<T>()) {
    if (StepGemm<T>::fits(G, H, 1, steps)) {
      // dh_{t-1} = dg_t W_hh, then step t-1's cell backward on the same thread's units
      const StepGemm<T> gemm(w_hh.contiguous().data_ptr<T>(), G, H, /*row_stride=*/H, /*column_stride=*/1, 1);
      for_each_row(B, G, [&](int64_t r) { row(steps - 1, r, 0, H); });
      for (int64_t t = steps - 1; t >= 0; --t) {
        gemm.run(dgp + t * B * G, B, dhp, [&](int64_t u0, int64_t u1) {
          for (int64_t r = 0; t > 0 && r < B; ++r) row(t - 1, r, u0, u1);
        });
      }
      return;
    }
  }
  for (int64_t t = steps - 1; t >= 0; --t) {
    for_each_row(B, G, [&](int64_t r) { row(t, r, 0, H); });
    at::mm_out(dh, dg[t], w_hh);
  }
}

// Returns grads of gx, h0, c0 and w_hh.
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_backward(const Tensor& dhs, const Tensor& dh_last, const Tensor& dc_last,
                                                         const Tensor& acts, const Tensor& hs, const Tensor& cs,
                                                         const Tensor& h0, const Tensor& c0, const Tensor& w_hh) {
  const int64_t H = w_hh.size(1);
  Tensor dg = at::empty_like(acts);  // [T, B, 4H]
  Tensor dh = dh_last.contiguous().clone();
  Tensor dc = dc_last.contiguous().clone();
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstm_backward", [&] {
    lstm_backward_steps<scalar_t>(dhs.contiguous(), acts, cs, c0, w_hh, dg, dh, dc);
  });
  Tensor dw = dg.view({-1, 4 * H}).t().mm(previous_states(h0, hs));
  return {dg, dh, dc, dw};
}

// ---- RNN (tanh) ---------------------------------------------------------------------------

// h_t = tanh(gates_t + gh(j)) in place over one row's units [j0, j1).
template <typename T, typename GH>
inline void rnn_row_forward(T* x, int64_t j0, int64_t j1, const GH& gh) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) x[j] = tanh_(x[j] + gh(j));
}

// dg = (dh_out + dh_next) * (1 - h^2) over one row's units [j0, j1).
template <typename T>
inline void rnn_row_backward(const T* h, const T* dh_out, const T* dh_next, T* dg, int64_t j0, int64_t j1) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) dg[j] = (dh_out[j] + dh_next[j]) * (T(1) - h[j] * h[j]);
}

template <typename T>
void rnn_forward_steps(Tensor& gates, const Tensor& h0, const Tensor& w_hh) {
  const int64_t steps = gates.size(0), B = gates.size(1), H = w_hh.size(1);
  const Tensor h0c = h0.contiguous();
  T* gp = gates.data_ptr<T>();
  if constexpr (packable<T>()) {
    if (StepGemm<T>::fits(H, H, 1, steps)) {
      const StepGemm<T> gemm(w_hh.contiguous().data_ptr<T>(), H, H, /*row_stride=*/1, /*column_stride=*/H, 1);
      Tensor acc = at::empty({B, H}, gates.options());
      T* accp = acc.data_ptr<T>();
      for (int64_t t = 0; t < steps; ++t) {
        T* x = gp + t * B * H;
        gemm.run(t == 0 ? h0c.data_ptr<T>() : x - B * H, B, accp, [&](int64_t u0, int64_t u1) {
          for (int64_t r = 0; r < B; ++r) {
            const T* g = accp + r * H;
            rnn_row_forward(x + r * H, u0, u1, [g](int64_t j) { return g[j]; });
          }
        });
      }
      return;
    }
  }
  const Tensor w_t = recurrent_operand(w_hh, steps);
  for (int64_t t = 0; t < steps; ++t) {
    Tensor h = gates[t];
    h.addmm_(t == 0 ? h0c : gates[t - 1], w_t);
    rnn_row_forward(h.data_ptr<T>(), 0, B * H, [](int64_t) { return T(0); });
  }
}

// gates [T, B, H] holds W_ih x_t + b on entry and h_t on return (it becomes the output).
Tensor rnn_forward(Tensor gates, const Tensor& h0, const Tensor& w_hh) {
  check_inputs(gates, h0, w_hh, 1);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "rnn_forward", [&] { rnn_forward_steps<scalar_t>(gates, h0, w_hh); });
  return gates;
}

template <typename T>
void rnn_backward_steps(const Tensor& dhs, const Tensor& hs, const Tensor& w_hh, Tensor& dg, Tensor& dh) {
  const int64_t steps = hs.size(0), B = hs.size(1), H = w_hh.size(1), n = B * H;
  const T *hp = hs.data_ptr<T>(), *dop = dhs.data_ptr<T>();
  T *dgp = dg.data_ptr<T>(), *dhp = dh.data_ptr<T>();
  if constexpr (packable<T>()) {
    if (StepGemm<T>::fits(H, H, 1, steps)) {
      // dh_{t-1} = dg_t W_hh, and dg_{t-1} follows from it column by column, in the same pass
      const StepGemm<T> gemm(w_hh.contiguous().data_ptr<T>(), H, H, /*row_stride=*/H, /*column_stride=*/1, 1);
      rnn_row_backward(hp + (steps - 1) * n, dop + (steps - 1) * n, dhp, dgp + (steps - 1) * n, 0, n);
      for (int64_t t = steps - 1; t >= 0; --t) {
        gemm.run(dgp + t * n, B, dhp, [&](int64_t u0, int64_t u1) {
          for (int64_t r = 0; t > 0 && r < B; ++r) {
            const int64_t at = (t - 1) * n + r * H;
            rnn_row_backward(hp + at, dop + at, dhp + r * H, dgp + at, u0, u1);
          }
        });
      }
      return;
    }
  }
  for (int64_t t = steps - 1; t >= 0; --t) {
    rnn_row_backward(hp + t * n, dop + t * n, dhp, dgp + t * n, 0, n);
    at::mm_out(dh, dg[t], w_hh);
  }
}

std::tuple<Tensor, Tensor, Tensor> rnn_backward(const Tensor& dhs, const Tensor& dh_last, const Tensor& hs,
                                                const Tensor& h0, const Tensor& w_hh) {
  const int64_t H = w_hh.size(1);
  Tensor dg = at::empty_like(hs);
  Tensor dh = dh_last.contiguous().clone();
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "rnn_backward",
                             [&] { rnn_backward_steps<scalar_t>(dhs.contiguous(), hs.contiguous(), w_hh, dg, dh); });
  Tensor dw = dg.view({-1, H}).t().mm(previous_states(h0, hs));
  return {dg, dh, dw};
}

// ---- GRU ----------------------------------------------------------------------------------
// r = sigmoid(gx_r + gh_r), z = sigmoid(gx_z + gh_z), n = tanh(gx_n + r * gh_n),
// h = (1 - z) * n + z * h_prev, with gh = W_hh h_prev + [0, 0, b_hn] (b_hn stays inside r * ...).

// One row's units [j0, j1): x the input part [3H], gh(g, j) the recurrent part with b_hn in gate n.
template <typename T, typename GH>
inline void gru_row_forward(const T* x, const GH& gh, const T* hp, T* row, T* gn, T* hb, int64_t H, int64_t j0,
                            int64_t j1) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    T r = sigmoid(x[j] + gh(0, j)), z = sigmoid(x[H + j] + gh(1, j));
    T hn = gh(2, j);
    T n = tanh_(x[2 * H + j] + r * hn);
    row[j] = r; row[H + j] = z; row[2 * H + j] = n;
    gn[j] = hn;
    hb[j] = (T(1) - z) * n + z * hp[j];
  }
}

// One row back over units [j0, j1): dh = dh_out + dh_next(j); writes the input-side grads dx [3H],
// hidden-side grads dhh [3H] and the direct path dd = dh * z [H] (dd may be where dh_next reads:
// each j is read before it is written).
template <typename T, typename DH>
inline void gru_row_backward(const T* row, const T* gn, const T* hp, const T* dho, const DH& dh_next, T* dx, T* dhh,
                             T* dd, int64_t H, int64_t j0, int64_t j1) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    T r = row[j], z = row[H + j], n = row[2 * H + j];
    T dh = dho[j] + dh_next(j);
    T dpn = dh * (T(1) - z) * (T(1) - n * n);
    T dpr = dpn * gn[j] * r * (T(1) - r);
    T dpz = dh * (hp[j] - n) * z * (T(1) - z);
    dx[j] = dpr; dx[H + j] = dpz; dx[2 * H + j] = dpn;
    dhh[j] = dpr; dhh[H + j] = dpz; dhh[2 * H + j] = dpn * r;
    dd[j] = dh * z;
  }
}

template <typename T>
void gru_forward_steps(const Tensor& gx, const Tensor& h0, const Tensor& w_hh, const Tensor& b_hn, Tensor& hs,
                       Tensor& acts, Tensor& ghn) {
  const int64_t steps = gx.size(0), B = gx.size(1), H = w_hh.size(1), G = 3 * H;
  const Tensor h0c = h0.contiguous(), bn = b_hn.contiguous();
  const T *xp = gx.data_ptr<T>(), *bnp = bn.data_ptr<T>();
  T *hp = hs.data_ptr<T>(), *ap = acts.data_ptr<T>(), *gnp = ghn.data_ptr<T>();
  auto row = [&](int64_t t, int64_t r, int64_t j0, int64_t j1, const auto& gh) {
    const T* h_prev = t > 0 ? hp + (t - 1) * B * H : h0c.data_ptr<T>();
    const int64_t at = t * B + r;
    gru_row_forward(xp + at * G, gh, h_prev + r * H, ap + at * G, gnp + at * H, hp + at * H, H, j0, j1);
  };
  if constexpr (packable<T>()) {
    if (StepGemm<T>::fits(H, G, 3, steps)) {
      const StepGemm<T> gemm(w_hh.contiguous().data_ptr<T>(), H, G, /*row_stride=*/1, /*column_stride=*/H, 3);
      Tensor acc = at::empty({B, G}, gx.options());
      T* accp = acc.data_ptr<T>();
      for (int64_t t = 0; t < steps; ++t) {
        gemm.run(t == 0 ? h0c.data_ptr<T>() : hp + (t - 1) * B * H, B, accp, [&](int64_t u0, int64_t u1) {
          for (int64_t r = 0; r < B; ++r) {
            const T* g = accp + r * G;
            row(t, r, u0, u1, [g, bnp, H](int k, int64_t j) { return g[k * H + j] + (k == 2 ? bnp[j] : T(0)); });
          }
        });
      }
      return;
    }
  }
  Tensor gh = at::empty({B, G}, gx.options());
  Tensor bias = at::cat({at::zeros({2 * H}, gx.options()), bn});
  const Tensor w_t = recurrent_operand(w_hh, steps);
  const T* ghp = gh.data_ptr<T>();
  for (int64_t t = 0; t < steps; ++t) {
    at::addmm_out(gh, bias, t == 0 ? h0c : hs[t - 1], w_t);
    for_each_row(B, G, [&](int64_t r) {
      const T* g = ghp + r * G;
      row(t, r, 0, H, [g, H](int k, int64_t j) { return g[k * H + j]; });
    });
  }
}

std::tuple<Tensor, Tensor, Tensor> gru_forward(const Tensor& gx, const Tensor& h0, const Tensor& w_hh, const Tensor& b_hn) {
  check_inputs(gx, h0, w_hh, 3);
  const int64_t T = gx.size(0), B = gx.size(1), H = w_hh.size(1);
  Tensor acts = at::empty_like(gx);  // [T, B, 3H]: r, z, n
  Tensor ghn = at::empty({T, B, H}, gx.options());
  Tensor hs = at::empty({T, B, H}, gx.options());
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "gru_forward",
                             [&] { gru_forward_steps<scalar_t>(gx, h0, w_hh, b_hn, hs, acts, ghn); });
  return {hs, acts, ghn};
}

// Fills dgx, dgh [T, B, 3H] and returns the grad of h0.
template <typename T>
Tensor gru_backward_steps(const Tensor& dhs, const Tensor& dh_last, const Tensor& acts, const Tensor& ghn,
                          const Tensor& hs, const Tensor& h0, const Tensor& w_hh, Tensor& dgx, Tensor& dgh) {
  const int64_t steps = acts.size(0), B = acts.size(1), H = w_hh.size(1), G = 3 * H;
  const Tensor h0c = h0.contiguous();
  const T *ap = acts.data_ptr<T>(), *gnp = ghn.data_ptr<T>(), *hp = hs.data_ptr<T>(), *dop = dhs.data_ptr<T>();
  T *dxp = dgx.data_ptr<T>(), *dhp = dgh.data_ptr<T>();
  Tensor direct = at::empty({B, H}, acts.options());  // dh * z of the step after: its share of dh_{t-1}
  T* ddp = direct.data_ptr<T>();
  auto row = [&](int64_t t, int64_t r, int64_t j0, int64_t j1, const auto& dh_next) {
    const T* h_prev = t > 0 ? hp + (t - 1) * B * H : h0c.data_ptr<T>();
    const int64_t at = t * B + r;
    gru_row_backward(ap + at * G, gnp + at * H, h_prev + r * H, dop + at * H, dh_next, dxp + at * G, dhp + at * G,
                     ddp + r * H, H, j0, j1);
  };
  Tensor dh = dh_last.contiguous().clone();
  T* dnp = dh.data_ptr<T>();
  if constexpr (packable<T>()) {
    if (StepGemm<T>::fits(G, H, 1, steps)) {
      // dh_{t-1} = direct + dgh_t W_hh, then step t-1's cell backward on the same thread's units
      const StepGemm<T> gemm(w_hh.contiguous().data_ptr<T>(), G, H, /*row_stride=*/H, /*column_stride=*/1, 1);
      Tensor acc = at::empty({B, H}, acts.options());
      T* accp = acc.data_ptr<T>();
      for_each_row(B, G, [&](int64_t r) {
        const T* d = dnp + r * H;
        row(steps - 1, r, 0, H, [d](int64_t j) { return d[j]; });
      });
      for (int64_t t = steps - 1; t >= 0; --t) {
        gemm.run(dhp + t * B * G, B, accp, [&](int64_t u0, int64_t u1) {
          for (int64_t r = 0; t > 0 && r < B; ++r) {
            const T *d = ddp + r * H, *g = accp + r * H;
            row(t - 1, r, u0, u1, [d, g](int64_t j) { return d[j] + g[j]; });
          }
        });
      }
      return direct.add_(acc);
    }
  }
  for (int64_t t = steps - 1; t >= 0; --t) {
    for_each_row(B, G, [&](int64_t r) {
      const T* d = dnp + r * H;
      row(t, r, 0, H, [d](int64_t j) { return d[j]; });
    });
    at::addmm_out(dh, direct, dgh[t], w_hh);
  }
  return dh;
}

// Returns grads of gx, h0, w_hh and b_hn.
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_backward(const Tensor& dhs, const Tensor& dh_last, const Tensor& acts,
                                                        const Tensor& ghn, const Tensor& hs, const Tensor& h0,
                                                        const Tensor& w_hh) {
  const int64_t H = w_hh.size(1);
  Tensor dgx = at::empty_like(acts);
  Tensor dgh = at::empty_like(acts);
  Tensor dh0;
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "gru_backward", [&] {
    dh0 = gru_backward_steps<scalar_t>(dhs.contiguous(), dh_last, acts, ghn, hs, h0, w_hh, dgx, dgh);
  });
  Tensor flat = dgh.view({-1, 3 * H});
  Tensor dw = flat.t().mm(previous_states(h0, hs));
  Tensor db_hn = flat.narrow(1, 2 * H, H).sum(0);
  return {dgx, dh0, dw, db_hn};
}

}  // namespace

TORCH_LIBRARY(charlm, m) {
  m.def("lstm_forward(Tensor(a!) gates, Tensor h0, Tensor c0, Tensor w_hh) -> (Tensor, Tensor)");
  m.def("lstm_backward(Tensor dhs, Tensor dh_last, Tensor dc_last, Tensor acts, Tensor hs, Tensor cs, Tensor h0, "
        "Tensor c0, Tensor w_hh) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rnn_forward(Tensor(a!) gates, Tensor h0, Tensor w_hh) -> Tensor(a!)");
  m.def("rnn_backward(Tensor dhs, Tensor dh_last, Tensor hs, Tensor h0, Tensor w_hh) -> (Tensor, Tensor, Tensor)");
  m.def("gru_forward(Tensor gx, Tensor h0, Tensor w_hh, Tensor b_hn) -> (Tensor, Tensor, Tensor)");
  m.def("gru_backward(Tensor dhs, Tensor dh_last, Tensor acts, Tensor ghn, Tensor hs, Tensor h0, Tensor w_hh) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(charlm, CPU, m) {
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
  m.impl("rnn_forward", &rnn_forward);
  m.impl("rnn_backward", &rnn_backward);
  m.impl("gru_forward", &gru_forward);
  m.impl("gru_backward", &gru_backward);
}
