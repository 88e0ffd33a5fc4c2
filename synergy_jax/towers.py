"""Where a fine-tuned model's tower comes from, and the classifier built on it.

`load_towers(init, modality, ...)` accepts what a user passes as `--init`:
- a pre-training run folder: its tower and projection of that modality (and, for zero-shot beside, its text tower);
- a Hugging Face tower (hub id or local folder, `weights.load_hf_tower`): the plain baselines the paper compares
  with (CLIP ViT, AST, RoBERTa), no projection;
- 'scratch': random initialisation of the architecture of `--scratch_like` (a run or hub tower).

The classifier (`Towers.classifier`) is `models.classifiers.ProjectionClassifier` for images and audio and a
RoBERTa sequence classifier for text (docs/reference.md R5, R5.3). `Towers.export` writes the selected model in a
form other tools load: text as a transformers `RobertaForSequenceClassification` folder, image/audio as the tower
(`save_hf_tower`) plus `head.safetensors` (projection and classifier).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from synergy_jax import audio, checkpoint
from synergy_jax.errors import SetupError
from synergy_jax.models import TOWER_OF, param_groups, tower_kind
from synergy_jax.models.classifiers import ProjectionClassifier, TextClassifier
from synergy_jax.models.hf_config import TowerConfig
from synergy_jax.models.text_classifier import from_text_tower
from synergy_jax.record import RunRecord


@dataclasses.dataclass(frozen=True)
class Towers:
    kind: str  # 'run', 'hub' or 'scratch'
    modality: str
    tower_config: TowerConfig
    projection_dim: int  # the pre-trained projection's width; 0: none
    pretrained: dict[str, Any] | None  # top-level parameter groups ('vision_model', ...), None for scratch
    tokenizer: str = ""  # the text tokenizer that goes with the towers (hub id or folder)
    demo_root: str = ""  # a demo pre-training run's data root (the demo task reads its raw files)
    record: RunRecord | None = None  # the pre-training run's record (kind 'run')
    source: str = ""

    def classifier(self, num_labels: int, projection_dim: int = -1, scratch: bool = False):
        """(module, pretrained parameter groups or None): `scratch` gives the same architecture, random init."""
        width = self.projection_dim if projection_dim < 0 else projection_dim
        if self.modality == "text":
            model = TextClassifier(self.tower_config, num_labels)
        else:
            model = ProjectionClassifier(self.modality, self.tower_config, width, num_labels)
        if scratch or self.pretrained is None:
            return model, None
        wanted = {name: tree for name, tree in self.pretrained.items() if width or not name.endswith("_projection")}
        return model, wanted

    def example_batch(self, model, max_length: int) -> dict[str, jax.Array]:
        inputs = tower_kind(self.tower_config).example_inputs(self.tower_config, 1, *([max_length] if max_length else []))
        if self.modality == "text":
            return {"input_ids": inputs[0], "attention_mask": inputs[1]}
        return {self.modality: inputs[0]}

    def fbank(self) -> audio.FbankConfig:
        return audio.FbankConfig.for_tower(self.tower_config)

    def describe(self, model) -> dict[str, Any]:
        """The classifier as the run record stores it (what a resumed sub-run is checked against)."""
        head = {"num_labels": model.num_labels} if self.modality == "text" else \
            {"num_classes": model.num_classes, "projection_dim": model.projection_dim}  # fmt: skip
        return {"modality": self.modality, "tower": self.tower_config.to_hf_dict(), **head}

    def export(self, model, params: dict, out_dir: Path, splits) -> None:
        """The model in `out_dir` (replaced): text as a RobertaForSequenceClassification folder, image/audio as the
        tower's Hugging Face folder + head.safetensors, both with labels.json (the class names in label order)."""
        from synergy_jax import weights

        if jax.process_index() != 0:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = list(splits.class_names)
        if self.modality == "text":
            weights.save_hf_sequence_classifier(self.tower_config, model.num_labels, params, out_dir,
                                                id2label=dict(enumerate(names)) or None,
                                                problem_type="regression" if splits.regression else None)  # fmt: skip
        else:
            tower_name = param_groups(self.modality)[0]
            weights.save_hf_tower(tower_kind(self.tower_config).module_cls(self.tower_config), params[tower_name],
                                  out_dir / "tower")  # fmt: skip
            head = {f"{group}.{leaf}": np.asarray(value) for group, tree in params.items() if group != tower_name
                    for leaf, value in tree.items()}  # fmt: skip
            import safetensors.numpy

            safetensors.numpy.save_file(head, str(out_dir / "head.safetensors"))
        (out_dir / "labels.json").write_text(json.dumps(names))


