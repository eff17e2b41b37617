"""load_model: clipfast tiny models, open_clip architectures (+ pretrained tag), hf-hub ids, checkpoints."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.model import get_model_preprocess_cfg

from .bundle import ClipBundle
from .checkpoint import FORMAT_VERSION, METADATA_KEY, ModelLoadError, load_state_dict_strict, read_checkpoint
from .tiny import TINY_ARCHITECTURES, build_tiny

HF_HUB_PREFIX = "hf-hub:"
_PROBE_TIMEOUT_S = 3.0
T = TypeVar("T")


def load_model(
    model: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
) -> ClipBundle:
    """Load a CLIP model as a ClipBundle (in eval mode, on `device`).

    - model="clipfast-tiny": a fresh, randomly initialised tiny model (seed torch first);
    - model=<open_clip name>, pretrained=<tag or weights file>: e.g. ("ViT-B-32", "laion2b_s34b_b79k");
    - model="hf-hub:org/repo": config and weights from the Hugging Face Hub;
    - checkpoint=<path>: weights from a file. A clipfast checkpoint rebuilds its own architecture
      (model may then be omitted); any other state dict is loaded strictly into `model`.
    Pretrained weights come from the local cache first; a download is tried only when the Hub
    answers within a few seconds. Every failure is a ModelLoadError (a ValueError) saying why.
    """
    if pretrained is not None and checkpoint is None and Path(pretrained).is_file():
        checkpoint, pretrained = pretrained, None  # open_clip accepts a weights file as `pretrained`
    if checkpoint is None:
        if model is None:
            raise ModelLoadError("name a model (e.g. 'clipfast-tiny' or 'ViT-B-32') or a checkpoint")
        bundle = _build(model, pretrained)
    else:
        if pretrained is not None:
            raise ModelLoadError("give either a pretrained tag or a checkpoint, not both")
        payload = read_checkpoint(checkpoint)
        metadata = payload.get(METADATA_KEY)
        if metadata is not None:
            if metadata.get("format") != FORMAT_VERSION:
                raise ModelLoadError(
                    f"checkpoint {checkpoint} has clipfast format {metadata.get('format')!r}; "
                    f"this clipfast reads format {FORMAT_VERSION}"
                )
            if model is not None and model != metadata["architecture"]:
                raise ModelLoadError(
                    f"checkpoint {checkpoint} holds a {metadata['architecture']!r} model, not {model!r}"
                )
            bundle = _build(metadata["architecture"], vocabulary=metadata["vocabulary"], load_weights=False)
            bundle.image_size = metadata["image_size"]
            bundle.mean, bundle.std = tuple(metadata["mean"]), tuple(metadata["std"])
        elif model is None:
            raise ModelLoadError(f"checkpoint {checkpoint} has no clipfast metadata: name its architecture with model=")
        else:
            bundle = _build(model, load_weights=False)
        load_state_dict_strict(bundle.model, payload["state_dict"], source=str(checkpoint))
        bundle.name = str(checkpoint)
    bundle.model.to(device).eval()
    return bundle


def _build(
    architecture: str, pretrained: str | None = None, vocabulary=None, load_weights: bool = True
) -> ClipBundle:
    """A bundle for `architecture`; load_weights=False skips an hf-hub model's own weights."""
    if architecture in TINY_ARCHITECTURES:
        if pretrained is not None:
            raise ModelLoadError(f"{architecture!r} has no pretrained weights; pass a checkpoint instead")
        model, tokenizer = build_tiny(architecture, vocabulary)
        preprocess_cfg = get_model_preprocess_cfg(model)
        return _bundle(model, tokenizer, architecture, architecture, preprocess_cfg, tuple(tokenizer.words))

    is_hub_id = architecture.startswith(HF_HUB_PREFIX)
    if not is_hub_id and architecture.replace("/", "-") not in open_clip.list_models():
        raise ModelLoadError(_unknown_model_message(architecture))
    if pretrained is not None:
        if is_hub_id:
            raise ModelLoadError(f"{architecture} brings its own weights; drop the pretrained tag {pretrained!r}")
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        if pretrained not in tags:
            raise ModelLoadError(
                f"unknown pretrained tag {pretrained!r} for {architecture}; known tags: {tags or 'none'}"
            )
    what = f"{architecture}" + (f" (pretrained={pretrained})" if pretrained else "")
    # pretrained_text=False: random init means random, no tower-only downloads
    model = _cache_first(
        what,
        lambda: open_clip.create_model(
            architecture, pretrained=pretrained, load_weights=load_weights, pretrained_text=False
        ),
    )
    tokenizer = _cache_first(f"the tokenizer of {architecture}", lambda: open_clip.get_tokenizer(architecture))
    name = f"{architecture}:{pretrained}" if pretrained else architecture
    return _bundle(model, tokenizer, name, architecture, get_model_preprocess_cfg(model), None)


def _bundle(model, tokenizer, name, architecture, preprocess_cfg: dict, vocabulary) -> ClipBundle:
    size = preprocess_cfg["size"]
    size = size if isinstance(size, int) else max(size)  # all open_clip image towers are square
    return ClipBundle(
        model=model,
        tokenizer=tokenizer,
        name=name,
        architecture=architecture,
        image_size=size,
        mean=tuple(preprocess_cfg["mean"]),
        std=tuple(preprocess_cfg["std"]),
        vocabulary=vocabulary,
    )


def _unknown_model_message(name: str) -> str:
    known = open_clip.list_models()
    examples = ", ".join(m for m in ("ViT-B-32", "ViT-L-14", "RN50", "ViT-bigG-14") if m in known)
    return (
        f"unknown model {name!r}. Valid names: the clipfast tiny models {sorted(TINY_ARCHITECTURES)}, "
        f"any of the {len(known)} open_clip architectures "
        f"(python -c 'import open_clip; print(open_clip.list_models())', e.g. {examples}), "
        f"or 'hf-hub:org/repo'. A weights file is passed as a checkpoint, not as the model name."
    )


def _cache_first(what: str, create: Callable[[], T]) -> T:
    """Run an open_clip constructor that may download, without hanging when offline.

    huggingface_hub retries a dead connection for ~45 s per file, so: try the local cache only;
    on a miss, probe the Hub with a short timeout; only then download.
    """
    from huggingface_hub import constants as hub

    try:
        with _hub_offline(hub):
            return create()
    except Exception as cache_miss:  # open_clip wraps hub errors in RuntimeError/FileNotFoundError
        cache_error = cache_miss
    if hub.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"{what} is not in the local Hugging Face cache ({hub.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set "
            f"({cache_error})"
        ) from cache_error
    unreachable = _unreachable(hub.ENDPOINT)
    if unreachable:
        raise ModelLoadError(
            f"{what} is not in the local Hugging Face cache ({hub.HF_HUB_CACHE}) and cannot be downloaded: "
            f"{hub.ENDPOINT} is unreachable ({unreachable}). Download it where there is network access "
            f"(same HF_HOME), or pass a local checkpoint."
        ) from cache_error
    try:
        return create()
    except Exception as error:
        raise ModelLoadError(f"could not load {what}: {error}") from error


@contextmanager
def _hub_offline(hub_constants):
    """Temporarily force huggingface_hub's offline mode (it reads this flag at request time)."""
    saved, hub_constants.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


def _unreachable(endpoint: str) -> str | None:
    """None if a TCP connection to the endpoint opens within the probe timeout, else the reason."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=_PROBE_TIMEOUT_S).close()
        return None
    except OSError as error:
        return str(error) or type(error).__name__
