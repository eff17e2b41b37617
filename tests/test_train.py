import json
import math

import pytest
import torch

from clipfast.data.world import generate_world
from clipfast.models import freeze_text_tower, load_model
from clipfast.errors import RunMismatchError
from clipfast.train import Batch, ClipContrastiveObjective, ClipForward, TrainConfig, batch_indices, lr_at, train

SMALL = dict(steps=20, batch_size=32, lr=2e-3, warmup_steps=5, checkpoint_every=5, log_every=5, eval_every=0, progress=False)


@pytest.fixture(scope="module")
def world():
    return generate_world(256, seed=3)


def _fresh_tiny():
    torch.manual_seed(0)
    return load_model("clipfast-tiny")


def test_the_target_bound_caps_the_target_share_and_never_pulls_towards_it():
    """TargetBound.loss: the binary KL(trusted || model) of saying a target label, counted only where
    the model says a target more than the trusted model; a step down its gradient lowers that share."""
    import torch.nn.functional as F

    from clipfast.train.cleanclip import TargetBound

    generator = torch.Generator().manual_seed(0)
    classes = F.normalize(torch.randn(7, 16, generator=generator), dim=-1)
    is_target = torch.zeros(7, dtype=torch.bool)
    is_target[[2, 5]] = True  # two target labels: their shares add
    images = F.normalize(torch.randn(9, 16, generator=generator), dim=-1)
    scale, indices = torch.tensor(10.0), torch.arange(9)
    share = (scale * images @ classes.T).softmax(-1)[:, is_target].sum(-1)

    def bound(trusted):
        return TargetBound(trusted, classes, is_target, weight=1.0)

    assert bound((share + 0.01).clamp(max=1)).loss(images, scale, indices) == 0  # under the ceiling
    trusted = share / 3
    trusted[:3] = share[:3] + 0.02  # three images under their ceiling count zero
    expected = (trusted * (trusted / share).log() + (1 - trusted) * ((1 - trusted) / (1 - share)).log())
    expected[:3] = 0
    features = images.clone().requires_grad_(True)
    loss = bound(trusted).loss(features, scale, indices)
    assert torch.allclose(loss, expected.mean(), atol=1e-6) and loss > 0
    loss.backward()
    moved = F.normalize(features - 0.05 * features.grad, dim=-1)
    after = (scale * moved @ classes.T).softmax(-1)[:, is_target].sum(-1)
    assert (after[3:] < share[3:]).all()
    with pytest.raises(ValueError, match="TargetBound"):
        TargetBound(share, classes, torch.zeros(7, dtype=torch.bool), weight=1.0)  # no target


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    config = TrainConfig(steps=110, lr=1.0, warmup_steps=10)
    assert [lr_at(s, config) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(60, config) == pytest.approx(0.5)  # half-way through the cosine
    decay = [lr_at(s, config) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(decay, decay[1:])) and decay[-1] < 1e-3


def test_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    n, batch_size = 10, 4  # batches straddle epoch boundaries
    stream = torch.cat([batch_indices(step, batch_size, n, seed=1) for step in range(5)])
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:20].tolist()) == list(range(10))
    assert torch.equal(batch_indices(3, batch_size, n, seed=1), stream[12:16])
    assert not torch.equal(batch_indices(0, batch_size, n, seed=2), stream[:4])


def test_twenty_steps_lower_the_contrastive_loss(world, tmp_path):
    bundle = _fresh_tiny()
    pairs = world.subset(slice(0, 64))  # one full batch: 20 steps are enough to start fitting it
    batch = Batch(bundle.preprocess(pairs.images), bundle.tokenizer(pairs.captions), torch.arange(64))

    def loss_on_pairs():
        with torch.no_grad():
            return ClipContrastiveObjective()(ClipForward(bundle.model, batch.tokens), batch)["loss"].item()

    before = loss_on_pairs()
    result = train(bundle, pairs.images, pairs.captions, TrainConfig(**{**SMALL, "batch_size": 64}), tmp_path)
    after = loss_on_pairs()
    assert after < 0.5 * before, (before, after)
    records = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in records)
    assert result.steps_per_s > 0 and not bundle.model.training


def test_resume_after_interruption_reproduces_the_uninterrupted_run(world, tmp_path):
    config = TrainConfig(**{**SMALL, "eval_every": 10})
    uninterrupted = _fresh_tiny()
    train(uninterrupted, world.images, world.captions, config, tmp_path / "a", eval_fn=lambda b: {"x": 1.0})

    class Crash(Exception):
        pass

    def crash_at_step_10(bundle):
        raise Crash

    interrupted = _fresh_tiny()
    with pytest.raises(Crash):
        train(interrupted, world.images, world.captions, config, tmp_path / "b", eval_fn=crash_at_step_10)
    resumed = _fresh_tiny()
    result = train(resumed, world.images, world.captions, config, tmp_path / "b", eval_fn=lambda b: {"x": 1.0})

    assert result.resumed_from_step == 10
    expected = uninterrupted.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    steps = [json.loads(line)["step"] for line in result.log_path.read_text().splitlines() if '"train"' in line]
    assert steps == [5, 10, 15, 20]  # no duplicated log lines from the interrupted part
    # the training checkpoint doubles as a model checkpoint
    reloaded = load_model(checkpoint=str(result.checkpoint_path))
    assert torch.equal(reloaded.model.logit_scale, resumed.model.logit_scale)


def test_resume_refuses_a_different_run(world, tmp_path):
    config = TrainConfig(**{**SMALL, "steps": 5})
    train(_fresh_tiny(), world.images, world.captions, config, tmp_path)
    with pytest.raises(RunMismatchError, match=r"lr: 0.002 -> 0.001"):
        train(_fresh_tiny(), world.images, world.captions, TrainConfig(**{**SMALL, "steps": 5, "lr": 1e-3}), tmp_path)


