"""The MMR job end to end on a tiny demo set and a tiny pre-training checkpoint written through the checkpoint API:
all three directions (metrics, baselines, PNG / text samples, frozen towers), resume after a preemption giving the
uninterrupted run's losses, and a config that cannot resume a run."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import demo, precompute
from experiments import mmr as mmr_job
from experiments.configs import mmr as mmr_configs
from helpers import ROOT, override, train_losses, write_pretrain_run
from synergy_jax import audio, checkpoint, mmr_train, text
from synergy_jax.evaluators import reconstruction
from synergy_jax.models import mmr, preset
from synergy_jax.models.synergy import SynergyConfig, preset_config
from synergy_jax.record import DataSource

STEPS = 6
TEST_EXAMPLES = 20  # 10 classes x 2


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    """Demo data (4 train / 2 test clips per class) and a step-1 checkpoint of tiny random towers."""
    run = tmp_path_factory.mktemp("pretrain")
    fbank = audio.FbankConfig(max_frames=128, num_mel_bins=32)
    demo.ensure_demo_data(run / "data", precompute.PrecomputeConfig(image_size=32, fbank=fbank), train_per_class=4,
                          test_per_class=2)  # fmt: skip
    tokenizer = text.load_tokenizer(str(run / "data" / "raw" / "tokenizer"))
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model_config = SynergyConfig(
        vision=preset("vision", "tiny").replace(**tower, image_size=32, patch_size=8),
        text=preset("text", "tiny").replace(**tower, vocab_size=len(tokenizer), max_position_embeddings=34),
        audio=preset("audio", "tiny").replace(**tower, max_length=128, num_mel_bins=32, frequency_stride=16,
                                              time_stride=16),  # fmt: skip
        projection_dim=8,
    )
    data = DataSource(dir="data/precomputed", tokenizer="data/raw/tokenizer", text_mode="prompt", max_length=32,
                      image_size=32, demo_root="data")  # fmt: skip
    write_pretrain_run(run, model_config, data)
    return run


def tiny_config(**overrides):
    config = mmr_configs.get_config("demo")
    small = {
        "model.encoder_dim": 16, "model.encoder_bottleneck_dim": 8, "model.decoder_dim": 16, "model.decoder_depth": 1,
        "model.decoder_heads": 2, "model.decoder_ff_dim": 32, "model.txt_tokens": 4, "model.mlp_hidden_dim": 16,
        "model.img_decoder_layer_info": ((2, 16, 4, 4), (2, 16, 8, 8), (2, 16, 16, 16)),
        "model.aud_decoder_layer_info": ((2, 16, 8, 2), (2, 16, 16, 4), (2, 16, 32, 8)),
        "batch_size": 8, "eval_batch_size": 8, "total_steps": STEPS, "log_every": 1, "checkpoint_every": 3,
        "baseline_examples": 16, "num_samples": 3, "progress": False, "optimizer.learning_rate": 1e-3,
    }  # fmt: skip
    return override(config, {**small, **overrides})


def run_mmr(config, pretrain_run: Path, missing: str, workdir: Path, stop_at=None) -> dict:
    return mmr_job.run(override(config, {"checkpoint": str(pretrain_run), "missing": missing, "workdir": str(workdir)}),
                       stop_at)  # fmt: skip


@pytest.fixture(scope="module")
def image_run(pretrain_run, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted image run: a direction test and the reference of the resume test."""
    workdir = tmp_path_factory.mktemp("image")
    return workdir, run_mmr(tiny_config(), pretrain_run, "image", workdir)


