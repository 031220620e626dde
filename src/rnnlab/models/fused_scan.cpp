// The loops over time steps of rnnlab's GRU, LSTM and RNN scans (rnnlab/models/cells.py) in C++.
//
// Each function is the loop of one scan's forward or backward fast path, with the Python loop's arguments and
// intermediates, so the autograd Functions in cells.py keep everything around the loop (the input projection of
// all steps, the weight gradients as one matmul after the loop, packing, masks). Per step: the hidden matmul with
// ATen into a preallocated slice, then one pass over the batch x hidden elements doing all the gate arithmetic.
// Layer norm, recurrent dropout and the LSTM's projection are not here: cells.py runs its Python loops for them.
//
// Layout (cells._Layout): packed, time-major rows; step t holds the first batch_sizes[t] sequences, so its rows
// are a prefix of step t - 1's. State buffers are [B + N, H]: B rows of initial state, then every step's rows.
// Built by rnnlab/models/fused.py (python -m rnnlab.models.fused build), with AVX2 or AVX-512 where ATen runs at that
// width, so that ATen's Vectorized<T> exp and tanh are SLEEF's, as in torch's own kernels.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// A step's element-wise pass is split across threads only from this many (sequence, hidden unit) pairs per
// thread: below it, waking a thread costs more than it saves. Not yet tuned (B*H = 8192 at the target shape).
constexpr int64_t kGrainUnits = 4096;

struct Steps {
  std::vector<int64_t> size;   // batch_sizes[t]
  std::vector<int64_t> start;  // first row of step t in an [N, ...] tensor
  int64_t batch = 0;           // B = batch_sizes[0]
  int64_t rows = 0;            // N = sum of batch_sizes

  explicit Steps(const std::vector<int64_t>& batch_sizes) : size(batch_sizes) {
    TORCH_CHECK(!size.empty(), "rnnlab fused scan: no time steps");
    for (size_t t = 0; t < size.size(); ++t) {
      TORCH_CHECK(size[t] > 0 && (t == 0 || size[t] <= size[t - 1]),
                  "rnnlab fused scan: batch sizes must be positive and non-increasing, got ", at::IntArrayRef(batch_sizes));
      start.push_back(rows);
      rows += size[t];
    }
    batch = size[0];
  }
  int64_t count() const { return static_cast<int64_t>(size.size()); }
  // First row of h_t, and of h_{t-1}, in a [B + N, H] state buffer.
  int64_t state_row(int64_t t) const { return batch + start[t]; }
  int64_t previous_row(int64_t t) const { return t == 0 ? 0 : batch + start[t - 1]; }
};

void check_buffer(const Tensor& x, const char* name, const Tensor& like, int64_t rows, int64_t width) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == like.scalar_type(), "rnnlab fused scan: ", name,
              " must be a CPU tensor of dtype ", like.scalar_type(), ", got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == rows && x.size(1) == width && x.is_contiguous(), "rnnlab fused scan: ", name,
              " must be a contiguous [", rows, ", ", width, "] tensor, got ", x.sizes());
}

int64_t width_of(const Tensor& states) {
  TORCH_CHECK(states.dim() == 2, "rnnlab fused scan: expected a 2-D state buffer, got ", states.sizes());
  return states.size(1);
}

void check_hidden(const Tensor& w_hh, const std::optional<Tensor>& b_hh, const Tensor& like, int64_t gates, int64_t width) {
  TORCH_CHECK(w_hh.device().is_cpu() && w_hh.scalar_type() == like.scalar_type() && w_hh.dim() == 2 &&
                  w_hh.size(0) == gates * width && w_hh.size(1) == width,
              "rnnlab fused scan: W_hh must be a [", gates * width, ", ", width, "] CPU tensor of dtype ", like.scalar_type(),
              ", got ", w_hh.sizes(), " ", w_hh.scalar_type());
  TORCH_CHECK(!b_hh || (b_hh->device().is_cpu() && b_hh->scalar_type() == like.scalar_type() && b_hh->numel() == gates * width),
              "rnnlab fused scan: b_hh must be a CPU tensor of ", gates * width, " elements of dtype ", like.scalar_type());
}

