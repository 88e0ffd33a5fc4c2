"""Pictures the jobs write next to their numbers, drawn with matplotlib's object API (no pyplot, no display).

- `confusion_matrix`: row-normalised colours with a colour bar, the counts in the cells up to 30 classes, class
  names on both axes up to 120 (zero-shot, fine-tuning);
- `training_curves`: a run's metrics.jsonl as one figure: losses (train and eval), temperatures, learning rate,
  throughput, gradient norm, in-batch and eval accuracies; every training job writes it when its loop ends;
- `reconstruction_grid`: MMR targets beside their reconstructions, each row labelled with its class or caption and
  its PSNR / SSIM.

    python -m synergy_jax.plots runs/demo     # training_curves.png next to every metrics.jsonl under the folder
"""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from synergy_jax.loop import read_metrics

ANNOTATED_CLASSES = 30  # counts are written in the cells up to this many classes
NAMED_CLASSES = 120  # class names on the axes up to this many


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], title: str, path: str | Path) -> Path:
    """`confusion_figure` written to `path` (PNG)."""
    confusion_figure(matrix, class_names, title).savefig(path, dpi=100, bbox_inches="tight")
    return Path(path)


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str):
    """Rows true, columns predicted; colour = share of the true class, so classes of any size compare."""
    classes = len(class_names)
    counts = np.asarray(matrix)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(28.0, max(5.0, 0.22 * classes + 3.0))
    figure = _figure(side + 1.5, side)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class")
    font = max(3.0, min(9.0, 300.0 / max(classes, 1)))
    if classes <= NAMED_CLASSES:
        names = [name if len(name) <= 24 else name[:23] + "…" for name in class_names]
        axes.set_xticks(range(classes), names, rotation=90, fontsize=font)
        axes.set_yticks(range(classes), names, fontsize=font)
    if classes <= ANNOTATED_CLASSES:
        for (row, column), count in np.ndenumerate(counts):
            if count:
                axes.text(column, row, str(int(count)), ha="center", va="center", fontsize=font,
                          color="white" if shares[row, column] > 0.5 else "black")  # fmt: skip
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("\n".join(textwrap.wrap(title, width=int(12 * side))), fontsize=10)
    return figure


# ------------------------------------------------------------------------------------------ training curves

# Panel title -> which metric names it shows (a name matches a prefix ending in '/' or equals an entry).
PANELS = {
    "loss": ("loss", "loss/", "eval/loss", "eval/loss/", "eval/ce", "eval/mse"),
    "temperature (logit scale)": ("logit_scale/",),
    "learning rate": ("learning_rate",),
    "samples / s": ("samples_per_second",),
    "gradient norm": ("grad_norm",),
    "accuracy": ("acc/", "eval/accuracy", "eval/select/accuracy", "eval/report/accuracy"),
    "eval: zero-shot top-1, R@1": ("eval/zero_shot/image->text/top1", "eval/zero_shot/audio->text/top1",
                                   "eval/retrieval/image->text/R@1", "eval/retrieval/audio->text/R@1",
                                   "eval/retrieval/image->audio/R@1"),
    "eval: PSNR (dB)": ("eval/psnr",),
    "eval: SSIM": ("eval/ssim",),
}


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or (p.endswith("/") and name.startswith(p) and "/" not in name[len(p):]) for p in patterns)


def training_curves(metrics_file: str | Path, path: str | Path | None = None, title: str = "") -> Path | None:
    """`curves_figure` of a run's metrics.jsonl, as `training_curves.png` beside it by default; None when there is
    nothing to draw yet."""
    metrics_file = Path(metrics_file)
    figure = curves_figure(read_metrics(metrics_file), title or str(metrics_file.parent))
    if figure is None:
        return None
    out = Path(path) if path else metrics_file.with_name("training_curves.png")
    figure.savefig(out, dpi=100, bbox_inches="tight")
    return out


def curves_figure(rows: list[dict], title: str):
    """One panel per entry of `PANELS` the rows have numbers for (train lines solid, eval points dashed), or None."""
    panels = {}
    for panel, patterns in PANELS.items():
        names = sorted({k for row in rows for k, v in row.items() if _matches(k, patterns) and _number(v)})
        if names:
            panels[panel] = names
    if not panels:
        return None
    columns, panel_rows = min(3, len(panels)), math.ceil(len(panels) / 3)
    figure = _figure(5.0 * columns, 3.4 * panel_rows)
    for index, (panel, names) in enumerate(panels.items()):
        axes = figure.add_subplot(panel_rows, columns, index + 1)
        for name in names:
            steps, values = zip(*[(row["step"], row[name]) for row in rows if _number(row.get(name))])
            evaluated = name.startswith("eval/")
            axes.plot(steps, values, marker="o" if evaluated else None, markersize=3, linestyle="--" if evaluated else "-",
                      linewidth=1.2, label=name)  # fmt: skip
        axes.set_title(panel, fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        if len(names) > 1 or names[0] != panel:
            axes.legend(fontsize=6)
    figure.suptitle(title, fontsize=10)
    return figure


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------ MMR samples


def reconstruction_grid(targets: np.ndarray, recons: np.ndarray, labels: Sequence[str], scores: Sequence[str],
                        spectrogram: bool, path: str | Path) -> Path:  # fmt: skip
    """`reconstruction_figure` written to `path` (PNG)."""
    reconstruction_figure(targets, recons, labels, scores, spectrogram).savefig(path, dpi=100, bbox_inches="tight")
    return Path(path)


def reconstruction_figure(targets: np.ndarray, recons: np.ndarray, labels: Sequence[str], scores: Sequence[str],
                          spectrogram: bool):  # fmt: skip
    """One row per sample: target | reconstruction, titled with the sample's class or caption and its scores.
    Images are [0, 1] RGB; spectrograms (time x mel) are drawn mel upwards, each pair on its target's range."""
    rows = len(targets)
    figure = _figure(7.0, 2.3 * rows if spectrogram else 3.0 * rows)
    for row, (target, recon) in enumerate(zip(targets, recons)):
        for column, (picture, name) in enumerate(((target, "target"), (recon, "reconstruction"))):
            axes = figure.add_subplot(rows, 2, 2 * row + column + 1)
            if spectrogram:
                axes.imshow(picture[..., 0].T, origin="lower", aspect="auto", cmap="magma",
                            vmin=float(target.min()), vmax=float(target.max()))  # fmt: skip
            else:
                axes.imshow(np.clip(picture, 0.0, 1.0), interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            text = f"{labels[row]}" if column == 0 else f"{name}: {scores[row]}"
            axes.set_title("\n".join(textwrap.wrap(text, 40)[:2]), fontsize=8)
    return figure


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m synergy_jax.plots <run folder>", file=sys.stderr)
        return 2
    files = sorted(Path(argv[1]).rglob("metrics.jsonl"))
    if not files:
        print(f"error: no metrics.jsonl under {argv[1]}", file=sys.stderr)
        return 2
    for metrics_file in files:
        out = training_curves(metrics_file)
        print(out or f"{metrics_file}: nothing to plot yet")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
