"""Zero-shot classification and tri-modal retrieval with a pre-training checkpoint: an evaluation-only job.

    python experiments/zero_shot.py --checkpoint=runs/demo --dataset=demo
    python experiments/zero_shot.py --checkpoint=runs/base_p --dataset=esc50 --data_dir=data/ESC-50 --folds=1-5
    python experiments/zero_shot.py --checkpoint=runs/base_p --dataset=cifar100 --data_dir=~/tensorflow_datasets

Settings: experiments/configs/zero_shot.py (`--config.<field>=<value>` or `--<field>=<value>`). The job's own: its
datasets (docs/zero_shot.md) and its outputs; checkpoint, run record, embedding, metrics are the library's.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from data_pipelines import augment, demo, downstream, pipeline, precompute, sources
from experiments.configs import zero_shot as zs_config
from synergy_jax import audio, checkpoint, cli, distributed, parallel, plots, text, train
from synergy_jax.errors import CheckpointError, SetupError
from synergy_jax.evaluators import embed, retrieval, zero_shot
from synergy_jax.models import MODALITIES
from synergy_jax.models.synergy import SynergyCLIP
from synergy_jax.record import DataSource, RunRecord

CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "zero_shot.py"
SHORTCUTS = tuple(cli.Shortcut(name, name, help_text, tuple(zs_config.PROMPT_SETS) if name == "prompts" else None)
                  for name, (_, help_text) in zs_config.FIELDS.items())  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint on the mesh: model, the parameters needed, record, data (paths resolved, config overrides), the
    tokenizer, `embed_prompts(prompts) -> (N, D)` normalised embeddings and the towers' input shapes (`frontend`: how
    demo or manifest data is precomputed for them)."""

    model: SynergyCLIP
    params: dict
    step: int
    workdir: Path
    record: RunRecord
    data: DataSource
    tokenizer: Any
    mesh: Mesh
    embed_prompts: Callable
    frontend: precompute.PrecomputeConfig

    @classmethod
    def load(cls, config: ml_collections.ConfigDict, mesh: Mesh, groups) -> Restored:
        workdir = Path(config.checkpoint).expanduser().absolute()
        step = checkpoint.latest_step(workdir, None if config.step < 0 else config.step)
        params, record = checkpoint.restore_params(workdir, mesh, groups, rules=config.sharding, step=step,
                                                   dtype=config.dtype)  # fmt: skip
        if record.data is None:
            raise CheckpointError(f"{workdir}: its run record names no data (tokenizer, text length); rerun pre-training")
        overrides = {field: config[field] for field in ("tokenizer", "text_mode") if config[field]}
        data = dataclasses.replace(record.data.resolve(workdir), **overrides)
        towers = record.synergy_config(config.dtype)
        model, tokenizer = SynergyCLIP(towers), text.load_tokenizer(data.tokenizer)
        embed_prompts = embed.prompt_embedder(model, params, mesh, tokenizer, data.max_length, config.batch_size)
        fbank = audio.FbankConfig.for_tower(towers.audio)
        frontend = precompute.PrecomputeConfig(image_size=towers.vision.image_size, fbank=fbank)
        return cls(model, params, step, workdir, record, data, tokenizer, mesh, embed_prompts, frontend)


def load_classification_set(kind: str, spec: dict, config: ml_collections.ConfigDict) -> downstream.ClassificationSet:
    if not config.data_dir:
        raise SetupError(f"--dataset={config.dataset} needs --data_dir (see docs/zero_shot.md)")
    data_dir = str(Path(config.data_dir).expanduser())
    return {"esc50": lambda: downstream.read_esc50(data_dir, config.folds),
            "urbansound8k": lambda: downstream.read_urbansound8k(data_dir, config.folds),
            "tfds": lambda: downstream.read_tfds(spec["tfds_name"], data_dir, config.split or spec.get("split", "test")),
            "folder": lambda: downstream.read_folder(data_dir, spec.get("modality"))}[kind]()  # fmt: skip


def decoder(modality: str, frontend: precompute.PrecomputeConfig) -> Callable:
    """Images: Resize((S, S)) bilinear -> CLIP mean/std, as pre-training evaluates. Audio: 16 kHz waveform -> AST
    features (Kaldi fbank, padded/truncated to the tower's frames), as precompute does."""
    return {"image": lambda image: augment.to_normalized_array(augment.resize(image, frontend.image_size)),
            "audio": lambda waveform: audio.ast_features(waveform, frontend.fbank)}[modality]  # fmt: skip


