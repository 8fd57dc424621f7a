"""Distillation from an FP32 teacher (``q8 run --teacher``): the loss, and the teacher model.

The student's loss is ``(1 - w) * task_loss + w * kd`` with ``w`` the distillation weight and ``kd``
the distance between the student's and the teacher's logits on the same batch: for classification
``T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over the rows (Hinton et al.; ``T^2`` keeps the
gradient's size independent of the temperature ``T``), for regression the mean squared difference.
:func:`loss` is the NumPy reference of that formula; the backends compute it in their framework.

The teacher predicts in inference mode (no dropout, no gradient) and never trains. It is a q8
checkpoint or run folder (run by the backend its manifest names, its master weights in FP32; an
export runs as exported) or a fine-tuned Hugging Face folder (run by the student's backend).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import checkpoints
from .errors import Q8Error
from .spec import QuantSpec


def kd_term(student: np.ndarray, teacher: np.ndarray, temperature: float, regression: bool) -> np.float64:
    """The distillation term alone (float64): MSE for regression, ``T^2 * KL`` of the softened
    distributions, averaged over the rows, for classification."""
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    if regression:
        return np.mean((s.reshape(-1) - t.reshape(-1)) ** 2)
    log_s = _log_softmax(s / temperature)
    log_t = _log_softmax(t / temperature)
    return temperature ** 2 * np.mean(np.sum(np.exp(log_t) * (log_t - log_s), axis=-1))


def loss(student: np.ndarray, teacher: np.ndarray, task_loss: float, weight: float, temperature: float,
         regression: bool) -> np.float64:
    """``(1 - weight) * task_loss + weight * kd_term``."""
    return (1.0 - weight) * task_loss + weight * kd_term(student, teacher, temperature, regression)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def open_teacher(source: str, task, registry, student_backend, device: str, vocab_size: int):
    """The teacher model for ``--teacher source``, checked against the run's task and vocabulary: a
    backend instance whose ``predict`` gives the teacher's logits."""
    from . import modelzoo
    from .tokenization import load_tokenizer

    where = f"--teacher {source}"
    path = Path(source)
    if not path.exists():
        raise Q8Error(f"{where}: no such folder (a q8 run or checkpoint folder, or a fine-tuned Hugging Face "
                      f"folder)")
    if (path / checkpoints.MANIFEST_FILE).exists() or (path / checkpoints.TRAINER_STATE_FILE).exists():
        path = checkpoints.resolve(path)
        manifest = checkpoints.read_manifest(path)
        labels = manifest.get("labels")
        if manifest.get("task") != task.name or (labels is None) != task.is_regression or \
                (labels and tuple(labels) != task.labels):
            raise Q8Error(f"{where}: it was trained on {manifest.get('task')} (labels {labels}), this run is "
                          f"{task.name} (labels {list(task.labels) if task.labels else None})")
        backend_cls = registry.backend(manifest["backend"])
        spec = QuantSpec.load(path)
        if not manifest.get("export_format"):  # a checkpoint teaches with its FP32 master weights
            spec = dataclasses.replace(spec, mode="fp32")
        load = lambda: backend_cls.from_checkpoint(path, spec=spec, device=device)  # noqa: E731
    else:
        modelzoo.require_classifier(str(path), task.num_labels, where=where)
        load = lambda: student_backend.from_pretrained(  # noqa: E731
            str(path), labels=task.labels, spec=QuantSpec(mode="fp32"), device=device, seed=0)
    teacher_vocab = len(load_tokenizer(path))
    if teacher_vocab != vocab_size:
        raise Q8Error(f"{where}: its tokenizer has {teacher_vocab} tokens, the student's {vocab_size}: the "
                      f"teacher must read the same token ids")
    return load()
