"""The run record: what a training job stores with every checkpoint, and what every consumer reads back.

A run folder's checkpoints are only usable together with the facts that built them: the model config, the
tokenizer, the text mode and length, the image size and where the data lives. `RunRecord` carries them as typed
fields; the jobs write it (as JSON, in each checkpoint and as `<run>/config.json`) and the consumers (zero-shot,
MMR, fine-tuning, tests) read it with `RunRecord.from_json`, never by raw dictionary keys.

Paths in `DataSource` that are relative are relative to the run folder (`resolve`), so a run whose demo data lives
inside it can be moved or copied as a whole.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from synergy_jax.errors import CheckpointError
from synergy_jax.models import TOWERS
from synergy_jax.models.synergy import SynergyConfig

FORMAT = 2  # bumped when a field changes meaning; older records are refused with a message
KINDS = ("pretrain", "mmr", "finetune")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a run's examples come from and how they were turned into model inputs."""

    dir: str  # precomputed shards + metadata (data_pipelines/precompute.py output)
    tokenizer: str  # hub id or folder
    text_mode: str  # 'prompt' or 'caption'
    max_length: int  # text tokens
    image_size: int  # pixels per side
    train_split: str = "train"
    eval_split: str = "test"
    demo_root: str = ""  # a demo run's data root (raw/ + precomputed/), regenerated there when missing

    def resolve(self, run_dir: str | Path) -> "DataSource":
        """The same source with relative paths made absolute against `run_dir`."""
        base = Path(run_dir).expanduser().absolute()

        def absolute(path: str) -> str:
            return str(base / path) if path and not Path(path).is_absolute() else path

        # A relative tokenizer is a folder of the run only if it is there; otherwise it is a hub id.
        tokenizer = absolute(self.tokenizer) if (base / self.tokenizer).is_dir() else self.tokenizer
        return dataclasses.replace(self, dir=absolute(self.dir), tokenizer=tokenizer, demo_root=absolute(self.demo_root))

    def relative_to(self, run_dir: str | Path) -> "DataSource":
        """Paths inside `run_dir` written relative to it (the inverse of `resolve`)."""
        base = Path(run_dir).expanduser().absolute()

        def relative(path: str) -> str:
            if not path or not Path(path).is_absolute():
                return path
            try:
                return str(Path(path).relative_to(base))
            except ValueError:
                return path

        return dataclasses.replace(self, dir=relative(self.dir), tokenizer=relative(self.tokenizer),
                                   demo_root=relative(self.demo_root))


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What a run stores with each checkpoint. `model` rebuilds the model; `model_spec` and `optimizer_structure`
    decide whether a later run may resume from it; `config` and `run` are kept for the reader."""

    kind: str  # one of KINDS
    model: dict[str, Any]  # pretrain: tower configs (Hugging Face fields) + projection + temperatures
    optimizer_structure: dict[str, Any]
    config: dict[str, Any]  # the job's resolved config
    run: dict[str, Any]  # mesh, process count, jax version, the consumed run, ...
    data: DataSource | None = None
    model_spec: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    format: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, saved: Mapping[str, Any], where: str) -> "RunRecord":
        """The record of a checkpoint; a CheckpointError naming `where` when it is not one this code can read."""
        if saved.get("format") != FORMAT or saved.get("kind") not in KINDS:
            raise CheckpointError(
                f"{where} holds no run record of this version (format {saved.get('format')!r}, expected {FORMAT}): "
                "it was written by an older synergy-jax or is not a run folder; rerun the job that made it"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in saved.items() if k in fields}
        if values.get("data") is not None:
            values["data"] = DataSource(**values["data"])
        return cls(**values)

    def synergy_config(self, dtype: str = "float32", remat: bool = False, attention: str = "auto") -> SynergyConfig:
        """The tri-modal model config of a pre-training run (a CheckpointError for other kinds)."""
        if self.kind != "pretrain" or not all(name in self.model for name in TOWERS):
            raise CheckpointError(f"a {self.kind} run is not a pre-training run (it has no tower configs): pass the run folder of "
                                  "experiments/pretrain.py")  # fmt: skip
        return model_config_from_dict(self.model, dtype=dtype, remat=remat, attention=attention)

    def check_resumable_by(self, current: "RunRecord", where: str) -> None:
        """Raises CheckpointError naming every field that makes this saved state unusable for `current`.

        Compared: the kind, the model config, the config fields that define it, and the optimizer options that
        shape the optimizer state. Everything else (learning rate, steps, batch size, mesh, logging) may change.
        """
        problems = _differences(self.kind, current.kind, "kind")
        problems += _differences(self.model, current.model, "model")
        problems += _differences(self.model_spec, current.model_spec, "model_spec")
        problems += _differences(self.optimizer_structure, current.optimizer_structure, "optimizer")
        if problems:
            raise CheckpointError(
                f"the checkpoint in {where} was written by an incompatible config ({len(problems)} difference(s), "
                f"saved -> now): " + "; ".join(problems[:12]) + ". Use another --workdir for a new run, or the "
                "config that wrote it."
            )


def run_facts(mesh, **extra: Any) -> dict[str, Any]:
    """Where a run ran (its record's `run`: for the reader, never compared on resume): mesh, processes, jax."""
    import jax

    return {"mesh": dict(mesh.shape), "process_count": jax.process_count(), **extra, "jax": jax.__version__}


def model_config_to_dict(config: SynergyConfig) -> dict[str, Any]:
    """What rebuilds the tri-modal model: each tower's Hugging Face config fields, projection and temperatures."""
    return {
        "vision": config.vision.to_hf_dict(),
        "text": config.text.to_hf_dict(),
        "audio": config.audio.to_hf_dict(),
        "projection_dim": config.projection_dim,
        "logit_scale_init": config.logit_scale_init,
        "logit_scale_max": config.logit_scale_max,
    }


def model_config_from_dict(saved: Mapping[str, Any], dtype: str = "float32", remat: bool = False,
                           attention: str = "auto") -> SynergyConfig:  # fmt: skip
    towers = {name: TOWERS[name].config_cls.from_hf_dict(saved[name], dtype=dtype, remat=remat, attention=attention)
              for name in TOWERS}  # fmt: skip
    return SynergyConfig(
        **towers,
        projection_dim=saved["projection_dim"],
        logit_scale_init=saved["logit_scale_init"],
        logit_scale_max=saved["logit_scale_max"],
    )


def optimizer_structure(optimizer_config: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer options that decide the shape of its state (see `train.make_optimizer`)."""
    return {"clip_grad_norm": optimizer_config["clip_grad_norm"] > 0, "weight_decay_on": optimizer_config["weight_decay_on"]}


def _differences(saved: Any, current: Any, path: str = "") -> list[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in current:
                out.append(f"{where}: {'absent' if key not in saved else saved[key]!r} -> "
                           f"{'absent' if key not in current else current[key]!r}")  # fmt: skip
            else:
                out.extend(_differences(saved[key], current[key], where))
        return out
    same = saved == current or (isinstance(saved, (list, tuple)) and list(saved) == list(current))
    return [] if same else [f"{path}: {saved!r} -> {current!r}"]
