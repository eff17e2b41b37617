"""Launch helpers shared by the Triton ops."""

from __future__ import annotations

import triton

# Triton 3.7's CPU interpreter multiplies bf16 tl.dot operands as their raw uint16 bits: under it,
# kernels upcast bf16 operands first (exact: bf16 products are exact in fp32). GPUs take the bf16
# path. Read when the package is imported, as Triton does when it decorates the kernels.
INTERPRETED = bool(triton.knobs.runtime.interpret)


def pow2_block(n, low: int = 1, high: int = 1 << 30) -> int:
    """The smallest power of two >= n, clamped to [low, high] (both powers of two). Plain comparisons,
    so a symbolic size under torch.compile gets simple guards (n > 32) rather than bit tricks."""
    block = low
    while block < high and block < n:
        block *= 2
    return block
