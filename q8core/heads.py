"""Initial values of the parameters a pretrained checkpoint lacks (the new task head), drawn with NumPy.

Every backend takes these numbers, so the same checkpoint and ``--seed`` start the same model on every
framework. Each parameter has its own generator, seeded by the run's seed and the parameter's name, so
the values do not depend on the order in which a backend visits its parameters. The distributions are
those of Hugging Face's ``_init_weights`` for BERT: weights normal(0, initializer_range), biases zero,
LayerNorm weights one.
"""

from __future__ import annotations

import zlib

import numpy as np


def new_parameter(name: str, shape: tuple[int, ...], *, seed: int, initializer_range: float) -> np.ndarray:
    """The float32 starting value of parameter ``name`` (Hugging Face naming) for this seed."""
    shape = tuple(int(n) for n in shape)
    if name.endswith("bias"):
        return np.zeros(shape, np.float32)
    if "LayerNorm" in name or "layer_norm" in name:
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, zlib.crc32(name.encode("utf-8"))])
    return rng.normal(0.0, initializer_range, shape).astype(np.float32)