def run_classification(dataset: downstream.ClassificationSet, ckpt: Restored, config) -> dict:
    """One modality->text zero-shot task over a whole ClassificationSet."""
    if config.class_names:
        downstream.check_class_names(dataset.class_names, downstream.read_class_list(config.class_names), dataset.name)
    modality, count, decode = dataset.modality, len(dataset), decoder(dataset.modality, ckpt.frontend)
    templates = zs_config.PROMPT_SETS[config.prompts][modality]
    names = [[downstream.prompt_name(name)] for name in dataset.class_names]
    classes = zero_shot.classes_from_prompts(ckpt.embed_prompts, names, templates)
    with concurrent.futures.ThreadPoolExecutor(max(1, config.workers)) as pool:  # decodes a batch's examples
        rows = lambda indices: {modality: np.stack(list(pool.map(lambda i: decode(dataset.examples[int(i)]), indices)))}
        queries = embed.embed_split(embed.modality_embedder(ckpt.model, ckpt.params, modality),
                                    embed.indexed_batches(count, config.batch_size, ckpt.mesh, rows), ckpt.mesh,
                                    total=embed.batch_count(count, config.batch_size),
                                    desc=f"{modality} {dataset.name}" if config.progress else None)[modality]  # fmt: skip
    task = zero_shot.classification_results(queries, classes, dataset.labels, dataset.class_names, dataset.folds)
    return {"tasks": {f"{modality}->text": task}, "class_names": list(dataset.class_names), "num_examples": count,
            "num_templates": len(templates), "folds": None if dataset.folds is None else sorted(set(dataset.folds.tolist()))}


