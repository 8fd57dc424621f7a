"""Pre-tokenized GLUE records, as the MindSpore ModelZoo pipeline writes them: TFRecord or MindRecord.

``q8 run --dataset-type tfrecord|mindrecord --data-dir DIR`` (the ModelZoo's ``--dataset_type``)
trains on these files instead of GLUE TSV files and the tokenizer. Each record holds the features of
Google BERT's ``run_classifier.py`` (which the ModelZoo README points to for the conversion):

==============  ===========================================  ==========================
feature         what                                         becomes
==============  ===========================================  ==========================
``input_ids``   int64 token ids, ``seq_length`` of them      ``input_ids``
``input_mask``  int64, 1 for tokens, then 0 for padding      ``attention_mask``
``segment_ids`` int64, 0 (first text) or 1 (second text)     ``token_type_ids``
``label_ids``   one class id (int64), or a float score       ``labels`` (int64 / float32
                (STS-B); one value or a scalar                for regression)
==============  ===========================================  ==========================

Other features are ignored, except ``is_real_example``: rows where it is 0 (the padding rows
``run_classifier.py`` appends to an eval file on TPU) are dropped.

The files in ``DIR``, by split (the first name that exists is read; two that both exist are refused
as ambiguous). ``EXT`` is ``.tf_record`` or ``.tfrecord`` for tfrecord, ``.mindrecord`` (with its
``.mindrecord.db`` index beside it) or ``.mindrecord0`` (the first of N shards, which names the
others) for mindrecord:

- train: ``trainEXT``
- dev: ``evalEXT`` or ``devEXT``; MNLI matched: ``evalEXT``, ``dev_matchedEXT`` or ``eval_matchedEXT``
- MNLI mismatched: ``dev_mismatchedEXT`` or ``eval_mismatchedEXT``

``eval.tf_record`` and ``train.tf_record`` are the names ``run_classifier.py`` writes and the ModelZoo
README uses. Rows keep their file order (the trainer shuffles them with its own seed).

Lengths: the three token features of a record must have one length, the same in every record of
a file. Records shorter than ``--max-seq-length`` are padded with zeros to it; longer ones are cut
to it when only padding is cut, else it is an error (the ModelZoo would silently cut tokens). The
mask must be ones then zeros, so that a batch can be cut to its longest row like a tokenized one.
Token ids must fit the model's vocabulary and segment ids be 0 or 1; a class label must be one of
the task's class ids (a float feature with a whole value is accepted: the ModelZoo casts labels to
float32). MindSpore's TFRecord reader takes each feature's type from the first record and casts the
later ones to it.

This module needs no deep-learning framework: reading the files is done by
:mod:`tasks.records` (``mindspore.dataset``), imported only when records are asked for.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np

from .errors import Q8Error
from .task import Task

TSV = "tsv"
TFRECORD = "tfrecord"
MINDRECORD = "mindrecord"
DATASET_TYPES = (TSV, TFRECORD, MINDRECORD)

#: record feature -> the core's array name (q8core.tokenization.FEATURES)
TOKEN_FEATURES = {"input_ids": "input_ids", "input_mask": "attention_mask", "segment_ids": "token_type_ids"}
LABEL_FEATURE = "label_ids"
REAL_FEATURE = "is_real_example"  # run_classifier.py: 0 on the padding rows of a TPU eval file
REQUIRED = (*TOKEN_FEATURES, LABEL_FEATURE)

EXTENSIONS = {TFRECORD: (".tf_record", ".tfrecord"), MINDRECORD: (".mindrecord", ".mindrecord0")}
#: the module that reads records with MindSpore (a plugin module: the core never imports MindSpore)
READER_MODULE = "tasks.records"


def check_dataset_type(value: str) -> str:
    if value not in DATASET_TYPES:
        raise Q8Error(f"--dataset-type {value!r} is not one of {', '.join(DATASET_TYPES)}")
    return value


def _stems(task: Task, split: str) -> list[str]:
    """File names (without extension) that hold ``split``, most ModelZoo-like first."""
    if split == "train":
        return ["train"]
    main = task.eval_splits.get("") == split
    names = (["eval"] if main else []) + [split, split.replace("dev", "eval", 1)]
    return list(dict.fromkeys(names))


def split_file(task: Task, data_dir: Path | None, split: str, dataset_type: str) -> Path:
    """The record file of ``split`` in ``data_dir``, or a Q8Error naming what was looked for."""
    names = [stem + ext for stem in _stems(task, split) for ext in EXTENSIONS[dataset_type]]
    if data_dir is None:
        raise Q8Error(f"--dataset-type {dataset_type} reads the files of the ModelZoo's data pipeline; pass "
                      f"--data-dir with the folder that holds {names[0]}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        raise Q8Error(f"data directory {data_dir} {what}")
    found = [data_dir / name for name in names if (data_dir / name).is_file()]
    if len(found) > 1:
        raise Q8Error(f"{data_dir}: both {found[0].name} and {found[1].name} could be the {split} split; "
                      f"keep one")
    if not found:
        present = sorted(p.name for p in data_dir.iterdir())
        has = ", ".join(present[:12]) + (", ..." if len(present) > 12 else "") if present else "nothing"
        raise Q8Error(f"{data_dir / names[0]} not found: --dataset-type {dataset_type} reads the {split} split "
                      f"from {' or '.join(names)} ({data_dir} has: {has})")
    path = found[0]
    if dataset_type == MINDRECORD:
        index = path.with_name(path.name + ".db")
        if not index.is_file():
            raise Q8Error(f"{index} not found: MindRecord's index file, written beside {path.name} by FileWriter")
    return path


def _reader():
    try:
        return importlib.import_module(READER_MODULE)
    except ImportError as exc:  # the GLUE plugin package is not installed
        raise Q8Error(f"records need the reader {READER_MODULE} ({exc})") from None


def load(task: Task, data_dir: Path | None, split: str, dataset_type: str, max_seq_length: int,
         vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """``split`` of ``task`` from its record file: the arrays :func:`q8core.tokenization.encode` gives
    (int64 ``(n, max_seq_length)`` token arrays and ``labels``)."""
    path = split_file(task, data_dir, split, dataset_type)
    columns = _reader().read(dataset_type, path, REQUIRED, optional=(REAL_FEATURE,))
    return to_arrays(task, path, columns, max_seq_length, vocab_size)


def to_arrays(task: Task, path: Path, columns: dict[str, list[np.ndarray]], max_seq_length: int,
              vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """Validate the rows read from ``path`` (one list of per-record values per feature) and stack
    them into the core's arrays."""
    missing = [name for name in REQUIRED if name not in columns]
    if missing:
        raise Q8Error(f"{path}: records have no feature {missing[0]!r} (features: {', '.join(sorted(columns))})")
    n = len(columns[LABEL_FEATURE])
    keep = np.arange(n)
    if REAL_FEATURE in columns:  # drop run_classifier.py's padding rows
        real = [_scalar(path, i, REAL_FEATURE, v) for i, v in enumerate(columns[REAL_FEATURE])]
        keep = np.flatnonzero(np.asarray(real, dtype=np.float64) != 0)
    if not len(keep):
        raise Q8Error(f"{path}: holds no records")
    width = None
    tokens = {name: [] for name in TOKEN_FEATURES}
    for i in keep:
        row = {}
        for name in TOKEN_FEATURES:
            value = np.asarray(columns[name][i])
            if value.ndim != 1 or value.dtype.kind not in "iu":
                raise Q8Error(f"{path}: record {i}: {name} must be a list of integers, found "
                              f"{value.dtype} of shape {value.shape}")
            row[name] = value
        sizes = {name: len(value) for name, value in row.items()}
        if len(set(sizes.values())) > 1:
            raise Q8Error(f"{path}: record {i}: its token features differ in length ("
                          + ", ".join(f"{name} {size}" for name, size in sizes.items())
                          + "); each must have seq_length values")
        if width is None:
            width, first = sizes["input_ids"], i
        elif sizes["input_ids"] != width:
            raise Q8Error(f"{path}: record {i} has {sizes['input_ids']} values per token feature, record "
                          f"{first} has {width}; every record of a file must have one seq_length")
        for name, value in row.items():
            tokens[name].append(value)
    arrays = {TOKEN_FEATURES[name]: np.stack(values).astype(np.int64) for name, values in tokens.items()}
    _check_tokens(path, keep, arrays, vocab_size)
    arrays = _fit_length(path, keep, arrays, max_seq_length)
    arrays["labels"] = _labels(task, path, keep, columns[LABEL_FEATURE])
    return arrays