// gh_t = h_{t-1} W_hh^T + b_hh, written into `out`: the call cells._HiddenPath.forward_step makes.
void hidden_matmul(Tensor out, const Tensor& h_previous, const Tensor& w_hh_t, const std::optional<Tensor>& b_hh) {
  if (b_hh) {
    at::addmm_out(out, *b_hh, h_previous, w_hh_t);
  } else {
    at::mm_out(out, h_previous, w_hh_t);
  }
}

// row(b) for b in [0, rows), split across threads when the step is large enough.
template <typename F>
void for_rows(int64_t rows, int64_t width, const F& row) {
  const int64_t grain = std::max<int64_t>(1, kGrainUnits / std::max<int64_t>(1, width));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      row(b);
    }
  });
}

// block(j, count) over a row of `width` elements: whole vectors, then one partial vector for the rest.
template <typename T, typename F>
inline void for_columns(int64_t width, const F& block) {
  constexpr int64_t lanes = Vec<T>::size();
  int64_t j = 0;
  for (; j + lanes <= width; j += lanes) {
    block(j, lanes);
  }
  if (j < width) {
    block(j, width - j);
  }
}

template <typename T>
inline Vec<T> vload(const T* p, int64_t count) {
  return Vec<T>::loadu(p, count);
}

// 1 / (1 + exp(-x)), as ATen's CPU sigmoid kernel computes it.
template <typename T>
inline Vec<T> logistic(const Vec<T>& x) {
  return (Vec<T>(T(1)) + x.neg().exp()).reciprocal();
}

// ------------------------------------------------------------------------------------------------------------------
// GRU (cells._GRUScan): gh = W_hh h + b_hh; r = σ(gi_r + gh_r); z = σ(gi_z + gh_z); n = tanh(gi_n + r ⊙ gh_n);
// h_t = n + z ⊙ (h_{t-1} - n). gh's r and z columns end up holding r and z, its n columns keep gh_n.

