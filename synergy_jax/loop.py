"""The one resumable training loop every training job runs (pre-training, MMR, fine-tuning).

A job brings what is its own: a train state, a jitted step (`train.make_step` with its loss), a resumable input
iterator (`next()`, `get_state()`, `set_state()`), a run record and an evaluation hook. The loop brings the rest:

- resume: `start_state` restores the newest checkpoint (state and input position) after checking that the saved run
  record is compatible, or initialises a fresh state;
- steps, with each step's metrics fetched while the next one runs (the host never waits for the device), and
  the input placed on the mesh `prefetch` batches ahead (`DevicePrefetch`), so a step never waits for its batch;
- a non-finite step stops the run (`NonFiniteLossError`, exit 1) and keeps the last good checkpoint;
- SIGTERM (preemption), a first Ctrl-C or `stop_at(step)` saves and returns with `preempted=True` (exit 0, 130
  after Ctrl-C; rerun to resume);
- metric windows averaged every `log_every` steps with throughput and MFU, to metrics.jsonl and TensorBoard;
- evaluation every `eval_every` steps and at the end; checkpoints at the manager's cadence and at the end;
- a progress bar, summary.json (`summarize`) and training_curves.png (`plots.training_curves`, when the loop ends).

Only process 0 writes logs and files; every process runs the same loop (stopping is agreed collectively).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from synergy_jax import checkpoint, flops, progress, train
from synergy_jax.distributed import StopRequest, is_main_process, log
from synergy_jax.errors import NonFiniteLossError
from synergy_jax.record import RunRecord

Metrics = dict[str, float]
EVAL_PREFIX = "eval/"  # every evaluation metric's name starts with it; a train window's never does


class ResumableIterator(Protocol):
    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    total_steps: int
    batch_size: int  # global examples per step (throughput)
    log_every: int
    eval_every: int = 0  # steps between evaluations; 0: only at the end
    steps_per_epoch: int = 0  # > 0: an 'epoch' column in the logs
    flops_per_sample: float | None = None  # train FLOPs per example, for MFU
    peak_flops: float | None = None  # per device, for MFU
    progress: bool = True
    desc: str = "train"
    prefetch: int = 2  # batches placed on the mesh ahead of the step that takes them (at least 1)


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    total_steps: int
    preempted: bool
    train_seconds: float  # the loop's time outside evaluation
    eval_metrics: Metrics


class MetricWriter:
    """JSON lines + TensorBoard scalars, written by process 0 only.

    `start(step)` opens them for a run that continues from `step`: lines logged past it by an earlier attempt (the
    steps between its last checkpoint and a kill) are dropped from metrics.jsonl and purged from TensorBoard, so the
    logs tell one story whatever the run went through.
    """

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.enabled = is_main_process()
        self.jsonl = self.tensorboard = None

    def start(self, step: int, evaluates_step: bool = False) -> None:
        """`evaluates_step`: this run evaluates `step` again (a finished run, rerun), so an evaluation logged at
        `step` is dropped too."""
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        path = self.workdir / "metrics.jsonl"
        kept = []
        if path.is_file():
            kept = [line for line in path.read_text().split("\n")[:-1] if _kept(line, step, evaluates_step)]
            partial = path.with_suffix(".jsonl.tmp")
            partial.write_text("".join(line + "\n" for line in kept))
            partial.replace(path)
        self.jsonl = open(path, "a")
        # TensorBoard purges from a step on: from `step` itself when its evaluation is logged again, and then the
        # kept lines of `step` (its train window) are written back.
        purge = step if evaluates_step else step + 1
        self.tensorboard = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge if step else None)
        for line in kept if evaluates_step else []:
            row = json.loads(line)
            if row["step"] == step:
                self._scalars(step, {k: v for k, v in row.items() if k != "step"})

    def write(self, step: int, metrics: Metrics) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            self.start(0)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        self._scalars(step, metrics)

    def _scalars(self, step: int, metrics: Metrics) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled and self.jsonl is not None:
            self.jsonl.close()
            self.tensorboard.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics.jsonl in order; a line cut by a kill (or still being written) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _kept(line: str, step: int, evaluates_step: bool) -> bool:
    """Whether a metrics.jsonl line stays when a run continues from `step`: lines of later steps go (they are logged
    again), and so does one cut by a kill; an evaluation at `step` goes too when the run evaluates it again."""
    try:
        row = json.loads(line)
        logged = row["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
    evaluation = any(name.startswith(EVAL_PREFIX) for name in row)
    return logged < step or (logged == step and not (evaluates_step and evaluation))


@jax.jit
def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def start_state(
    manager: ocp.CheckpointManager,
    record: RunRecord,
    abstract_state: Any,
    init: Callable[[], Any],
    data: ResumableIterator,
    resume_data: bool = True,
) -> Any:
    """The newest verified checkpoint's state (and input position) if the run folder has one, else `init()`.

    Damaged checkpoints are passed over and moved aside (`checkpoint.resume_step`). A checkpoint written by an
    incompatible config is a CheckpointError naming the differences. The record is also written as
    `<workdir>/config.json` for the reader.
    """
    step = checkpoint.resume_step(manager)
    if step is None:
        state = init()
    else:
        checkpoint.saved_record(manager, step).check_resumable_by(record, str(manager.directory))
        state = checkpoint.restore_train_state(manager, abstract_state, step)
        if resume_data:
            data.set_state(checkpoint.restore_data_state(manager, step))
        log(f"resumed {manager.directory.parent} at step {step}")
    if is_main_process():
        (Path(manager.directory).parent / "config.json").write_text(json.dumps(record.to_json(), indent=1))
    return state


def start_train_state(manager: ocp.CheckpointManager, record: RunRecord, model, tx, mesh, rules: str, example,
                      seed: int, pretrained: Any, data: ResumableIterator, resume_data: bool = True) -> tuple[Any, Any]:
    """`start_state` for a `train.TrainState`: (state, its shardings). Restored onto `mesh` by the sharding `rules`,
    or born sharded from `seed` with the `pretrained` parameter groups in place."""
    shardings = train.state_shardings(model, tx, mesh, rules, example)
    init = lambda: train.create_train_state(model, tx, mesh, rules, example, jax.random.PRNGKey(seed), pretrained)[0]  # noqa: E731
    abstract = train.abstract_train_state(model, tx, example, shardings)
    return start_state(manager, record, abstract, init, data, resume_data), shardings


class _Window:
    """Step metrics, fetched one step late and averaged over a log window with the window's throughput."""

    def __init__(self, config: LoopConfig, writer: MetricWriter, bar, latest_checkpoint: Callable[[], Any]):
        self.config, self.writer, self.bar, self.latest_checkpoint = config, writer, bar, latest_checkpoint
        self.pending: tuple[int, dict] | None = None
        self.rows: list[Metrics] = []
        self.started: float | None = None  # None until a step has completed (the first step compiles)
        self.steps = 0

    def push(self, step: int, metrics: dict) -> None:
        self.settle()
        self.pending = (step, metrics)

    def restart_clock(self) -> None:
        self.started = None

    def settle(self) -> None:
        """Fetches the step in flight; stops on a non-finite step; logs at the window's end."""
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if metrics["nonfinite"]:
            raise NonFiniteLossError(
                f"step {step}: non-finite loss or gradient (loss {metrics['loss']}, grad norm {metrics['grad_norm']});"
                f" the update was not applied. Latest checkpoint: step {self.latest_checkpoint()}. Lower the learning"
                " rate or check the data."
            )
        self.rows.append(metrics)
        if self.started is None:
            self.started, self.steps = time.perf_counter(), 0
        else:
            self.steps += 1
        if self.bar is not None:
            self.bar.update(1)
        if step % self.config.log_every == 0 or step == self.config.total_steps:
            self.log(step)

    def log(self, step: int) -> None:
        c = self.config
        summary = {k: float(np.mean([m[k] for m in self.rows])) for k in self.rows[0]}
        summary["window_steps"] = len(self.rows)  # the steps this line averages (fewer in a resumed run's first)
        elapsed = time.perf_counter() - self.started
        if self.steps > 0 and elapsed > 0:
            samples_per_second = self.steps * c.batch_size / elapsed
            summary["samples_per_second"] = samples_per_second
            summary["samples_per_second_per_device"] = samples_per_second / jax.device_count()
            if c.flops_per_sample:
                utilisation = flops.mfu(samples_per_second, c.flops_per_sample, jax.device_count(), c.peak_flops)
                if utilisation is not None:
                    summary["mfu"] = utilisation
        if c.steps_per_epoch:
            summary["epoch"] = step / c.steps_per_epoch
        self.writer.write(step, summary)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{summary['loss']:.4g}", samples_s=f"{summary.get('samples_per_second', 0):.1f}",
                                 refresh=False)  # fmt: skip
        self.rows.clear()
        self.started, self.steps = time.perf_counter(), 0


