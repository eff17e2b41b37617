"""What the mirror test costs: the demo model's self-mode scan (5000 probe images) with and without
it, twice each, in one process (the mirror test adds 3 whole-image encodes per probe image: the
mirrored image, its largest region alone and that object mirrored; clipfast/defense/scan/decide.py).

    python benchmarks/mirror_cost.py

Prints the wall time and the scan's stage times of each run (the test's encodes count as evidence).
"""

from __future__ import annotations

import time

from clipfast.data.world import CLASSES, zero_shot_prompts
from clipfast.defense.scan import ScanConfig, scan
from clipfast.demo import DemoConfig, default_cache_dir
from clipfast.oracle import ClassicalSegmenter
from clipfast.recipes import cached_world_model


def main() -> int:
    settings = DemoConfig()
    bundle, pairs, _ = cached_world_model(settings.recipe, default_cache_dir() / "models")
    probe = pairs.images[: settings.probe_size]
    for mirror in (True, False, True, False):
        start = time.perf_counter()
        result = scan(bundle, list(CLASSES), probe, ClassicalSegmenter(), prompts=zero_shot_prompts,
                      config=ScanConfig(progress=False, mirror_test=mirror))
        print(f"mirror_test={mirror}: {time.perf_counter() - start:.1f} s, targets {result.targets}, stages "
              + ", ".join(f"{name} {seconds:.1f}" for name, seconds in result.seconds.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
