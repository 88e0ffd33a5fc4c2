"""Fine-tuning: the paper's image, audio (k-fold) and GLUE tables from a pre-training run (docs/finetune.md).

    python experiments/finetune.py                                  # demo run, demo audio, 5 folds, vs scratch
    python experiments/finetune.py --config=experiments/configs/finetune.py:base_c --init=runs/base_c \
        --task=esc50 --data_dir=data/ESC-50 --mesh=8x1

Every fold and seed of the recipe, each a resumable sub-run. This job's own: the splits, the classifier on the
chosen towers, per-epoch scores on the selection and reported splits, the results table (synergy_jax/finetune.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from data_pipelines import downstream, finetune_input, finetune_tasks, glue
from experiments.configs import finetune as recipes
from experiments.configs import zero_shot as zs_config
from synergy_jax import checkpoint, cli, finetune, loop, parallel, plots, run_lock, text, train
from synergy_jax.errors import SetupError
from synergy_jax.evaluators import classification, embed, zero_shot
from synergy_jax.models.synergy import SynergyCLIP
from synergy_jax.record import RunRecord, optimizer_structure, run_facts
from synergy_jax.towers import Towers, load_towers

CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "finetune.py"
SHORTCUTS = tuple(cli.Shortcut(name, name, help_text, choices) for name, help_text, choices in (
    ("task", "The task.", recipes.TASK_NAMES), ("init", "Pre-training run folder, hub id / folder, or 'scratch'.", None),
    ("data_dir", "The dataset folder (see docs/finetune.md).", None), ("workdir", "Sweep folder.", None),
    ("mesh", "Device mesh DxM.", None), ("folds", "Folds: all | 1,3 | 1-5.", None),
    ("protocol", "The reported protocol.", finetune.PROTOCOLS)))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every sub-run of the sweep shares."""

    config: ml_collections.ConfigDict
    modality: str
    data: finetune_tasks.TaskData
    towers: Towers  # where the towers come from (a pre-training run, a hub tower, or random init)
    tokenizer: Any
    max_length: int
    metric: str  # the headline metric of the table
    metric_names: tuple[str, ...]  # every metric computed per epoch


def make_plan(config: ml_collections.ConfigDict, mesh) -> Plan:
    modality = recipes.modality(config.task)
    towers = load_towers(config.init, modality, mesh, config.sharding, config.dtype, config.remat, config.scratch_like)
    data = finetune_tasks.load(config.task, config.data_dir, demo_root=towers.demo_root, seed=config.seeds[0],
                               reference_flowers_splits=config.reference_flowers_splits)  # fmt: skip
    tokenizer, max_length, metric_names = None, 0, ("accuracy",)
    if modality == recipes.TEXT:
        tokenizer = text.load_tokenizer(towers.tokenizer)
        spec = glue.TASKS[config.task]
        max_length, metric_names = config.text_max_length or spec.max_length, spec.metrics
    # The headline: accuracy as the paper's table, but MCC for CoLA (the reference printed accuracy, bug 44) and
    # Pearson for STS-B; every other metric is in the per-epoch logs and results.json.
    metric = {"cola": "accuracy" if config.reference_cola_accuracy else "mcc", "stsb": "pearson"}.get(config.task, "accuracy")
    return Plan(config, modality, data, towers, tokenizer, max_length, metric, metric_names)


def input_config(plan: Plan, seed: int, augment: bool) -> finetune_input.FinetuneInputConfig:
    c, tower = plan.config, plan.towers.tower_config
    fbank = plan.towers.fbank() if plan.modality == recipes.AUDIO else None
    image_size = tower.image_size if plan.modality == recipes.IMAGE else 0  # the tower's: its position table is fixed
    return finetune_input.FinetuneInputConfig(
        modality=plan.modality, image_size=image_size, fbank=fbank, max_length=plan.max_length, dataset=c.task,
        normalization="reference" if c.reference_normalization else "clip", augment=augment, seed=seed,
    )  # fmt: skip


def eval_inputs(plan: Plan, splits: finetune_tasks.Splits) -> dict[str, finetune_input.EvalInput]:
    """The selection and reported splits as evaluation inputs (made once, iterated every epoch)."""
    batch = plan.config.eval_batch_size // jax.process_count()
    return {name: finetune_input.eval_input(examples, indices, input_config(plan, 0, False), batch, tokenizer=plan.tokenizer)
            for name, examples, indices in (("select", splits.select, splits.select_idx),
                                            ("report", splits.report, splits.report_idx))}  # fmt: skip


# ================================================================================================ one sub-run


