// The gate's small layers (CPU, float32): from the block's branch output y and its inbounds' means to the mixing
// weights (v, w), in inference and in training (forward and backward):
//   g = [mean_hw(y), pooled_1, ..., pooled_n]                  (B, (n + 1) C)
//   h = g fc1^T;  r = relu(BatchNorm(h));  logits = r fc2^T + b2  (M hidden units)
//   v = sigmoid(logits[:, :C]);  w = softmax over k of logits[:, C:] viewed (B, n, C), 0 where inbound k's channel
//   is zero padding
// Each is one call in plain loops: the ten to twenty ATen operations they stand for (the gate's modules,
// timm_denseres/gate.py) work on vectors of a few thousand numbers, so each operation's fixed cost (dispatch, a
// parallel region, cold code after a block's convolutions) is most of their time. Python side: _kernels.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr float kExpMin = -87.33654f;  // ln of float32's smallest normal number
constexpr float kExpMax = 88.37626f;   // ln of its largest

// exp(x) to about 1 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, 2^n from the exponent bits);
// x is clamped to [kExpMin, kExpMax], so 2^n stays a normal float. Pure arithmetic, so the loops that call it
// vectorise (with -fno-trapping-math, _kernels.py): a libm call per element would cost more than the rest of the head.
inline float exp_poly(float x) {
  x = std::min(std::max(x, kExpMin), kExpMax);
  // round x / ln2 to the nearest integer: adding 1.5 * 2^23 leaves no fraction bits (default rounding mode)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts: no rounding error in n ln2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float dot(const float* a, const float* b, int64_t len) {
  float sum = 0.0f;
  #pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < len; ++i) sum += a[i] * b[i];
  return sum;
}

inline void axpy(float alpha, const float* x, float* out, int64_t len) {  // out += alpha * x
  #pragma omp simd
  for (int64_t i = 0; i < len; ++i) out[i] += alpha * x[i];
}

// out (cols, rows) = in (rows, cols) transposed
void transpose(const float* in, float* out, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = in[i * cols + j];
  }
}

// Items (samples or hidden units) per task of at::parallel_for: about 32k numbers of work each, so small heads
// run in one thread.
int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_item, 1)); }

void check_float_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), "gate head: ", what,
              " must be a contiguous float32 CPU tensor");
}

// g's row for sample b: y's channel means, then the inbounds' means
void gate_input(const float* y, const std::vector<const float*>& pooled, int64_t b, int64_t channels, int64_t hw,
                float* g) {
  const float inv_hw = 1.0f / static_cast<float>(hw);
  for (int64_t c = 0; c < channels; ++c) {
    const float* y_row = y + (b * channels + c) * hw;
    float total = 0.0f;
    #pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < hw; ++j) total += y_row[j];
    g[c] = total * inv_hw;
  }
  for (size_t k = 0; k < pooled.size(); ++k) {
    std::copy_n(pooled[k] + b * channels, channels, g + (k + 1) * channels);
  }
}

// v and w of one sample from its logits ((n + 1) C). A weight below float32's normal range is 0, so a -inf logit
// (padding) gets weight exactly 0. The loops run along the channels, so they vectorise; top and total: C floats.
void gates_from_logits(const float* logits, int64_t channels, int64_t n, float* v, float* w, float* top,
                       float* total) {
  #pragma omp simd
  for (int64_t c = 0; c < channels; ++c) v[c] = 1.0f / (1.0f + exp_poly(-logits[c]));
  const float* w_logits = logits + channels;
  std::copy_n(w_logits, channels, top);
  for (int64_t k = 1; k < n; ++k) {
    #pragma omp simd
    for (int64_t c = 0; c < channels; ++c) top[c] = std::max(top[c], w_logits[k * channels + c]);
  }
  std::fill_n(total, channels, 0.0f);
  for (int64_t k = 0; k < n; ++k) {
    #pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const float d = w_logits[k * channels + c] - top[c];
      const float e = d < kExpMin ? 0.0f : exp_poly(d);
      w[k * channels + c] = e;
      total[c] += e;
    }
  }
  #pragma omp simd
  for (int64_t c = 0; c < channels; ++c) total[c] = 1.0f / total[c];
  for (int64_t k = 0; k < n; ++k) {
    #pragma omp simd
    for (int64_t c = 0; c < channels; ++c) w[k * channels + c] *= total[c];
  }
}

