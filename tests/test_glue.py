"""GLUE readers (data_pipelines/glue.py): the GLUE download's real TSV layouts, a prepared TFDS `glue` dataset
(array_record and tfrecord, built here without network or TensorFlow), label-order agreement between the two,
unlabeled test splits, skipped rows, and the seeded stratified hold-out."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import glue
from data_pipelines.downstream import ClassOrderError, DatasetError

# ----------------------------------------------------------------------------------------------- fixture data
# Rows per (task, split) as (text_a, text_b, label name or STS-B score). A few texts carry unbalanced quotes: GLUE's
# files are unquoted, so a csv reader that honours quotes would merge the following lines into one field.

ROWS = {
    ("mnli", "train"): [
        ("Conceptually cream skimming has two basic dimensions.", "Product and geography make it work.", "neutral"),
        ("you know during the season i guess", "You lose the things to the following level.", "entailment"),
        ("One of our number will carry out your instructions.", "A member of my team will do it.", "entailment"),
        ("How do you know?", "This information belongs to them.", "contradiction")],
    ("mnli", "dev_matched"): [
        ("The new rights are nice enough", "Everyone really likes the newest benefits", "neutral"),
        ('He said "it\'s fine.', "He complained loudly.", "contradiction"),
        ("Gays and lesbians.", "Heterosexuals.", "contradiction"),
        ("At the end of Rue des Francs-Bourgeois", "The Place des Vosges is built of stone.", "entailment")],
    ("mnli", "dev_mismatched"): [
        ("Your contribution helped make it possible", "Your contributions were of no help.", "contradiction"),
        ("The answer has nothing to do with this.", "Dictionaries are indeed exercises.", "neutral"),
        ("We serve a classic Tuscan meal", "We serve a meal of Florentine terrine.", "entailment")],
    ("qnli", "dev"): [
        ("What came into force after the new constitution?", "The new constitution came into force.", "entailment"),
        ("What is the first major city in the stream?", "The Rhine flows into Lake Constance.", "not_entailment")],
    ("qqp", "dev"): [
        ("Why are African-Americans so beautiful?", "Why are hispanics so beautiful?", "not_duplicate"),
        ("I want to pursue PhD in CS. How?", "How can I get a PhD in computer science?", "duplicate"),
        ('Is "Inception" overrated?', "Is Inception a good movie?", "duplicate")],
    ("sst2", "train"): [
        ("hide new secretions from the parental units ", None, "negative"),
        ("contains no wit , only labored gags ", None, "negative"),
        ("that loves its characters ", None, "positive")],
    ("sst2", "dev"): [
        ("it 's a charming and often affecting journey . ", None, "positive"),
        ('" unflinchingly bleak and desperate ', None, "negative"),  # stray quote (a real SST-2 text)
        ("allows us to hope that nolan is poised to embark a major career ", None, "positive"),
        ("the acting , costumes , music , cinematography and sound are all astounding ", None, "positive")],
    ("cola", "dev"): [
        ("The sailors rode the breeze clear of the rocks.", None, "acceptable"),
        ("The more we study verbs, the crazier they get.", None, "acceptable"),
        ("They drank the pub.", None, "unacceptable")],
    ("mrpc", "dev"): [
        ("He said the pie business doesn 't fit the company 's strategy .",
         '" The pie business does not fit our long-term growth strategy .', "equivalent"),
        ("Magnarelli said Racicot hated the Iraqi regime .", 'His wife said he was " 100 percent " behind it .',
         "not_equivalent")],
    ("mrpc", "msr_paraphrase_test"): [
        ("PCCW 's chief operating officer , Mike Butcher , will report to Mr So .",
         "Current Chief Operating Officer Mike Butcher will report to So .", "equivalent"),
        ("The world 's two largest automakers said their sales declined .",
         "The world 's biggest auto maker said sales of cars fell .", "not_equivalent"),
        ('According to the federal Centers , " the disease is spreading .', "The CDC said the disease spread .",
         "equivalent")],
    ("rte", "dev"): [
        ("Dana Reeve died of lung cancer.", "Christopher Reeve had an accident.", "not_entailment"),
        ("Yet, antibiotics are losing their effectiveness.", "Bacteria is winning the war.", "entailment")],
    ("stsb", "dev"): [
        ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0),
        ("A young child is riding a horse.", "A child is riding a horse.", 4.75),
        ("A man is slicing a bun.", "A man is slicing a tomato.", 0.6)],
    ("wnli", "dev"): [
        ("The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned.", "not_entailment"),
        ("Jane knocked on Susan's door but she did not answer.", "Susan did not answer.", "entailment")],
}

# How GLUE's TSVs spell labels (the semantics of the 0/1 columns, per the GLUE/TFDS documentation), and TFDS's
# ClassLabel names in TFDS's own id order (tensorflow_datasets/text/glue.py): written down here independently of
# the module under test.
TSV_SPELLING = {
    "sst2": {"negative": "0", "positive": "1"}, "cola": {"unacceptable": "0", "acceptable": "1"},
    "mrpc": {"not_equivalent": "0", "equivalent": "1"}, "qqp": {"not_duplicate": "0", "duplicate": "1"},
    "wnli": {"not_entailment": "0", "entailment": "1"},
}  # fmt: skip
TFDS_NAMES = {
    "mnli": ["entailment", "neutral", "contradiction"], "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"], "qnli": ["entailment", "not_entailment"],
}  # fmt: skip
MNLI_TRAIN_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                     "sentence2_parse sentence1 sentence2 label1 gold_label").split()  # fmt: skip
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-2] + "label1 label2 label3 label4 label5 gold_label".split()
MRPC_HEADER = ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"]  # as msr_paraphrase_*.txt, BOM kept
STSB_HEADER = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()
# transformers' processors (src/transformers/data/processors/glue.py) read these column positions: our fixture
# files must put the texts and labels there, which shows the header names we read by are the same columns.
TRANSFORMERS_COLUMNS = {
    "MNLI/dev_matched.tsv": (8, 9, -1), "MNLI/train.tsv": (8, 9, -1), "QNLI/dev.tsv": (1, 2, -1),
    "QQP/dev.tsv": (3, 4, 5), "SST-2/dev.tsv": (0, None, 1), "CoLA/dev.tsv": (3, None, 1), "MRPC/dev.tsv": (3, 4, 0),
    "RTE/dev.tsv": (1, 2, -1), "STS-B/dev.tsv": (7, 8, -1), "WNLI/dev.tsv": (1, 2, -1),
}  # fmt: skip


def tsv_label(task: str, label) -> str:
    if task == "stsb":
        return f"{label:.3f}"
    return TSV_SPELLING[task][label] if task in TSV_SPELLING else label


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def tsv_line(fields) -> str:
    return "\t".join(str(field) for field in fields)


def glue_rows(task: str, split: str) -> list[list[str]]:
    """The data rows of one GLUE file in its real column layout."""
    rows = []
    for i, (a, b, label) in enumerate(ROWS[task, split]):
        spelled = tsv_label(task, label)
        if task == "mnli":
            parses = [f"( {a} )", f"( {b} )", f"(ROOT {a})", f"(ROOT {b})"]
            votes = [spelled] * (1 if split == "train" else 5)
            rows.append([i, 31193 + i, f"{31193 + i}n", "government", *parses, a, b, *votes, spelled])
        elif task in ("qnli", "rte", "wnli"):
            rows.append([i, a, b, spelled])
        elif task == "qqp":
            rows.append([201359 + i, 303345 + i, 303346 + i, a, b, spelled])
        elif task == "sst2":
            rows.append([a, spelled])
        elif task == "cola":
            rows.append(["gj04", spelled, "" if spelled == "1" else "*", a])
        elif task == "mrpc":
            rows.append([spelled, 1000 + i, 2000 + i, a, b])
        elif task == "stsb":
            rows.append([i, "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", a, b, spelled])
    return rows


def make_glue(root: Path) -> Path:
    """A tiny GLUE download (download_glue_data.py layout) with every task's real headers and quirks."""
    headers = {"qnli": ["index", "question", "sentence", "label"], "rte": ["index", "sentence1", "sentence2", "label"],
               "wnli": ["index", "sentence1", "sentence2", "label"], "sst2": ["sentence", "label"],
               "qqp": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], "mrpc": MRPC_HEADER,
               "stsb": STSB_HEADER, "cola": None}  # fmt: skip
    folders = {"mnli": "MNLI", "qnli": "QNLI", "qqp": "QQP", "sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC",
               "rte": "RTE", "stsb": "STS-B", "wnli": "WNLI"}  # fmt: skip
    for task, split in ROWS:
        header = (MNLI_TRAIN_HEADER if split == "train" else MNLI_DEV_HEADER) if task == "mnli" else headers[task]
        name = f"{split}.txt" if split.startswith("msr") else f"{split}.tsv"
        lines = [tsv_line(row) for row in glue_rows(task, split)]
        if task == "qqp":  # a question with a line break: two broken rows (real QQP train.tsv has such rows),
            lines[1:1] = ["201400\t303400\t303401\tWhat is the best way to learn",
                          "Python?\tHow do I learn Python?\t1"]
            lines.append("201401\t303402\t303403\tIs this a question?\tYes it is\t")  # and one without label
        write_lines(root / folders[task] / name, ([tsv_line(header)] if header else []) + lines)
    # unlabeled test files, as GLUE distributes them
    write_lines(root / "SST-2" / "test.tsv", ["index\tsentence", "0\tuneasy mishmash of styles and genres ."])
    write_lines(root / "MRPC" / "test.tsv", ["index\t#1 ID\t#2 ID\t#1 String\t#2 String", "0\t1\t2\tA .\tB ."])
    write_lines(root / "MNLI" / "test_matched.tsv", [tsv_line(MNLI_DEV_HEADER[:10]), tsv_line(range(10))])
    return root


