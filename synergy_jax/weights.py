"""Hugging Face checkpoints in and out: `config.json` + `model.safetensors` <-> (Linen module, params).

Conversion is strict both ways. Every tensor of the checkpoint is either converted or matched by an ignore rule
that states why (CLIP's text tower, AST's AudioSet head, ...); every parameter of the module is either filled
from the checkpoint or explicitly initialised with a logged reason (RoBERTa's pooler, absent from the hub
checkpoints, starts random as in the reference). Anything else is an error that names the key.

Names are mapped from the FILE's keys (transformers v5 renames some weights only at load time), and both the
bare-model layout and the task-model layout (`roberta.`, `audio_spectrogram_transformer.`, CLIPModel's
`vision_model.`) are accepted.

`load_hf_sequence_classifier` / `save_hf_sequence_classifier` do the same for the GLUE fine-tuning model,
transformers' `RobertaForSequenceClassification` (docs/reference.md R5.3), on the same RoBERTa key rules.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import flax.traverse_util
import jax
import numpy as np
import safetensors.numpy

from synergy_jax.errors import CheckpointError
from synergy_jax.models import MODALITIES, TOWER_OF, TOWERS, TowerKind, build_tower, param_groups, tower_kind
from synergy_jax.models.hf_config import TowerConfig
from synergy_jax.models.synergy import SynergyConfig, config_from_towers
from synergy_jax.models.text_classifier import RobertaClassifier

log = logging.getLogger(__name__)

Params = dict[str, Any]
ParamPath = tuple[str, ...]
HF_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


# ----------------------------------------------------------------------------------------------------------
# Tensor layout transforms: (HF -> Flax, Flax -> HF) pairs.


@dataclasses.dataclass(frozen=True)
class Transform:
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform(lambda x: x, lambda x: x)
# torch Linear weight [out, in] <-> Dense kernel [in, out].
LINEAR = Transform(lambda w: w.T, lambda k: k.T)
# torch Conv2d [out, in, kh, kw] <-> Flax Conv [kh, kw, in, out].
CONV = Transform(lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
# AST's cls/distillation tokens [1, 1, H] and position table [1, N, H] are stored with leading unit axes.
DROP_LEADING_AXES = {
    1: Transform(lambda x: x.reshape(x.shape[1:]), lambda x: x[None]),
    2: Transform(lambda x: x.reshape(x.shape[2:]), lambda x: x[None, None]),
}


def heads_in(num_heads: int) -> Transform:
    """q/k/v weight [heads*kv, embed] <-> kernel [embed, heads, kv]."""
    return Transform(
        lambda w: w.T.reshape(w.shape[1], num_heads, w.shape[0] // num_heads),
        lambda k: k.reshape(k.shape[0], -1).T,
    )


def heads_bias(num_heads: int) -> Transform:
    """q/k/v bias [heads*kv] <-> [heads, kv]."""
    return Transform(lambda b: b.reshape(num_heads, -1), lambda b: b.reshape(-1))


def heads_out(num_heads: int) -> Transform:
    """attention output weight [embed, heads*kv] <-> kernel [heads, kv, embed]."""
    return Transform(
        lambda w: w.T.reshape(num_heads, w.shape[1] // num_heads, w.shape[0]),
        lambda k: k.reshape(-1, k.shape[-1]).T,
    )


@dataclasses.dataclass(frozen=True)
class Rule:
    """One checkpoint tensor <-> one parameter."""

    hf_key: str
    path: ParamPath
    transform: Transform = IDENTITY


def dense_rules(hf: str, path: ParamPath, weight: Transform = LINEAR, bias: Transform = IDENTITY) -> list[Rule]:
    return [Rule(f"{hf}.weight", (*path, "kernel"), weight), Rule(f"{hf}.bias", (*path, "bias"), bias)]


def norm_rules(hf: str, path: ParamPath) -> list[Rule]:
    return [Rule(f"{hf}.weight", (*path, "scale")), Rule(f"{hf}.bias", (*path, "bias"))]


@dataclasses.dataclass(frozen=True)
class BlockNames:
    """Hugging Face sub-module names of one transformer block, per tower family."""

    query: str
    key: str
    value: str
    out: str
    ln1: str
    ln2: str
    fc1: str
    fc2: str


def block_rules(hf_layer: str, path: ParamPath, names: BlockNames, num_heads: int) -> list[Rule]:
    rules = []
    for flax_name in ("query", "key", "value"):
        rules += dense_rules(
            f"{hf_layer}.{getattr(names, flax_name)}", (*path, "attn", flax_name), heads_in(num_heads), heads_bias(num_heads)
        )
    rules += dense_rules(f"{hf_layer}.{names.out}", (*path, "attn", "out"), heads_out(num_heads))
    rules += norm_rules(f"{hf_layer}.{names.ln1}", (*path, "ln1"))
    rules += norm_rules(f"{hf_layer}.{names.ln2}", (*path, "ln2"))
    rules += dense_rules(f"{hf_layer}.{names.fc1}", (*path, "mlp", "fc1"))
    rules += dense_rules(f"{hf_layer}.{names.fc2}", (*path, "mlp", "fc2"))
    return rules


def encoder_rules(hf_layers: str, config: TowerConfig, names: BlockNames) -> list[Rule]:
    return [
        rule
        for i in range(config.num_hidden_layers)
        for rule in block_rules(f"{hf_layers}.{i}", ("encoder", f"layer_{i}"), names, config.num_attention_heads)
    ]


CLIP_BLOCK = BlockNames(
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2",
)  # fmt: skip
ROBERTA_BLOCK = BlockNames(
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "attention.output.LayerNorm", "output.LayerNorm", "intermediate.dense", "output.dense",
)  # fmt: skip
AST_BLOCK = BlockNames(
    "attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense",
    "layernorm_before", "layernorm_after", "intermediate.dense", "output.dense",
)  # fmt: skip


def clip_vision_rules(config: TowerConfig) -> list[Rule]:
    return [
        Rule("embeddings.class_embedding", ("class_embedding",)),
        Rule("embeddings.patch_embedding.weight", ("patch_embedding", "kernel"), CONV),
        Rule("embeddings.position_embedding.weight", ("position_embedding",)),
        *norm_rules("pre_layrnorm", ("pre_layernorm",)),
        *encoder_rules("encoder.layers", config, CLIP_BLOCK),
        *norm_rules("post_layernorm", ("post_layernorm",)),
    ]


def roberta_rules(config: TowerConfig, pooler: bool = True) -> list[Rule]:
    """RobertaModel's keys; `pooler=False` for `add_pooling_layer=False` (the encoder of the task models)."""
    return [
        Rule("embeddings.word_embeddings.weight", ("word_embeddings", "embedding")),
        Rule("embeddings.position_embeddings.weight", ("position_embeddings", "embedding")),
        Rule("embeddings.token_type_embeddings.weight", ("token_type_embeddings", "embedding")),
        *norm_rules("embeddings.LayerNorm", ("embeddings_layernorm",)),
        *encoder_rules("encoder.layer", config, ROBERTA_BLOCK),
        *(dense_rules("pooler.dense", ("pooler",)) if pooler else []),
    ]


