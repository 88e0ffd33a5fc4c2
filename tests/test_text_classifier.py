"""RobertaClassifier: transformers' RobertaForSequenceClassification (docs/reference.md R5.3) in Flax, and its export.

Fixtures `roberta_cls` (3 named labels) and `roberta_reg` (1 label, classifier_dropout 0.3) come from
tests/fixtures/make_hf_fixtures.py (torch, eval mode, a right-padded batch); these tests need no torch.
"""

import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from synergy_jax.models.text import PRESETS, RobertaTower, example_inputs
from synergy_jax.models.text_classifier import RobertaClassificationHead, RobertaClassifier, from_text_tower
from synergy_jax.weights import (
    CheckpointError,
    load_hf_sequence_classifier,
    load_hf_tower,
    save_hf_sequence_classifier,
)

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
CASES = ("roberta_cls", "roberta_reg")
TOLERANCE = 1e-4
# No dropout in the tower, so that only the head's dropout can change an output.
QUIET_TOWER = PRESETS["tiny"].replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def load(case: str):
    module, params, num_labels, id2label = load_hf_sequence_classifier(FIXTURES / case)
    return module, params, num_labels, id2label, np.load(FIXTURES / case / "io.npz")


def logits_of(module, params, io, **kwargs):
    return module.apply({"params": params}, io["input_ids"], io["attention_mask"], **kwargs)


def init_classifier(config, num_labels=3, classifier_dropout=None, batch=2):
    module = RobertaClassifier(config, num_labels, classifier_dropout)
    inputs = example_inputs(config, batch=batch, length=8)
    return module, module.init(jax.random.PRNGKey(0), *inputs), inputs


def tampered(case: str, tmp_path: Path, edit) -> Path:
    """A copy of a fixture whose tensors `edit(tensors)` changed in place."""
    directory = Path(shutil.copytree(FIXTURES / case, tmp_path / case))
    tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


# (1) numerics against transformers


@pytest.mark.parametrize("case", CASES)
def test_logits_match_pytorch_on_a_padded_batch(case):
    module, params, num_labels, _, io = load(case)
    lengths = io["attention_mask"].sum(1)
    assert lengths.min() < lengths.max() == io["input_ids"].shape[1]  # really padded
    logits = logits_of(module, params, io)
    assert logits.dtype == jnp.float32 and logits.shape == (len(lengths), num_labels)
    np.testing.assert_allclose(logits, io["logits"], rtol=0, atol=TOLERANCE)
    # The rows differ by more than the tolerance: a head that ignored its input would not pass.
    assert np.ptp(io["logits"], axis=0).max() > 100 * TOLERANCE


def test_fixture_configs():
    """One classification head with named labels, one regression head with its own classifier_dropout."""
    cls, _, cls_labels, cls_names, _ = load("roberta_cls")
    reg, _, reg_labels, _, _ = load("roberta_reg")
    assert (cls_labels, cls_names) == (3, {0: "entailment", 1: "neutral", 2: "contradiction"})
    assert cls.classifier_dropout is None and cls.dropout_rate == cls.config.hidden_dropout_prob
    assert reg_labels == 1 and reg.classifier_dropout == reg.dropout_rate == 0.3


def test_bfloat16_compute_still_returns_float32_logits():
    module, params, _, _, io = load("roberta_cls")
    bf16 = RobertaClassifier(module.config.replace(dtype="bfloat16"), module.num_labels)
    logits = logits_of(bf16, params, io)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, io["logits"], rtol=0, atol=0.05)


# (2) export -> reload


@pytest.mark.parametrize("case", CASES)
def test_export_reproduces_the_checkpoint_bit_for_bit(case, tmp_path):
    module, params, num_labels, id2label, io = load(case)
    out = save_hf_sequence_classifier(
        module.config, num_labels, params, tmp_path, id2label, classifier_dropout=module.classifier_dropout
    )
    original = safetensors.numpy.load_file(str(FIXTURES / case / "model.safetensors"))
    exported = safetensors.numpy.load_file(str(out / "model.safetensors"))
    assert set(exported) == {key for key in original if not key.endswith(("position_ids", "token_type_ids"))}
    assert {"classifier.dense.weight", "classifier.out_proj.bias", "roberta.encoder.layer.1.output.dense.weight"} <= (
        exported.keys()
    )
    for key, value in exported.items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)

    reloaded, reloaded_params, reloaded_labels, reloaded_names = load_hf_sequence_classifier(out)
    assert (reloaded.config, reloaded.num_labels, reloaded.classifier_dropout) == (
        module.config, module.num_labels, module.classifier_dropout
    )  # fmt: skip
    assert (reloaded_labels, reloaded_names) == (num_labels, id2label)
    jax.tree.map(np.testing.assert_array_equal, reloaded_params, params)
    np.testing.assert_array_equal(logits_of(reloaded, reloaded_params, io), logits_of(module, params, io))