def _scalar(path: Path, i: int, name: str, value) -> float:
    value = np.asarray(value)
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise Q8Error(f"{path}: record {i}: {name} must be one number, found {value.dtype} of shape {value.shape}")
    return value.reshape(()).item()


def _check_tokens(path: Path, keep: np.ndarray, arrays: dict[str, np.ndarray], vocab_size: int | None) -> None:
    mask, ids, segments = arrays["attention_mask"], arrays["input_ids"], arrays["token_type_ids"]
    lengths = mask.sum(axis=1)
    positions = np.arange(mask.shape[1])
    ok = np.isin(mask, (0, 1)).all(axis=1) & (mask == (positions < lengths[:, None])).all(axis=1) & (lengths > 0)
    if not ok.all():
        i = keep[np.flatnonzero(~ok)[0]]
        raise Q8Error(f"{path}: record {i}: input_mask must be 1s (at least one) followed by 0s for the "
                      f"padding, found {_show(mask[np.flatnonzero(~ok)[0]])}")
    bad = (ids < 0) | ((ids >= vocab_size) if vocab_size else False)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        limit = f"the model's vocabulary (0..{vocab_size - 1})" if vocab_size else "token ids (>= 0)"
        raise Q8Error(f"{path}: record {keep[row]}: input_ids holds {ids[row, col]} at position {col}, "
                      f"outside {limit}")
    bad = ~np.isin(segments, (0, 1))
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise Q8Error(f"{path}: record {keep[row]}: segment_ids holds {segments[row, col]} at position {col}; "
                      f"BERT's segments are 0 and 1")


