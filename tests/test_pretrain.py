"""The pre-training job end to end on the demo data with a 1-layer model: logging, evals, checkpoints, resume,
preemption (SIGTERM in a subprocess), restore onto other meshes, incompatible configs, non-finite stops, early
errors, and two processes x 4 devices giving the losses of one process x 8 devices."""

import os
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from data_pipelines import demo, precompute
from experiments import pretrain
from experiments.configs import pretrain as configs
from helpers import (ROOT, bit_rot, free_port, job_processes, metric_lines, override, process_output, subprocess_env,
                     train_losses)
from synergy_jax import audio, checkpoint, parallel, train
from synergy_jax.errors import NonFiniteLossError
from synergy_jax.models.synergy import SynergyCLIP, example_batch

SCRIPT = ROOT / "experiments" / "pretrain.py"
STEPS = 8

# Overrides that make the demo config tiny and short; shared by in-process runs and the subprocess command lines.
TINY = {
    "model.vision_overrides.num_hidden_layers": 1,
    "model.text_overrides.num_hidden_layers": 1,
    "model.audio_overrides.num_hidden_layers": 1,
    "model.vision_overrides.hidden_size": 32,
    "model.text_overrides.hidden_size": 32,
    "model.audio_overrides.hidden_size": 32,
    "model.projection_dim": 16,
    "batch_size": 16,
    "eval_batch_size": 16,
    "total_steps": STEPS,
    "log_every": 1,
    "eval_every": 1000,
    "checkpoint_every": 4,
    "progress": False,
    "async_checkpoints": True,
    "optimizer.warmup_steps": 2,
    "data.input_slices": 2,  # the data order of two processes, so the multi-process run can match the reference
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    base = configs.get_config("demo")
    fbank = audio.FbankConfig(max_frames=base.data.max_frames, num_mel_bins=base.data.mel_bins)
    demo.ensure_demo_data(root, precompute.PrecomputeConfig(image_size=base.data.image_size, fbank=fbank))
    return root


def tiny_config(data_root: Path, **overrides):
    return override(configs.get_config("demo"), {"data.dir": str(data_root), **TINY, **overrides})


def run_pretrain(config, workdir: Path, mesh: str, stop_at=None) -> dict:
    return pretrain.run(override(config, {"workdir": str(workdir), "mesh": mesh}), stop_at)


def cli_overrides(data_root: Path, **overrides) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**TINY, "data.dir": data_root, **overrides}.items()]


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """One uninterrupted 8-step run on the 8x1 mesh."""
    workdir = tmp_path_factory.mktemp("reference")
    summary = run_pretrain(tiny_config(data_root), workdir, "8x1")
    return workdir, summary


def test_run_logs_evaluates_and_checkpoints(reference):
    workdir, summary = reference
    assert summary["step"] == STEPS and not summary["preempted"]
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(np.isfinite(list(losses.values())))
    lines = metric_lines(workdir)
    assert any("samples_per_second_per_device" in m for m in lines if m["step"] > 1)
    assert all("mfu" not in m for m in lines)  # CPU: no peak FLOPs unless configured
    final = [m for m in lines if "eval/loss" in m]
    assert len(final) == 1 and final[0]["step"] == STEPS and final[0]["eval/examples"] == 60
    for query, candidate in [("image", "text"), ("text", "image"), ("text", "audio"), ("audio", "text"),
                             ("audio", "image"), ("image", "audio")]:  # fmt: skip
        recalls = [final[0][f"eval/retrieval/{query}->{candidate}/R@{k}"] for k in (1, 5, 10)]
        assert 0 <= recalls[0] <= recalls[1] <= recalls[2] <= 1
    for modality in ("image", "audio"):
        assert final[0][f"eval/zero_shot/{modality}->text/chance"] == pytest.approx(0.1)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert checkpoint.make_manager(workdir, read_only=True).all_steps() == [4, 8]
    assert json.loads((workdir / "summary.json").read_text())["step"] == STEPS
    from PIL import Image

    curves = np.asarray(Image.open(workdir / "training_curves.png"))  # written when the loop ends
    assert curves.shape[0] > 500 and curves.shape[1] > 1000 and curves.std() > 0


def test_interrupted_run_resumes_to_the_same_losses(reference, data_root, tmp_path):
    ref_dir, ref_summary = reference
    first = run_pretrain(tiny_config(data_root), tmp_path, "8x1", stop_at=lambda step: step == 3)
    assert first["preempted"] and first["step"] == 3
    assert checkpoint.make_manager(tmp_path, read_only=True).latest_step() == 3
    second = run_pretrain(tiny_config(data_root), tmp_path, "8x1")
    assert second["step"] == STEPS
    expected, resumed = train_losses(ref_dir), train_losses(tmp_path)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in range(4, STEPS + 1)], [expected[s] for s in range(4, STEPS + 1)],
                               rtol=1e-5)  # fmt: skip
    assert second["eval/retrieval/image->text/R@5"] == pytest.approx(ref_summary["eval/retrieval/image->text/R@5"])
    assert second["eval/loss"] == pytest.approx(ref_summary["eval/loss"], rel=1e-4)


