"""The class prompts encoded with and without their padding (clipfast/models/text.py): seconds and
the largest feature difference, on open_clip architectures with random weights (seed 0) and the
synthetic world's prompts (every class x every template, as the scan encodes them).

    python benchmarks/text_trim.py --models ViT-B-16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clipfast.data.world import CLASSES, zero_shot_prompts
from clipfast.models import load_model
from clipfast.models.text import encode_text, pooled_positions

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["ViT-B-16"])
    parser.add_argument("--out", type=Path, default=RESULTS / "text_trim.json")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        bundle = load_model(name)
        tokens = bundle.tokenizer([p for c in CLASSES for p in zero_shot_prompts(c)])
        with torch.no_grad():
            start = time.perf_counter()
            full = bundle.model.encode_text(tokens, normalize=True)
            full_s = time.perf_counter() - start
            start = time.perf_counter()
            trimmed = encode_text(bundle.model, tokens, normalize=True)
            trimmed_s = time.perf_counter() - start
        rows.append({"model": name, "prompts": len(tokens), "context": tokens.shape[1],
                     "trimmed_to": int(pooled_positions(bundle.model, tokens).max()) + 1,
                     "full_seconds": round(full_s, 3), "trimmed_seconds": round(trimmed_s, 3),
                     "max_abs_difference": float((full - trimmed).abs().max()),
                     "torch": torch.__version__, "threads": torch.get_num_threads()})
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
