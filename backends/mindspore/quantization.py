"""Q8BERT cells for MindSpore, matching :mod:`q8core.reference` bit for bit.

:class:`QuantDense` (a fully connected layer, ``weight`` of shape (out, in) as in ``nn.Linear``) and
:class:`QuantEmbedding` carry Parameters named ``weight`` / ``bias`` only, so a model built from them has
the Hugging Face state-dict names. When the spec quantizes (modes ``qat`` and ``dq``) they also carry two
non-trainable Parameters, ``input_ema`` (float32 EMA of max|x|, Dense only) and ``steps`` (int32 count of
training forwards); both are updated in place with ``ops.assign`` and so travel with
``mindspore.save_checkpoint``.

The fully quantized Dense computes in the integer domain on float32 tensors holding integers:
``acc = x_q · W_qᵀ + b_q``, ``y = acc / (S_W * S_x)`` -- exactly the reference's int8 x int8 -> int32 layer
while the accumulator stays below 2^24. Its backward pass (:class:`IntegerLinear`, a Cell ``bprop``) is
the straight-through estimator: the gradients of ``y = FQ(x) · FQ(W)ᵀ + b``. Embeddings fake-quantize the
looked-up rows with the whole table's scale (:class:`FakeQuantSTE`: FQ forward, identity backward). In
training the table's scale is a non-trainable ``weight_scale`` Parameter that the backend refreshes from the
current table before every forward (:meth:`QuantEmbedding.refresh_scale`): computed inside the
differentiated graph it trips MindSpore 2.10's dynamic-shape compiler ("The pointer[manager] is null").

Branches that depend on the training step (the ``start_step`` delay, the first EMA batch, an EMA that is
not ready at inference) are tensor ``select``s, so the same cell runs in PyNative and in graph mode.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from q8core.spec import QuantSpec

from . import cpu_kernels
from .parallel import all_ranks_max

F32 = ms.float32
#: Division as ``RealDiv``: with dynamic shapes MindSpore's CPU ``Div`` (what ``/`` compiles to) takes a slow
#: generic path, 4.5x slower than ``RealDiv`` (3.0 ms vs 0.66 ms on 368 x 1536); both divide correctly rounded.
divide = ops.RealDiv()


def get_scale(threshold: Tensor, qmax: int) -> Tensor:
    """qmax / threshold in float32; 1 where the threshold is 0 (q8core.reference.get_scale)."""
    threshold = threshold.astype(F32)
    # a float32 tensor numerator: a Python float over a tensor is not correctly rounded in MindSpore 2.10;
    # a zero threshold divides to inf, which the select drops
    return ops.select(threshold > 0, Tensor(np.float32(qmax), F32) / threshold, ops.ones_like(threshold))


#: 1.5 * 2^23: for |y| <= 2^22, ``(y + ROUNDER) - ROUNDER`` is ``y`` rounded to an integer, half to even
#: (float32 addition rounds to nearest-even at the ulp of 2^23, which is 1). Three cheap element-wise ops,
#: several times faster than MindSpore's CPU ``Round`` kernel, and bit-identical to it (and to np.rint)
#: on the bounded values quantization feeds it (up to the sign of a zero: ``-0.0`` becomes ``+0.0``).
ROUNDER = 12582912.0


def round_half_even(y: Tensor) -> Tensor:
    """``y`` rounded to an integer, half to even, for ``|y| <= 2^22`` (see :data:`ROUNDER`)."""
    return (y + ROUNDER) - ROUNDER


def quantize(x: Tensor, scale: Tensor, qmax: int, bounded: bool = False) -> Tensor:
    """clamp(round_half_even(x * S), -qmax, qmax), kept as float32 integers.

    ``bounded=True`` says ``|x| <= threshold`` with ``scale = qmax / threshold`` (a weight and the scale
    of its own max|W|): then ``|x * S| <= qmax * (1 + 2^-23)``, which rounds into [-qmax, qmax], so the
    clamp is skipped (it would change nothing unless the threshold is subnormal and the scale inf).
    With the fused CPU kernel (:mod:`.cpu_kernels`) it is one pass, clamp included, with the same bits."""
    if cpu_kernels.ACTIVE is not None:
        return cpu_kernels.ACTIVE.quantize(x, scale.astype(F32), Tensor(np.float32(qmax), F32))
    y = x * scale
    if not bounded:
        y = clamp(y, float(qmax))
    return round_half_even(y)


def clamp(x: Tensor, bound: float) -> Tensor:
    """min(max(x, -bound), bound) (plain Maximum/Minimum: faster than ClipByValue on CPU)."""
    return ops.minimum(ops.maximum(x, -bound), bound)


def fake_quantize(x: Tensor, scale: Tensor, qmax: int, bounded: bool = False) -> Tensor:
    """Dequantize(Quantize(x)) (no gradient of its own: wrap it in :func:`ste`)."""
    return divide(quantize(x, scale, qmax, bounded), scale)


def ste(x: Tensor, quantized: Tensor) -> Tensor:
    """Straight-through estimator: the value of ``quantized``, the gradient of ``x``."""
    return x + ops.stop_gradient(quantized - x)


_ROW_MAX = ops.ArgMaxWithValue(axis=-1)
_ROW_MIN = ops.ArgMinWithValue(axis=-1)


def max_abs(x: Tensor) -> Tensor:
    """max|x| as a float32 scalar with no gradient.

    Reduced over the last axis first (``ArgMaxWithValue``), then over the rows: MindSpore's CPU
    reduction over all axes at once is 2-3x slower (60 ms vs 27 ms on MiniLM's 30522 x 384 word
    embedding); the maximum is the same either way. The fused CPU kernel (:mod:`.cpu_kernels`) reads
    ``x`` once instead."""
    if cpu_kernels.ACTIVE is not None:
        return cpu_kernels.ACTIVE.max_abs(ops.stop_gradient(x))
    x = ops.abs(ops.stop_gradient(x))
    if x.ndim > 1:
        return _ROW_MAX(x.reshape(-1, x.shape[-1]))[1].max()
    return x.max()


def min_max(x: Tensor) -> tuple[Tensor, Tensor]:
    """(min x, max x) as float32 scalars with no gradient (rows first, as :func:`max_abs`)."""
    x = ops.stop_gradient(x)
    x = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    return _ROW_MIN(x)[1].min(), _ROW_MAX(x)[1].max()


def row_max_abs(w: Tensor) -> Tensor:
    """max|W[j, :]| per output row of a (out, in) weight, no gradient: the per-channel thresholds."""
    return _ROW_MAX(ops.abs(ops.stop_gradient(w)))[1]


def asymmetric_params(lo: Tensor, hi: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """(S, z) of the uint8 grid over [min(lo, 0), max(hi, 0)] (q8core.reference.asymmetric_params)."""
    lo = ops.minimum(lo.astype(F32), 0.0)
    span = ops.maximum(hi.astype(F32), 0.0) - lo
    scale = ops.select(span > 0, Tensor(np.float32(levels), F32) / span, ops.ones_like(span))
    return scale, clamp_between(round_half_even(-lo * scale), 0.0, float(levels))


def clamp_between(x: Tensor, low, high) -> Tensor:
    return ops.minimum(ops.maximum(x, low), high)


def quantize_centred(x: Tensor, scale: Tensor, zero_point: Tensor, levels: int) -> Tensor:
    """clamp(round(x * S) + z, 0, levels) - z as float32 integers (the rounding of a clamped value: the
    bounds are integers, so it is the same)."""
    return round_half_even(clamp_between(x * scale, -zero_point, levels - zero_point))


def ema_constants(decay: float) -> tuple[Tensor, Tensor]:
    """float32 ``decay`` and ``1 - decay`` (computed in float64, then rounded), as the reference."""
    return Tensor(np.float32(decay), F32), Tensor(np.float32(1.0 - decay), F32)


def ema_update(ema: Tensor, value: Tensor, decay: tuple[Tensor, Tensor]) -> Tensor:
    """decay * ema + (1 - decay) * value: two float32 products, one float32 sum (reference order)."""
    d, one_minus_d = decay
    return d * ema + one_minus_d * value


def gemm():
    """The CPU kernels when they include oneDNN's GEMM, else ``None``."""
    kernels = cpu_kernels.ACTIVE
    return kernels if kernels is not None and kernels.matmul_nt is not None else None