def nested_rules(rules: list[Rule], hf_prefix: str, path: ParamPath) -> list[Rule]:
    """The same rules for a sub-model: keys under `hf_prefix`, parameters under `path`."""
    return [Rule(f"{hf_prefix}{rule.hf_key}", (*path, *rule.path), rule.transform) for rule in rules]


def roberta_classifier_rules(config: TowerConfig) -> list[Rule]:
    """RobertaForSequenceClassification's keys (docs/reference.md R5.3): the pooler-less encoder under `roberta.`,
    transformers' `RobertaClassificationHead` under `classifier.`; params as `RobertaClassifier` lays them out."""
    return [
        *nested_rules(roberta_rules(config, pooler=False), "roberta.", ("roberta",)),
        *dense_rules("classifier.dense", ("classifier", "dense")),
        *dense_rules("classifier.out_proj", ("classifier", "out_proj")),
    ]


def ast_rules(config: TowerConfig) -> list[Rule]:
    return [
        Rule("embeddings.cls_token", ("cls_token",), DROP_LEADING_AXES[2]),
        Rule("embeddings.distillation_token", ("distillation_token",), DROP_LEADING_AXES[2]),
        *dense_rules("embeddings.patch_embeddings.projection", ("patch_embedding",), CONV),
        Rule("embeddings.position_embeddings", ("position_embedding",), DROP_LEADING_AXES[1]),
        *encoder_rules("encoder.layer", config, AST_BLOCK),
        *norm_rules("layernorm", ("final_layernorm",)),
    ]


