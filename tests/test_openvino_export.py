"""The OpenVINO export: int8 values equal the NumPy reference, the compiled model runs every quantized
layer as an int8 primitive, logits agree with the fake-quant model, and ``q8 export`` / ``q8 eval``
drive it end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("openvino")

from q8core import reference  # noqa: E402
from q8core.export import hf_export  # noqa: E402
from q8core.plugins import load_registry  # noqa: E402
from q8core.spec import QuantSpec  # noqa: E402

from test_cli import assert_one_line_error, q8, run_args, snapshot  # noqa: E402

PLUGINS = "torch,glue,openvino"


@pytest.fixture(autouse=True)
def _with_openvino(monkeypatch):
    monkeypatch.setenv("Q8_PLUGINS", PLUGINS)


def _batch(rng, n=6, seq=12, vocab=27):
    mask = np.ones((n, seq), np.int64)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    return {"input_ids": rng.integers(5, vocab, (n, seq)), "attention_mask": mask,
            "token_type_ids": (np.arange(seq) >= seq // 2).astype(np.int64)[None].repeat(n, 0)}


def _qat_backend(tiny_bert, spec: QuantSpec):
    """The tiny BERT after 4 QAT steps (EMA ranges set), and a batch."""
    import torch

    torch.manual_seed(0)
    backend = load_registry().backend("torch").from_pretrained(str(tiny_bert), labels=("0", "1"), spec=spec,
                                                               device="cpu", seed=0)
    backend.configure_optimizer(learning_rate=1e-3, weight_decay=0.01, warmup_steps=0, total_steps=4,
                                adam_epsilon=1e-6, max_grad_norm=1.0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        backend.train_step({**_batch(rng, n=8), "labels": rng.integers(0, 2, 8)})
    return backend, _batch(rng)


@pytest.fixture(scope="module")
def qat_model(tiny_bert):
    return _qat_backend(tiny_bert, QuantSpec(ema_decay=0.9))


def _build(backend, int8=True):
    from backends.openvino.graph import build_model

    weights, config_text = hf_export(backend)
    return build_model(weights, json.loads(config_text), backend.quant_state() if int8 else None,
                       float_inputs=backend.spec.float_inputs), weights


def _compile(model, precision="f32"):
    from backends.openvino.backend import compile_model

    return compile_model(model, precision)


def _linears(prefix="bert.encoder.layer"):
    """The model's fully connected layers as the graph builds them (Q, K and V as one ``qkv`` matmul)."""
    per_layer = ("attention.self.qkv", "attention.output.dense", "intermediate.dense", "output.dense")
    return [f"{prefix}.{i}.{name}" for i in range(2) for name in per_layer] + ["bert.pooler.dense", "classifier"]


def test_int8_ir_holds_the_reference_int8_weights(qat_model):
    backend, _ = qat_model
    model, weights = _build(backend)
    consts = {op.get_friendly_name(): op.get_data() for op in model.get_ops() if op.get_type_name() == "Constant"}
    for layer in _linears():
        parts = [layer.replace("qkv", n) for n in ("query", "key", "value")] if layer.endswith("qkv") else [layer]
        expected = np.concatenate([reference.quantize(weights[f"{p}.weight"],
                                                      reference.get_scale(reference.max_abs(weights[f"{p}.weight"])))
                                   for p in parts])
        got = consts[f"{layer}.weight_int8"]
        assert got.dtype == np.int8
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_every_quantized_layer_executes_as_an_int8_primitive(qat_model, precision):
    from backends.openvino.graph import runtime_precisions

    backend, _ = qat_model
    compiled = _compile(_build(backend)[0], precision)
    precisions = runtime_precisions(compiled)
    for layer in _linears():
        assert precisions.get(layer) in ("i8", "u8"), (layer, precisions)


def test_int8_logits_match_the_fake_quant_model(qat_model):
    backend, batch = qat_model
    expected = backend.predict(batch)
    got = _compile(_build(backend)[0], "f32")(batch)["logits"]
    # the same int8 values; float32 differs only in the order of operations
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max() + 1e-7)
    bf16 = _compile(_build(backend)[0], "bf16")(batch)["logits"]  # float parts in bf16: 8 bits of mantissa
    np.testing.assert_allclose(bf16, expected, atol=3e-2 * np.abs(expected).max())


