"""OpenVINO backend plugin: ``q8 export --format openvino`` writes an OpenVINO IR folder whose fully
connected layers run on OpenVINO's int8 kernels with the QAT scales; the ``openvino`` backend runs it.

It evaluates and serves; it does not train. Importing this module does not import openvino; without
it the backend is listed as unavailable, and the export format refuses, with the command that installs it.
"""

from functools import partial
from importlib.util import find_spec

from q8core.backend import unavailable_backend
from q8core.errors import Q8Error
from q8core.export import ExportFormat
from q8core.hookspecs import hookimpl

INSTALL = 'pip install "q8bert[openvino]"'
#: ``--ov-precision`` values: OpenVINO's inference precision for the float parts of the model
PRECISIONS = ("auto", "bf16", "f32")


def _missing() -> str | None:
    return None if find_spec("openvino") is not None else f"OpenVINO is not installed ({INSTALL})"


@hookimpl
def register_backends(register):
    reason = _missing()
    if reason:
        register(unavailable_backend("openvino", reason))
        return
    from .backend import OpenVINOBackend

    register(OpenVINOBackend)


def _write(backend, directory, int8: bool) -> list[str]:
    reason = _missing()
    if reason:
        raise Q8Error(f"--format openvino needs OpenVINO: {reason}")
    from .export import write_ir

    return write_ir(backend, directory, int8=int8)


@hookimpl
def register_export_formats(register):
    register(ExportFormat("openvino", "OpenVINO IR (openvino_model.xml/.bin), int8 weights and QAT activation "
                                      "scales on OpenVINO's int8 kernels (fastest on Intel/AMD CPUs)", "openvino",
                          partial(_write, int8=True)))
    register(ExportFormat("openvino-fp32", "OpenVINO IR, float32", "openvino", partial(_write, int8=False)))


@hookimpl
def add_backend_options(parser):
    group = parser.group("openvino")
    group.add("ov_precision", type=str, default="f32", commands=("eval",),
              help="OpenVINO's precision for the float parts (attention, LayerNorm, GELU; the int8 layers stay "
                   "int8): f32 (as the method has them), bf16 (faster where the CPU has bf16 instructions; "
                   "scores move by about 0.1 point), or auto (bf16 where the CPU has it).")
    group.add("ov_threads", type=int, default=0, commands=("eval",),
              help="Inference threads (0: OpenVINO's choice, one per physical core).")