def expected_set(task: str, split: str):
    """(text_a, text_b, labels) as the reader must return them: ids in GLUE's order, which `label_names` gives."""
    rows = ROWS[task, split]
    texts_b = None if rows[0][1] is None else tuple(b for _, b, _ in rows)
    spec = glue.task_spec("mnli_m" if task == "mnli" else task)
    if spec.is_regression:
        return tuple(a for a, _, _ in rows), texts_b, np.asarray([s for _, _, s in rows], np.float32)
    return tuple(a for a, _, _ in rows), texts_b, np.asarray([spec.label_names.index(n) for _, _, n in rows])


def assert_set(data: glue.TextPairSet, task: str, split: str) -> None:
    text_a, text_b, labels = expected_set(task, split)
    assert data.text_a == text_a and data.text_b == text_b
    np.testing.assert_array_equal(data.labels, labels)
    assert data.labels.dtype == (np.float32 if task == "stsb" else np.int64)


# ----------------------------------------------------------------------------------------------- TFDS fixture

TFDS_SPLITS = {"mnli": {"train": "train", "validation_matched": "dev_matched",
                        "validation_mismatched": "dev_mismatched"},
               "sst2": {"train": "train", "validation": "dev"}, "mrpc": {"validation": "dev"},
               "qnli": {"validation": "dev"}, "stsb": {"validation": "dev"}}  # fmt: skip
