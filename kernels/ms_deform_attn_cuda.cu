// CUDA kernels of multi-scale deformable attention. Same structure as ms_deform_attn_cpu.cpp, with the
// (b, q, m) rows spread over a group of `lanes` threads:
//   - each lane owns V consecutive channels of the head (one 16-byte load per neighbour and lane),
//   - a block first copies its rows' sampling locations and weights to shared memory with coalesced
//     loads, so each (query, head, level, point) is read from global memory once,
//   - backward sums the per-lane partial gradients of location and weight with warp shuffles inside the
//     group (lanes is a power of two <= 32, so a group never straddles a warp) and scatters grad_value
//     with atomicAdd into an op-math (float/double) buffer.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "ms_deform_attn.h"

namespace m2f {
namespace {

constexpr int kThreadsPerBlock = 256;
// Shared memory for staged locations and weights, per block; below the 48 KB that needs no opt-in.
constexpr int64_t kMaxSharedBytes = 32 * 1024;
constexpr unsigned kFullWarp = 0xffffffffu;

// V consecutive elements moved with one vector instruction (16 bytes for the widest V).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T item[V];
};

// How the (b, q, m) rows map onto threads and blocks.
struct Launch {
  int vec;               // channels per lane: 16 bytes' worth, or 1 when D or the pointers do not allow it
  int lanes;             // threads per row, a power of two >= D / vec
  int rows_per_block;    // rows a block handles
  int threads;           // rows_per_block * lanes, rounded up to whole warps
  unsigned blocks;
  size_t shared_bytes;
};

bool is_aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

Launch plan_launch(const Sizes& n, int wide_vec, size_t acc_size, bool aligned) {
  Launch launch{};
  launch.vec = (aligned && n.channels % wide_vec == 0) ? wide_vec : 1;
  const int64_t chunks = n.channels / launch.vec;
  TORCH_CHECK_VALUE(chunks <= 32, "MSDeformAttn CUDA kernel: head dim D=", n.channels,
                    " is too large for this dtype (at most ", 32 * launch.vec,
                    " here); set impl='torch' to use the pure-PyTorch reference");
  launch.lanes = 1;
  while (launch.lanes < chunks) {
    launch.lanes *= 2;
  }
  const int64_t row_bytes = std::max<int64_t>(1, n.levels * n.points * 3 * static_cast<int64_t>(acc_size));
  TORCH_CHECK_VALUE(row_bytes <= kMaxSharedBytes, "MSDeformAttn CUDA kernel: L*P=", n.levels * n.points,
                    " sampling points per head is too many; set impl='torch' to use the pure-PyTorch reference");
  launch.rows_per_block =
      static_cast<int>(std::min<int64_t>(kThreadsPerBlock / launch.lanes, kMaxSharedBytes / row_bytes));
  launch.threads = (launch.rows_per_block * launch.lanes + 31) / 32 * 32;
  const int64_t rows = n.batch * n.queries * n.heads;
  const int64_t blocks = (rows + launch.rows_per_block - 1) / launch.rows_per_block;
  TORCH_CHECK_VALUE(blocks <= INT32_MAX, "MSDeformAttn CUDA kernel: B*Lq*M=", rows,
                    " rows is too many for one launch");
  launch.blocks = static_cast<unsigned>(blocks);
  launch.shared_bytes = static_cast<size_t>(launch.rows_per_block * row_bytes);
  return launch;
}

// Rows of this block: rows_per_block except in the last block.
__device__ __forceinline__ int rows_in_block(const Sizes& n, int64_t first_row, int rows_per_block) {
  const int64_t remaining = n.batch * n.queries * n.heads - first_row;
  return remaining < rows_per_block ? static_cast<int>(remaining) : rows_per_block;
}

// Copies the block's rows of locations (2 per sample) and weights (1 per sample) to shared memory.
// Rows are contiguous in both tensors, so the copy is one coalesced sweep each.
template <typename acc_t>
__device__ __forceinline__ void stage_samples(const acc_t* locations, const acc_t* weights, int64_t first_row,
                                              int rows, int64_t samples, acc_t* s_locations, acc_t* s_weights) {
  for (int64_t i = threadIdx.x; i < rows * samples * 2; i += blockDim.x) {
    s_locations[i] = locations[first_row * samples * 2 + i];
  }
  for (int64_t i = threadIdx.x; i < rows * samples; i += blockDim.x) {
    s_weights[i] = weights[first_row * samples + i];
  }
  __syncthreads();
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_kernel(Sizes n, int lanes, int rows_per_block, const scalar_t* __restrict__ value,
                   const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                   const acc_t* __restrict__ locations, const acc_t* __restrict__ weights,
                   scalar_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int64_t samples = n.levels * n.points;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int rows = rows_in_block(n, first_row, rows_per_block);
  acc_t* s_locations = reinterpret_cast<acc_t*>(shared);
  acc_t* s_weights = s_locations + rows_per_block * samples * 2;
  stage_samples(locations, weights, first_row, rows, samples, s_locations, s_weights);

  const int row = threadIdx.x / lanes;
  const int64_t channel = static_cast<int64_t>(threadIdx.x % lanes) * V;
  if (row >= rows || channel >= n.channels) {
    return;  // no shuffles follow, so idle threads may leave
  }
  const int64_t bqm = first_row + row;
  const int64_t b = bqm / (n.queries * n.heads);
  const int64_t m = bqm % n.heads;
  const int64_t stride = n.heads * n.channels;  // between spatial positions in value
  const scalar_t* value_bm = value + (b * n.spatial * n.heads + m) * n.channels + channel;
  acc_t acc[V] = {};
  for (int64_t l = 0; l < n.levels; ++l) {
    const int64_t height = shapes[2 * l];
    const int64_t width = shapes[2 * l + 1];
    const scalar_t* level = value_bm + starts[l] * stride;
    for (int64_t p = 0; p < n.points; ++p) {
      const int64_t k = row * samples + l * n.points + p;
      BilinearSample<acc_t> s;
      if (!bilinear_sample(s_locations[2 * k], s_locations[2 * k + 1], height, width, s)) {
        continue;
      }
#pragma unroll
      for (int corner = 0; corner < 4; ++corner) {
        if (!s.inside[corner]) {
          continue;
        }
        const acc_t w = s_weights[k] * s.weight[corner];
        const Vec<scalar_t, V> v = *reinterpret_cast<const Vec<scalar_t, V>*>(level + s.index[corner] * stride);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          acc[j] += w * static_cast<acc_t>(v.item[j]);
        }
      }
    }
  }
  Vec<scalar_t, V> result;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    result.item[j] = static_cast<scalar_t>(acc[j]);
  }
  *reinterpret_cast<Vec<scalar_t, V>*>(out + bqm * n.channels + channel) = result;
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreadsPerBlock)
    backward_kernel(Sizes n, int lanes, int rows_per_block, const scalar_t* __restrict__ grad_out,
                    const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                    const acc_t* __restrict__ locations, const acc_t* __restrict__ weights,
                    acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_locations,
                    acc_t* __restrict__ grad_weights) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int64_t samples = n.levels * n.points;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int rows = rows_in_block(n, first_row, rows_per_block);
  acc_t* s_locations = reinterpret_cast<acc_t*>(shared);
  acc_t* s_weights = s_locations + rows_per_block * samples * 2;
  stage_samples(locations, weights, first_row, rows, samples, s_locations, s_weights);

  // Every thread of the block stays to the end: the full-warp shuffles below need all 32 lanes.
  // `has_row` threads sample; `active` ones also own channels (lanes * V may exceed D).
  const int row = threadIdx.x / lanes;
  const int lane = threadIdx.x % lanes;
  const int64_t channel = static_cast<int64_t>(lane) * V;
  const bool has_row = row < rows;
  const bool active = has_row && channel < n.channels;
  const int64_t bqm = first_row + row;
  const int64_t b = bqm / (n.queries * n.heads);
  const int64_t m = bqm % n.heads;
  const int64_t stride = n.heads * n.channels;
  const int64_t offset = (b * n.spatial * n.heads + m) * n.channels + channel;

  acc_t g[V] = {};
  if (active) {
    const Vec<scalar_t, V> go = *reinterpret_cast<const Vec<scalar_t, V>*>(grad_out + bqm * n.channels + channel);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      g[j] = static_cast<acc_t>(go.item[j]);
    }
  }
  for (int64_t l = 0; l < n.levels; ++l) {
    const int64_t height = shapes[2 * l];
    const int64_t width = shapes[2 * l + 1];
    const scalar_t* level = value + offset + starts[l] * stride;
    acc_t* grad_level = grad_value + offset + starts[l] * stride;
    for (int64_t p = 0; p < n.points; ++p) {
      const int64_t k = row * samples + l * n.points + p;
      const acc_t a = has_row ? s_weights[k] : acc_t(0);
      // This lane's share of the sums over channels of grad_out . (value, d value / dx, d value / dy).
      acc_t d_weight = 0;
      acc_t d_x = 0;
      acc_t d_y = 0;
      BilinearSample<acc_t> s;
      if (has_row && bilinear_sample(s_locations[2 * k], s_locations[2 * k + 1], height, width, s)) {
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (!s.inside[corner] || !active) {
            continue;
          }
          const Vec<scalar_t, V> v = *reinterpret_cast<const Vec<scalar_t, V>*>(level + s.index[corner] * stride);
          acc_t* gv = grad_level + s.index[corner] * stride;
          const acc_t wa = a * s.weight[corner];
          acc_t dot = 0;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            dot += g[j] * static_cast<acc_t>(v.item[j]);
            atomicAdd(gv + j, wa * g[j]);
          }
          d_weight += s.weight[corner] * dot;
          d_x += s.grad_x[corner] * dot;
          d_y += s.grad_y[corner] * dot;
        }
      }
      // XOR offsets below `lanes` stay inside the row's aligned segment of the warp.
      for (int delta = lanes / 2; delta > 0; delta /= 2) {
        d_weight += __shfl_xor_sync(kFullWarp, d_weight, delta, lanes);
        d_x += __shfl_xor_sync(kFullWarp, d_x, delta, lanes);
        d_y += __shfl_xor_sync(kFullWarp, d_y, delta, lanes);
      }
      if (has_row && lane == 0) {
        const int64_t out_k = first_row * samples + k;
        grad_weights[out_k] = d_weight;
        // Pixel coordinates are x * W - 0.5 and y * H - 0.5, hence the factors W and H.
        grad_locations[2 * out_k] = a * d_x * static_cast<acc_t>(width);
        grad_locations[2 * out_k + 1] = a * d_y * static_cast<acc_t>(height);
      }
    }
  }
}

}  // namespace