def test_augmentation_on_the_device_trains_and_resumes_to_the_same_losses(reference, data_root, tmp_path):
    """The step augments the raw records (synergy_jax/device_augment.py): other losses than the host's augmentation
    gives, the same ones again after a preemption (the seeds come back with the input state)."""
    device = {"data.augment_on": "device", "total_steps": 4}
    whole = run_pretrain(tiny_config(data_root, **device), tmp_path / "whole", "8x1")
    assert whole["step"] == 4
    losses = train_losses(tmp_path / "whole")
    assert all(np.isfinite(list(losses.values())))
    host = train_losses(reference[0])
    assert losses[1] != pytest.approx(host[1], rel=1e-4)  # step 1: same parameters, differently augmented inputs
    first = run_pretrain(tiny_config(data_root, **device), tmp_path / "split", "8x1", stop_at=lambda step: step == 2)
    assert first["preempted"]
    run_pretrain(tiny_config(data_root, **device), tmp_path / "split", "8x1")
    resumed = train_losses(tmp_path / "split")
    np.testing.assert_allclose([resumed[s] for s in (3, 4)], [losses[s] for s in (3, 4)], rtol=1e-5)


def test_splash_attention_trains_and_evaluates_as_the_cpu_default(reference, data_root, tmp_path):
    """TPU's kernel (`attention=splash`, Pallas interpret mode here) through a whole job: the initialiser, the
    step and the evaluators' forward each trace it at the same shapes, under the 8x1 mesh. The same losses and
    evaluation as the default attention."""
    summary = run_pretrain(tiny_config(data_root, **{"model.attention": "splash"}), tmp_path, "8x1")
    expected, losses = train_losses(reference[0]), train_losses(tmp_path)
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [expected[s] for s in sorted(losses)], rtol=1e-5)
    assert summary["eval/loss"] == pytest.approx(reference[1]["eval/loss"], rel=1e-5)


def test_checkpoint_restores_onto_other_meshes(reference):
    workdir, _ = reference
    mesh_8x1 = parallel.make_mesh("8x1")
    full, saved = checkpoint.restore_params(workdir, mesh_8x1)
    model_config = saved.synergy_config()
    assert saved.run["mesh"] == {"data": 8, "model": 1}
    audio_only, _ = checkpoint.restore_params(workdir, parallel.make_mesh("2x4"), ["audio"], rules="tp")
    assert sorted(audio_only) == ["audio_model", "audio_projection"]
    for got, want in zip(jax.tree.leaves(audio_only), jax.tree.leaves({k: full[k] for k in audio_only})):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert any(leaf.sharding.spec != jax.P() for leaf in jax.tree.leaves(audio_only))  # tensor-parallel split
    # The whole train state onto a 4x2 FSDP mesh.
    mesh = parallel.make_mesh("4x2")
    model = SynergyCLIP(model_config)
    tx = train.make_optimizer(train.optimizer_config())
    example = example_batch(model_config, 1, 32)
    shardings = train.state_shardings(model, tx, mesh, "fsdp", example)
    manager = checkpoint.make_manager(workdir, read_only=True)
    state = checkpoint.restore_train_state(manager, train.abstract_train_state(model, tx, example, shardings))
    assert int(state.step) == STEPS
    assert {leaf.sharding.mesh.shape["data"] for leaf in jax.tree.leaves(state.params)} == {4}
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_incompatible_checkpoint_is_a_clear_error(reference, data_root, tmp_path):
    workdir, _ = reference
    config = tiny_config(data_root, **{"model.projection_dim": 24})
    with pytest.raises(checkpoint.CheckpointError, match="incompatible config.*projection_dim: 16 -> 24"):
        run_pretrain(config, workdir, "8x1")


