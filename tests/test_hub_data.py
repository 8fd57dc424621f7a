"""GLUE through `datasets`: local copies give exactly the TSV examples; offline gives one clear line."""

from __future__ import annotations

import pytest

datasets = pytest.importorskip("datasets")

from conftest import similarity_rows, write_sst2, write_stsb  # noqa: E402
from helpers import run_q8  # noqa: E402

from q8core.config import RunConfig  # noqa: E402
from q8core.errors import Q8Error  # noqa: E402
from q8core.plugins import load_registry  # noqa: E402


def _sst2_dataset(tsv_dir, split):
    rows = [line.split("\t") for line in (tsv_dir / f"{split}.tsv").read_text().splitlines()[1:]]
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"]),
                                  "idx": datasets.Value("int32")})
    return datasets.Dataset.from_dict({"sentence": [r[0] for r in rows], "label": [int(r[1]) for r in rows],
                                       "idx": list(range(len(rows)))}, features=features)


def test_saved_dataset_gives_the_tsv_examples(tmp_path):
    tsv = write_sst2(tmp_path / "tsv", n_train=40, n_dev=12)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": _sst2_dataset(tsv, "train"),
                          "validation": _sst2_dataset(tsv, "dev")}).save_to_disk(str(saved))
    task = load_registry().task("sst-2")
    for split in ("train", "dev"):
        assert task.read(saved, split) == task.read(tsv, split)


def test_hub_parquet_layout_gives_the_tsv_examples(tmp_path):
    tsv = write_stsb(tmp_path / "tsv", n_train=30, n_dev=10)
    folder = tmp_path / "glue" / "stsb"
    for split, hub_split, seed in (("train", "train", 3), ("dev", "validation", 4)):
        rows = similarity_rows(30 if split == "train" else 10, seed)
        ds = datasets.Dataset.from_dict({"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows],
                                         "label": [float(r[2]) for r in rows], "idx": list(range(len(rows)))})
        folder.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(folder / f"{hub_split}-00000-of-00001.parquet"))
    task = load_registry().task("sts-b")
    for split in ("train", "dev"):
        assert task.read(tmp_path / "glue", split) == task.read(tsv, split)


def test_mnli_hub_label_order_is_mapped_by_name(tmp_path):
    hub_names = ["entailment", "neutral", "contradiction"]  # the hub's order differs from GLUE's TSV order
    ds = datasets.Dataset.from_dict(
        {"premise": ["p0", "p1", "p2"], "hypothesis": ["h0", "h1", "h2"], "label": [0, 1, 2], "idx": [0, 1, 2]},
        features=datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=hub_names), "idx": datasets.Value("int32")}))
    datasets.DatasetDict({"validation_matched": ds}).save_to_disk(str(tmp_path / "mnli"))
    task = load_registry().task("mnli")
    examples = task.read(tmp_path / "mnli", "dev_matched")
    assert [task.labels[e.label] for e in examples] == hub_names
    assert (examples[0].text_a, examples[0].text_b) == ("p0", "h0")
    with pytest.raises(Q8Error, match=r"saved dataset has no split 'validation_mismatched' \(it has: validation_matched\)"):
        task.read(tmp_path / "mnli", "dev_mismatched")


def test_test_split_without_labels_is_refused(tmp_path):
    ds = datasets.Dataset.from_dict({"sentence": ["a"], "label": [-1], "idx": [0]},
                                    features=datasets.Features({"sentence": datasets.Value("string"),
                                                                "label": datasets.ClassLabel(names=["n", "p"]),
                                                                "idx": datasets.Value("int32")}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(Q8Error, match=r"row 0: no label"):
        load_registry().task("sst-2").read(tmp_path / "s", "train")


def test_offline_without_data_dir_is_one_line_and_writes_nothing(tiny_bert, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_q8(["run", "--task", "sst-2", "--model", str(tiny_bert), "--output-dir", str(out)], capsys)
    assert code == 2 and stdout == ""
    assert err == ("q8: error: cannot fetch GLUE sst2 from the Hugging Face hub (offline); pass --data-dir with a "
                   "local GLUE task folder (train.tsv, dev.tsv) or a `datasets` copy (save_to_disk or parquet)\n")
    assert not out.exists()


def test_offline_hub_model_is_one_line_and_writes_nothing(sst2_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_q8(["run", "--task", "sst-2", "--data-dir", str(sst2_dir), "--output-dir", str(out)], capsys)
    assert code == 2
    assert err == ("q8: error: cannot load 'bert-base-uncased' from the Hugging Face hub (offline: HF_HUB_OFFLINE "
                   "is set); pass --model with a local BERT folder (config.json, weights, vocab)\n")
    assert not out.exists()


def test_defaults_are_the_papers_experiment():
    import cli

    params = cli.run.make_context("run", ["--task", "sts-b", "--output-dir", "x"]).params  # resolved, not run
    assert params["model"] == "bert-base-uncased"
    assert params["data_dir"] is None  # -> nyu-mll/glue from the hub
    assert params["mode"] is None  # the spec's own default applies: qat
    config = RunConfig(task="sts-b", model="bert-base-uncased", data_dir=None, output_dir="x")
    assert (config.spec.mode, config.epochs, config.train_batch_size, config.max_seq_length) == ("qat", 3.0, 16, 128)
