"""Grain pipelines on the demo dataset: layout, determinism, state restore, text modes, train-only augmentation,
per-process sharding, eval padding, mesh placement and worker processes."""

import dataclasses
import threading

import jax
import numpy as np
import pytest

from data_pipelines import augment, demo, pipeline, precompute, records
from data_pipelines.manifest import read_manifest
from synergy_jax import audio, text
from synergy_jax.errors import SetupError

TINY = precompute.PrecomputeConfig(image_size=32, fbank=audio.FbankConfig(max_frames=128, num_mel_bins=32))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = demo.ensure_demo_data(tmp_path_factory.mktemp("demo"), TINY, train_per_class=3, test_per_class=2)
    tokenizer = text.load_tokenizer(paths.tokenizer_dir)
    return paths, tokenizer


def _config(paths, split="train", **overrides):
    defaults = dict(
        data_dir=str(paths.precomputed_dir),
        split=split,
        batch_size=8,
        train=split == "train",
        image_size=32,
        max_length=16,
        label_names=paths.labels,
        process_index=0,
        process_count=1,
    )
    return pipeline.PipelineConfig(**{**defaults, **overrides})


def _batches(config, tokenizer, count=None, state=None):
    iterator = iter(pipeline.build_dataset(config, tokenizer))
    if state is not None:
        iterator.set_state(state)
    if count is None:
        return list(iterator)
    return [next(iterator) for _ in range(count)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _stored(paths, split):
    """row_id -> decoded record, straight from the shards."""
    from array_record.python.array_record_module import ArrayRecordReader

    metadata = precompute.load_metadata(paths.precomputed_dir, split)
    examples = {}
    for path in precompute.shard_paths(paths.precomputed_dir, metadata):
        reader = ArrayRecordReader(path)
        for data in reader.read_all():
            example = records.decode_example(data)
            examples[example["row_id"]] = example
        reader.close()
    return examples


def test_demo_dataset_and_tokenizer(data):
    paths, tokenizer = data
    assert len(paths.labels) >= 8
    rows, problems = read_manifest(paths.manifests["train"])
    assert len(rows) == 30 and not problems
    assert {row.label for row in rows} == set(paths.labels)
    assert all(any(word in row.caption.lower() for word in row.synonyms) for row in rows)
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.mask_token_id == len(tokenizer) - 1
    ids = text.tokenize(tokenizer, ["a bell rings"], 8)
    assert ids["input_ids"][0, 0] == 0 and 2 in ids["input_ids"][0] and ids["input_ids"].dtype == np.int32


def test_demo_generation_is_deterministic(tmp_path):
    first = demo.generate(tmp_path / "a", train_per_class=1, test_per_class=1)
    second = demo.generate(tmp_path / "b", train_per_class=1, test_per_class=1)
    for name in ("train.csv", "images/train_03_000.png", "audio/test_07_000.wav"):
        assert (first.root / name).read_bytes() == (second.root / name).read_bytes()


def test_train_batch_layout(data):
    paths, tokenizer = data
    (batch,) = _batches(_config(paths, text_mode="prompt"), tokenizer, 1)
    shapes = {key: (value.shape, value.dtype) for key, value in batch.items()}
    assert shapes == {
        "image": ((8, 32, 32, 3), np.float32),
        "audio": ((8, 128, 32), np.float32),
        "input_ids": ((8, 16), np.int32),
        "attention_mask": ((8, 16), np.int32),
        "valid": ((8,), np.bool_),
        "row_id": ((8,), np.int64),
        "label_id": ((8,), np.int32),
    }
    assert batch["valid"].all() and (batch["label_id"] >= 0).all()
    assert np.all((batch["attention_mask"] == 0) == (batch["input_ids"] == tokenizer.pad_token_id))
    assert -2.0 < batch["image"].mean() < 2.0 and batch["image"].min() >= -1.8 and batch["image"].max() <= 2.2


def test_device_augmentation_batches_carry_the_raw_records(data):
    paths, tokenizer = data
    config = _config(paths, text_mode="prompt", augment_on="device")
    first = _batches(config, tokenizer, 3)
    batch = first[0]
    shapes = {key: (value.shape, value.dtype) for key, value in batch.items()}
    assert shapes["image"] == ((8, 32, 32, 3), np.uint8) and shapes["audio"] == ((8, 128, 32), np.float16)
    assert shapes["audio_frames"] == ((8,), np.int32) and shapes["augment_seed"] == ((8, 2), np.uint32)
    stored = _stored(paths, "train")
    for i, row in enumerate(batch["row_id"]):  # the records as stored: nothing augmented on the host
        record = stored[int(row)]
        np.testing.assert_array_equal(batch["image"][i], np.asarray(records.image_of(record)))
        np.testing.assert_array_equal(batch["audio"][i], record["audio"])
        assert batch["audio_frames"][i] == record["audio_frames"]
    assert len({tuple(seed) for b in first for seed in b["augment_seed"]}) == 24  # a seed per example
    iterator = iter(pipeline.build_dataset(config, tokenizer))  # seeds come back with the input state
    next(iterator)
    _assert_same(first[1:], _batches(config, tokenizer, 2, state=iterator.get_state()))
    host = _batches(_config(paths, text_mode="prompt"), tokenizer, 1)[0]
    np.testing.assert_array_equal(host["row_id"], batch["row_id"])  # the shuffle is the host mode's
    (evaluated,) = _batches(_config(paths, "test", augment_on="device", reference_eval_augmentation=True), tokenizer,
                            1)  # fmt: skip
    assert evaluated["image"].dtype == np.float32 and "augment_seed" not in evaluated  # no train step: the host
    with pytest.raises(ValueError, match="augments both images and audio"):
        _config(paths, augment_on="device", augment_audio=False)
    with pytest.raises(ValueError, match="augment_on must be one of"):
        _config(paths, augment_on="tpu")


def test_tokenised_texts_are_remembered_up_to_a_bound(data, monkeypatch):
    paths, tokenizer = data
    config = _config(paths, text_mode="prompt")
    transform = pipeline.ExampleTransform(config, audio.FbankConfig(), tokenizer)
    monkeypatch.setattr(pipeline, "TOKEN_CACHE_SIZE", 2)
    for words in ["a bell rings", "a dog barks", "a bell rings", "rain falls", "a dog barks"]:
        ids, mask = transform._tokenized(words)
        expected = text.tokenize(tokenizer, words, config.max_length)
        np.testing.assert_array_equal(ids, expected["input_ids"][0])
        np.testing.assert_array_equal(mask, expected["attention_mask"][0])
        assert not ids.flags.writeable and len(transform._tokens) <= 2
    assert transform._tokenized("rain falls")[0] is transform._tokenized("rain falls")[0]


def test_input_slices_and_epochs(monkeypatch):
    assert pipeline.input_slices(0) == jax.process_count() and pipeline.input_slices(3) == 3
    assert pipeline.slices_problem(2, 8) is None
    assert pipeline.slices_problem(3, 8) == "input_slices=3 must be a multiple of the 1 processes and divide the batch of 8"
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert pipeline.input_slices(0) == 2 and pipeline.slices_problem(4, 8) is None
    assert pipeline.slices_problem(3, 12) == ("input_slices=3 must be a multiple of the 2 processes and divide the batch "
                                             "of 12")  # fmt: skip
    assert pipeline.steps_per_epoch(30, 8, 2) == 3  # 15 rows a slice, 4 a batch: 3 whole batches
    with pytest.raises(SetupError, match="7 training examples are fewer than one batch of 8"):
        pipeline.steps_per_epoch(7, 8, 1)


def test_training_order_is_seeded_and_restores_exactly(data):
    paths, tokenizer = data
    config = _config(paths, text_mode="prompt")
    first = _batches(config, tokenizer, 6)  # 30 examples / 8: crosses an epoch boundary
    _assert_same(first, _batches(config, tokenizer, 6))
    other_seed = _batches(dataclasses.replace(config, seed=1), tokenizer, 1)
    assert not np.array_equal(other_seed[0]["row_id"], first[0]["row_id"])

    iterator = iter(pipeline.build_dataset(config, tokenizer))
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    _assert_same(first[3:], _batches(config, tokenizer, 3, state=state))

    epoch_rows = np.concatenate([b["row_id"] for b in first])[:30]
    assert sorted(epoch_rows) == sorted(_stored(paths, "train"))  # one epoch = every row once
    second_epoch = np.concatenate([b["row_id"] for b in _batches(config, tokenizer, 8)])[30:60]
    assert sorted(second_epoch) == sorted(epoch_rows) and not np.array_equal(second_epoch, epoch_rows)


def _decode(tokenizer, batch):
    return tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)


