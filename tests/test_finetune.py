"""Fine-tuning: model selection under both protocols, sweeps that resume, and the job end to end on tiny data in
the real layouts (ESC-50 folds; a GLUE SST-2 TSV folder) from a tiny pre-training run, with the exports reloaded."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from data_pipelines import finetune_input, finetune_tasks
from experiments import finetune as job
from experiments.configs import finetune as recipes
from helpers import ROOT, override, subprocess_env, tiny_pretrain_run
from synergy_jax import finetune, parallel, text
from synergy_jax.towers import load_exported, load_towers
import synthetic


def row(epoch, select, report):
    return {"epoch": epoch, "select/accuracy": select, "report/accuracy": report, "report/f1": report / 2}


def test_protocols_select_the_right_epoch():
    history = [row(1, 0.5, 0.9), row(2, 0.8, 0.6), row(3, 0.8, 0.7), row(4, float("nan"), 0.95)]
    assert finetune.select_epoch(history, "clean", "accuracy", text_task=False) == {"epoch": 2, "accuracy": 0.6,
                                                                                     "f1": 0.3}  # fmt: skip
    assert finetune.select_epoch(history, "reference", "accuracy", text_task=False)["epoch"] == 4  # best on report
    assert finetune.select_epoch(history, "reference", "accuracy", text_task=True)["epoch"] == 4  # the last epoch
    assert finetune.select_epoch(history[:3], "reference", "accuracy", text_task=True)["epoch"] == 3
    with pytest.raises(ValueError, match="protocol"):
        finetune.select_epoch(history, "best", "accuracy", text_task=False)


def test_spread_reports_population_and_sample_std():
    out = finetune.spread([90.0, 92.0, 94.0])
    assert out["mean"] == pytest.approx(92.0)
    assert out["std_population"] == pytest.approx(np.std([90, 92, 94]))
    assert out["std_sample"] == pytest.approx(np.std([90, 92, 94], ddof=1)) and out["std_sample"] > out["std_population"]


def test_history_keeps_the_last_line_of_each_step(tmp_path):
    lines = [{"step": 4, "loss": 1.0}, {"step": 4, "eval/epoch": 1.0, "eval/report/accuracy": 0.1},
             {"step": 8, "eval/epoch": 2.0, "eval/report/accuracy": 0.2},
             {"step": 4, "eval/epoch": 1.0, "eval/report/accuracy": 0.3}]  # step 4 logged again after a resume
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + '\n{"step": 9, "ev')
    history = finetune.history_from_metrics(tmp_path / "metrics.jsonl")
    assert [(h["epoch"], h["report/accuracy"]) for h in history] == [(1.0, 0.3), (2.0, 0.2)]


def test_sweep_skips_finished_sub_runs_and_stops_when_preempted(tmp_path):
    calls = []

    def run_one(sub_run, folder):
        calls.append(sub_run.name)
        return None if sub_run.seed == 2 and len(calls) == 2 else {"clean": {"accuracy": sub_run.seed}}

    subs = [finetune.SubRun(None, seed) for seed in (1, 2, 3)]
    results, preempted = finetune.run_sweep(tmp_path, subs, run_one)
    assert preempted and [r["seed"] for r in results] == [1] and calls == ["run/seed1", "run/seed2"]
    results, preempted = finetune.run_sweep(tmp_path, subs, run_one)
    assert not preempted and [r["seed"] for r in results] == [1, 2, 3]
    assert calls == ["run/seed1", "run/seed2", "run/seed2", "run/seed3"]  # seed 1 was not trained again


def test_sub_runs_take_the_chosen_folds_and_refuse_folds_the_task_lacks():
    from synergy_jax.errors import SetupError

    subs = finetune.sub_runs([1, 2, 3], (2, 3), [0, 1], inits=("run", "scratch"))
    assert [s.name for s in subs] == ["run/fold2_seed0", "run/fold2_seed1", "run/fold3_seed0", "run/fold3_seed1",
                                      "scratch/fold2_seed0", "scratch/fold2_seed1", "scratch/fold3_seed0",
                                      "scratch/fold3_seed1"]  # fmt: skip
    assert len(finetune.sub_runs([None], None, [0, 1])) == 2
    with pytest.raises(SetupError, match=r"fold\(s\) \[6, 7\]: this task has folds \[1, 2, 3, 4, 5\]"):
        finetune.sub_runs([1, 2, 3, 4, 5], (5, 6, 7), [0])
    with pytest.raises(SetupError, match="this task has no folds"):
        finetune.sub_runs([None], (1,), [0])


def test_seeded_folds_are_stratified():
    labels = np.repeat(np.arange(4), 10)
    folds = finetune_tasks.seeded_folds(labels, 5, seed=3)
    for fold in range(1, 6):
        assert np.bincount(labels[folds == fold], minlength=4).tolist() == [2, 2, 2, 2]
    assert not np.array_equal(folds, finetune_tasks.seeded_folds(labels, 5, seed=4))


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny pre-training run whose tokenizer knows the GLUE sentences' words."""
    words = "a good great fine movie film bad awful dull plot this is the sound of dog rooster rain bells"
    return tiny_pretrain_run(tmp_path_factory.mktemp("run"), words, seed=5)


