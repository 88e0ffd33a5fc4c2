"""Fine-tuning inputs (data_pipelines/finetune_input.py) on tiny generated image, audio and text-pair sets: layout,
normalisation, seeded order and augmentation, resume, per-process slicing, eval coverage, unreadable files,
the reference's image presets and waveform augmentation, and the k-fold / hold-out splits."""

import dataclasses
import logging

import numpy as np
import pytest
from PIL import Image

from data_pipelines import augment, demo
from data_pipelines import finetune_input as fi
from data_pipelines.downstream import ClassificationSet, DatasetError, ImageFiles
from synergy_jax import audio, augmentation

SIZE = 16
FBANK = audio.FbankConfig(max_frames=48, num_mel_bins=16)
N = 12  # examples per set


def picture(index: int) -> Image.Image:
    """A 20 x 14 image, different per index, with no flip symmetry (so flips show)."""
    y, x = np.mgrid[0:14, 0:20]
    pixels = np.stack([8 * x + 5 * index, 12 * y + 3 * index, (x * y + 17 * index) % 200], axis=-1)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def tone(index: int, seconds: float = 0.25) -> np.ndarray:
    t = np.arange(int(16_000 * seconds)) / 16_000
    rng = np.random.default_rng(index)
    return (0.3 * np.sin(2 * np.pi * (300 + 90 * index) * t) + 0.01 * rng.normal(size=t.size)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PairSet:
    """What the fine-tuning input reads of glue.TextPairSet."""

    name: str
    text_a: tuple
    text_b: tuple | None
    labels: np.ndarray


@pytest.fixture(scope="module")
def images():
    return ClassificationSet(name="tiny-images", modality="image", class_names=("a", "b", "c"),
                             labels=np.arange(N) % 3, examples=[picture(i) for i in range(N)])


@pytest.fixture(scope="module")
def sounds():
    return ClassificationSet(name="tiny-audio", modality="audio", class_names=("a", "b"), labels=np.arange(N) % 2,
                             examples=[tone(i) for i in range(N)], folds=np.arange(N) % 3 + 1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "not", "good", "bad", "movie"]
    folder = tmp_path_factory.mktemp("tokenizer")
    demo.train_tokenizer([" ".join(words)] * 4, folder, vocab_size=300)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def config(modality="image", **overrides):
    defaults = {"modality": modality, "image_size": SIZE, "fbank": FBANK, "max_length": 12, "read_threads": 2,
                "prefetch": 2}
    return fi.FinetuneInputConfig(**{**defaults, **overrides})


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def eval_rows(examples_set, indices, cfg, tokenizer=None) -> dict[int, dict]:
    """row_id -> that row of every field, over all eval batches of one process (valid rows only)."""
    rows = {}
    for batch in fi.eval_input(examples_set, indices, cfg, 4, 0, 1, tokenizer=tokenizer):
        for r in np.flatnonzero(batch["valid"]):
            rows[int(batch["row_id"][r])] = {key: value[r] for key, value in batch.items()}
    return rows


def clean_image(examples_set, index, mean=augmentation.CLIP_MEAN, std=augmentation.CLIP_STD):
    resized = examples_set.examples[index].resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return (np.asarray(resized, np.float32) / 255 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ----------------------------------------------------------------------------------------------- layout


def test_image_batches_layout_and_clip_normalisation(images):
    batch = next(fi.train_input(images, np.arange(N), config(), 4, 0, 1))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)
    indices = np.array([3, 7, 1, 10, 5])
    rows = eval_rows(images, indices, config())
    assert sorted(rows) == list(range(len(indices)))
    for position, row in rows.items():
        assert set(row) == {"image", "label", "valid", "row_id"}
        np.testing.assert_allclose(row["image"], clean_image(images, indices[position]), atol=1e-6)
        assert row["label"] == images.labels[indices[position]] and row["row_id"].dtype == np.int64


def test_audio_batches_are_ast_features(sounds):
    batch = next(fi.train_input(sounds, np.arange(N), config("audio"), 4, 0, 1))
    assert set(batch) == {"audio", "label"}
    assert batch["audio"].shape == (4, FBANK.max_frames, FBANK.num_mel_bins) and batch["audio"].dtype == np.float32
    rows = eval_rows(sounds, np.arange(N), config("audio"))
    for index, row in rows.items():
        np.testing.assert_array_equal(row["audio"], audio.ast_features(sounds.examples[index], FBANK))


def test_text_pairs_single_sentences_and_regression_labels(tokenizer):
    first, second = tuple(f"the cat sat {i}" for i in range(N)), tuple(f"a dog {i} is good" for i in range(N))
    pairs = PairSet("pairs", first, second, np.linspace(0, 5, N).astype(np.float32))
    batch = next(fi.train_input(pairs, np.arange(N), config("text"), 4, 0, 1, tokenizer=tokenizer))
    assert set(batch) == {"input_ids", "attention_mask", "label"}
    assert batch["input_ids"].shape == (4, 12) and batch["input_ids"].dtype == np.int32
    assert batch["label"].dtype == np.float32
    rows = eval_rows(pairs, np.arange(N), config("text"), tokenizer=tokenizer)
    for i, row in rows.items():
        expected = tokenizer(pairs.text_a[i], pairs.text_b[i], max_length=12, padding="max_length", truncation=True)
        np.testing.assert_array_equal(row["input_ids"], expected["input_ids"])
        np.testing.assert_array_equal(row["attention_mask"], expected["attention_mask"])
        assert row["label"] == pytest.approx(pairs.labels[i])
    single = PairSet("single", pairs.text_a, None, np.arange(N) % 2)
    rows = eval_rows(single, np.arange(N), config("text"), tokenizer=tokenizer)
    expected = tokenizer(single.text_a[5], max_length=12, padding="max_length", truncation=True)
    np.testing.assert_array_equal(rows[5]["input_ids"], expected["input_ids"])
    assert rows[5]["label"].dtype == np.int32


# ----------------------------------------------------------------------------------------------- order, resume


def identify(batches, lookup) -> list[int]:
    """Example index of every unaugmented training row, via its exact pixels."""
    return [lookup[image.tobytes()] for batch in batches for image in batch["image"]]


def test_train_order_is_seeded_reshuffled_and_covers_each_epoch(images):
    lookup = {row["image"].tobytes(): i for i, row in eval_rows(images, np.arange(N), config()).items()}
    plain = config(augment=False)
    order = identify(take(fi.train_input(images, np.arange(N), plain, 4, 0, 1), 6), lookup)
    assert sorted(order[:N]) == list(range(N)) and sorted(order[N:]) == list(range(N))  # every epoch, each once
    assert order[:N] != order[N:] and order[:N] != list(range(N))  # shuffled, and reshuffled per epoch
    again = identify(take(fi.train_input(images, np.arange(N), plain, 4, 0, 1), 6), lookup)
    other = identify(take(fi.train_input(images, np.arange(N), config(augment=False, seed=1), 4, 0, 1), 6), lookup)
    assert again == order and other != order
    subset = identify(take(fi.train_input(images, [2, 4, 6, 8], plain, 2, 0, 1), 4), lookup)
    assert sorted(subset) == [2, 2, 4, 4, 6, 6, 8, 8]


def test_augmented_batches_are_deterministic_per_seed(images, sounds):
    for examples_set, modality in ((images, "image"), (sounds, "audio")):
        first = take(fi.train_input(examples_set, np.arange(N), config(modality), 4, 0, 1), 3)
        assert_same(first, take(fi.train_input(examples_set, np.arange(N), config(modality), 4, 0, 1), 3))
        other = take(fi.train_input(examples_set, np.arange(N), config(modality, seed=5), 4, 0, 1), 3)
        assert any(not np.array_equal(a[modality], b[modality]) for a, b in zip(first, other))


def test_resume_from_state_gives_the_same_batches(images, sounds):
    for examples_set, modality in ((images, "image"), (sounds, "audio")):
        iterator = fi.train_input(examples_set, np.arange(N), config(modality), 4, 0, 1)
        take(iterator, 2)
        state = iterator.get_state()
        expected = take(iterator, 3)  # crosses the epoch boundary (3 batches per epoch)
        resumed = fi.train_input(examples_set, np.arange(N), config(modality), 4, 0, 1)
        resumed.set_state(state)
        assert_same(take(resumed, 3), expected)


def test_two_processes_make_up_the_global_batch(images, sounds):
    for examples_set, modality in ((images, "image"), (sounds, "audio")):
        whole = take(fi.train_input(examples_set, np.arange(N), config(modality), 4, 0, 1), 4)
        parts = [take(fi.train_input(examples_set, np.arange(N), config(modality), 2, p, 2), 4) for p in (0, 1)]
        assert all(len(batch["label"]) == 2 for part in parts for batch in part)
        joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)]
        assert_same(joined, whole)