def test_non_finite_update_stops_and_keeps_last_good_checkpoint(reference, data_root, tmp_path):
    shutil.copytree(reference[0] / "checkpoints", tmp_path / "checkpoints")  # a run finished at step 8
    config = tiny_config(data_root, total_steps=STEPS + 2, checkpoint_every=1, **{"optimizer.learning_rate": float("inf")})
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        run_pretrain(config, tmp_path, "8x1")
    assert checkpoint.make_manager(tmp_path, read_only=True).latest_step() == STEPS
    params, _ = checkpoint.restore_params(tmp_path, parallel.make_mesh("8x1"))
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "mesh, overrides, error, message",
    [
        ("3x1", {}, ValueError, "asks for 3x1=3 devices but this job has 8"),
        ("8x1", {"batch_size": 12}, ValueError, "batch size 12 must be divisible by data-axis size 8"),
        ("8x1", {"batch_size": 16, "accum_steps": 4}, ValueError, "accum_steps=2 fits this mesh"),
        ("8x1", {"eval_batch_size": 12}, ValueError, "eval_batch_size=12 must be divisible"),
        ("8x1", {"data.demo": False, "data.dir": "/nonexistent/pre"}, FileNotFoundError, "run `python -m data_pipel"),
        ("8x1", {"data.demo": False, "data.dir": "/x", "data.train_manifest": "/no/train.csv"}, FileNotFoundError,
         "train_manifest: /no/train.csv does not exist"),
        ("8x1", {"data.input_slices": 3}, ValueError, "input_slices=3 must be a multiple of the 1 processes"),
        ("8x1", {"data.augment_on": "tpu"}, ValueError, "augment_on must be one of .* got 'tpu'"),
        ("8x1", {"data.augment_on": "device", "data.augment_image": False}, ValueError,
         "augments both images and audio"),
    ],
)  # fmt: skip
def test_bad_setup_fails_before_training(data_root, tmp_path, mesh, overrides, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        run_pretrain(tiny_config(data_root, **overrides), tmp_path, mesh)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("signum, code, message", [
    (signal.SIGTERM, 0, "stop requested: saved step"),
    (signal.SIGINT, 130, "Ctrl-C: saving after this step"),
])  # fmt: skip
def test_sigterm_or_ctrl_c_saves_and_stops(data_root, tmp_path, signum, code, message):
    """SIGTERM (preemption) and a first Ctrl-C both save after the step in progress and stop; Ctrl-C exits 130.
    The Ctrl-C reaches the job's whole process group, as at a terminal, Grain's input worker included. The compiled
    programs are kept in the folder `--compile_cache` names, for the rerun that resumes."""
    workers = ["--config.data.workers=1"] if signum == signal.SIGINT else []
    command = [sys.executable, str(SCRIPT), f"--workdir={tmp_path}", "--mesh=-1x1", *workers,
               f"--compile_cache={tmp_path / 'xla'}",
               *cli_overrides(data_root, total_steps=100_000, checkpoint_every=100_000)]  # fmt: skip
    with job_processes([command], devices=1, cwd=tmp_path, own_group=True) as (process,):
        hang_guard = time.time() + 600  # not a speed limit: only stops a hung job from hanging the suite
        while len(train_losses(tmp_path)) < 3:
            assert process.poll() is None, "the job exited before it was signalled:\n" + process_output(tmp_path, 0)[-3000:]
            assert time.time() < hang_guard, "no 3 logged steps in 600 s:\n" + process_output(tmp_path, 0)[-3000:]
            time.sleep(0.5)
        os.killpg(process.pid, signum)
        process.wait(timeout=300)
    output = process_output(tmp_path, 0)
    assert process.returncode == code, output[-3000:]
    assert message in output and "stop requested: saved step" in output and "Traceback" not in output
    saved = checkpoint.make_manager(tmp_path, read_only=True).latest_step()
    assert saved is not None and saved >= 3
    assert max(train_losses(tmp_path)) == saved
    assert list((tmp_path / "xla").glob("*-cache"))  # JAX's cache entries (this test's jobs cache every compile)


def test_two_processes_match_one_process(reference, data_root, tmp_path):
    single, _ = reference
    steps = STEPS
    multi = tmp_path / "multi"
    port = free_port()
    common = [sys.executable, str(SCRIPT), f"--workdir={multi}", "--mesh=8x1", f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2", *cli_overrides(data_root, total_steps=steps)]  # fmt: skip
    with job_processes([[*common, f"--process_id={i}"] for i in range(2)], devices=4, cwd=tmp_path) as processes:
        for process in processes:
            process.wait(timeout=600)  # a hang guard (a peer stuck in a collective), not a speed limit
    outputs = [process_output(tmp_path, i) for i in range(2)]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-4000:]
    one, two = train_losses(single), train_losses(multi)
    assert sorted(two) == list(range(1, steps + 1))  # each step logged once: only process 0 writes
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=2e-5)
    assert "=== pre-training done" in outputs[0] and "=== pre-training done" not in outputs[1]
    assert json.loads((multi / "config.json").read_text())["run"]["process_count"] == 2


