"""The ONNX exports: int8 values equal the NumPy reference, ONNX Runtime runs integer kernels, logits
agree with the training backend, and ``q8 export`` / ``q8 eval`` drive it end to end."""

from __future__ import annotations

import json
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


FORMS = ("ort", "qdq")


@pytest.mark.parametrize("form", FORMS)
def test_int8_graph_holds_the_reference_int8_values(qat_model, form):
    backend, weights, config, _ = qat_model
    ranges = backend.quant_state()
    inits = {t.name: numpy_helper.to_array(t) for t in build_model(weights, config, ranges, form=form).graph.initializer}
    linears = sorted(ranges)
    assert len(linears) == 2 * LINEARS_PER_LAYER + 2  # + pooler + classifier
    for module in linears:
        w, b = weights[f"{module}.weight"], weights[f"{module}.bias"]
        s_w, s_x = reference.get_scale(reference.max_abs(w)), reference.get_scale(ranges[module])
        assert inits[f"{module}.weight_int8"].dtype == np.int8
        np.testing.assert_array_equal(inits[f"{module}.weight_int8"], reference.quantize(w, s_w).T)
        np.testing.assert_array_equal(inits[f"{module}.bias_int32"], reference.quantize_bias(b, s_w, s_x))
        assert inits[f"{module}.input_scale"] == np.float32(1 / s_x)
        zero = inits[f"{module}.input_zero"]
        # the same symmetric grid: int8 with zero point 0, or uint8 with 128 (ONNX Runtime's fast path)
        assert (zero.dtype, zero) == ((np.uint8, 128) if form == "ort" else (np.int8, 0))
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        w = weights[f"bert.embeddings.{table}.weight"]
        np.testing.assert_array_equal(inits[f"bert.embeddings.{table}.weight_int8"],
                                      reference.quantize(w, reference.get_scale(reference.max_abs(w))))
    # nothing but LayerNorm parameters and small constants stays float32
    floats = [name for name, value in inits.items() if value.dtype == np.float32 and value.size > 1]
    assert floats and all("LayerNorm" in name for name in floats), floats


def _quantized_inputs(model) -> dict[str, tuple[str, str]]:
    """Per fully connected layer: (float input, int8 input as the integer kernel gets it) tensor names."""
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            module = node.input[1][:-len(".input_scale")]
            after = consumers[node.output[0]]
            q = after[0].output[0] if after[0].op_type == "Clip" else node.output[0]
            out[module] = (node.input[0], q)
    return out


@pytest.mark.parametrize("form", FORMS)
def test_int8_inputs_saturate_at_127_like_the_reference(qat_model, tmp_path, form):
    """Each layer's int8 input is the reference's clamp(round(x * S_x), -127, 127), also out of range."""
    import onnxruntime as ort

    backend, weights, config, batch = qat_model
    # ranges 4x too small: many inputs fall outside and must clamp to +-127, never to -128
    ranges = {name: value / 4 for name, value in backend.quant_state().items()}
    model = build_model(weights, config, ranges, form=form)
    probes = _quantized_inputs(model)
    assert len(probes) >= 2 * 4 + 2  # Q, K and V may share one quantization (ort form)
    names = sorted({name for pair in probes.values() for name in pair})
    int8 = onnx.TensorProto.UINT8 if form == "ort" else onnx.TensorProto.INT8
    quantized = {x_q for _, x_q in probes.values()}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(
        name, int8 if name in quantized else onnx.TensorProto.FLOAT, None) for name in names)
    onnx.save(model, str(tmp_path / "probed.onnx"))
    values = dict(zip(["logits"] + names, ort.InferenceSession(str(tmp_path / "probed.onnx"), providers=[
        "CPUExecutionProvider"]).run(["logits"] + names, batch)))
    clamped = 0
    for module, (x, x_q) in probes.items():
        got = values[x_q].astype(np.int32) - (128 if form == "ort" else 0)
        expected = reference.quantize(values[x], reference.get_scale(ranges[module])).astype(np.int32)
        # QuantizeLinear divides by 1/S_x where the reference multiplies by S_x: a last-bit difference
        # may move a rounding tie by one step, on rare values
        assert np.abs(got - expected).max() <= 1 and (got != expected).mean() < 1e-3, module
        assert got.min() >= -127 and got.max() <= 127, module
        clamped += int((np.abs(expected) == 127).sum())
    assert clamped > 100


