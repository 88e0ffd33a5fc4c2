"""The zero-shot job on small generated datasets in each official layout (ESC-50, UrbanSound8K, a TFDS array_record
set, class folders, a precomputed manifest split), with a tiny random checkpoint: its numbers must equal a
brute-force numpy computation from embeddings computed directly (one device, whole arrays, no batching, no mesh),
on several meshes; wrong class orders and broken layouts must stop it with a clear error."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile
from PIL import Image

from data_pipelines import audio_io, demo, downstream, precompute, records
from experiments import zero_shot as job
from experiments.configs import zero_shot as zs_config
from helpers import ROOT, tiny_pretrain_run
from synergy_jax import audio, checkpoint, parallel, text
from synergy_jax.evaluators import retrieval
from synergy_jax.models.synergy import SynergyCLIP
from synthetic import ESC_CLASSES, PET_NAMES, make_esc50, make_tfds, picture, tone

CACHE_DIR = os.environ["JAX_COMPILATION_CACHE_DIR"]  # the shared compile cache (tests/conftest.py)

SCRIPT = ROOT / "experiments" / "zero_shot.py"
MAX_LENGTH = 16
prompt_sets = zs_config.PROMPT_SETS


# ----------------------------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A pre-training run folder: a checkpoint of a random 1-layer model + its run record (`RunRecord` of kind
    'pretrain'), whose data names the tokenizer (a folder of the run, recorded relative to it as pre-training does)."""
    words = "photo sound this is a of the bell drum rain dog cat bird siren horn engine wind clock recording"
    return tiny_pretrain_run(tmp_path_factory.mktemp("run"), words, seed=3, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def reference(run_dir):
    """Direct embeddings: the whole model on one device, whole arrays at once (what the job must reproduce)."""
    params, record = checkpoint.restore_params(run_dir, parallel.make_mesh("1x1", jax.devices()[:1]))
    config = record.synergy_config()
    model = SynergyCLIP(config)
    tokenizer = text.load_tokenizer(run_dir / "tokenizer")

    def embed(method, *inputs):
        out = np.asarray(model.apply({"params": params}, *inputs, method=method), np.float64)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def images(pil_images):
        side = config.vision.image_size
        pixels = np.stack([np.asarray(i.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)) for i in pil_images])
        mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
        return embed(SynergyCLIP.embed_image, ((pixels / 255.0 - mean) / std).astype(np.float32))

    def clips(waveforms):
        fbank = audio.FbankConfig.for_tower(config.audio)
        return embed(SynergyCLIP.embed_audio, np.stack([audio.ast_features(w, fbank) for w in waveforms]))

    def texts(strings):
        tokens = text.tokenize(tokenizer, strings, MAX_LENGTH)
        return embed(SynergyCLIP.embed_text, tokens["input_ids"], tokens["attention_mask"])

    def classes(names, templates):
        out = []
        for name in names:
            prompts = texts([t.format(name.replace("_", " ")) for t in templates])
            mean = prompts.mean(axis=0)
            out.append(mean / np.linalg.norm(mean))
        return np.stack(out)

    return {"images": images, "clips": clips, "texts": texts, "classes": classes, "audio_features": 
            lambda f: embed(SynergyCLIP.embed_audio, np.asarray(f, np.float32))}  # fmt: skip


