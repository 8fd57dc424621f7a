"""Hugging Face checkpoint folders <-> the MindSpore BERT's parameters (NumPy in between).

The model's trainable parameter names *are* the Hugging Face keys of ``BertForSequenceClassification``,
so the map is the identity, plus what transformers itself does when it loads a checkpoint:
a ``BertModel`` checkpoint (keys without the ``bert.`` prefix) gets the prefix, TF-era
``LayerNorm.gamma`` / ``LayerNorm.beta`` read as ``weight`` / ``bias``, pre-training heads (``cls.*``)
and buffers (``position_ids``) are ignored, and a missing classifier (or pooler) takes the core's
seeded starting values (``q8core.heads``), the same numbers the PyTorch backend starts from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from q8core.errors import Q8Error
from q8core.heads import new_parameter

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
BASE_PREFIX = "bert."
NEW_HEADS = ("classifier.", "bert.pooler.")  # initialised when the checkpoint lacks them


def resolve_folder(source: str) -> Path:
    """A local folder, or a hub id downloaded (or found in the cache) by huggingface_hub."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise Q8Error(f"cannot load a model from {source}: not a folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=[
            CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX, "model-*.safetensors", TORCH_FILE]))
    except Exception as exc:  # offline, unknown repo, ...: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Q8Error(f"cannot load a model from {source}: {first}") from None


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Q8Error(f"cannot load a model from {folder}: no {CONFIG_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Q8Error(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise Q8Error(f"{path}: not a JSON object")
    return data


def read_state_dict(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's weights file(s) as NumPy arrays (float32 for floating tensors)."""
    folder = Path(folder)
    if (folder / SAFETENSORS_FILE).exists():
        files = [folder / SAFETENSORS_FILE]
    elif (folder / SAFETENSORS_INDEX).exists():
        index = json.loads((folder / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
        files = [folder / name for name in sorted(set(index.get("weight_map", {}).values()))]
    elif (folder / TORCH_FILE).exists():
        return _read_torch_bin(folder / TORCH_FILE)
    else:
        raise Q8Error(f"cannot load a model from {folder}: no {SAFETENSORS_FILE} or {TORCH_FILE}")
    from safetensors.numpy import load_file

    state: dict[str, np.ndarray] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as exc:
            raise Q8Error(f"{file}: unreadable safetensors file ({type(exc).__name__})") from None
    return {k: _as_float32(v) for k, v in state.items()}


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise Q8Error(f"{path}: reading pytorch_model.bin needs torch; convert the folder to "
                      f"model.safetensors or install torch") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise Q8Error(f"{path}: cannot read it safely ({type(exc).__name__})") from None
    return {k: _as_float32(v.detach().float().numpy() if v.is_floating_point() else v.numpy())
            for k, v in state.items()}


def _as_float32(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        return array.astype(np.float32)
    return array


def _normalise(key: str) -> str:
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def map_state_dict(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoint keys -> model parameter names (prefix added to a bare ``BertModel`` checkpoint)."""
    state = {_normalise(k): v for k, v in state.items()}
    bare = not any(k.startswith(BASE_PREFIX) for k in state)
    mapped = {}
    for key, value in state.items():
        if key.startswith("cls.") or key.endswith("position_ids"):
            continue  # pre-training heads, buffers
        if bare and not key.startswith("classifier."):
            key = BASE_PREFIX + key
        mapped[key] = value
    return mapped


def load_weights(model, state: dict[str, np.ndarray], *, seed: int, initializer_range: float,
                 where: str) -> list[str]:
    """Copy ``state`` into the model's trainable parameters; returns the names initialised from the seed.

    A missing parameter other than the classifier/pooler, or a shape mismatch, is a one-line Q8Error.
    """
    from mindspore import Tensor

    mapped = map_state_dict(state)
    initialised = []
    for name, param in model.parameters_and_names():
        if not param.requires_grad:
            continue
        shape = tuple(param.shape)
        if name in mapped:
            value = np.asarray(mapped[name])
            if tuple(value.shape) != shape:
                raise Q8Error(f"{where}: parameter {name} has shape {tuple(value.shape)}, the model expects {shape}")
        elif name.startswith(NEW_HEADS):
            value = new_parameter(name, shape, seed=seed, initializer_range=initializer_range)
            initialised.append(name)
        else:
            raise Q8Error(f"{where}: missing weight {name}")
        param.set_data(Tensor(np.ascontiguousarray(value, dtype=np.float32)))
    return initialised


def hf_state_dict(model) -> dict[str, np.ndarray]:
    """The model's trainable parameters under their Hugging Face names, as float32 NumPy arrays."""
    return {name: param.asnumpy().astype(np.float32) for name, param in model.parameters_and_names()
            if param.requires_grad}


def save_hf(model, directory: Path, config: dict) -> list[str]:
    """``model.safetensors`` (Hugging Face keys) + ``config.json``: a folder transformers loads."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    save_file({k: np.ascontiguousarray(v) for k, v in hf_state_dict(model).items()},
              str(directory / SAFETENSORS_FILE), metadata={"format": "pt"})
    write_config(directory, config)
    return [SAFETENSORS_FILE, CONFIG_FILE]


def write_config(directory: Path, config: dict) -> None:
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