template <typename T>
void gru_forward_loop(const Tensor& gi, const Tensor& w_hh_t, const std::optional<Tensor>& b_hh, const Tensor& states,
                      const Tensor& gh, const Tensor& n, const Steps& steps, bool every_step) {
  const int64_t H = n.size(1);
  const T* gi_p = gi.const_data_ptr<T>();
  T* states_p = states.mutable_data_ptr<T>();
  T* gh_p = gh.mutable_data_ptr<T>();
  T* n_p = n.mutable_data_ptr<T>();
  for (int64_t t = 0; t < steps.count(); ++t) {
    const int64_t rows = steps.size[t];
    const int64_t kept = every_step ? steps.start[t] : 0;  // the step's intermediates: its own rows, or one step's, reused
    hidden_matmul(gh.narrow(0, kept, rows), states.narrow(0, steps.previous_row(t), rows), w_hh_t, b_hh);
    const T* gi_t = gi_p + steps.start[t] * 3 * H;
    const T* h_previous = states_p + steps.previous_row(t) * H;
    T* h_t = states_p + steps.state_row(t) * H;
    T* gh_t = gh_p + kept * 3 * H;
    T* n_t = n_p + kept * H;
    for_rows(rows, H, [&](int64_t b) {
      const T* x = gi_t + b * 3 * H;
      T* a = gh_t + b * 3 * H;
      for_columns<T>(H, [&](int64_t j, int64_t k) {
        const Vec<T> r = logistic(vload(x + j, k) + vload(a + j, k));
        const Vec<T> z = logistic(vload(x + H + j, k) + vload(a + H + j, k));
        const Vec<T> candidate = (vload(x + 2 * H + j, k) + r * vload(a + 2 * H + j, k)).tanh();
        const Vec<T> previous = vload(h_previous + b * H + j, k);
        r.store(a + j, k);
        z.store(a + H + j, k);
        candidate.store(n_t + b * H + j, k);
        (candidate + z * (previous - candidate)).store(h_t + b * H + j, k);
      });
    });
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> gru_backward_loop(const Tensor& grad_output, const Tensor& states, const Tensor& gh,
                                                     const Tensor& n, const Tensor& w_hh, const Steps& steps) {
  const int64_t H = n.size(1);
  // dL/d(gi_r + gh_r), dL/d(gi_z + gh_z), dL/dgh_n per row; dL/d(gi_n + r ⊙ gh_n) per row; dL/dh of the current step.
  Tensor grad_gh = at::empty_like(gh);
  Tensor grad_a_n = at::empty_like(n);
  Tensor grad_h = at::empty({steps.batch, H}, n.options());
  const int64_t last = steps.count() - 1;
  grad_h.narrow(0, 0, steps.size[last]).copy_(grad_output.narrow(0, steps.start[last], steps.size[last]));
  const T* grad_output_p = grad_output.const_data_ptr<T>();
  const T* states_p = states.const_data_ptr<T>();
  const T* gh_p = gh.const_data_ptr<T>();
  const T* n_p = n.const_data_ptr<T>();
  T* grad_gh_p = grad_gh.mutable_data_ptr<T>();
  T* grad_a_n_p = grad_a_n.mutable_data_ptr<T>();
  T* grad_h_p = grad_h.mutable_data_ptr<T>();
  for (int64_t t = last; t >= 0; --t) {
    const int64_t rows = steps.size[t], start = steps.start[t];
    const T* h_previous = states_p + steps.previous_row(t) * H;
    const T* loss_previous = t > 0 ? grad_output_p + steps.start[t - 1] * H : nullptr;  // the loss's own dL/dh_{t-1}
    for_rows(rows, H, [&](int64_t b) {
      const T* a = gh_p + (start + b) * 3 * H;
      const T* candidate = n_p + (start + b) * H;
      T* grad_a = grad_gh_p + (start + b) * 3 * H;
      T* grad_candidate = grad_a_n_p + (start + b) * H;
      T* g = grad_h_p + b * H;
      for_columns<T>(H, [&](int64_t j, int64_t k) {
        const Vec<T> grad = vload(g + j, k);
        const Vec<T> r = vload(a + j, k), z = vload(a + H + j, k), gh_n = vload(a + 2 * H + j, k);
        const Vec<T> nv = vload(candidate + j, k);
        const Vec<T> grad_n = grad - grad * z;            // dh_t/dn = 1 - z
        const Vec<T> grad_a_nv = grad_n - grad_n * nv * nv;  // dn/da_n = 1 - n²
        grad_a_nv.store(grad_candidate + j, k);
        (grad_a_nv * r).store(grad_a + 2 * H + j, k);                  // da_n/dgh_n = r
        (grad_a_nv * gh_n * (r - r * r)).store(grad_a + j, k);         // da_n/dr = gh_n
        ((vload(h_previous + b * H + j, k) - nv) * grad * (z - z * z)).store(grad_a + H + j, k);  // dh_t/dz = h_{t-1} - n
        Vec<T> carried = z * grad;  // dh_t/dh_{t-1} directly; W_hh's share is added after this pass
        if (loss_previous != nullptr) {
          carried = carried + vload(loss_previous + b * H + j, k);
        }
        carried.store(g + j, k);
      });
    });
    if (t > 0 && steps.size[t - 1] > rows) {  // sequences that end at step t - 1: only the loss's gradient
      const int64_t ended = steps.size[t - 1] - rows;
      grad_h.narrow(0, rows, ended).copy_(grad_output.narrow(0, steps.start[t - 1] + rows, ended));
    }
    grad_h.narrow(0, 0, rows).addmm_(grad_gh.narrow(0, start, rows), w_hh);
  }
  return {grad_gh, grad_a_n, grad_h};
}

// ------------------------------------------------------------------------------------------------------------------
// LSTM without projection (cells._LSTMScan): a = gi + W_hh h + b_hh; i, f, o = σ(a_i, a_f, a_o), g = tanh(a_g);
// c_t = f ⊙ c_{t-1} + i ⊙ g; h_t = o ⊙ tanh(c_t). The gate buffer ends up holding i, f, g, o.

template <typename T>
void lstm_forward_loop(const Tensor& gi, const Tensor& w_hh_t, const std::optional<Tensor>& b_hh, const Tensor& h_states,
                       const Tensor& c_states, const Tensor& gates, const Tensor& tanh_c, const Steps& steps, bool every_step) {
  const int64_t H = tanh_c.size(1);
  const T* gi_p = gi.const_data_ptr<T>();
  T* h_p = h_states.mutable_data_ptr<T>();
  T* c_p = c_states.mutable_data_ptr<T>();
  T* gates_p = gates.mutable_data_ptr<T>();
  T* tanh_c_p = tanh_c.mutable_data_ptr<T>();
  for (int64_t t = 0; t < steps.count(); ++t) {
    const int64_t rows = steps.size[t];
    const int64_t kept = every_step ? steps.start[t] : 0;
    hidden_matmul(gates.narrow(0, kept, rows), h_states.narrow(0, steps.previous_row(t), rows), w_hh_t, b_hh);
    const T* gi_t = gi_p + steps.start[t] * 4 * H;
    const T* c_previous = c_p + steps.previous_row(t) * H;
    T* c_t = c_p + steps.state_row(t) * H;
    T* h_t = h_p + steps.state_row(t) * H;
    T* gates_t = gates_p + kept * 4 * H;
    T* tanh_c_t = tanh_c_p + kept * H;
    for_rows(rows, H, [&](int64_t b) {
      const T* x = gi_t + b * 4 * H;
      T* a = gates_t + b * 4 * H;
      for_columns<T>(H, [&](int64_t j, int64_t k) {
        const Vec<T> i = logistic(vload(a + j, k) + vload(x + j, k));
        const Vec<T> f = logistic(vload(a + H + j, k) + vload(x + H + j, k));
        const Vec<T> g = (vload(a + 2 * H + j, k) + vload(x + 2 * H + j, k)).tanh();
        const Vec<T> o = logistic(vload(a + 3 * H + j, k) + vload(x + 3 * H + j, k));
        const Vec<T> c = f * vload(c_previous + b * H + j, k) + i * g;
        const Vec<T> tc = c.tanh();
        i.store(a + j, k);
        f.store(a + H + j, k);
        g.store(a + 2 * H + j, k);
        o.store(a + 3 * H + j, k);
        c.store(c_t + b * H + j, k);
        tc.store(tanh_c_t + b * H + j, k);
        (o * tc).store(h_t + b * H + j, k);
      });
    });
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> lstm_backward_loop(const Tensor& grad_h_output, const Tensor& grad_c_output,
                                                      const Tensor& c_states, const Tensor& gates, const Tensor& tanh_c,
                                                      const Tensor& w_hh, const Steps& steps) {
  const int64_t H = tanh_c.size(1);
  Tensor grad_a = at::empty_like(gates);  // dL/d(a_i, a_f, a_g, a_o)
  Tensor grad_h = at::empty({steps.batch, H}, tanh_c.options());
  Tensor grad_c = at::empty({steps.batch, H}, tanh_c.options());  // dL/dc_t through c_{t+1}, then dL/dc_{t-1}
  const int64_t last = steps.count() - 1;
  grad_h.narrow(0, 0, steps.size[last]).copy_(grad_h_output.narrow(0, steps.start[last], steps.size[last]));
  grad_c.narrow(0, 0, steps.size[last]).copy_(grad_c_output.narrow(0, steps.start[last], steps.size[last]));
  const T* grad_c_output_p = grad_c_output.const_data_ptr<T>();
  const T* c_p = c_states.const_data_ptr<T>();
  const T* gates_p = gates.const_data_ptr<T>();
  const T* tanh_c_p = tanh_c.const_data_ptr<T>();
  T* grad_a_p = grad_a.mutable_data_ptr<T>();
  T* grad_h_p = grad_h.mutable_data_ptr<T>();
  T* grad_c_p = grad_c.mutable_data_ptr<T>();
  for (int64_t t = last; t >= 0; --t) {
    const int64_t rows = steps.size[t], start = steps.start[t];
    const T* c_previous = c_p + steps.previous_row(t) * H;
    const T* loss_c_previous = t > 0 ? grad_c_output_p + steps.start[t - 1] * H : nullptr;
    for_rows(rows, H, [&](int64_t b) {
      const T* act = gates_p + (start + b) * 4 * H;
      const T* tc_row = tanh_c_p + (start + b) * H;
      T* ga = grad_a_p + (start + b) * 4 * H;
      T* gh_row = grad_h_p + b * H;
      T* gc_row = grad_c_p + b * H;
      for_columns<T>(H, [&](int64_t j, int64_t k) {
        const Vec<T> grad_h_v = vload(gh_row + j, k);
        const Vec<T> i = vload(act + j, k), f = vload(act + H + j, k), g = vload(act + 2 * H + j, k), o = vload(act + 3 * H + j, k);
        const Vec<T> tc = vload(tc_row + j, k);
        const Vec<T> through_h = grad_h_v * o;
        const Vec<T> grad_c_v = through_h - through_h * tc * tc + vload(gc_row + j, k);  // dL/dc_t: through h_t and c_{t+1}
        (grad_h_v * tc * (o - o * o)).store(ga + 3 * H + j, k);
        (grad_c_v * g * (i - i * i)).store(ga + j, k);
        (grad_c_v * vload(c_previous + b * H + j, k) * (f - f * f)).store(ga + H + j, k);
        const Vec<T> through_g = grad_c_v * i;
        (through_g - through_g * g * g).store(ga + 2 * H + j, k);
        Vec<T> carried = grad_c_v * f;  // dc_t/dc_{t-1} = f
        if (loss_c_previous != nullptr) {
          carried = carried + vload(loss_c_previous + b * H + j, k);
        }
        carried.store(gc_row + j, k);
      });
    });
    if (t > 0) {  // dL/dh_{t-1}: the loss's own, plus W_hh's share for the sequences step t ran
      const int64_t previous_rows = steps.size[t - 1];
      grad_h.narrow(0, 0, previous_rows).copy_(grad_h_output.narrow(0, steps.start[t - 1], previous_rows));
      if (previous_rows > rows) {
        grad_c.narrow(0, rows, previous_rows - rows).copy_(grad_c_output.narrow(0, steps.start[t - 1] + rows, previous_rows - rows));
      }
      grad_h.narrow(0, 0, rows).addmm_(grad_a.narrow(0, start, rows), w_hh);
    } else {
      at::mm_out(grad_h, grad_a.narrow(0, start, rows), w_hh);
    }
  }
  return {grad_a, grad_h, grad_c};
}

// ------------------------------------------------------------------------------------------------------------------
// RNN (cells._RNNScan): h_t = tanh(gi + W_hh h_{t-1} + b_hh), or relu. The matmul writes into h_t's rows.

template <typename T>
void rnn_forward_loop(const Tensor& gi, const Tensor& w_hh_t, const std::optional<Tensor>& b_hh, const Tensor& states,
                      const Steps& steps, bool use_tanh) {
  const int64_t H = states.size(1);
  const T* gi_p = gi.const_data_ptr<T>();
  T* states_p = states.mutable_data_ptr<T>();
  for (int64_t t = 0; t < steps.count(); ++t) {
    const int64_t rows = steps.size[t];
    hidden_matmul(states.narrow(0, steps.state_row(t), rows), states.narrow(0, steps.previous_row(t), rows), w_hh_t, b_hh);
    const T* gi_t = gi_p + steps.start[t] * H;
    T* h_t = states_p + steps.state_row(t) * H;
    for_rows(rows, H, [&](int64_t b) {
      const T* x = gi_t + b * H;
      T* h = h_t + b * H;
      if (use_tanh) {
        for_columns<T>(H, [&](int64_t j, int64_t k) { (vload(h + j, k) + vload(x + j, k)).tanh().store(h + j, k); });
      } else {
        for (int64_t j = 0; j < H; ++j) {
          const T a = h[j] + x[j];
          h[j] = a < T(0) ? T(0) : a;  // relu, keeping NaN as torch.relu does
        }
      }
    });
  }
}

template <typename T>
std::tuple<Tensor, Tensor> rnn_backward_loop(const Tensor& grad_output, const Tensor& states, const Tensor& w_hh, const Steps& steps,
                                             bool use_tanh) {
  const int64_t H = states.size(1);
  Tensor grad_a = at::empty({steps.rows, H}, states.options());  // dL/d(gi + gh)
  Tensor grad_h = at::empty({steps.batch, H}, states.options());
  const int64_t last = steps.count() - 1;
  grad_h.narrow(0, 0, steps.size[last]).copy_(grad_output.narrow(0, steps.start[last], steps.size[last]));
  const T* states_p = states.const_data_ptr<T>();
  T* grad_a_p = grad_a.mutable_data_ptr<T>();
  T* grad_h_p = grad_h.mutable_data_ptr<T>();
  for (int64_t t = last; t >= 0; --t) {
    const int64_t rows = steps.size[t], start = steps.start[t];
    const T* h_t = states_p + steps.state_row(t) * H;
    for_rows(rows, H, [&](int64_t b) {
      const T* h = h_t + b * H;
      const T* g = grad_h_p + b * H;
      T* ga = grad_a_p + (start + b) * H;
      if (use_tanh) {
        for_columns<T>(H, [&](int64_t j, int64_t k) {
          const Vec<T> grad = vload(g + j, k), hv = vload(h + j, k);
          (grad - grad * hv * hv).store(ga + j, k);
        });
      } else {
        for (int64_t j = 0; j < H; ++j) {
          ga[j] = g[j] * T(h[j] > T(0));  // as grad * (h > 0) in torch: NaN and inf gradients stay NaN
        }
      }
    });
    if (t > 0) {
      const int64_t previous_rows = steps.size[t - 1];
      grad_h.narrow(0, 0, previous_rows).copy_(grad_output.narrow(0, steps.start[t - 1], previous_rows));
      grad_h.narrow(0, 0, rows).addmm_(grad_a.narrow(0, start, rows), w_hh);
    } else {
      at::mm_out(grad_h, grad_a.narrow(0, start, rows), w_hh);
    }
  }
  return {grad_a, grad_h};
}

// ------------------------------------------------------------------------------------------------------------------
// What Python calls. Buffers cells.py allocates (states, intermediates) are written in place; inputs are read.

void gru_forward(const Tensor& gi_all, const Tensor& w_hh, const std::optional<Tensor>& b_hh, const Tensor& states,
                 const Tensor& gh_all, const Tensor& n_all, const std::vector<int64_t>& batch_sizes, bool every_step) {
  const Steps steps(batch_sizes);
  const Tensor gi = gi_all.contiguous();
  const int64_t H = width_of(states);
  check_buffer(gi, "gi", gi, steps.rows, 3 * H);
  check_buffer(states, "states", gi, steps.batch + steps.rows, H);
  check_buffer(gh_all, "gh", gi, every_step ? steps.rows : steps.batch, 3 * H);
  check_buffer(n_all, "n", gi, every_step ? steps.rows : steps.batch, H);
  check_hidden(w_hh, b_hh, gi, 3, H);
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "rnnlab_gru_forward", [&] {
    gru_forward_loop<scalar_t>(gi, w_hh.t(), b_hh, states, gh_all, n_all, steps, every_step);
  });
}

std::tuple<Tensor, Tensor, Tensor> gru_backward(const Tensor& grad_output, const Tensor& states, const Tensor& gh_all,
                                                const Tensor& n_all, const Tensor& w_hh, const std::vector<int64_t>& batch_sizes) {
  const Steps steps(batch_sizes);
  const Tensor grad = grad_output.contiguous();  // autograd may hand an expanded or strided gradient
  const int64_t H = width_of(states);
  check_buffer(states, "states", states, steps.batch + steps.rows, H);
  check_buffer(grad, "grad_output", states, steps.rows, H);
  check_buffer(gh_all, "gh", states, steps.rows, 3 * H);
  check_buffer(n_all, "n", states, steps.rows, H);
  check_hidden(w_hh, std::nullopt, states, 3, H);
  std::tuple<Tensor, Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "rnnlab_gru_backward", [&] {
    result = gru_backward_loop<scalar_t>(grad, states, gh_all, n_all, w_hh, steps);
  });
  return result;
}

void lstm_forward(const Tensor& gi_all, const Tensor& w_hh, const std::optional<Tensor>& b_hh, const Tensor& h_states,
                  const Tensor& c_states, const Tensor& gates_all, const Tensor& tanh_c_all, const std::vector<int64_t>& batch_sizes,
                  bool every_step) {
  const Steps steps(batch_sizes);
  const Tensor gi = gi_all.contiguous();
  const int64_t H = width_of(c_states);
  check_buffer(gi, "gi", gi, steps.rows, 4 * H);
  check_buffer(h_states, "h states", gi, steps.batch + steps.rows, H);  // no projection: h is as wide as c
  check_buffer(c_states, "c states", gi, steps.batch + steps.rows, H);
  check_buffer(gates_all, "gates", gi, every_step ? steps.rows : steps.batch, 4 * H);
  check_buffer(tanh_c_all, "tanh(c)", gi, every_step ? steps.rows : steps.batch, H);
  check_hidden(w_hh, b_hh, gi, 4, H);
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "rnnlab_lstm_forward", [&] {
    lstm_forward_loop<scalar_t>(gi, w_hh.t(), b_hh, h_states, c_states, gates_all, tanh_c_all, steps, every_step);
  });
}

std::tuple<Tensor, Tensor, Tensor> lstm_backward(const Tensor& grad_h_output, const Tensor& grad_c_output, const Tensor& c_states,
                                                 const Tensor& gates_all, const Tensor& tanh_c_all, const Tensor& w_hh,
                                                 const std::vector<int64_t>& batch_sizes) {
  const Steps steps(batch_sizes);
  const Tensor grad_h = grad_h_output.contiguous();
  const Tensor grad_c = grad_c_output.contiguous();
  const int64_t H = width_of(c_states);
  check_buffer(c_states, "c states", c_states, steps.batch + steps.rows, H);
  check_buffer(grad_h, "grad of h", c_states, steps.rows, H);
  check_buffer(grad_c, "grad of c", c_states, steps.rows, H);
  check_buffer(gates_all, "gates", c_states, steps.rows, 4 * H);
  check_buffer(tanh_c_all, "tanh(c)", c_states, steps.rows, H);
  check_hidden(w_hh, std::nullopt, c_states, 4, H);
  std::tuple<Tensor, Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(c_states.scalar_type(), "rnnlab_lstm_backward", [&] {
    result = lstm_backward_loop<scalar_t>(grad_h, grad_c, c_states, gates_all, tanh_c_all, w_hh, steps);
  });
  return result;
}

void rnn_forward(const Tensor& gi_all, const Tensor& w_hh, const std::optional<Tensor>& b_hh, const Tensor& states,
                 const std::vector<int64_t>& batch_sizes, bool use_tanh) {
  const Steps steps(batch_sizes);
  const Tensor gi = gi_all.contiguous();
  const int64_t H = width_of(states);
  check_buffer(gi, "gi", gi, steps.rows, H);
  check_buffer(states, "states", gi, steps.batch + steps.rows, H);
  check_hidden(w_hh, b_hh, gi, 1, H);
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "rnnlab_rnn_forward", [&] {
    rnn_forward_loop<scalar_t>(gi, w_hh.t(), b_hh, states, steps, use_tanh);
  });
}