def test_caption_mode_uses_the_caption(data):
    paths, tokenizer = data
    stored = _stored(paths, "train")
    for batch in _batches(_config(paths, text_mode="caption", max_length=64), tokenizer, 2):
        for row_id, decoded in zip(batch["row_id"], _decode(tokenizer, batch)):
            assert decoded == stored[row_id]["caption"]


def test_prompt_mode_uses_a_template_and_a_synonym(data):
    paths, tokenizer = data
    stored = _stored(paths, "train")
    templates_seen, words_seen = set(), set()
    for batch in _batches(_config(paths, text_mode="prompt", max_length=32), tokenizer, 8):
        for row_id, decoded in zip(batch["row_id"], _decode(tokenizer, batch)):
            matches = [
                (template, word)
                for template in text.TEMPLATES
                for word in text.synonyms(stored[row_id]["label"])
                if template.format(word) == decoded
            ]
            assert matches, decoded
            templates_seen.add(matches[0][0])
            words_seen.add(matches[0][1])
    assert len(templates_seen) > 20 and len(words_seen) > 15


def test_eval_is_deterministic_unaugmented_and_padded(data):
    paths, tokenizer = data
    config = _config(paths, "test", text_mode="prompt")
    batches = _batches(config, tokenizer)
    _assert_same(batches, _batches(config, tokenizer))  # same prompts every evaluation
    assert len(batches) == 3 and [b["valid"].sum() for b in batches] == [8, 8, 4]
    assert (batches[-1]["row_id"][4:] == -1).all() and (batches[-1]["label_id"][4:] == -1).all()
    stored = _stored(paths, "test")
    assert sorted(np.concatenate([b["row_id"][b["valid"]] for b in batches])) == sorted(stored)
    batch = batches[0]
    for i, row_id in enumerate(batch["row_id"]):
        image = records.image_of(stored[row_id])
        np.testing.assert_allclose(batch["image"][i], augment.to_normalized_array(image), atol=1e-6)
        np.testing.assert_array_equal(batch["audio"][i], stored[row_id]["audio"].astype(np.float32))