@pytest.mark.parametrize("form,padded", [("ort", True), ("ort", False), ("qdq", True)])
def test_int8_graph_gives_the_fake_quant_logits(qat_model, tmp_path, form, padded):
    backend, weights, config, batch = qat_model
    if not padded:  # the ort form's attention takes another kernel when no key is padded
        batch = {**batch, "attention_mask": np.ones_like(batch["attention_mask"])}
    expected = backend.predict(batch)
    got = _run(build_model(weights, config, backend.quant_state(), form=form), batch, tmp_path / "int8.onnx")
    # same int8 values; float32 differs only in the order of operations (and 1/S vs S in QuantizeLinear)
    np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(expected).max() + 1e-6)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("act", ["relu", "gelu_new"])
def test_the_two_int8_forms_agree_on_other_activations(qat_model, tmp_path, act):
    backend, weights, config, batch = qat_model
    config = {**config, "hidden_act": act}
    ort_model = build_model(weights, config, backend.quant_state(), form="ort")
    assert {"Relu": act == "relu", "FastGelu": act == "gelu_new"} == {
        op: any(node.op_type == op for node in ort_model.graph.node) for op in ("Relu", "FastGelu")}
    got = _run(ort_model, batch, tmp_path / "ort.onnx")
    expected = _run(build_model(weights, config, backend.quant_state(), form="qdq"), batch, tmp_path / "qdq.onnx")
    np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(expected).max() + 1e-6)


def test_the_two_int8_forms_agree_when_q_k_v_ranges_differ(qat_model, tmp_path):
    """Layers sharing an input but not a range get their own quantization in the ort form."""
    backend, weights, config, batch = qat_model
    ranges = dict(backend.quant_state())
    ranges["bert.encoder.layer.0.attention.self.key"] *= 0.5
    ranges["bert.encoder.layer.1.attention.self.value"] *= 2
    ort_model = build_model(weights, config, ranges, form="ort")
    assert sum(node.op_type == "QuantizeLinear" for node in ort_model.graph.node) == 2 * 4 + 2 + 2
    got = _run(ort_model, batch, tmp_path / "ort.onnx")
    expected = _run(build_model(weights, config, ranges, form="qdq"), batch, tmp_path / "qdq.onnx")
    np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(expected).max() + 1e-6)


def test_fp32_graph_gives_the_fp32_logits(qat_model, tiny_bert, tmp_path):
    backend, weights, config, batch = qat_model
    registry = load_registry()
    hf = tmp_path / "hf"
    hf.mkdir()
    backend.export(hf, "hf")
    fp32 = registry.backend("torch").from_checkpoint(hf, spec=QuantSpec(mode="fp32"), device="cpu")
    got = _run(build_model(weights, config, None), batch, tmp_path / "fp32.onnx")
    np.testing.assert_allclose(got, fp32.predict(batch), atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_onnx_runtime_runs_every_quantized_layer_on_integer_kernels(qat_model, tmp_path, form):
    backend, weights, config, _ = qat_model
    path = tmp_path / "int8.onnx"
    onnx.save(build_model(weights, config, backend.quant_state(), form=form), str(path))
    ops = integer_kernels(str(path))
    layers = sum(3 if op == "QAttention" else 1 for op in INTEGER_OPS for _ in range(ops.get(op, 0)))
    assert layers == 2 * LINEARS_PER_LAYER + 2, ops
    # the only float matmuls left are the attention's two per layer (Q·Kᵀ and probs·V), as in the paper
    float_matmuls = ops.get("MatMul", 0) + ops.get("FusedMatMul", 0) + ops.get("Gemm", 0) + ops.get("FusedGemm", 0)
    if form == "ort":  # inside one MultiHeadAttention kernel per layer (masked or not, by an If)
        assert float_matmuls == 0 and ops.get("MultiHeadAttention") == 2 * 2 and ops.get("If") == 2, ops
    else:
        assert float_matmuls == 2 * 2, ops


# -- through the CLI ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qat_run(tiny_bert, tmp_path_factory):
    """A tiny QAT run on toy SST-2 and its onnx-int8 export."""
    import cli
    from conftest import write_sst2

    root = tmp_path_factory.mktemp("onnx-run")
    data = write_sst2(root / "SST-2")
    with pytest.MonkeyPatch.context() as patch:  # module-scoped: restore the plugin selection afterwards
        patch.setenv("Q8_PLUGINS", "torch,glue,onnxruntime")
        for args in (run_args(tiny_bert, data, root / "run"),
                     ["export", "--checkpoint", str(root / "run"), "--format", "onnx-int8", "--output",
                      str(root / "int8")]):
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
    # the float parts differ in the last bit (ONNX Runtime's GELU, QuantizeLinear dividing by 1/S), which can
    # move an input across a rounding boundary: one 8-bit code of the FFN output layer's finer uint8 grid
    # then moves a logit of this tiny model by up to about 1% (0.8% seen); most agree to 1e-6
    np.testing.assert_allclose(b, a, atol=1e-2 * np.abs(a).max() + 1e-6)
    assert np.mean(np.abs(b - a) <= 1e-4 * np.abs(a).max() + 1e-6) >= 0.95


def test_fp32_onnx_export_and_size(qat_run, capsys):
    root, _ = qat_run
    code, _, err = q8(["export", "--checkpoint", str(root / "run"), "--format", "onnx",
                       "--output", str(root / "fp32")], capsys)
    assert code == 0, err

    def weight_bytes(folder):
        return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(folder / "model.onnx")).graph.initializer)

    fp32, int8 = weight_bytes(root / "fp32"), weight_bytes(root / "int8")
    # matrices in 1 byte instead of 4; the tiny model's LayerNorms and int32 biases keep it above 1/4
    assert 0.25 < int8 / fp32 < 0.4, (int8, fp32)  # the tiny model: per-channel scale vectors count


