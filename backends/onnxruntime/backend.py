"""The ONNX Runtime backend: an exported ``model.onnx`` (int8 or float32) behind the Backend interface.

``q8 eval`` reaches it through the manifest of an export folder, whose ``backend`` is
``onnxruntime``; the graph's integer kernels do the int8 arithmetic (see :mod:`q8core.onnx_graph`).
Training methods refuse in one line: an exported model is fixed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from q8core.backend import Backend
from q8core.errors import Q8Error
from q8core.export import ONNX_FILE
from q8core.onnx_graph import INPUTS


def session(path: Path, threads: int | None = None, device: str = "cpu") -> ort.InferenceSession:
    """An inference session on ``path`` with all graph optimizations; ``threads`` intra-op threads
    (default: ONNX Runtime's, one per physical core; ``Q8_ORT_THREADS`` overrides)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or int(os.environ.get("Q8_ORT_THREADS", "0") or 0)
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("gpu") \
        else ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types, all about the file here
        raise Q8Error(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    aliases = ("ort",)
    devices = ("cpu", "gpu")
    dynamic_shapes = True

    def __init__(self, sess: ort.InferenceSession, spec) -> None:
        self.session = sess
        self.spec = spec
        self._inputs = [i.name for i in sess.get_inputs()]

    @classmethod
    def framework_version(cls) -> str:
        return f"onnxruntime {ort.__version__}"

    @classmethod
    def check_device(cls, device: str) -> None:
        super().check_device(device)
        if device.startswith("gpu") and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Q8Error(f"--device {device}: this onnxruntime has no CUDA execution provider "
                          f"(pip install onnxruntime-gpu)")

    @classmethod
    def from_pretrained(cls, source, *, labels, spec, device, seed):
        raise Q8Error("backend 'onnxruntime' runs exported models (q8 export --format onnx-int8) and "
                      "does not train; train with --backend torch or mindspore")

    @classmethod
    def from_checkpoint(cls, path, *, spec, device):
        path = Path(path)
        model = path / ONNX_FILE if path.is_dir() else path
        if not model.is_file():
            raise Q8Error(f"{path}: no {ONNX_FILE}")
        return cls(session(model, device=device), spec)

    def predict(self, batch):
        feed = {name: np.ascontiguousarray(batch[name], dtype=np.int64) for name in INPUTS if name in self._inputs}
        return self.session.run(None, feed)[0]

    def _refuse(self, *args, **kwargs):
        raise Q8Error("backend 'onnxruntime' runs exported models and does not train")

    configure_optimizer = train_step = learning_rate = save = _refuse
