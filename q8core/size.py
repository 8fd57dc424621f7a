"""Model size in FP32 and in Q8BERT int8, from a safetensors file's tensor shapes (nothing loaded).

The int8 model stores every quantized weight (all 2-D tensors of a BERT: embedding tables and fully
connected weights) as int8 plus one float32 scale, each fully connected layer's input scale as one float32,
and everything else (biases as int32, LayerNorm parameters as float32) in 4 bytes per value.
"""

from __future__ import annotations

from math import prod
from pathlib import Path

from safetensors import safe_open


def model_sizes(weights: Path) -> tuple[int, int]:
    """(FP32 bytes, int8 bytes) of the tensors in a ``model.safetensors``."""
    fp32 = int8 = 0
    with safe_open(str(weights), framework="numpy") as fh:
        for name in fh.keys():
            shape = fh.get_slice(name).get_shape()
            count = prod(shape)
            fp32 += 4 * count
            if len(shape) == 2:  # int8 values, the weight scale, and (fully connected only) the input scale
                int8 += count + 4 + (0 if "embeddings" in name else 4)
            else:
                int8 += 4 * count
    return fp32, int8