def test_onnx_int8_of_an_fp32_checkpoint_is_refused(tiny_bert, sst2_dir, tmp_path, capsys):
    code, _, err = q8(run_args(tiny_bert, sst2_dir, tmp_path / "run", "--mode", "fp32", fast=True), capsys)
    assert code == 0, err
    code, _, err = q8(["export", "--checkpoint", str(tmp_path / "run"), "--format", "onnx-int8",
                       "--output", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "onnx-int8 needs a QAT checkpoint", "fp32")
    assert not (tmp_path / "out").exists()


def test_layers_without_an_ema_range_are_named(tiny_bert, sst2_dir, tmp_path, capsys):
    # a checkpoint saved during the delay (step 2 of 4, quantizing from step 4 on) has no ranges yet
    code, _, err = q8(run_args(tiny_bert, sst2_dir, tmp_path / "run", "--max-steps", "4", "--quant-delay", "3",
                               "--save-steps", "2", fast=True), capsys)
    assert code == 0, err
    code, _, err = q8(["export", "--checkpoint", str(tmp_path / "run" / "checkpoint-2"), "--format", "onnx-int8",
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


def test_the_standard_onnx_int8_form_exports_and_evaluates_alike(qat_run, capsys):
    root, data = qat_run
    code, _, err = q8(["export", "--checkpoint", str(root / "run"), "--format", "onnx-int8-qdq",
                       "--output", str(root / "qdq")], capsys)
    assert code == 0, err
    graph = onnx.load(str(root / "qdq" / "model.onnx")).graph
    assert all(node.domain in ("", "ai.onnx") for node in graph.node)  # no ONNX Runtime contrib ops
    results = {}
    for name in ("int8", "qdq"):
        code, out, err = q8(["eval", "--checkpoint", str(root / name), "--data-dir", str(data), "--json"], capsys)
        assert code == 0, err
        results[name] = json.loads(out)["accuracy"]
    assert abs(results["int8"] - results["qdq"]) <= 1 / 64 + 1e-9


def test_a_float_inputs_run_exports_to_onnx_int8_with_those_layers_float(tiny_bert, sst2_dir, tmp_path, capsys):
    pattern = r"layer\.\d+\.output\.dense$"
    code, _, err = q8(run_args(tiny_bert, sst2_dir, tmp_path / "run", "--float-inputs", pattern, fast=True), capsys)
    assert code == 0, err
    best = tmp_path / "run" / json.loads((tmp_path / "run" / "trainer_state.json").read_text())["best_checkpoint"]
    assert QuantSpec.load(best).float_inputs == (pattern,)
    code, _, err = q8(["export", "--checkpoint", str(tmp_path / "run"), "--format", "onnx-int8",
                       "--output", str(tmp_path / "out")], capsys)
    assert code == 0, err
    ops = integer_kernels(str(tmp_path / "out" / "model.onnx"))
    assert ops.get("MatMulIntegerToFloat", 0) + 3 * ops.get("QAttention", 0) == 2 * LINEARS_PER_LAYER + 2 - 2, ops
    code, out, err = q8(["eval", "--checkpoint", str(tmp_path / "out"), "--data-dir", str(sst2_dir), "--json"], capsys)
    assert code == 0, err
    onnx_metrics = json.loads(out.strip().splitlines()[-1])
    code, out, err = q8(["eval", "--checkpoint", str(best), "--data-dir", str(sst2_dir), "--json"], capsys)
    assert code == 0, err
    assert onnx_metrics["accuracy"] == pytest.approx(json.loads(out.strip().splitlines()[-1])["accuracy"], abs=0.02)


MIXED = (r"layer\.\d+\.output\.dense$", r"layer\.0\.attention\.self\.key")


@pytest.mark.parametrize("form,float_inputs", [("ort", MIXED), ("qdq", MIXED), ("ort", (".",))])
def test_float_inputs_layers_are_weight_only_int8_in_the_graph(tiny_bert, tmp_path, form, float_inputs):
    """The layers ``float_inputs`` names: int8 weights (the reference's values) dequantized into a float32
    MatMul on the float32 input; logits as the fake-quant model's, the others still on integer kernels."""
    import torch

    torch.manual_seed(0)
    spec = QuantSpec(ema_decay=0.9, float_inputs=float_inputs)
    backend = load_registry().backend("torch").from_pretrained(str(tiny_bert), labels=("0", "1"), spec=spec,
                                                               device="cpu", seed=0)
    backend.configure_optimizer(learning_rate=1e-3, weight_decay=0.01, warmup_steps=0, total_steps=4,
                                adam_epsilon=1e-6, max_grad_norm=1.0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        backend.train_step({**_batch(rng, n=8), "labels": rng.integers(0, 2, 8)})
    folder = tmp_path / "hf"
    backend.export(folder, "hf")
    weights = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    model = build_model(weights, config, backend.quant_state(), form=form, float_inputs=spec.float_inputs)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = weights["bert.encoder.layer.1.output.dense.weight"]
    np.testing.assert_array_equal(inits["bert.encoder.layer.1.output.dense.weight_int8"],
                                  reference.quantize(w, reference.get_scale(reference.max_abs(w))).T)
    assert "bert.encoder.layer.1.output.dense.bias_int32" not in inits  # a float32 bias
    batch = _batch(rng)
    expected = backend.predict(batch)
    got = _run(model, batch, tmp_path / "int8.onnx")
    ops = integer_kernels(str(tmp_path / "int8.onnx"))
    integer = sum(3 if op == "QAttention" else 1 for op in INTEGER_OPS for _ in range(ops.get(op, 0)))
    # same int8 values; float32 differs only in the order of operations (and 1/S vs S)
    np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(expected).max() + 1e-6)
    assert "MatMulNBits" not in ops  # which would quantize the float inputs after all
    # every input float (".") leaves no integer kernel; else two FFN outputs and layer 0's key are float
    assert integer == (0 if float_inputs == (".",) else 2 * LINEARS_PER_LAYER + 2 - 3), ops


def test_eval_takes_float_inputs_on_a_checkpoint_and_refuses_them_on_an_export(qat_run, capsys):
    root, data = qat_run
    code, out, err = q8(["eval", "--checkpoint", str(root / "run"), "--mode", "dq", "--data-dir", str(data),
                         "--json", "--float-inputs", r"layer\.\d+\.output\.dense$", "--float-inputs", "classifier"],
                        capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["mode"] == "dq"
    code, _, err = q8(["eval", "--checkpoint", str(root / "run"), "--data-dir", str(data), "--float-inputs", "("],
                      capsys)
    assert_one_line_error(code, err, "float_inputs pattern '('", "not a regular expression")
    code, _, err = q8(["eval", "--checkpoint", str(root / "int8"), "--data-dir", str(data),
                       "--float-inputs", "classifier"], capsys)
    assert_one_line_error(code, err, "it runs as exported", "--float-inputs applies to checkpoints")
