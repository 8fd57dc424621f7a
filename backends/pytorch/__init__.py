"""PyTorch backend plugin: Hugging Face ``transformers`` BERT with Q8BERT modules.

Importing this module does not import torch; the backend class loads it when first used.
"""

from q8core.hookspecs import hookimpl


@hookimpl
def register_backends(register):
    from .backend import TorchBackend

    register(TorchBackend)
