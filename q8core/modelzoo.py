"""MindSpore ModelZoo BERT checkpoints (``.ckpt``) -> a Hugging Face BERT folder every backend loads.

``--model`` takes, besides a hub id or a Hugging Face folder:

* ``--model FILE.ckpt``: a MindSpore checkpoint in the ModelZoo BERT parameter naming, with its
  configuration and vocabulary **in the same folder**;
* ``--model DIR``: a folder holding exactly one ``*.ckpt`` (and no Hugging Face weights), plus the
  same configuration and vocabulary.

Configuration, looked up beside the checkpoint in this order: ``<checkpoint stem>.yaml`` / ``.yml`` /
``.json``, then ``config.json`` (a Hugging Face BERT config, taken as is), then the one ``*.yaml`` /
``*.yml`` of the folder. A ModelZoo yaml holds the ``BertConfig`` fields (``seq_length``,
``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
``intermediate_size``, ``hidden_act``, ``hidden_dropout_prob``, ``attention_probs_dropout_prob``,
``max_position_embeddings``, ``type_vocab_size``, ``initializer_range``, ``use_relative_positions``,
``dtype``, ``compute_type``) at the top level or in a block such as ``bert_net_cfg`` (or the
``<bert_network>_net_cfg`` block that ``bert_network`` names, as in the ModelZoo pretraining yaml).
Sizes it leaves out are read off the checkpoint's shapes; ``num_attention_heads`` is required. The
yaml means what the ModelZoo code does with it, so the Hugging Face config gets:

* ``hidden_act: gelu`` -> ``gelu_new``: MindSpore's ``nn.Dense(activation="gelu")`` is ``nn.GELU()``,
  whose default is the tanh approximation (``relu`` stays ``relu``; ``fast_gelu`` has no equivalent);
* ``layer_norm_eps`` 1e-7: the default epsilon of MindSpore's ``nn.LayerNorm`` (a ``layer_norm_eps``
  in the yaml wins);
* ``seq_length``, ``dtype``, ``compute_type`` are not part of the weights and are ignored (the weights
  are stored as float32); ``use_relative_positions: True`` (NEZHA) is refused.

Vocabulary: ``vocab.txt`` beside the checkpoint (Hugging Face tokenizer files there --
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` -- are copied along). Without
a ``tokenizer_config.json`` the tokenizer lower-cases when the yaml says ``do_lower_case`` or, failing
that, when no vocabulary entry outside ``[...]`` holds an upper-case letter (an uncased vocabulary).

**Accepted parameter names** (``P`` is whatever prefix the training wrappers left before the
``BertModel`` cell: none, ``bert.`` from ``BertCLSModel``, ``bert.bert.`` from ``BertCLS`` /
``BertNetworkWithLoss`` / Q8BERT's ``BertNetworkWithLoss_td``; ``H`` is ``P`` less its last part):

ModelZoo name (``N`` a layer index; ``*`` is ``weight`` / ``bias``)  ->  Hugging Face name::

    P bert_embedding_lookup.embedding_table                       -> bert.embeddings.word_embeddings.weight
    P bert_embedding_postprocessor.token_type_embedding.embedding_table       (later ModelZoo releases)
    P bert_embedding_postprocessor.embedding_table                (MindSpore 1.x ModelZoo)
                                                                  -> bert.embeddings.token_type_embeddings.weight
    P bert_embedding_postprocessor.full_position_embedding.embedding_table    (later ModelZoo releases)
    P bert_embedding_postprocessor.full_position_embeddings       (MindSpore 1.x ModelZoo)
                                                                  -> bert.embeddings.position_embeddings.weight
    P bert_embedding_postprocessor.layernorm.gamma / .beta        -> bert.embeddings.LayerNorm.weight / .bias
    P bert_encoder.layers.N.attention.attention.query_layer.*     -> bert.encoder.layer.N.attention.self.query.*
    P bert_encoder.layers.N.attention.attention.key_layer.*       -> bert.encoder.layer.N.attention.self.key.*
    P bert_encoder.layers.N.attention.attention.value_layer.*     -> bert.encoder.layer.N.attention.self.value.*
    P bert_encoder.layers.N.attention.output.dense.*              -> bert.encoder.layer.N.attention.output.dense.*
    P bert_encoder.layers.N.attention.output.layernorm.gamma/beta -> bert.encoder.layer.N.attention.output.LayerNorm.*
    P bert_encoder.layers.N.intermediate.*                        -> bert.encoder.layer.N.intermediate.dense.*
    P bert_encoder.layers.N.output.dense.*                        -> bert.encoder.layer.N.output.dense.*
    P bert_encoder.layers.N.output.layernorm.gamma / .beta        -> bert.encoder.layer.N.output.LayerNorm.*
    P dense.*                     (the pooler, tanh)              -> bert.pooler.dense.*
    H dense_1.*                   (BertCLSModel / BertModelCLS)   -> classifier.*

TinyBERT-family names (``tinybert_embedding_lookup``, ``tinybert_embedding_postprocessor``,
``tinybert_encoder``) read as ``bert_...``, as the ModelZoo's own TinyBERT / TernaryBERT / Q8BERT
loaders rename them. LayerNorm parameters may also be called ``weight`` / ``bias``. Tensors are
copied as they are: MindSpore ``nn.Dense`` stores ``(out, in)`` like ``torch.nn.Linear`` and
the embedding tables are ``(rows, hidden)``, so nothing is transposed; float16 / bfloat16 / float64
tensors become float32.

Skipped, because they are not part of the model: optimizer state (``moment1.*``, ``moment2.*``,
``adam_m.*``, ``adam_v.*``, ``lamb_m.*``, ``lamb_v.*``, ``accum.*``, ``moments.*``, ..., i.e. a known
optimizer prefix or any ``X.<name of another tensor in the file>``), bookkeeping without a dot
(``global_step``, ``learning_rate``, ``beta1_power``, ``loss_scale``, ``epoch_num``, ...), the
pre-training heads ``H cls1.*`` / ``H cls2.*``, TinyBERT's distillation ``fit_dense.*``, and the
fake-quantization observers (``*.fake_quant_*.minq`` / ``maxq``) of a ModelZoo QAT checkpoint: its
activation ranges are not Q8BERT's EMA of max|x| and are learned again. Anything else -- a renamed
parameter, relative-position tables, a SQuAD or CRF head -- is a one-line :class:`Q8Error` naming it,
as is a shape that does not fit the configuration (expected vs got).

Where the sources came from: ``model_zoo/official/nlp/bert/src/bert_model.py`` (mindspore-ai/mindspore,
MindSpore 1.x) and ``official/nlp/Bert/src/bert_model.py`` + ``finetune_eval_model.py``
(mindspore-ai/models) for the two embedding namings, ``bert_encoder.layers.N`` and ``dense_1``;
``research/nlp/ternarybert/src/tinybert_model.py`` and the Q8BERT ``src/q8bert.py`` for ``tinybert_``
and the fake-quant cells. The TinyBERT-derived ``BertModelCLS`` applies a ReLU to the pooled output
before ``dense_1``; a Hugging Face classifier does not, so such a head's logits differ until
fine-tuning adapts it (the official ``BertCLSModel`` matches exactly).

The ``.ckpt`` file is read without MindSpore: it is a sequence of protobuf ``Checkpoint`` messages
(mindspore/train/checkpoint.proto: ``Checkpoint { repeated Value value = 1; }``, ``Value { string tag
= 1; TensorProto tensor = 2; MapTensorProto maptensor = 3; }``, ``TensorProto { repeated int64 dims =
1; string tensor_type = 2; bytes tensor_content = 3; }``; ``tensor_type`` is ``Float32``, ``Float16``,
``BFloat16``, ``Int32``, ... or ``str``). Tensors over 512 MB come as consecutive slices with the same
tag; old files write scalars with ``dims == [0]``; a ``crc_num`` trailer is ignored.

The converted folder (``config.json`` with ``model_type: bert``, ``model.safetensors`` under the
Hugging Face names, the tokenizer files and ``q8_modelzoo.json``, which records the sources and the name
map) is cached under ``$Q8_CACHE_DIR`` (default ``$XDG_CACHE_HOME/q8bert`` or ``~/.cache/q8bert``), in
``modelzoo/<stem>-<sha256 of checkpoint, config, vocabulary>``; it is built under a temporary name and
renamed into place, so a folder there is complete, and a second run reuses it. The backends'
``from_pretrained`` receive that folder unchanged.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import Q8Error

CONVERTER_VERSION = 1
CACHE_ENV = "Q8_CACHE_DIR"
INFO_FILE = "q8_modelzoo.json"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
#: MindSpore's nn.LayerNorm default epsilon, which the ModelZoo BERT uses.
MINDSPORE_LAYER_NORM_EPS = 1e-7
#: ModelZoo ``hidden_act`` -> Hugging Face ``hidden_act`` (MindSpore's "gelu" is the tanh approximation).
ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu"}

# -- reading a .ckpt without MindSpore ------------------------------------------------------------

_DTYPES = {"Float16": "<f2", "Float32": "<f4", "Float64": "<f8", "Int8": "i1", "UInt8": "u1",
           "Int16": "<i2", "UInt16": "<u2", "Int32": "<i4", "UInt32": "<u4", "Int64": "<i8",
           "UInt64": "<u8", "Bool": "?", "BFloat16": "<u2"}
_CRC_TRAILER = b"crc_num"


class _Malformed(Exception):
    """The bytes are not checkpoint protobuf (the message says where)."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed(f"bad varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field in ``buf[start:end]``; for
    length-delimited fields the value is the payload's start offset."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed(f"field {number} runs past the end (byte {pos})")
            yield number, wire, pos, pos + length
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise _Malformed(f"unknown wire type {wire} at byte {pos}")
        if pos > end:
            raise _Malformed(f"truncated field {number}")


