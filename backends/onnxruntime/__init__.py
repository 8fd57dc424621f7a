"""ONNX Runtime backend plugin: runs the models ``q8 export --format onnx-int8`` (or ``onnx``) writes.

It evaluates and serves; it does not train. Importing this module does not import onnxruntime;
without it installed the backend is listed as unavailable, with the command that installs it.
"""

from importlib.util import find_spec

from q8core.backend import unavailable_backend
from q8core.hookspecs import hookimpl

INSTALL = 'pip install "q8bert[onnx]"'


@hookimpl
def register_backends(register):
    if find_spec("onnxruntime") is None:
        register(unavailable_backend("onnxruntime", f"ONNX Runtime is not installed ({INSTALL})"))
        return
    from .backend import OnnxRuntimeBackend

    register(OnnxRuntimeBackend)
