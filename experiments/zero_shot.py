"""Zero-shot classification and tri-modal retrieval with a pre-training checkpoint.

    python experiments/zero_shot.py --checkpoint=runs/demo --dataset=demo
    python experiments/zero_shot.py --checkpoint=runs/base_p --dataset=esc50 --data_dir=data/ESC-50 --folds=1-5
    python experiments/zero_shot.py --checkpoint=runs/base_p --dataset=cifar100 --data_dir=~/tensorflow_datasets \
        --prompts=ensemble --mesh=8x1

Sections: mesh -> checkpoint (only the towers the task needs, placed on this mesh) -> data -> class prompts ->
embeddings (batches sharded over the mesh's data axis, gathered to host) -> metrics (synergy_jax.evaluation, over
the whole split) -> table, JSON, confusion-matrix PNG (process 0).

Datasets (see experiments/configs/zero_shot.py and docs/zero_shot.md): `demo` (the run's demo test split: image->text
and audio->text zero-shot plus six-direction retrieval), `precomputed` (any precomputed manifest split, or a manifest
CSV, which is precomputed first), `esc50`, `urbansound8k`, `cifar10`, `cifar100`, `oxford_iiit_pet`,
`oxford_flowers102`, `tfds:<name>`, `folder[:image|audio]`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from absl import app, flags



def _option(default, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything the job takes; each field is also a command-line flag (--name=value)."""

    checkpoint: str = _option("runs/demo", "Pre-training run folder (its checkpoints/ holds the state); the default "
                              "is where `python experiments/pretrain.py` writes the demo run.")  # fmt: skip
    dataset: str = _option("demo", "demo | precomputed | esc50 | urbansound8k | cifar10 | cifar100 | oxford_iiit_pet "
                           "| oxford_flowers102 | tfds:<name> | folder[:image|audio]")  # fmt: skip
    data_dir: str | None = _option(None, "Dataset root (ESC-50, UrbanSound8K, class folders), TFDS data_dir, "
                                   "precomputed folder or manifest CSV. demo: default the run's own data.")  # fmt: skip
    split: str | None = _option(None, "TFDS split / precomputed split (default: test).")
    folds: str = _option("all", "ESC-50 / UrbanSound8K folds to evaluate: all, 1-5, 1,3, ...")
    prompts: str = _option("ensemble", "single: the reference's one template; ensemble: CLIP's 80 image / our 16 "
                           "audio templates.")  # fmt: skip
    class_names: str | None = _option(None, "Optional file, one class name per line, in the order you expect; the "
                                      "job stops if the dataset's label metadata disagrees.")  # fmt: skip
    mesh: str = _option("-1x1", "Device mesh DxM (any mesh; the checkpoint's need not match).")
    sharding: str = _option("replicate", "Parameter rules: replicate | fsdp | tp | fsdp_tp.")
    batch_size: int = _option(128, "Global batch (divisible by the data axis and the process count).")
    step: int | None = _option(None, "Checkpoint step (default: the latest).")
    dtype: str = _option("float32", "Compute dtype of the towers (bfloat16 on TPU/GPU is fine).")
    tokenizer: str | None = _option(None, "Tokenizer (hub id or folder); default: the run's.")
    text_mode: str | None = _option(None, "Retrieval text: caption | prompt (default: the run's).")
    out: str | None = _option(None, "JSON path (default: <checkpoint>/zero_shot/<dataset>_<prompts>.json); the "
                              "confusion-matrix PNGs go next to it.")  # fmt: skip
    workers: int = _option(8, "Threads decoding images/audio.")
    progress: bool = _option(True, "Show progress bars.")

    def __post_init__(self):
        if self.prompts not in ("single", "ensemble"):
            raise ValueError(f"--prompts must be single or ensemble, got {self.prompts!r}")


def define_flags() -> None:
    """absl flags mirroring `Options` (only when run as a script, so importing this module defines no flags)."""
    define = {"str": flags.DEFINE_string, "int": flags.DEFINE_integer, "bool": flags.DEFINE_bool}
    for field in dataclasses.fields(Options):
        define[field.type.removesuffix(" | None")](field.name, field.default, field.metadata["help"])


def options_from_flags() -> Options:
    return Options(**{field.name: flags.FLAGS[field.name].value for field in dataclasses.fields(Options)})


