"""The compiled MSDeformAttn kernels as the custom ops `m2f::ms_deform_attn` and `m2f::ms_deform_attn_backward`.

Registering through `torch.library` gives autograd (the backward op), `torch.compile` support (the fake
kernels describe output shapes without running anything) and `torch.library.opcheck` coverage. One
definition serves CPU and CUDA tensors: it calls the extension built for the tensors' device, built on
that device's first call. Shapes and dtypes are checked by the extension (ValueError); sampling
locations and attention weights must be in the op-math dtype of `value` (float32 for 16-bit values).
"""

import torch
from torch import Tensor

from m2f.ops.build import load_extension


@torch.library.custom_op("m2f::ms_deform_attn", mutates_args=(), device_types=("cpu", "cuda"))
def ms_deform_attn_op(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with the compiled kernel for `value.device`.

    Args:
        value: (B, S, M, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64, (H_l, W_l) of each level.
        level_start_index: (L,) int64 offset of each level in S.
        sampling_locations: (B, Lq, M, L, P, 2) normalised (x, y) locations.
        attention_weights: (B, Lq, M, L, P), already normalised over L*P per head.

    Returns:
        (B, Lq, M*D) in the dtype of `value`.
    """
    return load_extension(value.device.type).forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@ms_deform_attn_op.register_fake
def _(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
      attention_weights: Tensor) -> Tensor:
    batch, _, heads, head_dim = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], heads * head_dim)


@torch.library.custom_op("m2f::ms_deform_attn_backward", mutates_args=(), device_types=("cpu", "cuda"))
def ms_deform_attn_backward_op(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `ms_deform_attn_op` (the same arguments, after `grad_output` (B, Lq, M*D)).

    Returns:
        (grad_value, grad_sampling_locations, grad_attention_weights), shaped and typed like the inputs.
    """
    grad_value, grad_locations, grad_weights = load_extension(value.device.type).backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, grad_locations, grad_weights


@ms_deform_attn_backward_op.register_fake
def _(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
      sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = ms_deform_attn_backward_op(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_locations, grad_weights


ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)
