"""The quantizer options beyond the paper through the command line: asymmetric inputs and per-channel weights
train, travel with the checkpoint, evaluate, report, and are refused in one line where they are not built."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from q8core.spec import QuantSpec
from test_cli import assert_one_line_error, q8, run_args, snapshot

FFN_OUTPUT = r"layer\.\d+\.output\.dense$"


@pytest.fixture(scope="module")
def asymmetric_run(tiny_bert, tmp_path_factory):
    from conftest import write_sst2
    import cli

    root = tmp_path_factory.mktemp("grid")
    data = write_sst2(root / "SST-2")
    try:
        cli.main(["run", "--task", "sst-2", "--model", str(tiny_bert), "--data-dir", str(data), "--output-dir",
                  str(root / "run"), "--asymmetric-inputs", FFN_OUTPUT, "--per-channel-weights", "--ema-decay", "0.9",
                  "--logging-steps", "1", "--max-steps", "4", "--eval-steps", "4", "--learning-rate", "3e-3",
                  "--quiet"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return data, root / "run"


def _best(run: Path) -> Path:
    return run / json.loads((run / "trainer_state.json").read_text())["best_checkpoint"]


def test_the_options_train_and_travel_with_the_checkpoint(asymmetric_run, capsys):
    data, run = asymmetric_run
    best = _best(run)
    spec = QuantSpec.load(best)
    assert spec.asymmetric_inputs == (FFN_OUTPUT,) and spec.per_channel_weights
    assert spec.activation_grid == "symmetric"
    state = load_file(str(best / "quant_state.safetensors"))
    ffn = [f"bert.encoder.layer.{i}.output.dense" for i in (0, 1)]
    for name in ffn:
        lo, hi = float(state[f"{name}.input_min"][0]), float(state[f"{name}.input_max"][0])
        assert lo <= 0 < hi and f"{name}.input_ema" not in state  # GELU's output: min a little below 0
    assert "bert.encoder.layer.0.intermediate.dense.input_ema" in state
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ema = [r["ema"] for r in logged if r["type"] == "train" and r.get("ema")][-1]
    assert isinstance(ema[ffn[0]], list) and isinstance(ema["classifier"], float)
    # the reloaded checkpoint scores exactly what the run measured at that step: ranges restored as trained
    recorded = [r for r in logged if r["type"] == "eval"][-1]
    code, out, err = q8(["eval", "--checkpoint", str(best), "--data-dir", str(data), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["accuracy"] == recorded["accuracy"]
    code, _, err = q8(["report", str(run), "--output", str(run.parent / "report")], capsys)
    assert code == 0, err
    report = (run.parent / "report" / "report.md").read_text()
    lo, hi = ema[ffn[1]]
    assert f"| `{ffn[1]}` | {lo:.4f} .. {hi:.4f} |" in report  # the asymmetric range as min .. max
    assert (run.parent / "report" / "ema.png").stat().st_size > 0


@pytest.mark.parametrize("fmt", ["onnx-int8", "onnx-int8-qdq", "openvino"])
def test_the_int8_exports_evaluate_like_the_checkpoint(asymmetric_run, tmp_path, capsys, monkeypatch, fmt):
    pytest.importorskip("openvino" if fmt == "openvino" else "onnxruntime")
    monkeypatch.setenv("Q8_PLUGINS", "torch,glue,onnxruntime,openvino")
    data, run = asymmetric_run
    code, _, err = q8(["export", "--checkpoint", str(run), "--format", fmt, "--output", str(tmp_path / fmt)], capsys)
    assert code == 0, err
    assert QuantSpec.load(tmp_path / fmt) == QuantSpec.load(_best(run))  # the spec travels with the export
    scores = []
    for folder in (tmp_path / fmt, _best(run)):
        code, out, err = q8(["eval", "--checkpoint", str(folder), "--data-dir", str(data), "--json"], capsys)
        assert code == 0, err
        scores.append(json.loads(out.strip().splitlines()[-1])["accuracy"])
    assert scores[0] == pytest.approx(scores[1], abs=1 / 64 + 1e-9)  # at most one toy dev row apart


def test_eval_applies_the_grid_to_post_training_quantization_only(tiny_bert, asymmetric_run, tmp_path, capsys):
    data, run = asymmetric_run
    code, _, err = q8(["eval", "--checkpoint", str(run), "--data-dir", str(data), "--activation-grid", "asymmetric"],
                      capsys)
    assert_one_line_error(code, err, "--activation-grid applies to post-training quantization", "--mode dq")
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "fp32", "--mode", "fp32", fast=True), capsys)
    assert code == 0, err
    results = {}
    for extra in ([], ["--activation-grid", "asymmetric", "--per-channel-weights"]):
        code, out, err = q8(["eval", "--checkpoint", str(tmp_path / "fp32"), "--data-dir", str(data), "--json",
                             "--mode", "dq", *extra], capsys)
        assert code == 0, err
        results[bool(extra)] = json.loads(out.strip().splitlines()[-1])
        assert results[bool(extra)]["mode"] == "dq"


def test_bad_grid_values_are_named_and_nothing_is_written(tiny_bert, asymmetric_run, tmp_path, capsys):
    data, _ = asymmetric_run
    spec = tmp_path / "spec.json"
    spec.write_text('{"activation_grid": "int4"}')
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "out", "--spec", str(spec), fast=True), capsys)
    assert_one_line_error(code, err, str(spec), "activation_grid 'int4' is not one of symmetric, asymmetric")
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "out", "--asymmetric-inputs", "nothing-like-this",
                               fast=True), capsys)
    assert_one_line_error(code, err, "asymmetric_inputs pattern 'nothing-like-this' matches none")
    assert snapshot(tmp_path / "out") is None


def test_mindspore_trains_them_and_reloads_its_ranges(tiny_bert, asymmetric_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("mindspore")
    monkeypatch.setenv("Q8_PLUGINS", "torch,mindspore,glue")
    data, _ = asymmetric_run
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "ms", "--backend", "mindspore", "--asymmetric-inputs",
                               FFN_OUTPUT, "--per-channel-weights", "--tanh-range", "--max-steps", "3", "--eval-steps",
                               "3", fast=True), capsys)
    assert code == 0, err
    best = _best(tmp_path / "ms")
    spec = QuantSpec.load(best)
    assert spec.asymmetric_inputs == (FFN_OUTPUT,) and spec.per_channel_weights and spec.tanh_range
    recorded = [json.loads(line) for line in (tmp_path / "ms" / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["type"] == "eval"][-1]
    code, out, err = q8(["eval", "--checkpoint", str(best), "--data-dir", str(data), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["accuracy"] == recorded["accuracy"]


# -- the int8 exports of the new grids -------------------------------------------------------------
GRID_SPECS = {
    "asymmetric-ffn": QuantSpec(ema_decay=0.9, asymmetric_inputs=[FFN_OUTPUT]),
    "asymmetric-all-per-channel": QuantSpec(ema_decay=0.9, activation_grid="asymmetric", per_channel_weights=True),
}


def _batch(rng, n=6, seq=12, vocab=27):
    mask = np.ones((n, seq), np.int64)
    mask[1, 7:] = 0
    return {"input_ids": rng.integers(5, vocab, (n, seq)), "attention_mask": mask,
            "token_type_ids": (np.arange(seq) >= seq // 2).astype(np.int64)[None].repeat(n, 0)}


@pytest.fixture(scope="module", params=sorted(GRID_SPECS))
def grid_model(request, tiny_bert):
    """The tiny BERT after 4 QAT steps with one of the new grids, its HF export and a batch."""
    import torch

    from q8core.export import hf_export
    from q8core.plugins import load_registry

    torch.manual_seed(0)
    backend = load_registry().backend("torch").from_pretrained(
        str(tiny_bert), labels=("0", "1"), spec=GRID_SPECS[request.param], device="cpu", seed=0)
    backend.configure_optimizer(learning_rate=1e-3, weight_decay=0.01, warmup_steps=0, total_steps=4,
                                adam_epsilon=1e-6, max_grad_norm=1.0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        backend.train_step({**_batch(rng, n=8), "labels": rng.integers(0, 2, 8)})
    weights, config_text = hf_export(backend)
    return backend, weights, json.loads(config_text), _batch(rng)


@pytest.mark.parametrize("form", ["ort", "qdq"])
def test_onnx_int8_holds_the_reference_values_runs_integer_kernels_and_gives_the_fake_quant_logits(
        grid_model, form, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from q8core import reference
    from q8core.onnx_graph import INTEGER_OPS, build_model, integer_kernels

    backend, weights, config, batch = grid_model
    spec, ranges = backend.spec, backend.quant_state()
    model = build_model(weights, config, ranges, form=form, per_channel=spec.per_channel_weights)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for module, value in ranges.items():
        w_q, s_w = reference.quantize_weight(weights[f"{module}.weight"], per_channel=spec.per_channel_weights)
        s_x, zero_point = reference.input_params(value)
        assert isinstance(value, tuple) == (spec.for_layer(module).activation_grid == "asymmetric")
        np.testing.assert_array_equal(inits[f"{module}.weight_int8"], w_q.T)
        np.testing.assert_array_equal(inits[f"{module}.bias_int32"],
                                      reference.quantize_bias(weights[f"{module}.bias"], s_w, s_x))
        if zero_point is not None:
            assert inits[f"{module}.input_zero"].dtype == np.uint8 and inits[f"{module}.input_zero"] == zero_point
    path = tmp_path / "int8.onnx"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    ops = integer_kernels(str(path))
    assert sum(ops.get(op, 0) for op in INTEGER_OPS) == len(ranges), ops  # every layer on an integer kernel
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    expected = backend.predict(batch)
    np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(expected).max() + 1e-6)


def test_openvino_int8_runs_every_layer_as_an_integer_primitive_with_the_fake_quant_logits(grid_model):
    pytest.importorskip("openvino")
    from backends.openvino.backend import compile_model
    from backends.openvino.graph import build_model, runtime_precisions

    backend, weights, config, batch = grid_model
    model = build_model(weights, config, backend.quant_state(), per_channel=backend.spec.per_channel_weights)
    compiled = compile_model(model, "f32")
    precisions = runtime_precisions(compiled)
    per_layer = ("attention.self.qkv", "attention.output.dense", "intermediate.dense", "output.dense")
    layers = [f"bert.encoder.layer.{i}.{name}" for i in range(2) for name in per_layer] + ["bert.pooler.dense",
                                                                                           "classifier"]
    for layer in layers:  # Q, K and V as one matmul: their ranges are the same
        assert precisions.get(layer) == ("u8" if backend.spec.for_layer(layer).asymmetric else "i8"), (layer, precisions)
    expected = backend.predict(batch)
    np.testing.assert_allclose(compiled(batch)["logits"], expected, atol=1e-4 * np.abs(expected).max() + 1e-7)


# -- recipes -------------------------------------------------------------------------------------------
def test_recipes_set_the_spec_and_are_recorded(tiny_bert, asymmetric_run, tmp_path, capsys):
    from q8core.config import RunConfig
    from q8core.recipes import DEFAULT_RECIPE, RECIPES

    data, _ = asymmetric_run
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "default", fast=True), capsys)
    assert code == 0, err
    config = RunConfig.load(tmp_path / "default")
    assert (config.recipe, DEFAULT_RECIPE) == ("full-int8", "full-int8")
    from q8core.recipes import FFN_OUTPUT as RECIPE_FFN

    assert config.spec == QuantSpec(tanh_range=True, asymmetric_inputs=[RECIPE_FFN], per_channel_weights=True,
                                    start_step=0) == RECIPES["full-int8"].spec()
    assert QuantSpec.load(_best(tmp_path / "default")) == config.spec
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "paper", "--recipe", "paper", "--ema-decay", "0.9",
                               fast=True), capsys)
    assert code == 0, err
    config = RunConfig.load(tmp_path / "paper")
    assert config.recipe == "paper" and config.spec == QuantSpec(ema_decay=0.9)  # METHOD.md, one field overridden


def test_a_spec_file_and_a_recipe_together_are_refused(tiny_bert, asymmetric_run, tmp_path, capsys):
    data, _ = asymmetric_run
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "out", "--spec", str(spec), "--recipe", "paper",
                               fast=True), capsys)
    assert_one_line_error(code, err, f"--spec {spec} and --recipe paper both set the quantizer")
    assert snapshot(tmp_path / "out") is None


def test_the_recipes_delay_is_a_fraction_of_the_run_written_as_a_step(tiny_bert, asymmetric_run, tmp_path, capsys):
    from q8core.config import RunConfig
    from q8core.recipes import DEFAULT_RECIPE, RECIPES

    data, _ = asymmetric_run
    ratio = RECIPES[DEFAULT_RECIPE].quant_delay_ratio or 0.0
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "run", "--max-steps", "9", "--save-steps", "9", fast=True),
                      capsys)
    assert code == 0, err
    config = RunConfig.load(tmp_path / "run")
    assert config.quant_delay_ratio == RECIPES[DEFAULT_RECIPE].quant_delay_ratio
    assert config.spec.start_step == int(ratio * 9) == QuantSpec.load(tmp_path / "run" / "checkpoint-9").start_step
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "given", "--max-steps", "9", "--quant-delay", "4",
                               fast=True), capsys)
    assert code == 0, err
    config = RunConfig.load(tmp_path / "given")  # --quant-delay says the step itself
    assert (config.quant_delay_ratio, config.spec.start_step) == (None, 4)


@pytest.mark.parametrize("family", ["distilbert", "roberta", "electra"])
def test_the_default_recipe_fits_the_bert_family(family):
    """full-int8's patterns name each family's FFN output layers (GELU's output) and tanh's range only the layer
    that reads a tanh (RoBERTa's head; DistilBERT's classifier reads a ReLU, ELECTRA's a GELU)."""
    import transformers

    from backends.pytorch.quantization import QuantizedLinear, quantize_model, quantized_modules
    from q8core.recipes import RECIPES

    small = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config, model_class = {
        "distilbert": (transformers.DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
                       transformers.DistilBertForSequenceClassification),
        "roberta": (transformers.RobertaConfig(**small), transformers.RobertaForSequenceClassification),
        "electra": (transformers.ElectraConfig(embedding_size=32, **small), transformers.ElectraForSequenceClassification),
    }[family]
    model = quantize_model(model_class(config), RECIPES["full-int8"].spec())
    layers = {n: m for n, m in quantized_modules(model) if isinstance(m, QuantizedLinear)}
    asymmetric = sorted(n for n, m in layers.items() if m.spec.asymmetric)
    assert len(asymmetric) == 2 and all(n.endswith(("output.dense", "ffn.lin2")) for n in asymmetric), asymmetric
    assert not any("attention" in n for n in asymmetric)
    fixed = [n for n, m in layers.items() if m.fixed_range is not None]
    assert fixed == (["classifier.out_proj"] if family == "roberta" else [])