class DevicePrefetch:
    """Host batches placed on the devices (`place`) `depth` batches ahead of the step that takes them.

    `get_state()` is the input position after the batches handed out so far, not after those waiting in the queue:
    a checkpoint resumes exactly where its step left off.
    """

    def __init__(self, data: ResumableIterator, place: Callable[[dict], Any], depth: int):
        self.data, self.place, self.depth = data, place, max(depth, 1)
        self.queue: collections.deque = collections.deque()
        self.state = data.get_state()
        self.exhausted = False

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        self._fill()
        if not self.queue:
            raise StopIteration
        entry = self.queue.popleft()
        try:
            self._fill()  # the next transfers start before this batch's step is dispatched
        except BaseException:
            self.queue.appendleft(entry)  # an input error hands nothing out: the position stays before this batch
            raise
        batch, self.state = entry
        return batch

    def _fill(self) -> None:
        while not self.exhausted and len(self.queue) < self.depth:
            try:
                host = next(self.data)
            except StopIteration:
                self.exhausted = True
                return
            self.queue.append((self.place(host), self.data.get_state()))

    def get_state(self) -> dict:
        return self.state


def _progress_bar(config: LoopConfig, step: int):
    if not (config.progress and is_main_process()):
        return None
    return progress.bar(total=config.total_steps, initial=step, desc=config.desc, unit="step")


