// The dense block's output in one pass over its maps (CPU, float32, contiguous NCHW):
//   out = act(v * y + sum_k w_k * a_k),  out_mean = mean over H, W of out
// and its backward in one pass. v: (B, C); w: (B, n, C); inbound a_k: (B, c_k, H, W) with c_k <= C, standing for
// itself zero-padded to C channels (it adds to its first c_k channels only). act: ReLU or none.
// Eager PyTorch needs a read-modify-write of the sum per inbound, and a gradient plus an accumulation per inbound
// in backward; here each map is read once. Python side: timm_denseres/_kernels.py. The gate's small
// layers, which give v and w: gate_head.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kChunk = 256;  // elements of one row summed in a stack buffer (stays in L1)
constexpr int64_t kMaxInbounds = 64;

struct Rows {  // per inbound: data pointer and width
  std::vector<const float*> data;
  std::vector<int64_t> width;
};

Rows inbound_rows(const std::vector<at::Tensor>& inbounds) {
  Rows rows;
  for (const auto& a : inbounds) {
    rows.data.push_back(a.data_ptr<float>());
    rows.width.push_back(a.size(1));
  }
  return rows;
}

int64_t grain_rows(int64_t hw) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(hw, 1)); }

void check_inputs(
    const at::Tensor& y, const at::Tensor& v, const at::Tensor& w, const std::vector<at::Tensor>& inbounds) {
  const int64_t n = static_cast<int64_t>(inbounds.size());
  TORCH_CHECK(n <= kMaxInbounds, "gate_mix: at most ", kMaxInbounds, " inbounds");
  TORCH_CHECK(y.dim() == 4 && y.scalar_type() == at::kFloat && y.is_contiguous() && y.device().is_cpu(),
              "gate_mix: y must be a contiguous float32 CPU tensor (B, C, H, W)");
  const int64_t batch = y.size(0), channels = y.size(1);
  TORCH_CHECK(v.sizes() == at::IntArrayRef({batch, channels}) && v.scalar_type() == at::kFloat && v.is_contiguous(),
              "gate_mix: v must be contiguous float32 (B, C)");
  TORCH_CHECK(w.sizes() == at::IntArrayRef({batch, n, channels}) && w.scalar_type() == at::kFloat &&
              w.is_contiguous(), "gate_mix: w must be contiguous float32 (B, n, C)");
  for (const auto& a : inbounds) {
    TORCH_CHECK(a.dim() == 4 && a.size(0) == batch && a.size(1) <= channels && a.size(2) == y.size(2) &&
                a.size(3) == y.size(3) && a.scalar_type() == at::kFloat && a.is_contiguous() && a.device().is_cpu(),
                "gate_mix: each inbound must be contiguous float32 (B, c <= C, H, W) like y");
  }
}

std::tuple<at::Tensor, at::Tensor> gate_mix(
    const at::Tensor& y, const at::Tensor& v, const at::Tensor& w, const std::vector<at::Tensor>& inbounds,
    bool relu, bool inplace) {
  check_inputs(y, v, w, inbounds);
  const int64_t batch = y.size(0), channels = y.size(1), hw = y.size(2) * y.size(3);
  const int64_t n = static_cast<int64_t>(inbounds.size());
  at::Tensor out = inplace ? y : at::empty_like(y);
  at::Tensor out_mean = at::empty({batch, channels}, y.options());
  const float* y_data = y.data_ptr<float>();
  const float* v_data = v.data_ptr<float>();
  const float* w_data = w.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  float* mean_data = out_mean.data_ptr<float>();
  const Rows rows = inbound_rows(inbounds);
  const float inv_hw = 1.0f / static_cast<float>(hw);
  at::parallel_for(0, batch * channels, grain_rows(hw), [&](int64_t begin, int64_t end) {
    float acc[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / channels, c = row % channels;
      const float scale = v_data[row];
      const float* y_row = y_data + row * hw;
      float* out_row = out_data + row * hw;
      float total = 0.0f;
      for (int64_t start = 0; start < hw; start += kChunk) {
        const int64_t len = std::min(kChunk, hw - start);
        #pragma omp simd
        for (int64_t j = 0; j < len; ++j) acc[j] = scale * y_row[start + j];
        for (int64_t k = 0; k < n; ++k) {
          const int64_t width = rows.width[k];
          if (c >= width) continue;  // zero padding: adds nothing
          const float weight = w_data[(b * n + k) * channels + c];
          const float* a_row = rows.data[k] + (b * width + c) * hw + start;
          #pragma omp simd
          for (int64_t j = 0; j < len; ++j) acc[j] += weight * a_row[j];
        }
        if (relu) {
          #pragma omp simd
          for (int64_t j = 0; j < len; ++j) acc[j] = acc[j] < 0.0f ? 0.0f : acc[j];  // keeps NaN, as torch.relu
        }
        #pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < len; ++j) {
          out_row[start + j] = acc[j];
          total += acc[j];
        }
      }
      mean_data[row] = total * inv_hw;
    }
  });
  return {out, out_mean};
}

