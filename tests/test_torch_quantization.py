"""The PyTorch quantized modules against the NumPy reference, bit for bit, and their gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from backends.pytorch.quantization import (QuantizedEmbedding, QuantizedLinear, quantize_model,
                                           quantized_modules)
from q8core import reference as R
from q8core.spec import QuantSpec


def _linear(in_f=48, out_f=16, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def _inputs(rng, scales=(1.0, 3.0, 0.25, 2.0), shape=(3, 5, 48)):
    return [(rng.standard_normal(shape) * s).astype(np.float32) for s in scales]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


@pytest.mark.parametrize("bits", [8, 4])
def test_qat_linear_matches_reference_bit_for_bit_in_training_and_inference(bits):
    rng = np.random.default_rng(1)
    base = _linear()
    spec = QuantSpec(bits=bits, ema_decay=0.9)
    layer = QuantizedLinear.from_linear(base, spec).train()
    ema = None
    for x in _inputs(rng):
        y = layer(torch.from_numpy(x))
        ema = R.ema_update(ema, R.max_abs(x), spec.ema_decay)
        assert np.float32(layer.input_ema.item()) == ema  # same float32 EMA, bit for bit
        expected = R.linear_forward(x, _np(base.weight), _np(base.bias), ema, bits=bits)
        assert y.dtype == torch.float32
        np.testing.assert_array_equal(_np(y), expected)
    layer.eval()
    x = _inputs(rng, scales=(5.0,))[0]  # inference clamps to the stored EMA range, no update
    before = layer.input_ema.clone()
    np.testing.assert_array_equal(_np(layer(torch.from_numpy(x))),
                                  R.linear_forward(x, _np(base.weight), _np(base.bias), ema, bits=bits))
    assert torch.equal(layer.input_ema, before)


def test_int8_values_are_identical_to_the_reference():
    from backends.pytorch.quantization import get_scale, quantize

    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 64)) * 0.05).astype(np.float32)
    w[0, 0] = 0.5  # halves: x * S lands exactly on .5 for some entries
    s_ref = R.get_scale(R.max_abs(w))
    s = get_scale(torch.from_numpy(w).abs().max(), 127)
    assert np.float32(s.item()) == s_ref
    q = quantize(torch.from_numpy(w), s, 127).to(torch.int8)
    np.testing.assert_array_equal(q.numpy(), R.quantize(w, s_ref))


def test_dq_mode_trains_in_fp32_and_quantizes_dynamically_at_inference():
    rng = np.random.default_rng(3)
    base = _linear()
    layer = QuantizedLinear.from_linear(base, QuantSpec(mode="dq")).train()
    x = _inputs(rng, scales=(2.0,))[0]
    np.testing.assert_array_equal(_np(layer(torch.from_numpy(x))), _np(base(torch.from_numpy(x))))
    assert layer.input_ema.item() == 0.0  # no EMA in dq mode
    layer.eval()
    expected = R.linear_forward(x, _np(base.weight), _np(base.bias), R.max_abs(x))
    np.testing.assert_array_equal(_np(layer(torch.from_numpy(x))), expected)


def test_fp32_spec_leaves_model_untouched(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    quantize_model(model, QuantSpec(mode="fp32"))
    assert not quantized_modules(model)


def test_straight_through_gradients():
    rng = np.random.default_rng(4)
    base = _linear(in_f=8, out_f=3)
    layer = QuantizedLinear.from_linear(base, QuantSpec()).train()
    x = torch.from_numpy(_inputs(rng, scales=(1.0,), shape=(2, 4, 8))[0]).requires_grad_()
    grad_out = torch.from_numpy(rng.standard_normal((2, 4, 3)).astype(np.float32))
    layer(x).backward(grad_out)
    s_x = R.get_scale(layer.input_ema.item())
    s_w = R.get_scale(R.max_abs(_np(base.weight)))
    fq_x = R.fake_quantize(_np(x), s_x)
    fq_w = R.fake_quantize(_np(base.weight), s_w)
    g = _np(grad_out)
    # dFakeQuant/dx = 1: the layer differentiates as y = FQ(x) FQ(W)^T + b
    np.testing.assert_allclose(_np(x.grad), g @ fq_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(layer.weight.grad), g.reshape(-1, 3).T @ fq_x.reshape(-1, 8), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(layer.bias.grad), g.reshape(-1, 3).sum(0), rtol=1e-5, atol=1e-6)
    # and the gradient is not the float layer's: it sees the quantized operands
    assert not np.allclose(_np(layer.weight.grad), g.reshape(-1, 3).T @ _np(x).reshape(-1, 8), rtol=1e-7, atol=0)


def test_embedding_matches_reference_and_passes_gradient_straight_through():
    torch.manual_seed(5)
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = QuantizedEmbedding.from_embedding(base, QuantSpec()).train()
    ids = torch.tensor([[1, 2, 3, 2], [4, 0, 19, 1]])
    out = layer(ids)
    np.testing.assert_array_equal(_np(out), R.embedding_forward(ids.numpy(), _np(base.weight)))
    out.sum().backward()
    expected = np.zeros((20, 6), np.float32)
    for i in ids.reshape(-1).tolist():
        if i != 0:  # padding row gets no gradient, as in nn.Embedding
            expected[i] += 1
    np.testing.assert_array_equal(_np(layer.weight.grad), expected)


def test_start_step_delays_quantization_and_the_first_quantized_step_starts_the_ema():
    rng = np.random.default_rng(6)
    base = _linear()
    layer = QuantizedLinear.from_linear(base, QuantSpec(start_step=2, ema_decay=0.5)).train()
    xs = _inputs(rng, scales=(1.0, 2.0, 3.0, 0.5))
    ema = None
    for i, x in enumerate(xs):
        y = _np(layer(torch.from_numpy(x)))
        if i < 2:  # delay: plain float32, no range tracking
            np.testing.assert_array_equal(y, _np(base(torch.from_numpy(x))))
            assert layer.input_ema.item() == 0.0 and not layer.ema_ready
        else:
            ema = R.ema_update(ema, R.max_abs(x), 0.5)
            np.testing.assert_array_equal(y, R.linear_forward(x, _np(base.weight), _np(base.bias), ema))
    assert np.float32(layer.input_ema.item()) == ema == R.ema_update(R.max_abs(xs[2]), R.max_abs(xs[3]), 0.5)


def test_quantize_model_swaps_every_linear_and_embedding_and_nothing_else(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3)
    keys_before = set(model.state_dict())
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    n_layernorm = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    quantize_model(model, QuantSpec())
    linears = [m for _, m in quantized_modules(model) if isinstance(m, QuantizedLinear)]
    embeddings = [m for _, m in quantized_modules(model) if isinstance(m, QuantizedEmbedding)]
    # 2 layers x (Q, K, V, attention output, intermediate, output) + pooler + classifier
    assert len(linears) == n_linear == 2 * 6 + 2
    assert len(embeddings) == 3  # word, position, token type
    assert sum(type(m) is nn.Linear for m in model.modules()) == 0
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == n_layernorm
    assert set(model.state_dict()) == keys_before  # same names: a checkpoint loads either way


def test_float_inputs_layers_take_float_inputs_and_int8_weights(tiny_bert):
    """A layer ``float_inputs`` names computes x · FakeQuant(W)ᵀ + b (inputs and bias float32), the
    others stay the reference's integer layer."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    quantize_model(model, QuantSpec(ema_decay=0.9, float_inputs=[r"layer\.1\.output\.dense$"]))
    layers = dict(quantized_modules(model))
    mixed, full = layers["bert.encoder.layer.1.output.dense"], layers["bert.encoder.layer.0.output.dense"]
    assert [n for n, m in layers.items() if isinstance(m, QuantizedLinear) and not m.spec.quantize_activations] \
        == ["bert.encoder.layer.1.output.dense"]
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2, 5, mixed.in_features)) * 3).astype(np.float32)
    w, b = _np(mixed.weight), _np(mixed.bias)
    mixed.train()
    y = _np(mixed(torch.from_numpy(x)))
    expected = x @ R.fake_quantize(w, R.get_scale(R.max_abs(w))).T + b
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    integer = R.linear_forward(x, w, b, R.max_abs(x))  # what the full scheme gives on the same input
    assert np.abs(integer - expected).max() > 1e-3
    assert mixed.input_ema.item() == 0.0  # no range is tracked for a float input
    full.train()
    x0 = (rng.standard_normal((2, 5, full.in_features))).astype(np.float32)
    np.testing.assert_array_equal(_np(full(torch.from_numpy(x0))),
                                  R.linear_forward(x0, _np(full.weight), _np(full.bias), R.max_abs(x0)))