# ----------------------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("count,batch_size", [(1, 4), (2, 2), (3, 1), (2, 5)])
def test_eval_covers_every_index_once_with_padding_marked(images, count, batch_size):
    indices = np.array([11, 0, 5, 3, 9, 2, 7])
    seen = []
    for p in range(count):
        ev = fi.eval_input(images, indices, config(), batch_size, p, count)
        batches = list(ev)
        assert len(batches) == len(ev) == len(list(ev))  # re-iterable, one pass each
        assert len(ev) == len(fi.eval_input(images, indices, config(), batch_size, 0, count))  # same on every process
        for batch in batches:
            assert batch["valid"].dtype == np.bool_ and len(batch["valid"]) == batch_size
            assert (batch["row_id"][~batch["valid"]] == -1).all()
            seen += batch["row_id"][batch["valid"]].tolist()
            np.testing.assert_array_equal(batch["label"][batch["valid"]],
                                          images.labels[indices[batch["row_id"][batch["valid"]]]])
    assert sorted(seen) == list(range(len(indices)))


def test_augmentation_changes_training_inputs_and_never_eval(images, sounds):
    for examples_set, modality in ((images, "image"), (sounds, "audio")):
        augmented = take(fi.train_input(examples_set, np.arange(N), config(modality), 4, 0, 1), 3)
        plain = take(fi.train_input(examples_set, np.arange(N), config(modality, augment=False), 4, 0, 1), 3)
        changed = [not np.array_equal(a, b) for x, y in zip(augmented, plain)
                   for a, b in zip(x[modality], y[modality])]
        assert 0 < sum(changed), modality
        assert_same([{"label": x["label"]} for x in augmented], [{"label": y["label"]} for y in plain])  # same order
        clean = eval_rows(examples_set, np.arange(N), config(modality, augment=False))
        lookup = {row[modality].tobytes() for row in clean.values()}
        assert all(row.tobytes() in lookup for batch in plain for row in batch[modality])
        on, off = (list(fi.eval_input(examples_set, np.arange(N), config(modality, augment=a), 4, 0, 1))
                   for a in (True, False))
        assert_same(on, off)