def init_dense_normal(std: float) -> Callable[[jax.Array, tuple[int, ...]], np.ndarray]:
    """transformers' `_init_weights` for Linear layers: kernel ~ N(0, std), bias 0."""

    def init(rng: jax.Array, shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 1:
            return np.zeros(shape, np.float32)
        return np.asarray(jax.random.normal(rng, shape, np.float32) * std)

    return init


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one family of Hugging Face checkpoints maps onto one tower."""

    kind: TowerKind
    rules: Callable[[TowerConfig], list[Rule]]
    prefixes: tuple[str, ...]  # where the tower's keys may sit in the file; the first is what export writes
    ignored: dict[str, str]  # fnmatch pattern over full file keys -> why the tensor is not used
    # Dense layers the checkpoint may lack (param prefix -> why); they get transformers' Linear init.
    initialisable: dict[ParamPath, str] = dataclasses.field(default_factory=dict)


_BUFFERS = "non-persistent buffer in older checkpoints; recomputed from the input"
ARCHITECTURES: dict[str, Architecture] = {
    "clip_vision_model": Architecture(
        TOWERS["vision"],
        clip_vision_rules,
        # Export writes `vision_model.*`, the layout of the hub's CLIP files and of transformers 4.x's
        # CLIPVisionModel (the reference pins 4.39); 5.x's flattened CLIPVisionModel strips the prefix on load.
        prefixes=("vision_model.", ""),
        ignored={"*position_ids": _BUFFERS},
    ),
    "roberta": Architecture(
        TOWERS["text"],
        roberta_rules,
        prefixes=("", "roberta."),
        ignored={
            "lm_head.*": "masked-language-model head; Synergy-CLIP uses the encoder and its pooler only",
            "classifier.*": "sequence-classification head; not part of the encoder",
            "*position_ids": _BUFFERS,
            "*token_type_ids": _BUFFERS,
        },
        initialisable={
            ("pooler",): "the checkpoint has no pooler (the hub RoBERTa checkpoints ship without one): initialised "
            "N(0, initializer_range) with zero bias, as transformers does and as the reference trained it",
        },
    ),
    "audio-spectrogram-transformer": Architecture(
        TOWERS["audio"],
        ast_rules,
        prefixes=("", "audio_spectrogram_transformer."),
        ignored={"classifier.*": "AudioSet classification head; dropped as in the reference"},
    ),
}
# CLIPModel checkpoints (openai/clip-vit-*): the vision tower is read from `vision_config` / `vision_model.`.
_CLIP_FULL_IGNORED = {
    "text_model.*": "CLIP's text tower; Synergy-CLIP encodes text with RoBERTa",
    "visual_projection.weight": "CLIP's own image projection; Synergy-CLIP learns its own",
    "text_projection.weight": "CLIP's own text projection; not used",
    "logit_scale": "CLIP's temperature; Synergy-CLIP has three of its own",
    "*position_ids": _BUFFERS,
}


# ----------------------------------------------------------------------------------------------------------
# Reading a checkpoint directory.


def resolve_checkpoint_dir(path_or_hub_id: str | Path) -> Path:
    """A local directory, or a hub id fetched into (or found in) the local Hugging Face cache."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the directory that holds config.json and model.safetensors")
    try:
        import huggingface_hub

        return Path(huggingface_hub.snapshot_download(str(path_or_hub_id), allow_patterns=list(HF_FILES)))
    except Exception as err:  # noqa: BLE001 - any hub failure gets the same actionable message
        raise FileNotFoundError(
            f"{str(path_or_hub_id)!r} is not a local directory, and the Hugging Face hub (or its local cache) "
            f"could not provide it ({type(err).__name__}: {err}). Pass a directory holding config.json and "
            f"model.safetensors, e.g. one made with `huggingface-cli download {path_or_hub_id}` on a machine "
            "that reaches the hub."
        ) from err