def load_towers(init: str, modality: str, mesh, sharding: str = "replicate", dtype: str = "float32",
                remat: bool = False, scratch_like: str = "") -> Towers:  # fmt: skip
    """The towers `--init` names (see the module docstring)."""
    if not init:
        raise SetupError("--init is required: a pre-training run folder, a Hugging Face tower, or 'scratch'")
    if init == "scratch":
        if not scratch_like:
            raise SetupError("--init=scratch needs --config.scratch_like: the run or hub tower whose architecture to use")
        like = load_towers(scratch_like, modality, mesh, sharding, dtype, remat)
        return dataclasses.replace(like, kind="scratch", pretrained=None, source=f"scratch like {scratch_like}")
    path = Path(init).expanduser()
    if (path / checkpoint.CHECKPOINT_SUBDIR).is_dir():
        return _from_run(path.absolute(), modality, mesh, sharding, dtype, remat)
    if path.is_dir() and not (path / "config.json").is_file():
        raise SetupError(f"--init={init} is neither a pre-training run folder (no {checkpoint.CHECKPOINT_SUBDIR}/) nor "
                         "a Hugging Face tower folder (no config.json)")  # fmt: skip
    if not path.exists() and (init.startswith((".", "/", "~", "runs")) or init.count("/") != 1):
        raise SetupError(f"--init={init} does not exist: make the demo run with `python experiments/pretrain.py` (it "
                         "writes runs/demo), or pass a pre-training run folder, a Hugging Face tower, or 'scratch'")
    from synergy_jax import weights

    module, params = weights.load_hf_tower(init, dtype=dtype, remat=remat)
    if tower_kind(module.config).modality != TOWER_OF[modality]:
        raise SetupError(f"--init={init} is a {tower_kind(module.config).modality} tower; the task needs {modality}")
    pretrained = {"roberta": from_text_tower(params)} if modality == "text" else {param_groups(modality)[0]: params}
    return Towers("hub", modality, module.config, 0, pretrained, tokenizer=init if modality == "text" else "",
                  source=init)  # fmt: skip


def _from_run(run: Path, modality: str, mesh, sharding: str, dtype: str, remat: bool) -> Towers:
    params, record = checkpoint.restore_params(run, mesh, [modality], rules=sharding, dtype=dtype)
    synergy = record.synergy_config(dtype=dtype, remat=remat)
    tower_config = getattr(synergy, TOWER_OF[modality])
    tower, projection = param_groups(modality)
    if modality == "text":  # the sequence classifier uses neither the Synergy pooler nor the projection (R5.3)
        params, width = {"roberta": from_text_tower(params[tower])}, 0
    else:
        width = synergy.projection_dim
    data = record.data.resolve(run) if record.data is not None else None
    return Towers("run", modality, tower_config, width, params, tokenizer=data.tokenizer if data else "",
                  demo_root=data.demo_root if data else "", record=record, source=str(run))  # fmt: skip



def load_exported(path: str | Path):
    """(model, params, class names) of a folder written by `Towers.export`: a RobertaForSequenceClassification
    folder, or a tower folder + head.safetensors. `model.apply({'params': params}, batch)` gives the logits."""
    import safetensors.numpy

    from synergy_jax import weights

    path = Path(path)
    names = json.loads((path / "labels.json").read_text()) if (path / "labels.json").is_file() else []
    if not (path / "tower").is_dir():
        module, params, num_labels, _ = weights.load_hf_sequence_classifier(path)
        return TextClassifier(module.config, num_labels), params, names
    tower, tower_params = weights.load_hf_tower(path / "tower")
    modality = next(m for m, t in TOWER_OF.items() if t == tower_kind(tower.config).modality)
    params: dict[str, Any] = {param_groups(modality)[0]: tower_params}
    for key, value in safetensors.numpy.load_file(str(path / "head.safetensors")).items():
        group, leaf = key.split(".")
        params.setdefault(group, {})[leaf] = value
    projection = params.get(param_groups(modality)[1], {}).get("kernel")
    model = ProjectionClassifier(modality, tower.config, 0 if projection is None else projection.shape[1],
                                 params["classifier"]["kernel"].shape[1])  # fmt: skip
    return model, params, names