# ----------------------------------------------------------------------------------------------- image presets


def test_reference_normalisation_per_dataset(images):
    half = eval_rows(images, [4], config(dataset="cifar10", normalization="reference"))[0]["image"]
    np.testing.assert_allclose(half, clean_image(images, 4, (0.5,) * 3, (0.5,) * 3), atol=1e-6)
    pets = config(dataset="oxford_iiit_pet", normalization="reference", augment=False)
    evaluated = eval_rows(images, [6], pets)[0]["image"]
    np.testing.assert_allclose(evaluated, clean_image(images, 6, fi.IMAGENET_MEAN, fi.IMAGENET_STD), atol=1e-6)
    trained = next(fi.train_input(images, [6], pets, 1, 0, 1))["image"][0]  # bug 41: CLIP stats in training
    np.testing.assert_allclose(trained, clean_image(images, 6), atol=1e-6)
    flowers = config(dataset="Flowers-102", normalization="reference")
    np.testing.assert_allclose(eval_rows(images, [2], flowers)[0]["image"],
                               clean_image(images, 2, *fi._FLOWERS), atol=1e-6)
    clip = eval_rows(images, [2], config(dataset="flowers102"))[0]["image"]
    np.testing.assert_allclose(clip, clean_image(images, 2), atol=1e-6)  # the default: CLIP for every dataset
    for unknown in ("", "folder", "mnist"):  # other datasets: the standard transform, no reference statistics
        assert fi.image_preset(unknown) == ("standard", fi.IMAGE_PRESETS["standard"])
        with pytest.raises(ValueError, match="no reference normalization"):
            config(dataset=unknown, normalization="reference")
    assert fi.image_preset("CIFAR-100")[0] == "cifar100" and fi.image_preset("imagenet2012")[0] == "imagenet"


def test_finetune_image_transform_follows_the_preset(images):
    image = images.examples[3]
    resized = augment.resize(image, SIZE)
    flips = {resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes(): "h",
             resized.transpose(Image.Transpose.FLIP_TOP_BOTTOM).tobytes(): "v"}

    def outcomes(preset):
        return [fi.finetune_image(image, SIZE, preset, np.random.default_rng(s)).tobytes() for s in range(40)]

    always_flip = outcomes(fi.ImagePreset(1.0, 1.0, 0.1, 0.0))
    assert {flips.get(o) for o in always_flip} == {"h", "v"}  # one flip of the two, chosen at random
    assert all(o == resized.tobytes() for o in outcomes(fi.ImagePreset(0.0, 0.0, 0.1, 0.0)))
    jittered = outcomes(fi.ImagePreset(0.0, 0.0, 0.1, 1.0))
    assert all(o != resized.tobytes() and o not in flips for o in jittered)
    def change(strength):  # mean pixel change of an always-applied jitter of this strength
        preset = fi.ImagePreset(0.0, 0.0, strength, 1.0)
        return np.mean([np.abs(np.asarray(fi.finetune_image(image, SIZE, preset, np.random.default_rng(s)), float)
                               - np.asarray(resized, float)).mean() for s in range(20)])

    assert change(0.3) > 3 * change(0.02)  # the preset's strength, not a fixed one
    assert fi.IMAGE_PRESETS["flowers102"] == fi.ImagePreset(0.25, 0.05, 0.05, 0.25, fi._FLOWERS, fi._FLOWERS)
    assert fi.IMAGE_PRESETS["cifar10"].hflip_p == 0.5 and fi.IMAGE_PRESETS["cifar10"].jitter_p == 0.5


