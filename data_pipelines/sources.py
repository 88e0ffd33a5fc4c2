"""A training run's data: prepared once (the embedded demo, or manifests precomputed into shards), described by a
`DataSource` (stored in the run record), and read back through Grain pipelines by every job that uses the run.

    data = sources.prepare(config.data, workdir, progress=True)     # pre-training: demo or manifests -> shards
    pipe = sources.pipeline_config(data.source, "train", train=True, batch_size=32, seed=0)
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

from data_pipelines import demo, pipeline, precompute
from synergy_jax import audio, device_augment, distributed
from synergy_jax.errors import SetupError
from synergy_jax.record import DataSource


@dataclasses.dataclass(frozen=True)
class RunData:
    source: DataSource
    train_metadata: dict
    eval_metadata: dict


def precompute_config(data_config) -> precompute.PrecomputeConfig:
    """The front-end shapes a job precomputes with (`config.data.image_size / max_frames / mel_bins`)."""
    fbank = audio.FbankConfig(max_frames=data_config.max_frames, num_mel_bins=data_config.mel_bins)
    return precompute.PrecomputeConfig(image_size=data_config.image_size, fbank=fbank)


def prepare(data_config, workdir: Path, default_tokenizer: str = "", progress: bool = False) -> RunData:
    """Demo data generated and precomputed if missing (into `data.dir`, default `<workdir>/data`), or the given
    manifests precomputed into `data.dir`; then both splits' metadata read. Process 0 writes, the others wait."""
    c = data_config
    if c.demo:
        root = Path(c.dir).absolute() if c.dir else workdir / "data"
        distributed.on_main_process("demo data", demo.ensure_demo_data, root, precompute_config(c), progress=progress)
        paths = demo.layout(root)
        data_dir, tokenizer, demo_root = paths.precomputed_dir, str(paths.tokenizer_dir), str(root)
    else:
        if not c.dir:
            raise SetupError("--config.data.dir is required: the precomputed data folder (see docs/pretrain.md)")
        data_dir, tokenizer, demo_root = Path(c.dir).absolute(), c.tokenizer or default_tokenizer, ""
        for manifest, split in ((c.train_manifest, c.train_split), (c.eval_manifest, c.eval_split)):
            if not manifest:
                continue
            if not Path(manifest).is_file():
                raise FileNotFoundError(f"--config.data.{split}_manifest: {manifest} does not exist")
            distributed.on_main_process(f"precompute {split}", precompute.precompute, manifest, data_dir,
                                        precompute_config(c), split=split, workers=c.workers)  # fmt: skip
    source = DataSource(str(data_dir), tokenizer, c.text_mode, c.max_length, c.image_size, c.train_split, c.eval_split,
                        demo_root)  # fmt: skip
    metadata = (precompute.load_metadata(data_dir, split) for split in (c.train_split, c.eval_split))
    return RunData(source, *metadata)


def pipeline_config(source: DataSource, split: str, *, train: bool, batch_size: int, seed: int, **options: Any):
    """A Grain pipeline over one split of `source` (per-process `batch_size`); `options` are the other
    `pipeline.PipelineConfig` fields (augmentation, label names, threads). No augmentation unless asked for."""
    defaults = dict(augment_image=False, augment_audio=False)
    return pipeline.PipelineConfig(
        data_dir=source.dir, split=split, batch_size=batch_size, train=train, text_mode=source.text_mode,
        tokenizer=source.tokenizer, max_length=source.max_length, image_size=source.image_size, seed=seed,
        **{**defaults, **options},
    )  # fmt: skip


def check_fits(model_config, data: RunData, tokenizer) -> None:
    """The precomputed image/audio shapes and the tokenizer against a tri-modal model config, before any compile."""
    tower = model_config.audio
    for split, metadata in (("train", data.train_metadata), ("eval", data.eval_metadata)):
        fbank = metadata["config"]["fbank"]
        if (fbank["max_frames"], fbank["num_mel_bins"]) != (tower.max_length, tower.num_mel_bins):
            raise SetupError(f"{split} data in {data.source.dir} has audio features of {fbank['max_frames']} frames x "
                             f"{fbank['num_mel_bins']} mel bins, the audio tower expects {tower.max_length} x "
                             f"{tower.num_mel_bins}: precompute with --max_frames/--mel_bins to match")  # fmt: skip
    if data.source.image_size != model_config.vision.image_size:
        raise SetupError(f"--config.data.image_size={data.source.image_size} but the vision tower takes "
                         f"{model_config.vision.image_size} px")  # fmt: skip
    if len(tokenizer) > model_config.text.vocab_size:
        raise SetupError(f"tokenizer {data.source.tokenizer} has {len(tokenizer)} tokens, more than the text tower's "
                         f"vocabulary of {model_config.text.vocab_size}")  # fmt: skip


def device_augmentation(data: RunData, augment_on: str) -> Callable[[dict], dict] | None:
    """The train step's augmentation of raw batches (`augment_on='device'`) for this data's front-end, else None."""
    if augment_on != "device":
        return None
    fbank = audio.FbankConfig(**data.train_metadata["config"]["fbank"])
    return functools.partial(device_augment.augment_batch, config=fbank)
