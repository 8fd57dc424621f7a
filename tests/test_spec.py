"""QuantSpec: defaults, immutability, JSON round trip, and every validation error."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from q8core.errors import Q8Error
from q8core.spec import QuantSpec


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    assert msg.strip() == msg and msg
    return msg


# -- defaults ----------------------------------------------------------------------------------

def test_defaults():
    s = QuantSpec()
    assert s.mode == "qat"
    assert s.bits == 8
    assert s.ema_decay == 0.9999
    assert s.bias_bits == 32
    assert s.start_step == 0
    assert s.quantize_embeddings is True
    assert s.quantize_weights is True
    assert s.quantize_activations is True
    assert s.quantize_bias is True
    assert s.qmax == 127
    assert s.bias_qmax == 2**31 - 1 == 2147483647
    assert s.quantized is True


def test_mode_quantized_flag():
    assert QuantSpec(mode="fp32").quantized is False
    assert QuantSpec(mode="dq").quantized is True
    assert QuantSpec(mode="qat").quantized is True


def test_qmax_follows_bits():
    assert QuantSpec(bits=4).qmax == 7
    assert QuantSpec(bits=2).qmax == 1
    assert QuantSpec(bias_bits=16).bias_qmax == 32767


def test_frozen():
    s = QuantSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.bits = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mode = "fp32"  # type: ignore[misc]
    assert s.bits == 8 and s.mode == "qat"


def test_equality_and_hash():
    assert QuantSpec(bits=4) == QuantSpec(bits=4)
    assert QuantSpec(bits=4) != QuantSpec(bits=5)
    assert hash(QuantSpec(mode="dq")) == hash(QuantSpec(mode="dq"))


# -- JSON round trip ---------------------------------------------------------------------------

SPECS = [
    QuantSpec(),
    QuantSpec(mode="fp32"),
    QuantSpec(mode="dq", bits=4, ema_decay=0.9, quantize_embeddings=False, quantize_bias=False,
              bias_bits=16, start_step=100, float_inputs=[r"output\.dense$", "query"]),
]


@pytest.mark.parametrize("spec", SPECS)
def test_json_round_trip(spec):
    text = spec.to_json()
    data = json.loads(text)
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(QuantSpec)}
    assert data == {**fields, "float_inputs": list(spec.float_inputs),
                    "asymmetric_inputs": list(spec.asymmetric_inputs)}  # JSON lists
    back = QuantSpec.from_json(text)
    assert back == spec
    assert QuantSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("spec", SPECS)
def test_save_load_round_trip(tmp_path, spec):
    path = spec.save(tmp_path)
    assert path == tmp_path / "q8_spec.json"
    assert path.is_file()
    assert json.loads(path.read_text(encoding="utf-8"))["mode"] == spec.mode
    assert QuantSpec.load(tmp_path) == spec


def test_partial_dict_takes_defaults():
    s = QuantSpec.from_json('{"bits": 6}')
    assert s == QuantSpec(bits=6)
    assert s.mode == "qat" and s.ema_decay == 0.9999


# -- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int8", "QAT", "", "fp16"])
def test_bad_mode(mode):
    with pytest.raises(Q8Error, match=r"mode .* is not one of qat, fp32, dq") as ei:
        QuantSpec(mode=mode)
    assert repr(mode) in one_line(ei)


@pytest.mark.parametrize("bits", [1, 9, 0, -8, 8.0, True, "8", None])
def test_bad_bits(bits):
    with pytest.raises(Q8Error, match=r"bits must be an integer in 2\.\.8") as ei:
        QuantSpec(bits=bits)
    assert one_line(ei).endswith(f"got {bits!r}")


@pytest.mark.parametrize("bias_bits", [1, 33, 32.0, False])
def test_bad_bias_bits(bias_bits):
    with pytest.raises(Q8Error, match=r"bias_bits must be an integer in 2\.\.32") as ei:
        QuantSpec(bias_bits=bias_bits)
    one_line(ei)


@pytest.mark.parametrize("decay", [0, 1, 0.0, 1.0, -0.1, 1.5, True, "0.9", None])
def test_bad_ema_decay(decay):
    with pytest.raises(Q8Error, match=r"ema_decay must be in \(0, 1\)") as ei:
        QuantSpec(ema_decay=decay)
    assert one_line(ei).endswith(f"got {decay!r}")


def test_ema_decay_edges_accepted():
    assert QuantSpec(ema_decay=0.5).ema_decay == 0.5
    assert QuantSpec(ema_decay=1e-9).ema_decay == 1e-9


@pytest.mark.parametrize("step", [-1, 1.0, True, "0"])
def test_bad_start_step(step):
    with pytest.raises(Q8Error, match=r"start_step must be a non-negative integer") as ei:
        QuantSpec(start_step=step)
    one_line(ei)


@pytest.mark.parametrize("name", ["quantize_embeddings", "quantize_weights", "quantize_activations",
                                  "quantize_bias"])
def test_bad_flags(name):
    with pytest.raises(Q8Error, match=rf"{name} must be true or false, got 1") as ei:
        QuantSpec(**{name: 1})
    one_line(ei)


def test_unknown_key_from_dict_names_key():
    with pytest.raises(Q8Error, match=r"unknown key\(s\) colour") as ei:
        QuantSpec.from_dict({"mode": "qat", "colour": "red"})
    one_line(ei)


def test_unknown_keys_from_json_names_all():
    with pytest.raises(Q8Error, match=r"unknown key\(s\) alpha, zeta") as ei:
        QuantSpec.from_json('{"zeta": 1, "alpha": 2}')
    assert "bits" in one_line(ei)  # lists the known keys


@pytest.mark.parametrize("text, kind", [("[1, 2]", "list"), ('"qat"', "str"), ("8", "int"), ("null", "NoneType")])
def test_non_object_json(text, kind):
    with pytest.raises(Q8Error, match=rf"expected a JSON object, got {kind}") as ei:
        QuantSpec.from_json(text)
    one_line(ei)


def test_from_dict_non_dict():
    with pytest.raises(Q8Error, match=r"expected a JSON object, got list"):
        QuantSpec.from_dict([("mode", "qat")])


@pytest.mark.parametrize("text", ["{", "{'mode': 'qat'}", "", "mode=qat\n"])
def test_invalid_json_text(text):
    with pytest.raises(Q8Error, match=r"not valid JSON") as ei:
        QuantSpec.from_json(text)
    one_line(ei)


def test_invalid_value_in_json_keeps_where_prefix():
    with pytest.raises(Q8Error, match=r"^my.json: bits must be an integer in 2\.\.8, got 9$") as ei:
        QuantSpec.from_json('{"bits": 9}', where="my.json")
    one_line(ei)


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(Q8Error, match=r"q8_spec\.json: missing quantizer spec") as ei:
        QuantSpec.load(tmp_path)
    assert str(tmp_path) in one_line(ei)


def test_load_bad_content_names_path(tmp_path):
    (tmp_path / "q8_spec.json").write_text('{"mode": "int4"}', encoding="utf-8")
    with pytest.raises(Q8Error, match=re.escape(str(tmp_path / "q8_spec.json")) + r": mode 'int4'") as ei:
        QuantSpec.load(tmp_path)
    one_line(ei)


def test_load_invalid_json_names_path(tmp_path):
    (tmp_path / "q8_spec.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(Q8Error, match=r"q8_spec\.json: not valid JSON") as ei:
        QuantSpec.load(tmp_path)
    one_line(ei)


# -- float_inputs (mixed precision, beyond the paper) --------------------------------------------------

def test_float_inputs_round_trip_and_pick_layers_by_name():
    s = QuantSpec(float_inputs=[r"layer\.\d+\.output\.dense$"])
    assert s.float_inputs == (r"layer\.\d+\.output\.dense$",) and QuantSpec().float_inputs == ()
    assert json.loads(s.to_json())["float_inputs"] == [r"layer\.\d+\.output\.dense$"]
    assert QuantSpec.from_json(s.to_json()) == s
    mixed = s.for_layer("bert.encoder.layer.3.output.dense")
    assert (mixed.quantize_weights, mixed.quantize_activations, mixed.quantize_bias) == (True, False, False)
    assert mixed.float_inputs == () and mixed.ema_decay == s.ema_decay and mixed.mode == s.mode
    assert s.for_layer("bert.encoder.layer.3.attention.output.dense") is s  # "output.dense" not at the end
    assert QuantSpec().for_layer("bert.encoder.layer.3.output.dense") == QuantSpec()


@pytest.mark.parametrize("value, problem", [
    ("output", "must be a list of regular expressions"),
    ([3], "must be a list of regular expressions"),
    ([""], "must be a list of regular expressions"),
    (["layer.(0"], "pattern 'layer.(0' is not a regular expression"),
])
def test_bad_float_inputs_are_named(value, problem):
    with pytest.raises(Q8Error) as exc:
        QuantSpec(float_inputs=value)
    assert problem in one_line(exc)
    with pytest.raises(Q8Error) as exc:
        QuantSpec.from_json(json.dumps({"float_inputs": value}), where="my_spec.json")
    assert one_line(exc).startswith("my_spec.json: float_inputs") and problem in one_line(exc)
