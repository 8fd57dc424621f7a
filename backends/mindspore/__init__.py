"""MindSpore backend plugin: a hand-written MindSpore BERT with Q8BERT cells (CPU, GPU, Ascend).

Importing this module does not import MindSpore; without MindSpore installed the backend is listed
as unavailable, with the command that installs it.
"""

from importlib.util import find_spec

from q8core.backend import unavailable_backend
from q8core.hookspecs import hookimpl

INSTALL = "pip install \"mindspore==2.10.0\" \"numpy<2\" \"pandas<3\" \"pyarrow<26\" \"ml-dtypes<0.6\""


@hookimpl
def register_backends(register):
    if find_spec("mindspore") is None:
        register(unavailable_backend("mindspore", f"MindSpore is not installed ({INSTALL})"))
        return
    from .backend import MindSporeBackend

    register(MindSporeBackend)
