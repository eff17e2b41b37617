"""Launch helpers shared by the Triton ops."""

from __future__ import annotations

import contextlib

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

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


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which Triton's launches go to `tensor`'s GPU. Triton launches on the current CUDA
    device, not the arguments': without this, tensors on cuda:1 while cuda:0 is current (a
    `--device cuda:1` run, in one process) would be read by a kernel on the wrong GPU. A no-op when
    the device is already current, on the CPU interpreter, and while torch.compile traces the op
    (Inductor's generated code guards the device of the kernels it launches)."""
    device = tensor.device
    if device.type != "cuda" or device.index is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


def wrap_triton(kernel):
    """torch.library.wrap_triton(kernel) for a compiled kernel. Under Triton's CPU interpreter a
    @triton.jit function is an InterpretedFunction, which torch 2.11 (the GPU machine's) refuses
    ("wrap_triton only works on functions annotated with triton.jit") and torch 2.13 passes through
    unwrapped: it is launched directly here, on every torch. Called by this name, so that torch's
    triton_op still finds the kernels in the op's source."""
    if isinstance(kernel, (JITFunction, Autotuner)):
        return torch.library.wrap_triton(kernel)
    return kernel