struct HeadShape {
  int64_t batch, channels, hw, n, width, hidden;
};

HeadShape check_head(const char* op, const at::Tensor& y, const std::vector<at::Tensor>& pooled, int64_t hidden) {
  TORCH_CHECK(y.dim() == 4 && y.scalar_type() == at::kFloat && y.is_contiguous() && y.device().is_cpu(), op,
              ": y must be a contiguous float32 CPU tensor (B, C, H, W)");
  HeadShape s{y.size(0), y.size(1), y.size(2) * y.size(3), static_cast<int64_t>(pooled.size()), 0, hidden};
  s.width = (s.n + 1) * s.channels;
  for (const auto& p : pooled) {
    TORCH_CHECK(p.sizes() == at::IntArrayRef({s.batch, s.channels}) && p.scalar_type() == at::kFloat &&
                p.is_contiguous() && p.device().is_cpu(), op,
                ": each pooled inbound must be contiguous float32 (B, C)");
  }
  return s;
}

// The gate's parameters and BatchNorm statistics fit the head's shape: fc1 (M, (n + 1) C[, 1, 1]), fc2
// ((n + 1) C, M[, 1, 1]), one valid-channel count per inbound; contiguous float32 on the CPU.
void check_gate_params(const char* op, const HeadShape& s, const at::Tensor& fc1, const at::Tensor& bn_weight,
                       const at::Tensor& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var,
                       const at::Tensor& fc2, const at::Tensor& fc2_bias, at::IntArrayRef valid_channels) {
  TORCH_CHECK(fc1.numel() == s.hidden * s.width && fc1.size(0) == s.hidden && fc2.numel() == s.width * s.hidden &&
              fc2.size(0) == s.width && fc2_bias.numel() == s.width && bn_bias.numel() == s.hidden &&
              running_mean.numel() == s.hidden && running_var.numel() == s.hidden &&
              static_cast<int64_t>(valid_channels.size()) == s.n,
              op, ": the gate's parameters do not fit (fc1 ", fc1.sizes(), ", fc2 ", fc2.sizes(), ") for ", s.n,
              " inbounds of ", s.channels, " channels");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &fc1, &bn_weight, &bn_bias, &running_mean, &running_var, &fc2, &fc2_bias}) {
    check_float_cpu(*t, "each gate parameter");
  }
}

// Inference (the BatchNorm with its running statistics): the same parameters as gate_head_train, no saved values.
// The BatchNorm is folded into fc1 per hidden unit here, each call (M numbers), so nothing is cached between calls.
std::tuple<at::Tensor, at::Tensor> gate_head_eval(
    const at::Tensor& y, const std::vector<at::Tensor>& pooled, const at::Tensor& fc1, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
    const at::Tensor& fc2, const at::Tensor& fc2_bias, at::IntArrayRef valid_channels) {
  const HeadShape s = check_head("gate_head_eval", y, pooled, bn_weight.numel());
  check_gate_params("gate_head_eval", s, fc1, bn_weight, bn_bias, running_mean, running_var, fc2, fc2_bias,
                    valid_channels);
  // h_m = scale_m * (g . fc1_m) + shift_m: the BatchNorm in inference
  std::vector<float> scale(s.hidden), shift(s.hidden);
  const float *gamma = bn_weight.data_ptr<float>(), *beta = bn_bias.data_ptr<float>();
  const float *run_mean = running_mean.data_ptr<float>(), *run_var = running_var.data_ptr<float>();
  for (int64_t m = 0; m < s.hidden; ++m) {
    scale[m] = gamma[m] / std::sqrt(run_var[m] + static_cast<float>(eps));
    shift[m] = beta[m] - run_mean[m] * scale[m];
  }
  at::Tensor v = at::empty({s.batch, s.channels}, y.options());
  at::Tensor w = at::empty({s.batch, s.n, s.channels}, y.options());
  const float* y_data = y.data_ptr<float>();
  const float *fc1_data = fc1.data_ptr<float>(), *fc2_data = fc2.data_ptr<float>();
  const float* b2_data = fc2_bias.data_ptr<float>();
  float *v_data = v.data_ptr<float>(), *w_data = w.data_ptr<float>();
  std::vector<const float*> pooled_data;
  for (const auto& p : pooled) pooled_data.push_back(p.data_ptr<float>());
  const float minus_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, s.batch, grain_for(s.channels * s.hw), [&](int64_t begin, int64_t end) {
    std::vector<float> g(s.width), r(s.hidden), logits(s.width), top(s.channels), total(s.channels);
    for (int64_t b = begin; b < end; ++b) {
      gate_input(y_data, pooled_data, b, s.channels, s.hw, g.data());
      for (int64_t m = 0; m < s.hidden; ++m) {
        const float h_m = scale[m] * dot(g.data(), fc1_data + m * s.width, s.width) + shift[m];
        r[m] = h_m < 0.0f ? 0.0f : h_m;  // ReLU (keeps NaN)
      }
      for (int64_t j = 0; j < s.width; ++j) logits[j] = b2_data[j] + dot(r.data(), fc2_data + j * s.hidden, s.hidden);
      for (int64_t k = 0; k < s.n; ++k) {  // zero-padded channels of inbound k: out of the softmax
        std::fill(logits.begin() + (k + 1) * s.channels + valid_channels[k], logits.begin() + (k + 2) * s.channels,
                  minus_inf);
      }
      gates_from_logits(logits.data(), s.channels, s.n, v_data + b * s.channels, w_data + b * s.n * s.channels,
                        top.data(), total.data());
    }
  });
  return {v, w};
}

