"""The CUDA MSDeformAttn kernel: it compiles here (nvcc, no GPU needed), and on a GPU it matches the
reference. The `gpu` tests are skipped without a CUDA device.

Tolerances: fp32 within 1e-5 of the reference (relative to each tensor's largest entry, see
`assert_close_fp32`), fp64 by gradcheck; 16-bit values are compared with the fp32
reference on the same rounded inputs, within one 16-bit rounding of the output (bf16 1e-2, fp16 2e-3);
their location/weight gradients are fp32 sums of the same products (1e-4).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_ops_kernels import CASES, assert_close_fp32, forward_and_grads, random_grad_output, random_inputs

from m2f.ops import dispatch, ms_deform_attn, ms_deform_attn_reference
from m2f.ops.library import ms_deform_attn_backward_op, ms_deform_attn_op

ROOT = Path(__file__).resolve().parents[1]


def _toolkit_root() -> Path | None:
    """A CUDA toolkit root with nvcc and libcudart: $CUDA_HOME, the parent of nvcc's real location, or
    /usr/local/cuda (/usr/local/bin/nvcc may be a wrapper script that tells nothing)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), nvcc and Path(os.path.realpath(nvcc)).parents[1], "/usr/local/cuda"]
    for root in filter(None, candidates):
        if (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "lib64" / "libcudart.so").exists():
            return Path(root)
    return None


@pytest.mark.skipif(_toolkit_root() is None, reason="needs the CUDA toolkit (nvcc, libcudart)")
def test_cuda_kernel_compiles_without_a_gpu():
    """Builds the CUDA extension (about 45 s on 2 cores, then cached) in a fresh process, where the
    toolkit root and the architecture can be set before torch reads them."""
    env = {**os.environ, "CUDA_HOME": str(_toolkit_root()),
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")}
    script = "from m2f.ops.build import load_extension; m = load_extension('cuda'); print(m.forward.__doc__)"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "sampling_locations" in result.stdout


def cuda_inputs(case: str, dtype: torch.dtype = torch.float32):
    return random_inputs(*CASES[case], dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_cuda_kernel_matches_reference_fp32(case):
    value, shapes, starts, locations, weights = cuda_inputs(case)
    grad_output = random_grad_output(value, locations)
    out, grads = forward_and_grads("cuda", value, shapes, starts, locations, weights, grad_output)
    ref_out, ref_grads = forward_and_grads("torch", value, shapes, starts, locations, weights, grad_output)
    assert_close_fp32(out, ref_out, "output")
    for name, got, expected in zip(("value", "locations", "weights"), grads, ref_grads):
        assert_close_fp32(got, expected, f"grad {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_cuda_kernel_gradcheck_fp64(case):
    value, shapes, starts, locations, weights = cuda_inputs(case, torch.float64)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn_op(v, shapes, starts, loc, w), inputs,
                                    fast_mode=case != "one-level")


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("case", ["three-levels", "five-levels"])
def test_cuda_kernel_16bit_values_match_fp32_reference(case, dtype, tol):
    value, shapes, starts, locations, weights = cuda_inputs(case)
    value = value.to(dtype)
    grad_output = random_grad_output(value, locations)
    out, grads = forward_and_grads("cuda", value, shapes, starts, locations, weights, grad_output)
    ref_out, ref_grads = forward_and_grads("torch", value.float(), shapes, starts, locations, weights,
                                           grad_output.float())
    assert out.dtype == dtype and grads[0].dtype == dtype
    torch.testing.assert_close(out.float(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(grads[0].float(), ref_grads[0], rtol=tol, atol=tol)
    assert_close_fp32(grads[1], ref_grads[1], "grad locations", tol=1e-4)
    assert_close_fp32(grads[2], ref_grads[2], "grad weights", tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [6, 12])
def test_cuda_kernel_partial_lane_paths(head_dim):
    """D=6: not a multiple of 4, one channel per lane on 8 lanes (2 idle); D=12: 3 float4 chunks on
    4 lanes, one lane idle in every shuffle."""
    value, shapes, starts, locations, weights = random_inputs(2, [(6, 4), (3, 2)], 9, 3, head_dim, 4,
                                                              device="cuda")
    grad_output = random_grad_output(value, locations)
    out, grads = forward_and_grads("cuda", value, shapes, starts, locations, weights, grad_output)
    ref_out, ref_grads = forward_and_grads("torch", value, shapes, starts, locations, weights, grad_output)
    assert_close_fp32(out, ref_out, "output")
    for name, got, expected in zip(("value", "locations", "weights"), grads, ref_grads):
        assert_close_fp32(got, expected, f"grad {name}")


@pytest.mark.gpu
def test_cuda_kernel_misaligned_value_takes_the_scalar_path():
    value, shapes, starts, locations, weights = random_inputs(2, [(6, 4), (3, 2)], 9, 3, 16, 4, device="cuda")
    storage = torch.zeros(value.numel() + 1, device="cuda")
    storage[1:] = value.flatten()
    storage.requires_grad_()
    shifted = storage[1:].view(value.shape)  # 4 bytes past a 16-byte boundary: no float4 loads
    assert shifted.data_ptr() % 16 != 0
    out = ms_deform_attn(shifted, shapes, starts, locations, weights, impl="cuda")
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


@pytest.mark.gpu
def test_cuda_opcheck_and_auto_dispatch():
    value, shapes, starts, locations, weights = cuda_inputs("four-levels", torch.float64)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    torch.library.opcheck(ms_deform_attn_op, (leaves[0], shapes, starts, leaves[1], leaves[2]))
    grad_output = random_grad_output(value, locations)
    torch.library.opcheck(ms_deform_attn_backward_op, (grad_output, value, shapes, starts, locations, weights))
    assert dispatch.resolve_impl("auto", value) == "cuda"
    with pytest.raises(ValueError, match="impl='cpu' runs the cpu kernel but the tensors are on cuda"):
        ms_deform_attn(value, shapes, starts, locations, weights, impl="cpu")
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, locations, weights, impl="auto"),
                               ms_deform_attn_reference(value, shapes, locations, weights))
