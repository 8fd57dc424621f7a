"""Dev-set evaluation shared by the trainer and ``q8 eval``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import metrics, records
from .task import Task
from .tokenization import batches, encode


def load_eval_sets(task: Task, data_dir: Path | None, tokenizer, max_seq_length: int,
                   dataset_type: str = records.TSV) -> dict[str, dict[str, np.ndarray]]:
    """Tokenized dev split(s) of ``task``, keyed by metric-name suffix (``""``, ``"_mm"``); with a
    record ``dataset_type`` read pre-tokenized from the ModelZoo's files (see :mod:`q8core.records`)."""
    data_dir = None if data_dir is None else Path(data_dir)
    if dataset_type != records.TSV:
        for split in task.eval_splits.values():  # every file is there before any is read
            records.split_file(task, data_dir, split, dataset_type)
        return {suffix: records.load(task, data_dir, split, dataset_type, max_seq_length,
                                     vocab_size=len(tokenizer))
                for suffix, split in task.eval_splits.items()}
    return {suffix: encode(task.read(data_dir, split), tokenizer, task, max_seq_length)
            for suffix, split in task.eval_splits.items()}


def predict(backend, arrays: dict[str, np.ndarray], batch_size: int, trim: bool) -> np.ndarray:
    """Logits for every row of ``arrays``, in order."""
    order = np.arange(len(arrays["labels"]))
    return np.concatenate([backend.predict(batch) for batch in batches(arrays, order, batch_size, trim)])


def evaluate(backend, task: Task, eval_sets: dict[str, dict[str, np.ndarray]], batch_size: int,
             trim: bool) -> dict[str, float]:
    """The task's metrics on every eval split (suffixed names for the secondary splits)."""
    results: dict[str, float] = {}
    for suffix, arrays in eval_sets.items():
        preds = task.predictions(predict(backend, arrays, batch_size, trim))
        for name, value in metrics.compute(task.metrics, preds, arrays["labels"]).items():
            results[name + suffix] = value
    return results