def train_loop(
    config: LoopConfig,
    state: Any,
    step_fn: Callable[[Any, Any], tuple[Any, dict]],
    data: ResumableIterator,
    manager: ocp.CheckpointManager,
    record: RunRecord,
    writer: MetricWriter,
    evaluate: Callable[[Any, int], Metrics],
    stop_at: Callable[[int], bool] | None = None,
    place: Callable[[dict[str, np.ndarray]], Any] = lambda batch: batch,
) -> LoopResult:
    """Runs `step_fn(state, place(next(data)))` from the state's step to `config.total_steps` (see the module
    docstring); `place` puts a host batch on the mesh (e.g. `parallel.global_batch`) ahead of time.

    `evaluate(state, step)` returns the metrics to log (named 'eval/<name>', e.g. 'eval/loss'); the last call's are
    the result's `eval_metrics`. `stop_at(step)` -> True acts as a preemption after that step (tests). The manager
    and the writer are closed when it returns or raises.
    """
    run = _Run(config, state, DevicePrefetch(data, place, config.prefetch), manager, record, writer, evaluate)
    try:
        return run.until_done(step_fn, stop_at)
    finally:
        run.close()


class _Run:
    """The state of one `train_loop` call: where it is, what it has measured, and the handles it closes."""

    def __init__(self, config: LoopConfig, state, data, manager, record: RunRecord, writer: MetricWriter, evaluate):
        self.config, self.state, self.data, self.manager, self.record = config, state, data, manager, record
        self.writer, self.evaluate = writer, evaluate
        self.step = int(jax.device_get(state.step))
        writer.start(self.step, evaluates_step=self.step >= config.total_steps)
        self.bar = _progress_bar(config, self.step)
        self.window = _Window(config, writer, self.bar, manager.latest_step)
        self.stop = StopRequest()
        self.eval_metrics: Metrics = {}
        self.eval_seconds = 0.0

    def until_done(self, step_fn, stop_at) -> LoopResult:
        started, config, preempted = time.perf_counter(), self.config, False
        while self.step < config.total_steps:
            self.state, metrics = step_fn(self.state, next(self.data))
            self.step += 1
            self.window.push(self.step, metrics)  # settles the previous step's metrics while this one runs
            if _stop_requested(config, self.step, self.stop, stop_at):
                self.window.settle()
                self.save(force=True)
                preempted = True
                log(f"stop requested: saved step {self.step} to {self.manager.directory}; rerun with the same "
                    "--workdir to resume")  # fmt: skip
                break
            if config.eval_every and self.step % config.eval_every == 0 and self.step != config.total_steps:
                self.window.settle()
                self.run_eval()
                self.window.restart_clock()
            if self.manager.should_save(self.step) and self.step != config.total_steps:
                self.window.settle()
                self.save(force=False)
        self.stop.restore()  # the steps are over: a Ctrl-C from here (final save, evaluation) interrupts at once
        self.window.settle()
        if not preempted:
            if self.manager.latest_step() != self.step:
                self.save(force=True)
            self.run_eval()
        train_seconds = time.perf_counter() - started - self.eval_seconds
        return LoopResult(self.state, self.step, config.total_steps, preempted, train_seconds, self.eval_metrics)

    def save(self, force: bool) -> None:
        if not bool(all_finite(self.state.params)):
            raise NonFiniteLossError(f"parameters became non-finite by step {self.step}; not saving them")
        checkpoint.save(self.manager, self.step, self.state, self.record, self.data.get_state(), force=force)

    def run_eval(self) -> None:
        started = time.perf_counter()
        self.eval_metrics = self.evaluate(self.state, self.step)
        unnamed = sorted(name for name in self.eval_metrics if not name.startswith(EVAL_PREFIX))
        if unnamed:  # a rerun of a finished run could not tell this evaluation's line from a train window's
            raise RuntimeError(f"evaluation metrics must be named {EVAL_PREFIX}<name>: {unnamed}")
        self.writer.write(self.step, self.eval_metrics)
        self.eval_seconds += time.perf_counter() - started

    def close(self) -> None:
        self.stop.restore()
        self.manager.wait_until_finished()
        self.manager.close()
        self.writer.close()
        if self.bar is not None:
            self.bar.close()
        if is_main_process():
            from synergy_jax import plots  # plots reads metrics with this module's reader

            plots.training_curves(self.writer.workdir / "metrics.jsonl", title=f"{self.config.desc}: {self.writer.workdir}")


def _stop_requested(config: LoopConfig, step: int, stop: StopRequest, stop_at: Callable[[int], bool] | None) -> bool:
    """A test's `stop_at`, or SIGTERM or a first Ctrl-C on any process (agreed at log boundaries only on
    multi-process runs: it is a collective, and every process reaches the same boundaries)."""
    if stop_at is not None and stop_at(step):
        return True
    boundary = step % config.log_every == 0 or step == config.total_steps
    return stop.agreed() if (jax.process_count() == 1 or boundary) else False


def summarize(result: LoopResult, workdir: Path, started: float, **extra: Any) -> dict[str, Any]:
    """The run's summary (also `<workdir>/summary.json`, written by process 0): where the loop ended, the job's own
    `extra` entries and the last evaluation's metrics."""
    summary = {
        "step": result.step,
        "total_steps": result.total_steps,
        "preempted": result.preempted,
        "wall_seconds": time.time() - started,
        "train_seconds": result.train_seconds,
        "workdir": str(workdir),
        "devices": jax.device_count(),
        **extra,
        **result.eval_metrics,
    }
    if is_main_process():
        (Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