@pytest.mark.parametrize("missing", ["image", "audio", "text"])
def test_each_direction_trains_evaluates_and_writes_samples(pretrain_run, image_run, tmp_path_factory, missing):
    if missing == "image":
        tmp_path, summary = image_run
    else:
        tmp_path = tmp_path_factory.mktemp(missing)
        summary = run_mmr(tiny_config(), pretrain_run, missing, tmp_path)
    assert summary["step"] == STEPS and not summary["preempted"]
    assert summary["eval/examples"] == TEST_EXAMPLES
    assert sorted(train_losses(tmp_path)) == list(range(1, STEPS + 1))
    if missing == "text":
        for key in ("accuracy", "accuracy_with_pads", "baseline_majority_token/accuracy",
                    "baseline_majority_token_per_position/accuracy"):  # fmt: skip
            assert 0.0 <= summary[f"eval/{key}"] <= 1.0
        assert summary["eval/ce"] > 0 and summary["eval/ce_with_pads"] > 0
        assert summary["eval/baseline_unigram_per_position/ce"] > 0
        samples = (tmp_path / "text_samples.txt").read_text()
        assert samples.count("target:") == 3 and samples.count("reconstructed:") == 3
        assert samples.count("token accuracy") == 3
    else:
        for key in ("psnr", "ssim", "baseline_mean_target/psnr", "baseline_mean_target/ssim"):
            assert np.isfinite(summary[f"eval/{key}"])
        # Audio SSIM uses the training targets' range (AST features span about 3), images the reference's 1.0.
        if missing == "audio":
            assert summary["eval/ssim_data_range"] > 1.5
        else:
            assert summary["eval/ssim_data_range"] == 1.0
        from PIL import Image

        grid = np.asarray(Image.open(tmp_path / "reconstructions.png"))
        assert grid.ndim == 3 and grid.shape[0] > 3 * 150 and grid.std() > 0  # a labelled row per sample
    # The train state holds only the fusion encoder and decoder: the towers are neither trained nor saved.
    saved = checkpoint.make_manager(tmp_path, read_only=True)
    assert saved.all_steps() == [3, 6]
    params = saved.restore(6, args=checkpoint.ocp.args.Composite(state=checkpoint.ocp.args.PyTreeRestore()))["state"]
    mappers = {mmr.MAPPER_OF[m] for m in mmr.TASKS[missing].inputs}
    assert set(params["params"]) == mappers | {"mm_encoder", "decoder"}


def test_interrupted_run_resumes_to_the_same_losses(pretrain_run, image_run, tmp_path):
    (reference_dir, reference), resumed_dir = image_run, tmp_path / "resumed"
    first = run_mmr(tiny_config(), pretrain_run, "image", resumed_dir, stop_at=lambda step: step == 4)
    assert first["preempted"] and first["step"] == 4
    second = run_mmr(tiny_config(), pretrain_run, "image", resumed_dir)
    assert second["step"] == STEPS
    expected, resumed = train_losses(reference_dir), train_losses(resumed_dir)
    np.testing.assert_allclose([resumed[s] for s in range(1, STEPS + 1)], [expected[s] for s in range(1, STEPS + 1)],
                               rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(second["eval/psnr"], reference["eval/psnr"], rtol=1e-5)
    with pytest.raises(checkpoint.CheckpointError, match="decoder_dim"):
        run_mmr(tiny_config(**{"model.decoder_dim": 24}), pretrain_run, "image", resumed_dir)


def test_an_mmr_run_is_not_taken_for_a_pretrain_run(image_run, tmp_path):
    mmr_dir, _ = image_run
    with pytest.raises(checkpoint.CheckpointError, match="not a pre-training run"):
        run_mmr(tiny_config(), mmr_dir, "audio", tmp_path)


def test_text_loss_flag_counts_pads():
    """The reference's objective (`text_loss_on_pads`) is the pad-inclusive CE; ours ignores pad positions."""
    ids = jnp.array([[0, 7, 2, 1, 1], [0, 5, 6, 2, 1]])
    mask = (ids != 1).astype(jnp.int32)
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 9))
    batch = {"attention_mask": mask}
    ours = mmr_train.task_loss(logits, ids, batch, mmr_train.StepOptions("text", (0.0,) * 3, (1.0,) * 3))
    theirs = mmr_train.task_loss(logits, ids, batch, mmr_train.StepOptions("text", (0.0,) * 3, (1.0,) * 3,
                                                                         text_loss_on_pads=True))  # fmt: skip
    assert ours["loss"] == pytest.approx(float(ours["ce"])) and theirs["loss"] == pytest.approx(float(ours["ce_with_pads"]))
    assert float(ours["ce"]) != pytest.approx(float(ours["ce_with_pads"]))
    logits_changed_on_pads = logits.at[:, 3:].add(5.0)
    again = mmr_train.task_loss(logits_changed_on_pads, ids, batch, mmr_train.StepOptions("text", (0.0,) * 3, (1.0,) * 3))
    assert float(again["loss"]) == pytest.approx(float(ours["loss"]), rel=1e-6)  # pads cannot move our loss


