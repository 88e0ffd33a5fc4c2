"""`embed_split`: the one loop that runs a model over a whole evaluation split, shared by every evaluator.

Batches come from anywhere (a Grain eval pipeline, `indexed_batches` over decoded files); each holds this
process's rows, a `valid` mask for the padding that makes every process run the same number of equal batches, and
optionally `row_id`. The function runs on the mesh (rows split over 'data'), every output is gathered to host on
every process, padding is dropped and rows are put in `row_id` order: the result is the same on any mesh and any
number of processes.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from synergy_jax import parallel, text
from synergy_jax.distributed import is_main_process
from synergy_jax.models.synergy import SynergyCLIP, l2_normalize

Columns = dict[str, np.ndarray]
INPUT_FIELDS = {"image": ("image",), "audio": ("audio",), "text": ("input_ids", "attention_mask")}


def embed_split(
    fn: Callable[[dict[str, jax.Array]], Mapping[str, jax.Array]],
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    *,
    keep: Sequence[str] = (),
    samples: Sequence[str] = (),
    num_samples: int = 0,
    total: int | None = None,
    desc: str | None = None,
) -> Columns:
    """`fn(batch)` (per-example outputs, batch-sharded) over every batch -> host columns of the real rows.

    `keep`: batch fields returned beside the outputs (e.g. 'label_id'). `samples`: outputs kept only for the first
    `num_samples` real rows (reconstructed images: the metrics are per example, only a few pictures are shown).
    `desc`: a progress bar over `total` batches on process 0.
    """
    parts: dict[str, list[np.ndarray]] = {}
    kept = 0
    bar = _progress(total, desc)
    for host_batch in batches:
        batch = parallel.global_batch(_device_fields(host_batch), mesh)
        outputs = {name: parallel.gather(value) for name, value in fn(batch).items()}
        outputs.update({name: parallel.gather(batch[name]) for name in (*keep, "valid", "row_id") if name in batch})
        valid = outputs.pop("valid").astype(bool)
        for name, value in outputs.items():
            if name in samples and kept >= num_samples:
                continue
            parts.setdefault(name, []).append(value[valid])
        kept += int(valid.sum())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    columns = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    return _in_row_order(columns, samples)


def _device_fields(host_batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    fields = dict(host_batch)
    if "row_id" in fields:  # int64 on the host; int32 on devices (JAX's default integer)
        fields["row_id"] = np.asarray(fields["row_id"], np.int32)
    return fields


def _in_row_order(columns: Columns, samples: Sequence[str]) -> Columns:
    """Rows sorted by `row_id` (stable), so the order does not depend on the mesh or the process count."""
    if "row_id" not in columns:
        return columns
    order = np.argsort(columns["row_id"], kind="stable")
    return {name: value if name in samples else value[order] for name, value in columns.items()}


def _progress(total: int | None, desc: str | None):
    if desc is None or not is_main_process():
        return None
    from synergy_jax import progress

    return progress.bar(total=total, desc=desc, unit="batch")


def indexed_batches(
    count: int, batch_size: int, mesh: Mesh, load_rows: Callable[[np.ndarray], dict[str, np.ndarray]], workers: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of examples 0..count-1 as host batches of `load_rows(indices)` plus `row_id`/`valid`.

    `batch_size` is global. Padding rows repeat example 0 (and are marked invalid). The next batch is prepared in a
    thread pool of `workers` while the device runs the current one.
    """
    processes = jax.process_count()
    if batch_size % np.lcm(mesh.shape["data"], processes):
        raise ValueError(f"batch size {batch_size} must be divisible by the data axis ({mesh.shape['data']}) and "
                         f"the process count ({processes})")  # fmt: skip
    chunks = _process_batches(count, batch_size)

    def load(chunk: np.ndarray) -> dict[str, np.ndarray]:
        return {**load_rows(np.where(chunk >= 0, chunk, 0)), "row_id": chunk, "valid": chunk >= 0}

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        pending = pool.submit(load, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            batch = pending.result()
            pending = pool.submit(load, chunks[k + 1]) if k + 1 < len(chunks) else None
            yield batch


def _process_batches(count: int, batch_size: int) -> list[np.ndarray]:
    """This process's example indices (every process-th from its own), padded with -1 to the same whole number of
    per-process batches on every process, cut into batches."""
    processes = jax.process_count()
    per_process = batch_size // processes
    mine = np.arange(count)[jax.process_index() :: processes]
    length = parallel.padded_length(count, per_process, processes)
    indices = np.concatenate([mine, np.full(length - len(mine), -1, np.int64)])
    return [indices[i : i + per_process] for i in range(0, len(indices), per_process)]


def batch_count(count: int, batch_size: int) -> int:
    """How many batches `indexed_batches` yields (for progress bars)."""
    return len(_process_batches(count, batch_size))


def embed_all_modalities(model: SynergyCLIP, params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Normalised image, text and audio embeddings of a tri-modal batch (deterministic), batch-sharded; traced on
    the parameters' mesh (`parallel.on_mesh`)."""
    return _on_params_mesh(all_modalities_program, params)(model, params, batch)


def all_modalities_program(platform: str) -> Callable:
    """The jitted `(model, params, batch) -> embeddings` of `embed_all_modalities`, compiled with `platform`'s
    options (without them XLA:CPU's forward of the side-by-side towers runs 1.3x longer, docs/performance.md)."""
    return parallel.shared_jit(_embed_all, platform, ("model",))


def _embed_all(model: SynergyCLIP, params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    embeddings, _ = model.apply({"params": params}, batch, deterministic=True)
    return embeddings


def _embed_one(model: SynergyCLIP, params, batch: dict[str, jax.Array], modality: str) -> jax.Array:
    method = {"image": SynergyCLIP.embed_image, "audio": SynergyCLIP.embed_audio, "text": SynergyCLIP.embed_text}
    inputs = (batch[field] for field in INPUT_FIELDS[modality])
    return l2_normalize(model.apply({"params": params}, *inputs, method=method[modality]))


def modality_embedder(model: SynergyCLIP, params, modality: str) -> Callable[[dict[str, jax.Array]], dict]:
    """`batch -> {modality: normalised embeddings}` through one tower and its projection (one compiled program per
    model config, modality and shapes, shared by every call in the process), traced on the parameters' mesh."""
    embed_one = _on_params_mesh(one_modality_program, params)
    return lambda batch: {modality: embed_one(model, params, batch, modality)}


def one_modality_program(platform: str) -> Callable:
    """The jitted `(model, params, batch, modality) -> embeddings` of `modality_embedder` for `platform`."""
    return parallel.shared_jit(_embed_one, platform, ("model", "modality"))


def _on_params_mesh(program_for: Callable[[str], Callable], params) -> Callable:
    """`program_for(platform)` for the platform of the parameters' mesh, traced on that mesh."""
    mesh = parallel.mesh_of(params)
    return parallel.on_mesh(program_for(parallel.platform_of(mesh)), mesh)


def prompt_embedder(
    model: SynergyCLIP, params, mesh: Mesh, tokenizer, max_length: int, batch_size: int
) -> Callable[[Sequence[str]], np.ndarray]:
    """`prompts -> (N, D)` normalised text embeddings, in batches of `batch_size` over the mesh."""
    embed = modality_embedder(model, params, "text")

    def embed_prompts(prompts: Sequence[str]) -> np.ndarray:
        tokens = text.tokenize(tokenizer, list(prompts), max_length)
        rows = lambda indices: {key: value[indices] for key, value in tokens.items()}  # noqa: E731
        return embed_split(embed, indexed_batches(len(prompts), batch_size, mesh, rows), mesh)["text"]

    return embed_prompts
