"""The quantizer spec: how a model is (or is not) quantized.

One small frozen dataclass, stored as ``q8_spec.json`` in every checkpoint and export, so a
loaded model always knows how it was quantized. The arithmetic it describes lives in
:mod:`q8core.reference`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Q8Error

#: ``qat``: Q8BERT quantization-aware fine-tuning (fake quantization in every forward pass).
#: ``fp32``: no quantization at all.
#: ``dq``: FP32 fine-tuning; at inference weights are 8-bit and activation scales are computed
#: from each batch (the paper's post-training dynamic-quantization baseline).
MODES = ("qat", "fp32", "dq")

SPEC_FILE = "q8_spec.json"

#: The grid of a quantized input: ``symmetric`` (the paper: int8 in [-qmax, qmax], zero point 0, range
#: max|x|) or ``asymmetric`` (uint8 in [0, 2^bits - 1] with a zero point, range [min x, max x]).
GRIDS = ("symmetric", "asymmetric")

#: Per Hugging Face ``model_type``: the linear layer whose input is the output of a tanh (the pooler's
#: activation in BERT, the classification head's in RoBERTa), which ``tanh_range`` quantizes over [-1, 1].
TANH_FED = {"bert": "classifier", "roberta": "classifier.out_proj", "xlm-roberta": "classifier.out_proj",
            "camembert": "classifier.out_proj"}


@dataclass(frozen=True)
class QuantSpec:
    """Symmetric, linear, per-tensor quantization as in Q8BERT (see METHOD.md)."""

    mode: str = "qat"
    bits: int = 8
    ema_decay: float = 0.9999
    quantize_embeddings: bool = True
    quantize_weights: bool = True
    quantize_activations: bool = True
    quantize_bias: bool = True  # int32 bias with scale S_W * S_x
    bias_bits: int = 32
    start_step: int = 0  # fake quantization starts after this many training steps
    #: Beyond the paper: regular expressions on Hugging Face module names (``re.search``) of linear layers
    #: whose inputs stay float32 -- their weights stay 8-bit, their bias float32 (mixed precision). Q8BERT
    #: itself quantizes every input: ``()``.
    float_inputs: tuple[str, ...] = ()
    #: Beyond the paper: the grid of every quantized input (:data:`GRIDS`), and name patterns (as
    #: ``float_inputs``) of layers whose inputs take the asymmetric grid whatever ``activation_grid`` says
    #: (e.g. ``'output\.dense$'``: GELU's output, which is almost never negative).
    activation_grid: str = "symmetric"
    asymmetric_inputs: tuple[str, ...] = ()
    #: Beyond the paper: one weight scale per output row of each linear layer (embeddings stay per tensor).
    per_channel_weights: bool = False
    #: Beyond the paper: the layer that reads tanh's output (BERT's classifier, after the pooler; see
    #: :data:`TANH_FED`) is quantized over tanh's range [-1, 1] instead of its EMA. An untrained pooler's first
    #: outputs are a fraction of a trained one's, and the paper's EMA keeps that first range for good.
    tanh_range: bool = False

    def __post_init__(self) -> None:
        for field_name in ("float_inputs", "asymmetric_inputs"):
            object.__setattr__(self, field_name, _patterns(field_name, getattr(self, field_name)))
        if self.activation_grid not in GRIDS:
            raise Q8Error(f"quantizer spec: activation_grid {self.activation_grid!r} is not one of "
                          f"{', '.join(GRIDS)}")
        if self.mode not in MODES:
            raise Q8Error(f"quantizer spec: mode {self.mode!r} is not one of {', '.join(MODES)}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise Q8Error(f"quantizer spec: bits must be an integer in 2..8, got {self.bits!r}")
        if isinstance(self.bias_bits, bool) or not isinstance(self.bias_bits, int) or not 2 <= self.bias_bits <= 32:
            raise Q8Error(f"quantizer spec: bias_bits must be an integer in 2..32, got {self.bias_bits!r}")
        if not isinstance(self.ema_decay, (int, float)) or isinstance(self.ema_decay, bool) \
                or not 0.0 < float(self.ema_decay) < 1.0:
            raise Q8Error(f"quantizer spec: ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise Q8Error(f"quantizer spec: start_step must be a non-negative integer, got {self.start_step!r}")
        for name in ("quantize_embeddings", "quantize_weights", "quantize_activations", "quantize_bias",
                     "per_channel_weights", "tanh_range"):
            if not isinstance(getattr(self, name), bool):
                raise Q8Error(f"quantizer spec: {name} must be true or false, got {getattr(self, name)!r}")

    @property
    def qmax(self) -> int:
        """Largest integer of the symmetric range [-qmax, qmax]: 2^(M-1) - 1 (127 for 8 bits)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def bias_qmax(self) -> int:
        return 2 ** (self.bias_bits - 1) - 1

    def float_input(self, name: str) -> bool:
        """Whether ``float_inputs`` keeps the input of the linear layer ``name`` (a Hugging Face module
        name) float32."""
        return any(re.search(pattern, name) for pattern in self.float_inputs)

    def grid(self, name: str) -> str:
        """The grid of the linear layer ``name``'s input: ``asymmetric`` where ``activation_grid`` says so
        or an ``asymmetric_inputs`` pattern matches, else ``symmetric``."""
        if self.activation_grid == "asymmetric" or any(re.search(p, name) for p in self.asymmetric_inputs):
            return "asymmetric"
        return "symmetric"

    def fixed_range(self, name: str, model_type: str) -> float | None:
        """max|x| fixed by construction for the linear layer ``name`` of a ``model_type`` model: 1 for the
        layer that reads tanh's output when ``tanh_range`` is on; ``None`` (the EMA's) otherwise."""
        return 1.0 if self.tanh_range and TANH_FED.get(model_type) == name else None

    @property
    def asymmetric(self) -> bool:
        """Whether this (per-layer, see :meth:`for_layer`) spec quantizes inputs on the asymmetric grid."""
        return self.quantize_activations and self.activation_grid == "asymmetric"

    def for_layer(self, name: str) -> "QuantSpec":
        """The spec of the linear layer ``name``, its patterns resolved: inputs and bias float32 when
        :meth:`float_input`, the input's grid from :meth:`grid`."""
        if self.float_input(name):
            return dataclasses.replace(self, quantize_activations=False, quantize_bias=False, float_inputs=(),
                                       asymmetric_inputs=(), activation_grid="symmetric")
        # the patterns stay (harmless: a layer's spec asks only ``activation_grid``), so an unmatched layer
        # shares this spec object
        grid = self.grid(name)
        return self if grid == self.activation_grid else dataclasses.replace(self, activation_grid=grid)

    def check_float_inputs(self, layer_names: list[str]) -> None:
        """Refuse a ``float_inputs`` or ``asymmetric_inputs`` pattern that names none of the model's linear
        layers: a typo would otherwise leave every layer as it was without a word."""
        for field_name in ("float_inputs", "asymmetric_inputs"):
            for pattern in getattr(self, field_name):
                if not any(re.search(pattern, name) for name in layer_names):
                    raise Q8Error(f"{field_name} pattern {pattern!r} matches none of the model's linear layers "
                                  f"(their names look like {', '.join(layer_names[-3:])})")

    @property
    def quantized(self) -> bool:
        """Whether the model carries quantized modules at all."""
        return self.mode != "fp32"

    # -- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "float_inputs": list(self.float_inputs),
                "asymmetric_inputs": list(self.asymmetric_inputs)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, where: str = "quantizer spec") -> "QuantSpec":
        if not isinstance(data, dict):
            raise Q8Error(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise Q8Error(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls(**data)
        except Q8Error as exc:
            raise Q8Error(f"{where}: {str(exc).removeprefix('quantizer spec: ')}") from None

    @classmethod
    def from_json(cls, text: str, where: str = "quantizer spec") -> "QuantSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise Q8Error(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data, where)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / SPEC_FILE
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: Path) -> "QuantSpec":
        path = Path(directory) / SPEC_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise Q8Error(f"{path}: missing quantizer spec (is {directory} a q8 checkpoint?)") from None
        return cls.from_json(text, where=str(path))


def _patterns(field_name: str, value: Any) -> tuple[str, ...]:
    """``value`` as a tuple of regular expressions on module names, or a one-line error naming the field."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) \
            or not all(isinstance(p, str) and p for p in value):
        raise Q8Error(f"quantizer spec: {field_name} must be a list of regular expressions on module names, "
                      f"got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise Q8Error(f"quantizer spec: {field_name} pattern {pattern!r} is not a regular expression "
                          f"({exc})") from None
    return tuple(value)