def test_audio_ssim_uses_the_data_range_option():
    """Spec docs/reference.md bug 15: the reference's data_range 1.0 is kept only behind `reference_audio_ssim_data_range`; the
    loss with range R equals the reference formula on targets and outputs divided by R."""
    key1, key2 = jax.random.split(jax.random.PRNGKey(1))
    target = jax.random.uniform(key1, (2, 16, 16, 1), minval=-1.4, maxval=1.6)
    recon = target + 0.3 * jax.random.normal(key2, target.shape)
    options = lambda r: mmr_train.StepOptions("audio", (0.0,) * 3, (1.0,) * 3, audio_ssim_data_range=r)  # noqa: E731
    ours = mmr_train.task_loss(recon, target, {}, options(3.0))
    reference = mmr_train.task_loss(recon, target, {}, options(1.0))
    scaled = mmr_train.rl.ssim(recon / 3.0, target / 3.0, 1.0)
    assert float(ours["ssim_loss"]) == pytest.approx(1.0 - float(scaled), rel=1e-5)
    assert float(ours["ssim_loss"]) != pytest.approx(float(reference["ssim_loss"]), rel=1e-3)


def test_text_baselines_by_hand():
    counts = np.array([[3, 1, 0, 0], [0, 0, 2, 2]], np.float64)  # training tokens at positions 0 and 1, vocab 4
    target = np.array([[0, 2], [1, 1]])
    mask = np.array([[1, 1], [1, 0]])  # the last position is a pad
    out = reconstruction.text_baselines(counts, target, mask)
    assert out["baseline_majority_token/accuracy"] == pytest.approx(1 / 3)  # token 0 everywhere
    assert out["baseline_majority_token/accuracy_with_pads"] == pytest.approx(1 / 4)
    assert out["baseline_majority_token_per_position/accuracy"] == pytest.approx(2 / 3)  # tokens 0, 2
    assert out["baseline_majority_token_per_position/accuracy_with_pads"] == pytest.approx(2 / 4)
    # p = (count + 1/4) / (4 + 1): 0.65 for token 0 at position 0, 0.45 for token 2 at 1, 0.25 for token 1 at 0.
    assert out["baseline_unigram_per_position/ce"] == pytest.approx(-np.log([0.65, 0.45, 0.25]).mean())


@pytest.mark.parametrize("variant", ["base", "large"])
def test_full_size_configs_match_the_reference_structure(variant):
    """configs/mmr.py:base/large through the job's mmr_config, built abstractly: parameter and BatchNorm-statistics
    counts and output shapes equal the reference's PyTorch task models at full size (tests/fixtures/mmr/full_size.json,
    from make_mmr_fixtures.py on torch's meta device)."""
    reference = json.loads((ROOT / "tests" / "fixtures" / "mmr" / "full_size.json").read_text())
    synergy = preset_config(variant)
    config = mmr_job.mmr_config(mmr_configs.get_config(variant), synergy, 32)
    width = {"image": synergy.vision.hidden_size, "text": synergy.text.hidden_size, "audio": synergy.audio.hidden_size}
    size = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))  # noqa: E731
    for missing, task in mmr.TASKS.items():
        model = mmr.MMRModel(config, missing)
        features = {m: jax.ShapeDtypeStruct((2, width[m]), jnp.float32) for m in task.inputs}
        variables = jax.eval_shape(lambda f: model.init(jax.random.key(0), f), features)  # noqa: B023
        output = jax.eval_shape(lambda v, f: model.apply(v, f), variables, features)  # noqa: B023
        expected = reference[f"{variant}/{missing}"]
        assert size(variables["params"]) == expected["params"], missing
        assert size(variables.get("batch_stats", {})) == expected["running_stats"], missing
        assert output.shape == (2, *config.output_shape(missing))
        torch_layout = {"image": lambda s: (s[0], s[3], s[1], s[2]), "audio": lambda s: s[:3], "text": lambda s: s}
        assert list(torch_layout[missing](output.shape)) == expected["output_shape"], missing
