"""The pictures the jobs write (matplotlib): annotated confusion matrices from 5 to 102 classes, training curves from
metrics.jsonl (also as `python -m synergy_jax.plots <run>`), labelled MMR grids."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT
from synergy_jax import plots


@pytest.mark.parametrize("classes", [5, 50, 102])
def test_confusion_matrix_is_readable_at_every_size(classes, tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 2, (classes, classes)) + 9 * np.eye(classes, dtype=int)
    names = [f"class {i}" for i in range(classes)]
    figure = plots.confusion_figure(matrix, names, "ESC-50 audio->text top-1 85.0% (a title long enough to wrap)")
    axes = figure.axes[0]
    # counts in the cells up to 30 classes (every non-zero one), names on both axes up to 120, a colour bar
    assert len(axes.texts) == (np.count_nonzero(matrix) if classes <= plots.ANNOTATED_CLASSES else 0)
    assert [t.get_text() for t in axes.get_yticklabels()] == names
    assert len(figure.axes) == 2 and "share of the true class" in figure.axes[1].get_ylabel()
    assert "(a title long enough" in axes.get_title()  # not cut off
    path = plots.confusion_matrix(matrix, names, "t", tmp_path / "c.png")
    assert Image.open(path).size[0] >= 500


PRETRAIN_ROWS = [{"step": s, "loss": 5.0 - s / 10, "loss/it": 2.0, "logit_scale/it": 14.0 + s / 100,
                  "learning_rate": 1e-3, "samples_per_second": 400.0, "grad_norm": 3.0, "acc/it": 0.1, "window_steps": 10}
                 for s in range(10, 60, 10)] + [{"step": 50, "eval/loss": 5.4, "eval/zero_shot/image->text/top1": 0.8}]  # fmt: skip
MMR_ROWS = [{"step": s, "loss": 1.0 / s, "learning_rate": 3e-3, "grad_norm": 1.0, "samples_per_second": 50.0}
            for s in (25, 50)] + [{"step": 50, "eval/psnr": 20.1, "eval/ssim": 0.4, "eval/mse": 0.01}]  # fmt: skip


@pytest.mark.parametrize("rows, panels", [
    (PRETRAIN_ROWS, ["loss", "temperature (logit scale)", "learning rate", "samples / s", "gradient norm", "accuracy",
                     "eval: zero-shot top-1, R@1"]),
    (MMR_ROWS, ["loss", "learning rate", "samples / s", "gradient norm", "eval: PSNR (dB)", "eval: SSIM"]),
])  # fmt: skip
def test_training_curves_show_what_the_run_logged(rows, panels):
    figure = plots.curves_figure(rows, "run")
    assert [axes.get_title() for axes in figure.axes] == panels
    loss = figure.axes[0]
    evaluated = [line for line in loss.get_lines() if line.get_label().startswith("eval/")]
    assert evaluated and all(line.get_linestyle() == "--" for line in evaluated)
    assert plots.curves_figure([{"step": 1, "nonfinite": 0.0}], "run") is None


def test_the_plots_command_draws_every_run_under_a_folder(tmp_path):
    for sub in ("fold1", "fold2"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MMR_ROWS))
    result = subprocess.run([sys.executable, "-m", "synergy_jax.plots", str(tmp_path)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for sub in ("fold1", "fold2"):
        assert Image.open(tmp_path / sub / "training_curves.png").size[0] > 1000
    empty = subprocess.run([sys.executable, "-m", "synergy_jax.plots", str(tmp_path / "fold1" / "nothing")],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert empty.returncode == 2 and "no metrics.jsonl" in empty.stderr


@pytest.mark.parametrize("spectrogram", [False, True])
def test_reconstruction_grid_labels_every_row(spectrogram, tmp_path):
    rng = np.random.default_rng(0)
    shape = (3, 64, 16, 1) if spectrogram else (3, 16, 16, 3)
    targets, recons = rng.random(shape), rng.random(shape)
    texts, scores = ["a dog barking", "rain", "a siren"], [f"PSNR {20 + i}.0 dB, SSIM 0.400" for i in range(3)]
    figure = plots.reconstruction_figure(targets, recons, texts, scores, spectrogram)
    titles = [axes.get_title() for axes in figure.axes]
    assert titles[0::2] == texts and titles[1::2] == [f"reconstruction: {score}" for score in scores]
    assert Image.open(plots.reconstruction_grid(targets, recons, texts, scores, spectrogram, tmp_path / "g.png")).size[1] > 400


def test_progress_off_a_terminal_is_a_few_whole_lines():
    """A log file gets a line at the start, one every LINE_SECONDS and one at the end, not a frame per update."""
    import io

    from synergy_jax import progress

    stream = io.StringIO()
    bar = progress.bar(total=5000, desc="train", unit="step", stream=stream)
    for _ in range(5000):
        bar.update(1)
        bar.set_postfix(loss="5.1", refresh=False)
    bar.close()
    lines = stream.getvalue().split("\n")
    assert "\r" not in stream.getvalue() and lines[-1] == ""
    assert lines[0].startswith("train: 0/5000 step [") and lines[-2].startswith("train: 5000/5000 step [")
    assert "loss=5.1" in lines[-2] and len(lines) - 1 <= 3


def test_progress_that_starts_complete_is_one_line():
    """A rerun that finds every row done draws the same frame at the start and at the end: it is written once."""
    import io

    from synergy_jax import progress

    stream = io.StringIO()
    progress.bar(total=60, initial=60, desc="precompute test", unit="row", stream=stream).close()
    assert stream.getvalue().count("\n") == 1 and stream.getvalue().startswith("precompute test: 60/60 row ["), stream.getvalue()
