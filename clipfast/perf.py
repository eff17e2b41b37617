"""Measuring speed: timing, the machine's rooflines (copy bandwidth, matrix rate) and model FLOPs.

Shared by the training loop (it logs model FLOPs utilisation) and the benchmarks. Everything here
measures; nothing asserts.
"""

from __future__ import annotations

import functools
import logging
import platform
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def timed_ms(fn: Callable[[], object], min_run_time: float) -> float:
    """Median milliseconds of fn() after one warm-up call (compilation, autotuning, allocator);
    torch.utils.benchmark synchronises CUDA around each run."""
    # torch.utils.benchmark imports torch.utils.cpp_extension, whose import logs a warning about
    # CUDA_HOME on machines without a GPU: irrelevant to timing, so that logger is quietened first.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch.utils.benchmark as tbench

    fn()
    return tbench.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine() or 'cpu'} x{torch.get_num_threads()} threads"


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str) -> float:
    """GB/s of a large device-to-device copy, counting read + write."""
    n = (1 << 28) if torch.device(device).type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src, dst = torch.ones(n, device=device), torch.empty(n, device=device)
    ms = timed_ms(lambda: dst.copy_(src), 0.5)
    return 2 * 4 * n / (ms * 1e-3) / 1e9


@functools.lru_cache(maxsize=None)
def matrix_rate(device: str, dtype: torch.dtype | None = None) -> float:
    """Measured TFLOP/s of a large square matmul: the practical peak MFU is reported against. By
    default the bf16 rate, and on a CPU the faster of bf16 and fp32: a CPU without native bf16
    emulates it far below its fp32 rate (this 2-core machine type, 2026-12-01: 0.0009 vs 0.05-0.08
    TFLOP/s), and the fast paths run in fp32 there. Such a CPU's bf16 rate is not measured: at
    0.0009 TFLOP/s one 1024^3 matmul takes 2.4 s, and the timing runs it at least twice (a warm-up,
    then timed runs), in every process that logs MFU (the repair), only to find the fp32 rate the faster."""
    from clipfast.models.precision import native_bf16  # here: clipfast.models imports open_clip

    cuda = torch.device(device).type == "cuda"
    if dtype is None:
        dtypes = [torch.bfloat16] if cuda else [torch.float32] + ([torch.bfloat16] if native_bf16(torch.device(device)) else [])
        return max(matrix_rate(device, d) for d in dtypes)
    n = 8192 if cuda else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = timed_ms(lambda: a @ b, 0.5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attention fn() runs (forward and backward when fn
    calls backward), counted by torch's FlopCounterMode; elementwise work is not counted, as in MFU."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
