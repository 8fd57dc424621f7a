"""NumPy reference quantizer: the single source of truth for Q8BERT arithmetic.

One short function per formula of METHOD.md. Every backend is tested against these functions
bit for bit: the same float32 input gives the same int8 values, the same float32 scales and the
same float32 fake-quantized output. All arithmetic is float32 (scales, products, EMA) except the
integer matmul, which accumulates in int32 exactly as int8 hardware does.

Rules fixed here for every backend:

- ``scale = qmax / threshold`` in float32, where ``qmax = 2^(bits-1) - 1``; a zero threshold
  (an all-zero tensor) gives scale 1, so zeros quantize to zero instead of NaN.
- ``quantize(x) = clamp(round_half_even(x * scale), -qmax, qmax)``: multiply by the scale
  (never divide by its inverse), round half to even, clamp.
- ``dequantize(q) = q / scale`` (division, float32).
- EMA of max|x|: the first training batch sets it; afterwards
  ``ema = decay * ema + (1 - decay) * max|x|`` with ``decay`` and ``1 - decay`` (computed in
  float64, then rounded) as float32 constants, two float32 products and one float32 sum.
- Bias: ``b_q = clamp(round(b * (S_W * S_x)), -(2^31 - 1), 2^31 - 1)`` with the product of the
  two scales rounded to float32 first.
- Quantized linear: ``y = (x_q · W_qᵀ + b_q) / (S_W * S_x)``.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def qmax(bits: int) -> int:
    """Largest magnitude of the symmetric signed range: 2^(bits-1) - 1."""
    return 2 ** (bits - 1) - 1


def max_abs(x: np.ndarray) -> np.float32:
    """max|x| of a tensor (the per-tensor threshold), as float32."""
    x = np.asarray(x, dtype=F32)
    return F32(np.max(np.abs(x))) if x.size else F32(0.0)


def get_scale(threshold: float, bits: int = 8) -> np.float32:
    """S = (2^(M-1) - 1) / threshold, float32; 1 when the threshold is 0."""
    t = F32(threshold)
    if t == 0:
        return F32(1.0)
    return F32(F32(qmax(bits)) / t)


def quantize(x: np.ndarray, scale: float, bits: int = 8) -> np.ndarray:
    """clamp(round(x * S), -qmax, qmax) as int8 (int32 for more than 8 bits)."""
    q = qmax(bits)
    scaled = np.asarray(x, dtype=F32) * F32(scale)
    rounded = np.clip(np.rint(scaled), -q, q)  # np.rint rounds half to even
    return rounded.astype(np.int8 if bits <= 8 else np.int32)


def dequantize(q: np.ndarray, scale: float) -> np.ndarray:
    """q / S as float32."""
    return (np.asarray(q).astype(F32) / F32(scale)).astype(F32)


def fake_quantize(x: np.ndarray, scale: float, bits: int = 8) -> np.ndarray:
    """Dequantize(Quantize(x)): the float32 value an 8-bit tensor stands for."""
    return dequantize(quantize(x, scale, bits), scale)


def ema_update(ema: float | None, value: float, decay: float) -> np.float32:
    """One EMA step of max|x|; ``ema=None`` means no batch seen yet (the value initialises it)."""
    if ema is None:
        return F32(value)
    return F32(F32(decay) * F32(ema) + F32(1.0 - decay) * F32(value))


def bias_scale(weight_scale: float, input_scale: float) -> np.float32:
    """S_W * S_x rounded to float32: the scale of the int32 bias and of the accumulator."""
    return F32(F32(weight_scale) * F32(input_scale))


def quantize_bias(bias: np.ndarray, weight_scale: float, input_scale: float, bits: int = 32) -> np.ndarray:
    """b_q = round(b * S_W * S_x) as int32 (clamped to the signed ``bits`` range)."""
    q = qmax(bits)
    scaled = np.asarray(bias, dtype=F32) * bias_scale(weight_scale, input_scale)
    # clip in float64: 2^31 - 1 has no float32 representation
    return np.clip(np.rint(scaled).astype(np.float64), -q, q).astype(np.int32)


def quantized_linear(x_q: np.ndarray, w_q: np.ndarray, b_q: np.ndarray | None,
                     weight_scale: float, input_scale: float) -> np.ndarray:
    """Integer FC layer: int8 x int8 -> int32 accumulate (+ int32 bias) -> float32 y.

    ``x_q`` has shape (..., in), ``w_q`` (out, in) as in ``nn.Linear``.
    """
    acc = np.matmul(x_q.astype(np.int32), w_q.astype(np.int32).T)
    if b_q is not None:
        acc = acc + b_q.astype(np.int32)
    return (acc.astype(F32) / bias_scale(weight_scale, input_scale)).astype(F32)


def linear_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, input_threshold: float,
                   bits: int = 8, bias_bits: int = 32) -> np.ndarray:
    """The whole quantized FC layer from float32 inputs: what a backend's forward must return.

    Weight scale from max|W|, input scale from ``input_threshold`` (the EMA in training and
    inference, the batch max|x| in dynamic quantization).
    """
    s_w = get_scale(max_abs(weight), bits)
    s_x = get_scale(input_threshold, bits)
    b_q = None if bias is None else quantize_bias(bias, s_w, s_x, bias_bits)
    return quantized_linear(quantize(x, s_x, bits), quantize(weight, s_w, bits), b_q, s_w, s_x)


def embedding_forward(ids: np.ndarray, table: np.ndarray, bits: int = 8) -> np.ndarray:
    """Quantized embedding lookup: rows of the table fake-quantized with the whole table's scale."""
    s_w = get_scale(max_abs(table), bits)
    return fake_quantize(np.asarray(table, dtype=F32)[np.asarray(ids)], s_w, bits)