# ----------------------------------------------------------------------------------------------- audio augmentation


def test_time_stretch_matches_librosa():
    import librosa  # a requirement of the project: the reference of our numpy time stretch
    for seconds, rate in ((0.5, 0.15), (2.0, 0.15), (1.0, 0.85), (0.3, 1.3)):
        y = tone(3, seconds)
        ours, theirs = fi.time_stretch(y, rate), librosa.effects.time_stretch(y, rate=rate)
        assert ours.shape == theirs.shape == (round(y.size / rate),)
        assert np.linalg.norm(ours - theirs) <= 1e-5 * np.linalg.norm(theirs), (seconds, rate)


def test_waveform_augmentation_operations():
    """The reference's operations with its fixed stretch rate (bug 43 kept behind `reference_stretch`)."""
    y = tone(1)
    params = fi.WaveformAugment(reference_stretch=True)
    rng = np.random.default_rng(0)
    noise = fi._apply(0, np.zeros(20_000), rng, params)
    assert noise.std() == pytest.approx(0.001, rel=0.05)
    np.testing.assert_array_equal(fi._apply(1, y, rng, params), np.roll(y, int(y.size * 0.1)))
    assert fi._apply(2, y, rng, params).size == round(y.size / 0.15)
    np.testing.assert_array_equal(fi._apply(3, y, rng, params), -y)
    np.testing.assert_array_equal(fi.augment_waveform(y, rng, dataclasses.replace(params, p=0.0)), y)
    every = dataclasses.replace(params, p=1.0)
    first = fi.augment_waveform(y, np.random.default_rng(7), every)
    assert first.dtype == np.float32 and first.size == round(y.size / 0.15)  # all four ops, stretch included
    np.testing.assert_array_equal(first, fi.augment_waveform(y, np.random.default_rng(7), every))
    assert not np.array_equal(first, fi.augment_waveform(y, np.random.default_rng(8), every))
    applied = [fi.augment_waveform(y, np.random.default_rng(s), params).size != y.size for s in range(300)]
    assert np.mean(applied) == pytest.approx(0.333, abs=0.08)  # how often the stretch fires


def test_default_stretch_is_a_rate_around_one():
    """Bug 43 fixed: the stretch rate is drawn from [0.85, 1.15], so a stretched clip keeps most of its length."""
    y = tone(1)
    sizes = [fi._apply(2, y, np.random.default_rng(s), fi.WaveformAugment()).size for s in range(40)]
    assert min(sizes) >= round(y.size / 1.15) and max(sizes) <= round(y.size / 0.85)
    assert len(set(sizes)) > 10  # a fresh rate per example, not one fixed rate


# ----------------------------------------------------------------------------------------------- unreadable files


def image_files(tmp_path, broken: set[int], count: int = 8) -> ClassificationSet:
    paths = []
    for i in range(count):
        path = tmp_path / f"{i}.png"
        if i in broken:
            path.write_bytes(b"not a png at all")
        else:
            picture(i).save(path)
        paths.append(str(path))
    return ClassificationSet(name="files", modality="image", class_names=("a", "b"), labels=np.arange(count) % 2,
                             examples=ImageFiles(paths))


class CountingExamples:
    """Counts how often each example is decoded."""

    def __init__(self, examples):
        self.examples = examples
        self.decoded = {}

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        self.decoded[index] = self.decoded.get(index, 0) + 1
        return self.examples[index]


