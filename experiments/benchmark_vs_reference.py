"""Our train step against the reference's own, side by side on this machine's cores (issue #14, item 1).

    python experiments/benchmark_vs_reference.py --reference_python=.venv-reference/bin/python
    python experiments/benchmark_vs_reference.py --reference_python=.venv-reference/bin/python --layers=2 \
        --width=768 --heads=12 --projection=512 --cores=1 --rounds=5

`--reference_python` is a venv holding the reference's pinned torch 2.0.1 and transformers 4.39.2 (the install
line is in experiments/torch_reference_step.py). The towers are the Base preset resized by `--layers`, `--width`,
`--heads` and `--projection` (by default the issue's: 4 layers, width 256, 4 heads, projection 256), written once
to a file that both sides build from. For every round and every count N in `--cores`, it runs the reference's step
(`torch_reference_step.py --threads=N`) and ours (`benchmark.py`, a 1x1 mesh on one CPU device), each in its own
process pinned to the first N cores this process may use, one after the other (who goes first alternates by
round, so that neither always runs on a machine the other has just warmed or heated), and prints both median step
times, the ratio of throughputs (the reference's time over ours) and each side's rate in GFLOP/s of the step's
analytic FLOP count (`benchmark.py`'s, for the same towers and batch on both sides: how close each gets to the
machine's matmul speed), then each core count's median ratio.
Both sides take the median of `--steps` steps after `--warmup` untimed ones; ours restarts with the jobs' malloc,
the reference runs as its users start it. Nothing else should run meanwhile: the ratio is only as steady as the
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from synergy_jax import cli, errors, host_memory

FOLDER = Path(__file__).resolve().parent
REFERENCE_SCRIPT, OUR_SCRIPT = FOLDER / "torch_reference_step.py", FOLDER / "benchmark.py"

flags.DEFINE_string("reference_python", None, "Python of a venv with the reference's pinned torch and transformers.",
                    required=True)  # fmt: skip
flags.DEFINE_enum("model", "base", ["tiny", "base", "large"], "Preset the towers are resized from.")
flags.DEFINE_integer("layers", 4, "Encoder layers of every tower (0: the preset's).")
flags.DEFINE_integer("width", 256, "Hidden width of every tower, MLP at 4x (0: the preset's).")
flags.DEFINE_integer("heads", 4, "Attention heads of every tower (0: the preset's).")
flags.DEFINE_integer("projection", 256, "Projection width (0: the preset's).")
flags.DEFINE_integer("batch", 8, "Examples per step, on both sides.")
flags.DEFINE_list("cores", ["1", "2"], "Core counts to compare on (each side pinned to the first N cores).")
flags.DEFINE_integer("rounds", 3, "Rounds of every core count.", lower_bound=1)
flags.DEFINE_integer("steps", 5, "Timed steps of each run (the median is taken).")
flags.DEFINE_integer("warmup", 3, "Untimed steps before them.")
FLAGS = flags.FLAGS

STEP_TIME = re.compile(r"^step time\s+([\d.]+) ms", re.M)
PARAMETERS = re.compile(r"^parameters\s+(?:[\d.]+ M\s+\()?(\d+)\)?$", re.M)  # both sides print the exact count


def pinned_cores(counts: list[str]) -> dict[int, list[int]]:
    """The first N cores this process may use, for every N asked for; refuses counts the machine lacks."""
    if not hasattr(os, "sched_setaffinity"):
        raise errors.SetupError("pinning each side to its cores needs Linux (os.sched_setaffinity)")
    available = sorted(os.sched_getaffinity(0))
    if not counts:
        raise errors.SetupError("--cores is empty: give one or more core counts, e.g. --cores=1,2")
    cores = {}
    for count in counts:
        if not count.isdigit() or not 1 <= int(count) <= len(available):
            raise errors.SetupError(f"--cores={','.join(counts)}: each count must be 1 to {len(available)}, the "
                                    f"cores this process may use ({available})")  # fmt: skip
        cores[int(count)] = available[: int(count)]
    return cores


def write_towers(folder: Path) -> Path:
    """The towers' Hugging Face configs, which both sides build their models from."""
    from experiments import torch_reference_step

    path = folder / "towers.json"
    options = argparse.Namespace(configs=None, model=FLAGS.model, layers=FLAGS.layers, width=FLAGS.width,
                                 heads=FLAGS.heads, projection=FLAGS.projection)  # fmt: skip
    path.write_text(json.dumps(torch_reference_step.tower_configs(options), indent=1))
    return path


def commands(towers: Path, threads: int) -> dict[str, list[str]]:
    """The reference's run and ours, on the same towers, batch and steps."""
    steps = [f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}"]
    return {
        "reference": [FLAGS.reference_python, str(REFERENCE_SCRIPT), f"--configs={towers}", f"--batch={FLAGS.batch}",
                      f"--threads={threads}", *steps],
        "ours": [sys.executable, str(OUR_SCRIPT), f"--model={FLAGS.model}", f"--layers={FLAGS.layers}",
                 f"--width={FLAGS.width}", f"--heads={FLAGS.heads}", f"--projection={FLAGS.projection}",
                 "--mesh=1x1", "--cpu_devices=1", f"--batch_per_device={FLAGS.batch}", *steps],
    }  # fmt: skip