c10::DeviceType kernel_device() {
  return c10::DeviceType::CUDA;
}

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  const Sizes n = sizes_of(value, sampling_locations);
  auto out = at::empty({n.batch, n.queries, n.heads * n.channels}, value.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kWide = 16 / sizeof(scalar_t);
    const Launch launch = plan_launch(n, kWide, sizeof(acc_t), is_aligned16(value.const_data_ptr()));
    auto kernel = launch.vec == kWide ? forward_kernel<scalar_t, acc_t, kWide> : forward_kernel<scalar_t, acc_t, 1>;
    kernel<<<launch.blocks, launch.threads, launch.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        n, launch.lanes, launch.rows_per_block, value.const_data_ptr<scalar_t>(),
        spatial_shapes.const_data_ptr<int64_t>(), level_start_index.const_data_ptr<int64_t>(),
        sampling_locations.const_data_ptr<acc_t>(), attention_weights.const_data_ptr<acc_t>(),
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  const Sizes n = sizes_of(value, sampling_locations);
  // atomicAdd in op-math precision; 16-bit atomics would round away small contributions.
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(at::toOpMathType(value.scalar_type())));
  auto grad_locations = at::empty_like(sampling_locations);
  auto grad_weights = at::empty_like(attention_weights);
  if (grad_output.numel() == 0) {
    return {grad_value.to(value.scalar_type()), grad_locations.zero_(), grad_weights.zero_()};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kWide = 16 / sizeof(scalar_t);
    const bool aligned = is_aligned16(value.const_data_ptr()) && is_aligned16(grad_output.const_data_ptr());
    const Launch launch = plan_launch(n, kWide, sizeof(acc_t), aligned);
    auto kernel =
        launch.vec == kWide ? backward_kernel<scalar_t, acc_t, kWide> : backward_kernel<scalar_t, acc_t, 1>;
    kernel<<<launch.blocks, launch.threads, launch.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        n, launch.lanes, launch.rows_per_block, grad_output.const_data_ptr<scalar_t>(),
        value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
        level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<acc_t>(),
        attention_weights.const_data_ptr<acc_t>(), grad_value.mutable_data_ptr<acc_t>(),
        grad_locations.mutable_data_ptr<acc_t>(), grad_weights.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace m2f