std::tuple<Tensor, Tensor> rnn_backward(const Tensor& grad_output, const Tensor& states, const Tensor& w_hh,
                                        const std::vector<int64_t>& batch_sizes, bool use_tanh) {
  const Steps steps(batch_sizes);
  const Tensor grad = grad_output.contiguous();
  const int64_t H = width_of(states);
  check_buffer(states, "states", states, steps.batch + steps.rows, H);
  check_buffer(grad, "grad_output", states, steps.rows, H);
  check_hidden(w_hh, std::nullopt, states, 1, H);
  std::tuple<Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "rnnlab_rnn_backward", [&] {
    result = rnn_backward_loop<scalar_t>(grad, states, w_hh, steps, use_tanh);
  });
  return result;
}

}  // namespace

// The GIL is released: the loops touch no Python object, and another Python thread may run meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.doc() = "rnnlab's fused GRU, LSTM and RNN scan loops (rnnlab/models/fused_scan.cpp)";
  m.def("gru_forward", &gru_forward, "GRU forward loop: writes states, gh (r, z, gh_n) and n", release());
  m.def("gru_backward", &gru_backward, "GRU backward loop: (dL/dgh with dL/dgh_n in its n columns, dL/da_n, dL/dh_0)", release());
  m.def("lstm_forward", &lstm_forward, "LSTM forward loop (no projection): writes h and c states, gates (i, f, g, o), tanh(c)", release());
  m.def("lstm_backward", &lstm_backward, "LSTM backward loop: (dL/da, dL/dh_0, dL/dc_0)", release());
  m.def("rnn_forward", &rnn_forward, "RNN forward loop: writes the states", release());
  m.def("rnn_backward", &rnn_backward, "RNN backward loop: (dL/da, dL/dh_0)", release());
}
