"""Measure ClassicalSegmenter on generate_world(2000, 123) with badnet / badnet_random applied."""
import sys, time, statistics
import torch
from clipfast.data.world import generate_world
from clipfast.attacks.triggers import make_trigger
from clipfast.oracle.classical import ClassicalSegmenter

torch.set_num_threads(2)

def best_iou(seg, target):
    inter = (seg.masks & target[:, None]).flatten(2).sum(-1).float()
    union = (seg.masks | target[:, None]).flatten(2).sum(-1).float()
    return torch.where(seg.valid, inter / union.clamp_min(1), torch.zeros(())).max(1).values

def main(**kw):
    world = generate_world(2000, seed=123)
    seg = ClassicalSegmenter(**kw)
    has2 = world.object_masks[:, 1].flatten(1).any(1)
    for name in (None, "badnet", "badnet_random"):
        trig = make_trigger(name) if name else None
        images = trig.apply(world.images) if trig else world.images
        times = []
        for _ in range(5):
            t = time.perf_counter(); out = seg.segment(images); times.append(time.perf_counter() - t)
        main_iou = best_iou(out, world.object_masks[:, 0])
        sec_iou = best_iou(out, world.object_masks[:, 1])[has2]
        line = (f"{name or 'clean':14s} main IoU {main_iou.mean():.4f} (min {main_iou.min():.3f}) "
                f"second IoU {sec_iou.mean():.4f} (n={int(has2.sum())}) regions/img {out.counts.float().mean():.2f} "
                f"time min {min(times):.2f}s median {statistics.median(times):.2f}s")
        if trig:
            fp = trig.footprint(len(images), 32, 32)
            ti = best_iou(out, fp)
            near = torch.nn.functional.max_pool2d(fp[:, None].float(), 3, 1, 1)[:, 0].bool()
            apart = ~(near & world.object_masks.any(1)).flatten(1).any(1)
            line += (f"\n{'':14s} trigger found(IoU>=.5) {(ti >= .5).float().mean():.4f} mean best IoU {ti.mean():.4f}; "
                     f"not touching an object (n={int(apart.sum())}): found {(ti[apart] >= .5).float().mean():.4f} "
                     f"IoU {ti[apart].mean():.4f}; touching (n={int((~apart).sum())}): found {(ti[~apart] >= .5).float().mean():.4f} IoU {ti[~apart].mean():.4f}"
                     f"\n{'':14s} main IoU vs object minus trigger pixels {best_iou(out, world.object_masks[:, 0] & ~fp).mean():.4f}")
        print(line)

if __name__ == "__main__":
    kw = {k: type(getattr(ClassicalSegmenter, k))(v) for k, v in (a.split("=") for a in sys.argv[1:])}
    main(**kw)
