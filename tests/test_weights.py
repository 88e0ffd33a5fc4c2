"""Import/export strictness: coverage, clear errors, and a bit-exact export round trip (no torch needed)."""

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import flax.linen
import safetensors.numpy

from synergy_jax import weights
from synergy_jax.weights import CheckpointError, load_hf_tower, save_hf_tower

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
# Where each fixture keeps its tower's tensors, and what else the file holds.
TOWER_PREFIX = {
    "clip_vision_a": "",
    "clip_full": "vision_model.",
    "roberta": "",
    "roberta_mlm": "roberta.",
    "ast_a": "",
    "ast_b": "audio_spectrogram_transformer.",
}


def copy_fixture(case: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / case, tmp_path / case))


def fixture_with_config(case: str, tmp_path: Path, **changes) -> Path:
    """A copy of a fixture whose config.json has `changes` applied (the weights are untouched)."""
    directory = copy_fixture(case, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


@pytest.mark.parametrize("case", sorted(TOWER_PREFIX))
def test_export_reproduces_the_checkpoint_bit_for_bit(case, tmp_path):
    module, params = load_hf_tower(FIXTURES / case)
    out = save_hf_tower(module, params, tmp_path / "export")
    original = safetensors.numpy.load_file(str(FIXTURES / case / "model.safetensors"))
    exported = safetensors.numpy.load_file(str(out / "model.safetensors"))
    prefix, export_prefix = TOWER_PREFIX[case], "vision_model." if case.startswith("clip") else ""
    tower_keys = {export_prefix + key[len(prefix):] for key in original if key.startswith(prefix)}
    if case == "roberta_mlm":
        assert {"pooler.dense.weight", "pooler.dense.bias"} <= set(exported)  # initialised, then exported
        exported = {k: v for k, v in exported.items() if not k.startswith("pooler.")}
    assert set(exported) == tower_keys
    for key, value in exported.items():
        np.testing.assert_array_equal(value, original[prefix + key[len(export_prefix):]], err_msg=key)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [module.config.architecture]
    reloaded, reloaded_params = load_hf_tower(out)
    assert reloaded.config == module.config


def test_missing_pooler_is_initialised_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="synergy_jax.weights"):
        module, params = load_hf_tower(FIXTURES / "roberta_mlm")
    assert "params['pooler', 'kernel'] initialised" in caplog.text
    assert "lm_head" in caplog.text  # the ignored MLM head is reported with its reason
    kernel = params["pooler"]["kernel"]
    assert kernel.std() == pytest.approx(module.config.initializer_range, rel=0.1)  # 576 draws: standard error 3 %
    assert not params["pooler"]["bias"].any()


def test_clip_model_file_ignores_text_tower_with_reasons(caplog):
    with caplog.at_level(logging.INFO, logger="synergy_jax.weights"):
        load_hf_tower(FIXTURES / "clip_full")
    assert "text_model.*" in caplog.text and "RoBERTa" in caplog.text
    assert "logit_scale" in caplog.text


def test_unexplained_extra_tensor_is_an_error(tmp_path):
    directory = copy_fixture("ast_a", tmp_path)
    tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    tensors["encoder.layer.0.attention.attention.rotary.weight"] = np.zeros(3, np.float32)
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="rotary"):
        load_hf_tower(directory)


def test_missing_tensor_is_an_error_naming_it(tmp_path):
    directory = copy_fixture("clip_vision_a", tmp_path)
    tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    del tensors["encoder.layers.1.mlp.fc2.weight"]
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.mlp\.fc2\.weight"):
        load_hf_tower(directory)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    directory = fixture_with_config("roberta", tmp_path, intermediate_size=44)  # checkpoint has 40
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.weight.*\(40, 32\).*\(32, 44\)"):
        load_hf_tower(directory)


def test_unknown_architecture(tmp_path):
    directory = fixture_with_config("roberta", tmp_path, model_type="bert")
    with pytest.raises(CheckpointError, match="unknown architecture model_type='bert'"):
        load_hf_tower(directory)


def test_unsupported_config_value(tmp_path):
    directory = fixture_with_config("roberta", tmp_path, position_embedding_type="relative_key")
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        load_hf_tower(directory)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_hf_tower(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_tower(tmp_path)
    directory = copy_fixture("ast_a", tmp_path)
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*convert"):
        load_hf_tower(directory)


def test_sharded_checkpoint(tmp_path):
    directory = copy_fixture("ast_a", tmp_path)
    tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        safetensors.numpy.save_file({k: tensors[k] for k in shard_keys}, str(directory / name))
    (directory / "model.safetensors").unlink()
    index = {"weight_map": {k: name for name, shard_keys in shards.items() for k in shard_keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    io = np.load(directory / "io.npz")
    module, params = load_hf_tower(directory)
    hidden, _ = module.apply({"params": params}, io["features"])
    np.testing.assert_allclose(hidden, io["last_hidden_state"], atol=1e-4)


def test_save_rejects_params_of_another_tower(tmp_path):
    module, _ = load_hf_tower(FIXTURES / "ast_a")
    _, other_params = load_hf_tower(FIXTURES / "roberta")
    with pytest.raises(CheckpointError, match="do not match"):
        save_hf_tower(module, other_params, tmp_path)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    """Hub checkpoints are often saved in bf16: the converter reads them (ml_dtypes) into float32 parameters."""
    import ml_dtypes

    directory = copy_fixture("roberta", tmp_path)
    tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    halved = {key: value.astype(ml_dtypes.bfloat16) for key, value in tensors.items()}
    safetensors.numpy.save_file(halved, str(directory / "model.safetensors"), metadata={"format": "pt"})
    _, params = load_hf_tower(directory)
    _, reference = load_hf_tower(FIXTURES / "roberta")
    leaves, reference_leaves = jax.tree.leaves(params), jax.tree.leaves(reference)
    assert all(leaf.dtype == np.float32 for leaf in leaves)
    for leaf, ref in zip(leaves, reference_leaves, strict=True):  # the bf16-rounded fp32 values, exactly
        np.testing.assert_array_equal(leaf, np.asarray(ref).astype(ml_dtypes.bfloat16).astype(np.float32))


def test_three_hub_towers_make_a_tri_modal_model():
    """Pre-training's init=hub: each tower from its own folder with the run-time knobs, the tower weights in the
    model's parameter groups (the projections start from their initialisers)."""
    from synergy_jax.models.synergy import SynergyCLIP, example_batch

    folders = {"vision": FIXTURES / "clip_vision_a", "text": FIXTURES / "roberta", "audio": FIXTURES / "ast_a"}
    config, pretrained = weights.load_hf_synergy(folders, 16, logit_scale_max=4.6052, dtype="bfloat16", attention="xla")
    assert config.projection_dim == 16 and config.logit_scale_max == 4.6052
    assert {config.vision.dtype, config.text.dtype, config.audio.dtype} == {"bfloat16"}
    assert {config.vision.attention, config.text.attention, config.audio.attention} == {"xla"}
    for tower, folder in folders.items():
        assert getattr(config, tower) == weights.load_hf_tower(folder, dtype="bfloat16", attention="xla")[0].config
    shapes = jax.eval_shape(SynergyCLIP(config).init, jax.random.PRNGKey(0), example_batch(config, 1))["params"]
    assert set(pretrained) == {"vision_model", "text_model", "audio_model"} <= set(shapes)
    for group, params in pretrained.items():
        assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, flax.linen.unbox(shapes[group]))