def test_a_float_inputs_pattern_that_names_no_layer_is_refused(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from q8core.errors import Q8Error

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    with pytest.raises(Q8Error, match=r"float_inputs pattern 'ouput.*' matches none of the model's linear "
                                      r"layers \(their names look like .*bert\.pooler\.dense, classifier\)"):
        quantize_model(model, QuantSpec(float_inputs=["classifier", r"ouput\.dense"]))


# -- beyond the paper: asymmetric inputs, per-channel weights ---------------------------------------

@pytest.mark.parametrize("per_channel", [False, True])
def test_asymmetric_linear_matches_reference_bit_for_bit(per_channel):
    rng = np.random.default_rng(5)
    base = _linear()
    spec = QuantSpec(ema_decay=0.9, activation_grid="asymmetric", per_channel_weights=per_channel)
    layer = QuantizedLinear.from_linear(base, spec).train()
    lo = hi = None
    # GELU-like inputs: mostly small, never far below zero, a few large values
    for x in [np.maximum(x, -0.17) for x in _inputs(rng)]:
        y = layer(torch.from_numpy(x))
        lo = R.ema_update(lo, R.min_max(x)[0], spec.ema_decay)
        hi = R.ema_update(hi, R.min_max(x)[1], spec.ema_decay)
        assert (np.float32(layer.input_min.item()), np.float32(layer.input_max.item())) == (lo, hi)
        expected = R.linear_forward(x, _np(base.weight), _np(base.bias), (lo, hi), per_channel=per_channel)
        np.testing.assert_array_equal(_np(y), expected)
    layer.eval()
    x = _inputs(rng, scales=(5.0,))[0]  # inference clamps to the stored range, below zero too
    np.testing.assert_array_equal(_np(layer(torch.from_numpy(x))),
                                  R.linear_forward(x, _np(base.weight), _np(base.bias), (lo, hi),
                                                   per_channel=per_channel))
    assert layer.input_range() == (float(lo), float(hi))


def test_per_channel_symmetric_linear_matches_reference_and_differs_from_per_tensor():
    rng = np.random.default_rng(6)
    base = _linear()
    with torch.no_grad():
        base.weight[3] *= 20.0  # one large row: per tensor, the other rows lose most of their codes
    x = _inputs(rng, scales=(1.0,))[0]
    out = {}
    for per_channel in (False, True):
        layer = QuantizedLinear.from_linear(base, QuantSpec(per_channel_weights=per_channel)).train()
        out[per_channel] = _np(layer(torch.from_numpy(x)))
        np.testing.assert_array_equal(out[per_channel], R.linear_forward(
            x, _np(base.weight), _np(base.bias), R.max_abs(x), per_channel=per_channel))
    exact = x @ _np(base.weight).T + _np(base.bias)
    rest = [j for j in range(16) if j != 3]
    assert np.abs(out[True] - exact)[..., rest].max() < 0.5 * np.abs(out[False] - exact)[..., rest].max()


def test_asymmetric_dq_uses_each_batch_min_and_max():
    rng = np.random.default_rng(7)
    base = _linear()
    layer = QuantizedLinear.from_linear(base, QuantSpec(mode="dq", activation_grid="asymmetric")).eval()
    for x in _inputs(rng, scales=(1.0, 4.0)):
        x = np.abs(x) - 0.1
        np.testing.assert_array_equal(_np(layer(torch.from_numpy(x))), R.linear_forward(
            x, _np(base.weight), _np(base.bias), R.min_max(x)))


def test_asymmetric_gradients_are_straight_through_on_the_dequantized_grid():
    rng = np.random.default_rng(8)
    base = _linear()
    spec = QuantSpec(activation_grid="asymmetric", per_channel_weights=True)
    layer = QuantizedLinear.from_linear(base, spec).train()
    x = torch.from_numpy(np.abs(_inputs(rng, scales=(1.0,))[0]) - 0.05).requires_grad_()
    layer(x).sum().backward()
    w_q, s_w = R.quantize_weight(_np(base.weight), per_channel=True)
    s_x, z = R.asymmetric_params(*R.min_max(_np(x)))
    fq_w = (w_q.astype(np.float32) / s_w[:, None]).astype(np.float32)
    fq_x = R.fake_quantize_asymmetric(_np(x), s_x, z)
    np.testing.assert_allclose(_np(x.grad), np.ones((3, 5, 16), np.float32) @ fq_w, rtol=1e-6)
    np.testing.assert_allclose(_np(base.weight.grad), np.ones((15, 16), np.float32).T @ fq_x.reshape(15, 48),
                               rtol=1e-5)


def test_asymmetric_inputs_pattern_picks_layers(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    quantize_model(model, QuantSpec(asymmetric_inputs=[r"layer\.\d+\.output\.dense$"]))
    grids = {name: m.spec.activation_grid for name, m in quantized_modules(model) if isinstance(m, QuantizedLinear)}
    assert {n for n, g in grids.items() if g == "asymmetric"} == {f"bert.encoder.layer.{i}.output.dense" for i in (0, 1)}
    assert all(hasattr(m, "input_min") != hasattr(m, "input_ema") for _, m in quantized_modules(model)
               if isinstance(m, QuantizedLinear))


def test_tanh_range_fixes_the_classifier_input_range_to_one(tiny_bert):
    """With ``tanh_range`` the classifier (BERT's, reading the pooler's tanh) quantizes over [-1, 1] from
    its first step, whatever the batch's range; every other layer keeps its EMA."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    quantize_model(model, QuantSpec(ema_decay=0.9, tanh_range=True))
    layers = dict(quantized_modules(model))
    assert [n for n, m in layers.items() if getattr(m, "fixed_range", None) is not None] == ["classifier"]
    classifier = layers["classifier"].train()
    rng = np.random.default_rng(9)
    x = (np.tanh(rng.standard_normal((4, 32))) * 0.3).astype(np.float32)  # an untrained pooler's small outputs
    y = classifier(torch.from_numpy(x))
    assert classifier.input_ema.item() == 1.0  # not max|x| (~0.3)
    np.testing.assert_array_equal(_np(y), R.linear_forward(x, _np(classifier.weight), _np(classifier.bias), 1.0))
    assert QuantSpec(tanh_range=True).fixed_range("classifier", "distilbert") is None  # its classifier reads a ReLU