TFDS_TEXTS = {"mnli": ("premise", "hypothesis"), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
              "qnli": ("question", "sentence"), "stsb": ("sentence1", "sentence2")}  # fmt: skip


def make_tfds_glue(data_dir: Path, configs=("mnli", "sst2", "mrpc", "stsb"), names=TFDS_NAMES,
                   file_format="array_record"):
    """`glue/<config>` prepared by a custom builder with the features of TFDS's glue builder (texts, a ClassLabel
    in TFDS's id order or a float32 score, idx = TSV row) and its split names, plus unlabeled test splits (-1)."""
    import tensorflow_datasets as tfds

    class Glue(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("2.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config) for config in configs]

        def _info(self):
            config = self.builder_config.name
            label = np.float32 if config == "stsb" else tfds.features.ClassLabel(names=names[config])
            features = {name: tfds.features.Text() for name in TFDS_TEXTS[config]}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {**features, "label": label, "idx": np.int32}))  # fmt: skip

        def _split_generators(self, dl_manager):
            config = self.builder_config.name
            splits = {name: self._generate_examples(config, ours) for name, ours in TFDS_SPLITS[config].items()}
            test = "test_matched" if config == "mnli" else "test"
            return {**splits, test: self._generate_examples(config, None)}

        def _generate_examples(self, config, split):
            rows = ROWS[config, split] if split else [("unlabeled a", "unlabeled b", None)] * 2
            for index, (a, b, label) in enumerate(rows):
                texts = dict(zip(TFDS_TEXTS[config], (a, b)))
                if label is None:
                    value = -1.0 if config == "stsb" else -1
                else:
                    value = np.float32(label) if config == "stsb" else TFDS_NAMES[config].index(label)
                yield index, {**texts, "label": value, "idx": index}

    Glue.name = "glue"
    for config in configs:
        Glue(data_dir=str(data_dir), config=config, file_format="array_record").download_and_prepare()
    if file_format == "tfrecord":
        for config in configs:
            to_tfrecord(next((data_dir / "glue" / config).iterdir()))
    return data_dir


