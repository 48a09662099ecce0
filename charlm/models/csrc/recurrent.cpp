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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

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

// a: gate pre-activations [B, 4H], overwritten with activations i f g o.
template <typename T>
void lstm_cell_forward(T* a, const T* c_prev, T* h, T* c, int64_t B, int64_t H) {
  for_each_row(B, 4 * H, [&](int64_t b) {
    T* row = a + b * 4 * H;
    const T* cp = c_prev + b * H;
    T* hb = h + b * H;
    T* cb = c + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      T i = sigmoid(row[j]), f = sigmoid(row[H + j]), g = tanh_(row[2 * H + j]), o = sigmoid(row[3 * H + j]);
      T cn = f * cp[j] + i * g;
      row[j] = i; row[H + j] = f; row[2 * H + j] = g; row[3 * H + j] = o;
      cb[j] = cn;
      hb[j] = o * tanh_(cn);
    }
  });
}

// One step back: dh = grad of h_t (from the output and from step t+1), dc = grad of c_t (in/out:
// becomes grad of c_{t-1}). Writes the gate pre-activation grads into dg [B, 4H].
template <typename T>
void lstm_cell_backward(const T* a, const T* c, const T* c_prev, const T* dh_out, const T* dh_next, T* dc,
                        T* dg, int64_t B, int64_t H) {
  for_each_row(B, 4 * H, [&](int64_t b) {
    const T* row = a + b * 4 * H;
    T* drow = dg + b * 4 * H;
    const T* cb = c + b * H;
    const T* cp = c_prev + b * H;
    const T* dho = dh_out + b * H;
    const T* dhn = dh_next + b * H;
    T* dcb = dc + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      T i = row[j], f = row[H + j], g = row[2 * H + j], o = row[3 * H + j];
      T dh = dho[j] + dhn[j];
      T tc = tanh_(cb[j]);
      T dct = dcb[j] + dh * o * (T(1) - tc * tc);
      drow[j] = dct * g * i * (T(1) - i);
      drow[H + j] = dct * cp[j] * f * (T(1) - f);
      drow[2 * H + j] = dct * i * (T(1) - g * g);
      drow[3 * H + j] = dh * tc * o * (T(1) - o);
      dcb[j] = dct * f;
    }
  });
}

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

// gates [T, B, 4H] holds W_ih x_t + b on entry and the gate activations i f g o on return.
std::tuple<Tensor, Tensor> lstm_forward(Tensor gates, const Tensor& h0, const Tensor& c0, const Tensor& w_hh) {
  check_inputs(gates, h0, w_hh, 4);
  const int64_t T = gates.size(0), B = gates.size(1), H = w_hh.size(1);
  Tensor hs = at::empty({T, B, H}, gates.options());
  Tensor cs = at::empty({T, B, H}, gates.options());
  const Tensor w_t = recurrent_operand(w_hh, T);
  Tensor h_prev = h0.contiguous(), c_prev = c0.contiguous();
  for (int64_t t = 0; t < T; ++t) {
    Tensor a = gates[t];
    a.addmm_(h_prev, w_t);  // in place: no copy of the input part
    Tensor h = hs[t], c = cs[t];
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_forward", [&] {
      lstm_cell_forward<scalar_t>(a.data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                                  c.data_ptr<scalar_t>(), B, H);
    });
    h_prev = h;
    c_prev = c;
  }
  return {hs, cs};
}

// Returns grads of gx, h0, c0 and w_hh.
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_backward(const Tensor& dhs, const Tensor& dh_last, const Tensor& dc_last,
                                                         const Tensor& acts, const Tensor& hs, const Tensor& cs,
                                                         const Tensor& h0, const Tensor& c0, const Tensor& w_hh) {
  const int64_t T = acts.size(0), B = acts.size(1), H = w_hh.size(1);
  Tensor dhs_c = dhs.contiguous();
  Tensor dg = at::empty_like(acts);            // [T, B, 4H]
  Tensor dh_next = dh_last.contiguous().clone();
  Tensor dc = dc_last.contiguous().clone();
  Tensor c0c = c0.contiguous();
  for (int64_t t = T - 1; t >= 0; --t) {
    Tensor c_prev = t > 0 ? cs[t - 1] : c0c;
    Tensor dgt = dg[t];
    Tensor a = acts[t], c = cs[t], dho = dhs_c[t];
    AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstm_backward", [&] {
      lstm_cell_backward<scalar_t>(a.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(),
                                   dho.data_ptr<scalar_t>(), dh_next.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
                                   dgt.data_ptr<scalar_t>(), B, H);
    });
    at::mm_out(dh_next, dgt, w_hh);
  }
  Tensor dw = dg.view({T * B, 4 * H}).t().mm(previous_states(h0, hs));
  return {dg, dh_next, dc, dw};
}

