// CPU kernels of multi-scale deformable attention, parallel with at::parallel_for (OpenMP).
//
// They never materialise the (B*M, D, Lq, L*P) sampled tensor of the grid_sample reference: each
// (b, q, m) accumulates its D channels directly, so memory is the inputs, outputs and gradients only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn.h"

namespace m2f {
namespace {

// Multiply-adds worth one parallel task (ATen's own grain size): waking the OpenMP threads for less work
// costs more than it saves, and much more when the cores are shared.
constexpr int64_t kGrainWork = 32768;

// Smallest number of parallel items whose work (about `work_per_item` multiply-adds each) reaches kGrainWork.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_item));
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const Sizes& n, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const acc_t* locations, const acc_t* weights, scalar_t* out) {
  const int64_t samples = n.levels * n.points;
  const int64_t row = n.heads * n.channels;  // stride between spatial positions in value
  // Every (b, q, m) writes only its own D outputs, so any split of the rows is race-free.
  const int64_t grain = grain_for(samples * n.channels);
  at::parallel_for(0, n.batch * n.queries * n.heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(n.channels);
    for (int64_t bqm = begin; bqm < end; ++bqm) {
      const int64_t b = bqm / (n.queries * n.heads);
      const int64_t m = bqm % n.heads;
      const scalar_t* value_bm = value + (b * n.spatial * n.heads + m) * n.channels;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t l = 0; l < n.levels; ++l) {
        const scalar_t* level = value_bm + starts[l] * row;
        for (int64_t p = 0; p < n.points; ++p) {
          const int64_t k = bqm * samples + l * n.points + p;
          BilinearSample<acc_t> s;
          if (!bilinear_sample(locations[2 * k], locations[2 * k + 1], shapes[2 * l], shapes[2 * l + 1], s)) {
            continue;
          }
          for (int corner = 0; corner < 4; ++corner) {
            if (!s.inside[corner]) {
              continue;
            }
            const acc_t w = weights[k] * s.weight[corner];
            const scalar_t* v = level + s.index[corner] * row;
#pragma omp simd
            for (int64_t c = 0; c < n.channels; ++c) {
              acc[c] += w * static_cast<acc_t>(v[c]);
            }
          }
        }
      }
      scalar_t* o = out + bqm * n.channels;
      for (int64_t c = 0; c < n.channels; ++c) {
        o[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const Sizes& n, const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes,
                     const int64_t* starts, const acc_t* locations, const acc_t* weights, acc_t* grad_value,
                     acc_t* grad_locations, acc_t* grad_weights) {
  const int64_t samples = n.levels * n.points;
  const int64_t row = n.heads * n.channels;
  // grad_value of (b, m) receives scatter-adds from every query of (b, m) and from nothing else, so one
  // (b, m) per task makes all writes disjoint without atomics or per-thread copies.
  const int64_t grain = grain_for(n.queries * samples * n.channels);
  at::parallel_for(0, n.batch * n.heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(n.channels);
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / n.heads;
      const int64_t m = bm % n.heads;
      const int64_t offset = (b * n.spatial * n.heads + m) * n.channels;
      for (int64_t q = 0; q < n.queries; ++q) {
        const int64_t bqm = (b * n.queries + q) * n.heads + m;
        for (int64_t c = 0; c < n.channels; ++c) {
          g[c] = static_cast<acc_t>(grad_out[bqm * n.channels + c]);
        }
        for (int64_t l = 0; l < n.levels; ++l) {
          const int64_t height = shapes[2 * l];
          const int64_t width = shapes[2 * l + 1];
          const scalar_t* level = value + offset + starts[l] * row;
          acc_t* grad_level = grad_value + offset + starts[l] * row;
          for (int64_t p = 0; p < n.points; ++p) {
            const int64_t k = bqm * samples + l * n.points + p;
            const acc_t a = weights[k];
            // Sums over the head's channels of grad_out . (value, d value / dx, d value / dy).
            acc_t d_weight = 0;
            acc_t d_x = 0;
            acc_t d_y = 0;
            BilinearSample<acc_t> s;
            if (bilinear_sample(locations[2 * k], locations[2 * k + 1], height, width, s)) {
              for (int corner = 0; corner < 4; ++corner) {
                if (!s.inside[corner]) {
                  continue;
                }
                const scalar_t* v = level + s.index[corner] * row;
                acc_t* gv = grad_level + s.index[corner] * row;
                const acc_t wa = a * s.weight[corner];
                acc_t dot = 0;
                // value, grad_value and g never overlap, and the sum may be reordered: vectorise.
#pragma omp simd reduction(+ : dot)
                for (int64_t c = 0; c < n.channels; ++c) {
                  dot += g[c] * static_cast<acc_t>(v[c]);
                  gv[c] += wa * g[c];
                }
                d_weight += s.weight[corner] * dot;
                d_x += s.grad_x[corner] * dot;
                d_y += s.grad_y[corner] * dot;
              }
            }
            grad_weights[k] = d_weight;
            // Pixel coordinates are x * W - 0.5 and y * H - 0.5, hence the factors W and H.
            grad_locations[2 * k] = a * d_x * static_cast<acc_t>(width);
            grad_locations[2 * k + 1] = a * d_y * static_cast<acc_t>(height);
          }
        }
      }
    }
  });
}

}  // namespace

c10::DeviceType kernel_device() {
  return c10::DeviceType::CPU;
}

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  const Sizes n = sizes_of(value, sampling_locations);
  auto out = at::empty({n.batch, n.queries, n.heads * n.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(
        n, value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
        level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<acc_t>(),
        attention_weights.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const Sizes n = sizes_of(value, sampling_locations);
  // Accumulate in op-math precision; a 16-bit grad_value would round away small contributions.
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(at::toOpMathType(value.scalar_type())));
  auto grad_locations = at::empty_like(sampling_locations);
  auto grad_weights = at::empty_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t>(
        n, grad_output.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
        spatial_shapes.const_data_ptr<int64_t>(), level_start_index.const_data_ptr<int64_t>(),
        sampling_locations.const_data_ptr<acc_t>(), attention_weights.const_data_ptr<acc_t>(),
        grad_value.mutable_data_ptr<acc_t>(), grad_locations.mutable_data_ptr<acc_t>(),
        grad_weights.mutable_data_ptr<acc_t>());
  });
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace m2f