def test_augmentation_is_train_only(data):
    paths, tokenizer = data
    stored = _stored(paths, "train")
    plain = _config(paths, augment_image=False, augment_audio=False)
    (batch,) = _batches(plain, tokenizer, 1)
    for i, row_id in enumerate(batch["row_id"]):
        image = records.image_of(stored[row_id])
        np.testing.assert_allclose(batch["image"][i], augment.to_normalized_array(image), atol=1e-6)
        np.testing.assert_array_equal(batch["audio"][i], stored[row_id]["audio"].astype(np.float32))
    (augmented,) = _batches(_config(paths), tokenizer, 1)
    np.testing.assert_array_equal(augmented["row_id"], batch["row_id"])  # augmentation does not change order
    changed_images = [not np.allclose(augmented["image"][i], batch["image"][i]) for i in range(8)]
    assert all(changed_images)  # RandomResizedCrop alone changes nearly every image
    changed_audio = [not np.allclose(augmented["audio"][i], batch["audio"][i], atol=1e-3) for i in range(8)]
    assert 0 < sum(changed_audio) < 8  # each of 3 effective ops with p 0.2: ~49% of clips change

    reference = _batches(_config(paths, "test", reference_eval_augmentation=True), tokenizer, 1)[0]
    clean = _batches(_config(paths, "test"), tokenizer, 1)[0]
    assert not np.allclose(reference["image"], clean["image"])  # the reference's behaviour, behind a flag