def to_tfrecord(directory: Path) -> None:
    """Rewrites a prepared array_record dataset as tfrecord shards: the same serialized tf.train.Example records in
    TFRecord framing (what TensorFlow's TFRecordWriter writes), and file_format=tfrecord in dataset_info.json."""
    from array_record.python import array_record_module

    for shard in sorted(directory.glob("*.array_record-*")):
        records = array_record_module.ArrayRecordReader(str(shard)).read_all()
        with open(str(shard).replace(".array_record-", ".tfrecord-"), "wb") as handle:
            for record in records:
                length = struct.pack("<Q", len(record))
                handle.write(length + struct.pack("<I", glue.masked_crc32c(length)))
                handle.write(record + struct.pack("<I", glue.masked_crc32c(record)))
        shard.unlink()
    info = json.loads((directory / "dataset_info.json").read_text())
    (directory / "dataset_info.json").write_text(json.dumps({**info, "fileFormat": "tfrecord"}))


# ----------------------------------------------------------------------------------------------- tests


def test_fixture_files_have_transformers_column_positions(tmp_path):
    root = make_glue(tmp_path / "glue_data")
    for name, (a, b, label) in TRANSFORMERS_COLUMNS.items():
        lines = (root / name).read_text(encoding="utf-8-sig").splitlines()
        rows = [line.split("\t") for line in lines[0 if name.startswith("CoLA") else 1:]]
        rows = [row for row in rows if len(row) == len(rows[0])][:2]  # QQP's broken rows aside
        task = {"SST-2": "sst2", "STS-B": "stsb"}.get(name.split("/")[0], name.split("/")[0].lower())
        expected = ROWS[task, Path(name).stem][:2]
        assert [(r[a], r[b] if b is not None else None, r[label]) for r in rows] == [
            (x, y, tsv_label(task, z)) for x, y, z in expected], name  # fmt: skip


@pytest.mark.parametrize("task", sorted(glue.TASKS))
def test_every_task_reads_its_evaluation_split_from_the_glue_download(tmp_path, task):
    root = make_glue(tmp_path / "glue_data")
    spec = glue.TASKS[task]
    data = glue.read_glue(task, root, "validation")
    fixture_task = "mnli" if task.startswith("mnli") else task
    assert_set(data, fixture_task, Path(spec.eval_file).stem)
    assert data.name == f"{task}/validation" and data.source == str(root / spec.folder / spec.eval_file)
    assert data.label_names == spec.label_names and data.is_regression == (task == "stsb")
    assert len(data) == len(ROWS[fixture_task, Path(spec.eval_file).stem])
    # the task folder itself is accepted as data_dir too
    assert glue.read_glue(task, root / spec.folder, "validation").text_a == data.text_a


