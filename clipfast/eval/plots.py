"""Report figures: CA/ASR bars, the per-label test that picked the target, the recovered trigger."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)  # atomic: a reader never sees half a PNG


def plot_ca_asr(rows: dict[str, dict], path: str | Path) -> None:
    """rows: model name -> {"ca": float, "asr": float}."""
    names = list(rows)
    x = torch.arange(len(names)).float()
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.2))
    ca = [100 * rows[n]["ca"] for n in names]
    asr = [100 * (rows[n]["asr"] or 0.0) for n in names]
    bars = ax.bar(x - 0.2, ca, 0.4, label="clean accuracy (CA)", color="#4C72B0")
    bars2 = ax.bar(x + 0.2, asr, 0.4, label="attack success rate (ASR)", color="#C44E52")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.bar_label(bars2, fmt="%.1f", fontsize=8)
    ax.set_xticks(x.tolist(), names)
    ax.set_ylabel("%")
    ax.set_ylim(0, 110)
    ax.legend(loc="upper center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, 1.18))
    _save(fig, path)


def plot_label_test(classnames: list[str], candidates: list[int], expected: list[float], targets: list[str],
                    path: str | Path) -> None:
    """Candidates (images with trigger evidence) per label, their two largest source classes left
    out, against what the other labels' rate predicts."""
    x = torch.arange(len(classnames)).float()
    fig, ax = plt.subplots(figsize=(0.6 * len(classnames) + 2, 3.2))
    colours = ["#C44E52" if name in targets else "#8C8C8C" for name in classnames]
    ax.bar(x, candidates, 0.6, color=colours, label="images with trigger evidence (2 largest sources left out)")
    ax.plot(x.tolist(), expected, "k_", markersize=18, mew=2, label="expected under no backdoor")
    ax.set_xticks(x.tolist(), classnames, rotation=45, ha="right")
    ax.set_ylabel("images")
    ax.set_title("target: " + (", ".join(targets) if targets else "none found"), fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_trigger(example: torch.Tensor, recovered: torch.Tensor, true_footprint: torch.Tensor | None,
                 path: str | Path) -> None:
    """example uint8 [3, H, W] (a victim), recovered bool [H, W] (its trigger region), true_footprint
    bool [H, W] or None."""
    panels = [("victim image", example.permute(1, 2, 0).numpy()), ("recovered trigger region", recovered.float().numpy())]
    if true_footprint is not None:
        panels.append(("true trigger", true_footprint.float().numpy()))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.6))
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(image, cmap="gray", interpolation="nearest", vmin=0, vmax=1 if image.ndim == 2 else None)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    _save(fig, path)