// Training (or any use of the gate's own BatchNorm): returns [v, w] and what the backward needs, [g, h, r, mean,
// invstd, fc2^T]. With use_batch_stats, h is normalised with its batch statistics and the running statistics are
// updated as BatchNorm does (momentum, unbiased variance); otherwise with the running statistics.
// fc1: (M, (n + 1) C[, 1, 1]); fc2: ((n + 1) C, M[, 1, 1]); valid_channels: per inbound, its real leading channels.
std::vector<at::Tensor> gate_head_train(
    const at::Tensor& y, const std::vector<at::Tensor>& pooled, const at::Tensor& fc1, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, at::Tensor running_mean, at::Tensor running_var, bool use_batch_stats,
    double momentum, double eps, const at::Tensor& fc2, const at::Tensor& fc2_bias, at::IntArrayRef valid_channels) {
  const HeadShape s = check_head("gate_head_train", y, pooled, bn_weight.numel());
  check_gate_params("gate_head_train", s, fc1, bn_weight, bn_bias, running_mean, running_var, fc2, fc2_bias,
                    valid_channels);
  TORCH_CHECK(!use_batch_stats || s.batch > 1, "gate_head_train: batch statistics need more than one sample");
  const auto opts = y.options();
  at::Tensor v = at::empty({s.batch, s.channels}, opts), w = at::empty({s.batch, s.n, s.channels}, opts);
  at::Tensor g = at::empty({s.batch, s.width}, opts), h = at::empty({s.batch, s.hidden}, opts);
  at::Tensor r = at::empty({s.batch, s.hidden}, opts);
  at::Tensor mean = at::empty({s.hidden}, opts), invstd = at::empty({s.hidden}, opts);
  at::Tensor fc2_t = at::empty({s.hidden, s.width}, opts);
  const float* y_data = y.data_ptr<float>();
  const float* fc1_data = fc1.data_ptr<float>();
  float *g_data = g.data_ptr<float>(), *h_data = h.data_ptr<float>(), *r_data = r.data_ptr<float>();
  std::vector<const float*> pooled_data;
  for (const auto& p : pooled) pooled_data.push_back(p.data_ptr<float>());
  at::parallel_for(0, s.batch, grain_for(s.channels * s.hw + s.width * s.hidden), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* g_row = g_data + b * s.width;
      gate_input(y_data, pooled_data, b, s.channels, s.hw, g_row);
      for (int64_t m = 0; m < s.hidden; ++m) h_data[b * s.hidden + m] = dot(g_row, fc1_data + m * s.width, s.width);
    }
  });
  // BatchNorm over the batch, per hidden unit (two passes, as ATen: the variance of the centred values)
  float *mean_data = mean.data_ptr<float>(), *invstd_data = invstd.data_ptr<float>();
  float *run_mean = running_mean.data_ptr<float>(), *run_var = running_var.data_ptr<float>();
  const float *gamma = bn_weight.data_ptr<float>(), *beta = bn_bias.data_ptr<float>();
  for (int64_t m = 0; m < s.hidden; ++m) {
    if (use_batch_stats) {
      double total = 0.0, squares = 0.0;
      for (int64_t b = 0; b < s.batch; ++b) total += h_data[b * s.hidden + m];
      const double mu = total / s.batch;
      for (int64_t b = 0; b < s.batch; ++b) {
        const double d = h_data[b * s.hidden + m] - mu;
        squares += d * d;
      }
      const double var = squares / s.batch;
      mean_data[m] = static_cast<float>(mu);
      invstd_data[m] = static_cast<float>(1.0 / std::sqrt(var + eps));
      run_mean[m] = static_cast<float>((1.0 - momentum) * run_mean[m] + momentum * mu);
      run_var[m] = static_cast<float>((1.0 - momentum) * run_var[m] + momentum * var * s.batch / (s.batch - 1));
    } else {
      mean_data[m] = run_mean[m];
      invstd_data[m] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(run_var[m]) + eps));
    }
  }
  for (int64_t b = 0; b < s.batch; ++b) {
    #pragma omp simd
    for (int64_t m = 0; m < s.hidden; ++m) {
      const float norm = (h_data[b * s.hidden + m] - mean_data[m]) * invstd_data[m] * gamma[m] + beta[m];
      r_data[b * s.hidden + m] = norm < 0.0f ? 0.0f : norm;  // ReLU, keeps NaN as torch's
    }
  }
  float* fc2_t_data = fc2_t.data_ptr<float>();
  transpose(fc2.data_ptr<float>(), fc2_t_data, s.width, s.hidden);
  // fc2, with the padding mask as -inf logits
  std::vector<float> mask_bias(fc2_bias.data_ptr<float>(), fc2_bias.data_ptr<float>() + s.width);
  for (int64_t k = 0; k < s.n; ++k) {
    for (int64_t c = valid_channels[k]; c < s.channels; ++c) {
      mask_bias[(k + 1) * s.channels + c] = -std::numeric_limits<float>::infinity();
    }
  }
  float *v_data = v.data_ptr<float>(), *w_data = w.data_ptr<float>();
  at::parallel_for(0, s.batch, grain_for(s.width * s.hidden), [&](int64_t begin, int64_t end) {
    std::vector<float> logits(s.width), top(s.channels), total(s.channels);
    for (int64_t b = begin; b < end; ++b) {
      std::copy(mask_bias.begin(), mask_bias.end(), logits.begin());
      for (int64_t m = 0; m < s.hidden; ++m) {
        axpy(r_data[b * s.hidden + m], fc2_t_data + m * s.width, logits.data(), s.width);
      }
      gates_from_logits(logits.data(), s.channels, s.n, v_data + b * s.channels, w_data + b * s.n * s.channels,
                        top.data(), total.data());
    }
  });
  return {v, w, g, h, r, mean, invstd, fc2_t};
}

