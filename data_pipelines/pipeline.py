"""Grain input pipelines over precomputed shards, for pre-training (train) and evaluation.

    train: shards -> this process's slice -> shuffle (a seed per slice) -> repeat (reshuffled each epoch) -> decode
           + augment (image, audio) + text (prompt or caption) + tokenise, all seeded per element -> batch (drop
           remainder)
    eval:  shards -> this process's slice -> pad to whole batches -> decode + tokenise, deterministic (a prompt
           is still a random template and synonym, but seeded by row id: the same every evaluation)
           -> batch with a `valid` mask

A host batch is a dict of numpy arrays, the layout the model consumes:
    image           float32 (B, S, S, 3)   NHWC, CLIP mean/std normalised
    audio           float32 (B, frames, mel_bins)   AST features
    input_ids       int32   (B, max_length)
    attention_mask  int32   (B, max_length)
    valid           bool    (B,)           False on eval padding; all True in training
    row_id          int64   (B,)           manifest row (-1 on padding)
    label_id        int32   (B,)           index into `label_names` when given (-1: padding or unknown label)
Training batches with `augment_on="device"` carry the raw record instead, augmented inside the train step by
`synergy_jax.device_augment.augment_batch` (about 8 ms of a host core per example less, docs/performance.md):
    image           uint8   (B, S, S, 3)   resized, not augmented
    audio           float16 (B, frames, mel_bins)   the stored features
    audio_frames    int32   (B,)           real (not padding) frames
    augment_seed    uint32  (B, 2)         drawn from the element's Grain generator
`global_batch(batch, mesh)` turns one into global `jax.Array`s sharded over the mesh's 'data' axis.

Iterators are Grain DatasetIterators: `get_state()` / `set_state()` resume exactly (saved with checkpoints).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from data_pipelines import augment, precompute, records
from synergy_jax import audio, augmentation, distributed, parallel, text
from synergy_jax.errors import CheckpointError, SetupError

HOST_ONLY_FIELDS = ("row_id",)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Knobs of one pipeline; sizes of images and audio come from the precompute metadata."""

    data_dir: str
    split: str
    batch_size: int  # per process
    train: bool
    text_mode: str = "caption"  # or "prompt"
    tokenizer: str = text.DEFAULT_TOKENIZER  # hub id or saved directory
    max_length: int = text.DEFAULT_MAX_LENGTH
    image_size: int = 224
    seed: int = 0
    num_epochs: int | None = None  # train: None repeats forever; eval always one pass
    augment_image: bool = True  # train only (unless reference_eval_augmentation)
    augment_audio: bool = True  # train only (unless reference_eval_augmentation)
    audio_augment_p: float = augmentation.AUDIO_P
    reference_eval_augmentation: bool = False  # the reference augmented val/test too (docs/reference.md bug 21, 27)
    augment_on: str = "host"  # or "device": training examples carry raw fields for synergy_jax.device_augment
    label_names: tuple[str, ...] | None = None
    workers: int = 0  # Grain worker processes; 0 = threads in this process
    read_threads: int = 2  # threads computing batches (per worker process when workers > 0)
    prefetch: int = 4  # batches buffered ahead (at least read_threads)
    process_index: int | None = None  # default: jax.process_index()
    process_count: int | None = None  # default: jax.process_count()

    def __post_init__(self):
        if self.text_mode not in text.TEXT_MODES:
            raise ValueError(f"text_mode must be one of {text.TEXT_MODES}, got {self.text_mode!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if problem := augmentation_problem(self.augment_on, self.augment_image, self.augment_audio):
            raise ValueError(problem)

    @property
    def augments(self) -> bool:
        return self.train or self.reference_eval_augmentation


AUGMENT_ON = ("host", "device")
TOKEN_CACHE_SIZE = 100_000  # distinct texts remembered per transform (prompts: labels x templates; captions: rows)


def augmentation_problem(augment_on: str, augment_image: bool, augment_audio: bool) -> str | None:
    """What is wrong with these augmentation settings (a message naming the fields), or None."""
    if augment_on not in AUGMENT_ON:
        return f"augment_on must be one of {list(AUGMENT_ON)}, got {augment_on!r}"
    if augment_on == "device" and not (augment_image and augment_audio):
        return ("augment_on=device augments both images and audio: keep augment_image and augment_audio on, or "
                "augment on the host (augment_on=host)")
    return None


class ExampleTransform:
    """bytes record (+ validity) -> one model example. Module-level and picklable, for Grain worker processes."""

    def __init__(self, config: PipelineConfig, fbank: audio.FbankConfig, tokenizer):
        self.config = config
        self.fbank = fbank
        self.tokenizer = tokenizer
        self.label_index = {name: i for i, name in enumerate(config.label_names or ())}
        self._tokens: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, element: tuple[bytes, bool], rng: np.random.Generator | None = None) -> dict:
        data, valid = element
        fields = records.decode_example(data)
        if rng is None:  # evaluation: fixed per row, so every evaluation sees the same prompt
            rng = np.random.default_rng([self.config.seed, fields["row_id"]])
        augments = self.config.augments
        if augments and self.config.train and self.config.augment_on == "device":  # only the train step augments
            raw = self._raw(fields, rng)
            return {**raw, **self._text_and_ids(fields, valid, rng)}
        image = records.image_of(fields)
        if augments and self.config.augment_image:
            image = augment.augment_image(image, self.config.image_size, rng)
        else:
            image = augment.resize(image, self.config.image_size)
        features = fields["audio"]
        if augments and self.config.augment_audio:
            features = augment.augment_audio(
                features, fields["audio_frames"], rng, self.fbank, self.config.audio_augment_p
            )
        return {"image": augment.to_normalized_array(image), "audio": np.asarray(features, np.float32),
                **self._text_and_ids(fields, valid, rng)}  # fmt: skip

    def _text_and_ids(self, fields: dict, valid: bool, rng: np.random.Generator) -> dict:
        words = text.example_text(self.config.text_mode, fields["label"], fields["caption"], rng)
        input_ids, attention_mask = self._tokenized(words)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "valid": np.bool_(valid),
            "row_id": np.int64(fields["row_id"] if valid else -1),
            "label_id": np.int32(self.label_index.get(fields["label"], -1) if valid else -1),
        }

    def _tokenized(self, words: str) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) of `words`, remembered: prompts repeat (labels x templates), and the
        tokenizer runs one thread at a time (text.tokenize's lock), 0.4 ms an example."""
        if (cached := self._tokens.get(words)) is None:
            tokens = text.tokenize(self.tokenizer, words, self.config.max_length)
            cached = tokens["input_ids"][0], tokens["attention_mask"][0]
            for array in cached:
                array.setflags(write=False)  # shared by every example with these words
            if len(self._tokens) >= TOKEN_CACHE_SIZE:
                self._tokens.clear()
            self._tokens[words] = cached
        return cached

    def _raw(self, fields: dict, rng: np.random.Generator) -> dict:
        """What `device_augment.augment_batch` augments in the step: uint8 pixels, the stored float16 features, the
        real frame count and a seed from Grain's generator (so a resumed run draws the same augmentations)."""
        size = self.config.image_size
        pixels = fields["image"]  # raw records at the model's size go through untouched
        if not (isinstance(pixels, np.ndarray) and pixels.shape == (size, size, 3)):
            pixels = np.asarray(augment.resize(records.image_of(fields), size), np.uint8)
        return {"image": pixels, "audio": np.asarray(fields["audio"], np.float16),
                "audio_frames": np.int32(fields["audio_frames"]),
                "augment_seed": rng.integers(0, 2**32, 2, dtype=np.uint32)}  # fmt: skip


class _TrainElement:
    """Training records are always real."""

    def __call__(self, data: bytes) -> tuple[bytes, bool]:
        return data, True


class PaddedMapDataset(grain.MapDataset):
    """A finite dataset padded to `length` with invalid copies of `filler`: every process gets whole batches."""

    def __init__(self, parent: grain.MapDataset, length: int, filler: bytes):
        super().__init__(parent)
        self._real = len(parent)
        self._length = length
        self._filler = filler

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"PaddedMapDataset(length={self._length})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if index >= self._length:
            raise IndexError(index)
        return (self._parent[index], True) if index < self._real else (self._filler, False)


def _process_slice(config: PipelineConfig) -> tuple[int, int]:
    if config.process_index is not None and config.process_count is not None:
        return config.process_index, config.process_count
    import jax

    return jax.process_index(), jax.process_count()


def slice_seed(seed: int, index: int) -> int:
    """The shuffle and augmentation seed of input slice `index` (slice 0 keeps `seed`). With one seed for all
    slices, the k-th example of every slice would sit at the same shuffled position and get the same random crop,
    flips, audio ops and prompt: `count` neighbouring manifest rows would share every global batch, forever."""
    return seed + 1_000_003 * index


def eval_length(num_examples: int, batch_size: int, process_count: int) -> int:
    """Examples per process after padding: the same whole number of batches on every process."""
    return parallel.padded_length(num_examples, batch_size, process_count)


def build_dataset(config: PipelineConfig, tokenizer=None, source=None) -> grain.IterDataset:
    """The Grain dataset of host batches for `config` (see module docstring). Iterate with iter(...).
    `source`: a random-access sequence of the split's records to read instead of its shards (benchmarks)."""
    metadata = precompute.load_metadata(config.data_dir, config.split)
    paths = precompute.shard_paths(config.data_dir, metadata)
    if not paths:
        raise ValueError(f"{config.data_dir}/{config.split}: no examples (see skipped rows in its metadata)")
    fbank = audio.FbankConfig(**metadata["config"]["fbank"])
    tokenizer = tokenizer if tokenizer is not None else text.load_tokenizer(config.tokenizer)
    transform = ExampleTransform(config, fbank, tokenizer)
    source = source if source is not None else grain.sources.ArrayRecordDataSource(paths)
    index, count = _process_slice(config)
    dataset = grain.MapDataset.source(source)[index::count]
    if config.train:
        if len(dataset) < config.batch_size:
            raise ValueError(
                f"process {index} has {len(dataset)} training examples, fewer than one batch of {config.batch_size}"
            )
        dataset = dataset.seed(slice_seed(config.seed, index)).shuffle().repeat(config.num_epochs)
        dataset = dataset.map(_TrainElement())
        dataset = dataset.random_map(transform)
    else:
        length = eval_length(len(source), config.batch_size, count)
        dataset = PaddedMapDataset(dataset, length, filler=source[0]).map(transform)
    dataset = dataset.batch(config.batch_size, drop_remainder=config.train)
    dataset = dataset.to_iter_dataset(
        grain.ReadOptions(
            num_threads=config.read_threads, prefetch_buffer_size=max(config.prefetch, config.read_threads)
        )
    )
    if config.workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # grain 0.2.18 reads absl flags in its workers (google/grain#1355)
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.workers, per_worker_buffer_size=config.prefetch),
            worker_init_fn=distributed.ignore_interrupts,  # a Ctrl-C is the training loop's to handle
        )
    return dataset