def test_an_unreadable_file_is_substituted_in_training_and_flagged_in_eval(tmp_path, caplog):
    files = image_files(tmp_path, broken={5})
    files = dataclasses.replace(files, examples=CountingExamples(files.examples))
    lookup = {row["image"].tobytes(): i for i, row in eval_rows(files, np.arange(8), config()).items()}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=fi.__name__):
        batches = take(fi.train_input(files, np.arange(8), config(augment=False), 4, 0, 1), 6)  # three epochs
    assert all(batch["image"].shape == (4, SIZE, SIZE, 3) for batch in batches)
    order = identify(batches, lookup)
    assert 5 not in order and sorted(set(order)) == [0, 1, 2, 3, 4, 6, 7]
    labels = np.concatenate([batch["label"] for batch in batches])
    np.testing.assert_array_equal(labels, files.labels[order])  # a substitute brings its own label
    warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "example 5" in warnings[0].getMessage() and "5.png" in warnings[0].getMessage()
    assert files.examples.decoded[5] == 2  # once in the eval pass above, once in training: never again
    ev = fi.eval_input(files, np.array([7, 5, 1]), config(), 4, 0, 1)
    (batch,) = list(ev)
    np.testing.assert_array_equal(batch["valid"], [True, False, True, False])
    np.testing.assert_array_equal(batch["row_id"], [0, 1, 2, -1])  # unreadable: its position; padding: -1
    assert not batch["image"][1].any() and ev.unreadable == [1]


def test_too_many_unreadable_files_stop_the_input(tmp_path, caplog):
    record = fi.Unreadable("s", limit=1)
    with caplog.at_level(logging.WARNING, logger=fi.__name__):
        record.add(3, OSError("bad"))
        record.add(3, OSError("bad"))  # known: neither logged again nor counted
    assert len(caplog.records) == 1 and 3 in record and 4 not in record
    with pytest.raises(DatasetError, match="2 unreadable examples, more than the 1 allowed"):
        record.add(4, OSError("bad"))
    files = image_files(tmp_path, broken={1, 2, 6})
    with pytest.raises(DatasetError, match="unreadable examples, more than"):
        take(fi.train_input(files, np.arange(8), config(), 4, 0, 1), 4)
    with pytest.raises(DatasetError, match="unreadable examples, more than"):
        list(fi.eval_input(files, np.arange(8), config(), 4, 0, 1))
    take(fi.train_input(files, np.arange(8), config(max_unreadable=0.5), 4, 0, 1), 4)  # a looser limit: fine


# ----------------------------------------------------------------------------------------------- splits, errors


def test_kfold_indices(sounds):
    train, held = fi.kfold_indices(sounds.folds, 2)
    assert set(sounds.folds[held]) == {2} and 2 not in set(sounds.folds[train])
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(N))
    with pytest.raises(ValueError, match="fold 7 not in the set"):
        fi.kfold_indices(sounds.folds, 7)


def test_stratified_holdout():
    labels = np.repeat([0, 1, 2], [10, 20, 31])
    rest, held = fi.stratified_holdout(labels, 0.2, seed=3)
    assert np.bincount(labels[held]).tolist() == [2, 4, 6] and len(held) == round(0.2 * len(labels))
    assert sorted(np.concatenate([rest, held]).tolist()) == list(range(len(labels)))
    np.testing.assert_array_equal(held, fi.stratified_holdout(labels, 0.2, seed=3)[1])
    assert not np.array_equal(held, fi.stratified_holdout(labels, 0.2, seed=4)[1])
    scores = np.random.default_rng(0).uniform(0, 5, 100).astype(np.float32)  # regression: by quantile bins
    rest, held = fi.stratified_holdout(scores, 0.1, seed=0)
    quintiles = np.quantile(scores, [0, 0.2, 0.4, 0.6, 0.8, 1])
    assert len(held) == 10 and np.histogram(scores[held], quintiles)[0].tolist() == [2] * 5
    _, held = fi.stratified_holdout(np.repeat([0, 1, 2], 5), 0.3, seed=0)  # 1.5 each: the total is round(4.5)
    assert len(held) == 4 and sorted(np.bincount(np.repeat([0, 1, 2], 5)[held]).tolist()) == [1, 1, 2]
    with pytest.raises(ValueError):
        fi.stratified_holdout(labels, 1.0, seed=0)


def test_setup_errors(images, tokenizer):
    with pytest.raises(ValueError, match="modality"):
        fi.train_input(images, np.arange(N), config("audio"), 4, 0, 1)
    with pytest.raises(ValueError, match="must be positive"):
        fi.eval_input(images, np.arange(N), config(), 0, 0, 1)
    with pytest.raises(ValueError, match="fewer than one global batch of 4"):
        fi.train_input(images, np.arange(3), config(), 2, 1, 2)
    with pytest.raises(ValueError, match="needs fbank"):
        config("audio", fbank=None)
    with pytest.raises(ValueError, match="indices outside"):
        fi.eval_input(images, [0, N], config(), 4, 0, 1)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        fi.train_input(PairSet("p", ("a",) * 4, None, np.zeros(4, np.int64)), np.arange(4), config("text"), 4, 0, 1)
