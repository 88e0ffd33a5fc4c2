"""Fine-tuning's own library parts: the classification/regression loss handed to `train.make_step`, the eval
forward, model selection under the two protocols, and sweeps of sub-runs (folds x seeds) that resume.

Protocols (docs/reference.md R5, bug 42):
- `reference`: what the paper reported. Image/audio: the best epoch on the evaluation split itself; text: the last
  epoch's evaluation (the Trainer kept no best model).
- `clean`: the epoch is chosen on a validation split that is not the reported one (the official validation split
  where one exists, else a seeded held-out part of train), and the reported split's number at that epoch is the
  result: the reported split never takes part in a choice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from synergy_jax import parallel, train
from synergy_jax.distributed import is_main_process, log
from synergy_jax.errors import SetupError
from synergy_jax.loop import read_metrics
from synergy_jax.train import LossFn

PROTOCOLS = ("clean", "reference")


def classification_loss(model, regression: bool = False) -> LossFn:
    """Cross-entropy over integer labels (mean over the batch), or mean squared error for a 1-output regression
    (STS-B, as transformers' `problem_type='regression'`); dropout on."""

    def loss_fn(params, batch, rng, mutable, frozen):
        logits = model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
        logits = logits.astype(jnp.float32)
        if regression:
            loss = jnp.mean(jnp.square(logits[:, 0] - batch["label"]))
            return loss, ({"loss": loss}, mutable)
        labels = batch["label"].astype(jnp.int32)
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, ({"loss": loss, "accuracy": accuracy}, mutable)

    return loss_fn


def make_optimizer(config, head_multiplier: float = 1.0) -> optax.GradientTransformation:
    """`train.make_optimizer`, with the new head's updates scaled by `head_multiplier` (1: the reference, one rate for
    all). AdamW's update is the rate times (Adam direction + decay x weight), so scaling the head's updates is
    exactly a head learning rate `multiplier` times the tower's. A randomly initialised head on a pre-trained tower
    learns slowly at a rate made for the tower (Adam moves each weight by about the rate per step)."""

    def scale_head(updates, state, params=None):
        return {name: jax.tree.map(lambda u: u * head_multiplier, tree) if name == "classifier" else tree
                for name, tree in updates.items()}, state  # fmt: skip

    if head_multiplier == 1.0:
        return train.make_optimizer(config)
    return optax.chain(train.make_optimizer(config), optax.GradientTransformation(lambda _: optax.EmptyState(),
                                                                                  scale_head))


def make_predict(model, params_shardings, mesh) -> Callable:
    """`(params, batch) -> {'logits'}` deterministic, batch-sharded: the eval forward for `embed_split`."""

    def predict(params, batch):
        return {"logits": model.apply({"params": params}, batch, deterministic=True).astype(jnp.float32)}

    batch = parallel.batch_sharding(mesh)
    return parallel.jit_on_mesh(predict, mesh, in_shardings=(params_shardings, batch), out_shardings=batch)


# ------------------------------------------------------------------------------------------------ selection


def select_epoch(history: Sequence[dict], protocol: str, metric: str, text_task: bool) -> dict:
    """The result of one sub-run under `protocol` from its per-epoch evaluations.

    Each history row holds 'epoch', 'select/<metric>' (clean validation split) and 'report/<metric>' (the reported
    split) for every metric. Ties go to the earlier epoch.
    """
    if not history:
        raise ValueError("no evaluated epoch to select from")

    def score(row: dict, split: str) -> tuple[float, float]:  # NaN (e.g. a constant predictor's correlation) is worst
        value = row[f"{split}/{metric}"]
        return (-np.inf if value is None or np.isnan(value) else value), -row["epoch"]

    if protocol == "reference":
        row = history[-1] if text_task else max(history, key=lambda r: score(r, "report"))
    elif protocol == "clean":
        row = max(history, key=lambda r: score(r, "select"))
    else:
        raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")
    reported = {k.removeprefix("report/"): v for k, v in row.items() if k.startswith("report/")}
    return {"epoch": row["epoch"], **reported}


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, population std (the reference's np.std) and sample std of per-fold / per-seed numbers."""
    array = np.asarray(values, np.float64)
    return {"values": [float(v) for v in array], "mean": float(array.mean()),
            "std_population": float(array.std()), "std_sample": float(array.std(ddof=1)) if len(array) > 1 else 0.0}  # fmt: skip


# ------------------------------------------------------------------------------------------------ sweeps


@dataclasses.dataclass(frozen=True)
class SubRun:
    """One training run of a sweep: a fold (None for tasks without folds) and a seed, in its own folder."""

    fold: int | None
    seed: int
    init: str = "run"  # 'run' (the given initialisation) or a baseline name ('scratch')

    @property
    def name(self) -> str:
        fold = f"fold{self.fold}_" if self.fold is not None else ""
        return f"{self.init}/{fold}seed{self.seed}"


def sub_runs(fold_ids: Sequence[int | None], chosen: Sequence[int] | None, seeds: Sequence[int],
             inits: Sequence[str] = ("run",)) -> list[SubRun]:  # fmt: skip
    """Every (init, fold, seed) of a sweep, in that order; `chosen` folds only (None: all). A chosen fold the task
    lacks, or any chosen fold for a task without folds, is a SetupError naming what the task has."""
    if chosen is not None:
        unknown = sorted(set(chosen) - set(fold_ids))
        if unknown:
            has = f"folds {list(fold_ids)}" if list(fold_ids) != [None] else "no folds (leave --folds at 'all')"
            raise SetupError(f"--folds asks for fold(s) {unknown}: this task has {has}")
    folds = [f for f in fold_ids if f is None or chosen is None or f in chosen]
    return [SubRun(fold, seed, init) for init in inits for fold in folds for seed in seeds]


def run_sweep(
    workdir: Path, sub_runs: Sequence[SubRun], run_one: Callable[[SubRun, Path], dict | None]
) -> tuple[list[dict], bool]:
    """Runs every sub-run in `workdir/<name>/`; one that finished before (its result.json) is not redone, one that
    was interrupted resumes from its own checkpoints. `run_one` returns None when it was preempted (SIGTERM: its
    checkpoint is saved); the sweep then stops. Returns (the finished sub-runs' results in order, preempted)."""
    results = []
    for index, sub_run in enumerate(sub_runs):
        folder = Path(workdir) / sub_run.name
        done = folder / "result.json"
        if done.is_file():
            log(f"[{index + 1}/{len(sub_runs)}] {sub_run.name}: finished before, kept")
            results.append(json.loads(done.read_text()))
            continue
        log(f"[{index + 1}/{len(sub_runs)}] {sub_run.name}")
        outcome = run_one(sub_run, folder)
        if outcome is None:
            return results, True
        result = {"sub_run": sub_run.name, "fold": sub_run.fold, "seed": sub_run.seed, "init": sub_run.init, **outcome}
        if is_main_process():
            folder.mkdir(parents=True, exist_ok=True)
            partial = done.with_suffix(".tmp")
            partial.write_text(json.dumps(result, indent=1))
            partial.replace(done)  # a kill never leaves a half-written result that would count as finished
        results.append(result)
    return results, False


def history_from_metrics(path: Path) -> list[dict]:
    """The per-epoch evaluations of a sub-run from its metrics.jsonl: the last line logged for each step (a resumed
    run may have logged a step twice), rows with an 'epoch' evaluation only."""
    rows = {row["step"]: {"step": row["step"], **{k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}}
            for row in read_metrics(path) if "eval/epoch" in row}  # fmt: skip
    return [rows[step] for step in sorted(rows)]


# ------------------------------------------------------------------------------------------------ results


def results_table(results: Sequence[dict], metric: str, zero_shot: Sequence[float] = (), **about: Any) -> dict:
    """Per initialisation and protocol: the sub-runs' `metric` in %, their mean and stds; `about` names the task,
    config, init, reported protocol and the paper's number for the row."""
    rows = {}
    for init in dict.fromkeys(r["init"] for r in results):
        for protocol in PROTOCOLS:
            rows[f"{init}/{protocol}"] = spread([100.0 * r[protocol][metric] for r in results if r["init"] == init])
    if zero_shot:
        rows["zero_shot"] = spread(zero_shot)
    return {**about, "metric": metric, "rows": rows, "sub_runs": list(results)}


def markdown(table: dict[str, Any]) -> str:
    """The results as a markdown table: one row per init/protocol, the paper's number beside the trained rows."""
    paper = f"{table['paper']:.2f}" if table.get("paper") is not None else "-"
    lines = [f"{table['task']} ({table['config']}, init {table['init']}), {table['metric']} in %, reported protocol "
             f"{table['reported_protocol']}", "",
             "| run | per fold / seed | mean | std (population) | std (sample) | paper |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in table["rows"].items():
        values = ", ".join(f"{v:.2f}" for v in row["values"])
        lines.append(f"| {name} | {values} | {row['mean']:.2f} | {row['std_population']:.2f} | "
                     f"{row['std_sample']:.2f} | {paper if name.startswith('run/') else '-'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_results(workdir: Path, table: dict[str, Any]) -> None:
    """results.json and results.md in the sweep's folder (process 0)."""
    if is_main_process():
        (Path(workdir) / "results.json").write_text(json.dumps(table, indent=1))
        (Path(workdir) / "results.md").write_text(markdown(table))
