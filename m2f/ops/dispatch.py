"""The one explicit switch between implementations of multi-scale deformable attention.

`impl` is chosen by the caller (the config field `model.deform_impl`), never by catching errors: an
implementation that is asked for and cannot run raises with the reason (a failed kernel build raises
`KernelBuildError` with the compiler output). The choice is logged once per (asked, resolved) pair.

- "auto": the compiled kernel for the tensors' device ("cpu" or "cuda").
- "cpu", "cuda": that compiled kernel; tensors on another device are an error.
- "torch": the pure-PyTorch grid_sample reference (any device, any dtype; slow and memory-hungry).
"""

import logging

import torch
from torch import Tensor

from m2f.ops.library import ms_deform_attn_op
from m2f.ops.reference import ms_deform_attn_reference

logger = logging.getLogger(__name__)

IMPLS = ("auto", "cpu", "cuda", "torch")
KERNEL_DEVICES = ("cpu", "cuda")
_logged: set[tuple[str, str]] = set()


def resolve_impl(impl: str, value: Tensor) -> str:
    """Turns `impl` (possibly "auto") into "cpu", "cuda" or "torch" for tensors like `value`.

    Raises:
        ValueError: unknown `impl`, or a compiled kernel asked for tensors on another device.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown MSDeformAttn impl {impl!r}; choose one of {IMPLS}")
    if impl == "torch":
        return impl
    device = value.device.type
    if impl == "auto":
        if device not in KERNEL_DEVICES:
            raise ValueError(f"impl='auto': no compiled MSDeformAttn kernel for {device} tensors; "
                             "set impl='torch' to use the pure-PyTorch reference")
        return device
    if device != impl:
        raise ValueError(f"impl={impl!r} runs the {impl} kernel but the tensors are on {value.device}; "
                         f"use impl='auto' (the kernel for the tensors' device) or impl='torch'")
    return impl


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    impl: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention with the chosen implementation.

    Args:
        value: (B, S, M, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64, (H_l, W_l) of each level.
        level_start_index: (L,) int64 offset of each level in S (used by the compiled kernels).
        sampling_locations: (B, Lq, M, L, P, 2) normalised (x, y) locations.
        attention_weights: (B, Lq, M, L, P), already normalised over L*P per head.
        impl: "auto", "cpu", "cuda" or "torch" (see the module docstring).

    Returns:
        (B, Lq, M*D) in the dtype of `value`.
    """
    name = resolve_impl(impl, value)
    # Under torch.compile the choice is fixed at trace time; logging there would break the graph.
    if not torch.compiler.is_compiling() and (impl, name) not in _logged:
        _logged.add((impl, name))
        logger.info("MSDeformAttn: using the %r implementation (asked for %r)", name, impl)
    if name == "torch":
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
    # The kernels keep locations and weights in op-math precision (float32 next to 16-bit values): a
    # bfloat16 location is off by up to half a pixel on a 168-pixel-wide map.
    sampling_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    return ms_deform_attn_op(
        value, spatial_shapes, level_start_index,
        sampling_locations.to(sampling_dtype), attention_weights.to(sampling_dtype),
    )
