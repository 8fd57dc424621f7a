"""End to end on the tiny BERT: QAT learns, checkpoints round-trip, rotation, logs, q8 eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backends.pytorch.backend import TorchBackend
from q8core import checkpoints
from q8core.config import RunConfig
from q8core.evaluation import load_eval_sets, predict
from q8core.plugins import load_registry
from q8core.spec import QuantSpec
from q8core.tokenization import load_tokenizer
from q8core.trainer import Trainer

from helpers import run_q8


def _train(tiny_bert, data_dir, out, task="sst-2", **overrides) -> Trainer:
    options = dict(task=task, model=str(tiny_bert), data_dir=str(data_dir), output_dir=str(out),
                   epochs=4, train_batch_size=16, learning_rate=3e-3, warmup_ratio=0.05, logging_steps=4,
                   eval_steps=16, seed=7, spec=QuantSpec(ema_decay=0.9))
    options.update(overrides)
    trainer = Trainer(RunConfig(**options), load_registry(), progress=False)
    trainer.run()
    return trainer


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.fixture(scope="module")
def qat_run(tiny_bert, tmp_path_factory):
    from conftest import write_sst2

    root = tmp_path_factory.mktemp("qat-run")
    data = write_sst2(root / "SST-2")
    trainer = _train(tiny_bert, data, root / "run")
    return trainer, data, root / "run"


def test_qat_run_learns_the_toy_task(qat_run):
    trainer, _, run_dir = qat_run
    train, evals = _records(run_dir, "train"), _records(run_dir, "eval")
    assert trainer.total_steps == 64 and train[-1]["step"] == 64
    # the loss leaves chance level (ln 2) late, once the accuracy jumps: compare the last log with the first
    assert train[-1]["loss"] < 0.8 * min(train[0]["loss"], np.log(2))
    assert evals[-1]["accuracy"] >= 0.9 > evals[0]["accuracy"]
    assert all(r["ema"] for r in train)  # EMA ranges are logged for QAT


def test_eval_results_and_trainer_state_agree_with_the_log(qat_run):
    trainer, _, run_dir = qat_run
    results = json.loads((run_dir / "eval_results.json").read_text())
    evals = _records(run_dir, "eval")
    assert [r["step"] for r in evals] == [16, 32, 48, 64]
    assert results["metrics"]["accuracy"] == evals[-1]["accuracy"]
    best = max(evals, key=lambda r: r["accuracy"])  # first of equals wins: later ties are not "better"
    assert (results["best_step"], results["best_metric"]) == (best["step"], best["accuracy"])
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["best_checkpoint"] == f"checkpoint-{best['step']}"
    assert state["last_checkpoint"] == "checkpoint-64"


def test_evaluations_during_the_quant_delay_are_never_the_best(tiny_bert, sst2_dir, tmp_path):
    # 2 epochs of 16 steps, evaluated every 8; quantization starts after step 20
    trainer = _train(tiny_bert, sst2_dir, tmp_path / "run", epochs=2, eval_steps=8,
                     spec=QuantSpec(ema_decay=0.9, start_step=20))
    evals = _records(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [8, 16, 24, 32]
    assert not any(r["is_best"] for r in evals[:2])  # an unquantized model is no QAT checkpoint
    quantized = evals[2:]
    best = max(quantized, key=lambda r: r["accuracy"])
    assert (trainer.best_step, trainer.best_metric) == (best["step"], best["accuracy"])
    assert not (tmp_path / "run" / "checkpoint-8").exists() and not (tmp_path / "run" / "checkpoint-16").exists()


def test_checkpoint_round_trip_gives_identical_logits_and_ranges(qat_run, tiny_bert):
    trainer, data, run_dir = qat_run
    path = run_dir / "checkpoint-64"
    manifest = checkpoints.read_manifest(path)
    assert manifest["backend"] == "torch" and manifest["task"] == "sst-2" and manifest["labels"] == ["0", "1"]
    assert {"model.safetensors", "quant_state.safetensors", "q8_spec.json", "config.json"} <= set(manifest["files"])
    assert QuantSpec.load(path) == trainer.spec
    loaded = TorchBackend.from_checkpoint(path, spec=QuantSpec.load(path), device="cpu")
    assert loaded.quant_state() == trainer.backend.quant_state()
    arrays = load_eval_sets(trainer.task, data, load_tokenizer(path), 128)[""]
    np.testing.assert_array_equal(predict(loaded, arrays, 32, True), predict(trainer.backend, arrays, 32, True))


def test_checkpoint_folder_is_a_plain_hugging_face_model(qat_run):
    from transformers import AutoModelForSequenceClassification

    _, _, run_dir = qat_run
    model = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "checkpoint-64"))
    assert model.config.num_labels == 2 and model.config.id2label == {0: "0", 1: "1"}


def test_a_run_folder_as_model_starts_from_its_best_checkpoint_head_included(qat_run, tmp_path):
    """QAT from a fine-tuned run: --model RUN_DIR loads RUN_DIR's best checkpoint, task head and all."""
    from safetensors.numpy import load_file

    trainer, data, run_dir = qat_run
    best = checkpoints.resolve(run_dir)
    assert best.name == trainer.best_checkpoint.name
    second = _train(run_dir, data, tmp_path / "second", max_steps=1, learning_rate=1e-30, eval_steps=None,
                    do_eval=False, spec=QuantSpec(mode="fp32"))
    assert json.loads((tmp_path / "second" / "run_config.json").read_text())["model"] == str(run_dir)
    start, end = load_file(str(best / "model.safetensors")), load_file(str(checkpoints.resolve(tmp_path / "second") / "model.safetensors"))
    assert start.keys() == end.keys() and "classifier.weight" in end
    for name in start:  # a step of learning rate 1e-30 leaves every weight, the head's too, as the source had it
        np.testing.assert_allclose(end[name], start[name], rtol=0, atol=1e-20, err_msg=name)
    fresh = _train(trainer.config.model, data, tmp_path / "fresh", max_steps=1, learning_rate=1e-30,
                   eval_steps=None, do_eval=False, spec=QuantSpec(mode="fp32"))
    drawn = load_file(str(checkpoints.resolve(tmp_path / "fresh") / "model.safetensors"))["classifier.weight"]
    assert not np.array_equal(drawn, start["classifier.weight"])  # from the pretrained model, a head is drawn


