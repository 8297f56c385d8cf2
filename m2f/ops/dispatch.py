"""The one explicit switch between implementations of multi-scale deformable attention.

`impl` is chosen by the caller (the config field `model.deform_impl`), never by catching errors: an
implementation that is asked for and cannot run raises with the reason. The choice is logged once.
"""

import logging
from collections.abc import Callable

from torch import Tensor

from m2f.ops.reference import ms_deform_attn_reference

logger = logging.getLogger(__name__)

IMPLS = ("auto", "torch")
_logged: set[str] = set()


def resolve_impl(impl: str, value: Tensor) -> str:
    """Turns `impl` (possibly "auto") into a concrete implementation name for tensors like `value`."""
    if impl not in IMPLS:
        raise ValueError(f"unknown MSDeformAttn impl {impl!r}; choose one of {IMPLS}")
    return "torch" if impl == "auto" else impl


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    impl: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention (shapes as in `ms_deform_attn_reference`).

    Args:
        level_start_index: (L,) int64 offsets of each level in S (used by compiled kernels).
        impl: "auto" picks the fastest implementation available for the tensors' device; "torch" is
            the pure-PyTorch reference.
    """
    name = resolve_impl(impl, value)
    if name not in _logged:
        _logged.add(name)
        logger.info("MSDeformAttn: using the %r implementation (asked for %r)", name, impl)
    fn: Callable[..., Tensor] = ms_deform_attn_reference
    del level_start_index  # only the compiled kernels need it
    return fn(value, spatial_shapes, sampling_locations, attention_weights)