def test_glue_label_ids_quotes_bom_and_train_files(tmp_path):
    root = make_glue(tmp_path / "glue_data")
    mnli = glue.read_glue("MNLI-m", root, "validation")
    assert mnli.label_names == ("contradiction", "entailment", "neutral")  # transformers' MnliProcessor order
    assert mnli.labels.tolist() == [2, 0, 0, 1] and mnli.text_a[1] == 'He said "it\'s fine.'
    sst2 = glue.read_glue("SST-2", root, "validation")
    assert sst2.labels.tolist() == [1, 0, 1, 1] and sst2.label_names == ("negative", "positive")
    assert sst2.text_a[1] == '" unflinchingly bleak and desperate ' and not sst2.skipped  # the quote is text
    cola = glue.read_glue("cola", root, "validation")  # no header: the first line is an example
    assert cola.text_a[0] == "The sailors rode the breeze clear of the rocks." and cola.labels.tolist() == [1, 1, 0]
    assert glue.read_glue("mrpc", root, "validation").labels.tolist() == [1, 0]  # BOM'd "Quality" header found
    assert_set(glue.read_glue("mnli_mm", root, "train"), "mnli", "train")  # MNLI train's 12-column layout
    assert_set(glue.read_glue("sst2", root, "train"), "sst2", "train")


def test_qqp_rows_with_missing_fields_are_skipped_and_reported(tmp_path):
    root = make_glue(tmp_path / "glue_data")
    qqp = glue.read_glue("qqp", root, "validation")
    assert_set(qqp, "qqp", "dev")  # the three good rows, the quoted one included
    assert [(p.line, p.reason) for p in qqp.skipped] == [
        (3, "4 field(s), the header has 6"), (4, "3 field(s), the header has 6"), (7, "empty 'is_duplicate'")]
    report = glue.skipped_report(qqp, shown=2)
    assert report.startswith(f"{root / 'QQP' / 'dev.tsv'}: 3 row(s) skipped: 1 x 4 field(s), the header has 6, 1 x 3 "
                             "field(s), the header has 6, 1 x empty 'is_duplicate'; first: line 3 (row 1): 4 field(s)")
    assert report.endswith("; and 1 more") and "line 4 (row 2)" in report
    assert glue.skipped_report(glue.read_glue("rte", root, "validation")) == ""
    assert glue.describe(qqp)["num_skipped"] == 3
    assert glue.describe(qqp)["class_counts"] == {"not_duplicate": 1, "duplicate": 2}


