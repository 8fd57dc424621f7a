"""Reads the ModelZoo's TFRecord and MindRecord files through ``mindspore.dataset``.

The reading half of ``q8 run --dataset-type tfrecord|mindrecord``; the file layout, the checks and
the arrays are :mod:`q8core.records`, which imports this module only when records are asked for.
MindSpore is imported on the first read, so this module imports without it. The rows come back in
file order (no shuffling: the trainer shuffles with its own seed) whatever backend trains on them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from q8core.errors import Q8Error, first_line

#: as backends/mindspore (MindSpore 2.10 needs NumPy 1)
INSTALL = "pip install \"mindspore==2.10.0\" \"numpy<2\" \"pandas<3\" \"pyarrow<26\" \"ml-dtypes<0.6\""


def _dataset_module(dataset_type: str):
    try:
        import mindspore.dataset as dataset
    except ImportError:
        raise Q8Error(f"--dataset-type {dataset_type} needs MindSpore's dataset reader: {INSTALL}") from None
    except Exception as exc:  # installed but broken (e.g. under NumPy 2)
        raise Q8Error(f"--dataset-type {dataset_type} needs MindSpore's dataset reader, which failed to "
                      f"import ({type(exc).__name__}: {first_line(exc)}): {INSTALL}") from None
    return dataset


@contextlib.contextmanager
def _native_stderr_captured():
    """MindSpore's C++ side logs warnings and errors straight to file descriptor 2; while records are
    read they go to a scratch file, so that a bad file ends in one ``q8: error:`` line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _open(dataset, dataset_type: str, path: Path, columns: list[str] | None):
    if dataset_type == "tfrecord":
        return dataset.TFRecordDataset([str(path)], columns_list=columns, shuffle=False, num_parallel_workers=1)
    return dataset.MindDataset(str(path), columns_list=columns, shuffle=False, num_parallel_workers=1)


def _reason(exc: BaseException) -> str:
    """The line of a MindSpore pipeline error that says what is wrong."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith("[ERROR]"):
            return line[len("[ERROR]"):].strip()
    return first_line(exc)


def read(dataset_type: str, path: Path, required: tuple[str, ...],
         optional: tuple[str, ...] = ()) -> dict[str, list[np.ndarray]]:
    """The features ``required`` (and those of ``optional`` the file has) of every record of
    ``path``, in file order: one list of NumPy values per feature. The names are checked on the
    file's own columns first (TFRecord: the first record's features)."""
    dataset = _dataset_module(dataset_type)
    kind = "TFRecord" if dataset_type == "tfrecord" else "MindRecord"
    rows = 0
    with _native_stderr_captured():
        try:
            names = list(_open(dataset, dataset_type, path, None).get_col_names())
            missing = [name for name in required if name not in names]
            if missing:
                raise Q8Error(f"{path}: records have no feature {missing[0]!r} "
                              f"(features: {', '.join(sorted(names)) or 'none'})")
            wanted = [*required, *(name for name in optional if name in names)]
            columns: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
            for row in _open(dataset, dataset_type, path, wanted).create_dict_iterator(num_epochs=1,
                                                                                        output_numpy=True):
                for name in wanted:
                    columns[name].append(row[name])
                rows += 1
        except (RuntimeError, ValueError, TypeError, OSError) as exc:
            where = f"record {rows}: " if rows else ""
            raise Q8Error(f"{path}: {where}not a readable {kind} file of BERT features ({_reason(exc)})") from None
    return columns
