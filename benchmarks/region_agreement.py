"""How well mask_pool regions (one encoder pass) agree with crop regions (one pass per crop).

On the demo world (the default badnet recipe's poisoned model, trained into the cache on first use),
segments the first N probe images with the built-in segmenter, embeds every region both ways,
scores both with region_score and reports: top-label agreement over all regions and over the
poisoned images' regions, agreement on "does some region predict the target label", the
correlation of each region's probability for its image's label, and the time of each mode.

    python benchmarks/region_agreement.py --images 1000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clipfast.data.world import CLASSES, zero_shot_prompts
from clipfast.defense.scan import ScanConfig
from clipfast.demo import default_cache_dir
from clipfast.models import ZeroShotClassifier
from clipfast.models.regions import encode_regions_pooled
from clipfast.ops import mask_crop, region_score
from clipfast.oracle import ClassicalSegmenter
from clipfast.recipes import WorldRecipe, cached_world_model


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "region_agreement.json")
    args = parser.parse_args(argv)

    recipe = WorldRecipe()
    bundle, pairs, _ = cached_world_model(recipe, default_cache_dir() / "models")
    images = pairs.images[: args.images]
    poisoned = torch.zeros(len(images), dtype=torch.bool)
    poisoned[pairs.poisoned_indices[pairs.poisoned_indices < len(images)]] = True
    target = recipe.target_label
    classifier = ZeroShotClassifier(bundle, list(CLASSES), prompts=zero_shot_prompts)
    text = classifier.class_embeddings
    scan = ScanConfig()
    segmentation = ClassicalSegmenter().segment(images)
    masks = segmentation.masks
    if images.shape[-1] != bundle.image_size:
        raise SystemExit("this measurement needs probe images at the encoder's input size")

    start = time.perf_counter()
    image_embeddings = bundle.encode_images(images)
    crops = mask_crop(images, masks, bundle.image_size, margin=scan.crop_margin, square=scan.crop_square,
                      background=scan.crop_background, mean=bundle.mean, std=bundle.std)
    crop_embeddings = torch.zeros(*masks.shape[:2], text.shape[1])
    flat = crops.crops[crops.valid]
    crop_embeddings[crops.valid] = torch.cat([bundle.model.encode_image(flat[s:s + 512], normalize=True).float()
                                              for s in range(0, len(flat), 512)])
    crop_seconds = time.perf_counter() - start

    start = time.perf_counter()
    pooled_parts = [encode_regions_pooled(bundle, bundle.preprocess(images[s:s + 512]), masks[s:s + 512])
                    for s in range(0, len(images), 512)]
    pool_seconds = time.perf_counter() - start
    pooled_images = torch.cat([p[0] for p in pooled_parts])
    pooled_regions = torch.cat([p[1] for p in pooled_parts])
    valid = crops.valid & torch.cat([p[2] for p in pooled_parts])

    crop_scores = region_score(image_embeddings, crop_embeddings, valid, text, bundle.logit_scale)
    pool_scores = region_score(pooled_images, pooled_regions, valid, text, bundle.logit_scale)
    same = (crop_scores.region_label == pool_scores.region_label)[valid]
    poisoned_valid = valid & poisoned[:, None]
    same_poisoned = (crop_scores.region_label == pool_scores.region_label)[poisoned_valid]
    crop_target = ((crop_scores.region_label == target) & valid).any(1)
    pool_target = ((pool_scores.region_label == target) & valid).any(1)
    a, b = crop_scores.region_image_prob[valid], pool_scores.region_image_prob[valid]
    result = {
        "images": len(images), "regions": int(valid.sum()), "poisoned_images": int(poisoned.sum()),
        "top_label_agreement": float(same.float().mean()),
        "top_label_agreement_poisoned_images": float(same_poisoned.float().mean()) if len(same_poisoned) else None,
        # On poisoned images the scan needs regions that do NOT say the target (the object itself).
        "poisoned_image_regions_saying_target_crop": float((crop_scores.region_label == target)[poisoned_valid].float().mean()),
        "poisoned_image_regions_saying_target_pool": float((pool_scores.region_label == target)[poisoned_valid].float().mean()),
        "some_region_says_target_agreement": float((crop_target == pool_target).float().mean()),
        "crop_images_with_a_target_region": int(crop_target.sum()), "pool_images_with_a_target_region": int(pool_target.sum()),
        "image_label_prob_correlation": float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
        "crop_mode_seconds": crop_seconds, "pool_mode_seconds": pool_seconds,
        "device": "cpu", "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