class EpochEval:
    """The loop's eval hook: the selection and reported splits scored every epoch; the selected model exported."""

    def __init__(self, plan: Plan, splits, predict, mesh, steps_per_epoch: int, folder: Path, model, start: int):
        self.plan, self.splits, self.predict, self.mesh, self.folder, self.model = plan, splits, predict, mesh, folder, model
        self.steps_per_epoch = steps_per_epoch
        # A resumed sub-run keeps the best selection score of the epochs its checkpoint already covers (their export
        # was written before that checkpoint), so a worse later epoch does not replace the selected model.
        done = [r[f"select/{plan.metric}"] for r in finetune.history_from_metrics(folder / "metrics.jsonl")
                if r["step"] <= start and r.get(f"select/{plan.metric}") is not None]  # fmt: skip
        self.best, self.inputs = max(done, default=-np.inf), eval_inputs(plan, splits)

    def score(self, params, split: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        predict = lambda batch: self.predict(params, batch)  # noqa: E731
        columns = embed.embed_split(predict, self.inputs[split], self.mesh, keep=("label",))
        return classification.task_metrics(columns["logits"], columns["label"], self.plan.metric_names), columns

    def __call__(self, state, step: int) -> dict[str, float]:
        select, _ = self.score(state.params, "select")
        report, columns = self.score(state.params, "report")
        if select[self.plan.metric] > self.best:  # the clean protocol's model so far: its export and confusion
            self.best = select[self.plan.metric]
            self.write_selected(state, columns, step)
        metrics = {"epoch": step / self.steps_per_epoch, **{f"select/{k}": v for k, v in select.items()},
                   **{f"report/{k}": v for k, v in report.items()}}  # fmt: skip
        return {f"eval/{k}": v for k, v in metrics.items()}

    def write_selected(self, state, columns: dict[str, np.ndarray], step: int) -> None:
        if self.plan.config.export:
            self.plan.towers.export(self.model, jax.device_get(state.params), self.folder / "export", self.splits)
        if self.splits.regression or jax.process_index() != 0:
            return
        names = self.splits.class_names
        matrix = classification.confusion_matrix(columns["label"], columns["logits"].argmax(1), len(names))
        title = f"{self.plan.config.task} epoch {step // self.steps_per_epoch} (clean selection), reported split"
        plots.confusion_matrix(matrix, list(names), title, self.folder / "confusion.png")


def train_sub_run(plan: Plan, sub_run: finetune.SubRun, folder: Path, mesh, stop_at=None) -> dict[str, Any] | None:
    """Trains one fold/seed from its initialisation (or resumes it), evaluating every epoch; the protocols' results."""
    c = plan.config
    splits = plan.data.splits(sub_run.fold, sub_run.seed, c.holdout_fraction)
    model, pretrained = plan.towers.classifier(splits.num_labels, c.projection_dim, scratch=sub_run.init == "scratch")
    batch = c.batch_size * c.accum_steps  # examples per optimizer step: the reference's batch x accumulation (R5)
    steps_per_epoch = len(splits.train_idx) // batch
    if steps_per_epoch == 0:
        raise SetupError(f"{len(splits.train_idx)} training examples are fewer than one step's {batch} (--config."
                         "batch_size x accum_steps)")  # fmt: skip
    steps = c.epochs * steps_per_epoch
    optimizer = train.resolve_optimizer(c.optimizer, steps)
    if optimizer.schedule == "constant" and (milestones := recipes.decay_epochs(c.name, c.task, c.epochs)):
        with optimizer.unlocked():  # R5.2: torch MultiStepLR(gamma=0.99) at these epochs
            optimizer.update(schedule="step", decay_factor=0.99, decay_boundaries=tuple(m * steps_per_epoch for m in milestones))
    tx = finetune.make_optimizer(optimizer, c.head_learning_rate_multiplier)
    example = plan.towers.example_batch(model, plan.max_length)
    data = finetune_input.train_input(splits.train, splits.train_idx, input_config(plan, sub_run.seed, True),
                                      batch // jax.process_count(), tokenizer=plan.tokenizer)  # fmt: skip
    record = RunRecord(kind="finetune", model={"task": c.task, "init": sub_run.init, **plan.towers.describe(model)},
                       optimizer_structure=optimizer_structure(optimizer), config=json.loads(c.to_json_best_effort()),
                       run=run_facts(mesh, sub_run=sub_run.name), seed=sub_run.seed)  # fmt: skip
    manager = checkpoint.make_manager(folder, save_every=steps_per_epoch, keep=c.keep_checkpoints)
    state, shardings = loop.start_train_state(manager, record, model, tx, mesh, c.sharding, example, sub_run.seed,
                                              pretrained, data)  # fmt: skip
    step = train.make_step(finetune.classification_loss(model, splits.regression), tx, shardings, mesh, c.accum_steps,
                           schedule=train.learning_rate_schedule(optimizer))  # fmt: skip
    hook = EpochEval(plan, splits, finetune.make_predict(model, shardings.params, mesh), mesh, steps_per_epoch, folder,
                     model, int(jax.device_get(state.step)))  # fmt: skip
    loop_config = loop.LoopConfig(total_steps=steps, batch_size=batch, log_every=c.log_every,
                                  eval_every=steps_per_epoch, steps_per_epoch=steps_per_epoch, progress=c.progress,
                                  desc=sub_run.name)  # fmt: skip
    outcome = loop.train_loop(loop_config, state, step, data, manager, record, loop.MetricWriter(folder), hook, stop_at,
                              place=lambda batch: parallel.global_batch(batch, mesh))  # fmt: skip
    if outcome.preempted:
        return None
    history = finetune.history_from_metrics(folder / "metrics.jsonl")
    text_task = plan.modality == recipes.TEXT
    return {protocol: finetune.select_epoch(history, protocol, plan.metric, text_task) for protocol in finetune.PROTOCOLS}


# ================================================================================================ baselines


def zero_shot_accuracies(plan: Plan, reported: list[finetune_tasks.Splits], mesh) -> list[float]:
    """The pre-trained towers' zero-shot top-1 on each reported split: the class names in the reference's single
    prompt (R5.4) against the same run's text tower. The towers and the class embeddings are made once."""
    run = plan.towers
    groups = [plan.modality, "text", *checkpoint.LOGIT_SCALES]  # the module declares its temperatures in setup
    params, _ = checkpoint.restore_params(run.source, mesh, groups, dtype=plan.config.dtype)
    model = SynergyCLIP(run.record.synergy_config(dtype=plan.config.dtype))
    prompts = embed.prompt_embedder(model, params, mesh, text.load_tokenizer(run.tokenizer), run.record.data.max_length,
                                    plan.config.eval_batch_size)  # fmt: skip
    names = [[downstream.prompt_name(name)] for name in reported[0].class_names]
    classes = zero_shot.classes_from_prompts(prompts, names, zs_config.SINGLE[plan.modality])
    embed_queries, accuracies = embed.modality_embedder(model, params, plan.modality), []
    for splits in reported:
        columns = embed.embed_split(embed_queries, eval_inputs(plan, splits)["report"], mesh, keep=("label",))
        accuracies.append(100.0 * zero_shot.zero_shot_metrics(columns[plan.modality], classes, columns["label"])["top1"])
    return accuracies


# ================================================================================================ the job


def run(config: ml_collections.ConfigDict, stop_at=None) -> dict[str, Any]:
    """Every fold x seed of the task (and the baselines of `config.compare`); returns and writes the results.
    SIGTERM (or `stop_at(step)`, tests) saves the sub-run in progress and stops the sweep; rerun to resume. Nothing
    is written before the config and the mesh are checked; then the job holds its folder's writer lock."""
    started = time.time()
    cli.check_ranges(config, recipes.RANGES)
    config = recipes.resolve(config)
    mesh = parallel.make_mesh(config.mesh)
    train.check_batch(config.batch_size * config.accum_steps, mesh, config.accum_steps)
    cli.check_runtime(mesh, config.dtype, config.sharding)
    workdir = Path(config.workdir).expanduser().absolute()
    with run_lock.writing(workdir):
        return sweep(make_plan(config, mesh), mesh, workdir, started, stop_at)


def sweep(plan: Plan, mesh, workdir: Path, started: float, stop_at) -> dict[str, Any]:
    """The sub-runs (resuming finished and interrupted ones), the zero-shot baseline, the results table."""
    config = plan.config
    inits = ["run"] + (["scratch"] if "scratch" in config.compare else [])
    subs = finetune.sub_runs(plan.data.fold_ids, downstream.parse_folds(config.folds), config.seeds, inits)
    results, preempted = finetune.run_sweep(workdir, subs, lambda sub, folder: train_sub_run(plan, sub, folder, mesh,
                                                                                             stop_at))  # fmt: skip
    if preempted:
        return {"preempted": True, "finished_sub_runs": len(results), "workdir": str(workdir)}
    zero_shot_values = []
    if "zero_shot" in config.compare and plan.towers.kind == "run" and plan.modality != recipes.TEXT:
        splits = [plan.data.splits(fold, config.seeds[0], config.holdout_fraction) for fold in {r["fold"]: 0 for r in results}]
        zero_shot_values = zero_shot_accuracies(plan, splits, mesh)
    table = finetune.results_table(results, plan.metric, zero_shot_values, task=config.task, config=config.name,
                                   init=plan.towers.source, reported_protocol=config.protocol,
                                   paper=recipes.PAPER.get(config.task, {}).get(config.name))  # fmt: skip
    table["wall_seconds"] = time.time() - started
    finetune.write_results(workdir, table)
    return table


def print_results(table: dict[str, Any]) -> None:
    print(f"stopped after {table['finished_sub_runs']} finished sub-run(s) (the one in progress is saved); rerun the "
          "same command to resume" if table.get("preempted") else "\n" + finetune.markdown(table))


if __name__ == "__main__":
    cli.start(CONFIG_FILE, run, print_results, SHORTCUTS, default_config="demo")
