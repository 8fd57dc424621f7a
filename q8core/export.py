"""``q8 export``: a backend's own formats, plus the ONNX formats every backend gets from its ``hf`` export.

``onnx-int8`` is the model a user deploys: the Q8BERT graph of :mod:`q8core.onnx_graph` with int8
weights, the QAT activation scales and int32 biases, in ONNX Runtime's fused ops (its integer matmul
kernels, multi-head attention); ``onnx-int8-qdq`` is the same model in standard ONNX. ``onnx``
is the same graph in float32 (the FP32 baseline of the speed benchmark). Both are written as a folder
in Hugging Face Optimum's layout (``model.onnx``, ``config.json``, tokenizer files) plus this
project's spec and a manifest naming the ``onnxruntime`` backend, so ``q8 eval`` runs it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .errors import Q8Error

ONNX_FILE = "model.onnx"
#: format -> what it is, for ``--help`` and errors
ONNX_FORMATS = {
    "onnx-int8": "ONNX, int8 weights and QAT activation scales (static), in ONNX Runtime's fused ops (fastest)",
    "onnx-int8-qdq": "the same int8 model in standard ONNX (QuantizeLinear / DequantizeLinear), for any runtime",
    "onnx": "ONNX, float32",
}
INT8_FORMS = {"onnx-int8": "ort", "onnx-int8-qdq": "qdq"}
#: the backend that runs ONNX exports (``backends/onnxruntime``)
ONNX_ENGINE = "onnxruntime"


def formats(backend_cls) -> tuple[str, ...]:
    """Every ``--format`` a checkpoint of ``backend_cls`` exports to."""
    own = tuple(backend_cls.export_formats)
    return own + tuple(f for f in ONNX_FORMATS if "hf" in own and f not in own)


def check_format(backend_cls, fmt: str) -> None:
    if fmt not in formats(backend_cls):
        raise Q8Error(f"backend {backend_cls.name!r} cannot export {fmt!r}; it exports: "
                      f"{', '.join(formats(backend_cls)) or 'nothing'}")


def export(backend, directory: Path, fmt: str) -> list[str]:
    """Write ``backend``'s model in ``fmt`` into ``directory`` (which exists); the file names written."""
    check_format(type(backend), fmt)
    if fmt not in ONNX_FORMATS or fmt in backend.export_formats:
        return backend.export(directory, fmt)
    return export_onnx(backend, Path(directory), int8=fmt in INT8_FORMS, form=INT8_FORMS.get(fmt, "ort"))


def export_onnx(backend, directory: Path, int8: bool, form: str = "ort") -> list[str]:
    """``model.onnx`` and ``config.json`` from the backend's Hugging Face export and EMA ranges."""
    try:
        import onnx
    except ImportError:
        raise Q8Error("ONNX export needs onnx and onnxruntime: pip install \"q8bert[onnx]\"") from None
    from safetensors.numpy import load_file

    from .onnx_graph import build_model

    spec = backend.spec
    if int8:
        if spec.mode != "qat":
            raise Q8Error(f"onnx-int8 needs a QAT checkpoint (its activation scales are the EMA ranges "
                          f"learned in training); this one is {spec.mode}: export --format onnx, or train "
                          f"with --mode qat")
        if not (spec.quantize_weights and spec.quantize_activations and spec.quantize_bias) or spec.bits != 8:
            raise Q8Error("onnx-int8 exports the full 8-bit scheme (weights, activations, int32 bias, bits 8); "
                          "this checkpoint's quantizer spec differs")
    with tempfile.TemporaryDirectory() as tmp:
        backend.export(Path(tmp), "hf")
        weights = load_file(str(Path(tmp) / "model.safetensors"))
        config_text = (Path(tmp) / "config.json").read_text(encoding="utf-8")
    ranges = backend.quant_state() if int8 else None
    model = build_model(weights, json.loads(config_text), ranges,
                        quantize_embeddings=spec.quantize_embeddings, form=form, float_inputs=spec.float_inputs)
    onnx.save(model, str(directory / ONNX_FILE))
    (directory / "config.json").write_text(config_text, encoding="utf-8")
    return [ONNX_FILE, "config.json"]