def _show(values: np.ndarray) -> str:
    text = " ".join(map(str, values[:16].tolist()))
    return f"[{text}{' ...' if len(values) > 16 else ''}]"


def _fit_length(path: Path, keep: np.ndarray, arrays: dict[str, np.ndarray], max_seq_length: int):
    """Pad with zeros, or cut padding, to ``max_seq_length`` columns."""
    width = arrays["input_ids"].shape[1]
    if width < max_seq_length:
        return {name: np.pad(values, ((0, 0), (0, max_seq_length - width))) for name, values in arrays.items()}
    if width > max_seq_length:
        lengths = arrays["attention_mask"].sum(axis=1)
        if lengths.max() > max_seq_length:
            row = int(np.argmax(lengths))
            raise Q8Error(f"{path}: record {keep[row]} holds {lengths[row]} tokens, more than the run's "
                          f"max_seq_length {max_seq_length}; these records need q8 run --max-seq-length {width} "
                          f"(their seq_length)")
        return {name: np.ascontiguousarray(values[:, :max_seq_length]) for name, values in arrays.items()}
    return arrays


def _labels(task: Task, path: Path, keep: np.ndarray, values: list) -> np.ndarray:
    labels = np.asarray([_scalar(path, int(i), LABEL_FEATURE, values[i]) for i in keep], dtype=np.float64)
    if task.is_regression:
        bad = ~np.isfinite(labels)
        if bad.any():
            raise Q8Error(f"{path}: record {keep[np.argmax(bad)]}: label_ids {labels[bad][0]} is not a finite "
                          f"score")
        return labels.astype(np.float32)  # as the TSV reader gives them: float(text) -> float32
    classes = task.num_labels
    bad = (labels != np.round(labels)) | (labels < 0) | (labels >= classes) | ~np.isfinite(labels)
    if bad.any():
        i = int(np.argmax(bad))
        value = labels[i]
        shown = int(value) if math.isfinite(value) and value == round(value) else value
        raise Q8Error(f"{path}: record {keep[i]}: label_ids {shown} is not a class id of {task.name} "
                      f"(0..{classes - 1}: {', '.join(task.labels)})")
    return labels.astype(np.int64)