def test_q8_eval_reproduces_the_final_metrics(qat_run, capsys):
    _, data, run_dir = qat_run
    code, out, err = run_q8(["eval", "--checkpoint", str(run_dir / "checkpoint-64"), "--data-dir", str(data),
                             "--json"], capsys)
    assert code == 0, err
    shown = json.loads(out)
    results = json.loads((run_dir / "eval_results.json").read_text())
    assert shown["accuracy"] == results["metrics"]["accuracy"] and shown["mode"] == "qat"
    # a run folder resolves to its best checkpoint
    code, out, _ = run_q8(["eval", "--checkpoint", str(run_dir), "--data-dir", str(data), "--json"], capsys)
    assert json.loads(out)["accuracy"] == results["best_metric"]


def test_q8_eval_prints_the_modelzoo_result_line(qat_run, capsys):
    _, data, run_dir = qat_run
    code, out, err = run_q8(["eval", "--checkpoint", str(run_dir / "checkpoint-64"), "--data-dir", str(data)], capsys)
    assert code == 0, err
    results = json.loads((run_dir / "eval_results.json").read_text())
    current = {"accuracy": results["metrics"]["accuracy"]}
    best = max(results["best_metric"], current["accuracy"])
    assert out.splitlines()[-1] == f"The current result is {current}, the best result is  {best}"
    # evaluated otherwise than it was trained (DQ of the master weights), the run's best is not this one's
    code, out, err = run_q8(["eval", "--checkpoint", str(run_dir / "checkpoint-64"), "--data-dir", str(data),
                             "--mode", "dq"], capsys)
    assert code == 0, err
    line = out.splitlines()[-1]
    dq = float(line.split("'accuracy': ", 1)[1].split("}", 1)[0])
    assert line == f"The current result is {{'accuracy': {dq}}}, the best result is  {dq}"


def test_rotation_keeps_the_newest_n_and_the_best(tiny_bert, sst2_dir, tmp_path):
    out = tmp_path / "run"
    trainer = _train(tiny_bert, sst2_dir, out, epochs=2, save_steps=4, eval_steps=8, max_checkpoints=2)
    kept = {p.name for p in checkpoints.list_checkpoints(out)}
    best = f"checkpoint-{trainer.best_step}"
    assert kept == {"checkpoint-28", "checkpoint-32", best}
    saved = [r["step"] for r in _records(out, "checkpoint")]
    assert saved == sorted(set(saved)) and {4, 8, 28, 32} <= set(saved)
    assert not list(out.glob(".*tmp*"))  # no half-written folders left behind


