import json
from types import SimpleNamespace

import pytest
import torch

from clipfast.eval import attack_success_rate, clean_accuracy, evaluate, format_report, save_report
from clipfast.models import ZeroShotClassifier

CLASSNAMES = ["zero", "one", "two"]
TARGET = 2


class _PixelBundle:
    """A fake model: an image's class is the value of its pixel (0, 0, 0), a one-hot embedding;
    a white pixel (1, 0, 0) -- the fake trigger -- overrides it with the target class."""

    name = "pixel-model"
    logit_scale = 100.0

    def encode_texts(self, texts, normalize=True, batch_size=256):
        return torch.eye(3)[[CLASSNAMES.index(t) for t in texts]]

    def encode_images(self, images, normalize=True, batch_size=256):
        predicted = images[:, 0, 0, 0].long().clone()
        predicted[images[:, 1, 0, 0] == 255] = TARGET
        return torch.eye(3)[predicted]


class _PixelTrigger:
    """Sets the trigger pixel on the first `hits` images only, so the ASR is hits / N."""

    def __init__(self, hits):
        self.hits = hits

    def apply(self, images, seed=0):
        out = images.clone()
        out[: self.hits, 1, 0, 0] = 255
        return out


def _samples(predicted, labels):
    images = torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor(predicted, dtype=torch.uint8)
    return SimpleNamespace(images=images, labels=torch.tensor(labels))


def _classifier():
    return ZeroShotClassifier(_PixelBundle(), CLASSNAMES, prompts=lambda c: [c])


def test_clean_accuracy_counts_top1_hits():
    samples = _samples(predicted=[0, 1, 2, 0, 1], labels=[0, 1, 2, 1, 1])
    assert clean_accuracy(_classifier(), samples.images, samples.labels) == pytest.approx(0.8)


def test_attack_success_rate_ignores_target_class_images():
    # 4 non-target images (the trigger reaches the first 3 of them), 2 target-class images
    samples = _samples(predicted=[0, 2, 1, 0, 1, 2], labels=[0, 2, 1, 0, 1, 2])
    asr = attack_success_rate(_classifier(), samples.images, samples.labels, _PixelTrigger(hits=3), TARGET)
    assert asr == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="every test image is of the target class"):
        attack_success_rate(_classifier(), samples.images[[1]], samples.labels[[1]], _PixelTrigger(1), TARGET)


def test_evaluate_reports_ca_asr_and_per_class_accuracy(tmp_path):
    samples = _samples(predicted=[0, 1, 1, 2, 0], labels=[0, 1, 2, 2, 1])
    report = evaluate(_PixelBundle(), samples, _PixelTrigger(hits=1), TARGET, classnames=CLASSNAMES,
                      prompts=lambda c: [c])
    assert report["ca"] == pytest.approx(0.6) and report["n"] == 5
    assert report["asr"] == pytest.approx(1 / 3, abs=1e-4) and report["n_asr"] == 3  # reports round to 4 digits
    assert report["per_class_accuracy"] == {"zero": 1.0, "one": 0.5, "two": 0.5}
    assert report["target_class"] == "two"

    path = tmp_path / "sub" / "report.json"
    save_report(report, path)
    assert json.loads(path.read_text()) == report
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]
    assert "ASR = 33.3 %" in format_report(report)


def test_evaluate_without_trigger_measures_ca_only():
    samples = _samples(predicted=[0, 1], labels=[0, 0])
    report = evaluate(_PixelBundle(), samples, classnames=CLASSNAMES, prompts=lambda c: [c])
    assert report["ca"] == 0.5 and report["asr"] is None and "ASR" not in format_report(report)
    with pytest.raises(ValueError, match="both a trigger and a target"):
        evaluate(_PixelBundle(), samples, trigger=_PixelTrigger(1), classnames=CLASSNAMES, prompts=lambda c: [c])