def tiny(task: str, run_dir: Path, data_dir: Path, workdir: Path, **overrides):
    config = recipes.get_config("base_c")
    return override(config, {"task": task, "init": str(run_dir), "data_dir": str(data_dir), "workdir": str(workdir),
                             "mesh": "4x2", **TINY_FLAGS, **overrides})  # fmt: skip


TINY_FLAGS = {"epochs": 2, "batch_size": 4, "accum_steps": 1, "eval_batch_size": 8, "holdout_fraction": 0.25,
              "progress": False, "log_every": 1}  # fmt: skip


@pytest.fixture(scope="module")
def esc_sweep(run_dir, tmp_path_factory):
    """ESC-50 (2 folds x 1 seed, 3 clips per class and fold) and one uninterrupted sweep over it, with the scratch
    and zero-shot baselines beside it."""
    root = tmp_path_factory.mktemp("esc")
    esc = synthetic.make_esc50(root / "ESC-50", per_class_and_fold=3, folds=(1, 2))
    return esc, root / "whole", job.run(tiny("esc50", run_dir, esc, root / "whole", compare=("scratch", "zero_shot")))


def test_baselines_beside_the_run(run_dir, esc_sweep, tmp_path, monkeypatch):
    """The scratch rows come from randomly initialised towers of the same shape; the zero-shot row of each fold is
    what the zero-shot job reports for that fold with the reference's single prompt."""
    esc, whole_dir, whole = esc_sweep
    assert len(whole["rows"]["scratch/clean"]["values"]) == 2 and len(whole["rows"]["zero_shot"]["values"]) == 2
    trained, _, _ = load_exported(whole_dir / "run" / "fold1_seed17" / "export")
    exported = [load_exported(whole_dir / init / "fold1_seed17" / "export")[1] for init in ("run", "scratch")]
    run_tower, scratch_tower = (np.asarray(p["audio_model"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"])
                                for p in exported)  # fmt: skip
    assert trained.num_classes == 6 and not np.allclose(run_tower, scratch_tower, atol=1e-2)
    from experiments import zero_shot as zs_job
    from experiments.configs import zero_shot as zs_config

    for fold, value in zip((1, 2), whole["rows"]["zero_shot"]["values"]):
        config = zs_config.get_config()
        config.update(dict(checkpoint=str(run_dir), dataset="esc50", data_dir=str(esc), folds=str(fold), prompts="single",
                           mesh="8x1", batch_size=8, progress=False, out=str(tmp_path / f"zs{fold}.json")))  # fmt: skip
        expected = zs_job.run(config)["tasks"]["audio->text"]["top1"]
        assert value == pytest.approx(100.0 * expected)
    # The class prompts: the reference's single audio template over the class names as prompts spell them (R5.4).
    seen = []
    real = job.zero_shot.classes_from_prompts
    monkeypatch.setattr(job.zero_shot, "classes_from_prompts", lambda e, names, t: seen.append((names, t)) or real(e, names, t))
    config = recipes.resolve(tiny("esc50", run_dir, esc, tmp_path / "again"))
    mesh = parallel.make_mesh("8x1")
    plan = job.make_plan(config, mesh)
    job.zero_shot_accuracies(plan, [plan.data.splits(1, 17, 0.25)], mesh)
    assert seen == [([[name.replace("_", " ")] for name in synthetic.ESC_CLASSES], ("this is a sound of {}",))]


def test_audio_folds_resume_after_a_stop_and_export(run_dir, esc_sweep, tmp_path):
    """A sweep stopped inside the second fold resumes to the same results as an uninterrupted sweep (the first fold
    is not redone); the exported model reloads."""
    esc, whole_dir, whole = esc_sweep
    steps = {"n": 0}

    def stop_in_fold_two(step):
        steps["n"] += 1
        return steps["n"] == 11  # 14 training clips / batch 4 = 3 steps x 2 epochs in fold 1; fold 2's 5th step

    stopped = job.run(tiny("esc50", run_dir, esc, tmp_path / "resumed"), stop_at=stop_in_fold_two)
    assert stopped["preempted"] and stopped["finished_sub_runs"] == 1
    resumed = job.run(tiny("esc50", run_dir, esc, tmp_path / "resumed"))
    for name in ("run/clean", "run/reference"):
        assert resumed["rows"][name]["values"] == whole["rows"][name]["values"]
    assert len(whole["rows"]["run/clean"]["values"]) == 2 and whole["metric"] == "accuracy"
    assert (tmp_path / "resumed" / "results.md").read_text().count("| run/") == 2
    from PIL import Image

    confusion = np.asarray(Image.open(whole_dir / "run" / "fold1_seed17" / "confusion.png"))
    assert confusion.ndim == 3 and confusion.std() > 0
    model, params, names = load_exported(whole_dir / "run" / "fold1_seed17" / "export")
    assert names == synthetic.ESC_CLASSES and model.num_classes == len(names) and model.projection_dim > 0
    towers = load_towers(str(run_dir), "audio", parallel.make_mesh("1x1", jax.devices()[:1]))
    clip = synthetic.tone(np.random.default_rng(0), 2, 16_000, 0.5)
    from synergy_jax import audio

    batch = {"audio": audio.ast_features(clip, towers.fbank())[None]}
    logits = np.asarray(model.apply({"params": params}, batch))
    assert logits.shape == (1, len(names)) and np.all(np.isfinite(logits))


def test_sweep_killed_mid_fold_resumes_to_the_same_results(run_dir, esc_sweep, tmp_path):
    """`kill -9` of the command while fold 2 trains (after its first epoch's checkpoint); the same command again
    finishes the sweep with the uninterrupted sweep's numbers, fold 1 kept as it was."""
    esc, _, whole = esc_sweep
    command = [sys.executable, str(ROOT / "experiments" / "finetune.py"), f"--config={ROOT}/experiments/configs/"
               "finetune.py:base_c", "--task=esc50", f"--init={run_dir}", f"--data_dir={esc}", f"--workdir={tmp_path}/w",
               "--mesh=4x2", *(f"--config.{k}={v}" for k, v in TINY_FLAGS.items())]  # fmt: skip
    fold2 = tmp_path / "w" / "run" / "fold2_seed17" / "metrics.jsonl"
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(command, env=subprocess_env(8), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            hang_guard = time.time() + 600  # not a speed limit: only stops a hung job from hanging the suite
            while not (fold2.is_file() and "eval/epoch" in fold2.read_text()):
                assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.time() < hang_guard, (tmp_path / "first.log").read_text()[-3000:]
                time.sleep(0.2)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert (tmp_path / "w" / "run" / "fold1_seed17" / "result.json").is_file()
    assert not (tmp_path / "w" / "run" / "fold2_seed17" / "result.json").is_file()
    second = subprocess.run(command, env=subprocess_env(8), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "fold1_seed17: finished before, kept" in second.stdout and "resumed" in second.stdout
    resumed = json.loads((tmp_path / "w" / "results.json").read_text())
    for name in ("run/clean", "run/reference"):
        assert resumed["rows"][name]["values"] == whole["rows"][name]["values"]


def write_sst2(root: Path) -> Path:
    """The GLUE download's SST-2 folder: header 'sentence<TAB>label'."""
    rng = np.random.default_rng(0)
    good, bad = "a good movie|great film|a fine plot".split("|"), "a bad movie|awful film|a dull plot".split("|")
    (root / "SST-2").mkdir(parents=True)
    for split, count in (("train", 24), ("dev", 8)):
        rows = [(rng.choice(good), 1) if i % 2 else (rng.choice(bad), 0) for i in range(count)]
        (root / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in rows))
    return root


def test_glue_text_task_and_sequence_classifier_export(run_dir, tmp_path):
    glue_dir = write_sst2(tmp_path / "glue")
    table = job.run(tiny("sst2", run_dir, glue_dir, tmp_path / "sst2", seeds=(1, 2), text_max_length=16))
    assert table["metric"] == "accuracy" and len(table["rows"]["run/reference"]["values"]) == 2
    sub = tmp_path / "sst2" / "run" / "seed1"
    result = json.loads((sub / "result.json").read_text())
    assert result["reference"]["epoch"] == 2  # text: the last epoch, as the Trainer
    assert {"accuracy", "epoch"} <= set(result["clean"])
    model, params, names = load_exported(sub / "export")
    assert json.loads((sub / "export" / "config.json").read_text())["architectures"] == ["RobertaForSequenceClassification"]
    tokenizer = text.load_tokenizer(run_dir / "tokenizer")
    batch = finetune_input.tokenize_pair(tokenizer, "a good movie", None, 16)
    logits = model.apply({"params": params}, {k: v[None] for k, v in batch.items()})
    assert logits.shape == (1, 2) and names == ["negative", "positive"]


def test_command_line_errors_exit_2(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "experiments" / "finetune.py"), *args], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)  # fmt: skip

    bad_task = run("--task=imagenet")
    assert bad_task.returncode == 2 and "--task=imagenet" in bad_task.stderr
    no_run = run()  # the demo default with no demo run in this folder
    assert no_run.returncode == 2 and "runs/demo" in no_run.stderr and "Traceback" not in no_run.stderr
    no_data = run("--config=" + str(ROOT / "experiments/configs/finetune.py") + ":base_c", "--task=esc50",
                  f"--init={tmp_path}")  # fmt: skip
    assert no_data.returncode == 2 and "--init" in no_data.stderr


def test_image_class_folders_and_a_regression_glue_task(run_dir, tmp_path):
    """Images from <data_dir>/{train,validation,test}/<class>/ (the official validation split selects the epoch),
    and STS-B's 0-5 scores as a 1-output regression scored by Pearson."""
    rng = np.random.default_rng(1)
    for split, count in (("train", 6), ("validation", 2), ("test", 2)):
        for label, name in enumerate(("cat", "dog", "owl")):
            (tmp_path / "pics" / split / name).mkdir(parents=True)
            for i in range(count):
                synthetic.picture(rng, label).save(tmp_path / "pics" / split / name / f"{i}.png")
    table = job.run(tiny("folder", run_dir, tmp_path / "pics", tmp_path / "folder", seeds=(3,)))
    result = table["sub_runs"][0]
    assert table["metric"] == "accuracy" and result["fold"] is None and 1 <= result["clean"]["epoch"] <= 2
    assert (tmp_path / "folder" / "run" / "seed3" / "confusion.png").is_file()
    stsb = tmp_path / "glue" / "STS-B"
    stsb.mkdir(parents=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    for split, count in (("train", 16), ("dev", 8)):
        rows = [f"{i}\tmain-news\tx\t2012\t{i}\tnone\tnone\ta good movie\t{'a good film' if i % 2 else 'a dull plot'}"
                f"\t{4.0 + 0.1 * (i % 3) if i % 2 else 0.5 * (i % 3)}\n" for i in range(count)]  # fmt: skip
        (stsb / f"{split}.tsv").write_text(header + "".join(rows))
    table = job.run(tiny("stsb", run_dir, tmp_path / "glue", tmp_path / "stsb", seeds=(3,), text_max_length=16))
    result = table["sub_runs"][0]
    assert table["metric"] == "pearson" and {"pearson", "spearman"} <= set(result["reference"])
    export = json.loads((tmp_path / "stsb" / "run" / "seed3" / "export" / "config.json").read_text())
    assert export["num_labels"] == 1 and export["problem_type"] == "regression"


def test_prepared_tfds_image_set(run_dir, tmp_path):
    """Pets from a prepared TFDS data dir (array_record, no TensorFlow): train minus a held-out part, test reported;
    the class names come from the TFDS ClassLabel, in its order."""
    synthetic.make_tfds(tmp_path / "tfds", "oxford_iiit_pet", count=24, splits=("train", "test"))
    table = job.run(tiny("pets", run_dir, tmp_path / "tfds", tmp_path / "pets", seeds=(1,)))
    assert table["paper"] == recipes.PAPER["pets"]["base_c"] and len(table["rows"]["run/clean"]["values"]) == 1
    labels = json.loads((tmp_path / "pets" / "run" / "seed1" / "export" / "labels.json").read_text())
    assert labels == synthetic.PET_NAMES


def test_recipe_schedules():
    """Audio: torch MultiStepLR(gamma 0.99) at linspace(0, E, E//5+1)[1:-1] (R5.2); text: the Trainer's linear decay
    to 0 (R5.3); the schedules as the optimizer sees them."""
    from synergy_jax import train

    assert recipes.decay_epochs("base_c", "esc50", 12) == (6,) and recipes.decay_epochs("base_p", "urbansound8k", 10) == (5,)
    assert recipes.decay_epochs("large_c", "urbansound8k", 8) == () and recipes.decay_epochs("base_c", "pets", 20) == ()
    optimizer = train.optimizer_config()
    optimizer.update(learning_rate=2e-5, schedule="step", decay_boundaries=(60,), decay_factor=0.99)
    step = train.learning_rate_schedule(optimizer)
    assert float(step(59)) == pytest.approx(2e-5) and float(step(60)) == pytest.approx(2e-5 * 0.99)
    optimizer.update(schedule="linear", total_steps=100)
    linear = train.learning_rate_schedule(optimizer)
    assert float(linear(0)) == pytest.approx(2e-5) and float(linear(50)) == pytest.approx(1e-5) and float(linear(100)) == 0
    resolved = recipes.resolve(override(recipes.get_config("base_p"), {"task": "mrpc"}))
    assert (resolved.accum_steps, resolved.optimizer.schedule, resolved.optimizer.clip_grad_norm) == (2, "linear", 1.0)
    assert (resolved.optimizer.weight_decay, resolved.optimizer.weight_decay_on) == (0.01, "matrices")
