"""How a torch.distributed training run holds the model, and its checkpoints.

ddp: every rank holds the whole model and optimiser; DistributedDataParallel averages gradients
(train/losses.py: ClipForward). fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) shards the image
tower block by block, so each rank holds 1/world_size of its parameters, gradients and AdamW state:
for models whose training state does not fit one GPU. The image tower only: open_clip keeps text
parameters and the scalar logit scale at the model's root, which fully_shard cannot take, so fsdp
needs a frozen text tower (repair's default).

Checkpoints are always full (unsharded) state dicts written by rank 0 through torch's
distributed-checkpoint state-dict API, with optimiser state keyed by parameter name: the same file
resumes on one process or on any number of ranks, under either mode.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from clipfast.models.bundle import text_tower_trains

SHARDING_MODES = ("ddp", "fsdp")
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # collective; rank 0 gets the tensors
_FULL_EVERYWHERE = StateDictOptions(full_state_dict=True)


def fully_sharded_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `model` on `device` whose image tower is sharded across the ranks (FSDP2), block by
    block and then the tower itself. The original is moved to the host meanwhile."""
    from torch.distributed.fsdp import fully_shard

    if text_tower_trains(model):
        raise ValueError("sharding='fsdp' shards the image tower only: freeze the text tower and logit scale "
                         "(models.freeze_text_tower; repair does) or use sharding='ddp'")
    visual = getattr(model, "visual", None)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None:
        raise ValueError(f"sharding='fsdp' needs an open_clip ViT image tower (visual.transformer.resblocks); "
                         f"{type(model).__name__} has none")
    model.to("cpu")
    sharded = copy.deepcopy(model).to(device)
    for block in sharded.visual.transformer.resblocks:
        fully_shard(block)
    fully_shard(sharded.visual)
    return sharded


def unshard_into(sharded: nn.Module, model: nn.Module, device: torch.device) -> None:
    """Copy the trained weights of a fully_sharded_copy back into the original (on every rank)."""
    model.load_state_dict(get_model_state_dict(sharded, options=_FULL_EVERYWHERE))
    model.to(device)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the host (collective; complete on rank 0)."""
    return get_model_state_dict(model, options=_FULL_ON_RANK0)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's state keyed by parameter name, unsharded, on the host (collective; rank 0)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL_ON_RANK0)


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load full state dicts (every rank passes the whole file's contents; each keeps its shard)."""
    set_model_state_dict(model, model_state, options=_FULL_EVERYWHERE)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_FULL_EVERYWHERE)
