"""``--dataset-type tfrecord|mindrecord``: the ModelZoo's pre-tokenized records, read by mindspore.dataset.

The records are written here from the same toy GLUE folders and the same tokenizer as the TSV runs
(TFRecord by a small test-only writer: MindSpore reads TFRecord but cannot write it; MindRecord by
``mindspore.mindrecord.FileWriter``), so a run on them must end exactly where the TSV run ends.
Tests that read records skip where MindSpore is not installed.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from q8core.config import RunConfig
from q8core.plugins import load_registry
from q8core.tokenization import encode, load_tokenizer

from helpers import run_q8

RUN = ["--max-steps", "6", "--train-batch-size", "16", "--eval-steps", "3", "--learning-rate", "3e-3",
       "--seed", "7", "--quiet"]


# -- a test-only TFRecord writer: framing, masked CRC-32C, tf.train.Example by hand ---------------
def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64: ten bytes of two's complement
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(values) -> bytes:
    """tf.train.Feature: float_list = 2, int64_list = 3, each a packed ``repeated value = 1``."""
    values = np.asarray(values).reshape(-1)
    if values.dtype.kind == "f":
        return _field(2, _field(1, struct.pack(f"<{len(values)}f", *values.tolist())))
    return _field(3, _field(1, b"".join(_varint(int(v)) for v in values)))


def tf_example(features: dict) -> bytes:
    """tf.train.Example{features = 1: Features{feature = 1: map<string, Feature>}}."""
    entries = b"".join(_field(1, _field(1, name.encode()) + _field(2, _feature(values)))
                       for name, values in features.items())
    return _field(1, entries)


def write_tfrecord(path: Path, rows: list[dict]) -> Path:
    with open(path, "wb") as f:
        for row in rows:
            data = tf_example(row)
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data)))
    return path


def write_mindrecord(path: Path, rows: list[dict]) -> Path:
    from mindspore.mindrecord import FileWriter

    schema = {}
    for name, value in rows[0].items():
        value = np.asarray(value)
        kind = "float32" if value.dtype.kind == "f" else "int64"
        schema[name] = {"type": kind, "shape": [-1]} if value.ndim else {"type": kind}
    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.add_schema(schema, "glue")
    writer.write_raw_data([{name: (np.asarray(v, dtype=np.float32 if schema[name]["type"] == "float32" else np.int64)
                                   if schema[name].get("shape") else v) for name, v in row.items()} for row in rows])
    writer.commit()
    return path


# -- records from a GLUE folder, tokenized as the TSV run tokenizes it ---------------------------
def record_rows(tiny_bert: Path, data_dir: Path, task_name: str, split: str, seq_length: int) -> list[dict]:
    task = load_registry().task(task_name)
    arrays = encode(task.read(data_dir, split), load_tokenizer(tiny_bert), task, seq_length)
    return [{"input_ids": arrays["input_ids"][i], "input_mask": arrays["attention_mask"][i],
             "segment_ids": arrays["token_type_ids"][i],
             "label_ids": (np.float32(arrays["labels"][i]) if task.is_regression else int(arrays["labels"][i]))}
            for i in range(len(arrays["labels"]))]


def write_records(tiny_bert, data_dir: Path, out: Path, task: str, dataset_type: str, seq_length: int = 32,
                  names=("train", "eval")) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for split, name in zip(("train", "dev"), names):
        rows = record_rows(tiny_bert, data_dir, task, split, seq_length)
        if dataset_type == "tfrecord":
            rows = [{**row, "label_ids": [row["label_ids"]]} for row in rows]  # run_classifier.py: a list of one
            write_tfrecord(out / f"{name}.tf_record", rows)
        else:
            write_mindrecord(out / f"{name}.mindrecord", rows)
    return out


@pytest.fixture(scope="module")
def mindspore_dataset():
    return pytest.importorskip("mindspore.dataset", reason="MindSpore is not installed")


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval_results.json").read_text())


def _train_log(run_dir: Path) -> list:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], json.dumps(r.get("ema"), sort_keys=True)) for r in records if r["type"] == "train"]


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = _results(a), _results(b)
    assert ra["metrics"] == rb["metrics"]
    assert (ra["best_step"], ra["best_metric"]) == (rb["best_step"], rb["best_metric"])
    last = f"checkpoint-{ra['step']}"
    for name in ("model.safetensors", "quant_state.safetensors"):
        assert (a / last / name).read_bytes() == (b / last / name).read_bytes(), name
    assert _train_log(a) == _train_log(b)


def _one_line_error(code: int, err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith("q8: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# -- no MindSpore needed ---------------------------------------------------------------------------
def test_crc32c_of_the_test_writer():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0


def test_dataset_type_is_stored_and_old_run_configs_read_as_tsv(tmp_path):
    config = RunConfig(task="sst-2", model="m", data_dir=str(tmp_path), output_dir="x", dataset_type="tfrecord")
    config.save(tmp_path)
    assert json.loads((tmp_path / "run_config.json").read_text())["dataset_type"] == "tfrecord"
    assert RunConfig.load(tmp_path) == config
    old = config.to_dict()
    del old["dataset_type"]
    assert RunConfig.from_dict(old).dataset_type == "tsv"


def test_records_need_a_data_dir_and_their_files(tiny_bert, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["run", "--task", "sst-2", "--model", str(tiny_bert), "--output-dir", str(out), *RUN]
    code, _, err = run_q8([*base, "--dataset-type", "tfrecord"], capsys)
    _one_line_error(code, err, "--dataset-type tfrecord", "--data-dir")
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "train.tf_record").write_bytes(b"")
    code, _, err = run_q8([*base, "--dataset-type", "tfrecord", "--data-dir", str(folder)], capsys)
    _one_line_error(code, err, f"{folder / 'eval.tf_record'} not found", "dev.tf_record", "train.tf_record")
    code, _, err = run_q8([*base, "--dataset-type", "mindrecord", "--data-dir", str(folder)], capsys)
    _one_line_error(code, err, f"{folder / 'train.mindrecord'} not found")
    (folder / "train.mindrecord").write_bytes(b"")
    code, _, err = run_q8([*base, "--dataset-type", "mindrecord", "--data-dir", str(folder)], capsys)
    _one_line_error(code, err, f"{folder / 'train.mindrecord.db'} not found", "index")
    (folder / "train.tfrecord").write_bytes(b"")
    code, _, err = run_q8([*base, "--dataset-type", "tfrecord", "--data-dir", str(folder)], capsys)
    _one_line_error(code, err, "both train.tf_record and train.tfrecord")
    code, _, err = run_q8([*base, "--dataset-type", "csv", "--data-dir", str(folder)], capsys)
    assert code == 2 and "'csv' is not one of 'tsv', 'tfrecord', 'mindrecord'" in err
    assert not out.exists()


def test_file_layout_accepts_the_modelzoo_names_and_mnli_splits(tmp_path):
    from q8core.records import split_file

    registry = load_registry()
    mnli, sst2 = registry.task("mnli"), registry.task("sst-2")
    for name in ("train.tf_record", "eval.tf_record", "dev_mismatched.tf_record", "eval.mindrecord",
                 "eval.mindrecord.db", "train.mindrecord0", "train.mindrecord0.db"):
        (tmp_path / name).write_bytes(b"")
    assert split_file(mnli, tmp_path, "dev_matched", "tfrecord").name == "eval.tf_record"
    assert split_file(mnli, tmp_path, "dev_mismatched", "tfrecord").name == "dev_mismatched.tf_record"
    assert split_file(sst2, tmp_path, "dev", "mindrecord").name == "eval.mindrecord"
    assert split_file(sst2, tmp_path, "train", "mindrecord").name == "train.mindrecord0"  # first of N shards


def test_without_mindspore_the_error_says_what_to_install(tiny_bert, sst2_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "records"
    folder.mkdir()
    for name in ("train.tf_record", "eval.tf_record"):
        (folder / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "mindspore.dataset", None)  # `import mindspore.dataset` fails
    out = tmp_path / "run"
    code, _, err = run_q8(["run", "--task", "sst-2", "--model", str(tiny_bert), "--output-dir", str(out),
                           "--dataset-type", "tfrecord", "--data-dir", str(folder), *RUN], capsys)
    _one_line_error(code, err, "--dataset-type tfrecord needs MindSpore's dataset reader: pip install",
                    "mindspore==")
    assert not out.exists()


# -- records read through mindspore.dataset -------------------------------------------------------
def test_tfrecord_writer_is_read_back_by_mindspore(mindspore_dataset, tmp_path):
    rows = [{"input_ids": [2, 7, 3, 0], "input_mask": [1, 1, 1, 0], "segment_ids": [0, 0, 0, 0],
             "label_ids": [1], "score": np.float32([2.5]), "negative": [-5]}]
    path = write_tfrecord(tmp_path / "x.tf_record", rows)
    read = list(mindspore_dataset.TFRecordDataset([str(path)], shuffle=False)
                .create_dict_iterator(num_epochs=1, output_numpy=True))
    assert len(read) == 1
    got = read[0]
    assert got["input_ids"].tolist() == [2, 7, 3, 0] and got["input_mask"].dtype == np.int64
    assert got["label_ids"].tolist() == [1] and got["negative"].tolist() == [-5]
    assert got["score"].dtype == np.float32 and got["score"].tolist() == [2.5]


@pytest.mark.parametrize("dataset_type,task,fixture", [("tfrecord", "sst-2", "sst2_dir"),
                                                      ("mindrecord", "sts-b", "stsb_dir")])
def test_a_run_on_records_ends_exactly_like_the_run_on_tsv(mindspore_dataset, tiny_bert, tmp_path, capsys, request,
                                                           dataset_type, task, fixture):
    data = request.getfixturevalue(fixture)
    # records 32 tokens wide (the run pads them to --max-seq-length 128, as the tokenizer does)
    records = write_records(tiny_bert, data, tmp_path / "records", task, dataset_type, seq_length=32)
    base = ["run", "--task", task, "--model", str(tiny_bert), *RUN]
    code, _, err = run_q8([*base, "--data-dir", str(data), "--output-dir", str(tmp_path / "tsv")], capsys)
    assert code == 0, err
    code, _, err = run_q8([*base, "--data-dir", str(records), "--dataset-type", dataset_type,
                           "--output-dir", str(tmp_path / "rec")], capsys)
    assert code == 0, err
    _assert_same_run(tmp_path / "tsv", tmp_path / "rec")
    assert json.loads((tmp_path / "rec" / "run_config.json").read_text())["dataset_type"] == dataset_type
    # q8 eval on the records gives the run's final metrics
    code, out, err = run_q8(["eval", "--checkpoint", str(tmp_path / "rec" / "checkpoint-6"), "--data-dir",
                             str(records), "--dataset-type", dataset_type, "--json"], capsys)
    assert code == 0, err
    shown = json.loads(out)
    assert {k: shown[k] for k in _results(tmp_path / "rec")["metrics"]} == _results(tmp_path / "rec")["metrics"]
    code, _, err = run_q8(["eval", "--checkpoint", str(tmp_path / "rec"), "--dataset-type", dataset_type], capsys)
    ext = ".tf_record" if dataset_type == "tfrecord" else ".mindrecord"
    _one_line_error(code, err, f"--dataset-type {dataset_type}", f"--data-dir with the folder that holds eval{ext}")


def test_resume_reads_the_records_again(mindspore_dataset, tiny_bert, sst2_dir, tmp_path, capsys):
    records = write_records(tiny_bert, sst2_dir, tmp_path / "records", "sst-2", "tfrecord",
                            names=("train", "dev"))  # dev.tf_record is accepted too
    args = ["run", "--task", "sst-2", "--model", str(tiny_bert), "--data-dir", str(records), "--dataset-type",
            "tfrecord", *RUN, "--save-steps", "2", "--logging-steps", "1"]
    code, _, err = run_q8([*args, "--output-dir", str(tmp_path / "a")], capsys)
    assert code == 0, err
    b = shutil.copytree(tmp_path / "a", tmp_path / "b")  # as if killed after checkpoint-4
    shutil.rmtree(b / "checkpoint-6")
    (b / "eval_results.json").unlink()
    code, _, err = run_q8(["run", "--resume", str(b), "--quiet"], capsys)
    assert code == 0, err
    assert "checkpoint-4" in err
    _assert_same_run(tmp_path / "a", b)


def _broken(tiny_bert, sst2_dir, folder: Path, edit) -> Path:
    """SST-2 records (tfrecord) with ``edit(rows)`` applied to the training rows."""
    rows = [{**row, "label_ids": [row["label_ids"]]} for row in record_rows(tiny_bert, sst2_dir, "sst-2", "train", 32)]
    folder.mkdir(parents=True)
    write_tfrecord(folder / "train.tf_record", edit(rows) or rows)
    write_tfrecord(folder / "eval.tf_record", rows[:8])
    return folder


def _drop(name):
    return lambda rows: [{k: v for k, v in row.items() if k != name} for row in rows]


def _set(index, **values):
    def edit(rows):
        rows[index] = {**rows[index], **values}
    return edit


@pytest.mark.parametrize("edit,needles", [
    (_drop("segment_ids"), ["records have no feature 'segment_ids'", "features: input_ids, input_mask, label_ids"]),
    (_set(5, label_ids=[2]), ["record 5: label_ids 2 is not a class id of sst-2 (0..1: 0, 1)"]),
    (_set(0, label_ids=np.float32([0.5])), ["record 0: label_ids 0.5 is not a class id"]),
    (_set(4, input_mask=[1] * 31), ["record 4: its token features differ in length (input_ids 32, input_mask 31, "
                                    "segment_ids 32)"]),
    (_set(7, input_ids=[2] * 16, input_mask=[1] * 16, segment_ids=[0] * 16),
     ["record 7 has 16 values per token feature, record 0 has 32"]),
    (_set(2, input_mask=[1, 0, 1] + [0] * 29), ["record 2: input_mask must be 1s (at least one) followed by 0s"]),
    (_set(1, input_ids=[2, 99] + [0] * 30), ["record 1: input_ids holds 99 at position 1, outside the model's "
                                             "vocabulary"]),
], ids=["missing-feature", "label-out-of-range", "fractional-label", "feature-lengths", "record-lengths",
        "mask", "vocabulary"])
def test_bad_records_end_in_one_line_naming_file_and_record(mindspore_dataset, tiny_bert, sst2_dir, tmp_path, capsys,
                                                            edit, needles):
    folder = _broken(tiny_bert, sst2_dir, tmp_path / "records", edit)
    out = tmp_path / "run"
    code, _, err = run_q8(["run", "--task", "sst-2", "--model", str(tiny_bert), "--data-dir", str(folder),
                           "--dataset-type", "tfrecord", "--output-dir", str(out), *RUN], capsys)
    _one_line_error(code, err, str(folder / "train.tf_record"), *needles)
    assert not out.exists()


def test_unreadable_files_and_too_long_records(mindspore_dataset, tiny_bert, sst2_dir, tmp_path, capsys):
    records = write_records(tiny_bert, sst2_dir, tmp_path / "records", "sst-2", "mindrecord", seq_length=32)
    base = ["run", "--task", "sst-2", "--model", str(tiny_bert), "--data-dir", str(records), "--output-dir",
            str(tmp_path / "run"), *RUN]
    # longer than --max-seq-length: cut when only padding goes, refused when tokens would
    code, _, err = run_q8([*base, "--dataset-type", "mindrecord", "--max-seq-length", "4"], capsys)
    _one_line_error(code, err, str(records / "train.mindrecord"), "tokens, more than the run's max_seq_length 4",
                    "--max-seq-length 32")
    (records / "eval.tf_record").write_bytes(b"not a tfrecord file")
    (records / "train.tf_record").write_bytes(b"")
    code, _, err = run_q8([*base, "--dataset-type", "tfrecord"], capsys)
    _one_line_error(code, err, str(records / "train.tf_record"), "not a readable TFRecord file")
    (records / "eval.mindrecord").write_bytes(b"garbage!!")
    code, _, err = run_q8([*base, "--dataset-type", "mindrecord", "--max-seq-length", "16"], capsys)
    _one_line_error(code, err, str(records / "eval.mindrecord"), "not a readable MindRecord file")
    assert not (tmp_path / "run").exists()


def test_padding_rows_of_a_tpu_eval_file_are_dropped(mindspore_dataset, tiny_bert, sst2_dir, tmp_path):
    from q8core import records as core_records

    task = load_registry().task("sst-2")
    rows = record_rows(tiny_bert, sst2_dir, "sst-2", "dev", 32)[:5]
    rows = [{**row, "label_ids": [row["label_ids"]], "is_real_example": [1]} for row in rows]
    pad = {"input_ids": [0] * 32, "input_mask": [0] * 32, "segment_ids": [0] * 32, "label_ids": [0],
           "is_real_example": [0]}
    folder = tmp_path / "records"
    folder.mkdir()
    write_tfrecord(folder / "eval.tf_record", rows + [pad, pad, pad])
    arrays = core_records.load(task, folder, "dev", "tfrecord", 16)
    assert arrays["input_ids"].shape == (5, 16) and arrays["labels"].dtype == np.int64
    assert arrays["input_ids"].tolist() == [list(row["input_ids"][:16]) for row in rows]