def test_test_splits_need_public_labels(tmp_path):
    root = make_glue(tmp_path / "glue_data")
    with pytest.raises(glue.UnlabeledSplitError, match="GLUE test labels are not public"):
        glue.read_glue("sst2", root, "test")
    with pytest.raises(glue.UnlabeledSplitError, match="test_matched.tsv has no labels"):
        glue.read_glue("mnli_m", root, "test")
    # MRPC: the labeled Microsoft test file the GLUE download keeps (R5.3 scores MRPC on test)
    mrpc = glue.read_glue("mrpc", root, "test")
    assert_set(mrpc, "mrpc", "msr_paraphrase_test")
    assert mrpc.source.endswith("msr_paraphrase_test.txt") and glue.TASKS["mrpc"].reference_split == "test"
    (root / "MRPC" / "msr_paraphrase_test.txt").unlink()
    with pytest.raises(glue.UnlabeledSplitError, match="msr_paraphrase_test.txt not found: MRPC's test.tsv"):
        glue.read_glue("mrpc", root, "test")


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_agrees_with_the_glue_download(tmp_path, file_format):
    root = make_glue(tmp_path / "glue_data")
    tfds_dir = make_tfds_glue(tmp_path / "tfds", file_format=file_format)
    assert (tfds_dir / "glue" / "mnli" / "2.0.0" / "dataset_info.json").is_file()
    for task, split in [("mnli_m", "validation"), ("mnli_mm", "validation"), ("mnli_m", "train"),
                        ("sst2", "validation"), ("sst2", "train"), ("mrpc", "validation"),
                        ("stsb", "validation")]:  # fmt: skip
        from_tfds, from_tsv = glue.read_glue(task, tfds_dir, split), glue.read_glue(task, root, split)
        # TFDS numbers MNLI entailment/neutral/contradiction: mapped by name, the same ids as the TSV
        assert from_tfds.text_a == from_tsv.text_a and from_tfds.text_b == from_tsv.text_b, (task, split)
        np.testing.assert_array_equal(from_tfds.labels, from_tsv.labels)
        assert from_tfds.labels.dtype == from_tsv.labels.dtype and from_tfds.label_names == from_tsv.label_names
        assert from_tfds.source.endswith(glue.task_spec(task).tfds_splits[split])
    with pytest.raises(glue.UnlabeledSplitError, match="2 of 2 examples have no label.*not public"):
        glue.read_glue("mnli_m", tfds_dir, "test")
    with pytest.raises(glue.UnlabeledSplitError, match="msr_paraphrase_test.txt"):
        glue.read_glue("mrpc", tfds_dir, "test")
    with pytest.raises(DatasetError, match="no split 'test_mismatched'"):
        glue.read_glue("mnli_mm", tfds_dir, "test")
    with pytest.raises(DatasetError, match="no prepared TFDS dataset 'glue/qqp'"):
        glue.read_glue("qqp", tfds_dir, "validation")
    with pytest.raises(DatasetError, match="holds 'glue/sst2', not 'glue/mnli'"):
        glue.read_glue("mnli_m", tfds_dir / "glue" / "sst2" / "2.0.0", "validation")


def test_tfds_label_names_must_match_and_unreadable_formats_say_so(tmp_path):
    wrong = {**TFDS_NAMES, "qnli": ["entailment", "contradiction"]}
    tfds_dir = make_tfds_glue(tmp_path / "tfds", configs=("qnli",), names=wrong)
    with pytest.raises(ClassOrderError, match=r"label names \['entailment', 'contradiction'\]"):
        glue.read_glue("qnli", tfds_dir, "validation")
    tfds_dir = make_tfds_glue(tmp_path / "tfds_right", configs=("qnli",))
    assert glue.read_glue("qnli", tfds_dir, "validation").labels.tolist() == [0, 1]
    info_path = tfds_dir / "glue" / "qnli" / "2.0.0" / "dataset_info.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "fileFormat": "riegeli"}))
    with pytest.raises(DatasetError, match="stored as riegeli, which cannot be read without TensorFlow"):
        glue.read_glue("qnli", tfds_dir, "validation")


def test_tfrecord_framing(tmp_path):
    assert glue.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    tfds_dir = make_tfds_glue(tmp_path / "tfds", configs=("sst2",), file_format="tfrecord")
    shard = next((tfds_dir / "glue" / "sst2" / "2.0.0").glob("glue-validation.tfrecord-*"))
    assert len(list(glue.tfrecord_payloads(shard))) == len(ROWS["sst2", "dev"])
    data = shard.read_bytes()
    shard.write_bytes(data[:-3])
    with pytest.raises(DatasetError, match="truncated TFRecord record"):
        list(glue.tfrecord_payloads(shard))
    shard.write_bytes(b"\x05" + data[1:])
    with pytest.raises(DatasetError, match="not a TFRecord file"):
        glue.read_glue("sst2", tfds_dir, "validation")