def global_batch(batch: dict, mesh) -> dict:
    """Host batch -> global jax.Arrays sharded over the mesh's 'data' axis; host-only fields are dropped."""
    return parallel.global_batch({k: v for k, v in batch.items() if k not in HOST_ONLY_FIELDS}, mesh)


class SlicedInput:
    """One process's share of a global training batch, assembled from input slices (a resumable iterator).

    The data order depends only on the number of slices, so a run with a fixed number gives the same batches on
    one process or on any number of processes that divides it. `configs` are this process's slices in order; each
    batch is their batches concatenated.
    """

    def __init__(self, configs: list[PipelineConfig], tokenizer):
        self.iterators = [iter(build_dataset(c, tokenizer)) for c in configs]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(iterator) for iterator in self.iterators]
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

    def get_state(self) -> dict:
        return {"slices": [iterator.get_state() for iterator in self.iterators]}

    def set_state(self, state: dict) -> None:
        if len(state["slices"]) != len(self.iterators):
            raise CheckpointError(
                f"the checkpoint's input state has {len(state['slices'])} slices for this process, this run "
                f"{len(self.iterators)}: keep --config.data.input_slices and the number of processes, or set "
                "--config.resume_data=False"
            )
        for iterator, slice_state in zip(self.iterators, state["slices"]):
            iterator.set_state(slice_state)


