"""Helpers shared by the job tests: config overrides, metrics readers, a fake pre-training run, subprocess envs and
job processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import jax
import ml_collections
import numpy as np

from synergy_jax import checkpoint, cli, host_memory, parallel, train
from synergy_jax.models.synergy import SynergyCLIP, SynergyConfig, example_batch
from synergy_jax.record import DataSource, RunRecord, model_config_to_dict, optimizer_structure

ROOT = Path(__file__).resolve().parents[1]


def glibc_reads_every_tunable() -> bool:
    """Linux with glibc 2.35 or newer, which reads every tunable `host_memory`'s choices set."""
    version = host_memory.glibc_version()
    return version is not None and version >= max(host_memory.MIN_GLIBC.values())


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """`config` with dotted fields set ({'model.projection_dim': 16, ...}), as `--config.x=y` would."""
    for key, value in overrides.items():
        cli.set_field(config, key, value)
    return config


def metric_lines(workdir: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (a running job may be writing the last one); none before it exists."""
    path = Path(workdir) / "metrics.jsonl"
    complete = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in complete]


def train_losses(workdir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metric_lines(workdir) if "loss" in m}


def write_pretrain_run(run_dir: Path, model_config: SynergyConfig, data: DataSource, seed: int = 0,
                       steps: tuple[int, ...] = (1,), data_state: dict | None = None) -> None:
    """Checkpoints (default: step 1) of freshly initialised towers with a pre-training run record, through the
    checkpoint API (what the consumers of a pre-training run read)."""
    mesh = parallel.make_mesh("1x1", jax.devices()[:1])
    optimizer = train.optimizer_config()
    tx = train.make_optimizer(optimizer)
    state, _ = train.create_train_state(SynergyCLIP(model_config), tx, mesh, "replicate", example_batch(model_config),
                                        jax.random.PRNGKey(seed))  # fmt: skip
    record = RunRecord(kind="pretrain", model=model_config_to_dict(model_config),
                       optimizer_structure=optimizer_structure(optimizer), config={}, run={}, data=data, seed=seed)  # fmt: skip
    manager = checkpoint.make_manager(run_dir)
    for step in steps:
        checkpoint.save(manager, step, state, record, data_state, force=True)
    manager.wait_until_finished()
    manager.close()


def tiny_pretrain_run(root: Path, words: str, seed: int = 3, max_length: int = 16) -> Path:
    """A pre-training run of a random 1-layer model whose tokenizer (a folder of the run, recorded relative to it as
    pre-training does) knows `words`."""
    from data_pipelines import demo
    from synthetic import tiny_config

    demo.train_tokenizer([words] * 4, root / "tokenizer", vocab_size=300)
    base = tiny_config(layers=1, dropout=False)
    config = SynergyConfig(vision=base.vision, text=base.text.replace(vocab_size=512), audio=base.audio,
                           projection_dim=base.projection_dim)  # fmt: skip
    data = DataSource(dir="", tokenizer="tokenizer", text_mode="caption", max_length=max_length,
                      image_size=config.vision.image_size)  # fmt: skip
    write_pretrain_run(root, config, data, seed=seed)
    return root


def largest_state_file(checkpoint_folder: Path) -> Path:
    """The biggest file of a checkpoint's train state (Adam moments and weights live there)."""
    return max((p for p in (checkpoint_folder / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def bit_rot(checkpoint_folder: Path, seed: int = 0) -> None:
    """4 KB of random bytes in the middle of the largest state file, its size unchanged (what a disk does)."""
    path = largest_state_file(checkpoint_folder)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = np.random.default_rng(seed).bytes(len(data[middle : middle + 4096]))
    path.write_bytes(bytes(data))


def subprocess_env(devices: int) -> dict:
    """The environment of a job started as a user would: CPU, `devices` fake devices, the shared compile cache."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # fmt: skip
    return env


@contextlib.contextmanager
def job_processes(commands: list[list[str]], devices: int, cwd: Path, own_group: bool = False):
    """Starts one job process per command, output to `<cwd>/process_<i>.log` (no pipe to fill up); on exit kills any
    still running, so a failing test never leaves a training process (or its peer in a collective) behind.
    `own_group`: each in a process group of its own, as a terminal's foreground job (`os.killpg` signals it)."""
    logs = [open(cwd / f"process_{i}.log", "w") for i in range(len(commands))]
    processes = []
    try:
        for command, log in zip(commands, logs):
            processes.append(subprocess.Popen(command, env=subprocess_env(devices), stdout=log,
                                              stderr=subprocess.STDOUT, text=True, cwd=cwd,
                                              process_group=0 if own_group else None,
                                              preexec_fn=default_interrupts if own_group else None))  # fmt: skip
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        for log in logs:
            log.close()


def default_interrupts() -> None:
    """In a child before exec: Ctrl-C at its default, as in a terminal's job. A suite started in the background
    (`.ci/run &`) passes SIGINT on ignored, and Python then never raises KeyboardInterrupt nor takes it over."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def process_output(cwd: Path, index: int) -> str:
    return (cwd / f"process_{index}.log").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