import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from data_pipelines import augment, downstream, pipeline  # noqa: E402
from synergy_jax import audio, checkpoint, distributed, evaluation, parallel, text  # noqa: E402
from synergy_jax.distributed import is_main_process, log  # noqa: E402
from synergy_jax.models.synergy import SynergyCLIP, l2_normalize  # noqa: E402



def _load_config_module():
    """experiments/configs/zero_shot.py (experiments/ is a folder of scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent / "configs" / "zero_shot.py"
    spec = importlib.util.spec_from_file_location("zero_shot_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zs_config = _load_config_module()
LOGIT_SCALES = ("logit_scale_it", "logit_scale_ta", "logit_scale_ai")  # tiny; the module's setup declares them
TOWER_GROUP = {"image": "image", "audio": "audio", "text": "text"}
EMBED_METHOD = {"image": SynergyCLIP.embed_image, "audio": SynergyCLIP.embed_audio, "text": SynergyCLIP.embed_text}
INPUT_FIELDS = {"image": ("image",), "audio": ("audio",), "text": ("input_ids", "attention_mask")}




# ================================================================================================ checkpoint


@dataclasses.dataclass
class Model:
    """A restored checkpoint: the module, the parameters it needs on the mesh, and what the run recorded."""

    module: SynergyCLIP
    params: dict
    saved: dict  # the run's config JSON
    step: int
    workdir: Path

    @property
    def config(self) -> dict:
        return self.saved.get("config", {})

    @property
    def max_length(self) -> int:
        return int(self.config.get("data", {}).get("max_length", text.DEFAULT_MAX_LENGTH))


def restore_model(workdir: str, mesh, modalities: Sequence[str], sharding: str, step: int | None, dtype: str) -> Model:
    """Only the towers + projections of `modalities` (and the logit scales) are read from the checkpoint."""
    step = checkpoint.latest_step(workdir, step)
    groups = [TOWER_GROUP[m] for m in modalities] + list(LOGIT_SCALES)
    params, model_config, saved = checkpoint.restore_params(workdir, mesh, groups, rules=sharding, step=step, dtype=dtype)
    return Model(SynergyCLIP(model_config), params, saved, step, Path(workdir).expanduser().absolute())


def run_data_root(model: Model) -> Path:
    """Where a demo run keeps its generated data (raw/ + precomputed/)."""
    data = model.config.get("data", {})
    return Path(data["dir"]) if data.get("dir") else model.workdir / "data"


def resolve_tokenizer(model: Model, override: str | None) -> str:
    """The tokenizer the run trained with: its demo tokenizer, --config.data.tokenizer, or the text tower's id."""
    if override:
        return override
    data, model_spec = model.config.get("data", {}), model.config.get("model", {})
    if data.get("demo"):
        return str(run_data_root(model) / "raw" / "tokenizer")
    name = data.get("tokenizer") or model_spec.get("text")
    if not name:
        raise ValueError("the checkpoint does not record its tokenizer: pass --tokenizer")
    return name


# ================================================================================================ embedding


def gather(x: jax.Array) -> np.ndarray:
    """A global array as one host numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@functools.partial(jax.jit, static_argnames=("config", "modality"))
def _embed(params, *inputs, config, modality: str) -> jax.Array:
    """L2-normalised embeddings of one modality; the output keeps the inputs' batch sharding. One compiled program
    per (model config, modality, shapes, shardings), shared by every call in the process."""
    return l2_normalize(SynergyCLIP(config).apply({"params": params}, *inputs, method=EMBED_METHOD[modality]))


def make_embedder(model: Model, modality: str, mesh) -> Callable:
    """(params, *inputs) -> normalised embeddings, batch-sharded over the mesh's 'data' axis like the inputs."""
    return functools.partial(_embed, config=model.module.config, modality=modality)


def batch_plan(count: int, batch_size: int, mesh) -> tuple[np.ndarray, int]:
    """This process's example indices, padded (with -1) to the same whole number of per-process batches."""
    processes = jax.process_count()
    if batch_size % np.lcm(mesh.shape["data"], processes):
        raise ValueError(f"--batch_size={batch_size} must be divisible by the data axis ({mesh.shape['data']}) and "
                         f"the process count ({processes})")  # fmt: skip
    per_process = batch_size // processes
    mine = np.arange(count)[jax.process_index() :: processes]
    length = pipeline.eval_length(count, per_process, processes)
    return np.concatenate([mine, np.full(length - len(mine), -1, np.int64)]), per_process