def test_resume_drops_the_lines_logged_after_the_restored_checkpoint(reference, data_root, tmp_path):
    """A kill after step 8 was logged but before its checkpoint: the rerun resumes at 4, and metrics.jsonl then holds
    each step once (the rerun's), with the first window after the resume labelled by how many steps it averages."""
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / "8")  # the step-8 save never happened
    with open(tmp_path / "metrics.jsonl", "a") as log:
        log.write('{"step": 9, "loss": 1.0')  # and a line cut by the kill
    run_pretrain(tiny_config(data_root), tmp_path, "8x1")
    lines = metric_lines(tmp_path)
    train_steps = [m["step"] for m in lines if "loss" in m]
    assert train_steps == list(range(1, STEPS + 1))  # no step twice, nothing past the end
    assert [m["step"] for m in lines if "eval/loss" in m] == [STEPS]
    assert all(m["window_steps"] == 1 for m in lines if "loss" in m)  # log_every=1: one step per window
    np.testing.assert_allclose([m["loss"] for m in lines if "loss" in m], list(train_losses(reference[0]).values()),
                               rtol=1e-5)  # fmt: skip


def test_rerunning_a_finished_run_logs_its_final_evaluation_once(reference, data_root, tmp_path):
    """The rerun trains nothing and evaluates the final state again: metrics.jsonl keeps one line per step and one
    final evaluation (the rerun's, equal to the first)."""
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    summary = run_pretrain(tiny_config(data_root), tmp_path, "8x1")
    lines = metric_lines(tmp_path)
    assert [m["step"] for m in lines if "eval/loss" in m] == [STEPS]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, STEPS + 1))
    assert summary["step"] == STEPS and summary["eval/loss"] == pytest.approx(reference[1]["eval/loss"], rel=1e-6)
    # TensorBoard: the rerun's event file purges from the final step on and writes that step's train window and
    # evaluation once each.
    rerun = max((tmp_path / "tensorboard").glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime)
    events = tensorboard_events(rerun)
    assert any(e.session_log.status == e.session_log.START and e.step == STEPS for e in events)  # the purge
    tags = [(e.step, v.tag) for e in events for v in e.summary.value]
    assert tags.count((STEPS, "loss")) == 1 and tags.count((STEPS, "eval/loss")) == 1 and {s for s, _ in tags} == {STEPS}


def tensorboard_events(path: Path) -> list:
    """The Event protos of a TensorBoard event file (TFRecord framing: length, its CRC, data, the data's CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        events.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + length]))
        at += 12 + length + 4
    return events


def test_resume_passes_over_a_damaged_checkpoint(reference, data_root, tmp_path, capsys):
    """Bit rot in the newest checkpoint (step 8): the rerun says so, moves it aside, resumes from step 4 and ends
    where the uninterrupted run ended; the damaged state is never loaded."""
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    bit_rot(tmp_path / "checkpoints" / "8", seed=1)
    summary = run_pretrain(tiny_config(data_root), tmp_path, "8x1")
    out = capsys.readouterr().out
    assert f"Checkpoint {tmp_path / 'checkpoints' / '8'} is damaged: state/" in out
    assert "Resuming from step 4, the newest that verifies" in out and "resumed" in out and "at step 4" in out
    assert (tmp_path / "damaged_checkpoints" / "8" / "integrity.json").is_file()
    assert checkpoint.verify(tmp_path / "checkpoints" / "8") is None  # saved again, sealed
    assert [m["step"] for m in metric_lines(tmp_path) if "loss" in m] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(list(train_losses(tmp_path).values()), list(train_losses(reference[0]).values()),
                               rtol=1e-5)  # fmt: skip
    assert summary["eval/loss"] == pytest.approx(reference[1]["eval/loss"], rel=1e-4)


def test_a_second_writer_exits_2_naming_the_first(data_root, tmp_path):
    from synergy_jax import run_lock

    with run_lock.RunLock(tmp_path):  # this test process is the first writer
        result = subprocess.run([sys.executable, str(SCRIPT), f"--workdir={tmp_path}", *cli_overrides(data_root)],
                                capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(1), timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {tmp_path} is in use: pid {os.getpid()} on host" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["writer.lock"]  # it wrote nothing


def test_the_summary_prints_no_top5_for_fewer_than_5_classes(capsys):
    summary = {"step": 10, "wall_seconds": 1.0, "workdir": "w", "eval/examples": 4, "eval/loss": 1.0,
               "eval/zero_shot/image->text/top1": 0.5, "eval/zero_shot/image->text/chance": 0.5,
               "eval/zero_shot/audio->text/top1": 0.25, "eval/zero_shot/audio->text/chance": 0.125,
               "eval/zero_shot/audio->text/top5": 0.75}  # fmt: skip
    pretrain.print_summary(summary)
    lines = capsys.readouterr().out.splitlines()
    assert "top-1 50.0% (chance 50.0%), top-5 - (under 5 classes)" in next(l for l in lines if "image->text" in l)
    assert "top-1 25.0% (chance 12.5%), top-5 75.0%" in next(l for l in lines if "audio->text" in l)
