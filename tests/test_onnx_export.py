"""The ONNX exports: int8 values equal the NumPy reference, ONNX Runtime runs integer kernels, logits
agree with the training backend, and ``q8 export`` / ``q8 eval`` drive it end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from q8core import reference  # noqa: E402
from q8core.onnx_graph import INTEGER_OPS, build_model, integer_kernels  # noqa: E402
from q8core.plugins import load_registry  # noqa: E402
from q8core.spec import QuantSpec  # noqa: E402

from test_cli import assert_one_line_error, q8, run_args, snapshot  # noqa: E402

LINEARS_PER_LAYER = 6  # query, key, value, attention output, intermediate, output


@pytest.fixture(autouse=True)
def _with_onnxruntime(monkeypatch):
    monkeypatch.setenv("Q8_PLUGINS", "torch,glue,onnxruntime")


def _batch(rng, n=6, seq=12, vocab=27):
    mask = np.ones((n, seq), np.int64)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    return {"input_ids": rng.integers(5, vocab, (n, seq)), "attention_mask": mask,
            "token_type_ids": (np.arange(seq) >= seq // 2).astype(np.int64)[None].repeat(n, 0)}


@pytest.fixture(scope="module")
def qat_model(tiny_bert, tmp_path_factory):
    """The tiny BERT after 4 QAT steps (EMA ranges set), its HF export, and a batch."""
    import torch

    torch.manual_seed(0)
    os.environ["Q8_PLUGINS"] = "torch,glue"
    backend = load_registry().backend("torch").from_pretrained(
        str(tiny_bert), labels=("0", "1"), spec=QuantSpec(ema_decay=0.9), device="cpu", seed=0)
    backend.configure_optimizer(learning_rate=1e-3, weight_decay=0.01, warmup_steps=0, total_steps=4,
                                adam_epsilon=1e-6, max_grad_norm=1.0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        backend.train_step({**_batch(rng, n=8), "labels": rng.integers(0, 2, 8)})
    folder = tmp_path_factory.mktemp("qat-hf")
    backend.export(folder, "hf")
    weights = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    return backend, weights, config, _batch(rng)


def _run(model, batch, path: Path) -> np.ndarray:
    import onnxruntime as ort

    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, batch)[0]


def test_int8_graph_holds_the_reference_int8_values(qat_model):
    backend, weights, config, _ = qat_model
    ranges = backend.quant_state()
    inits = {t.name: numpy_helper.to_array(t) for t in build_model(weights, config, ranges).graph.initializer}
    linears = sorted(ranges)
    assert len(linears) == 2 * LINEARS_PER_LAYER + 2  # + pooler + classifier
    for module in linears:
        w, b = weights[f"{module}.weight"], weights[f"{module}.bias"]
        s_w, s_x = reference.get_scale(reference.max_abs(w)), reference.get_scale(ranges[module])
        assert inits[f"{module}.weight_int8"].dtype == np.int8
        np.testing.assert_array_equal(inits[f"{module}.weight_int8"], reference.quantize(w, s_w).T)
        np.testing.assert_array_equal(inits[f"{module}.bias_int32"], reference.quantize_bias(b, s_w, s_x))
        assert inits[f"{module}.input_scale"] == np.float32(1 / s_x)
        assert inits[f"{module}.input_zero"].dtype == np.int8 and inits[f"{module}.input_zero"] == 0
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        w = weights[f"bert.embeddings.{table}.weight"]
        np.testing.assert_array_equal(inits[f"bert.embeddings.{table}.weight_int8"],
                                      reference.quantize(w, reference.get_scale(reference.max_abs(w))))
    # nothing but LayerNorm parameters and small constants stays float32
    floats = [name for name, value in inits.items() if value.dtype == np.float32 and value.size > 1]
    assert floats and all("LayerNorm" in name for name in floats), floats


def test_int8_graph_gives_the_fake_quant_logits(qat_model, tmp_path):
    backend, weights, config, batch = qat_model
    expected = backend.predict(batch)
    got = _run(build_model(weights, config, backend.quant_state()), batch, tmp_path / "int8.onnx")
    # same int8 values; float32 differs only in the order of operations (and 1/S vs S in QuantizeLinear)
    np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(expected).max() + 1e-6)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


def test_fp32_graph_gives_the_fp32_logits(qat_model, tiny_bert, tmp_path):
    backend, weights, config, batch = qat_model
    registry = load_registry()
    hf = tmp_path / "hf"
    hf.mkdir()
    backend.export(hf, "hf")
    fp32 = registry.backend("torch").from_checkpoint(hf, spec=QuantSpec(mode="fp32"), device="cpu")
    got = _run(build_model(weights, config, None), batch, tmp_path / "fp32.onnx")
    np.testing.assert_allclose(got, fp32.predict(batch), atol=1e-5)


def test_onnx_runtime_runs_every_quantized_layer_on_integer_kernels(qat_model, tmp_path):
    backend, weights, config, _ = qat_model
    path = tmp_path / "int8.onnx"
    onnx.save(build_model(weights, config, backend.quant_state()), str(path))
    ops = integer_kernels(str(path))
    assert sum(ops.get(op, 0) for op in INTEGER_OPS) == 2 * LINEARS_PER_LAYER + 2, ops
    # the only float matmuls left are the attention's two per layer (Q·Kᵀ and probs·V), as in the paper
    assert ops.get("MatMul", 0) + ops.get("FusedMatMul", 0) == 2 * 2, ops


# -- through the CLI ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qat_run(tiny_bert, tmp_path_factory):
    """A tiny QAT run on toy SST-2 and its onnx-int8 export."""
    import cli
    from conftest import write_sst2

    root = tmp_path_factory.mktemp("onnx-run")
    data = write_sst2(root / "SST-2")
    os.environ["Q8_PLUGINS"] = "torch,glue,onnxruntime"
    for args in (run_args(tiny_bert, data, root / "run"),
                 ["export", "--checkpoint", str(root / "run"), "--format", "onnx-int8", "--output", str(root / "int8")]):
        try:
            cli.main(args)
        except SystemExit as exc:  # pragma: no cover - only on failure
            pytest.fail(f"q8 {args[0]} failed with exit status {exc.code}")
    return root, data


def test_export_writes_a_folder_that_q8_eval_runs_on_onnx_runtime(qat_run, capsys):
    root, data = qat_run
    export = root / "int8"
    assert {"model.onnx", "config.json", "tokenizer_config.json", "q8_spec.json", "q8_checkpoint.json"} <= \
        {p.name for p in export.iterdir()}
    manifest = json.loads((export / "q8_checkpoint.json").read_text())
    assert manifest["backend"] == "onnxruntime" and manifest["task"] == "sst-2"
    assert manifest["export_format"] == "onnx-int8"
    results = {}
    for name, target in (("checkpoint", root / "run"), ("onnx", export), ("onnx-file", export / "model.onnx")):
        code, out, err = q8(["eval", "--checkpoint", str(target), "--data-dir", str(data), "--json"], capsys)
        assert code == 0, err
        results[name] = json.loads(out)
    assert "(onnxruntime" not in results["onnx"]  # JSON only
    assert results["onnx"]["accuracy"] == results["onnx-file"]["accuracy"]
    # 64 dev rows: the int8 engine may differ from fake quantization on at most one of them
    assert abs(results["onnx"]["accuracy"] - results["checkpoint"]["accuracy"]) <= 1 / 64 + 1e-9


def test_int8_predictions_agree_with_the_checkpoint(qat_run):
    root, data = qat_run
    from q8core.checkpoints import resolve
    from q8core.evaluation import load_eval_sets, predict
    from q8core.tokenization import load_tokenizer

    registry = load_registry()
    checkpoint = resolve(root / "run")
    task = registry.task("sst-2")
    dev = load_eval_sets(task, data, load_tokenizer(checkpoint), 128)[""]
    fake = registry.backend("torch").from_checkpoint(checkpoint, spec=QuantSpec.load(checkpoint), device="cpu")
    int8 = registry.backend("onnxruntime").from_checkpoint(root / "int8", spec=QuantSpec(), device="cpu")
    a, b = predict(fake, dev, 32, True), predict(int8, dev, 32, True)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.98
    np.testing.assert_allclose(b, a, atol=1e-3 * np.abs(a).max() + 1e-6)


def test_fp32_onnx_export_and_size(qat_run, capsys):
    root, _ = qat_run
    code, _, err = q8(["export", "--checkpoint", str(root / "run"), "--format", "onnx",
                       "--output", str(root / "fp32")], capsys)
    assert code == 0, err

    def weight_bytes(folder):
        return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(folder / "model.onnx")).graph.initializer)

    fp32, int8 = weight_bytes(root / "fp32"), weight_bytes(root / "int8")
    # matrices in 1 byte instead of 4; the tiny model's LayerNorms and int32 biases keep it above 1/4
    assert 0.25 < int8 / fp32 < 0.3, (int8, fp32)


def test_onnx_int8_of_an_fp32_checkpoint_is_refused(tiny_bert, sst2_dir, tmp_path, capsys):
    code, _, err = q8(run_args(tiny_bert, sst2_dir, tmp_path / "run", "--mode", "fp32", fast=True), capsys)
    assert code == 0, err
    code, _, err = q8(["export", "--checkpoint", str(tmp_path / "run"), "--format", "onnx-int8",
                       "--output", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "onnx-int8 needs a QAT checkpoint", "fp32")
    assert not (tmp_path / "out").exists()


def test_layers_without_an_ema_range_are_named(tiny_bert, sst2_dir, tmp_path, capsys):
    code, _, err = q8(run_args(tiny_bert, sst2_dir, tmp_path / "run", "--quant-delay", "5", fast=True), capsys)
    assert code == 0, err
    code, _, err = q8(["export", "--checkpoint", str(tmp_path / "run"), "--format", "onnx-int8",
                       "--output", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "no QAT activation range", "bert.encoder.layer.0.attention.self.query")
    assert snapshot(tmp_path / "out") is None and not list(tmp_path.glob(".out*"))


def test_unknown_format_lists_the_onnx_formats(qat_run, tmp_path, capsys):
    root, _ = qat_run
    code, _, err = q8(["export", "--checkpoint", str(root / "run"), "--format", "tflite",
                       "--output", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "'tflite'", "onnx-int8", "onnx", "hf")


def test_mode_on_an_export_is_refused(qat_run, capsys):
    root, data = qat_run
    code, _, err = q8(["eval", "--checkpoint", str(root / "int8"), "--data-dir", str(data), "--mode", "fp32"], capsys)
    assert_one_line_error(code, err, "exported model", "--mode")


def test_the_onnx_engine_does_not_train(qat_run, sst2_dir, tmp_path, capsys):
    root, _ = qat_run
    code, _, err = q8(run_args(root / "int8", sst2_dir, tmp_path / "run", "--backend", "onnxruntime"), capsys)
    assert_one_line_error(code, err, "does not train")
