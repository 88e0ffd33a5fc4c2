"""Checkpoints that cannot lie, one writer per run folder, config values checked before any work (issue #12).

Checkpoint damage of every kind is detected by the seal; readers fall back to the newest checkpoint that verifies or
refuse the one asked for; a resuming writer moves damaged ones aside; a second writer is refused while the first
lives and the lock of a killed one is taken over."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from experiments.configs import finetune as finetune_configs
from experiments.configs import mmr as mmr_configs
from experiments.configs import pretrain as pretrain_configs
from experiments.configs import zero_shot as zero_shot_configs
from helpers import ROOT, bit_rot, default_interrupts, largest_state_file, subprocess_env, write_pretrain_run
from synergy_jax import checkpoint, cli, parallel, run_lock
from synergy_jax.errors import CheckpointError, SetupError
from synergy_jax.record import DataSource
from synthetic import tiny_config

STEPS = (1, 2, 3)


@pytest.fixture(scope="module")
def sealed_run(tmp_path_factory) -> Path:
    """A run folder with checkpoints at steps 1, 2, 3 (the same tiny pre-training state and input position)."""
    run = tmp_path_factory.mktemp("sealed")
    data = DataSource(dir="", tokenizer="t", text_mode="caption", max_length=8, image_size=32)
    write_pretrain_run(run, tiny_config(layers=1), data, steps=STEPS, data_state={"next_index": 7})
    return run


@pytest.fixture
def run_dir(sealed_run, tmp_path) -> Path:
    shutil.copytree(sealed_run, tmp_path / "run")
    return tmp_path / "run"


def _truncate(folder: Path) -> None:
    path = largest_state_file(folder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated state file": (_truncate, "bytes,"),
    "bit rot in a state file": (bit_rot, "has changed since it was written"),
    "data state deleted": (lambda f: (f / "data" / "process_0-of-1.json").unlink(), "data/process_0-of-1.json"),
    "config emptied": (lambda f: (f / "config" / "metadata").write_text(""), "config/metadata has 0 bytes"),
    "step metadata deleted": (lambda f: (f / "_CHECKPOINT_METADATA").unlink(), "_CHECKPOINT_METADATA"),
    "commit marker deleted": (lambda f: (f / "commit_success.txt").unlink(), "commit_success.txt is missing"),
    "seal deleted": (lambda f: (f / "integrity.json").unlink(), "no integrity.json"),
    "seal cut": (lambda f: (f / "integrity.json").write_text('{"files": {'), "seal is unreadable"),
    "file added": (lambda f: (f / "state" / "stray").write_bytes(b"x"), "not in its seal: state/stray"),
}


def test_a_fresh_checkpoint_verifies(sealed_run):
    for step in STEPS:
        assert checkpoint.verify(sealed_run / "checkpoints" / str(step)) is None
    seal = json.loads((sealed_run / "checkpoints" / "3" / "integrity.json").read_text())
    assert "config/metadata" in seal["files"] and "data/process_0-of-1.json" in seal["files"]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_detected_and_readers_fall_back(run_dir, damage, capsys):
    apply, reason = DAMAGE[damage]
    newest = run_dir / "checkpoints" / "3"
    apply(newest)
    assert reason in (checkpoint.verify(newest) or "")
    assert checkpoint.latest_step(run_dir) == 2  # the newest that verifies, and it says so
    assert f"Checkpoint {newest} is damaged" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match=f"Checkpoint {newest} is damaged: .*Pick another step"):
        checkpoint.latest_step(run_dir, 3)  # the one asked for is refused, never read silently
    mesh = parallel.make_mesh("1x1", jax.devices()[:1])
    params, _ = checkpoint.restore_params(run_dir, mesh, ["text"])
    assert set(params) == {"text_model", "text_projection"}


def test_no_checkpoint_that_verifies_is_exit_2_naming_each(run_dir):
    for step in STEPS:
        bit_rot(run_dir / "checkpoints" / str(step))
    with pytest.raises(CheckpointError) as caught:
        checkpoint.latest_step(run_dir)
    message = str(caught.value)
    assert all(f"Checkpoint {run_dir / 'checkpoints' / str(s)} is damaged" in message for s in STEPS)
    assert "No checkpoint of" in message and "Move the damaged step folder(s) out of" in message
    manager = checkpoint.make_manager(run_dir)
    with pytest.raises(CheckpointError, match="No checkpoint of"):
        checkpoint.resume_step(manager)  # the writer too, and it moves nothing
    assert sorted(manager.all_steps()) == list(STEPS)


def test_the_writer_moves_damaged_checkpoints_aside(run_dir, capsys):
    _truncate(run_dir / "checkpoints" / "3")
    manager = checkpoint.make_manager(run_dir)
    assert checkpoint.resume_step(manager) == 2
    assert list(manager.all_steps()) == [1, 2]
    assert (run_dir / "damaged_checkpoints" / "3" / "integrity.json").is_file()
    assert "moved to" in capsys.readouterr().out


def test_a_save_that_waits_is_sealed_when_it_returns(sealed_run, tmp_path):
    """Synchronous saves seal too (the seal is written in Orbax's commit step, before the folder is renamed)."""
    manager = checkpoint.make_manager(tmp_path, async_save=False)
    state = {"w": jax.numpy.arange(8.0)}
    record = checkpoint.saved_record(checkpoint.make_manager(sealed_run, read_only=True), 1)
    checkpoint.save(manager, 5, state, record, force=True)
    assert checkpoint.verify(tmp_path / "checkpoints" / "5") is None
    manager.close()


# ------------------------------------------------------------------------------------------ one writer


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with run_lock.RunLock(tmp_path / "run"):
        holder = json.loads((tmp_path / "run" / "writer.lock").read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(SetupError, match=f"is in use: pid {os.getpid()} on host .* wait for it, stop it"):
            run_lock.RunLock(tmp_path / "run").acquire()
    run_lock.RunLock(tmp_path / "run").acquire()  # released on exit


def test_the_lock_of_a_killed_writer_is_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from synergy_jax import run_lock; "
                               f"run_lock.RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SetupError, match=f"pid {holder.pid}"):
            run_lock.RunLock(tmp_path).acquire()  # alive: refused
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = run_lock.RunLock(tmp_path)
    lock.acquire()  # killed: the kernel released its flock, its record is stale
    assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().out
    assert json.loads((tmp_path / "writer.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_writer_on_another_host_is_trusted(tmp_path):
    """Where flock does not reach across hosts, an unreleased record from another host is a refusal, not stale."""
    (tmp_path / "writer.lock").write_text(json.dumps({"pid": 1, "host": "other-host", "started": "x", "command": "y"}))
    with pytest.raises(SetupError, match="pid 1 on host other-host.*delete .*writer.lock"):
        run_lock.RunLock(tmp_path).acquire()


def test_a_job_that_fails_early_leaves_no_folder(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with run_lock.writing(tmp_path / "new"):
            1 / 0
    assert not (tmp_path / "new").exists()
    (tmp_path / "out" / "kept").mkdir(parents=True)  # a parent with other content stays
    with pytest.raises(ZeroDivisionError):
        with run_lock.writing(tmp_path / "out" / "runs" / "demo" / "run"):
            1 / 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept", "out"]


# ------------------------------------------------------------------------------------------ config ranges

JOB_RANGES = {
    "pretrain demo": (pretrain_configs.get_config("demo"), pretrain_configs.RANGES),
    "pretrain base_c": (pretrain_configs.get_config("base_c"), pretrain_configs.RANGES),
    "mmr base": (mmr_configs.get_config("base"), mmr_configs.RANGES),
    "finetune demo": (finetune_configs.get_config("demo"), finetune_configs.RANGES),
    "zero_shot": (zero_shot_configs.get_config(), zero_shot_configs.RANGES),
}
# Numeric fields without a range of their own: the tower overrides are checked by the tower configs.
UNRANGED_PREFIXES = ("model.vision_overrides.", "model.text_overrides.", "model.audio_overrides.")


def _numeric_fields(config, prefix: str = "") -> list[str]:
    fields = []
    for name, value in config.items():
        if hasattr(value, "items"):
            fields += _numeric_fields(value, f"{prefix}{name}.")
        elif cli._numbers(value) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                          for v in cli._numbers(value)):  # fmt: skip
            fields.append(prefix + name)
    return fields


@pytest.mark.parametrize("job", list(JOB_RANGES))
def test_every_numeric_field_has_a_range_and_the_defaults_pass(job):
    config, ranges = JOB_RANGES[job]
    cli.check_ranges(config, ranges)
    numeric = _numeric_fields(config)
    assert "batch_size" in numeric and "batch_size" in ranges, (numeric, ranges)  # the helper finds the fields
    missing = [f for f in numeric if f not in ranges and not f.startswith(UNRANGED_PREFIXES)]
    assert missing == []


def test_ranges():
    assert cli.AT_LEAST_ONE.problem(2.5) == "must be a whole number >= 1"
    assert cli.AT_LEAST_ONE.problem(True) == "must be a whole number >= 1"
    assert cli.POSITIVE.problem(0.0) == "must be > 0" and cli.POSITIVE.problem(1e-9) is None
    assert cli.BELOW_ONE.problem(1.0) == "must be >= 0 and < 1" and cli.BELOW_ONE.problem(0.999) is None
    assert cli.NON_NEGATIVE.problem(float("nan")) == "must be >= 0"
    assert cli.Range(-1, integer=True).problem(-1) is None and cli.COUNT.problem("3") == "must be a whole number >= 0"


@pytest.mark.parametrize("value, message", [(0, "batch_size=0 must be >= 1"), (-1, "batch_size=-1 must be >= 1")])
def test_a_bad_number_names_its_field(value, message):
    config = pretrain_configs.get_config("demo")
    config.batch_size = value
    config.optimizer.b1 = 1.0
    with pytest.raises(SetupError, match=f"{message}; --config.optimizer.b1=1.0 must be >= 0 and < 1"):
        cli.check_ranges(config, pretrain_configs.RANGES)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_bad_batch_size_exits_2_before_anything_is_written(tmp_path, value):
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "pretrain.py"), f"--workdir={workdir}",
                             f"--config.batch_size={value}"], capture_output=True, text=True, cwd=tmp_path,
                            env=subprocess_env(1), timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: bad config value(s): --config.batch_size={value} must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()  # no demo data generated, no folder


@pytest.mark.parametrize("signum, code, message", [
    (signal.SIGTERM, 0, "stopped by SIGTERM outside the training steps"),
    (signal.SIGINT, 130, "interrupted (Ctrl-C); what was finished and saved is kept"),
])  # fmt: skip
def test_a_signal_while_preparing_data_exits_with_a_message(tmp_path, signum, code, message):
    workdir = tmp_path / "run"
    job = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "pretrain.py"), f"--workdir={workdir}",
                            "--config.progress=False"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=tmp_path, env=subprocess_env(1), preexec_fn=default_interrupts)  # fmt: skip
    hang_guard = time.time() + 300  # not a speed limit: only stops a hung job from hanging the suite
    # wait for the demo data's folder, not just the lock: a signal between the two finds an empty run folder,
    # which the lock's release removes with the lock file (the job wrote nothing)
    while not (workdir / "data").is_dir() and job.poll() is None and time.time() < hang_guard:
        time.sleep(0.01)
    job.send_signal(signum)  # the demo data is being generated (it takes seconds; training minutes)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == code, stderr[-3000:]
    assert message in stderr and "Traceback" not in stderr
    assert (workdir / "writer.lock").read_text() == ""  # released