@dataclass
class TensorInfo:
    """One checkpoint entry: its shape, MindSpore type name and the byte ranges of its content."""

    dims: tuple[int, ...]
    tensor_type: str
    chunks: list[tuple[int, int]]

    @property
    def nbytes(self) -> int:
        return sum(end - start for start, end in self.chunks)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dims == (0,) and self.tensor_type in _DTYPES \
                and self.nbytes == np.dtype(_DTYPES[self.tensor_type]).itemsize:
            return ()  # MindSpore 1.x wrote scalars with dims [0]
        return self.dims


class Checkpoint:
    """A MindSpore ``.ckpt`` opened read-only (memory-mapped); use as a context manager.

    ``tensors`` maps each tag to its :class:`TensorInfo`; :meth:`array` copies one tensor out as NumPy
    (floating types as float32)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = None
        self._mm = None
        self._buf = None
        try:
            self._file = open(self.path, "rb")
            size = os.fstat(self._file.fileno()).st_size
            if size == 0:
                raise Q8Error(f"{self.path}: empty file, not a MindSpore checkpoint")
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            self.close()
            raise Q8Error(f"{self.path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
        except BaseException:
            self.close()
            raise
        self._buf = memoryview(self._mm)
        try:
            self.tensors = self._index()
        except _Malformed as exc:
            self.close()
            raise Q8Error(f"{self.path}: not a readable MindSpore checkpoint ({exc}); an encrypted or "
                          f"damaged file cannot be converted") from None

    def _index(self) -> dict[str, TensorInfo]:
        buf, end = self._buf, len(self._buf)
        if end >= 17 and bytes(buf[end - 17:end - 10]) == _CRC_TRAILER:
            end -= 17
        tensors: dict[str, TensorInfo] = {}
        last = None
        for number, wire, start, stop in _fields(buf, 0, end):
            if number != 1 or wire != 2:
                raise _Malformed(f"unexpected field {number} at the top level")
            tag, dims, tensor_type, content, is_tensor = None, [], None, None, False
            for vnum, vwire, vstart, vstop in _fields(buf, start, stop):
                if vnum == 1 and vwire == 2:
                    tag = bytes(buf[vstart:vstop]).decode("utf-8", "replace")
                elif vnum == 2 and vwire == 2:
                    is_tensor = True
                    for tnum, twire, tstart, tstop in _fields(buf, vstart, vstop):
                        if tnum == 1 and twire == 0:
                            dims.append(tstart)
                        elif tnum == 1 and twire == 2:  # packed dims
                            pos = tstart
                            while pos < tstop:
                                dim, pos = _varint(buf, pos, tstop)
                                dims.append(dim)
                        elif tnum == 2 and twire == 2:
                            tensor_type = bytes(buf[tstart:tstop]).decode("ascii", "replace")
                        elif tnum == 3 and twire == 2:
                            content = (tstart, tstop)
            if tag is None:
                raise _Malformed(f"an entry without a name at byte {start}")
            if not is_tensor:  # a MapParameter (embedding hash table): kept by name, no data
                tensors.setdefault(tag, TensorInfo((), "map", []))
                last = tag
                continue
            if tensor_type is None or content is None:
                raise _Malformed(f"entry {tag} has no type or content")
            dims = [d - (1 << 64) if d >= 1 << 63 else d for d in dims]
            if tag in tensors:
                if tag != last:
                    raise _Malformed(f"tensor {tag} appears twice")
                tensors[tag].chunks.append(content)  # a slice of a large tensor
            else:
                tensors[tag] = TensorInfo(tuple(dims), tensor_type, [content])
            last = tag
        return tensors

    def array(self, name: str) -> np.ndarray | str:
        """The tensor ``name`` as a new NumPy array (floating types as float32); ``str`` entries as str."""
        info = self.tensors[name]
        raw = b"".join(bytes(self._buf[start:end]) for start, end in info.chunks)
        if info.tensor_type == "str":
            return str(np.frombuffer(raw, f"<U{len(raw) // 4}")[0]) if raw else ""
        if info.tensor_type not in _DTYPES:
            raise Q8Error(f"{self.path}: tensor {name} has type {info.tensor_type!r}, which cannot be converted")
        dtype = np.dtype(_DTYPES[info.tensor_type])
        shape = info.shape
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize != len(raw):
            raise Q8Error(f"{self.path}: tensor {name} holds {len(raw)} bytes, its shape {tuple(shape)} "
                          f"({info.tensor_type}) needs {count * dtype.itemsize}: the file is damaged")
        array = np.frombuffer(raw, dtype).reshape(shape)
        if info.tensor_type == "BFloat16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        if dtype.kind == "f":
            return array.astype(np.float32)
        return array.copy()

    def close(self) -> None:
        if self._buf is not None:
            self._buf.release()
            self._buf = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray | str]:
    """Every entry of a MindSpore ``.ckpt`` as NumPy (floating types as float32), without MindSpore."""
    with Checkpoint(path) as ckpt:
        return {name: ckpt.array(name) for name, info in ckpt.tensors.items() if info.tensor_type != "map"}


# -- ModelZoo names -> Hugging Face names ------------------------------------------------------

WORD_EMBEDDING = "bert_embedding_lookup.embedding_table"
_EMBEDDINGS = {
    WORD_EMBEDDING: "embeddings.word_embeddings.weight",
    "bert_embedding_postprocessor.embedding_table": "embeddings.token_type_embeddings.weight",
    "bert_embedding_postprocessor.token_type_embedding.embedding_table": "embeddings.token_type_embeddings.weight",
    "bert_embedding_postprocessor.full_position_embeddings": "embeddings.position_embeddings.weight",
    "bert_embedding_postprocessor.full_position_embedding.embedding_table": "embeddings.position_embeddings.weight",
    "bert_embedding_postprocessor.layernorm.gamma": "embeddings.LayerNorm.weight",
    "bert_embedding_postprocessor.layernorm.beta": "embeddings.LayerNorm.bias",
    "bert_embedding_postprocessor.layernorm.weight": "embeddings.LayerNorm.weight",
    "bert_embedding_postprocessor.layernorm.bias": "embeddings.LayerNorm.bias",
    "dense.weight": "pooler.dense.weight",
    "dense.bias": "pooler.dense.bias",
}
_LAYER_CELLS = {
    "attention.attention.query_layer": "attention.self.query",
    "attention.attention.key_layer": "attention.self.key",
    "attention.attention.value_layer": "attention.self.value",
    "attention.output.dense": "attention.output.dense",
    "attention.output.layernorm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output.dense": "output.dense",
    "output.layernorm": "output.LayerNorm",
}
_LAYER_RE = re.compile(r"bert_encoder\.layers\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")
_LEAF = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
_CLASSIFIER = {"dense_1.weight": "classifier.weight", "dense_1.bias": "classifier.bias"}
#: ``clone(prefix=...)`` names of MindSpore optimizers' per-parameter state.
OPTIMIZER_PREFIXES = ("moment1", "moment2", "moments", "adam_m", "adam_v", "lamb_m", "lamb_v", "accum",
                      "exp_avg", "exp_avg_sq")
#: Cells beside the BertModel that a training network adds and a classifier does not need.
TRAINING_HEADS = ("cls1.", "cls2.", "fit_dense.")
POOLER = ("bert.pooler.dense.weight", "bert.pooler.dense.bias")
CLASSIFIER = ("classifier.weight", "classifier.bias")


def _normalise(name: str) -> str:
    return re.sub(r"(^|\.)tinybert_", r"\1bert_", name)


def _layer_target(rest: str) -> str | None:
    match = _LAYER_RE.fullmatch(rest)
    if not match:
        return None
    index, cell, leaf = match.groups()
    if cell not in _LAYER_CELLS or (leaf in ("gamma", "beta") and not cell.endswith("layernorm")):
        return None
    return f"encoder.layer.{int(index)}.{_LAYER_CELLS[cell]}.{_LEAF[leaf]}"


@dataclass
class NameMap:
    """Which checkpoint entries become which Hugging Face parameters, and what was left out why."""

    targets: dict[str, str]  # Hugging Face name -> checkpoint tag
    skipped: dict[str, int]  # reason -> count
    prefix: str


def map_names(tensors: dict[str, TensorInfo], where: str) -> NameMap:
    """Place every checkpoint entry (see the module docstring); a one-line Q8Error for one that fits nowhere."""
    names = {tag: _normalise(tag) for tag in tensors}
    present = set(names.values())
    skipped: dict[str, int] = {}
    candidates = []

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    def is_state(norm: str) -> bool:
        head, _, rest = norm.partition(".")
        return bool(rest) and (head in OPTIMIZER_PREFIXES or rest in present)

    for tag, norm in names.items():
        if "." not in norm:
            skip("training bookkeeping")
        elif is_state(norm):
            skip("optimizer state")
        elif any(part.startswith("fake_quant") for part in norm.split(".")):
            skip("fake-quantization observers")
        else:
            candidates.append(tag)
    words = [tag for tag in candidates if names[tag] == WORD_EMBEDDING or names[tag].endswith("." + WORD_EMBEDDING)]
    if not words:
        raise Q8Error(f"{where}: not a ModelZoo BERT checkpoint: no parameter ends in {WORD_EMBEDDING} "
                      f"(or tinybert_embedding_lookup.embedding_table)")
    if len(words) > 1:
        raise Q8Error(f"{where}: holds more than one BERT ({', '.join(sorted(words))}); "
                      f"keep the one to fine-tune in its own .ckpt")
    prefix = names[words[0]][:-len(WORD_EMBEDDING)]
    parent = prefix[:-1].rpartition(".")[0] + "." if prefix.count(".") > 1 else ""
    targets: dict[str, str] = {}
    for tag in candidates:
        norm = names[tag]
        target = None
        if norm.startswith(prefix):
            rest = norm[len(prefix):]
            if rest in _EMBEDDINGS:
                target = "bert." + _EMBEDDINGS[rest]
            elif rest.startswith("bert_encoder."):
                layer = _layer_target(rest)
                if layer is None and "relative_positions" in rest:
                    raise Q8Error(f"{where}: parameter {tag} is a relative-position table "
                                  f"(use_relative_positions, NEZHA); a Hugging Face BERT has none")
                target = "bert." + layer if layer else None
        if target is None and prefix and norm.startswith(parent):
            rest = norm[len(parent):]
            if rest in _CLASSIFIER:
                target = _CLASSIFIER[rest]
            elif rest.startswith(TRAINING_HEADS):
                skip("pre-training / distillation heads")
                continue
        if target is None:
            raise Q8Error(f"{where}: parameter {tag} cannot be placed in a Hugging Face BERT "
                          f"(not a ModelZoo BERT parameter name)")
        if target in targets:
            raise Q8Error(f"{where}: parameters {targets[target]} and {tag} both map to {target}")
        targets[target] = tag
    return NameMap(targets, skipped, prefix)


# -- configuration -----------------------------------------------------------------------------

_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                "max_position_embeddings", "type_vocab_size")


def _shapes_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The sizes the checkpoint's shapes imply (by Hugging Face name)."""
    found = {}
    for name, field, axis in (("bert.embeddings.word_embeddings.weight", "vocab_size", 0),
                              ("bert.embeddings.word_embeddings.weight", "hidden_size", 1),
                              ("bert.embeddings.position_embeddings.weight", "max_position_embeddings", 0),
                              ("bert.embeddings.token_type_embeddings.weight", "type_vocab_size", 0),
                              ("bert.encoder.layer.0.intermediate.dense.weight", "intermediate_size", 0)):
        if name in shapes and len(shapes[name]) == 2:
            found[field] = int(shapes[name][axis])
    layers = {int(m.group(1)) for m in (re.match(r"bert\.encoder\.layer\.(\d+)\.", n) for n in shapes) if m}
    if layers:
        found["num_hidden_layers"] = max(layers) + 1
    return found


