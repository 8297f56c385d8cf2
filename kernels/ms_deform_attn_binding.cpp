// Python binding of the MSDeformAttn kernels. The same file is linked into the CPU and the CUDA
// extension, so both check their inputs identically before the device code runs.
// torch/csrc/utils/pybind.h (pybind11 with the Tensor casters) instead of torch/extension.h: the latter
// pulls in the whole C++ frontend and doubles the build time.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/csrc/utils/pybind.h>

#include "ms_deform_attn.h"

namespace {

void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, "MSDeformAttn: ", name, " is on ", t.device(), " but value is on ",
                    device);
}

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK_VALUE(value.dim() == 4, "MSDeformAttn: value must be (B, S, M, D), got shape ", value.sizes());
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
                    "MSDeformAttn: sampling_locations must be (B, Lq, M, L, P, 2), got shape ",
                    sampling_locations.sizes());
  const auto batch = value.size(0);
  const auto heads = value.size(2);
  const auto levels = spatial_shapes.dim() == 2 ? spatial_shapes.size(0) : -1;
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "MSDeformAttn: spatial_shapes must be (L, 2), got shape ", spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == levels,
                    "MSDeformAttn: level_start_index must be (L,) with L=", levels, ", got shape ",
                    level_start_index.sizes());
  TORCH_CHECK_VALUE(sampling_locations.size(0) == batch && sampling_locations.size(2) == heads &&
                        sampling_locations.size(3) == levels,
                    "MSDeformAttn: sampling_locations ", sampling_locations.sizes(),
                    " does not match value (B=", batch, ", M=", heads, ") and spatial_shapes (L=", levels, ")");
  TORCH_CHECK_VALUE(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
                    "MSDeformAttn: attention_weights must be (B, Lq, M, L, P) = ",
                    sampling_locations.sizes().slice(0, 5), ", got ", attention_weights.sizes());

  TORCH_CHECK_VALUE(at::isFloatingType(value.scalar_type()), "MSDeformAttn: value must be floating point, got ",
                    value.scalar_type());
  const auto sampling_dtype = at::toOpMathType(value.scalar_type());
  TORCH_CHECK_VALUE(sampling_locations.scalar_type() == sampling_dtype &&
                        attention_weights.scalar_type() == sampling_dtype,
                    "MSDeformAttn: with ", value.scalar_type(),
                    " values, sampling_locations and attention_weights must be ", sampling_dtype, ", got ",
                    sampling_locations.scalar_type(), " and ", attention_weights.scalar_type());
  TORCH_CHECK_VALUE(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
                    "MSDeformAttn: spatial_shapes and level_start_index must be int64, got ",
                    spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());

  const auto device = value.device();
  TORCH_CHECK_VALUE(device.type() == m2f::kernel_device(), "MSDeformAttn: this is the ", m2f::kernel_device(),
                    " kernel but value is on ", device);
  check_device(spatial_shapes, "spatial_shapes", device);
  check_device(level_start_index, "level_start_index", device);
  check_device(sampling_locations, "sampling_locations", device);
  check_device(attention_weights, "attention_weights", device);
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  return m2f::ms_deform_attn_forward(value.contiguous(), spatial_shapes.contiguous(),
                                     level_start_index.contiguous(), sampling_locations.contiguous(),
                                     attention_weights.contiguous());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const std::vector<int64_t> out_shape{value.size(0), sampling_locations.size(1), value.size(2) * value.size(3)};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(out_shape) &&
                        grad_output.scalar_type() == value.scalar_type(),
                    "MSDeformAttn: grad_output must be ", value.scalar_type(), " of shape ", out_shape, ", got ",
                    grad_output.scalar_type(), " of shape ", grad_output.sizes());
  check_device(grad_output, "grad_output", value.device());
  return m2f::ms_deform_attn_backward(grad_output.contiguous(), value.contiguous(), spatial_shapes.contiguous(),
                                      level_start_index.contiguous(), sampling_locations.contiguous(),
                                      attention_weights.contiguous());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention kernels of m2f (see m2f/ops/library.py).";
  m.def("forward", &forward, "(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"));
  m.def("backward", &backward,
        "(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> "
        "(grad_value, grad_sampling_locations, grad_attention_weights)",
        py::arg("grad_output"), py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"));
}