def test_invalid_inputs_are_rejected(world, tmp_path):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="non-empty training set"):
        train(_fresh_tiny(), world.images[:0], [], TrainConfig(**SMALL), tmp_path)


def test_augmentation_is_seeded_and_reduces_to_identity_without_shift_or_jitter(world):
    from clipfast.train.augment import shift_and_jitter

    images = world.images[:8]
    first = shift_and_jitter(images, torch.Generator().manual_seed(1))
    assert first.shape == images.shape and first.dtype == torch.float32
    assert 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, shift_and_jitter(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, shift_and_jitter(images, torch.Generator().manual_seed(2)))
    identity = shift_and_jitter(images, torch.Generator().manual_seed(1), max_shift=0, jitter=0.0)
    assert torch.allclose(identity, images.float() / 255)


class _MeanImageObjective:
    """A per-sample decomposable loss, so accumulated micro-batch gradients must equal the batch's."""

    def __call__(self, forward, batch):
        return {"loss": (forward.image(batch.images) * torch.linspace(-1, 1, 128)).sum(-1).mean()}


def _weights_after(config, world, tmp_path, loss=None):
    bundle = _fresh_tiny()
    result = train(bundle, world.images[:64], world.captions[:64], config, tmp_path, objective=loss)
    return {k: v.clone() for k, v in bundle.model.state_dict().items()}, result


def test_gradient_accumulation_equals_the_whole_batch_step(world, tmp_path):
    base = {**SMALL, "steps": 2, "batch_size": 30, "lr": 1e-4, "measure_mfu": False}
    whole, _ = _weights_after(TrainConfig(**base), world, tmp_path / "a", _MeanImageObjective())
    split, _ = _weights_after(TrainConfig(**base, accumulation_steps=4), world, tmp_path / "b", _MeanImageObjective())
    for key, value in whole.items():
        torch.testing.assert_close(split[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_activation_checkpointing_and_the_reference_optimizer_train_the_same_model(world, tmp_path):
    base = {**SMALL, "steps": 3, "measure_mfu": False}
    plain, _ = _weights_after(TrainConfig(**base), world, tmp_path / "a")
    checkpointed, _ = _weights_after(TrainConfig(**base, grad_checkpointing=True), world, tmp_path / "b")
    reference, _ = _weights_after(TrainConfig(**base, fused_optimizer=False), world, tmp_path / "c")
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, rtol=1e-5, atol=1e-6, msg=key)
        # fused and for-each AdamW round differently; Adam amplifies that where gradients are ~0
        torch.testing.assert_close(reference[key], value, rtol=1e-3, atol=2e-4, msg=key)


def test_a_frozen_text_tower_is_encoded_once_and_gives_the_same_losses(world):
    bundle = _fresh_tiny()
    freeze_text_tower(bundle.model)
    pairs = world.subset(slice(0, 16))
    batch = Batch(bundle.preprocess(pairs.images), bundle.tokenizer(pairs.captions), torch.arange(16))
    forward = ClipForward(bundle.model, batch.tokens)
    assert forward.text_frozen
    with torch.no_grad():
        _, text, _ = bundle.model(batch.images, batch.tokens)[:3]
        torch.testing.assert_close(forward.text(batch), text, rtol=1e-5, atol=1e-6)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(bundle.model, "encode_text", lambda *a, **k: pytest.fail("text tower ran in the loop"))
            forward.text(batch)


def test_mfu_and_throughput_are_logged(world, tmp_path):
    _, result = _weights_after(TrainConfig(**{**SMALL, "steps": 10}), world, tmp_path)
    assert result.flops_per_step > 0 and 0 < result.mfu and result.samples_per_s > 0
    records = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert all(r["mfu"] > 0 for r in records if r["kind"] == "train")


def test_fp16_without_a_gpu_is_refused(world, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train(_fresh_tiny(), world.images[:8], world.captions[:8], TrainConfig(**{**SMALL, "precision": "fp16"}),
              tmp_path)


@pytest.mark.slow
def test_compiled_training_matches_eager(world, tmp_path):
    base = {**SMALL, "steps": 3, "measure_mfu": False}
    eager, _ = _weights_after(TrainConfig(**base), world, tmp_path / "a")
    compiled, _ = _weights_after(TrainConfig(**base, compile=True), world, tmp_path / "b")
    for key, value in eager.items():
        other = compiled[key]
        if key.endswith("attn.in_proj_bias"):
            # The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by
            # all keys): compiled and eager round it to different noise, and Adam turns that noise
            # into lr-sized steps of either sign (this failed on one CPU, passed on another).
            value, other = value.view(3, -1)[[0, 2]], other.view(3, -1)[[0, 2]]
        torch.testing.assert_close(other, value, rtol=1e-3, atol=1e-5, msg=key)


def test_save_checkpoints_false_writes_no_checkpoint(world, tmp_path):
    # Benchmarks train big models only to time them: no checkpoint (ViT-bigG's is ~25 GB), the log stays.
    config = TrainConfig(**(SMALL | dict(eval_every=5)), save_checkpoints=False)
    result = train(_fresh_tiny(), world.images, world.captions, config, tmp_path, eval_fn=lambda bundle: {"x": 1.0},
                   stop_when=lambda metrics: True)
    assert result.stopped_early and result.step == 5
    assert not result.checkpoint_path.exists() and not list(tmp_path.glob("*.pt"))
    assert result.log_path.exists()
