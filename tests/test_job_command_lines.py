"""The jobs' command lines as a user types them: a bad config override or a missing flag exits 2 with a one-line
message naming it (the exit codes of synergy_jax.cli.run_or_exit), before any work."""

import subprocess
import sys

import pytest
from helpers import ROOT


def _run(script: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)  # fmt: skip


@pytest.mark.parametrize("script, required", [("pretrain.py", []), ("mmr.py", ["--checkpoint=x", "--missing=image"])])
def test_unknown_config_field_exits_2_naming_it(script, required, tmp_path):
    result = _run(script, "--config.no_such_field=1", f"--workdir={tmp_path}", *required)
    assert result.returncode == 2, result.stderr
    assert "bad --config" in result.stderr and "no_such_field" in result.stderr
    assert "Traceback" not in result.stderr and not any(tmp_path.iterdir())


def test_a_near_miss_config_field_gets_the_suggestion_in_plain_text(tmp_path):
    result = _run("pretrain.py", "--config.batchsize=8", f"--workdir={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert 'override: batchsize: Did you mean "batch_size" instead of "batchsize"?' in result.stderr
    assert "\\" not in result.stderr and not any(tmp_path.iterdir())


def test_mmr_without_missing_exits_2(tmp_path):
    result = _run("mmr.py", f"--workdir={tmp_path}")
    assert result.returncode == 2 and "--missing" in result.stderr


def test_zero_shot_without_a_run_says_how_to_make_one(tmp_path):
    """With no flags the job evaluates runs/demo, where `python experiments/pretrain.py` writes the demo run."""
    result = _run("zero_shot.py", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "runs/demo" in result.stderr and "python experiments/pretrain.py" in result.stderr


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("pretrain.py", [f"--config={ROOT}/experiments/configs/pretrain.py:nope"], "unknown pretrain config 'nope'"),
        ("zero_shot.py", ["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
        ("mmr.py", ["--missing=sound"], "--missing=sound: value should be one of"),
    ],
)  # fmt: skip
def test_bad_flag_exits_2_with_one_line(script, args, message, tmp_path):
    result = _run(script, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("pretrain.py", ["--config.model.dtype=float16"], "compute dtype 'float16' does not run on CPU"),
        ("pretrain.py", ["--config.sharding=rows"], "unknown sharding rules 'rows'"),
        ("pretrain.py", ["--config.total_steps=3"], "--config.total_steps=3 must exceed --config.optimizer.warmup_steps=20"),
        ("pretrain.py", ["stray"], "unexpected arguments ['stray']"),
        ("zero_shot.py", ["--dtype=float16"], "compute dtype 'float16' does not run on CPU"),
        ("finetune.py", ["--task=demo", "--config.sharding=rows"], "unknown sharding rules 'rows'"),
    ],
)  # fmt: skip
def test_runtime_choices_are_refused_before_anything_is_written(script, args, message, tmp_path):
    """The compute dtype, the sharding rules and the schedule's length are checked with the config, so a refused
    job leaves no run folder (or demo data) behind."""
    workdir = [] if script == "zero_shot.py" else [f"--workdir={tmp_path / 'run'}"]  # zero-shot writes beside its run
    result = _run(script, *args, *workdir, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_a_compile_cache_that_cannot_be_written_exits_2_naming_it(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = _run("zero_shot.py", f"--compile_cache={tmp_path / 'a_file' / 'xla'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--compile_cache=" in result.stderr and "--compile_cache=off" in result.stderr
    assert "Traceback" not in result.stderr
