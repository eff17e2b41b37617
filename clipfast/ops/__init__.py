"""clipfast.ops: the fused ops behind the scan (DESIGN.md section 3), one public function each.

Every op has a pure-PyTorch reference (reference.py) and compiled backends; `backend="auto"`
picks the fastest one available for the tensors' device (see backends.py).
"""

from .backends import BACKENDS, OPS, BackendUnavailable, backend_status
from .mask_crop import MaskCrops, mask_crop
from .mask_pool import MaskPool, mask_pool
from .maskbits import pack_mask_bits, unpack_mask_bits
from .region_patches import RegionPatches, region_patches
from .region_score import RegionScores, region_score
from .region_topk import LabelTopK, region_topk

__all__ = ["BACKENDS", "OPS", "BackendUnavailable", "backend_status", "MaskCrops", "mask_crop",
           "MaskPool", "mask_pool", "pack_mask_bits", "unpack_mask_bits", "RegionPatches", "region_patches",
           "RegionScores", "region_score", "LabelTopK", "region_topk"]