def test_exported_config_fields(tmp_path):
    module, params, _, _, _ = load("roberta_reg")
    config = json.loads((save_hf_sequence_classifier(module.config, 1, params, tmp_path) / "config.json").read_text())
    assert config["architectures"] == ["RobertaForSequenceClassification"] and config["model_type"] == "roberta"
    assert config["num_labels"] == 1 and config["problem_type"] == "regression"  # STS-B: MSE in transformers
    assert config["id2label"] == {"0": "LABEL_0"} and config["label2id"] == {"LABEL_0": 0}
    assert config["hidden_size"] == module.config.hidden_size and "dtype" not in config

    module, params, _, _, _ = load("roberta_cls")
    names = {0: "a", 1: "b", 2: "c"}
    out = save_hf_sequence_classifier(module.config, 3, params, tmp_path / "cls", names, "multi_label_classification")
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c"} and config["label2id"] == {"a": 0, "b": 1, "c": 2}
    assert config["problem_type"] == "multi_label_classification" and config["classifier_dropout"] is None
    assert load_hf_sequence_classifier(out)[3] == names
    # Unset for several labels: transformers then picks single/multi-label from the labels' dtype.
    out = save_hf_sequence_classifier(module.config, 3, params, tmp_path / "d")
    assert json.loads((out / "config.json").read_text())["problem_type"] is None


def test_export_refuses_inconsistent_labels_and_params(tmp_path):
    module, params, _, _, _ = load("roberta_cls")
    with pytest.raises(ValueError, match="id2label must name the labels 0..2"):
        save_hf_sequence_classifier(module.config, 3, params, tmp_path, {0: "a", 1: "b"})
    with pytest.raises(ValueError, match="problem_type 'ranking'"):
        save_hf_sequence_classifier(module.config, 3, params, tmp_path, problem_type="ranking")
    with_pooler = {**params, "roberta": {**params["roberta"], "pooler": params["classifier"]["dense"]}}
    with pytest.raises(CheckpointError, match=r"do not match.*unexpected \[\('roberta', 'pooler'"):
        save_hf_sequence_classifier(module.config, 3, with_pooler, tmp_path)
    headless = {**params, "classifier": {"dense": params["classifier"]["dense"]}}
    with pytest.raises(CheckpointError, match=r"missing \[\('classifier', 'out_proj'"):
        save_hf_sequence_classifier(module.config, 3, headless, tmp_path)


# (3) the tower without its pooler, and fine-tuning from a pre-trained tower


def test_tower_without_pooler_is_the_tower_minus_its_pooler():
    config = PRESETS["tiny"]
    inputs = example_inputs(config, batch=2, length=8)
    inputs = (jnp.array([[0, 5, 9, 7, 2, 1, 1, 1], [0, 4, 2, 1, 1, 1, 1, 1]]), inputs[1].at[:, 5:].set(0))
    tower_params = RobertaTower(config).init(jax.random.PRNGKey(1), *inputs)["params"]
    encoder_params = from_text_tower(nn.unbox(tower_params))
    assert "pooler" in tower_params and "pooler" not in encoder_params
    bare = RobertaTower(config, with_pooler=False)
    shapes = jax.eval_shape(bare.init, jax.random.PRNGKey(0), *inputs)["params"]
    assert jax.tree.structure(nn.unbox(shapes)) == jax.tree.structure(encoder_params)  # nothing else dropped

    hidden, pooled = RobertaTower(config).apply({"params": tower_params}, *inputs)
    bare_hidden, first_token = bare.apply({"params": encoder_params}, *inputs)
    np.testing.assert_array_equal(bare_hidden, hidden)
    np.testing.assert_array_equal(first_token, hidden[:, 0])
    assert not np.allclose(pooled, first_token)


def test_fine_tuning_starts_from_a_pretrained_tower():
    """load_hf_tower's tower (its pooler initialised) + from_text_tower + the head == the full checkpoint."""
    module, params, _, _, io = load("roberta_cls")
    _, tower_params = load_hf_tower(FIXTURES / "roberta_cls")
    assert "pooler" in tower_params
    rebuilt = {"roberta": from_text_tower(tower_params), "classifier": params["classifier"]}
    np.testing.assert_array_equal(logits_of(module, rebuilt, io), logits_of(module, params, io))
    with pytest.raises(ValueError, match=r"params\['text_model'\]"):
        from_text_tower({"text_model": tower_params, "vision_model": {}})
    with pytest.raises(ValueError, match="not the params of a RoBERTa text tower"):
        from_text_tower(params)