// ---- RNN (tanh) ---------------------------------------------------------------------------

template <typename T>
void tanh_inplace(T* x, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) x[k] = tanh_(x[k]);
}

template <typename T>
void rnn_cell_backward(const T* h, const T* dh_out, const T* dh_next, T* dg, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dg[k] = (dh_out[k] + dh_next[k]) * (T(1) - h[k] * h[k]);
}

// gates [T, B, H] holds W_ih x_t + b on entry and h_t on return (it becomes the output).
Tensor rnn_forward(Tensor gates, const Tensor& h0, const Tensor& w_hh) {
  check_inputs(gates, h0, w_hh, 1);
  const int64_t T = gates.size(0), B = gates.size(1), H = w_hh.size(1);
  const Tensor w_t = recurrent_operand(w_hh, T);
  Tensor h_prev = h0.contiguous();
  for (int64_t t = 0; t < T; ++t) {
    Tensor h = gates[t];
    h.addmm_(h_prev, w_t);
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "rnn_forward", [&] { tanh_inplace<scalar_t>(h.data_ptr<scalar_t>(), B * H); });
    h_prev = h;
  }
  return gates;
}

std::tuple<Tensor, Tensor, Tensor> rnn_backward(const Tensor& dhs, const Tensor& dh_last, const Tensor& hs,
                                                const Tensor& h0, const Tensor& w_hh) {
  const int64_t T = hs.size(0), B = hs.size(1), H = w_hh.size(1);
  Tensor dhs_c = dhs.contiguous();
  Tensor dg = at::empty_like(hs);
  Tensor dh_next = dh_last.contiguous().clone();
  for (int64_t t = T - 1; t >= 0; --t) {
    Tensor dgt = dg[t], h = hs[t], dho = dhs_c[t];
    AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "rnn_backward", [&] {
      rnn_cell_backward<scalar_t>(h.data_ptr<scalar_t>(), dho.data_ptr<scalar_t>(), dh_next.data_ptr<scalar_t>(),
                                  dgt.data_ptr<scalar_t>(), B * H);
    });
    at::mm_out(dh_next, dgt, w_hh);
  }
  Tensor dw = dg.view({T * B, H}).t().mm(previous_states(h0, hs));
  return {dg, dh_next, dw};
}

// ---- GRU ----------------------------------------------------------------------------------
// r = sigmoid(gx_r + gh_r), z = sigmoid(gx_z + gh_z), n = tanh(gx_n + r * gh_n),
// h = (1 - z) * n + z * h_prev, with gh = W_hh h_prev + [0, 0, b_hn] (b_hn stays inside r * ...).

template <typename T>
void gru_cell_forward(const T* gx, const T* gh, const T* h_prev, T* a, T* ghn, T* h, int64_t B, int64_t H) {
  for_each_row(B, 3 * H, [&](int64_t b) {
    const T* x = gx + b * 3 * H;
    const T* g = gh + b * 3 * H;
    const T* hp = h_prev + b * H;
    T* row = a + b * 3 * H;
    T* gn = ghn + b * H;
    T* hb = h + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      T r = sigmoid(x[j] + g[j]), z = sigmoid(x[H + j] + g[H + j]);
      T n = tanh_(x[2 * H + j] + r * g[2 * H + j]);
      row[j] = r; row[H + j] = z; row[2 * H + j] = n;
      gn[j] = g[2 * H + j];
      hb[j] = (T(1) - z) * n + z * hp[j];
    }
  });
}

