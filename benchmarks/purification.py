"""Do purifying transforms expose image-wide triggers without a trusted model? (issue 17, self mode)

Self mode finds no Blended, SIG or WaNet backdoor: its evidence is a region that explains the label,
and an image-wide trigger has none, while the suspect's own crops carry the trigger and agree with
it. The literature summary (../shared/notes/image-wide-triggers.md, signal 2a) suggests a global
causal test instead: a transform that keeps objects but destroys a fragile trigger (blur, resampling,
JPEG, bit-depth reduction, flips) turns a victim back to its source label, and leaves a clean image's
label alone. Whether it does on our world, and whether it separates poisoned from clean models, is
measured here before anything adopts it. (The scan adopted the mirror with the object control at
b415e9f: clipfast/defense/scan/decide.py, mirror_label_test.)

Per case (a model of the efficacy matrix, trained and cached as the matrix does; the probe set is
the matrix's, the first probe_size training pairs): the suspect's label L_i of every probe image and
its label under each transform T. A probe image is a T-candidate when T changes its label; its
purified label is its source. Two tests per transform, both with the scan's significance
(ScanConfig.significance, Bonferroni over the labels) and count floor (min_count), untouched:

- "pooled": the scan's own target test (scan.decide.decide_targets: sources trimmed, one-sided
  binomial against the other labels' pooled candidate rate, effect floor). It assumes every label is
  as sensitive to T as the others, and the world's classes are not: a mirror changes 17-30 % of the
  arrows' labels on every clean model, a blur or resampling the stars' and squares'.
- "object control": each label against its own sensitivity to T, measured on the probe's objects
  shown alone (each image's largest segmented region on the image's median colour, the scan's
  built-in segmenter): n_l images labelled l, c_l of them changed by T; of the objects alone labelled
  l, the share T changes, f_l, and its Clopper-Pearson upper 97.5 % bound f+; l is flagged when
  P(X >= c_l), X ~ Binomial(n_l, f+), is below the significance and c_l >= min_count. An image-wide
  trigger is mostly gone from an object shown alone (its background was most of it), so its victims
  barely count in f_l, while T undoes it on the whole image; a class T confuses is confused alone
  too.

Reported per transform and test: the flagged labels, the true target's count and p-value, the
smallest p-value among the other labels (the false-alarm margin), and the share of the probe's
poisoned images that the suspect gives the target that T changes (victim recall). Clean models: any
flag is a false alarm. An earlier version (7795af3) also tried asking for a hard swing ("confident":
the new label at >= 0.5 while p(L_i) halves) and mirroring the background with the object kept in
place; neither removed the pooled test's false flags (see the issue-17 notes).

The committed rows (c0b1e55's code; ~2 h here, most of it training the models):

    python benchmarks/purification.py --configs "clean model" "blended noise a=0.15" \
        "blended stripes a=0.15" "sig amp 20" "sig amp 10" "wanet strength 6" "wanet strength 3" \
        "badnet 4px checker corner" --seeds 0
    python benchmarks/purification.py --configs "clean model" "blended noise a=0.15" "wanet strength 6" \
        "sig amp 20" "badnet 4px checker corner" --seeds 1 2 3 4
    python benchmarks/purification.py --configs "blended noise a=0.08" "blended stripes a=0.08" --seeds 0

Rows go to `--out` (JSON lines), one per case, as each ends; models missing from the cache are
trained first (about 5 min each on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.io import decode_jpeg, encode_jpeg

from clipfast.bench.common import code_commit
from clipfast.bench.efficacy import MATRIX, _recipe
from clipfast.data.world import CLASSES, zero_shot_prompts
from clipfast.defense.scan import ScanConfig
from clipfast.defense.scan.decide import decide_targets, object_controlled_test
from clipfast.defense.transplant import fill_with_median
from clipfast.demo import DemoConfig, default_cache_dir
from clipfast.models import ZeroShotClassifier
from clipfast.oracle import ClassicalSegmenter
from clipfast.recipes import cached_world_model, optimized_patch_recipe

RESULTS = Path(__file__).resolve().parent / "results"


def _median3(images: torch.Tensor) -> torch.Tensor:
    padded = F.pad(images.float(), (1, 1, 1, 1), mode="replicate")
    patches = padded.unfold(2, 3, 1).unfold(3, 3, 1)  # [N, C, H, W, 3, 3]
    return patches.flatten(-2).median(-1).values.round().to(torch.uint8)


def _down_up(images: torch.Tensor, factor: int) -> torch.Tensor:
    size = images.shape[-1]
    small = F.interpolate(images.float(), scale_factor=1 / factor, mode="bilinear", antialias=True)
    return F.interpolate(small, size=(size, size), mode="bilinear").clamp(0, 255).round().to(torch.uint8)


def _jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    return torch.stack([decode_jpeg(encode_jpeg(image, quality=quality)) for image in images])


def _quantise(images: torch.Tensor, bits: int) -> torch.Tensor:
    step = 2 ** (8 - bits)
    return ((images.long() // step) * step + step // 2).clamp(0, 255).to(torch.uint8)


TRANSFORMS = {  # uint8 [N, 3, H, W] -> uint8 [N, 3, H, W]
    "blur s0.7": lambda x: TF.gaussian_blur(x.float(), 5, 0.7).round().to(torch.uint8),
    "blur s1.0": lambda x: TF.gaussian_blur(x.float(), 5, 1.0).round().to(torch.uint8),
    "median 3x3": _median3,
    "down-up x2": lambda x: _down_up(x, 2),
    "jpeg q50": lambda x: _jpeg(x, 50),
    "4-bit": lambda x: _quantise(x, 4),
    "3-bit": lambda x: _quantise(x, 3),
    "hflip": TF.hflip,
    "transpose": lambda x: x.transpose(-1, -2).contiguous(),
}


def largest_regions(images: torch.Tensor) -> torch.Tensor:
    """bool [N, H, W]: each image's largest region by the scan's built-in segmenter (empty if none)."""
    segmenter = ClassicalSegmenter()
    return torch.cat([segmenter.segment(part).masks[:, 0] for part in images.split(256)])


def matrix_rate(config_name: str, seed: int) -> float:
    """The rate the matrix's rate ladder settled on for this case (its newest CSV row)."""
    with (RESULTS / "efficacy.csv").open(newline="") as handle:
        rates = [float(row["rate"]) for row in csv.DictReader(handle)
                 if row["config"] == config_name and int(row["seed"]) == seed]
    if not rates:
        raise SystemExit(f"no efficacy.csv row for {config_name!r} seed {seed}")
    return rates[-1]