def embed_all(
    model: Model, modality: str, mesh, count: int, load_rows: Callable[[np.ndarray], dict[str, np.ndarray]],
    batch_size: int, workers: int, desc: str, progress: bool,
) -> np.ndarray:
    """(count, D) normalised embeddings of examples 0..count-1, in order, computed batch-sharded on the mesh.

    `load_rows(indices)` returns the host inputs of those examples (the next batch is decoded while the device
    runs the current one).
    """  # fmt: skip
    embed = make_embedder(model, modality, mesh)
    indices, per_process = batch_plan(count, batch_size, mesh)
    batches = [indices[i : i + per_process] for i in range(0, len(indices), per_process)]
    out = None
    bar = progress_bar(len(batches), desc, progress)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:

        def prepare(batch_indices: np.ndarray) -> concurrent.futures.Future:
            return pool.submit(load_rows, np.where(batch_indices >= 0, batch_indices, 0))  # padding repeats example 0

        pending = prepare(batches[0]) if batches else None
        for k, batch_indices in enumerate(batches):
            rows = pending.result()
            pending = prepare(batches[k + 1]) if k + 1 < len(batches) else None
            inputs = pipeline.global_batch({f: rows[f] for f in INPUT_FIELDS[modality]}, mesh)
            embeddings = gather(embed(model.params, *(inputs[f] for f in INPUT_FIELDS[modality])))
            where = gather(pipeline.global_batch({"index": batch_indices}, mesh)["index"])
            if out is None:
                out = np.zeros((count, embeddings.shape[1]), np.float32)
            out[where[where >= 0]] = embeddings[where >= 0]
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out


def progress_bar(total: int, desc: str, enabled: bool):
    if not (enabled and is_main_process()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, file=sys.stdout)


def parallel_map(function: Callable, items: Sequence, workers: int) -> list:
    if workers <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


# ================================================================================================ inputs


def image_rows(examples: Sequence, image_size: int, workers: int) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Evaluation image transform as pre-training's: Resize((S, S)) bilinear -> [0, 1] -> CLIP mean/std."""

    def one(index: int) -> np.ndarray:
        return augment.to_normalized_array(augment.resize(examples[int(index)], image_size))

    return lambda indices: {"image": np.stack(parallel_map(one, list(indices), workers))}


def audio_rows(examples: Sequence, fbank: audio.FbankConfig, workers: int) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """16 kHz waveform -> AST features (Kaldi fbank, padded/truncated to the tower's frames), as precompute does."""

    def one(index: int) -> np.ndarray:
        return audio.ast_features(examples[int(index)], fbank)

    return lambda indices: {"audio": np.stack(parallel_map(one, list(indices), workers))}


def text_rows(tokens: dict[str, np.ndarray]) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    return lambda indices: {key: value[indices] for key, value in tokens.items()}


def class_embeddings(
    model, mesh, tokenizer, class_names: Sequence[Sequence[str]], templates, batch_size: int, progress: bool
) -> np.ndarray:
    """(C, D): per class, the mean of its normalised prompt embeddings (every synonym x template), renormalised."""
    prompts, owners = evaluation.prompts_for_classes(class_names, templates)
    tokens = text.tokenize(tokenizer, prompts, model.max_length)
    embedded = embed_all(model, "text", mesh, len(prompts), text_rows(tokens), batch_size, 1, "prompts", progress)
    return evaluation.class_embeddings(embedded, owners, len(class_names))


# ================================================================================================ metrics


def classification_results(queries: np.ndarray, classes: np.ndarray, labels: np.ndarray, class_names, folds=None) -> dict:
    """Top-1/5, per-class accuracy, confusion matrix over the whole split (and per fold when there are folds)."""
    results = evaluation.zero_shot_metrics(queries, classes, labels)
    predictions = np.argmax(queries @ classes.T, axis=1)
    matrix = evaluation.confusion_matrix(labels, predictions, len(class_names))
    per_class = evaluation.class_accuracies(matrix)
    results["num_examples"] = int(len(labels))
    results["per_class"] = {name: (None if np.isnan(a) else float(a)) for name, a in zip(class_names, per_class)}
    results["confusion_matrix"] = matrix.tolist()
    if folds is not None and len(np.unique(folds)) > 1:
        by_fold = {int(f): evaluation.zero_shot_metrics(queries[folds == f], classes, labels[folds == f]) for f in np.unique(folds)}
        results["folds"] = {str(f): m for f, m in by_fold.items()}
        top1 = np.asarray([m["top1"] for m in by_fold.values()])
        results["fold_mean_top1"], results["fold_std_top1"] = float(top1.mean()), float(top1.std())
    return results


