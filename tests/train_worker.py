"""Worker for test_distributed_training.py: repair-style training of a tiny CLIP (frozen text tower)
on one process or under torchrun, rank 0 saving the final weights to OUT/final.pt.

python tests/train_worker.py OUT SHARDING STEPS [INTERRUPT_AT [TRAIN_TEXT]]: with INTERRUPT_AT > 0,
every rank exits (code 3) right after the checkpoint of that step, like a job stopped by its
scheduler; with TRAIN_TEXT=1 the text tower and logit scale train too (with CleanCLIP's text view)."""

import sys
from pathlib import Path

import torch

from clipfast import distributed
from clipfast.data.world import CLASSES, generate_world
from clipfast.models import freeze_text_tower, load_model
from clipfast.train import TrainConfig, train
from clipfast.train.cleanclip import CleanCLIPObjective


def main(out: Path, sharding: str, steps: int, interrupt_at: int = 0, train_text: int = 0) -> None:
    group, device = distributed.init_from_environment("cpu")
    torch.manual_seed(0)
    bundle = load_model("clipfast-tiny", device=device)
    if not train_text:
        freeze_text_tower(bundle.model)
    world = generate_world(53, seed=2)
    captions = [f"a photo of a {CLASSES[int(label)]}." for label in world.labels]
    config = TrainConfig(steps=steps, batch_size=22, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=3,
                         eval_every=interrupt_at, progress=False, sharding=sharding, accumulation_steps=2)
    objective = CleanCLIPObjective(captions, bundle.tokenizer, self_supervised_weight=1.0,
                                   text_view=bool(train_text))

    def interrupt(_) -> dict:
        raise SystemExit(3)

    train(bundle, world.images, captions, config, out, objective=objective, eval_fn=interrupt if interrupt_at else None)
    if group.is_main:
        torch.save(bundle.model.state_dict(), out / "final.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:]))
