"""``q8 export``: a backend's own formats, plus the formats built on any backend's ``hf`` export.

Those are :class:`ExportFormat` entries: the ONNX ones defined here, and any a plugin adds through
the ``register_export_formats`` hook (the OpenVINO plugin's ``openvino``). Each names the engine that
runs what it writes, so the export folder's manifest sends ``q8 eval`` there.

``onnx-int8`` is the model a user deploys on ONNX Runtime: the Q8BERT graph of :mod:`q8core.onnx_graph`
with int8 weights, the QAT activation scales and int32 biases, in ONNX Runtime's fused ops (its integer
matmul kernels, multi-head attention); ``onnx-int8-qdq`` is the same model in standard ONNX. ``onnx``
is the same graph in float32 (the FP32 baseline of the speed benchmark). Both are written as a folder
in Hugging Face Optimum's layout (``model.onnx``, ``config.json``, tokenizer files) plus this
project's spec and a manifest naming the ``onnxruntime`` backend, so ``q8 eval`` runs it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from .errors import Q8Error

ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class ExportFormat:
    """A ``--format`` that any backend with an ``hf`` export can write.

    ``write(backend, directory)`` writes the model's files into ``directory`` (which exists) and returns
    their names; the core adds the tokenizer, the spec and a manifest naming ``engine``, the backend
    that runs the folder (``q8 eval``)."""

    name: str
    help: str
    engine: str
    write: Callable


def check_int8_spec(spec, fmt: str) -> None:
    """The one-line refusal of an int8 export for a checkpoint that is not full 8-bit QAT."""
    if spec.mode != "qat":
        raise Q8Error(f"{fmt} needs a QAT checkpoint (its activation scales are the EMA ranges "
                      f"learned in training); this one is {spec.mode}: export a float format, or train "
                      f"with --mode qat")
    if not (spec.quantize_weights and spec.quantize_activations and spec.quantize_bias) or spec.bits != 8:
        raise Q8Error(f"{fmt} exports the full 8-bit scheme (weights, activations, int32 bias, bits 8); "
                      f"this checkpoint's quantizer spec differs")



def hf_export(backend) -> tuple[dict, str]:
    """The backend's Hugging Face export: its state dict as NumPy arrays and its ``config.json`` text."""
    from safetensors.numpy import load_file

    with tempfile.TemporaryDirectory() as tmp:
        backend.export(Path(tmp), "hf")
        weights = load_file(str(Path(tmp) / "model.safetensors"))
        config_text = (Path(tmp) / "config.json").read_text(encoding="utf-8")
    return weights, config_text


def export_onnx(backend, directory: Path, int8: bool, form: str = "ort") -> list[str]:
    """``model.onnx`` and ``config.json`` from the backend's Hugging Face export and EMA ranges."""
    try:
        import onnx
    except ImportError:
        raise Q8Error("ONNX export needs onnx and onnxruntime: pip install \"q8bert[onnx]\"") from None

    from .onnx_graph import build_model

    spec = backend.spec
    if int8:
        check_int8_spec(spec, "onnx-int8-qdq" if form == "qdq" else "onnx-int8")
    weights, config_text = hf_export(backend)
    ranges = backend.quant_state() if int8 else None
    model = build_model(weights, json.loads(config_text), ranges, quantize_embeddings=spec.quantize_embeddings,
                        form=form, float_inputs=spec.float_inputs, per_channel=spec.per_channel_weights)
    onnx.save(model, str(directory / ONNX_FILE))
    (directory / "config.json").write_text(config_text, encoding="utf-8")
    return [ONNX_FILE, "config.json"]


#: the ONNX formats (run by the ``onnxruntime`` backend, ``backends/onnxruntime``)
ONNX_FORMATS = {f.name: f for f in (
    ExportFormat("onnx-int8", "ONNX, int8 weights and QAT activation scales (static), in ONNX Runtime's fused "
                              "ops (fastest on ONNX Runtime)", "onnxruntime", partial(export_onnx, int8=True)),
    ExportFormat("onnx-int8-qdq", "the same int8 model in standard ONNX (QuantizeLinear / DequantizeLinear), "
                                  "for any runtime", "onnxruntime", partial(export_onnx, int8=True, form="qdq")),
    ExportFormat("onnx", "ONNX, float32", "onnxruntime", partial(export_onnx, int8=False)),
)}


def shared_formats(registered: dict | None = None) -> dict[str, ExportFormat]:
    """The formats every backend with an ``hf`` export gets: ONNX's and the plugins' (``registered``:
    name -> :class:`ExportFormat`, from :attr:`q8core.plugins.Registry.export_formats`)."""
    return {**ONNX_FORMATS, **(registered or {})}


def formats(backend_cls, registered: dict | None = None) -> tuple[str, ...]:
    """Every ``--format`` a checkpoint of ``backend_cls`` exports to."""
    own = tuple(backend_cls.export_formats)
    return own + tuple(f for f in shared_formats(registered) if "hf" in own and f not in own)


def check_format(backend_cls, fmt: str, registered: dict | None = None) -> None:
    if fmt not in formats(backend_cls, registered):
        raise Q8Error(f"backend {backend_cls.name!r} cannot export {fmt!r}; it exports: "
                      f"{', '.join(formats(backend_cls, registered)) or 'nothing'}")


def shared_format(backend_cls, fmt: str, registered: dict | None = None) -> ExportFormat | None:
    """The :class:`ExportFormat` ``fmt`` stands for, or ``None`` for one of the backend's own formats."""
    return None if fmt in backend_cls.export_formats else shared_formats(registered).get(fmt)


def export(backend, directory: Path, fmt: str, registered: dict | None = None) -> list[str]:
    """Write ``backend``'s model in ``fmt`` into ``directory`` (which exists); the file names written."""
    check_format(type(backend), fmt, registered)
    shared = shared_format(type(backend), fmt, registered)
    if shared is None:
        return backend.export(directory, fmt)
    return shared.write(backend, Path(directory))