def test_a_consumer_of_a_run_with_no_sound_checkpoint_exits_2(run_dir, tmp_path):
    for step in STEPS:
        _truncate(run_dir / "checkpoints" / str(step))
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "zero_shot.py"), f"--checkpoint={run_dir}"],
                            capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(1), timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: Checkpoint {run_dir / 'checkpoints' / '3'} is damaged: state/" in result.stderr
    assert "No checkpoint of" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("signum, stop", [(signal.SIGTERM, "Preempted"), (signal.SIGINT, "KeyboardInterrupt")])
def test_a_stop_swallowed_by_a_finalizer_still_stops_the_job_at_once(capsys, signum, stop):
    """A SIGTERM or Ctrl-C whose exception lands in a __del__ (as one did in XLA's gc callback: Python prints
    "Exception ignored" and carries on) still stops the job, at the next lines of ordinary code, with no traceback."""
    from synergy_jax import distributed
    from synergy_jax.errors import Preempted

    class SignalsOnCollection:
        def __del__(self):
            os.kill(os.getpid(), signum)
            time.sleep(0.05)  # the handler runs here, inside __del__, where its exception cannot propagate

    previous_interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist workers may ignore it
    reached_the_end = False
    try:
        with pytest.raises(Preempted if stop == "Preempted" else KeyboardInterrupt):
            with distributed.sigterm_raises():
                SignalsOnCollection()  # collected at once
                for _ in range(100):
                    time.sleep(0.01)  # the job's work goes on: the stop must come here, not when the block ends
                reached_the_end = True
    finally:
        signal.signal(signal.SIGINT, previous_interrupt)
    assert not reached_the_end and "Exception ignored" not in capsys.readouterr().err