// The gradients of gate_head_train given those of v and w (undefined: zero), from what it saved. Returns
// [grad of y's means (B, C): y's gradient is it divided by H W, broadcast; grad_pooled_1..n (B, C); grad_fc1 (M,
// (n + 1) C); grad_bn_weight; grad_bn_bias; grad_fc2 ((n + 1) C, M); grad_fc2_bias].
std::vector<at::Tensor> gate_head_train_backward(
    const c10::optional<at::Tensor>& grad_v, const c10::optional<at::Tensor>& grad_w, const at::Tensor& v,
    const at::Tensor& w, const at::Tensor& g, const at::Tensor& h, const at::Tensor& r, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& fc2_t, const at::Tensor& fc1, const at::Tensor& bn_weight,
    bool use_batch_stats) {
  const int64_t batch = v.size(0), channels = v.size(1), n = w.size(1), width = g.size(1), hidden = h.size(1);
  TORCH_CHECK(w.sizes() == at::IntArrayRef({batch, n, channels}) && width == (n + 1) * channels &&
              g.size(0) == batch && h.sizes() == r.sizes() && h.size(0) == batch && mean.numel() == hidden &&
              invstd.numel() == hidden && fc2_t.sizes() == at::IntArrayRef({hidden, width}) &&
              fc1.numel() == hidden * width && bn_weight.numel() == hidden,
              "gate_head_train_backward: the saved tensors do not fit together");
  for (const auto* t : {&v, &w, &g, &h, &r, &mean, &invstd, &fc2_t, &fc1, &bn_weight}) {
    check_float_cpu(*t, "each input");
  }
  const bool has_grad_v = grad_v.has_value() && grad_v->defined(), has_grad_w = grad_w.has_value() && grad_w->defined();
  if (has_grad_v) TORCH_CHECK(grad_v->sizes() == v.sizes(), "gate_head_train_backward: grad_v must be shaped like v");
  if (has_grad_w) TORCH_CHECK(grad_w->sizes() == w.sizes(), "gate_head_train_backward: grad_w must be shaped like w");
  const at::Tensor gv = has_grad_v ? grad_v->contiguous() : at::zeros_like(v);
  const at::Tensor gw = has_grad_w ? grad_w->contiguous() : at::zeros_like(w);
  const auto opts = v.options();
  at::Tensor grad_logits = at::empty({batch, width}, opts), grad_r = at::empty({batch, hidden}, opts);
  const float *gv_data = gv.data_ptr<float>(), *gw_data = gw.data_ptr<float>();
  const float *v_data = v.data_ptr<float>(), *w_data = w.data_ptr<float>(), *r_data = r.data_ptr<float>();
  const float* fc2_t_data = fc2_t.data_ptr<float>();
  float *gl_data = grad_logits.data_ptr<float>(), *gr_data = grad_r.data_ptr<float>();
  // per sample: the logits' gradient (sigmoid's and softmax's backward), then fc2's input gradient through ReLU
  at::parallel_for(0, batch, grain_for(width * hidden), [&](int64_t begin, int64_t end) {
    std::vector<float> weighted(channels);
    for (int64_t b = begin; b < end; ++b) {
      float* gl = gl_data + b * width;
      const float *gv_row = gv_data + b * channels, *v_row = v_data + b * channels;
      #pragma omp simd
      for (int64_t c = 0; c < channels; ++c) gl[c] = gv_row[c] * v_row[c] * (1.0f - v_row[c]);
      const float *gw_s = gw_data + b * n * channels, *w_s = w_data + b * n * channels;
      std::fill(weighted.begin(), weighted.end(), 0.0f);  // sum_k grad_w * w, per channel
      for (int64_t k = 0; k < n; ++k) {
        #pragma omp simd
        for (int64_t c = 0; c < channels; ++c) weighted[c] += gw_s[k * channels + c] * w_s[k * channels + c];
      }
      for (int64_t k = 0; k < n; ++k) {
        #pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          gl[(k + 1) * channels + c] = w_s[k * channels + c] * (gw_s[k * channels + c] - weighted[c]);
        }
      }
      for (int64_t m = 0; m < hidden; ++m) {
        gr_data[b * hidden + m] = r_data[b * hidden + m] > 0.0f ? dot(gl, fc2_t_data + m * width, width) : 0.0f;
      }
    }
  });
  // BatchNorm's backward, per hidden unit
  at::Tensor grad_h = at::empty({batch, hidden}, opts);
  at::Tensor grad_bn_weight = at::empty({hidden}, opts), grad_bn_bias = at::empty({hidden}, opts);
  const float *h_data = h.data_ptr<float>(), *mean_data = mean.data_ptr<float>();
  const float *invstd_data = invstd.data_ptr<float>(), *gamma = bn_weight.data_ptr<float>();
  float *gh_data = grad_h.data_ptr<float>(), *ggamma = grad_bn_weight.data_ptr<float>();
  float* gbeta = grad_bn_bias.data_ptr<float>();
  for (int64_t m = 0; m < hidden; ++m) {
    float sum_dy = 0.0f, sum_dy_xhat = 0.0f;
    for (int64_t b = 0; b < batch; ++b) {
      const float dy = gr_data[b * hidden + m];
      sum_dy += dy;
      sum_dy_xhat += dy * (h_data[b * hidden + m] - mean_data[m]) * invstd_data[m];
    }
    ggamma[m] = sum_dy_xhat;
    gbeta[m] = sum_dy;
    const float scale = gamma[m] * invstd_data[m];
    for (int64_t b = 0; b < batch; ++b) {
      const float dy = gr_data[b * hidden + m];
      if (use_batch_stats) {  // the batch's mean and variance depend on h too
        const float xhat = (h_data[b * hidden + m] - mean_data[m]) * invstd_data[m];
        gh_data[b * hidden + m] = scale * (dy - (sum_dy + xhat * sum_dy_xhat) / static_cast<float>(batch));
      } else {
        gh_data[b * hidden + m] = scale * dy;
      }
    }
  }
  // the weight gradients, per row: fc2's (as fc2^T, then transposed) and fc1's; fc2's bias
  at::Tensor grad_fc2_t = at::zeros({hidden, width}, opts), grad_fc1 = at::zeros({hidden, width}, opts);
  at::Tensor grad_fc2_bias = at::zeros({width}, opts);
  const float* g_data = g.data_ptr<float>();
  float *gfc2_t = grad_fc2_t.data_ptr<float>(), *gfc1 = grad_fc1.data_ptr<float>();
  at::parallel_for(0, hidden, grain_for(2 * batch * width), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t b = 0; b < batch; ++b) {
        axpy(r_data[b * hidden + m], gl_data + b * width, gfc2_t + m * width, width);
        axpy(gh_data[b * hidden + m], g_data + b * width, gfc1 + m * width, width);
      }
    }
  });
  float* gb2 = grad_fc2_bias.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) axpy(1.0f, gl_data + b * width, gb2, width);
  at::Tensor grad_fc2 = at::empty({width, hidden}, opts);
  transpose(gfc2_t, grad_fc2.data_ptr<float>(), hidden, width);
  // the input gradient, per sample, written into y's means' gradient and each inbound's
  std::vector<at::Tensor> result{at::empty({batch, channels}, opts)};
  for (int64_t k = 0; k < n; ++k) result.push_back(at::empty({batch, channels}, opts));
  std::vector<float*> part_data;
  for (const auto& t : result) part_data.push_back(t.data_ptr<float>());
  const float* fc1_data = fc1.data_ptr<float>();
  at::parallel_for(0, batch, grain_for(width * hidden), [&](int64_t begin, int64_t end) {
    std::vector<float> grad_g(width);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(grad_g.begin(), grad_g.end(), 0.0f);
      for (int64_t m = 0; m < hidden; ++m) axpy(gh_data[b * hidden + m], fc1_data + m * width, grad_g.data(), width);
      for (int64_t k = 0; k <= n; ++k) std::copy_n(grad_g.data() + k * channels, channels, part_data[k] + b * channels);
    }
  });
  result.insert(result.end(), {grad_fc1, grad_bn_weight, grad_bn_bias, grad_fc2, grad_fc2_bias});
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(timm_denseres, m) {
  m.def("gate_head_eval(Tensor y, Tensor[] pooled, Tensor fc1, Tensor bn_weight, Tensor bn_bias, Tensor running_mean, "
        "Tensor running_var, float eps, Tensor fc2, Tensor fc2_bias, int[] valid_channels) -> (Tensor, Tensor)");
  m.def("gate_head_train(Tensor y, Tensor[] pooled, Tensor fc1, Tensor bn_weight, Tensor bn_bias, "
        "Tensor(a!) running_mean, Tensor(b!) running_var, bool use_batch_stats, float momentum, float eps, "
        "Tensor fc2, Tensor fc2_bias, int[] valid_channels) -> Tensor[]");
  m.def("gate_head_train_backward(Tensor? grad_v, Tensor? grad_w, Tensor v, Tensor w, Tensor g, Tensor h, Tensor r, "
        "Tensor mean, Tensor invstd, Tensor fc2_t, Tensor fc1, Tensor bn_weight, bool use_batch_stats) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(timm_denseres, CPU, m) {
  m.impl("gate_head_eval", &gate_head_eval);
  m.impl("gate_head_train", &gate_head_train);
  m.impl("gate_head_train_backward", &gate_head_train_backward);
}