def brute_force(queries: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> dict:
    """Loops over examples and classes: top-1, top-5, per-class accuracy, confusion matrix."""
    scores = queries @ classes.T
    gaps = np.sort(scores, axis=1)
    assert np.min(gaps[:, -1] - gaps[:, -2]) > 1e-5, "near-tied classes: the comparison would be fragile; reseed"
    top1, top5, matrix = [], [], np.zeros((len(classes), len(classes)), int)
    for row, label in zip(scores, labels):
        order = sorted(range(len(row)), key=lambda c: -row[c])
        top1.append(order[0] == label)
        top5.append(label in order[:5])
        matrix[label, order[0]] += 1
    per_class = [np.mean([t for t, lab in zip(top1, labels) if lab == c]) for c in sorted(set(labels.tolist()))]
    return {"top1": np.mean(top1), "top5": np.mean(top5), "per_class_accuracy": np.mean(per_class), "confusion": matrix}


def assert_matches(task: dict, expected: dict, classes: int) -> None:
    assert task["top1"] == pytest.approx(expected["top1"], abs=1e-12)
    if classes >= 5:
        assert task["top5"] == pytest.approx(expected["top5"], abs=1e-12)
    assert task["per_class_accuracy"] == pytest.approx(expected["per_class_accuracy"], abs=1e-12)
    assert np.array_equal(np.asarray(task["confusion_matrix"]), expected["confusion"])
    assert task["chance"] == pytest.approx(1 / classes)


def options(run_dir, tmp_path, **kw):
    """The job's config (experiments/configs/zero_shot.py) with these fields set."""
    config = zs_config.get_config()
    config.update(dict(checkpoint=str(run_dir), out=str(tmp_path / "out" / "results.json"), progress=False, workers=2,
                       **kw))  # fmt: skip
    return config


# ----------------------------------------------------------------------------------------------- dataset makers


US8K_CLASSES = ["air_conditioner", "car_horn", "children_playing", "dog_bark", "drilling"]


def make_urbansound8k(root: Path) -> Path:
    """metadata/UrbanSound8K.csv + audio/fold<k>/*.wav (22.05 kHz stereo, as many US8K files are)."""
    rng = np.random.default_rng(1)
    (root / "metadata").mkdir(parents=True)
    rows = []
    for fold in (1, 2, 3):
        (root / "audio" / f"fold{fold}").mkdir(parents=True)
        for class_id, name in enumerate(US8K_CLASSES):
            file = f"{100 + class_id}-{class_id}-0-{fold}.wav"
            wave = tone(rng, class_id, 22_050, 0.4)
            soundfile.write(root / "audio" / f"fold{fold}" / file, np.stack([wave, wave], axis=1), 22_050)
            rows.append(dict(slice_file_name=file, fsID=100 + class_id, start=0.0, end=0.4, salience=1, fold=fold,
                             classID=class_id, **{"class": name}))  # fmt: skip
    with open(root / "metadata" / "UrbanSound8K.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


# ----------------------------------------------------------------------------------------------- tests


def test_esc50_matches_brute_force_on_two_meshes(run_dir, reference, tmp_path):
    root = make_esc50(tmp_path / "ESC-50-master", per_class_and_fold=2)
    table = list(csv.DictReader(open(root / "meta" / "esc50.csv")))
    waveforms = [audio_io.load_audio(root / "audio" / r["filename"]) for r in table]
    labels = np.array([int(r["target"]) for r in table])
    queries = reference["clips"](waveforms)
    # 24 clips: padded last batches; the 2x4 mesh also splits the towers tensor-parallel.
    for prompts, mesh, batch, sharding in (("single", "8x1", 16, "replicate"), ("ensemble", "2x4", 6, "tp")):
        expected = brute_force(queries, reference["classes"](ESC_CLASSES, prompt_sets[prompts]["audio"]), labels)
        results = job.run(options(run_dir, tmp_path, dataset="esc50", data_dir=str(root), prompts=prompts, mesh=mesh,
                                  batch_size=batch, sharding=sharding))  # fmt: skip
        task = results["tasks"]["audio->text"]
        assert_matches(task, expected, len(ESC_CLASSES))
        assert results["class_names"] == ESC_CLASSES and task["num_examples"] == 24
    # per fold: each fold's top-1 is the brute-force top-1 over that fold's clips
    folds = np.array([int(r["fold"]) for r in table])
    correct = np.argmax(queries @ reference["classes"](ESC_CLASSES, prompt_sets["ensemble"]["audio"]).T, 1) == labels
    for fold in (1, 2):
        assert task["folds"][str(fold)]["top1"] == pytest.approx(correct[folds == fold].mean())
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["tasks"]["audio->text"]["top1"] == task["top1"]
    assert Image.open(saved["tasks"]["audio->text"]["confusion_png"]).size[0] > 100


def test_esc50_selected_folds_and_urbansound8k(run_dir, reference, tmp_path):
    root = make_esc50(tmp_path / "esc", folds=(1, 2, 3))
    results = job.run(options(run_dir, tmp_path, dataset="esc50", data_dir=str(root), folds="1,3", mesh="4x2",
                              batch_size=4, prompts="single"))  # fmt: skip
    assert results["folds"] == [1, 3] and results["num_examples"] == 12

    us8k = make_urbansound8k(tmp_path / "UrbanSound8K")
    table = [r for r in csv.DictReader(open(us8k / "metadata" / "UrbanSound8K.csv")) if r["fold"] in ("2", "3")]
    waves = [audio_io.load_audio(us8k / "audio" / f"fold{r['fold']}" / r["slice_file_name"]) for r in table]
    expected = brute_force(reference["clips"](waves), reference["classes"](US8K_CLASSES, prompt_sets["single"]["audio"]),
                           np.array([int(r["classID"]) for r in table]))  # fmt: skip
    results = job.run(options(run_dir, tmp_path, dataset="us8k", data_dir=str(us8k), folds="2-3", mesh="8x1",
                              batch_size=8, prompts="single"))  # fmt: skip
    assert_matches(results["tasks"]["audio->text"], expected, len(US8K_CLASSES))
    assert results["class_names"] == US8K_CLASSES


def test_tfds_array_record_image_set(run_dir, reference, tmp_path):
    examples = make_tfds(tmp_path / "tfds")
    expected = brute_force(reference["images"]([image for image, _ in examples]),
                           reference["classes"](PET_NAMES, prompt_sets["ensemble"]["image"]),
                           np.array([label for _, label in examples]))  # fmt: skip
    results = job.run(options(run_dir, tmp_path, dataset="oxford_iiit_pet", data_dir=str(tmp_path / "tfds"),
                              mesh="8x1", batch_size=16))  # fmt: skip
    assert results["class_names"] == PET_NAMES  # the ClassLabel order, not a hard-coded list
    assert_matches(results["tasks"]["image->text"], expected, len(PET_NAMES))
    with pytest.raises(downstream.DatasetError, match="no split 'validation'"):
        job.run(options(run_dir, tmp_path, dataset="pets", data_dir=str(tmp_path / "tfds"), split="validation"))
    with pytest.raises(downstream.DatasetError, match="no prepared TFDS dataset 'cifar10'"):
        job.run(options(run_dir, tmp_path, dataset="cifar10", data_dir=str(tmp_path / "tfds")))


def test_wrong_class_order_is_caught(run_dir, tmp_path):
    # A class list in another order than the dataset's labels (the reference's Pets bug) stops the job.
    make_tfds(tmp_path / "tfds", count=6)
    cats_first = tmp_path / "cats_first.txt"
    cats_first.write_text("\n".join(["Abyssinian", "Bengal"] + [n for n in PET_NAMES if n not in ("Abyssinian", "Bengal")]))
    with pytest.raises(downstream.ClassOrderError, match="same names, different order"):
        job.run(options(run_dir, tmp_path, dataset="pets", data_dir=str(tmp_path / "tfds"), class_names=str(cats_first)))
    right = tmp_path / "right.txt"
    right.write_text("\n".join(n.replace("_", " ") for n in PET_NAMES))  # spelling aside, the same order: accepted
    job.run(options(run_dir, tmp_path, dataset="pets", data_dir=str(tmp_path / "tfds"), class_names=str(right),
                    prompts="single"))  # fmt: skip
    # Metadata that contradicts itself: one target id with two category names.
    root = make_esc50(tmp_path / "esc")
    table = (root / "meta" / "esc50.csv").read_text().replace(",0,dog,", ",0,cat,", 1)
    (root / "meta" / "esc50.csv").write_text(table)
    with pytest.raises(downstream.ClassOrderError, match=r"id 0: \['cat', 'dog'\]"):
        downstream.read_esc50(root)
    with pytest.raises(downstream.ClassOrderError, match="class ids must be 0..1"):
        downstream.class_names_from_pairs([(0, "a"), (2, "b")], "t")


def test_broken_layouts_name_the_problem(tmp_path):
    root = make_esc50(tmp_path / "esc")
    (root / "audio" / sorted((root / "audio").iterdir())[0].name).unlink()
    with pytest.raises(downstream.DatasetError, match="1 file.* missing"):
        downstream.read_esc50(root)
    with pytest.raises(downstream.DatasetError, match=r"fold\(s\) \[7\] not in the metadata"):
        downstream.read_esc50(make_esc50(tmp_path / "esc2"), "7")
    with pytest.raises(downstream.DatasetError, match="UrbanSound8K.csv not found"):
        downstream.read_urbansound8k(tmp_path)
    assert downstream.parse_folds("1-3,5") == (1, 2, 3, 5) and downstream.parse_folds("all") is None


def test_folder_images_cli_and_audio_folder(run_dir, reference, tmp_path):
    rng = np.random.default_rng(4)
    images, labels = [], []
    for label, name in enumerate(["golden_retriever", "tabby_cat", "zebra"]):
        (tmp_path / "pics" / name).mkdir(parents=True)
        for k in range(3):
            image = picture(rng, label)
            image.save(tmp_path / "pics" / name / f"{k}.jpg" if k else tmp_path / "pics" / name / f"{k}.png")
            images.append(Image.open(tmp_path / "pics" / name / (f"{k}.jpg" if k else f"{k}.png")))
            labels.append(label)
    expected = brute_force(reference["images"](images),
                           reference["classes"](["golden_retriever", "tabby_cat", "zebra"], prompt_sets["single"]["image"]),
                           np.array(labels))  # fmt: skip
    out = tmp_path / "cli" / "r.json"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin", "JAX_COMPILATION_CACHE_DIR": str(CACHE_DIR),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # fmt: skip
    command = [sys.executable, str(SCRIPT), f"--checkpoint={run_dir}", "--dataset=folder",
               f"--data_dir={tmp_path / 'pics'}", "--mesh=4x2", "--batch_size=4", "--prompts=single", f"--out={out}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "image->text" in done.stdout and "top-1" in done.stdout
    saved = json.loads(out.read_text())
    assert saved["class_names"] == ["golden_retriever", "tabby_cat", "zebra"] and saved["mesh"] == {"data": 4, "model": 2}
    assert_matches(saved["tasks"]["image->text"], expected, 3)
    assert Path(saved["tasks"]["image->text"]["confusion_png"]).is_file()
    # a bad flag value is a clear error and exit status 2, not a traceback
    bad = subprocess.run(command[:-1] + ["--dataset=esc50", f"--data_dir={tmp_path}"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "esc50.csv not found" in bad.stderr

    # class folders of audio (mixed file types, 8 kHz and 44.1 kHz): modality detected from the extensions
    for label, name in enumerate(["rain", "siren"]):
        (tmp_path / "sounds" / name).mkdir(parents=True)
        for k, rate in enumerate((8_000, 44_100)):
            soundfile.write(tmp_path / "sounds" / name / f"{k}.{'wav' if k else 'flac'}", tone(rng, label, rate, 0.3), rate)
    results = job.run(options(run_dir, tmp_path, dataset="folder", data_dir=str(tmp_path / "sounds"), mesh="2x4",
                              batch_size=2, prompts="single"))  # fmt: skip
    assert results["num_examples"] == 4 and "audio->text" in results["tasks"]


def test_precomputed_manifest_split_retrieval_and_zero_shot(run_dir, reference, tmp_path):
    paths = demo.generate(tmp_path / "demo", train_per_class=0, test_per_class=2)
    out = tmp_path / "pre"
    config = precompute.PrecomputeConfig(image_size=32, fbank=audio.FbankConfig(max_frames=128, num_mel_bins=32))
    metadata = precompute.precompute(paths.manifests["test"], out, config, progress=False)
    fields = [records.decode_example(r) for r in _all_records(out, metadata)]
    fields.sort(key=lambda f: f["row_id"])
    embeddings = {
        "image": reference["images"]([records.image_of(f) for f in fields]),
        "audio": reference["audio_features"](np.stack([f["audio"] for f in fields])),
        "text": reference["texts"]([f["caption"] for f in fields]),
    }
    labels = metadata["labels"]
    label_ids = np.array([labels.index(f["label"]) for f in fields])
    results = job.run(options(run_dir, tmp_path, dataset="precomputed", data_dir=str(out), mesh="8x1", batch_size=8,
                              prompts="single"))  # fmt: skip
    assert results["num_examples"] == 20 and results["retrieval_text_mode"] == "caption"
    expected = retrieval.retrieval_metrics(embeddings)
    assert expected and results["retrieval"].keys() == expected.keys()
    for key, value in expected.items():
        assert results["retrieval"][key] == pytest.approx(value, abs=1e-12), key
    names = [[w.strip() for w in label.split(",")] for label in labels]  # every synonym, averaged
    for modality in ("image", "audio"):
        classes = []
        for synonyms in names:
            prompt = reference["texts"]([prompt_sets["single"][modality][0].format(w) for w in synonyms]).mean(0)
            classes.append(prompt / np.linalg.norm(prompt))
        assert_matches(results["tasks"][f"{modality}->text"], brute_force(embeddings[modality], np.stack(classes), label_ids), 10)


def _all_records(out: Path, metadata: dict) -> list[bytes]:
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    source = ArrayRecordDataSource(precompute.shard_paths(out, metadata))
    return [source[i] for i in range(len(source))]
