// Multi-scale deformable attention: what the CPU and CUDA kernels share.
//
// Layouts (all contiguous; legend as in DESIGN.md):
//   value               (B, S, M, D)        S = sum_l H_l * W_l, levels one after another
//   spatial_shapes      (L, 2) int64        (H_l, W_l)
//   level_start_index   (L,) int64          offset of level l in S
//   sampling_locations  (B, Lq, M, L, P, 2) normalised (x, y), pixel centres at (i + 0.5) / size
//   attention_weights   (B, Lq, M, L, P)
//   output              (B, Lq, M * D)
// Locations and weights use the op-math type of the value dtype (float for half, bfloat16 and float;
// double for double): a 16-bit location would be off by up to half a pixel on a 168-pixel-wide map.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

#if defined(__CUDACC__)
#define M2F_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define M2F_HOST_DEVICE inline
#endif

namespace m2f {

// Problem sizes, read once from the tensors and passed by value to the kernels.
struct Sizes {
  int64_t batch, spatial, heads, channels, queries, levels, points;
};

inline Sizes sizes_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0), value.size(1), value.size(2), value.size(3),
          sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

// The four bilinear neighbours of one sampling location on one level.
template <typename acc_t>
struct BilinearSample {
  int64_t index[4];  // y * W + x of each neighbour inside the level
  bool inside[4];    // neighbours outside the map contribute zero (grid_sample's zero padding)
  acc_t weight[4];   // bilinear weight of each neighbour
  acc_t grad_x[4];   // d weight / d x in pixels
  acc_t grad_y[4];   // d weight / d y in pixels
};

// floor() for values > -1 without a libm call, identical on host and device.
template <typename acc_t>
M2F_HOST_DEVICE int64_t floor_above_minus_one(acc_t v) {
  const int64_t truncated = static_cast<int64_t>(v);
  return v < static_cast<acc_t>(truncated) ? truncated - 1 : truncated;
}

// Fills `s` for the normalised location (x, y) on a height x width map. Returns false when the
// location is so far outside that all four neighbours are (the original kernel's -1 < h < H test),
// which also rejects NaN locations.
template <typename acc_t>
M2F_HOST_DEVICE bool bilinear_sample(acc_t x, acc_t y, int64_t height, int64_t width, BilinearSample<acc_t>& s) {
  // align_corners=False: pixel i covers [i, i + 1) * size, so its centre is at normalised (i + 0.5) / size.
  const acc_t px = x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  const acc_t py = y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  if (!(px > -1 && py > -1 && px < static_cast<acc_t>(width) && py < static_cast<acc_t>(height))) {
    return false;
  }
  const int64_t x0 = floor_above_minus_one(px);
  const int64_t y0 = floor_above_minus_one(py);
  const acc_t fx = px - static_cast<acc_t>(x0);
  const acc_t fy = py - static_cast<acc_t>(y0);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int corner = 0; corner < 4; ++corner) {
    const int dx = corner & 1;
    const int dy = corner >> 1;
    const int64_t xi = x0 + dx;
    const int64_t yi = y0 + dy;
    const acc_t wx = dx ? fx : 1 - fx;
    const acc_t wy = dy ? fy : 1 - fy;
    s.index[corner] = yi * width + xi;
    s.inside[corner] = xi >= 0 && xi < width && yi >= 0 && yi < height;
    s.weight[corner] = wx * wy;
    s.grad_x[corner] = dx ? wy : -wy;
    s.grad_y[corner] = dy ? wx : -wx;
  }
  return true;
}

// Implemented once per device (ms_deform_attn_cpu.cpp, ms_deform_attn_cuda.cu). The binding has already
// checked shapes, dtypes and devices and made every input contiguous.
c10::DeviceType kernel_device();

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights);

// Returns (grad_value, grad_sampling_locations, grad_attention_weights).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

}  // namespace m2f