def step_seconds(side: str, command: list[str], cores: list[int]) -> tuple[float, int]:
    """The median step time and the parameter count one side prints, run in a process pinned to `cores` and
    started with this process's environment as it was started (the reference runs as its users start it;
    `benchmark.py` makes its own malloc restart, and its `--cpu_devices=1` wins over a device count in XLA_FLAGS)."""
    name = "the reference" if side == "reference" else "our"
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                env=host_memory.as_shipped(os.environ),
                                preexec_fn=lambda: os.sched_setaffinity(0, cores))  # fmt: skip
    except OSError as error:
        raise errors.SetupError(f"{name} step: {command[0]} cannot be run ({error})") from error
    found, parameters = STEP_TIME.search(result.stdout), PARAMETERS.search(result.stdout)
    if result.returncode or not found or not parameters:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise errors.SetupError(f"{name} step failed (exit {result.returncode}): {lines[-1]}; run it alone to see "
                                f"why: {' '.join(command)}")  # fmt: skip
    return float(found.group(1)) / 1e3, int(parameters.group(1))


def same_towers(parameters: dict[str, int]) -> None:
    """Both sides built models of the same size, or the comparison means nothing (a reference venv whose
    transformers builds the towers differently, say)."""
    if parameters["reference"] != parameters["ours"]:
        raise errors.SetupError(f"the two sides built different towers: the reference {parameters['reference']} "
                                f"parameters, ours {parameters['ours']}")  # fmt: skip


def time_pair(towers: Path, round_index: int, count: int, cores: list[int]) -> dict[str, float]:
    """Both sides' median step times on `cores` (`count` threads), in the order this round takes (it alternates)."""
    runs = commands(towers, count)
    order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
    timed = {side: step_seconds(side, runs[side], cores) for side in order}
    same_towers({side: parameters for side, (_, parameters) in timed.items()})
    return {side: step for side, (step, _) in timed.items()}


def analytic_step_flops() -> int:
    """The step's FLOPs as `benchmark.py` counts them (forward x 3, no recomputation) for these towers and
    batch: the same work on both sides."""
    from synergy_jax import flops
    from synergy_jax.models import synergy

    config = synergy.resized(synergy.preset_config(FLAGS.model), FLAGS.layers, FLAGS.width, FLAGS.heads,
                             FLAGS.projection)  # fmt: skip
    return FLAGS.batch * flops.train_flops_per_sample(config.forward_flops(), remat=False)


def benchmark() -> None:
    """Runs every round and prints a line per run pair as it finishes, then the median ratios."""
    cores = pinned_cores(FLAGS.cores)
    if not os.access(FLAGS.reference_python, os.X_OK):
        raise errors.SetupError(f"--reference_python={FLAGS.reference_python} cannot be run: give the python of a "
                                "venv with the reference's packages (experiments/torch_reference_step.py)")  # fmt: skip
    ratios: dict[int, list[float]] = {count: [] for count in cores}
    step_flops = analytic_step_flops()
    with tempfile.TemporaryDirectory(prefix="vs_reference_") as folder:
        towers = write_towers(Path(folder))
        print(f"towers: {FLAGS.model} resized to {FLAGS.layers} layers, width {FLAGS.width}, {FLAGS.heads} heads, "
              f"projection {FLAGS.projection}; batch {FLAGS.batch}; median of {FLAGS.steps} steps after "
              f"{FLAGS.warmup}\n{'cores':>5s} {'round':>5s} {'reference':>12s} {'ours':>12s} {'ratio':>7s} "
              f"{'GFLOP/s: reference':>19s} {'ours':>6s}", flush=True)  # fmt: skip
        for round_index in range(FLAGS.rounds):
            for count, pinned in cores.items():
                seconds = time_pair(towers, round_index, count, pinned)
                ratios[count].append(seconds["reference"] / seconds["ours"])
                print(f"{count:5d} {round_index + 1:5d} {1e3 * seconds['reference']:9.1f} ms "
                      f"{1e3 * seconds['ours']:9.1f} ms {ratios[count][-1]:6.2f}x "
                      f"{step_flops / seconds['reference'] / 1e9:19.2f} {step_flops / seconds['ours'] / 1e9:6.2f}",
                      flush=True)  # fmt: skip
    print(f"the step: {step_flops / 1e9:.3f} GFLOP (benchmark.py's analytic count: forward x 3, batch {FLAGS.batch})")
    for count, values in ratios.items():
        print(f"{count} core(s): ours at {statistics.median(values):.2f}x the reference's throughput (median of "
              f"{len(values)} rounds; {min(values):.2f}-{max(values):.2f}x)")


def main(argv: list[str]) -> None:
    cli.refuse_positional(argv)
    cli.exit_on_setup_error(benchmark)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_or_exit)