def _yaml_documents(path: Path) -> list:
    try:
        import yaml
    except ImportError:
        raise Q8Error(f"{path}: reading a yaml config needs PyYAML (pip install pyyaml)") from None
    try:
        return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))]
    except (OSError, UnicodeDecodeError) as exc:
        raise Q8Error(f"{path}: cannot read it ({type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise Q8Error(f"{path}: not valid YAML{where}") from None


def _is_bert_block(value) -> bool:
    return isinstance(value, dict) and "hidden_size" in value and (
        "num_hidden_layers" in value or "num_attention_heads" in value)


def _yaml_block(path: Path, implied: dict[str, int]) -> tuple[dict, dict]:
    """The ``BertConfig`` block of a ModelZoo yaml, and the yaml's top level."""
    docs = _yaml_documents(path)
    top = docs[0] if docs and isinstance(docs[0], dict) else None
    if top is None:
        raise Q8Error(f"{path}: not a ModelZoo config (its first YAML document is not a mapping)")
    if _is_bert_block(top):
        return top, top
    blocks = {key: value for key, value in top.items() if _is_bert_block(value)}
    network = top.get("bert_network")
    if isinstance(network, str) and f"{network}_net_cfg" in blocks:
        return blocks[f"{network}_net_cfg"], top
    if "bert_net_cfg" in blocks:
        return blocks["bert_net_cfg"], top
    fitting = {key: value for key, value in blocks.items()
               if all(value.get(k, implied[k]) == implied[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")
                      if k in implied)}
    if len(fitting) == 1:
        return next(iter(fitting.values())), top
    if not blocks:
        raise Q8Error(f"{path}: no BERT configuration in it (no block with hidden_size and num_hidden_layers)")
    raise Q8Error(f"{path}: several BERT configurations ({', '.join(sorted(blocks))}) fit the checkpoint; "
                  f"set bert_network or keep one")


def _integer(block: dict, key: str, where: Path) -> int:
    value = block[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Q8Error(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _number(block: dict, key: str, default: float, where: Path) -> float:
    value = block.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise Q8Error(f"{where}: {key} must be a non-negative number, got {value!r}")
    return float(value)


def _truthy(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def config_from_yaml(path: Path, implied: dict[str, int]) -> tuple[dict, bool | None]:
    """A Hugging Face BERT config from a ModelZoo yaml (see the module docstring), and its
    ``do_lower_case`` when it has one."""
    block, top = _yaml_block(path, implied)
    if _truthy(block.get("use_relative_positions")):
        raise Q8Error(f"{path}: use_relative_positions is true (NEZHA); a Hugging Face BERT has absolute "
                      f"positions only")
    if "num_attention_heads" not in block:
        raise Q8Error(f"{path}: num_attention_heads is missing (the checkpoint's shapes cannot tell it)")
    config = {"model_type": "bert", "architectures": ["BertModel"]}
    for key in _SIZE_FIELDS + ("num_attention_heads",):
        if key in block:
            config[key] = _integer(block, key, path)
        elif key in implied:
            config[key] = implied[key]
        else:
            raise Q8Error(f"{path}: {key} is missing")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise Q8Error(f"{path}: hidden_size {config['hidden_size']} is not a multiple of "
                      f"num_attention_heads {config['num_attention_heads']}")
    act = block.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise Q8Error(f"{path}: hidden_act {act!r} has no Hugging Face BERT equivalent "
                      f"(supported: {', '.join(ACTIVATIONS)})")
    config["hidden_act"] = ACTIVATIONS[act]
    config["hidden_dropout_prob"] = _number(block, "hidden_dropout_prob", 0.1, path)
    config["attention_probs_dropout_prob"] = _number(block, "attention_probs_dropout_prob", 0.1, path)
    config["initializer_range"] = _number(block, "initializer_range", 0.02, path)
    config["layer_norm_eps"] = _number(block, "layer_norm_eps", MINDSPORE_LAYER_NORM_EPS, path)
    config["pad_token_id"] = 0
    config["position_embedding_type"] = "absolute"
    lower = _truthy(block.get("do_lower_case", top.get("do_lower_case")))
    return config, lower


def config_from_json(path: Path, implied: dict[str, int]) -> dict:
    """A Hugging Face BERT ``config.json`` beside the checkpoint, taken as it is (sizes it leaves out
    are read off the checkpoint)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Q8Error(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise Q8Error(f"{path}: not a JSON object")
    if config.setdefault("model_type", "bert") != "bert":
        raise Q8Error(f"{path}: model_type {config['model_type']!r}; a ModelZoo checkpoint converts to a BERT")
    if "num_attention_heads" not in config:
        raise Q8Error(f"{path}: num_attention_heads is missing (the checkpoint's shapes cannot tell it)")
    for key in _SIZE_FIELDS:
        if key not in config and key in implied:
            config[key] = implied[key]
    for key in _SIZE_FIELDS + ("num_attention_heads",):
        if key not in config:
            raise Q8Error(f"{path}: {key} is missing")
        _integer(config, key, path)
    config.pop("num_labels", None), config.pop("id2label", None), config.pop("label2id", None)
    config["architectures"] = ["BertModel"]
    return config


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of a Hugging Face BertModel (with pooler) of ``config``, with its shape."""
    h, i = config["hidden_size"], config["intermediate_size"]
    shapes = {"bert.embeddings.word_embeddings.weight": (config["vocab_size"], h),
              "bert.embeddings.position_embeddings.weight": (config["max_position_embeddings"], h),
              "bert.embeddings.token_type_embeddings.weight": (config["type_vocab_size"], h),
              "bert.embeddings.LayerNorm.weight": (h,), "bert.embeddings.LayerNorm.bias": (h,),
              "bert.pooler.dense.weight": (h, h), "bert.pooler.dense.bias": (h,)}
    for n in range(config["num_hidden_layers"]):
        layer = f"bert.encoder.layer.{n}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[f"{layer}{name}.weight"], shapes[f"{layer}{name}.bias"] = (h, h), (h,)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{layer}{name}.weight"], shapes[f"{layer}{name}.bias"] = (h,), (h,)
        shapes[f"{layer}intermediate.dense.weight"], shapes[f"{layer}intermediate.dense.bias"] = (i, h), (i,)
        shapes[f"{layer}output.dense.weight"], shapes[f"{layer}output.dense.bias"] = (h, i), (h,)
    return shapes


def check_shapes(names: NameMap, tensors: dict[str, TensorInfo], config: dict, where: str,
                 config_path: Path) -> int | None:
    """Every mapped tensor against ``config``; returns the classifier's number of outputs (None without one)."""
    expected = expected_shapes(config)
    classifier = None
    if CLASSIFIER[0] in names.targets:
        tag = names.targets[CLASSIFIER[0]]
        rows = tuple(tensors[tag].shape)
        if len(rows) != 2 or rows[0] < 1:
            raise Q8Error(f"{where}: parameter {tag} has shape {rows}, a classifier weight is "
                          f"(labels, {config['hidden_size']})")
        classifier = int(rows[0])
        expected[CLASSIFIER[0]] = (classifier, config["hidden_size"])
        expected[CLASSIFIER[1]] = (classifier,)
    for target, tag in names.targets.items():
        if target not in expected:
            raise Q8Error(f"{where}: parameter {tag} cannot be placed: {config_path.name} has "
                          f"{config['num_hidden_layers']} layers")
        got, want = tuple(tensors[tag].shape), expected[target]
        if got != want:
            hint = " (transposed?)" if got == want[::-1] and len(got) == 2 else ""
            raise Q8Error(f"{where}: parameter {tag} has shape {got}, {config_path.name} expects {want}{hint}")
        if tensors[tag].tensor_type not in ("Float16", "Float32", "Float64", "BFloat16"):
            raise Q8Error(f"{where}: parameter {tag} has type {tensors[tag].tensor_type}, not a float")
    if CLASSIFIER[0] in names.targets and CLASSIFIER[1] not in names.targets:
        raise Q8Error(f"{where}: the classifier has a weight ({names.targets[CLASSIFIER[0]]}) but no bias")
    for target in expected:
        if target not in names.targets and target not in POOLER + CLASSIFIER:
            raise Q8Error(f"{where}: missing parameter {names.prefix}{_modelzoo_name(target)} "
                          f"({target} in Hugging Face terms)")
    if (POOLER[0] in names.targets) != (POOLER[1] in names.targets):
        raise Q8Error(f"{where}: the pooler (dense) has only one of its weight and bias")
    return classifier


def _modelzoo_name(target: str) -> str:
    """The current ModelZoo name of a Hugging Face BERT parameter (for 'missing' messages)."""
    rest = target[len("bert."):] if target.startswith("bert.") else target
    reverse = {v: k for k, v in _EMBEDDINGS.items() if not k.endswith(("gamma", "beta", "full_position_embeddings"))
               and k != "bert_embedding_postprocessor.embedding_table"}
    reverse["embeddings.LayerNorm.weight"] = "bert_embedding_postprocessor.layernorm.gamma"
    reverse["embeddings.LayerNorm.bias"] = "bert_embedding_postprocessor.layernorm.beta"
    if rest in reverse:
        return reverse[rest]
    match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", rest)
    if match:
        cells = {v: k for k, v in _LAYER_CELLS.items()}
        cell = cells.get(match.group(2), match.group(2))
        leaf = match.group(3)
        if cell.endswith("layernorm"):
            leaf = "gamma" if leaf == "weight" else "beta"
        return f"bert_encoder.layers.{match.group(1)}.{cell}.{leaf}"
    return rest


# -- locating the files ------------------------------------------------------------------------

@dataclass
class Sources:
    checkpoint: Path
    config: Path
    vocab: Path
    tokenizer_files: list[Path]


def locate(source: str) -> Sources | None:
    """The ModelZoo checkpoint, config and vocabulary ``source`` names; None when ``source`` is not a
    ModelZoo checkpoint (a hub id or a Hugging Face folder: left to the backends)."""
    path = Path(source)
    if path.suffix.lower() == ".ckpt":
        if not path.exists():
            raise Q8Error(f"--model {source}: no such file")
        if not path.is_file():
            raise Q8Error(f"--model {source}: not a file")
        checkpoint = path
    elif path.is_dir():
        if any((path / name).exists() for name in HF_WEIGHT_FILES) or any(path.glob("model-*.safetensors")):
            return None
        ckpts = sorted(p for p in path.iterdir() if p.suffix.lower() == ".ckpt" and p.is_file())
        if not ckpts:
            return None
        if len(ckpts) > 1:
            raise Q8Error(f"--model {source}: holds {len(ckpts)} .ckpt files ({', '.join(p.name for p in ckpts[:4])}"
                          f"{', ...' if len(ckpts) > 4 else ''}); pass the one to use: --model {ckpts[0]}")
        checkpoint = ckpts[0]
    else:
        return None
    folder = checkpoint.parent
    config = None
    for name in (f"{checkpoint.stem}.yaml", f"{checkpoint.stem}.yml", f"{checkpoint.stem}.json", "config.json"):
        if (folder / name).is_file():
            config = folder / name
            break
    if config is None:
        yamls = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".yaml", ".yml") and p.is_file())
        if len(yamls) == 1:
            config = yamls[0]
        elif yamls:
            raise Q8Error(f"{checkpoint}: {len(yamls)} yaml files beside it ({', '.join(p.name for p in yamls)}); "
                          f"name the one that configures it {checkpoint.stem}.yaml")
        else:
            raise Q8Error(f"{checkpoint}: no configuration beside it; put the ModelZoo yaml (the BertConfig "
                          f"fields) or a Hugging Face config.json in {folder}")
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise Q8Error(f"{checkpoint}: no vocab.txt beside it; the tokenizer needs the BERT WordPiece "
                      f"vocabulary the checkpoint was trained with, in {folder}")
    tokenizer_files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    return Sources(checkpoint, config, vocab, tokenizer_files)


# -- the converted folder ----------------------------------------------------------------------

def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "q8bert"


def _digest(sources: Sources) -> str:
    sha = hashlib.sha256(f"q8bert-modelzoo-{CONVERTER_VERSION}\0".encode())
    for label, path in (("ckpt", sources.checkpoint), (f"config:{sources.config.suffix}", sources.config),
                        ("vocab", sources.vocab), *((f"tok:{p.name}", p) for p in sources.tokenizer_files)):
        try:
            with open(path, "rb") as fh:
                sha.update(f"{label}\0{os.fstat(fh.fileno()).st_size}\0".encode())
                for block in iter(lambda: fh.read(1 << 20), b""):
                    sha.update(block)
        except OSError as exc:
            raise Q8Error(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    return sha.hexdigest()


def _read_vocab(path: Path) -> list[str]:
    try:
        return [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise Q8Error(f"{path}: cannot read it as UTF-8 text ({type(exc).__name__})") from None


def _uncased(vocab: list[str]) -> bool:
    return not any(token != token.lower() for token in vocab if not (token.startswith("[") and token.endswith("]")))


def _write_tokenizer(directory: Path, sources: Sources, config: dict, lower: bool | None) -> None:
    vocab = _read_vocab(sources.vocab)
    if len(vocab) > config["vocab_size"]:
        raise Q8Error(f"{sources.vocab}: {len(vocab)} tokens, more than the checkpoint's vocab_size "
                      f"{config['vocab_size']}: not the vocabulary it was trained with")
    shutil.copyfile(sources.vocab, directory / "vocab.txt")
    if any(p.name == "tokenizer_config.json" for p in sources.tokenizer_files):
        for path in sources.tokenizer_files:
            shutil.copyfile(path, directory / path.name)
        return
    from transformers import BertTokenizer

    lower = _uncased(vocab) if lower is None else lower
    try:
        tokenizer = BertTokenizer(vocab=str(directory / "vocab.txt"), do_lower_case=lower,
                                  model_max_length=config["max_position_embeddings"])
    except Exception as exc:  # a vocabulary transformers cannot build a tokenizer from
        raise Q8Error(f"{sources.vocab}: no tokenizer can be built from it ({type(exc).__name__})") from None
    tokenizer.save_pretrained(str(directory))


def _build(sources: Sources, final: Path, where: str) -> None:
    """Convert ``sources`` into ``final`` (built under a temporary name, then renamed into place)."""
    from safetensors.numpy import save_file

    with Checkpoint(sources.checkpoint) as ckpt:
        names = map_names(ckpt.tensors, where)
        shapes = {target: tuple(ckpt.tensors[tag].shape) for target, tag in names.targets.items()}
        implied = _shapes_config(shapes)
        if sources.config.suffix.lower() == ".json":
            config, lower = config_from_json(sources.config, implied), None
        else:
            config, lower = config_from_yaml(sources.config, implied)
        outputs = check_shapes(names, ckpt.tensors, config, where, sources.config)
        if outputs is not None:
            config.update(architectures=["BertForSequenceClassification"], num_labels=outputs,
                          id2label={str(i): f"LABEL_{i}" for i in range(outputs)},
                          label2id={f"LABEL_{i}": i for i in range(outputs)})
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            save_file({target: np.ascontiguousarray(ckpt.array(tag)) for target, tag in sorted(names.targets.items())},
                      str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            _write_tokenizer(tmp, sources, config, lower)
            (tmp / INFO_FILE).write_text(json.dumps({
                "converter_version": CONVERTER_VERSION, "checkpoint": str(sources.checkpoint.absolute()),
                "config": str(sources.config.absolute()), "vocab": str(sources.vocab.absolute()),
                "prefix": names.prefix, "classifier_outputs": outputs, "skipped": names.skipped,
                "names": dict(sorted(names.targets.items())),
            }, indent=2) + "\n", encoding="utf-8")
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``; another process that got there first wins."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / INFO_FILE).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _headless(folder: Path) -> Path:
    """``folder`` without its classifier (cached beside it as ``<name>-nohead``)."""
    from safetensors.numpy import load_file, save_file

    final = folder.with_name(folder.name + "-nohead")
    if (final / INFO_FILE).is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=folder.parent))
    try:
        for path in folder.iterdir():
            if path.name not in ("model.safetensors", "config.json", INFO_FILE):
                shutil.copyfile(path, tmp / path.name)
        weights = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
                   if not k.startswith("classifier.")}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        for key in ("num_labels", "id2label", "label2id"):
            config.pop(key, None)
        config["architectures"] = ["BertModel"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
        info["classifier_dropped"] = info.pop("classifier_outputs")
        info["names"] = {k: v for k, v in info["names"].items() if not k.startswith("classifier.")}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _warn(message: str) -> None:
    print(f"q8: warning: {message}", file=sys.stderr)


def convert(source: str, *, cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face folder of the ModelZoo checkpoint ``source`` (converted now, or from the cache)."""
    sources = locate(source)
    if sources is None:
        raise Q8Error(f"--model {source}: not a ModelZoo checkpoint (a .ckpt, or a folder with one)")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / "modelzoo" / f"{sources.checkpoint.stem}-{_digest(sources)[:20]}"
    if not (final / INFO_FILE).is_file():
        try:
            _build(sources, final, str(sources.checkpoint))
        except OSError as exc:  # reading errors are Q8Errors already: this is the cache folder
            raise Q8Error(f"cannot write the converted model under {root} "
                          f"({exc.strerror or type(exc).__name__}); set {CACHE_ENV} to a writable folder") from None
    return final


def prepare_model(source: str, num_labels: int | None = None, *, cache_dir: str | Path | None = None,
                  warn: Callable[[str], None] = _warn) -> str:
    """What to hand to ``Backend.from_pretrained`` and the tokenizer for ``--model source``.

    A hub id or a Hugging Face folder comes back unchanged; a ModelZoo checkpoint (see the module
    docstring) comes back as the path of its converted Hugging Face folder. A classifier in the
    checkpoint is kept when it has ``num_labels`` outputs; otherwise it is left out (with a warning)
    and the backend initialises a new one from the seed, as for a pre-trained checkpoint.
    """
    if locate(source) is None:
        return source
    folder = convert(source, cache_dir=cache_dir)
    info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    outputs = info.get("classifier_outputs")
    if outputs is None or num_labels is None or outputs == num_labels:
        return str(folder)
    warn(f"{source}: its classifier (dense_1) has {outputs} output(s), the task needs {num_labels}; "
         f"it is left out and a new one is initialised")
    return str(_headless(folder))


def require_classifier(source: str, num_labels: int, *, where: str) -> None:
    """Refuse a local model folder whose weights hold no classifier with ``num_labels`` outputs: evaluating
    it would score a randomly initialised head. (Hub ids, and folders with only ``pytorch_model.bin``,
    which cannot be read without torch, are left to the backend.)"""
    weights = Path(source) / "model.safetensors"
    if not weights.is_file():
        return
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as fh:
            shapes = {key: fh.get_slice(key).get_shape() for key in fh.keys() if key.endswith("classifier.weight")}
    except Exception as exc:  # not safetensors, truncated
        raise Q8Error(f"{where}: {weights} is unreadable ({type(exc).__name__})") from None
    if not shapes:
        raise Q8Error(f"{where} has no classifier: it is a pre-trained model, not one fine-tuned on a task "
                      f"(fine-tune it with q8 run)")
    rows = next(iter(shapes.values()))[0]
    if rows != num_labels:
        raise Q8Error(f"{where}: its classifier has {rows} output(s), the task needs {num_labels}")
