"""Checkpoint files: open_clip-compatible, self-describing, written atomically.

Layout: {"state_dict": ..., "clipfast": {rebuild metadata}, ...extra}. open_clip.load_checkpoint
reads the "state_dict" key and ignores the rest; clipfast.models.load_model also reads the
"clipfast" key, so a tiny model and its tokenizer come back from this one file. The training loop
stores its optimizer/scheduler/RNG state as extra keys of the same layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from clipfast.errors import ClipfastError
from clipfast.rundir import write_atomically

from .bundle import ClipBundle

METADATA_KEY = "clipfast"
FORMAT_VERSION = 1
_MAX_LISTED = 8  # keys named per category in a mismatch error


class ModelLoadError(ClipfastError, ValueError):
    """The model cannot be loaded as asked (unknown name, missing or unfitting weights, not cached)."""


def bundle_metadata(bundle: ClipBundle) -> dict:
    return {
        "format": FORMAT_VERSION,
        "name": bundle.name,
        "architecture": bundle.architecture,
        "vocabulary": list(bundle.vocabulary) if bundle.vocabulary is not None else None,
        "image_size": bundle.image_size,
        "mean": list(bundle.mean),
        "std": list(bundle.std),
    }


def save_checkpoint(bundle: ClipBundle, path: str | os.PathLike, extra: dict | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save model weights (bundle.model's, or `state_dict`, e.g. gathered from shards) + rebuild
    metadata (+ optional extra entries, e.g. optimizer state)."""
    weights = bundle.model.state_dict() if state_dict is None else state_dict
    payload = {"state_dict": weights, METADATA_KEY: bundle_metadata(bundle), **(extra or {})}
    write_atomically(path, lambda file: torch.save(payload, file))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw checkpoint dict (weights_only load); ModelLoadError if missing or not a checkpoint.

    A bare state dict (or a .safetensors file) comes back wrapped as {"state_dict": ...}.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            payload = load_file(str(path), device="cpu")
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch/pickle/zip/safetensors each raise their own types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"{path} is not a readable PyTorch or safetensors checkpoint ({reason})") from error
    if not isinstance(payload, dict):
        raise ModelLoadError(f"{path} holds a {type(payload).__name__}, not a checkpoint dict")
    if "state_dict" not in payload:
        payload = {"state_dict": payload}
    state_dict = payload["state_dict"]
    if not state_dict or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise ModelLoadError(f"{path} contains no model state dict (expected a mapping of names to tensors)")
    if all(key.startswith("module.") for key in state_dict):  # saved from DistributedDataParallel
        payload["state_dict"] = {key[len("module."):]: value for key, value in state_dict.items()}
    return payload


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load `state_dict`; ModelLoadError naming missing/unexpected/mis-shaped keys or
    tensors with NaN/inf values."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    misshaped = [
        f"{key} (checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)})"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    problems = [
        f"{len(keys)} {kind}: {', '.join(keys[:_MAX_LISTED])}{' ...' if len(keys) > _MAX_LISTED else ''}"
        for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshaped))
        if keys
    ]
    if problems:
        raise ModelLoadError(f"checkpoint {source} does not fit the architecture: " + "; ".join(problems))
    broken = [key for key, value in state_dict.items() if value.is_floating_point() and not bool(value.isfinite().all())]
    if broken:
        raise ModelLoadError(f"checkpoint {source} holds NaN or inf values in {len(broken)} tensors: "
                             f"{', '.join(broken[:_MAX_LISTED])}{' ...' if len(broken) > _MAX_LISTED else ''}")
    model.load_state_dict(state_dict)