def test_fresh_head_is_initialised_as_transformers_with_axis_names():
    config = PRESETS["tiny"].replace(hidden_size=256, num_attention_heads=4)
    _, variables, _ = init_classifier(config, num_labels=5)
    boxed = variables["params"]["classifier"]
    names = {layer: {name: leaf.names for name, leaf in boxed[layer].items()} for layer in boxed}
    assert names["dense"] == {"kernel": ("embed", "mlp"), "bias": ("mlp",)}
    assert names["out_proj"] == {"kernel": ("mlp", None), "bias": (None,)}
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)  # the tower's too: all shardable
    head = nn.unbox(boxed)
    assert head["dense"]["kernel"].shape == (256, 256) and head["out_proj"]["kernel"].shape == (256, 5)
    assert float(head["dense"]["kernel"].std()) == pytest.approx(config.initializer_range, rel=0.02)
    assert float(head["out_proj"]["kernel"].std()) == pytest.approx(config.initializer_range, rel=0.1)
    assert not head["dense"]["bias"].any() and not head["out_proj"]["bias"].any()
    assert "pooler" not in variables["params"]["roberta"]


# (4) dropout


def test_dropout_only_when_not_deterministic():
    module, params, _, _, io = load("roberta_cls")
    eval_a, eval_b = logits_of(module, params, io), logits_of(module, params, io, deterministic=True)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = logits_of(module, params, io, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    train_b = logits_of(module, params, io, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(train_a, eval_a, atol=TOLERANCE) and not np.allclose(train_a, train_b, atol=TOLERANCE)
    with pytest.raises(Exception, match="dropout"):
        logits_of(module, params, io, deterministic=False)  # training without a dropout rng is an error


@pytest.mark.parametrize("classifier_dropout, changes", [(0.0, False), (0.5, True)])
def test_the_head_has_its_own_dropout(classifier_dropout, changes):
    module, variables, inputs = init_classifier(QUIET_TOWER, classifier_dropout=classifier_dropout)
    train = module.apply(variables, *inputs, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    assert np.allclose(train, module.apply(variables, *inputs), atol=1e-7) != changes


@pytest.mark.parametrize("classifier_dropout, hidden_dropout, rate", [(None, 0.3, 0.3), (0.2, 0.0, 0.2)])
def test_head_dropout_rate_is_classifier_dropout_else_hidden_dropout(classifier_dropout, hidden_dropout, rate):
    """Both head dropouts (before dense, before out_proj) zero a fraction `rate` of their inputs."""
    config = QUIET_TOWER.replace(hidden_dropout_prob=hidden_dropout, hidden_size=64)
    module = RobertaClassifier(config, 2, classifier_dropout)
    assert module.dropout_rate == rate
    head = RobertaClassificationHead(2, module.dropout_rate, config.initializer_range)
    features = jax.random.normal(jax.random.PRNGKey(4), (256, 64))
    variables = head.init(jax.random.PRNGKey(0), features, True)
    _, state = head.apply(variables, features, False, rngs={"dropout": jax.random.PRNGKey(5)},
                          capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Dropout))  # fmt: skip
    dropped = state["intermediates"]
    assert sorted(dropped) == ["Dropout_0", "Dropout_1"]
    for name, (out,) in ((name, value["__call__"]) for name, value in dropped.items()):
        assert float((out == 0).mean()) == pytest.approx(rate, abs=0.01), name


# (5) strict loading


def test_missing_tensor_is_an_error_naming_it(tmp_path):
    directory = tampered("roberta_cls", tmp_path, lambda t: t.pop("classifier.out_proj.bias"))
    with pytest.raises(CheckpointError, match=r"lacks \['classifier\.out_proj\.bias'\].*'classifier', 'out_proj'"):
        load_hf_sequence_classifier(directory)


def test_unexplained_extra_tensor_is_an_error_naming_it(tmp_path):
    def add_pooler(tensors):
        tensors["roberta.pooler.dense.weight"] = np.zeros((32, 32), np.float32)

    with pytest.raises(CheckpointError, match=r"not used by a RobertaForSequenceClassification.*roberta\.pooler"):
        load_hf_sequence_classifier(tampered("roberta_cls", tmp_path, add_pooler))


def test_renamed_tensor_is_an_error(tmp_path):
    """A key-name mismatch (here a bare `classifier.weight`, as BERT-style heads have) never loads silently."""
    def rename(tensors):
        tensors["classifier.weight"] = tensors.pop("classifier.out_proj.weight")

    with pytest.raises(CheckpointError, match=r"classifier\.out_proj\.weight"):
        load_hf_sequence_classifier(tampered("roberta_reg", tmp_path, rename))


def test_label_count_mismatch_names_key_and_shapes(tmp_path):
    directory = Path(shutil.copytree(FIXTURES / "roberta_cls", tmp_path / "cls"))
    config = json.loads((directory / "config.json").read_text())
    config["id2label"] = {"0": "yes", "1": "no"}  # the head has 3 rows
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"classifier\.out_proj\.weight.*\(3, 32\).*\(32, 2\)"):
        load_hf_sequence_classifier(directory)


def test_other_architectures_are_refused():
    with pytest.raises(CheckpointError, match="not a RobertaForSequenceClassification.*load_hf_tower"):
        load_hf_sequence_classifier(FIXTURES / "roberta")  # a bare RobertaModel: no head to load
    with pytest.raises(CheckpointError, match="model_type='clip'"):
        load_hf_sequence_classifier(FIXTURES / "clip_full")
