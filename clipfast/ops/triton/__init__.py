"""Triton backend of clipfast's ops: one torch custom op (namespace clipfast_triton) per op, taking
the reference functions' arguments and returning their outputs (DESIGN.md section 3).

Kernels run on CUDA GPUs, or on the CPU under Triton's interpreter (tests only; slow). Triton picks
the mode when it decorates functions, its own standard library included: TRITON_INTERPRET=1 must be
set before triton is first imported in the process, and stay set while kernels run.
"""

from .mask_crop import mask_crop
from .mask_pool import mask_pool
from .region_patches import region_patches
from .region_score import region_score
from .region_topk import region_topk

__all__ = ["mask_crop", "mask_pool", "region_patches", "region_score", "region_topk"]
