"""Multi-scale deformable attention: reference op, compiled kernels and the switch between them."""

from m2f.ops.dispatch import ms_deform_attn
from m2f.ops.reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]
