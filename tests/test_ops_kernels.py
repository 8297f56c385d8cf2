"""The compiled MSDeformAttn kernels (CPU and CUDA) against the pure-PyTorch reference (the oracle).

Tests that apply to both kernels take a `device` parameter; its "cuda" case is marked `gpu` and skipped
without a CUDA device (tests/conftest.py). The first test in a fresh cache builds the kernel (~20 s for
the CPU one on 2 cores, ~45 s for CUDA); the rest reuse it. `random_inputs` and `CASES` are shared with
tests/test_ops_dispatch.py.

Tolerances: fp32 within 1e-5 of the reference (relative to each tensor's largest entry, see
`assert_close_fp32`), fp64 by gradcheck; 16-bit values are compared with the fp32 reference on the same
rounded inputs, within one 16-bit rounding of the output (bf16 1e-2, fp16 2e-3); their location/weight
gradients are fp32 sums of the same products (1e-4).
"""

import pytest
import torch

from m2f.deformable_encoder import MSDeformAttn
from m2f.ops import dispatch, ms_deform_attn, ms_deform_attn_reference
from m2f.ops.library import ms_deform_attn_backward_op, ms_deform_attn_op

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]

# (batch, level shapes (H, W), queries, heads, head dim D, points): non-square levels, one level,
# many levels, batch > 1, and the head dims of the presets (16 tiny, 32 paper) plus 64.
CASES = {
    "one-level": (2, [(5, 7)], 9, 2, 16, 3),
    "three-levels": (3, [(6, 4), (3, 2), (2, 5)], 11, 3, 32, 4),
    "four-levels": (2, [(9, 5), (5, 3), (3, 2), (1, 2)], 7, 4, 16, 4),
    "five-levels": (1, [(8, 8), (4, 6), (3, 3), (2, 2), (1, 1)], 13, 2, 64, 2),
}


def random_inputs(
    batch: int, shapes: list[tuple[int, int]], queries: int, heads: int, head_dim: int, points: int, *,
    dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) on `device`.

    Locations span [-0.2, 1.2] so that some samples fall partly or fully outside the maps.
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, head_dim, generator=generator, dtype=dtype)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=dtype)
    return tuple(t.to(device) for t in (value, spatial_shapes, level_start_index, locations, weights))


