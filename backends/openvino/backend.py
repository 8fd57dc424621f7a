"""The OpenVINO backend: an exported ``openvino_model.xml`` behind the Backend interface.

``q8 eval`` reaches it through the manifest of an export folder, whose ``backend`` is ``openvino``.
The model is compiled for the CPU on first use, with the ``--ov-precision`` and ``--ov-threads``
options; its int8 layers run on OpenVINO's int8 kernels whatever the precision (which applies to the
float parts). Training methods refuse in one line: an exported model is fixed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import openvino as ov

from q8core.backend import Backend
from q8core.errors import Q8Error

from . import PRECISIONS
from .export import MODEL_FILE
from .graph import INPUTS


def cpu_has_bf16(core: ov.Core) -> bool:
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_model(model, precision: str = "f32", threads: int = 0, core: ov.Core | None = None) -> ov.CompiledModel:
    """``model`` (an ``ov.Model`` or the path of an IR) compiled for the CPU: ``precision`` for the float
    parts (``f32``, ``bf16``, or ``auto``: bf16 where the CPU has it), ``threads`` inference threads (0: OpenVINO's default;
    ``Q8_OV_THREADS`` overrides), one stream tuned for latency.

    Dynamic quantization is off: the CPU plugin would otherwise quantize the float input of a layer with
    int8 weights and float input (``float_inputs``) to 8 bits on the fly, the opposite of a float input."""
    core = core or ov.Core()
    if precision == "auto":
        precision = "bf16" if cpu_has_bf16(core) else "f32"
    threads = threads or int(os.environ.get("Q8_OV_THREADS", "0") or 0)
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
              "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        return core.compile_model(model if isinstance(model, ov.Model) else core.read_model(str(model)), "CPU", config)
    except RuntimeError as exc:  # OpenVINO reports a bad file or an unsupported setting this way
        raise Q8Error(f"{model}: OpenVINO cannot load it ({str(exc).strip().splitlines()[0][:200]})") from None


class OpenVINOBackend(Backend):
    name = "openvino"
    aliases = ("ov",)
    devices = ("cpu",)
    dynamic_shapes = True

    def __init__(self, path: Path, spec) -> None:
        self.path = path
        self.spec = spec
        self.options = {}
        self._compiled = None
        self._request = None

    @classmethod
    def framework_version(cls) -> str:
        return f"openvino {ov.get_version().split('-')[0]}"

    @classmethod
    def check_options(cls, options: dict) -> None:
        precision = options.get("ov_precision", "f32")
        if precision not in PRECISIONS:
            raise Q8Error(f"--ov-precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if options.get("ov_threads", 0) < 0:
            raise Q8Error(f"--ov-threads {options['ov_threads']}: must be 0 (OpenVINO's choice) or more")

    @classmethod
    def from_pretrained(cls, source, *, labels, spec, device, seed):
        raise Q8Error("backend 'openvino' runs exported models (q8 export --format openvino) and does not "
                      "train; train with --backend torch or mindspore")

    @classmethod
    def from_checkpoint(cls, path, *, spec, device):
        path = Path(path)
        model = path / MODEL_FILE if path.is_dir() else path
        if not model.is_file():
            raise Q8Error(f"{path}: no {MODEL_FILE}")
        return cls(model, spec)

    def compiled(self) -> ov.CompiledModel:
        """The model compiled with this backend's options (on first use)."""
        if self._compiled is None:
            self._compiled = compile_model(self.path, self.options.get("ov_precision", "f32"),
                                           self.options.get("ov_threads", 0))
            self._request = self._compiled.create_infer_request()
        return self._compiled

    def predict(self, batch):
        self.compiled()
        feed = {name: np.ascontiguousarray(batch[name], dtype=np.int64) for name in INPUTS}
        return np.array(self._request.infer(feed)["logits"], dtype=np.float32)

    def _refuse(self, *args, **kwargs):
        raise Q8Error("backend 'openvino' runs exported models and does not train")

    configure_optimizer = train_step = learning_rate = save = _refuse