def confusion_image(matrix: np.ndarray, class_names: Sequence[str], title: str):
    """A row-normalised confusion matrix as a PIL image (no plotting dependency): rows true, columns predicted."""
    from PIL import Image, ImageDraw, ImageFont

    classes = len(class_names)
    cell = max(4, min(28, 900 // max(classes, 1)))
    show_names = cell >= 8
    font = ImageFont.load_default()
    margin = (min(160, 6 * max(len(n) for n in class_names) + 8) if show_names else 10) + 10
    side = classes * cell
    image = Image.new("RGB", (margin + side + 10, margin + side + 30), "white")
    draw = ImageDraw.Draw(image)
    totals = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    shares = matrix / totals
    for i in range(classes):
        for j in range(classes):
            level = int(255 * (1 - shares[i, j]))
            x, y = margin + j * cell, 30 + margin - 10 + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(level, level, 255))
    if show_names:
        for i, name in enumerate(class_names):
            label = name[:26]
            draw.text((4, 30 + margin - 10 + i * cell + cell // 2 - 5), label, fill="black", font=font)
            strip = Image.new("RGBA", (margin - 10, cell), (255, 255, 255, 0))
            ImageDraw.Draw(strip).text((2, cell // 2 - 5), label, fill="black", font=font)
            strip = strip.rotate(90, expand=True)
            image.paste(strip, (margin + i * cell, 30), strip)
    draw.text((4, 4), f"{title} (rows: true, columns: predicted, row-normalised)", fill="black", font=font)
    return image


# ================================================================================================ tasks


def load_classification_set(kind: str, spec: dict, options: Options) -> downstream.ClassificationSet:
    data_dir = options.data_dir
    if not data_dir:
        raise ValueError(f"--dataset={options.dataset} needs --data_dir (see docs/zero_shot.md)")
    data_dir = str(Path(data_dir).expanduser())
    if kind == "esc50":
        return downstream.read_esc50(data_dir, options.folds)
    if kind == "urbansound8k":
        return downstream.read_urbansound8k(data_dir, options.folds)
    if kind == "tfds":
        return downstream.read_tfds(spec["tfds_name"], data_dir, options.split or spec.get("split", "test"))
    if kind == "folder":
        return downstream.read_folder(data_dir, spec.get("modality"))
    raise ValueError(f"unknown dataset kind {kind!r}")


def parse_dataset(name: str) -> tuple[str, dict]:
    if name in zs_config.DATASETS:
        kind, spec = zs_config.DATASETS[name]
        return kind, dict(spec)
    prefix, _, rest = name.partition(":")
    if prefix == "tfds" and rest:
        return "tfds", {"tfds_name": rest, "split": "test"}
    if prefix == "folder":
        if rest not in ("", "image", "audio"):
            raise ValueError(f"--dataset={name}: use folder, folder:image or folder:audio")
        return "folder", {"modality": rest or None}
    raise ValueError(f"unknown --dataset={name!r}; known: {sorted(zs_config.DATASETS)}, tfds:<name>, folder[:image|audio]")


def run_classification(dataset: downstream.ClassificationSet, model: Model, mesh, tokenizer, options: Options) -> dict:
    """One modality->text zero-shot task over a whole ClassificationSet."""
    if options.class_names:
        downstream.check_class_names(dataset.class_names, downstream.read_class_list(options.class_names), dataset.name)
    cfg = model.module.config
    if dataset.modality == "image":
        load_rows = image_rows(dataset.examples, cfg.vision.image_size, options.workers)
    else:
        fbank = audio.FbankConfig(max_frames=cfg.audio.max_length, num_mel_bins=cfg.audio.num_mel_bins)
        load_rows = audio_rows(dataset.examples, fbank, options.workers)
    templates = zs_config.PROMPT_SETS[options.prompts][dataset.modality]
    names = [[downstream.prompt_name(name)] for name in dataset.class_names]
    classes = class_embeddings(model, mesh, tokenizer, names, templates, options.batch_size, options.progress)
    queries = embed_all(model, dataset.modality, mesh, len(dataset), load_rows, options.batch_size, 1,
                        f"{dataset.modality} {dataset.name}", options.progress)  # fmt: skip
    task = f"{dataset.modality}->text"
    return {
        "tasks": {task: classification_results(queries, classes, dataset.labels, dataset.class_names, dataset.folds)},
        "class_names": list(dataset.class_names),
        "num_examples": len(dataset),
        "num_templates": len(templates),
        "folds": None if dataset.folds is None else sorted(int(f) for f in np.unique(dataset.folds)),
    }


def precomputed_source(dataset_kind: str, model: Model, options: Options) -> tuple[str, str]:
    """(precomputed folder, split) of the demo test split or of --data_dir; a manifest CSV is precomputed first."""
    from data_pipelines import demo, precompute

    cfg = model.module.config
    frontend = precompute.PrecomputeConfig(
        image_size=cfg.vision.image_size,
        fbank=audio.FbankConfig(max_frames=cfg.audio.max_length, num_mel_bins=cfg.audio.num_mel_bins),
    )
    split = options.split or "test"
    if dataset_kind == "demo":
        root = Path(options.data_dir).expanduser() if options.data_dir else run_data_root(model)

        def generate_if_missing():  # decided on process 0 alone, so every process reaches the same barrier
            if not precompute.metadata_path(root / "precomputed", split).is_file():
                log(f"demo data not found under {root}: generating it there")
                demo.ensure_demo_data(root, frontend)

        distributed.on_main_process("demo data", generate_if_missing)
        return str(root / "precomputed"), split
    if not options.data_dir:
        raise ValueError("--dataset=precomputed needs --data_dir: a precomputed folder or a manifest CSV")
    source = Path(options.data_dir).expanduser()
    if source.suffix == ".csv":
        out = source.parent / "precomputed"
        distributed.on_main_process("precompute", precompute.precompute, source, out, frontend, progress=options.progress)
        return str(out), precompute.split_name(source)
    return str(source), split


def run_tri_modal(dataset_kind: str, model: Model, mesh, tokenizer_path: str, tokenizer, options: Options) -> dict:
    """A precomputed manifest split: image->text and audio->text zero-shot on its labels, and six-way retrieval."""
    from data_pipelines import precompute

    data_dir, split = precomputed_source(dataset_kind, model, options)
    metadata = precompute.load_metadata(data_dir, split)
    labels = tuple(metadata["labels"])
    config = model.config
    text_mode = options.text_mode or config.get("data", {}).get("text_mode", "caption")
    processes = jax.process_count()
    _, per_process = batch_plan(metadata["num_examples"], options.batch_size, mesh)
    pipe = pipeline.PipelineConfig(
        data_dir=data_dir, split=split, batch_size=per_process, train=False, text_mode=text_mode,
        tokenizer=tokenizer_path, max_length=model.max_length, image_size=model.module.config.vision.image_size,
        seed=int(config.get("seed", 0)), label_names=labels, read_threads=2, prefetch=2,
        process_index=jax.process_index(), process_count=processes,
    )  # fmt: skip
    embedders = {m: make_embedder(model, m, mesh) for m in ("image", "text", "audio")}
    parts: dict[str, list] = {"image": [], "text": [], "audio": [], "row_id": [], "label_id": [], "valid": []}
    steps = pipeline.eval_length(metadata["num_examples"], per_process, processes) // per_process
    bar = progress_bar(steps, f"{dataset_kind} {split}", options.progress)
    for host_batch in pipeline.build_dataset(pipe, tokenizer):
        batch = pipeline.global_batch({**host_batch, "row": host_batch["row_id"]}, mesh)
        for modality in ("image", "text", "audio"):
            parts[modality].append(gather(embedders[modality](model.params, *(batch[f] for f in INPUT_FIELDS[modality]))))
        for field, key in (("row_id", "row"), ("label_id", "label_id"), ("valid", "valid")):
            parts[field].append(gather(batch[key]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    valid = np.concatenate(parts.pop("valid"))
    columns = {name: np.concatenate(chunks)[valid] for name, chunks in parts.items()}
    order = np.argsort(columns["row_id"], kind="stable")  # the same order on any mesh / process count
    columns = {name: value[order] for name, value in columns.items()}
    names = evaluation.class_names_from_labels(labels)  # every synonym of a VGGSound-style label
    tasks = {}
    for modality in ("image", "audio"):
        templates = zs_config.PROMPT_SETS[options.prompts][modality]
        classes = class_embeddings(model, mesh, tokenizer, names, templates, options.batch_size, options.progress)
        tasks[f"{modality}->text"] = classification_results(columns[modality], classes, columns["label_id"], labels)
    retrieval = evaluation.retrieval_metrics({m: columns[m] for m in ("image", "text", "audio")})
    return {
        "tasks": tasks,
        "retrieval": retrieval,
        "retrieval_text_mode": text_mode,
        "class_names": list(labels),
        "num_examples": int(valid.sum()),
        "num_templates": {m: len(zs_config.PROMPT_SETS[options.prompts][m]) for m in ("image", "audio")},
        "data": {"dir": data_dir, "split": split, "content_hash": metadata.get("content_hash")},
    }


# ================================================================================================ output


def default_out(workdir: str, dataset: str, prompts: str, folds: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)
    if folds and folds != "all":
        slug += "_folds" + re.sub(r"[^0-9]+", "-", folds)
    return Path(workdir).expanduser() / "zero_shot" / f"{slug}_{prompts}.json"


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
        for query, candidate in evaluation.DIRECTIONS:
            key = f"retrieval/{query}->{candidate}"
            print(f"{query + '->' + candidate:16s} " + " ".join(f"{100 * r[f'{key}/R@{k}']:6.2f}" for k in (1, 5, 10))
                  + f" {r[f'{key}/median_rank']:12.1f}")  # fmt: skip


def write_outputs(results: dict, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for task, metrics in results["tasks"].items():
        png = out.with_name(f"{out.stem}_{task.split('->')[0]}_confusion.png")
        title = f"{results['dataset']} {task} top-1 {100 * metrics['top1']:.1f}%"
        confusion_image(np.asarray(metrics["confusion_matrix"]), results["class_names"], title).save(png)
        metrics["confusion_png"] = str(png)
        written.append(png)
    out.write_text(json.dumps(results, indent=1))
    return [out] + written


# ================================================================================================ the job


def run(options: Options) -> dict:
    """The whole job; returns the results (also written to JSON + PNGs by process 0)."""
    started = time.time()
    dataset, prompts = options.dataset, options.prompts
    mesh = parallel.make_mesh(options.mesh)
    kind, spec = parse_dataset(dataset)
    classification = None
    if kind in ("demo", "precomputed"):
        modalities = ("image", "text", "audio")
    else:
        classification = load_classification_set(kind, spec, options)
        modalities = (classification.modality, "text")
    model = restore_model(options.checkpoint, mesh, modalities, options.sharding, options.step, options.dtype)
    tokenizer_path = resolve_tokenizer(model, options.tokenizer)
    tokenizer = text.load_tokenizer(tokenizer_path)
    log(f"zero-shot {dataset}: checkpoint {model.workdir} step {model.step} ({', '.join(modalities)} towers), mesh "
        f"{dict(mesh.shape)}, {jax.device_count()} {jax.devices()[0].platform} device(s), {prompts} prompts")  # fmt: skip
    if classification is not None:
        results = run_classification(classification, model, mesh, tokenizer, options)
    else:
        results = run_tri_modal(kind, model, mesh, tokenizer_path, tokenizer, options)
    results = {
        "dataset": dataset if classification is None else classification.name,
        "checkpoint": str(model.workdir),
        "step": model.step,
        "prompts": prompts,
        "mesh": dict(mesh.shape),
        "devices": jax.device_count(),
        "protocol": "whole split, every example once (the reference drew 128 examples with replacement)",
        **results,
        "wall_seconds": time.time() - started,
    }
    if is_main_process():
        path = Path(options.out) if options.out else default_out(options.checkpoint, dataset, prompts, options.folds)
        results["outputs"] = [str(p) for p in write_outputs(results, path)]
    return results


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.default_log_verbosity()

    def start() -> dict:
        distributed.initialize(distributed.distributed_arguments())  # env / TPU pod / SLURM / MPI; None: 1 process
        return run(options_from_flags())

    results = distributed.run_or_exit(start)
    if is_main_process():
        print_table(results)
        print("\nwrote " + ", ".join(results["outputs"]))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=distributed.parse_flags_or_exit)
