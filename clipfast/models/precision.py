"""Numeric precision: the one place that says what a precision name means on a device.

Inference (the scan's encoder) and training both take "auto", "fp32" or "bf16"; training also takes
"fp16" (autocast with a gradient scaler, CUDA only). The dtype functions return the autocast dtype,
or None for plain fp32.

"auto" picks bf16 autocast where the device multiplies bf16 natively. It differs in one place: on a
CPU, training stays fp32 (inference uses bf16 on AVX512-BF16/AMX CPUs), because CPU training runs
the tiny synthetic-world models whose recipes and tests were calibrated in fp32; and on a GPU
without bf16, training falls back to fp16 + scaler while inference stays fp32 (fp16 activations
overflow in some open_clip towers; a scaler only protects gradients).
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16")
TRAINING_PRECISIONS = PRECISIONS + ("fp16",)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: any GPU with bf16, or a CPU with AVX512-BF16 or AMX
    (elsewhere oneDNN emulates bf16 and it is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence looked up defensively
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` for inference on `device`; None means plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    return torch.bfloat16 if precision == "bf16" else None


def training_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` for training on `device`; None means plain fp32. A gradient
    scaler is needed exactly when this is float16."""
    if precision not in TRAINING_PRECISIONS:
        raise ValueError(f"precision must be one of {TRAINING_PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (use bf16 or fp32 on a CPU)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
