"""Would unlearning a recovered warp lower a WaNet model's ASR after repair? (issue 17; not adopted)

A warp trigger (WaNet) is confirmed by its victims' backgrounds (clipfast/defense/scan/confirm.py)
and its unlearning pairs are composites: a clean object on a victim's background. The object itself
is never warped in them, and the trusted WaNet cases keep 2.4-5.6 % ASR after repair (floors
1.3-2.6 %) under every repair setting tried (results/wanet_repair_sweep.jsonl). This measures the
obvious next step, on the saved scans of a finished matrix run's trusted WaNet rows:

1. Invert the warp as trigger-inversion defences invert a patch: a smooth field of pixel offsets
   (a 4 x 4 lattice upsampled bicubically, WaNet's own form, each component bounded by 1/8 of the
   image side), fitted by Adam (150 steps of 64 images, 3 restarts) so that the suspect calls
   warped clean probe images of other labels the target while the trusted model keeps their labels
   (its cross-entropy, weight 1: the control, as in the transplant tests). The restart that turns
   the most held-out images to the target in the suspect, less in the trusted model, is kept.
2. Repair with defend's compact set plus K pairs per non-target label: held-out clean probe images
   warped, captioned with their own label and anchored to their unwarped embedding (the anchoring a
   patch's unlearning pairs get), for the recovered warp and, as a trigger-agnostic control, for a
   fresh random smooth warp per image of the same size.
3. Measure CA and ASR on the test world (the attacker's warp), and the target share under the
   recovered warp, beside the default repair.

    python benchmarks/warp_unlearning.py --commit bf4142a                      # objective "target"
    python benchmarks/warp_unlearning.py --commit bf4142a --objective target+unwarp --restarts 4 \
        --pairs 8 --warps recovered --anchor-victims
    python benchmarks/warp_unlearning.py --commit bf4142a --warps attacker --pairs 8 32   # the oracle bound

The second adds the victims to the search (warped back by the negated field they should lose the
target: it ties the field to the warp the victims carry, where the first objective also finds
other warps the backdoor answers) and a variant whose victims are anchored to their warped-back
views, as a patch victim is anchored to its view with the patch filled.

The third repairs with pairs warped by the attacker's own field, which no defence knows: the upper
bound of what any inversion could bring within this repair.

Its repairs run without the trusted model's target bound (repair.py, since d15be4e): they measure
what warp pairs add to the repair as it was before the bound, which the committed rows are.

Rows go to `--out` (JSON lines) as they end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from clipfast.attacks.triggers import warp
from clipfast.data.world import zero_shot_prompts
from clipfast.defense.curate import CompactSet, CurateConfig, curate
from clipfast.defense.repair import RepairConfig, repair
from clipfast.defense.unlearning import recover_triggers
from clipfast.demo import DemoConfig, default_cache_dir
from clipfast.eval import evaluate
from clipfast.models import ZeroShotClassifier
from clipfast.oracle import ClassicalSegmenter
from clipfast.recipes import evaluation_world
from repair_variants import append_row, matrix_cases, saved_case, trusted_model

GRID, MAX_SHIFT, STEPS, BATCH, RESTARTS = 4, 0.125, 150, 64, 3
RANDOM_WARP_SCALE = 1.5  # lattice parameters ~ N(0, 1.5): mean shift ~3.3 px of 32, the true warp's ~3 px


def flow_field(offsets: torch.Tensor, size: int) -> torch.Tensor:
    """float [size, size, 2] pixel offsets from lattice parameters [1, 2, g, g] (tanh-bounded)."""
    lattice = torch.tanh(offsets) * MAX_SHIFT * size
    return F.interpolate(lattice, size=(size, size), mode="bicubic", align_corners=True)[0].permute(1, 2, 0)


@contextlib.contextmanager
def input_gradients_only(*bundles):
    params = [p for bundle in bundles for p in bundle.model.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)


def logits(classifier: ZeroShotClassifier, images: torch.Tensor) -> torch.Tensor:
    embeddings = F.normalize(classifier.bundle.model.encode_image(classifier.bundle.preprocess(images)), dim=-1)
    return classifier.logit_scale * embeddings @ classifier.class_embeddings.T


def share(classifier: ZeroShotClassifier, images: torch.Tensor, target: int) -> float:
    return float((classifier.predict(images)[0][:, 0] == target).float().mean())


def invert_warp(suspect, trusted, classnames, fit, fit_labels, judged, target, victims=None, victim_labels=None,
                restarts=RESTARTS, seed=0):
    """(flow, {shares}) of the best of `restarts` fits. Objective "target": warped clean images of
    other labels (`fit`) to the target in the suspect, their own labels in the trusted model. Given
    victims (objective "target+unwarp"), also: the victims warped back (by the negated field, the
    inverse to first order) to their oracle labels in the suspect, which ties the field to the
    warp the victims actually carry. The kept fit: the largest suspect share on `judged` less the
    trusted share, less (given victims) the share of held-out victims still the target when warped back."""
    judges = [ZeroShotClassifier(model, classnames, prompts=zero_shot_prompts) for model in (suspect, trusted)]
    generator = torch.Generator().manual_seed(seed)
    size, best = fit.shape[-1], None
    if victims is not None:
        half = len(victims) // 2
        victims, victim_labels, judged_victims = victims[:half], victim_labels[:half], victims[half:]
    with input_gradients_only(suspect, trusted):
        for _ in range(restarts):
            offsets = (torch.randn(1, 2, GRID, GRID, generator=generator) * 0.3).requires_grad_(True)
            optimizer = torch.optim.Adam([offsets], lr=0.1)
            for _ in range(STEPS):
                rows = torch.randint(len(fit), (BATCH,), generator=generator)
                flow = flow_field(offsets, size)
                warped = warp(fit[rows].float() / 255.0, flow)
                loss = (F.cross_entropy(logits(judges[0], warped), torch.full((BATCH,), target))
                        + F.cross_entropy(logits(judges[1], warped), fit_labels[rows]))
                if victims is not None:
                    picked = torch.randint(len(victims), (BATCH,), generator=generator)
                    unwarped = warp(victims[picked].float() / 255.0, -flow)
                    loss = loss + F.cross_entropy(logits(judges[0], unwarped), victim_labels[picked])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            flow = flow_field(offsets, size).detach()
            shares = dict(zip(("suspect_share", "trusted_share"),
                              (share(judge, warp(judged, flow), target) for judge in judges)))
            score = shares["suspect_share"] - shares["trusted_share"]
            if victims is not None:
                shares["unwarped_victims_target_share"] = share(judges[0], warp(judged_victims, -flow), target)
                score -= shares["unwarped_victims_target_share"]
            if best is None or score > best[2]:
                best = (flow, shares, score)
    return best[:2]


def with_pairs(compact: CompactSet, probe, indices: torch.Tensor, warped: torch.Tensor, scan) -> CompactSet:
    """compact plus the warped images of `indices`, captioned with their labels, anchored to their originals."""
    captions = [f"a photo of a {scan.classnames[int(label)]}." for label in scan.image_label[indices]]
    k = len(indices)
    return dataclasses.replace(
        compact, images=torch.cat([compact.images, warped]), captions=compact.captions + captions,
        source_indices=torch.cat([compact.source_indices, indices]),
        is_victim=torch.cat([compact.is_victim, torch.zeros(k, dtype=torch.bool)]),
        is_synthesized=torch.cat([compact.is_synthesized, torch.ones(k, dtype=torch.bool)]),
        clean_views=torch.cat([compact.clean_views, probe[indices]]),
        has_clean_view=torch.cat([compact.has_clean_view, torch.ones(k, dtype=torch.bool)]))


def anchored_victims(compact: CompactSet, flow: torch.Tensor) -> CompactSet:
    """compact with its victims anchored to their views warped back by the recovered field."""
    views, anchored = compact.clean_views.clone(), compact.has_clean_view.clone()
    views[compact.is_victim] = warp(compact.images[compact.is_victim], -flow)
    anchored[compact.is_victim] = True
    return dataclasses.replace(compact, clean_views=views, has_clean_view=anchored)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True, help="the matrix run whose trusted WaNet rows, models and scans to reuse")
    parser.add_argument("--pairs", type=int, nargs="+", default=[8, 32], help="warped pairs per non-target label")
    parser.add_argument("--objective", choices=["target", "target+unwarp"], default="target",
                        help="the warp search's objective (invert_warp)")
    parser.add_argument("--restarts", type=int, default=RESTARTS)
    parser.add_argument("--warps", nargs="+", choices=["recovered", "random", "attacker"], default=["recovered", "random"],
                        help="whose warps the pairs carry: the recovered field; random fields of the same size (the "
                             "trigger-agnostic control); the attacker's own field (an oracle: the upper bound of "
                             "what any inversion could give, not a defence)")
    parser.add_argument("--anchor-victims", action="store_true",
                        help="also repair with the victims anchored to their views warped back (and x K pairs)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "warp_unlearning.jsonl")
    args = parser.parse_args(argv)
    cache, settings = default_cache_dir(), DemoConfig()
    test = evaluation_world(settings.test_size)
    segmenter = ClassicalSegmenter()
    rows = [row for row in matrix_cases(args.commit, None, ["trusted"]) if row["config"].startswith("wanet")]
    for row in rows:
        case = saved_case(row, args.commit, cache, settings)
        if case is None:
            print(f"{row['config']} seed {row['seed']}: no saved scan, skipped", flush=True)
            continue
        recipe, bundle, pairs, scan = case
        trusted, probe, target = trusted_model(row, recipe, cache), pairs.images[: settings.probe_size], recipe.target_label
        triggers = recover_triggers(scan, probe, 0, segmenter)  # as defend does: the backgrounds
        compact = curate(scan, probe, CurateConfig(), triggers)
        # Clean probe images of other labels outside the compact set: fit and judge the warp on the
        # first 512, draw the pairs from the rest.
        clean = scan.clean_indices()
        clean = clean[(scan.image_label[clean] != target) & ~torch.isin(clean, compact.source_indices)]
        clean = clean[torch.randperm(len(clean), generator=torch.Generator().manual_seed(0))]
        fit, judged, spare = clean[:256], clean[256:512], clean[512:]
        victims = scan.victims(target)
        victims = victims[scan.oracle_label[victims] != target]  # their oracle label is what unwarping restores
        victims = victims[torch.randperm(len(victims), generator=torch.Generator().manual_seed(0))]
        true_flow = recipe.make_trigger().displacement(*probe.shape[-2:])
        flow, inversion = true_flow, {"objective": "none: the attacker's field"}
        if "recovered" in args.warps:
            with_victims = args.objective == "target+unwarp"
            flow, shares = invert_warp(bundle, trusted, scan.classnames, probe[fit], scan.image_label[fit],
                                       probe[judged], target, probe[victims] if with_victims else None,
                                       scan.oracle_label[victims] if with_victims else None, args.restarts)
            inversion = {"objective": args.objective, "restarts": args.restarts, **shares,
                         "cosine_to_true_field": float(F.cosine_similarity(flow.flatten(), true_flow.flatten(), dim=0)),
                         "mean_shift_px": float(flow.norm(dim=-1).mean()),
                         "true_mean_shift_px": float(true_flow.norm(dim=-1).mean())}
        non_target = test.labels != target
        recovered_on_test = warp(test.images[non_target], flow)
        generator = torch.Generator().manual_seed(1)
        labels = [label for label in range(len(scan.classnames)) if label != target]
        variants = [("default", compact)]
        for k in args.pairs:
            chosen = torch.cat([spare[scan.image_label[spare] == label][:k] for label in labels])
            if "attacker" in args.warps:
                variants.append((f"attacker's warp x{k} (oracle)",
                                 with_pairs(compact, probe, chosen, warp(probe[chosen], true_flow), scan)))
            if "recovered" in args.warps:
                with_recovered = with_pairs(compact, probe, chosen, warp(probe[chosen], flow), scan)
                variants.append((f"recovered warp x{k}", with_recovered))
            if "random" in args.warps:  # a fresh field per image
                random = torch.cat([warp(probe[i: i + 1], flow_field(
                    torch.randn(1, 2, GRID, GRID, generator=generator) * RANDOM_WARP_SCALE, probe.shape[-1]))
                    for i in chosen])
                variants.append((f"random warps x{k}", with_pairs(compact, probe, chosen, random, scan)))
            if args.anchor_victims and "recovered" in args.warps:
                variants.append((f"recovered warp x{k}, victims anchored", anchored_victims(with_recovered, flow)))
        for name, curated in variants:
            model = copy.deepcopy(bundle)
            with tempfile.TemporaryDirectory() as work:
                result = repair(model, curated, scan, probe, work, prompts=zero_shot_prompts,
                                config=RepairConfig(progress=False), triggers=triggers)
            after = evaluate(model, test, recipe.make_trigger(), target)
            classifier = ZeroShotClassifier(model, scan.classnames, prompts=zero_shot_prompts)
            append_row({"commit": args.commit, "config": row["config"], "seed": int(row["seed"]), "variant": name,
                        "compact_set_size": len(curated), "ca_poisoned": float(row["ca_poisoned"]),
                        "asr_poisoned": float(row["asr_poisoned"]), "asr_clean_model": float(row["asr_clean_model"]),
                        "ca_repaired": after["ca"], "asr_repaired": after["asr"],
                        "recovered_warp_target_share_after": share(classifier, recovered_on_test, target),
                        "asr_estimate": result.estimates.get("asr_estimate"), "inversion": inversion}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