def label_test_row(label: torch.Tensor, candidate: torch.Tensor, purified: torch.Tensor, target: int | None,
                   victims: torch.Tensor, config: ScanConfig) -> dict:
    """What the scan's target test makes of these candidates (sources: their purified labels)."""
    test, flagged = decide_targets(label, candidate, purified, len(CLASSES), config)
    others = [c for c in range(len(CLASSES)) if c != target]
    worst = min(others, key=lambda c: test.p_values[c])
    row = {"candidates": int(candidate.sum()), "flagged": [CLASSES[c] for c in flagged],
           "other_max_trimmed": max(test.candidates[c] for c in others),
           "other_min_p": float(f"{test.p_values[worst]:.3g}"), "other_min_p_label": CLASSES[worst]}
    if target is not None:
        row.update(target_trimmed=test.candidates[target], target_expected=round(test.expected[target], 1),
                   target_p=float(f"{test.p_values[target]:.3g}"),
                   victim_recall=round(float(candidate[victims].float().mean()), 3) if len(victims) else None)
    return row


def object_control_row(label: torch.Tensor, purified: torch.Tensor, alone: torch.Tensor, alone_purified: torch.Tensor,
                       target: int | None, victims: torch.Tensor, config: ScanConfig) -> dict:
    """Each label's T-changed count against its own sensitivity to T on the objects alone (the scan's
    decide.object_controlled_test, see the module doc). label / alone: top labels of the images and of
    their objects alone; purified / alone_purified: the same under T."""
    test, targets = object_controlled_test(label, purified, alone, alone_purified, len(CLASSES),
                                           config.significance, config.min_count)
    changed, alone_changed = purified != label, alone_purified != alone
    per_label = {name: [test.predicted[index], test.candidates[index], int((alone == index).sum()),
                        int((alone_changed & (alone == index)).sum())] for index, name in enumerate(CLASSES)}
    others = [index for index in range(len(CLASSES)) if index != target]
    worst = min(others, key=lambda index: test.p_values[index])
    row = {"flagged": [CLASSES[index] for index in targets], "other_min_p": float(f"{test.p_values[worst]:.3g}"),
           "other_min_p_label": CLASSES[worst], "per_label_n_c_alone_n_c": per_label}
    if target is not None:
        n, c, n_alone, c_alone = per_label[CLASSES[target]]
        row.update(target_rate=round(c / max(n, 1), 3), target_alone_rate=round(c_alone / max(n_alone, 1), 3),
                   target_p=float(f"{test.p_values[target]:.3g}"),
                   victim_recall=round(float(changed[victims].float().mean()), 3) if len(victims) else None)
    return row


def main(argv=None) -> int:  # not under no_grad: models missing from the cache are trained here
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True, help="efficacy matrix configuration names")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "purification.jsonl")
    args = parser.parse_args(argv)
    settings, cache, config = DemoConfig(), default_cache_dir(), ScanConfig()
    for name in args.configs:
        attack = next((c for c in MATRIX if c.name == name), None)
        if attack is None:
            raise SystemExit(f"unknown configuration {name!r}; one of: {[c.name for c in MATRIX]}")
        for seed in [s for s in args.seeds if s in attack.seeds]:
            rate = matrix_rate(name, seed)
            recipe = optimized_patch_recipe(_recipe(attack, seed, rate, settings), cache / "models")
            bundle, pairs, _ = cached_world_model(recipe, cache / "models")
            classifier = ZeroShotClassifier(bundle, CLASSES, prompts=zero_shot_prompts)
            probe = pairs.images[: settings.probe_size]
            label = classifier.predict(probe)[0][:, 0]
            target = None if attack.clean else recipe.target_label
            poisoned = pairs.poisoned_indices[pairs.poisoned_indices < settings.probe_size]
            victims = poisoned[label[poisoned] == target] if target is not None else poisoned  # none: clean
            row = {"commit": code_commit()[:12], "config": name, "seed": seed, "rate": rate, "family": attack.family,
                   "target": None if target is None else CLASSES[target], "probe": len(probe),
                   "victims_in_probe": len(victims), "transforms": {}}
            objects = fill_with_median(probe, ~largest_regions(probe))  # each largest region alone
            alone = classifier.predict(objects)[0][:, 0]
            for transform, fn in TRANSFORMS.items():
                purified, alone_purified = classifier.predict(fn(probe))[0][:, 0], classifier.predict(fn(objects))[0][:, 0]
                row["transforms"][transform] = {
                    "pooled": label_test_row(label, purified != label, purified, target, victims, config),
                    "object control": object_control_row(label, purified, alone, alone_purified, target, victims,
                                                         config)}
            print(json.dumps(row), flush=True)
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
