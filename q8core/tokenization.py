"""Backend-neutral tokenization: task examples -> NumPy arrays every backend sees identically.

A Hugging Face ``AutoTokenizer`` (the pretrained model's own) encodes each pair with BERT's
``[CLS] a [SEP] b [SEP]`` layout, longest-first truncation, padding to ``max_seq_length``.
The ``transformers`` tokenizers need no deep-learning framework.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import load_error
from .task import Example, Task

FEATURES = ("input_ids", "attention_mask", "token_type_ids")


def load_tokenizer(source: str | Path):
    """The tokenizer of a pretrained model folder or hub id."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise load_error(str(source), exc) from None


def encode(examples: list[Example], tokenizer, task: Task, max_seq_length: int) -> dict[str, np.ndarray]:
    """Tokenize ``examples`` into int64 arrays of shape (n, max_seq_length), plus ``labels``."""
    texts_a = [ex.text_a for ex in examples]
    pairs = any(ex.text_b is not None for ex in examples)
    texts_b = [ex.text_b or "" for ex in examples] if pairs else None
    enc = tokenizer(texts_a, texts_b, truncation=True, max_length=max_seq_length, padding="max_length",
                    return_token_type_ids=True, return_attention_mask=True)
    arrays = {name: np.asarray(enc[name], dtype=np.int64) for name in FEATURES}
    arrays["labels"] = task.label_array(examples)
    return arrays


def batches(arrays: dict[str, np.ndarray], order: np.ndarray, batch_size: int,
            trim: bool) -> Iterator[dict[str, np.ndarray]]:
    """Slices of ``arrays`` in ``order``; with ``trim`` each batch is cut to its longest row."""
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = {name: values[index] for name, values in arrays.items()}
        if trim:
            length = max(int(batch["attention_mask"].sum(axis=1).max()), 1)
            for name in FEATURES:
                batch[name] = np.ascontiguousarray(batch[name][:, :length])
        yield batch