def input_slices(requested: int) -> int:
    """The input slices a global training batch is assembled from: `requested`, or one per process when 0."""
    import jax

    return requested or jax.process_count()


def slices_problem(slices: int, batch_size: int) -> str | None:
    """Why `slices` input slices cannot make global batches of `batch_size` here, or None."""
    import jax

    processes = jax.process_count()
    if slices % processes or batch_size % slices:
        return (f"input_slices={slices} must be a multiple of the {processes} processes and divide the batch of "
                f"{batch_size}")
    return None


def steps_per_epoch(num_examples: int, batch_size: int, slices: int) -> int:
    """Global batches in an epoch: every input slice's examples in whole batches of its share."""
    steps = (num_examples // slices) // (batch_size // slices)
    if steps == 0:
        raise SetupError(f"{num_examples} training examples are fewer than one batch of {batch_size}")
    return steps


def sliced_input(config: PipelineConfig, slices: int, tokenizer) -> SlicedInput:
    """This process's slices of a training input. `config.batch_size` is the global batch; each of the `slices` input slices (a multiple of the process count)
    yields `batch_size // slices` rows, and this process reads its consecutive share of them.
    """
    import jax

    per_process = slices // jax.process_count()
    first = jax.process_index() * per_process
    configs = [dataclasses.replace(config, batch_size=config.batch_size // slices, process_index=i, process_count=slices)
               for i in range(first, first + per_process)]  # fmt: skip
    return SlicedInput(configs, tokenizer)