def test_two_processes_see_disjoint_rows_that_cover_the_split(data):
    paths, tokenizer = data
    all_train = sorted(_stored(paths, "train"))
    seen = []
    for index in range(2):
        config = _config(paths, process_index=index, process_count=2, batch_size=5)
        seen.append(np.concatenate([b["row_id"] for b in _batches(config, tokenizer, 3)]))  # one epoch: 15 rows
    assert not set(seen[0]) & set(seen[1]) and sorted(np.concatenate(seen)) == all_train
    # Each slice shuffles with its own seed: slice 0's k-th stored row is not always next to slice 1's k-th.
    positions = [np.searchsorted(all_train, rows) // 2 for rows in seen]
    assert not np.array_equal(positions[0], positions[1])

    eval_seen, batch_counts = [], []
    for index in range(2):
        batches = _batches(_config(paths, "test", process_index=index, process_count=2, batch_size=4), tokenizer)
        batch_counts.append(len(batches))
        eval_seen.append(np.concatenate([b["row_id"][b["valid"]] for b in batches]))
    assert batch_counts[0] == batch_counts[1] == 3  # 10 rows each -> 3 batches of 4, equal on both processes
    assert not set(eval_seen[0]) & set(eval_seen[1])
    assert sorted(np.concatenate(eval_seen)) == sorted(_stored(paths, "test"))


def test_global_batch_on_a_mesh(data):
    paths, tokenizer = data
    (batch,) = _batches(_config(paths), tokenizer, 1)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    arrays = pipeline.global_batch(batch, mesh)
    assert set(arrays) == set(batch) - {"row_id"}
    for name, array in arrays.items():
        assert array.shape == batch[name].shape and array.sharding.spec == jax.P("data")
        assert array.addressable_shards[0].data.shape[0] == 2  # 8 examples over 4 data shards
        np.testing.assert_array_equal(np.asarray(array), batch[name])


def test_worker_processes_are_deterministic_and_restorable(data):
    """One worker process (each costs seconds to start): the restored run equals the uninterrupted one."""
    paths, tokenizer = data
    config = _config(paths, workers=1, text_mode="prompt")
    iterator = iter(pipeline.build_dataset(config, tokenizer))
    first = [next(iterator), next(iterator)]
    state = iterator.get_state()
    continued = [next(iterator), next(iterator)]
    _assert_same(continued, _batches(config, tokenizer, 2, state=state))
    in_process = _batches(dataclasses.replace(config, workers=0), tokenizer, 2)
    assert sorted(np.concatenate([b["row_id"] for b in first])) == sorted(
        np.concatenate([b["row_id"] for b in in_process])
    )


def test_tokenize_is_thread_safe(data):
    """Grain read threads share one tokenizer whose calls set padding/truncation on a shared backend: threads that
    start together with different settings must each get what a single thread gets."""
    _, tokenizer = data
    texts = ["a photo of a dog barking loudly at night", "a cat"]
    expected = {n: text.tokenize(tokenizer, texts[n % 2], 8 + 8 * (n % 2)) for n in range(4)}
    start, results = threading.Barrier(4), {n: [] for n in range(4)}

    def encode(n):
        start.wait()
        for _ in range(300):
            results[n].append(text.tokenize(tokenizer, texts[n % 2], 8 + 8 * (n % 2)))

    threads = [threading.Thread(target=encode, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n, encoded in results.items():
        assert len(encoded) == 300
        for result in encoded:
            for key in ("input_ids", "attention_mask"):
                np.testing.assert_array_equal(result[key], expected[n][key])