def precomputed_source(kind: str, ckpt: Restored, config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(precomputed folder, split): demo: the run's eval split, or that of the demo root --data_dir, generated there if
    missing; precomputed: --data_dir's (a manifest CSV is precomputed first, at the towers' shapes)."""
    given = Path(config.data_dir).expanduser().absolute() if config.data_dir else None
    if kind == "demo":
        data_dir = demo.layout(given).precomputed_dir if given else Path(ckpt.data.dir)
        demo_root, split = str(given or ckpt.data.demo_root), config.split or ckpt.data.eval_split

        def ensure_demo():  # decided on process 0 alone, so every process reaches the same barrier
            if (given or ckpt.data.demo_root) and not precompute.metadata_path(data_dir, split).is_file():
                distributed.log(f"demo data not found under {demo_root}: generating it there")
                demo.ensure_demo_data(demo_root, ckpt.frontend)

        distributed.on_main_process("demo data", ensure_demo)
        return str(data_dir), split
    if given is None:
        raise SetupError("--dataset=precomputed needs --data_dir: a precomputed folder or a manifest CSV")
    if given.suffix != ".csv":
        return str(given), config.split or "test"
    distributed.on_main_process("precompute", precompute.precompute, given, given.parent / "precomputed",
                                ckpt.frontend, progress=config.progress)  # fmt: skip
    return str(given.parent / "precomputed"), precompute.split_name(given)


def run_tri_modal(kind: str, ckpt: Restored, config: ml_collections.ConfigDict) -> dict:
    """A precomputed manifest split: image->text and audio->text zero-shot on its labels, and six-way retrieval."""
    data_dir, split = precomputed_source(kind, ckpt, config)
    metadata = precompute.load_metadata(data_dir, split)
    labels, source, prompts = tuple(metadata["labels"]), ckpt.data, zs_config.PROMPT_SETS[config.prompts]
    source = dataclasses.replace(source, dir=data_dir, image_size=ckpt.model.config.vision.image_size)
    pipe = sources.pipeline_config(source, split, train=False, batch_size=config.batch_size // jax.process_count(),
                                   seed=ckpt.record.seed, label_names=labels, read_threads=2, prefetch=2)  # fmt: skip
    columns = embed.embed_split(lambda batch: embed.embed_all_modalities(ckpt.model, ckpt.params, batch),
                                pipeline.build_dataset(pipe, ckpt.tokenizer), ckpt.mesh, keep=("label_id",),
                                total=embed.batch_count(metadata["num_examples"], config.batch_size),
                                desc=f"{kind} {split}" if config.progress else None)  # fmt: skip
    names = zero_shot.class_names_from_labels(labels)  # every synonym of a VGGSound-style label
    tasks = {f"{m}->text": zero_shot.classification_results(columns[m], zero_shot.classes_from_prompts(
        ckpt.embed_prompts, names, prompts[m]), columns["label_id"], labels) for m in ("image", "audio")}  # fmt: skip
    return {"tasks": tasks, "retrieval": retrieval.retrieval_metrics({m: columns[m] for m in MODALITIES}),
            "retrieval_text_mode": source.text_mode, "class_names": list(labels), "num_examples": len(columns["label_id"]),
            "num_templates": {m: len(prompts[m]) for m in ("image", "audio")},
            "data": {"dir": data_dir, "split": split, "content_hash": metadata.get("content_hash")}}  # fmt: skip


def write_outputs(results: dict, config: ml_collections.ConfigDict) -> list[str]:
    """The JSON (--out, default <checkpoint>/zero_shot/<dataset>[_folds<k>]_<prompts>.json), a confusion PNG per task."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.dataset)
    if config.folds and config.folds != "all":
        slug += "_folds" + re.sub(r"[^0-9]+", "-", config.folds)
    out = Path(config.out or Path(config.checkpoint).expanduser() / "zero_shot" / f"{slug}_{config.prompts}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [str(out)]
    for task, metrics in results["tasks"].items():
        png = out.with_name(f"{out.stem}_{task.split('->')[0]}_confusion.png")
        title = f"{results['dataset']} {task} top-1 {100 * metrics['top1']:.1f}%"
        plots.confusion_matrix(np.asarray(metrics["confusion_matrix"]), results["class_names"], title, png)
        metrics["confusion_png"] = str(png)
        written.append(str(png))
    out.write_text(json.dumps(results, indent=1))
    return written


def print_table(results: dict) -> None:
    print(f"\n=== zero-shot {results['dataset']}: {results['num_examples']} examples, {len(results['class_names'])} "
          f"classes, {results['prompts']} prompts, checkpoint step {results['step']}")  # fmt: skip
    print(f"{'task':14s} {'top-1':>7s} {'top-5':>7s} {'per-class':>9s} {'chance':>7s}")
    for task, m in results["tasks"].items():
        top5 = f"{100 * m['top5']:7.2f}" if "top5" in m else f"{'-':>7s}"
        print(f"{task:14s} {100 * m['top1']:7.2f} {top5} {100 * m['per_class_accuracy']:9.2f} {100 * m['chance']:7.2f}")
        for fold, fm in m.get("folds", {}).items():
            print(f"  fold {fold:>3s}     {100 * fm['top1']:7.2f} " + (f"{100 * fm['top5']:7.2f}" if "top5" in fm else ""))
        if "fold_mean_top1" in m:
            print(f"  folds mean top-1 {100 * m['fold_mean_top1']:.2f} +- {100 * m['fold_std_top1']:.2f} (std over folds)")
    if "retrieval" in results:
        r = results["retrieval"]
        print(f"\n{'retrieval':16s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'median rank':>12s}   (text: {results['retrieval_text_mode']})")
        for query, candidate in retrieval.DIRECTIONS:
            key = f"retrieval/{query}->{candidate}"
            print(f"{query + '->' + candidate:16s} " + " ".join(f"{100 * r[f'{key}/R@{k}']:6.2f}" for k in (1, 5, 10))
                  + f" {r[f'{key}/median_rank']:12.1f}")  # fmt: skip
    if "outputs" in results:
        print("\nwrote " + ", ".join(results["outputs"]))


def run(config: ml_collections.ConfigDict) -> dict:
    """The whole job; returns the results (also written to JSON + PNGs by process 0)."""
    started = time.time()
    cli.check_ranges(config, zs_config.RANGES)
    if config.prompts not in zs_config.PROMPT_SETS:
        raise SetupError(f"--prompts must be one of {list(zs_config.PROMPT_SETS)}, got {config.prompts!r}")
    mesh = parallel.make_mesh(config.mesh)
    train.check_batch(config.batch_size, mesh, name="--batch_size")
    cli.check_runtime(mesh, config.dtype, config.sharding)
    kind, spec = zs_config.dataset_kind(config.dataset)
    classification = None if kind in ("demo", "precomputed") else load_classification_set(kind, spec, config)
    modalities = MODALITIES if classification is None else (classification.modality, "text")
    ckpt = Restored.load(config, mesh, None if classification is None else (*modalities, *checkpoint.LOGIT_SCALES))
    distributed.log(f"zero-shot {config.dataset}: checkpoint {ckpt.workdir} step {ckpt.step} ({', '.join(modalities)} "
                    f"towers), mesh {dict(mesh.shape)}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
                    f"{config.prompts} prompts")  # fmt: skip
    results = (run_tri_modal(kind, ckpt, config) if classification is None
               else run_classification(classification, ckpt, config))  # fmt: skip
    results = {"dataset": config.dataset if classification is None else classification.name,
               "checkpoint": str(ckpt.workdir), "step": ckpt.step, "prompts": config.prompts, "mesh": dict(mesh.shape),
               "devices": jax.device_count(),
               "protocol": "whole split, every example once (the reference drew 128 examples with replacement)",
               **results, "wall_seconds": time.time() - started}  # fmt: skip
    if distributed.is_main_process():
        results["outputs"] = write_outputs(results, config)
    return results


if __name__ == "__main__":
    cli.start(CONFIG_FILE, run, print_table, SHORTCUTS)
