"""Reconstruction evaluator (MMR): the missing modality rebuilt from the other two, scored over a whole split.

Image/audio: PSNR of the pooled MSE (the reference's PSNR of a batch) and mean SSIM, against a baseline that
ignores the inputs and predicts the mean training target. Text: cross-entropy and token accuracy over the non-pad
tokens (and, as the reference counted them, over every position), against the most frequent training token
(overall and per position) and the training tokens' per-position distribution. Baselines come from the training
split only (`target_statistics`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from synergy_jax import parallel
from synergy_jax import reconstruction_losses as rl
from synergy_jax.evaluators.embed import embed_split

Metrics = dict[str, float]


def target_statistics(
    target_fn: Callable[[dict[str, jax.Array]], jax.Array],
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    missing: str,
    vocab_size: int,
    limit: int,
) -> dict[str, Any]:
    """Mean training target (image/audio) with the targets' range, or token counts per position (text), over the
    first `limit` or more real training examples. Streamed: the targets are never all in memory."""
    total, count, low, high = None, 0, np.inf, -np.inf
    for host_batch in batches:
        batch = parallel.global_batch({k: v for k, v in host_batch.items() if k != "row_id"}, mesh)
        valid = parallel.gather(batch["valid"])
        target = parallel.gather(target_fn(batch))[valid]
        if missing == "text":
            mask = parallel.gather(batch["attention_mask"])[valid].astype(bool)
            counts = np.zeros((target.shape[1], vocab_size))
            for position in range(target.shape[1]):
                np.add.at(counts[position], target[mask[:, position], position], 1)
            total = counts if total is None else total + counts
        else:
            low, high = min(low, float(target.min())), max(high, float(target.max()))
            summed = target.astype(np.float64).sum(0)
            total = summed if total is None else total + summed
        count += int(valid.sum())
        if count >= limit:
            break
    if missing == "text":
        return {"position_counts": total, "examples": count}
    return {"mean_target": (total / count).astype(np.float32), "examples": count, "target_range": high - low}


@functools.partial(jax.jit, static_argnames=("ssim_data_range",))
def _mean_target_scores(target: jax.Array, mean_target: jax.Array, ssim_data_range: float) -> dict[str, jax.Array]:
    guess = jnp.broadcast_to(mean_target, target.shape)
    return {"baseline_ssim": jnp.mean(rl.ssim_per_channel(guess, target, ssim_data_range), axis=1),
            "baseline_mse": jnp.mean(jnp.square(target - guess), axis=(1, 2, 3))}  # fmt: skip


def evaluate(
    eval_fn: Callable[[dict[str, jax.Array]], dict[str, jax.Array]],
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    missing: str,
    stats: dict[str, Any],
    num_samples: int,
    ssim_data_range: float = 1.0,
) -> tuple[Metrics, dict[str, np.ndarray]]:
    """(metrics, the first `num_samples` examples) over a whole split; padding excluded.

    `eval_fn(batch)` gives per-example outputs (`mmr_train.make_eval_step`): image/audio 'recon', 'target', 'mse',
    'ssim'; text 'predicted', 'target', 'mask' and per-example NLL / correct sums.
    """
    if missing == "text":
        cols = embed_split(eval_fn, batches, mesh)
        tokens, positions = cols["mask"].sum(), cols["mask"].size
        metrics = text_metrics(cols["nll"], cols["correct"], cols["nll_all"], cols["correct_all"], tokens, positions)
        metrics.update(text_baselines(stats["position_counts"], cols["target"], cols["mask"]))
        metrics["examples"] = int(len(cols["nll"]))
        samples = {k: cols[k][:num_samples] for k in ("predicted", "target", "mask", "correct")}
        return metrics, samples
    mean_target = jnp.asarray(stats["mean_target"])

    def with_baseline(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        out = eval_fn(batch)
        shown_scores = {"shown_mse": out["mse"], "shown_ssim": out["ssim"]}  # the shown rows' own, in their order
        return {**out, **shown_scores, **_mean_target_scores(out["target"], mean_target, ssim_data_range)}

    # Kept for the first `num_samples` rows only, in the order they came (the other columns are sorted by row).
    shown = ("recon", "target", "shown_mse", "shown_ssim", "input_ids", "attention_mask")
    cols = embed_split(with_baseline, batches, mesh, keep=("input_ids", "attention_mask"), samples=shown,
                       num_samples=num_samples)  # fmt: skip
    metrics = grid_metrics(cols["mse"], cols["ssim"])
    baseline = grid_metrics(cols["baseline_mse"], cols["baseline_ssim"])
    metrics.update({f"baseline_mean_target/{k}": v for k, v in baseline.items()})
    metrics["examples"] = int(len(cols["mse"]))
    metrics["ssim_data_range"] = float(ssim_data_range)
    return metrics, {k.removeprefix("shown_"): cols[k][:num_samples] for k in shown}


def grid_metrics(mse_per_example: np.ndarray, ssim_per_example: np.ndarray) -> Metrics:
    """Split-level image/audio metrics: PSNR of the pooled MSE (the reference's PSNR on a batch), mean SSIM."""
    mse = float(np.mean(mse_per_example))
    return {"mse": mse, "psnr": float(rl.psnr_from_mse(mse)), "ssim": float(np.mean(ssim_per_example)),
            "psnr_mean_per_example": float(np.mean(rl.psnr_from_mse(np.maximum(mse_per_example, 1e-12))))}  # fmt: skip


def text_metrics(nll: np.ndarray, correct: np.ndarray, nll_all: np.ndarray, correct_all: np.ndarray,
                 tokens: float, positions: float) -> Metrics:  # fmt: skip
    return {"ce": float(nll.sum() / tokens), "accuracy": float(correct.sum() / tokens),
            "ce_with_pads": float(nll_all.sum() / positions), "accuracy_with_pads": float(correct_all.sum() / positions)}  # fmt: skip


def text_baselines(position_counts: np.ndarray, target: np.ndarray, mask: np.ndarray) -> Metrics:
    """What ignoring the image and audio scores on the non-pad tokens (and, for accuracy, all positions): predicting
    the most frequent training token overall or at each position, and the cross-entropy of the training tokens'
    distribution at each position (one pseudo-example spread over the vocabulary, so unseen tokens stay finite).
    A decoder that uses its inputs beats the last on cross-entropy even where its argmax ties the per-position
    majority (docs/mmr.md)."""
    mask = mask.astype(bool)
    overall = np.full(target.shape, position_counts.sum(0).argmax())
    per_position = np.broadcast_to(position_counts.argmax(1)[None, :], target.shape)
    out = {}
    for name, guess in (("majority_token", overall), ("majority_token_per_position", per_position)):
        correct = guess == target
        out[f"baseline_{name}/accuracy"] = float(correct[mask].mean())
        out[f"baseline_{name}/accuracy_with_pads"] = float(correct.mean())
    vocab = position_counts.shape[1]
    probs = (position_counts + 1.0 / vocab) / (position_counts.sum(1, keepdims=True) + 1.0)
    positions = np.broadcast_to(np.arange(target.shape[1])[None, :], target.shape)
    out["baseline_unigram_per_position/ce"] = float(-np.log(probs[positions[mask], target[mask]]).mean())
    return out


def write_samples(out_dir: Path, missing: str, samples: dict[str, np.ndarray], tokenizer) -> list[str]:
    """reconstructions.png (image/audio: target | reconstruction rows, each with the example's text and its PSNR /
    SSIM) or text_samples.txt (target and reconstruction with the token accuracy); returns the paths."""
    from synergy_jax import plots

    if missing == "text":
        lines = []
        for predicted, target, mask, correct in zip(samples["predicted"], samples["target"], samples["mask"],
                                                    samples["correct"]):  # fmt: skip
            keep = mask.astype(bool)
            lines.append(f"target:        {tokenizer.decode(target[keep].tolist())}\n"
                         f"reconstructed: {tokenizer.decode(predicted[keep].tolist())}\n"
                         f"token accuracy {100 * float(correct) / max(int(keep.sum()), 1):.1f}% ({int(correct)}/"
                         f"{int(keep.sum())})\n")  # fmt: skip
        path = out_dir / "text_samples.txt"
        path.write_text("\n".join(lines))
        return [str(path)]
    texts = [tokenizer.decode(ids[mask.astype(bool)].tolist(), skip_special_tokens=True)
             for ids, mask in zip(samples["input_ids"], samples["attention_mask"])]  # fmt: skip
    scores = [f"PSNR {float(rl.psnr_from_mse(max(float(mse), 1e-12))):.1f} dB, SSIM {float(ssim):.3f}"
              for mse, ssim in zip(samples["mse"], samples["ssim"])]  # fmt: skip
    path = out_dir / "reconstructions.png"
    plots.reconstruction_grid(samples["target"], samples["recon"], texts, scores, missing == "audio", path)
    return [str(path)]