def read_config(directory: Path) -> dict[str, Any]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; it is not a Hugging Face model directory")
    return json.loads(config_file.read_text())


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` (or of its shards, via the index), as numpy arrays."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        present = sorted(p.name for p in directory.iterdir())
        hint = (
            " Only PyTorch pickles are present: convert once in an environment with torch, e.g. "
            "`AutoModel.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`."
            if any(name.endswith(".bin") for name in present)
            else ""
        )
        raise FileNotFoundError(f"{directory} has no model.safetensors (files: {present}).{hint}")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(safetensors.numpy.load_file(str(file)))
    return tensors


def architecture_for(hf_config: dict[str, Any]) -> tuple[Architecture, dict[str, Any], dict[str, str], tuple[str, ...]]:
    """(architecture, the tower's config dict, ignore rules, key prefixes) for a config.json."""
    model_type = hf_config.get("model_type")
    if model_type == "clip":
        arch = ARCHITECTURES["clip_vision_model"]
        return arch, hf_config.get("vision_config") or {}, _CLIP_FULL_IGNORED, ("vision_model.",)
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"unknown architecture model_type={model_type!r} (architectures={hf_config.get('architectures')}); "
            f"supported: {sorted(ARCHITECTURES) + ['clip']}"
        )
    arch = ARCHITECTURES[model_type]
    return arch, hf_config, arch.ignored, arch.prefixes


def detect_prefix(keys: set[str], rules: list[Rule], prefixes: tuple[str, ...]) -> str:
    """The prefix under which this checkpoint stores the tower (the one that matches the most rule keys)."""
    matches = {prefix: sum(f"{prefix}{rule.hf_key}" in keys for rule in rules) for prefix in prefixes}
    best = max(prefixes, key=lambda prefix: matches[prefix])
    if matches[best] == 0:
        example = rules[0].hf_key
        raise CheckpointError(
            f"none of the expected tensors are in the checkpoint (looked for e.g. {example!r} under prefixes "
            f"{list(prefixes)}); first keys in the file: {sorted(keys)[:5]}"
        )
    return best


def abstract_params(module: nn.Module, config: TowerConfig) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    """Flattened parameter shapes of a module, without allocating anything."""
    inputs = tower_kind(config).example_inputs(config)
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)
    return flax.traverse_util.flatten_dict(nn.unbox(variables)["params"])


def _under(path: ParamPath, prefixes: dict[ParamPath, str]) -> str | None:
    for prefix, reason in prefixes.items():
        if path[: len(prefix)] == prefix:
            return reason
    return None


def convert_tensors(
    directory: Path, tensors: dict[str, np.ndarray], rules: list[Rule], shapes: dict[ParamPath, jax.ShapeDtypeStruct]
) -> tuple[dict[ParamPath, np.ndarray], set[str]]:
    """(params, keys used): every rule whose tensor the file has, converted to float32 and checked against the
    shape the config implies, so that a wrong config fails here, naming the key, rather than inside `apply`."""
    params: dict[ParamPath, np.ndarray] = {}
    used: set[str] = set()
    for rule in rules:
        if rule.hf_key not in tensors:
            continue
        value = np.asarray(rule.transform.to_flax(tensors[rule.hf_key].astype(np.float32)))
        expected = tuple(shapes[rule.path].shape)
        if value.shape != expected:
            raise CheckpointError(
                f"{directory}: tensor {rule.hf_key!r} has shape {tuple(tensors[rule.hf_key].shape)}, which "
                f"converts to {value.shape}, but the config implies {expected} for params{list(rule.path)}"
            )
        params[rule.path] = value
        used.add(rule.hf_key)
    return params, used


def fill_missing(
    directory: Path,
    params: dict[ParamPath, np.ndarray],
    shapes: dict[ParamPath, jax.ShapeDtypeStruct],
    rules: list[Rule],
    initialisable: dict[ParamPath, str],
    init_std: float,
    rng: jax.Array,
) -> None:
    """Initialises, with a logged reason, the parameters a checkpoint may lack (`initialisable`); any other gap
    is an error naming the tensors it needs, so that no parameter ever starts random without anyone knowing."""
    missing = [path for path in shapes if path not in params]
    for i, path in enumerate(missing):
        reason = _under(path, initialisable)
        if reason is None:
            hf_keys = [rule.hf_key for rule in rules if rule.path == path]
            raise CheckpointError(f"{directory}: checkpoint lacks {hf_keys} needed for params{list(path)}")
        params[path] = init_dense_normal(init_std)(jax.random.fold_in(rng, i), tuple(shapes[path].shape))
        log.warning("%s: params%s initialised: %s", directory.name, list(path), reason)


def check_unused(
    directory: Path, tensors: dict[str, np.ndarray], used: set[str], ignored: dict[str, str], what: str
) -> None:
    """Every tensor not used must match an ignore rule, whose reason is logged: refusing to drop weights silently
    is what catches a key-name mismatch that would otherwise leave parameters at their initial values."""
    unused = sorted(set(tensors) - used)
    unexplained = [key for key in unused if not any(fnmatch.fnmatchcase(key, p) for p in ignored)]
    if unexplained:
        raise CheckpointError(
            f"{directory}: {len(unexplained)} checkpoint tensors are not used by {what} and no rule says why "
            f"(refusing to drop them silently): {unexplained[:10]}"
        )
    for pattern, reason in ignored.items():
        count = sum(fnmatch.fnmatchcase(key, pattern) for key in unused)
        if count:
            log.info("%s: ignored %d tensors matching %r: %s", directory.name, count, pattern, reason)


def load_hf_tower(
    path_or_hub_id: str | Path, *, dtype: str = "float32", remat: bool = False, attention: str = "auto",
    rng: jax.Array | None = None,
) -> tuple[nn.Module, Params]:
    """Builds the tower from the checkpoint's own config.json and converts its weights.

    Returns `(module, params)` with `params` a plain nested dict of float32 numpy arrays (host memory: callers
    place them on a mesh), such that `module.apply({'params': params}, *inputs)` gives
    `(last_hidden_state, pooled)`. `dtype`/`remat`/`attention` are the run-time knobs of the config. `rng` seeds any
    parameter the checkpoint lacks but may lack (RoBERTa's pooler); default PRNGKey(0).
    """
    directory = resolve_checkpoint_dir(path_or_hub_id)
    arch, tower_hf_config, ignored, prefixes = architecture_for(read_config(directory))
    config = arch.kind.config_cls.from_hf_dict(tower_hf_config, dtype=dtype, remat=remat, attention=attention)
    module = build_tower(config)
    shapes = abstract_params(module, config)
    tensors = read_tensors(directory)
    rules = arch.rules(config)
    rules = nested_rules(rules, detect_prefix(set(tensors), rules, prefixes), ())
    params, used = convert_tensors(directory, tensors, rules, shapes)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    fill_missing(directory, params, shapes, rules, arch.initialisable, config.initializer_range, rng)
    check_unused(directory, tensors, used, ignored, f"the {arch.kind.modality} tower")
    return module, flax.traverse_util.unflatten_dict(params)


def load_hf_synergy(tower_ids: dict[str, str], projection_dim: int, logit_scale_max: float | None = None,
                    **runtime: Any) -> tuple[SynergyConfig, dict[str, Params]]:  # fmt: skip
    """(SynergyConfig, {tower parameter group: params}) of three hub towers or folders named by tower ('vision',
    'text', 'audio'); `runtime` are the towers' run-time knobs (dtype, remat, attention). The projections and
    temperatures are not in the hub checkpoints: they start from their initialisers."""
    towers, pretrained = {}, {}
    for modality in MODALITIES:
        module, params = load_hf_tower(tower_ids[TOWER_OF[modality]], **runtime)
        towers[TOWER_OF[modality]], pretrained[param_groups(modality)[0]] = module.config, params
    return config_from_towers(towers, projection_dim, logit_scale_max=logit_scale_max), pretrained


def export_tensors(rules: list[Rule], params: Params, what: str) -> dict[str, np.ndarray]:
    """The checkpoint tensors of `params`, which must hold exactly the rules' parameters (nothing dropped)."""
    flat = flax.traverse_util.flatten_dict(nn.unbox(params))
    expected = {rule.path for rule in rules}
    if set(flat) != expected:
        raise CheckpointError(
            f"params do not match a {what}: missing {sorted(expected - set(flat))[:5]}, "
            f"unexpected {sorted(set(flat) - expected)[:5]}"
        )
    return {
        rule.hf_key: np.ascontiguousarray(rule.transform.to_hf(np.asarray(flat[rule.path], np.float32)))
        for rule in rules
    }


def write_checkpoint(out_dir: str | Path, hf_config: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def save_hf_tower(module: nn.Module, params: Params, out_dir: str | Path) -> Path:
    """Writes `config.json` + `model.safetensors` that `transformers.AutoModel.from_pretrained` loads."""
    config: TowerConfig = module.config
    arch = next(a for a in ARCHITECTURES.values() if isinstance(config, a.kind.config_cls))
    rules = nested_rules(arch.rules(config), arch.prefixes[0], ())
    return write_checkpoint(out_dir, config.to_hf_dict(), export_tensors(rules, params, config.architecture))


# ----------------------------------------------------------------------------------------------------------
# RobertaForSequenceClassification (GLUE fine-tuning, docs/reference.md R5.3).

SEQUENCE_CLASSIFIER = "RobertaForSequenceClassification"
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
_CLASSIFIER_IGNORED = {"*position_ids": _BUFFERS, "*token_type_ids": _BUFFERS}


def _labels(num_labels: int, id2label: dict[int, str] | None) -> dict[int, str]:
    """transformers' default names (LABEL_i) unless given; a mapping that does not name 0..num_labels-1 is an
    error, since transformers would silently resize the head to len(id2label) on load."""
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1 (1 = regression), got {num_labels}")
    labels = {i: f"LABEL_{i}" for i in range(num_labels)} if id2label is None else dict(id2label)
    if sorted(labels) != list(range(num_labels)):
        raise ValueError(f"id2label must name the labels 0..{num_labels - 1}, got ids {sorted(labels)}")
    return labels


def sequence_classifier_hf_config(
    config: TowerConfig,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    problem_type: str | None = None,
    classifier_dropout: float | None = None,
) -> dict[str, Any]:
    """config.json of a RobertaForSequenceClassification: the tower's fields plus the head's (labels, problem
    type: regression for one label, as transformers infers it, so that the exported model's loss is STS-B's)."""
    labels = _labels(num_labels, id2label)
    if problem_type is None and num_labels == 1:
        problem_type = "regression"
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type {problem_type!r} is not one of transformers' {PROBLEM_TYPES}")
    return {
        **config.to_hf_dict(),
        "architectures": [SEQUENCE_CLASSIFIER],
        "classifier_dropout": classifier_dropout,
        "num_labels": num_labels,
        "id2label": {str(i): label for i, label in labels.items()},
        "label2id": {label: i for i, label in labels.items()},
        "problem_type": problem_type,
    }


def save_hf_sequence_classifier(
    config: TowerConfig,
    num_labels: int,
    params: Params,
    out_dir: str | Path,
    id2label: dict[int, str] | None = None,
    problem_type: str | None = None,
    *,
    classifier_dropout: float | None = None,
) -> Path:
    """Writes a `RobertaClassifier`'s params as a directory that
    `transformers.AutoModelForSequenceClassification.from_pretrained` loads: the reference's fine-tuned text
    model (docs/reference.md R5.3), so GLUE results can be evaluated or shared with the torch tooling."""
    if not isinstance(config, TOWERS["text"].config_cls):
        raise TypeError(f"a sequence classifier needs a RobertaConfig, got {type(config).__name__}")
    hf_config = sequence_classifier_hf_config(config, num_labels, id2label, problem_type, classifier_dropout)
    tensors = export_tensors(roberta_classifier_rules(config), params, SEQUENCE_CLASSIFIER)
    return write_checkpoint(out_dir, hf_config, tensors)


def _classifier_config(directory: Path, hf_config: dict[str, Any]) -> tuple[int, dict[int, str]]:
    """(num_labels, id2label) of a RobertaForSequenceClassification config.json, refusing other models."""
    architectures = hf_config.get("architectures") or [SEQUENCE_CLASSIFIER]
    if hf_config.get("model_type") != "roberta" or SEQUENCE_CLASSIFIER not in architectures:
        raise CheckpointError(
            f"{directory}: not a {SEQUENCE_CLASSIFIER} (model_type={hf_config.get('model_type')!r}, architectures="
            f"{hf_config.get('architectures')}). To fine-tune a bare tower, load it with load_hf_tower, take "
            "text_classifier.from_text_tower(params) and initialise a fresh head."
        )
    if "id2label" in hf_config:
        id2label = {int(i): label for i, label in hf_config["id2label"].items()}
    else:
        id2label = {i: f"LABEL_{i}" for i in range(hf_config.get("num_labels", 2))}
    return len(id2label), _labels(len(id2label), id2label)


def load_hf_sequence_classifier(
    path_or_hub_id: str | Path, *, dtype: str = "float32", remat: bool = False
) -> tuple[nn.Module, Params, int, dict[int, str]]:
    """`(RobertaClassifier, params, num_labels, id2label)` from a RobertaForSequenceClassification directory.

    As strict as `load_hf_tower`, and stricter: nothing may be initialised (a fine-tuned head that silently
    started random would evaluate as chance), so every parameter needs its tensor and every tensor a use
    (position/token-type buffers aside). Parameters are float32 numpy arrays in host memory.
    """
    directory = resolve_checkpoint_dir(path_or_hub_id)
    hf_config = read_config(directory)
    num_labels, id2label = _classifier_config(directory, hf_config)
    config = TOWERS["text"].config_cls.from_hf_dict(hf_config, dtype=dtype, remat=remat)
    module = RobertaClassifier(config, num_labels, hf_config.get("classifier_dropout"))
    shapes = abstract_params(module, config)
    tensors = read_tensors(directory)
    rules = roberta_classifier_rules(config)
    params, used = convert_tensors(directory, tensors, rules, shapes)
    fill_missing(directory, params, shapes, rules, {}, config.initializer_range, jax.random.PRNGKey(0))
    check_unused(directory, tensors, used, _CLASSIFIER_IGNORED, f"a {SEQUENCE_CLASSIFIER}")
    return module, flax.traverse_util.unflatten_dict(params), num_labels, id2label