// Writes the input-side grads dgx [B, 3H], hidden-side grads dgh [B, 3H] and the direct
// path dh_prev = dh * z [B, H].
template <typename T>
void gru_cell_backward(const T* a, const T* ghn, const T* h_prev, const T* dh_out, const T* dh_next, T* dgx, T* dgh,
                       T* dh_direct, int64_t B, int64_t H) {
  for_each_row(B, 3 * H, [&](int64_t b) {
    const T* row = a + b * 3 * H;
    const T* gn = ghn + b * H;
    const T* hp = h_prev + b * H;
    const T* dho = dh_out + b * H;
    const T* dhn = dh_next + b * H;
    T* dx = dgx + b * 3 * H;
    T* dhh = dgh + b * 3 * H;
    T* dd = dh_direct + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      T r = row[j], z = row[H + j], n = row[2 * H + j];
      T dh = dho[j] + dhn[j];
      T dpn = dh * (T(1) - z) * (T(1) - n * n);
      T dpr = dpn * gn[j] * r * (T(1) - r);
      T dpz = dh * (hp[j] - n) * z * (T(1) - z);
      dx[j] = dpr; dx[H + j] = dpz; dx[2 * H + j] = dpn;
      dhh[j] = dpr; dhh[H + j] = dpz; dhh[2 * H + j] = dpn * r;
      dd[j] = dh * z;
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> gru_forward(const Tensor& gx, const Tensor& h0, const Tensor& w_hh, const Tensor& b_hn) {
  check_inputs(gx, h0, w_hh, 3);
  const int64_t T = gx.size(0), B = gx.size(1), H = w_hh.size(1);
  Tensor acts = at::empty_like(gx);  // [T, B, 3H]: r, z, n
  Tensor ghn = at::empty({T, B, H}, gx.options());
  Tensor hs = at::empty({T, B, H}, gx.options());
  Tensor gh = at::empty({B, 3 * H}, gx.options());
  Tensor bias = at::cat({at::zeros({2 * H}, gx.options()), b_hn.contiguous()});
  const Tensor w_t = recurrent_operand(w_hh, T);
  Tensor h_prev = h0.contiguous();
  for (int64_t t = 0; t < T; ++t) {
    at::addmm_out(gh, bias, h_prev, w_t);
    Tensor x = gx[t], a = acts[t], gn = ghn[t], h = hs[t];
    AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "gru_forward", [&] {
      gru_cell_forward<scalar_t>(x.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>(), h_prev.data_ptr<scalar_t>(),
                                 a.data_ptr<scalar_t>(), gn.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), B, H);
    });
    h_prev = h;
  }
  return {hs, acts, ghn};
}

// Returns grads of gx, h0, w_hh and b_hn.
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_backward(const Tensor& dhs, const Tensor& dh_last, const Tensor& acts,
                                                        const Tensor& ghn, const Tensor& hs, const Tensor& h0,
                                                        const Tensor& w_hh) {
  const int64_t T = acts.size(0), B = acts.size(1), H = w_hh.size(1);
  Tensor dhs_c = dhs.contiguous();
  Tensor dgx = at::empty_like(acts);
  Tensor dgh = at::empty_like(acts);
  Tensor dh_direct = at::empty({B, H}, acts.options());
  Tensor dh_next = dh_last.contiguous().clone();
  Tensor h0c = h0.contiguous();
  for (int64_t t = T - 1; t >= 0; --t) {
    Tensor h_prev = t > 0 ? hs[t - 1] : h0c;
    Tensor a = acts[t], gn = ghn[t], dho = dhs_c[t], dxt = dgx[t], dht = dgh[t];
    AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "gru_backward", [&] {
      gru_cell_backward<scalar_t>(a.data_ptr<scalar_t>(), gn.data_ptr<scalar_t>(), h_prev.data_ptr<scalar_t>(),
                                  dho.data_ptr<scalar_t>(), dh_next.data_ptr<scalar_t>(), dxt.data_ptr<scalar_t>(),
                                  dht.data_ptr<scalar_t>(), dh_direct.data_ptr<scalar_t>(), B, H);
    });
    at::addmm_out(dh_next, dh_direct, dht, w_hh);
  }
  Tensor flat = dgh.view({T * B, 3 * H});
  Tensor dw = flat.t().mm(previous_states(h0, hs));
  Tensor db_hn = flat.narrow(1, 2 * H, H).sum(0);
  return {dgx, dh_next, dw, db_hn};
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