# ``a · bᵀ``, ``a · b`` and ``aᵀ · b`` of 2-D float32 tensors: oneDNN's GEMM through :mod:`.cpu_kernels` where
# it is loaded with it, else ``fallback(a, b)`` (the ``ops.MatMul`` with those transposes). One function per
# product, each a single branch: MindSpore 2.10 compiles string-selected branches inside a ``bprop`` to an
# empty graph.
def matmul_nt(a: Tensor, b: Tensor, fallback) -> Tensor:
    if gemm() is not None:
        return gemm().matmul_nt(a, b)
    return fallback(a, b)


def matmul_nn(a: Tensor, b: Tensor, fallback) -> Tensor:
    if gemm() is not None:
        return gemm().matmul_nn(a, b)
    return fallback(a, b)


def matmul_tn(a: Tensor, b: Tensor, fallback) -> Tensor:
    if gemm() is not None:
        return gemm().matmul_tn(a, b)
    return fallback(a, b)


class Dense(nn.Cell):
    """``y = x · Wᵀ + b`` with ``weight`` (out, in) and ``bias`` (out,) as in ``torch.nn.Linear``."""

    quant_phase = None  # a float32 layer has no quantization delay (QuantDense: see set_phase)

    def __init__(self, in_features: int, out_features: int, has_bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(Tensor(np.zeros((out_features, in_features), np.float32)), name="weight")
        self.bias = Parameter(Tensor(np.zeros((out_features,), np.float32)), name="bias") if has_bias else None
        self.has_bias = has_bias
        self.linear = FloatLinear(has_bias)

    def dense(self, x2: Tensor, weight: Tensor) -> Tensor:
        return self.linear(x2, weight, self.bias if self.has_bias else weight)

    def construct(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = self.dense(x.reshape(-1, shape[-1]), self.weight)
        return y.reshape(shape[:-1] + (self.out_features,))


class FloatLinear(nn.Cell):
    """``y = x · Wᵀ + b`` on 2-D ``x`` with a hand-written backward.

    MindSpore's CPU kernels make the obvious choices slow: a broadcast ``Add`` of the bias costs 2x
    ``BiasAdd``, and ``BiasAdd``'s automatic gradient (``BiasAddGrad``) 2-3x a column sum. So: ``BiasAdd``
    forward, a column sum backward. (``bias`` is ignored when the layer has none.)"""

    def __init__(self, has_bias: bool = True) -> None:
        super().__init__()
        self.has_bias = has_bias
        self.matmul_nt = ops.MatMul(transpose_b=True)
        self.matmul_nn = ops.MatMul()
        self.matmul_tn = ops.MatMul(transpose_a=True)

    def construct(self, x, weight, bias):
        y = matmul_nt(x, weight, self.matmul_nt)
        return ops.bias_add(y, bias) if self.has_bias else y

    def bprop(self, x, weight, bias, out, dout):
        grad_b = dout.sum(0) if self.has_bias else ops.zeros_like(bias)
        return matmul_nn(dout, weight, self.matmul_nn), matmul_tn(dout, x, self.matmul_tn), grad_b


class IntegerLinear(nn.Cell):
    """``y = (x_q · W_qᵀ + b_q) / (S_W * S_x)`` on 2-D inputs; straight-through gradients backward.

    It takes the float32 ``x`` and ``weight`` *and* their integer tensors ``x_q`` / ``w_q`` (computed by
    the caller from stopped-gradient copies): the forward uses only the integers, the backward routes
    the gradients of ``y = FQ(x) · FQ(W)ᵀ + b`` to ``x``, ``weight`` and ``bias``, using ``x_q`` / ``w_q``
    again instead of re-quantizing (``FQ(W) = W_q / S_W``, and ``doutᵀ · FQ(x) = (doutᵀ · x_q) / S_x``).
    """

    def __init__(self, bias_qmax: int, has_bias: bool = True, per_channel: bool = False) -> None:
        super().__init__()
        self.bias_qmax, self.has_bias = bias_qmax, has_bias
        self.per_channel = per_channel  # s_w is one scale per output row, shape (out, 1)
        self.matmul_nt = ops.MatMul(transpose_b=True)
        self.matmul_nn = ops.MatMul()
        self.matmul_tn = ops.MatMul(transpose_a=True)

    def construct(self, x, weight, bias, x_q, w_q, s_x, s_w):
        s_b = s_w.reshape(-1) * s_x if self.per_channel else s_w * s_x
        acc = matmul_nt(x_q, w_q, self.matmul_nt)
        if self.has_bias:
            bias_q = clamp(ops.round(bias * s_b), float(self.bias_qmax))
            if cpu_kernels.ACTIVE is not None and not self.per_channel:  # one pass, the same bits
                return cpu_kernels.ACTIVE.dequantize(acc, bias_q, s_b)
            acc = ops.bias_add(acc, bias_q)  # not a broadcast Add: 2x faster
        return divide(acc, s_b)

    def bprop(self, x, weight, bias, x_q, w_q, s_x, s_w, out, dout):
        # FQ(W) = W_q / S_W and FQ(x) = x_q / S_x: each division is of a tensor of the weight's size (the
        # integer weight, the weight gradient), never of the batch's (rows, out), up to 30x larger
        grad_x = matmul_nn(dout, divide(w_q, s_w), self.matmul_nn)
        grad_w = divide(matmul_tn(dout, x_q, self.matmul_tn), s_x)
        grad_b = dout.sum(0) if self.has_bias else ops.zeros_like(bias)
        return grad_x, grad_w, grad_b, ops.zeros_like(x_q), ops.zeros_like(w_q), ops.zeros_like(s_x), \
            ops.zeros_like(s_w)


class QuantDense(Dense):
    """A :class:`Dense` with 8-bit weights and inputs and an int32 bias (Q8BERT), driven by a QuantSpec."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, has_bias: bool = True) -> None:
        super().__init__(in_features, out_features, has_bias)
        self.input_ema = Parameter(Tensor(np.float32(0.0), F32), name="input_ema", requires_grad=False)
        self.configure(spec)
        self.steps = Parameter(Tensor(0, ms.int32), name="steps", requires_grad=False)
        #: Data-parallel training (:func:`.parallel.sync_ranges`): the EMA takes the batch max|x| over all ranks.
        self.sync_ranges = False
        self.quant_phase = None  # see set_phase
        #: max|x| known by construction (the spec's ``tanh_range``: 1 for the classifier), replacing the EMA
        self.fixed_range = None

    def configure(self, spec: QuantSpec) -> None:
        """Take ``spec``'s quantization settings (before the cell's graph is compiled)."""
        self.qmax, self.start_step, self.decay = spec.qmax, spec.start_step, ema_constants(spec.ema_decay)
        self.q_weights, self.q_acts = spec.quantize_weights, spec.quantize_activations
        self.dq = spec.mode == "dq"
        self.integer = spec.quantize_weights and spec.quantize_activations and (spec.quantize_bias or not self.has_bias)
        self.per_channel, self.levels = spec.per_channel_weights, 2 * spec.qmax + 1
        self.int_linear = IntegerLinear(spec.bias_qmax, self.has_bias, self.per_channel)
        #: the asymmetric grid (spec.asymmetric): EMAs of min x and max x instead of max|x|
        self.asymmetric = spec.asymmetric
        if self.asymmetric and "input_min" not in self._params:
            self.input_min = Parameter(Tensor(np.float32(0.0), F32), name="input_min", requires_grad=False)
            self.input_max = Parameter(Tensor(np.float32(0.0), F32), name="input_max", requires_grad=False)

    @property
    def shares_input(self) -> bool:
        """Whether training can use :meth:`lead` / :meth:`follow` (QAT, fully quantized, symmetric)."""
        return self.integer and not self.dq and not self.asymmetric

    def construct(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out_shape = shape[:-1] + (self.out_features,)
        if self.dq and self.training:  # dq trains in float32 and counts nothing
            return self.dense(x2, self.weight).reshape(out_shape)
        if self.training and self.quant_phase == "delay":  # compiled for the delay: float32, the step counted
            ops.assign(self.steps, self.steps + 1)
            return self.dense(x2, self.weight).reshape(out_shape)
        if self.asymmetric:
            lo, hi = min_max(x2)
            if self.training:
                lo, hi = self._track_range(lo, hi)
            elif not self.dq:  # inference: the stored EMAs, or the batch's own range before any quantized step
                ready = self.steps > self.start_step
                lo, hi = ops.select(ready, self.input_min, lo), ops.select(ready, self.input_max, hi)
            s_x, zero_point = asymmetric_params(lo, hi, self.levels)
            x_q = quantize_centred(ops.stop_gradient(x2), s_x, zero_point, self.levels)
            return self._delayed(x2, self._quantized(x2, x_q, s_x)).reshape(out_shape)
        batch_max = max_abs(x2)
        if self.training:
            threshold = self._track(batch_max)
        elif self.dq:
            threshold = batch_max
        else:  # inference: the stored EMA, or the batch's own max before any quantized training step
            threshold = ops.select(self.steps > self.start_step, self.input_ema, batch_max)
        s_x = get_scale(threshold, self.qmax)
        y = self._quantized(x2, quantize(ops.stop_gradient(x2), s_x, self.qmax), s_x)
        return self._delayed(x2, y).reshape(out_shape)

    def lead(self, x2: Tensor):
        """Training forward of the first of several layers that read the same 2-D input ``x2`` (attention's
        query, key and value): ``(y, x_q, S_x, EMA)``, for :meth:`follow` to reuse the integer input."""
        threshold = self._track(max_abs(x2))
        s_x = get_scale(threshold, self.qmax)
        x_q = quantize(ops.stop_gradient(x2), s_x, self.qmax)
        return self._delayed(x2, self._integer(x2, x_q, s_x)), x_q, s_x, threshold

    def follow(self, x2: Tensor, x_q: Tensor, s_x: Tensor, ema: Tensor) -> Tensor:
        """Training forward on the leader's input: this layer counts its step and takes the leader's EMA
        -- the same value it would compute, as it sees the same batches -- and its integer input."""
        ops.assign(self.steps, self.steps + 1)
        ops.assign(self.input_ema, ema)
        return self._delayed(x2, self._integer(x2, x_q, s_x))

    def _track(self, batch_max: Tensor) -> Tensor:
        """Training: count the step, update the EMA of max|x| (the first quantized step sets it); the EMA."""
        if self.sync_ranges:
            batch_max = all_ranks_max(batch_max)
        steps = self.steps + 1
        ops.assign(self.steps, steps)
        return self._update(self.input_ema, batch_max, steps, self.fixed_range)

    def _track_range(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_track` on the asymmetric grid: the EMAs of min x and of max x."""
        if self.sync_ranges:
            lo, hi = -all_ranks_max(-lo), all_ranks_max(hi)
        steps = self.steps + 1
        ops.assign(self.steps, steps)
        fixed = self.fixed_range
        return (self._update(self.input_min, lo, steps, None if fixed is None else -fixed),
                self._update(self.input_max, hi, steps, fixed))

    def _update(self, ema: Parameter, value: Tensor, steps: Tensor, fixed) -> Tensor:
        """One EMA step of ``ema`` at training step ``steps`` (none during the delay; the first quantized step
        sets it; ``fixed``: a range known by construction, set instead)."""
        if fixed is not None:
            new_ema = ops.select(steps > self.start_step, Tensor(np.float32(fixed), F32), ema)
        elif self.start_step:
            first = steps == self.start_step + 1
            new_ema = ops.select(first, value, ema_update(ema, value, self.decay))
            new_ema = ops.select(steps > self.start_step, new_ema, ema)
        else:
            new_ema = ops.select(steps == 1, value, ema_update(ema, value, self.decay))
        ops.assign(ema, new_ema)
        return new_ema

    def _delayed(self, x2: Tensor, y: Tensor) -> Tensor:
        """Training during the spec's start-step delay: the float32 layer instead."""
        if self.training and self.start_step and self.quant_phase is None:
            return ops.select(self.steps > self.start_step, y, self.dense(x2, self.weight))
        return y

    def _weight_grid(self) -> tuple[Tensor, Tensor]:
        """(W_q, S_W): one scale for the weight, or one per output row (shape (out, 1)) with per-channel
        weights (then without the fused kernel, whose scale is one number)."""
        if self.per_channel:
            s_w = get_scale(row_max_abs(self.weight), self.qmax).reshape(-1, 1)
            return round_half_even(ops.stop_gradient(self.weight) * s_w), s_w
        s_w = get_scale(max_abs(self.weight), self.qmax)
        return quantize(ops.stop_gradient(self.weight), s_w, self.qmax, bounded=True), s_w

    def _integer(self, x2: Tensor, x_q: Tensor, s_x: Tensor) -> Tensor:
        w_q, s_w = self._weight_grid()
        bias = self.bias if self.has_bias else s_w
        return self.int_linear(x2, self.weight, bias, x_q, w_q, s_x, s_w)

    def _quantized(self, x2: Tensor, x_q: Tensor, s_x: Tensor) -> Tensor:
        """The layer on the input's integers ``x_q`` (minus the zero point on the asymmetric grid) and scale."""
        if self.integer:
            return self._integer(x2, x_q, s_x)
        # partial quantization: fake-quantize what the spec asks for, in float32
        if self.q_weights:
            w_q, s_w = self._weight_grid()
            weight = ste(self.weight, divide(w_q, s_w))
        else:
            weight = self.weight
        if self.q_acts:
            x2 = ste(x2, divide(x_q, s_x))
        return self.dense(x2, weight)


class FakeQuantSTE(nn.Cell):
    """FakeQuant(x) forward, identity gradient backward (a Cell bprop)."""

    def __init__(self, qmax: int) -> None:
        super().__init__()
        self.qmax = qmax

    def construct(self, x, scale):
        return fake_quantize(x, scale, self.qmax)

    def bprop(self, x, scale, out, dout):
        return dout, ops.zeros_like(scale)


class Embedding(nn.Cell):
    """Row lookup in ``weight`` (num, dim); rows of ``padding_idx`` get no gradient (as torch's)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.weight = Parameter(Tensor(np.zeros((num_embeddings, embedding_dim), np.float32)), name="weight")
        self.padding_idx = padding_idx
        self.gather = ops.Gather()

    def lookup(self, ids: Tensor) -> Tensor:
        rows = self.gather(self.weight, ids, 0)
        if self.padding_idx is not None:
            keep = ops.expand_dims(ids != self.padding_idx, -1)
            rows = ops.select(ops.broadcast_to(keep, rows.shape), rows, ops.stop_gradient(rows))
        return rows

    def construct(self, ids: Tensor) -> Tensor:
        return self.lookup(ids)


class QuantEmbedding(Embedding):
    """An :class:`Embedding` whose looked-up rows are fake-quantized with the whole table's scale."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec,
                 padding_idx: int | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.qmax, self.start_step = spec.qmax, spec.start_step
        self.dq = spec.mode == "dq"
        self.steps = Parameter(Tensor(0, ms.int32), name="steps", requires_grad=False)
        self.fake_quant = FakeQuantSTE(spec.qmax)
        # S_W of the table, refreshed before every training forward by :meth:`refresh_scale`
        # (outside the differentiated graph: computing it inside breaks MindSpore's dynamic-shape compiler)
        self.weight_scale = Parameter(Tensor(np.float32(1.0), F32), name="weight_scale", requires_grad=False)
        self.quant_phase = None  # see set_phase

    def refresh_scale(self):
        return ops.assign(self.weight_scale, get_scale(max_abs(self.weight), self.qmax))

    def construct(self, ids: Tensor) -> Tensor:
        rows = self.lookup(ids)
        if self.dq and self.training:
            return rows
        if self.training and self.quant_phase == "delay":
            ops.assign(self.steps, self.steps + 1)
            return rows
        scale = self.weight_scale if self.training else get_scale(max_abs(self.weight), self.qmax)
        quantized = self.fake_quant(rows, scale)
        if self.training:
            steps = self.steps + 1
            ops.assign(self.steps, steps)
            if self.start_step and self.quant_phase is None:
                quantized = ops.select(steps > self.start_step, quantized, rows)
        return quantized


def make_dense(in_features: int, out_features: int, spec: QuantSpec) -> Dense:
    """A quantized Dense when the spec quantizes weights or activations, else a float32 one."""
    if spec.quantized and (spec.quantize_weights or spec.quantize_activations):
        return QuantDense(in_features, out_features, spec)
    return Dense(in_features, out_features)


def make_embedding(num: int, dim: int, spec: QuantSpec, padding_idx: int | None = None) -> Embedding:
    if spec.quantized and spec.quantize_embeddings:
        return QuantEmbedding(num, dim, spec, padding_idx)
    return Embedding(num, dim, padding_idx)


def set_phase(model: nn.Cell, phase: str | None) -> None:
    """Compile the quantized cells' training forward for one side of the spec's ``start_step`` delay.

    ``None`` (the default): the graph chooses per step, from the cell's step counter, between the float32
    layer of the delay and the quantized one -- computing both, as a graph select evaluates both sides.
    ``"delay"``: float32 only, the step counted; ``"active"``: quantized only. A graph compiled with
    ``"delay"`` is correct only for steps up to ``start_step`` and one compiled with ``"active"`` only
    after them: the backend compiles one gradient step per phase and picks by its step count. (The
    attribute is ``quant_phase``: ``Cell.phase`` is MindSpore's own.)"""
    for _, cell in quantized_cells(model):
        cell.quant_phase = phase


def quantized_cells(model: nn.Cell) -> list[tuple[str, nn.Cell]]:
    """(name, cell) for every quantized cell, in model order."""
    return [(name, cell) for name, cell in model.cells_and_names() if isinstance(cell, (QuantDense, QuantEmbedding))]
