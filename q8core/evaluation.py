"""Dev-set evaluation shared by the trainer and ``q8 eval``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import metrics
from .task import Task
from .tokenization import batches, encode


def load_eval_sets(task: Task, data_dir: Path | None, tokenizer,
                   max_seq_length: int) -> dict[str, dict[str, np.ndarray]]:
    """Tokenized dev split(s) of ``task``, keyed by metric-name suffix (``""``, ``"_mm"``)."""
    data_dir = None if data_dir is None else Path(data_dir)
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