def test_fp32_and_dq_regression_runs(tiny_bert, stsb_dir, tmp_path):
    results = {}
    for mode in ("fp32", "dq"):
        trainer = _train(tiny_bert, stsb_dir, tmp_path / mode, task="STS-B", epochs=2, eval_steps=None,
                         spec=QuantSpec(mode=mode))
        results[mode] = json.loads((tmp_path / mode / "eval_results.json").read_text())
        assert set(results[mode]["metrics"]) == {"pearson", "spearmanr", "corr"}
        assert trainer.backend.quant_state() == {}
        assert not (tmp_path / mode / f"checkpoint-{trainer.step}" / "quant_state.safetensors").exists() \
            or mode == "dq"
    m = results["fp32"]["metrics"]
    assert m["corr"] == pytest.approx((m["pearson"] + m["spearmanr"]) / 2)
    # dq trains exactly like fp32 (same seed, same data): only inference differs
    losses = {mode: [r["loss"] for r in _records(tmp_path / mode, "train")] for mode in ("fp32", "dq")}
    assert losses["dq"] == losses["fp32"]
    assert results["dq"]["metrics"]["pearson"] != results["fp32"]["metrics"]["pearson"]


def test_same_seed_same_run(tiny_bert, sst2_dir, tmp_path):
    a = _train(tiny_bert, sst2_dir, tmp_path / "a", epochs=1, eval_steps=None)
    b = _train(tiny_bert, sst2_dir, tmp_path / "b", epochs=1, eval_steps=None)
    assert _records(tmp_path / "a", "train")[-1]["loss"] == _records(tmp_path / "b", "train")[-1]["loss"]
    assert a.backend.quant_state() == b.backend.quant_state()


def test_export_hf_is_a_plain_transformers_folder_with_the_same_logits(qat_run, tmp_path, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification

    trainer, data, run_dir = qat_run
    out = tmp_path / "hf"
    code, stdout, err = run_q8(["export", "--checkpoint", str(run_dir / "checkpoint-64"), "--format", "hf",
                                "--output", str(out)], capsys)
    assert code == 0, err
    assert QuantSpec.load(out) == trainer.spec
    exported = AutoModelForSequenceClassification.from_pretrained(str(out)).state_dict()  # plain HF
    trained = trainer.backend.model.state_dict()  # the FP32 master weights of the last step
    assert set(exported) == set(trained)
    assert all(torch.equal(exported[name], trained[name]) for name in trained)
    assert {"tokenizer.json", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    # exporting again refuses to overwrite; an unknown format is named
    code, _, err = run_q8(["export", "--checkpoint", str(run_dir), "--format", "hf", "--output", str(out)], capsys)
    assert code == 2 and "--overwrite" in err
    code, _, err = run_q8(["export", "--checkpoint", str(run_dir), "--format", "tflite", "--output",
                           str(tmp_path / "x")], capsys)
    assert code == 2 and err == "q8: error: backend 'torch' cannot export 'tflite'; it exports: hf, onnx-int8, onnx-int8-qdq, onnx\n"
    assert not (tmp_path / "x").exists()


def test_eval_mode_dq_on_an_fp32_checkpoint_is_the_dynamic_quantization_baseline(tiny_bert, sst2_dir, tmp_path,
                                                                                 capsys):
    trainer = _train(tiny_bert, sst2_dir, tmp_path / "fp32", epochs=4, eval_steps=None, spec=QuantSpec(mode="fp32"))
    ckpt = tmp_path / "fp32" / f"checkpoint-{trainer.step}"
    code, out, err = run_q8(["eval", "--checkpoint", str(ckpt), "--data-dir", str(sst2_dir), "--mode", "dq",
                             "--json"], capsys)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["mode"] == "dq"
    # the same numbers as a dq backend built in-process from the checkpoint
    dq = TorchBackend.from_checkpoint(ckpt, spec=QuantSpec(mode="dq"), device="cpu")
    arrays = load_eval_sets(trainer.task, sst2_dir, load_tokenizer(ckpt), 128)[""]
    logits = predict(dq, arrays, 32, True)
    assert shown["accuracy"] == float(np.mean(logits.argmax(-1) == arrays["labels"]))
    assert not np.array_equal(logits, predict(trainer.backend, arrays, 32, True))  # it did quantize
    code, _, err = run_q8(["eval", "--checkpoint", str(ckpt), "--data-dir", str(sst2_dir), "--mode", "qat"], capsys)
    assert code == 2 and "--mode fp32 or dq" in err and err.count("\n") == 1