def test_the_float32_ir_matches_the_hugging_face_model(qat_model, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from backends.openvino.graph import runtime_precisions

    backend, batch = qat_model
    compiled = _compile(_build(backend, int8=False)[0])
    assert set(runtime_precisions(compiled).values()) == {"f32"}
    backend.export(tmp_path, "hf")  # the FP32 master weights, as transformers runs them
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    np.testing.assert_allclose(compiled(batch)["logits"], expected, atol=1e-5 * np.abs(expected).max() + 1e-7)


def test_float_inputs_layers_keep_float_inputs_and_int8_weights(tiny_bert):
    from backends.openvino.graph import runtime_precisions

    pattern = r"layer\.\d+\.output\.dense$"
    backend, batch = _qat_backend(tiny_bert, QuantSpec(ema_decay=0.9, float_inputs=(pattern,)))
    model, weights = _build(backend)
    compiled = _compile(model)
    precisions = runtime_precisions(compiled)
    for layer in _linears():
        float_input = layer.endswith(".output.dense") and "attention" not in layer
        assert precisions[layer] == ("f32" if float_input else "i8"), (layer, precisions[layer])
    w = weights["bert.encoder.layer.1.output.dense.weight"]
    consts = {op.get_friendly_name(): op.get_data() for op in model.get_ops() if op.get_type_name() == "Constant"}
    np.testing.assert_array_equal(consts["bert.encoder.layer.1.output.dense.weight_int8"],
                                  reference.quantize(w, reference.get_scale(reference.max_abs(w))))
    expected = backend.predict(batch)
    np.testing.assert_allclose(compiled(batch)["logits"], expected, atol=1e-4 * np.abs(expected).max() + 1e-7)


@pytest.fixture(scope="module")
def ov_run(tiny_bert, tmp_path_factory):
    """A tiny QAT run on toy SST-2 and its openvino export."""
    import cli
    from conftest import write_sst2

    root = tmp_path_factory.mktemp("ov-run")
    data = write_sst2(root / "SST-2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("Q8_PLUGINS", PLUGINS)
        for args in (run_args(tiny_bert, data, root / "run"),
                     ["export", "--checkpoint", str(root / "run"), "--format", "openvino", "--output", str(root / "ov")]):
            try:
                cli.main(args)
            except SystemExit as exc:  # pragma: no cover - only on failure
                pytest.fail(f"q8 {args[0]} failed with exit status {exc.code}")
    return root, data


def test_export_writes_an_optimum_intel_folder_that_q8_eval_runs(ov_run, capsys):
    root, data = ov_run
    export = root / "ov"
    assert {"openvino_model.xml", "openvino_model.bin", "config.json", "tokenizer_config.json", "q8_spec.json",
            "q8_checkpoint.json"} <= {p.name for p in export.iterdir()}
    manifest = json.loads((export / "q8_checkpoint.json").read_text())
    assert manifest["backend"] == "openvino" and manifest["export_format"] == "openvino"
    results = {}
    for name, extra in (("run", []), ("ov", ["--ov-precision", "f32"]), ("ov-bf16", ["--ov-precision", "bf16"])):
        folder = root / name.split("-")[0]
        code, out, err = q8(["eval", "--checkpoint", str(folder), "--data-dir", str(data), "--json", *extra], capsys)
        assert code == 0, err
        results[name] = json.loads(out.strip().splitlines()[-1])["accuracy"]
    assert abs(results["ov"] - results["run"]) <= 1 / 64 + 1e-9  # one dev row of 64 at most
    assert abs(results["ov-bf16"] - results["run"]) <= 2 / 64 + 1e-9


def test_openvino_needs_a_qat_checkpoint_and_openvino_fp32_takes_any(tiny_bert, sst2_dir, tmp_path, capsys):
    code, _, err = q8(run_args(tiny_bert, sst2_dir, tmp_path / "run", "--mode", "fp32", fast=True), capsys)
    assert code == 0, err
    code, _, err = q8(["export", "--checkpoint", str(tmp_path / "run"), "--format", "openvino",
                       "--output", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "openvino needs a QAT checkpoint", "fp32")
    assert snapshot(tmp_path / "out") is None and not list(tmp_path.glob(".out*"))
    code, out, err = q8(["export", "--checkpoint", str(tmp_path / "run"), "--format", "openvino-fp32",
                         "--output", str(tmp_path / "out")], capsys)
    assert code == 0, err
    code, out, err = q8(["eval", "--checkpoint", str(tmp_path / "out"), "--data-dir", str(sst2_dir), "--json"], capsys)
    assert code == 0, err
    ov_accuracy = json.loads(out.strip().splitlines()[-1])["accuracy"]
    code, out, err = q8(["eval", "--checkpoint", str(tmp_path / "run"), "--data-dir", str(sst2_dir), "--json"], capsys)
    assert ov_accuracy == pytest.approx(json.loads(out.strip().splitlines()[-1])["accuracy"], abs=2 / 64 + 1e-9)


def test_a_bad_precision_is_one_line(ov_run, capsys):
    root, data = ov_run
    code, _, err = q8(["eval", "--checkpoint", str(root / "ov"), "--data-dir", str(data), "--ov-precision", "fp8"],
                      capsys)
    assert_one_line_error(code, err, "--ov-precision 'fp8'", "bf16", "f32")


def test_the_openvino_engine_does_not_train(ov_run, sst2_dir, tmp_path, capsys):
    root, _ = ov_run
    code, _, err = q8(run_args(root / "ov", sst2_dir, tmp_path / "run", "--backend", "openvino"), capsys)
    assert_one_line_error(code, err, "does not train")


def test_without_openvino_the_export_and_the_backend_say_what_to_install(ov_run, tmp_path, monkeypatch, capsys):
    import backends.openvino as plugin

    root, data = ov_run
    monkeypatch.setattr(plugin, "find_spec", lambda name: None)
    code, _, err = q8(["export", "--checkpoint", str(root / "run"), "--format", "openvino",
                       "--output", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "OpenVINO is not installed", 'pip install "q8bert[openvino]"')
    assert snapshot(tmp_path / "out") is None
    code, _, err = q8(["eval", "--checkpoint", str(root / "ov"), "--data-dir", str(data)], capsys)
    assert_one_line_error(code, err, "backend 'openvino' is not usable here", "q8bert[openvino]")
