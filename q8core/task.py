"""What a task plugin supplies: examples, labels, metrics.

A task plugin registers :class:`Task` objects through the ``register_tasks`` hook. The trainer
only needs what is declared here; how the examples are read (GLUE TSV, anything else) is the
plugin's business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

Label = Union[int, float]


@dataclass(frozen=True)
class Example:
    """One input pair and its label (a class index, or a score for regression)."""

    text_a: str
    text_b: str | None
    label: Label


def normalize_task_name(name: str) -> str:
    """Case- and punctuation-insensitive key: ``STS-B``, ``sts-b``, ``stsb`` -> ``stsb``."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class Task:
    """A fine-tuning task.

    ``labels`` is None for regression (one output, a float score); otherwise it lists the label
    strings in the order of the classifier's outputs. ``eval_splits`` maps a metric-name suffix
    to a split name: GLUE tasks evaluate on ``{"": "dev"}``, MNLI on matched and mismatched
    (``{"": "dev_matched", "_mm": "dev_mismatched"}``). ``main_metric`` picks the best checkpoint.
    """

    name: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    eval_splits: dict[str, str] = field(default_factory=lambda: {"": "dev"})
    description: str = ""
    #: A small sample of the task shipped with its plugin (same layout as a data dir), for
    #: ``q8 run --example``; None when the plugin ships none.
    sample_dir: Path | None = None

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    def read(self, data_dir: Path | None, split: str) -> list[Example]:  # pragma: no cover - interface
        """All examples of ``split`` (``train``, ``dev``, ...) from ``data_dir``; ``None`` means the
        task's default source (GLUE: the Hugging Face hub)."""
        raise NotImplementedError

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        """Model outputs -> predictions comparable with the labels."""
        logits = np.asarray(logits)
        if self.is_regression:
            return logits.reshape(-1).astype(np.float64)
        return logits.argmax(axis=-1)

    def label_array(self, examples: list[Example]) -> np.ndarray:
        dtype = np.float32 if self.is_regression else np.int64
        return np.asarray([ex.label for ex in examples], dtype=dtype)