def random_grad_output(value: torch.Tensor, locations: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A seeded (B, Lq, M*D) upstream gradient on the device and in the dtype of `value`."""
    generator = torch.Generator().manual_seed(seed)
    shape = (value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
    return torch.randn(shape, generator=generator).to(value.device, value.dtype)


def assert_close_fp32(got: torch.Tensor, expected: torch.Tensor, name: str, tol: float = 1e-5) -> None:
    """Within `tol`, relative to the tensor's largest entry. Location gradients are differences of the
    neighbours' values times W or H, so small entries come from cancellation and carry the rounding error
    of the large ones; measured against float64, the kernel is as close as grid_sample (~2e-5 at |grad| ~ 70).
    """
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def forward_and_grads(impl: str, value, shapes, starts, locations, weights, grad_output):
    """Output and (grad_value, grad_locations, grad_weights) of `ms_deform_attn` with `impl`."""
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], impl=impl)
    out.backward(grad_output)
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_matches_reference_fp32(device, value, shapes, starts, locations, weights):
    """The kernel's output and all three input gradients against the reference op's, in fp32."""
    grad_output = random_grad_output(value, locations)
    out, grads = forward_and_grads(device, value, shapes, starts, locations, weights, grad_output)
    ref_out, ref_grads = forward_and_grads("torch", value, shapes, starts, locations, weights, grad_output)
    assert_close_fp32(out, ref_out, "output")
    for name, got, expected in zip(("value", "locations", "weights"), grads, ref_grads):
        assert_close_fp32(got, expected, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_fp32(device, case):
    value, shapes, starts, locations, weights = random_inputs(*CASES[case], device=device)
    assert_matches_reference_fp32(device, value, shapes, starts, locations, weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_gradcheck_fp64(device, case):
    value, shapes, starts, locations, weights = random_inputs(*CASES[case], dtype=torch.float64, device=device)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_op(v, shapes, starts, loc, w), inputs, fast_mode=case != "one-level"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("case", ["three-levels", "five-levels"])
def test_kernel_16bit_values_match_fp32_reference(device, case, dtype, tol):
    """16-bit values/outputs with fp32 locations, weights and accumulation: within 16-bit rounding of the
    fp32 reference run on the same (rounded) values."""
    value, shapes, starts, locations, weights = random_inputs(*CASES[case], device=device)
    value = value.to(dtype)
    grad_output = random_grad_output(value, locations)
    out, grads = forward_and_grads(device, value, shapes, starts, locations, weights, grad_output)
    ref_out, ref_grads = forward_and_grads("torch", value.float(), shapes, starts, locations, weights,
                                           grad_output.float())
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(grads[0].float(), ref_grads[0], rtol=tol, atol=tol)
    # Location and weight gradients are fp32 sums of products of the same rounded numbers.
    assert_close_fp32(grads[1], ref_grads[1], "grad locations", tol=1e-4)
    assert_close_fp32(grads[2], ref_grads[2], "grad weights", tol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_auto_dispatch(device):
    value, shapes, starts, locations, weights = random_inputs(*CASES["four-levels"], dtype=torch.float64,
                                                              device=device)
    grad_output = random_grad_output(value, locations)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    torch.library.opcheck(ms_deform_attn_op, (leaves[0], shapes, starts, leaves[1], leaves[2]))
    torch.library.opcheck(ms_deform_attn_backward_op, (grad_output, value, shapes, starts, locations, weights))
    assert dispatch.resolve_impl("auto", value) == device
    other = {"cpu": "cuda", "cuda": "cpu"}[device]
    with pytest.raises(ValueError, match=f"impl='{other}' runs the {other} kernel but the tensors are on {device}"):
        ms_deform_attn(value, shapes, starts, locations, weights, impl=other)
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, locations, weights, impl="auto"),
                               ms_deform_attn_reference(value, shapes, locations, weights))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [6, 12])
def test_kernel_partial_lane_paths(device, head_dim):
    """For the CUDA kernel, D=6: not a multiple of 4, one channel per lane on 8 lanes (2 idle); D=12:
    3 float4 chunks on 4 lanes, one lane idle in every shuffle. The CPU kernel takes the same head dims."""
    value, shapes, starts, locations, weights = random_inputs(2, [(6, 4), (3, 2)], 9, 3, head_dim, 4,
                                                              device=device)
    assert_matches_reference_fp32(device, value, shapes, starts, locations, weights)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_misaligned_value_takes_the_scalar_path(device):
    value, shapes, starts, locations, weights = random_inputs(2, [(6, 4), (3, 2)], 9, 3, 16, 4, device=device)
    storage = torch.zeros(value.numel() + 1, device=device)
    storage[1:] = value.flatten()
    storage.requires_grad_()
    shifted = storage[1:].view(value.shape)  # 4 bytes past a 16-byte boundary: no float4 loads (CUDA)
    assert shifted.data_ptr() % 16 != 0
    out = ms_deform_attn(shifted, shapes, starts, locations, weights, impl=device)
    grad_output = random_grad_output(value, locations)
    out.backward(grad_output)
    ref_out, ref_grads = forward_and_grads("torch", value, shapes, starts, locations, weights, grad_output)
    assert_close_fp32(out.detach(), ref_out, "output")
    assert_close_fp32(storage.grad[1:].view(value.shape), ref_grads[0], "grad value")


@pytest.mark.gpu
def test_cuda_kernel_at_a_paper_sized_shape():
    """R50 encoder-like: 3 levels at strides 8/16/32 of a 400x672 image, M=8, D=32, P=4. Thousands of
    atomic adds per grad_value entry in a different order than the reference, hence 1e-4."""
    value, shapes, starts, locations, weights = random_inputs(1, [(50, 84), (25, 42), (13, 21)], 5523, 8, 32, 4,
                                                              device="cuda")
    grad_output = random_grad_output(value, locations)
    out, grads = forward_and_grads("cuda", value, shapes, starts, locations, weights, grad_output)
    ref_out, ref_grads = forward_and_grads("torch", value, shapes, starts, locations, weights, grad_output)
    assert_close_fp32(out, ref_out, "output")
    for name, got, expected in zip(("value", "locations", "weights"), grads, ref_grads):
        assert_close_fp32(got, expected, f"grad {name}", tol=1e-4)


def test_samples_outside_every_level_give_zero_output_and_gradients():
    value, shapes, starts, locations, weights = random_inputs(*CASES["three-levels"])
    # x <= -1/(2W) puts all four neighbours left of the map; y in range keeps it a pure x test.
    locations[..., 0] = -0.5
    out, (grad_value, grad_locations, grad_weights) = forward_and_grads(
        "cpu", value, shapes, starts, locations, weights, torch.ones(3, 11, 3 * 32))
    assert out.abs().max() == 0 and grad_value.abs().max() == 0
    assert grad_locations.abs().max() == 0 and grad_weights.abs().max() == 0


def test_non_contiguous_inputs_and_no_queries():
    value, shapes, starts, locations, weights = random_inputs(*CASES["one-level"])
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)  # same values, strided layout
    assert not value_t.is_contiguous()
    torch.testing.assert_close(ms_deform_attn(value_t, shapes, starts, locations, weights, impl="cpu"),
                               ms_deform_attn_reference(value, shapes, locations, weights), rtol=1e-5, atol=1e-5)
    empty = ms_deform_attn(value, shapes, starts, locations[:, :0], weights[:, :0], impl="cpu")
    assert empty.shape == (2, 0, 2 * 16)


def test_bad_inputs_raise_value_errors_naming_the_tensor():
    value, shapes, starts, locations, weights = random_inputs(*CASES["one-level"])
    with pytest.raises(ValueError, match="sampling_locations and attention_weights must be Float, got Double"):
        ms_deform_attn_op(value, shapes, starts, locations.double(), weights)
    with pytest.raises(ValueError, match=r"attention_weights must be \(B, Lq, M, L, P\)"):
        ms_deform_attn_op(value, shapes, starts, locations, weights[..., :1])
    with pytest.raises(ValueError, match="spatial_shapes and level_start_index must be int64"):
        ms_deform_attn_op(value, shapes.int(), starts, locations, weights)
    with pytest.raises(ValueError, match=r"value must be \(B, S, M, D\)"):
        ms_deform_attn_op(value[0], shapes, starts, locations, weights)


def test_dispatch_casts_locations_to_the_kernel_dtype_and_back():
    value, shapes, starts, locations, weights = random_inputs(*CASES["one-level"])
    locations = locations.double().requires_grad_()
    out = ms_deform_attn(value, shapes, starts, locations, weights, impl="cpu")
    out.sum().backward()
    assert out.dtype == torch.float32 and locations.grad.dtype == torch.float64
    torch.testing.assert_close(out, ms_deform_attn_reference(value, shapes, locations.float(), weights))


def test_deformable_attention_module_same_with_kernel_and_reference():
    torch.manual_seed(0)
    shapes = torch.tensor([[6, 5], [3, 3]])
    starts = torch.tensor([0, 30])
    modules = {impl: MSDeformAttn(dim=32, num_heads=2, num_levels=2, num_points=3, impl=impl)
               for impl in ("cpu", "torch")}
    modules["torch"].load_state_dict(modules["cpu"].state_dict())
    query, value = torch.randn(2, 39, 32), torch.randn(2, 39, 32)
    reference_points = torch.rand(2, 39, 2, 2)
    outs = {impl: m(query, reference_points, value, shapes, starts) for impl, m in modules.items()}
    torch.testing.assert_close(outs["cpu"], outs["torch"], rtol=1e-5, atol=1e-5)
    for out in outs.values():
        out.square().sum().backward()
    for name, param in modules["cpu"].named_parameters():
        torch.testing.assert_close(param.grad, modules["torch"].get_parameter(name).grad, rtol=1e-4, atol=1e-5)


def test_torch_compile_traces_the_custom_op_without_graph_breaks():
    value, shapes, starts, locations, weights = random_inputs(*CASES["four-levels"])
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    compiled = torch.compile(lambda v, loc, w: ms_deform_attn(v, shapes, starts, loc, w, impl="auto"),
                             backend="aot_eager", fullgraph=True)
    out = compiled(*leaves)
    out.sum().backward()
    torch.testing.assert_close(out, ms_deform_attn_reference(value, shapes, locations, weights),
                               rtol=1e-5, atol=1e-5)
    assert all(leaf.grad is not None for leaf in leaves)