// Gradients of gate_mix given those of out (grad) and of out_mean (grad_mean, may be undefined).
// Returns [grad_y, grad_v, grad_w, grad_a_1, ..., grad_a_n]; grad_w is 0 where an inbound is padding.
std::vector<at::Tensor> gate_mix_backward(
    const at::Tensor& grad, const c10::optional<at::Tensor>& grad_mean, const at::Tensor& out, const at::Tensor& y,
    const at::Tensor& v, const at::Tensor& w, const std::vector<at::Tensor>& inbounds, bool relu) {
  const int64_t batch = y.size(0), channels = y.size(1), hw = y.size(2) * y.size(3);
  const int64_t n = static_cast<int64_t>(inbounds.size());
  check_inputs(y, v, w, inbounds);
  TORCH_CHECK(grad.sizes() == y.sizes() && grad.is_contiguous() && out.sizes() == y.sizes() && out.is_contiguous(),
              "gate_mix_backward: grad and out must be contiguous and shaped like y");
  TORCH_CHECK(!grad_mean.has_value() || !grad_mean->defined() ||
              (grad_mean->sizes() == v.sizes() && grad_mean->is_contiguous()),
              "gate_mix_backward: grad_mean must be contiguous (B, C)");
  at::Tensor grad_y = at::empty_like(y), grad_v = at::empty_like(v), grad_w = at::zeros_like(w);
  std::vector<at::Tensor> grad_inbounds;
  std::vector<float*> grad_a_data;
  for (const auto& a : inbounds) {
    grad_inbounds.push_back(at::empty_like(a));
    grad_a_data.push_back(grad_inbounds.back().data_ptr<float>());
  }
  const bool has_mean_grad = grad_mean.has_value() && grad_mean->defined();
  const float* g_data = grad.data_ptr<float>();
  const float* gm_data = has_mean_grad ? grad_mean->data_ptr<float>() : nullptr;
  const float* out_data = out.data_ptr<float>();
  const float* y_data = y.data_ptr<float>();
  const float* v_data = v.data_ptr<float>();
  const float* w_data = w.data_ptr<float>();
  float* gy_data = grad_y.data_ptr<float>();
  float* gv_data = grad_v.data_ptr<float>();
  float* gw_data = grad_w.data_ptr<float>();
  const Rows rows = inbound_rows(inbounds);
  const float inv_hw = 1.0f / static_cast<float>(hw);
  at::parallel_for(0, batch * channels, grain_rows(hw), [&](int64_t begin, int64_t end) {
    float g_pre[kChunk];  // gradient before the activation
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / channels, c = row % channels;
      const float scale = v_data[row];
      const float mean_part = has_mean_grad ? gm_data[row] * inv_hw : 0.0f;
      const float* g_row = g_data + row * hw;
      const float* out_row = out_data + row * hw;
      const float* y_row = y_data + row * hw;
      float* gy_row = gy_data + row * hw;
      float sum_v = 0.0f;
      float sum_w[kMaxInbounds] = {0.0f};
      for (int64_t start = 0; start < hw; start += kChunk) {
        const int64_t len = std::min(kChunk, hw - start);
        #pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const float g = g_row[start + j] + mean_part;
          g_pre[j] = (!relu || out_row[start + j] > 0.0f) ? g : 0.0f;
        }
        #pragma omp simd reduction(+ : sum_v)
        for (int64_t j = 0; j < len; ++j) {
          sum_v += g_pre[j] * y_row[start + j];
          gy_row[start + j] = scale * g_pre[j];
        }
        for (int64_t k = 0; k < n; ++k) {
          const int64_t width = rows.width[k];
          if (c >= width) continue;
          const float weight = w_data[(b * n + k) * channels + c];
          const int64_t offset = (b * width + c) * hw + start;
          const float* a_row = rows.data[k] + offset;
          float* ga_row = grad_a_data[k] + offset;
          float s = 0.0f;
          #pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < len; ++j) {
            s += g_pre[j] * a_row[j];
            ga_row[j] = weight * g_pre[j];
          }
          sum_w[k] += s;
        }
      }
      gv_data[row] = sum_v;
      for (int64_t k = 0; k < n; ++k) {
        if (c < rows.width[k]) gw_data[(b * n + k) * channels + c] = sum_w[k];
      }
    }
  });
  std::vector<at::Tensor> result{grad_y, grad_v, grad_w};
  result.insert(result.end(), grad_inbounds.begin(), grad_inbounds.end());
  return result;
}

}  // namespace

TORCH_LIBRARY(timm_denseres, m) {
  m.def("gate_mix(Tensor y, Tensor v, Tensor w, Tensor[] inbounds, bool relu, bool inplace) -> (Tensor, Tensor)");
  m.def("gate_mix_backward(Tensor grad, Tensor? grad_mean, Tensor out, Tensor y, Tensor v, Tensor w, "
        "Tensor[] inbounds, bool relu) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(timm_denseres, CPU, m) {
  m.impl("gate_mix", &gate_mix);
  m.impl("gate_mix_backward", &gate_mix_backward);
}
