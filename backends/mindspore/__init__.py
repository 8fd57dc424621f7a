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


@hookimpl
def add_backend_options(parser):
    # the ModelZoo's --enable_data_sink / --data_sink_steps (see backends/mindspore/sink.py)
    group = parser.group("mindspore")
    group.add("enable_data_sink", type=bool, default=False, commands=("run",),
              help="The ModelZoo's --enable_data_sink, accepted so its command lines move over: this backend "
                   "trains step by step on every device (MindSpore sinks data only on GPU/Ascend, and q8 does "
                   "not sink there yet); a note says so, and the results are those without it.")
    group.add("data_sink_steps", type=int, default=1, commands=("run",),
              help="The ModelZoo's --data_sink_steps (at least 1); see --enable-data-sink.")
