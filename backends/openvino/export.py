"""``q8 export --format openvino`` / ``openvino-fp32``: the OpenVINO IR of a checkpoint, in Optimum-Intel's
layout (``openvino_model.xml``, ``openvino_model.bin``, ``config.json``; the core adds tokenizer files,
the spec and the manifest)."""

from __future__ import annotations

import json
from pathlib import Path

import openvino as ov

from q8core.export import check_int8_spec, hf_export

from .graph import build_model

MODEL_FILE = "openvino_model.xml"
WEIGHTS_FILE = "openvino_model.bin"


def write_ir(backend, directory: Path, int8: bool) -> list[str]:
    spec = backend.spec
    if int8:
        check_int8_spec(spec, "openvino")
    weights, config_text = hf_export(backend)
    model = build_model(weights, json.loads(config_text), backend.quant_state() if int8 else None,
                        quantize_embeddings=spec.quantize_embeddings, float_inputs=spec.float_inputs,
                        per_channel=spec.per_channel_weights)
    # float constants stay float32 (OpenVINO's default would halve them to float16)
    ov.save_model(model, str(Path(directory) / MODEL_FILE), compress_to_fp16=False)
    (Path(directory) / "config.json").write_text(config_text, encoding="utf-8")
    return [MODEL_FILE, WEIGHTS_FILE, "config.json"]