def test_layout_errors_name_the_file(tmp_path):
    root = make_glue(tmp_path / "glue_data")
    with pytest.raises(DatasetError, match=r"neither the GLUE download \(.*/MNLI/dev_matched.tsv\) nor a prepared"):
        glue.read_glue("mnli_m", tmp_path / "elsewhere", "validation")
    dev = root / "RTE" / "dev.tsv"
    dev.write_text(dev.read_text().replace("\tlabel\n", "\tgold\n", 1))
    with pytest.raises(DatasetError, match=r"RTE/dev.tsv: missing column\(s\) \['label'\]"):
        glue.read_glue("rte", root, "validation")
    dev = root / "WNLI" / "dev.tsv"
    dev.write_text(dev.read_text().replace("\t1\n", "\tyes\n"))
    with pytest.raises(DatasetError, match=r"WNLI/dev.tsv:3: label 'yes' is not one of \['0', '1'\]"):
        glue.read_glue("wnli", root, "validation")
    dev = root / "STS-B" / "dev.tsv"
    dev.write_text(dev.read_text().replace("\t4.750\n", "\tfour\n"))
    with pytest.raises(DatasetError, match="STS-B/dev.tsv:3: score 'four' is not a number"):
        glue.read_glue("stsb", root, "validation")
    write_lines(root / "QNLI" / "dev.tsv", ["index\tquestion\tsentence\tlabel", "0\tq only"])
    with pytest.raises(DatasetError, match=r"no usable rows \(1 skipped: line 2 \(row 0\): 2 field"):
        glue.read_glue("qnli", root, "validation")
    (root / "CoLA" / "dev.tsv").unlink()
    with pytest.raises(DatasetError, match="CoLA/dev.tsv not found"):
        glue.read_glue("cola", root, "validation")
    with pytest.raises(DatasetError, match="split must be one of"):
        glue.read_glue("cola", root, "dev")


def test_task_specs_follow_the_reference_protocol():
    lengths = {name: spec.max_length for name, spec in glue.TASKS.items()}  # docs/reference.md R5.3
    assert lengths == {"mnli_m": 160, "mnli_mm": 160, "qnli": 160, "qqp": 128, "rte": 128, "mrpc": 128, "stsb": 128,
                       "wnli": 128, "sst2": 96, "cola": 64}  # fmt: skip
    assert {n for n, s in glue.TASKS.items() if s.accumulation == 2} == {"rte", "mrpc", "cola", "stsb"}
    assert [(s.eval_file, s.eval_split) for s in (glue.TASKS["mnli_m"], glue.TASKS["mnli_mm"], glue.TASKS["rte"])] == [
        ("dev_matched.tsv", "validation_matched"), ("dev_mismatched.tsv", "validation_mismatched"),
        ("dev.tsv", "validation")]  # fmt: skip
    assert {n for n, s in glue.TASKS.items() if s.reference_split == "test"} == {"mrpc"}
    assert glue.TASKS["mnli_m"].num_labels == 3 and glue.TASKS["stsb"].num_labels == 1
    folders = {"MNLI", "QNLI", "QQP", "SST-2", "CoLA", "MRPC", "RTE", "STS-B", "WNLI"}
    assert {s.folder for s in glue.TASKS.values()} == folders
    assert glue.task_spec("STS-B") is glue.TASKS["stsb"] and glue.task_spec("MNLI-mm") is glue.TASKS["mnli_mm"]
    with pytest.raises(DatasetError, match="mnli_m or mnli_mm"):
        glue.task_spec("mnli")
    with pytest.raises(DatasetError, match="unknown GLUE task 'squad'"):
        glue.task_spec("squad")


def make_set(counts, name="toy") -> glue.TextPairSet:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    labels = labels[np.random.default_rng(0).permutation(len(labels))]
    return glue.TextPairSet(name, tuple(f"s{i}" for i in range(len(labels))), None, labels,
                            tuple(f"class{c}" for c in range(len(counts))))  # fmt: skip


def test_text_pair_set_checks_itself():
    with pytest.raises(ValueError, match="3 labels for 2 examples"):
        glue.TextPairSet("x", ("a", "b"), None, np.zeros(3, np.int64), ("n", "p"))
    with pytest.raises(ValueError, match="labels must be float32"):
        glue.TextPairSet("x", ("a",), ("b",), np.zeros(1, np.int64), ())
    with pytest.raises(ValueError, match="label ids outside 0..1"):
        glue.TextPairSet("x", ("a",), None, np.array([2]), ("n", "p"))
    with pytest.raises(ValueError, match="2 first texts but 1 second texts"):
        glue.TextPairSet("x", ("a", "b"), ("c",), np.zeros(2, np.int64), ("n", "p"))
