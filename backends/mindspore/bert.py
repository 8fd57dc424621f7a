"""BERT for sequence classification in MindSpore, built from a Hugging Face ``config.json``.

The cells sit at the attribute paths of transformers' ``BertForSequenceClassification``, so
``parameters_and_names()`` yields the Hugging Face state-dict keys one to one
(``bert.embeddings.word_embeddings.weight``, ``bert.encoder.layer.0.attention.self.query.weight``,
``bert.encoder.layer.0.attention.output.LayerNorm.weight``, ``bert.pooler.dense.weight``,
``classifier.weight``, ...). Quantized cells add non-trainable ``input_ema`` / ``steps`` Parameters
beside them. Every Dense and Embedding comes from :mod:`.quantization` per the QuantSpec; LayerNorm,
GELU (exact erf), Softmax and the two attention matmuls stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from q8core.errors import Q8Error
from q8core.spec import QuantSpec

from . import cpu_kernels
from .quantization import QuantDense, make_dense, make_embedding

F32 = ms.float32
SQRT1_2 = float(np.float32(1.0 / np.sqrt(2.0)))
INV_SQRT_2PI = float(np.float32(1.0 / np.sqrt(2.0 * np.pi)))
MASK_VALUE = -1e9  # additive mask of padded keys: exp underflows to exactly 0


@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` this model uses (``raw`` keeps the rest)."""

    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    classifier_dropout: float | None = None
    num_labels: int = 2
    problem_type: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config.json") -> "BertConfig":
        if "vocab_size" not in data:
            raise Q8Error(f"{where}: not a BERT config (no vocab_size)")
        names = {f for f in cls.__dataclass_fields__ if f not in ("raw", "num_labels")}
        values = {k: data[k] for k in names if k in data}
        if "num_labels" in data:
            values["num_labels"] = int(data["num_labels"])
        elif isinstance(data.get("id2label"), dict):
            values["num_labels"] = len(data["id2label"])
        act = values.get("hidden_act", "gelu")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise Q8Error(f"{where}: hidden_act {act!r} is not supported by the MindSpore BERT")
        if values.get("hidden_size", 768) % values.get("num_attention_heads", 12):
            raise Q8Error(f"{where}: hidden_size is not a multiple of num_attention_heads")
        return cls(**values, raw=dict(data))

    @property
    def regression(self) -> bool:
        return self.problem_type == "regression" or (self.problem_type is None and self.num_labels == 1)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with ``weight`` and ``bias`` (float32, biased variance)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = Parameter(Tensor(np.ones((size,), np.float32)), name="weight")
        self.bias = Parameter(Tensor(np.zeros((size,), np.float32)), name="bias")
        self.norm = Normalize(eps)

    def construct(self, x):
        return self.norm(x, self.weight, self.bias)[0]


class Normalize(nn.Cell):
    """MindSpore's ``LayerNorm`` kernel forward (it also returns each row's mean and variance) and a
    hand-written backward from them: the CPU ``LayerNormGrad`` kernel is 2x slower than these
    element-wise ops and reductions (7.8 ms vs 4 ms per call on a MiniLM batch of 32). Where
    :mod:`.cpu_kernels` is loaded, both directions are fused row kernels instead (the broadcasting ops
    of the backward above cost about 4 ms each on a MiniLM batch of 32); they recompute each row's
    moments from ``x``, so the forward's other outputs are then just ``x``."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.eps_tensor = Tensor(np.float32(eps), F32)
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        self.row_mean = ops.ReduceMean(keep_dims=True)
        self.column_sum = ops.ReduceSum()
        self.unstack = ops.Unstack(0)

    def construct(self, x, weight, bias):
        if cpu_kernels.ACTIVE is not None:
            return cpu_kernels.ACTIVE.layer_norm(x, weight, bias, self.eps_tensor), x, x
        return self.norm(x, weight, bias)

    def bprop(self, x, weight, bias, out, dout):
        grad = dout[0]
        if cpu_kernels.ACTIVE is not None:
            kernels = cpu_kernels.ACTIVE
            rows = x.reshape(-1, x.shape[-1])
            grad_weight, grad_bias = self.unstack(
                kernels.layer_norm_param_grad(rows, grad.reshape(rows.shape), self.eps_tensor))
            return kernels.layer_norm_grad(x, weight, grad, self.eps_tensor), grad_weight, grad_bias
        rstd = ops.rsqrt(out[2] + self.eps)
        normed = (x - out[1]) * rstd
        scaled = grad * weight
        grad_x = (scaled - self.row_mean(scaled, -1) - normed * self.row_mean(scaled * normed, -1)) * rstd
        rows = grad.reshape(-1, grad.shape[-1])
        return grad_x, self.column_sum(rows * normed.reshape(rows.shape), 0), self.column_sum(rows, 0)


class MaskedSoftmax(nn.Cell):
    """Attention probabilities ``softmax(scores * scale + additive)`` over the keys, ``additive`` being the
    (batch, 1, 1, keys) padding mask. On the CPU with :mod:`.cpu_kernels` loaded, one fused row kernel
    each way (the broadcast scale-and-mask ops alone cost about 4 ms per layer on a MiniLM batch of 32);
    elsewhere MindSpore's ops and their automatic gradient."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.scale_tensor = Tensor(np.float32(scale), F32)
        self.fused = FusedMaskedSoftmax(self.scale_tensor)

    def construct(self, scores, additive):
        if cpu_kernels.ACTIVE is not None:
            return self.fused(scores, additive)
        return ops.softmax(scores * self.scale + additive, axis=-1)


class FusedMaskedSoftmax(nn.Cell):
    """:class:`MaskedSoftmax` through the CPU kernels, with their backward (the mask gets no gradient)."""

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.scale = scale

    def construct(self, scores, additive):
        return cpu_kernels.ACTIVE.masked_softmax(scores, additive, self.scale)

    def bprop(self, scores, additive, out, dout):
        return cpu_kernels.ACTIVE.softmax_grad(out, dout, self.scale), ops.zeros_like(additive)


class Gelu(nn.Cell):
    """Exact (erf) GELU, ``x * Phi(x)``, with a hand-written backward ``dy * (Phi(x) + x * phi(x))``.

    The forward also returns ``Phi(x)`` so the backward reuses it: MindSpore's CPU ``Erf`` is a slow
    scalar kernel, and the automatic backward of ``ops.gelu`` differentiates its expansion op by op.
    On the CPU both directions are single fused kernels where :mod:`.cpu_kernels` is loaded; the gradient
    kernel recomputes ``Phi(x)`` in its own pass, so the forward's second output is then just ``x``."""

    def construct(self, x):
        if cpu_kernels.ACTIVE is not None:
            return cpu_kernels.ACTIVE.gelu(x), x
        cdf = 0.5 * (1.0 + ops.erf(x * SQRT1_2))
        return x * cdf, cdf

    def bprop(self, x, out, dout):
        if cpu_kernels.ACTIVE is not None:
            return (cpu_kernels.ACTIVE.gelu_grad(x, dout[0]),)
        pdf = ops.exp(x * x * -0.5) * INV_SQRT_2PI
        return (dout[0] * (out[1] + x * pdf),)


class Activation(nn.Cell):
    """``hidden_act``: exact GELU (:class:`Gelu`), tanh-approximated GELU, or ReLU."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.gelu = Gelu()

    def construct(self, x):
        if self.name == "gelu":
            return self.gelu(x)[0]
        if self.name in ("gelu_new", "gelu_pytorch_tanh"):
            return ops.gelu(x, approximate="tanh")
        return ops.relu(x)


class Dropout(nn.Cell):
    """Dropout active only in training and only for p > 0: ``x * mask`` with a mask the backend drew on the
    host (:class:`DropoutMasks`), or MindSpore's own random dropout when the caller passes none."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p or 0.0)

    def construct(self, x, mask=None):
        if self.training and self.p > 0:
            if mask is None:
                return ops.dropout(x, p=self.p, training=True)
            return x * ops.stop_gradient(mask)
        return x


class DropoutMasks:
    """The training step's dropout masks, drawn on the host from a seeded NumPy generator.

    MindSpore's CPU random kernels keep their generator state inside the compiled kernel, where nothing
    can read or restore it, so a run that uses them can be neither repeated nor resumed exactly. Here
    every mask comes from one ``numpy.random.Generator`` (PCG64) seeded by the run's seed, whose state is
    a small JSON-able dict that travels with a checkpoint: same seed, same masks; a resumed run draws
    exactly the masks the uninterrupted run drew. A mask holds ``0`` (dropped) or ``1 / (1 - p)`` (kept,
    scaled as ``torch.nn.Dropout`` scales), so the graph applies it with one multiplication.

    ``draw(batch, seq)`` returns three float32 arrays (a ``(1,) * ndim`` placeholder where that dropout
    probability is 0): hidden-state masks ``(2 * layers + 1, batch, seq, hidden)`` -- index 0 after the
    embeddings, ``2i + 1`` after layer i's attention output, ``2i + 2`` after its feed-forward output --,
    attention-probability masks ``(layers, batch, heads, seq, seq)`` and the classifier's ``(batch, hidden)``.

    Data-parallel (``rank`` set, see :mod:`.parallel`): the generator is shared -- every rank holds rank 0's
    state -- and each draw takes one key from it and the masks from a generator seeded by (key, rank), so
    every rank drops other units while the saved state still resumes every rank exactly.
    """

    #: This process's rank in a data-parallel run; ``None`` in a one-process run.
    rank: int | None = None

    def __init__(self, config: BertConfig, seed: int) -> None:
        cls_p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.p = (float(config.hidden_dropout_prob or 0.0), float(config.attention_probs_dropout_prob or 0.0),
                  float(cls_p or 0.0))
        self.layers, self.heads, self.hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def active(self) -> tuple[bool, bool, bool]:
        return tuple(p > 0 for p in self.p)

    def draw(self, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shapes = ((2 * self.layers + 1, batch, seq, self.hidden), (self.layers, batch, self.heads, seq, seq),
                  (batch, self.hidden))
        rng = self.rng
        if self.rank is not None and any(self.active):
            key = int(self.rng.integers(0, 2 ** 63))
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence((key, self.rank))))
        return tuple(self._mask(rng, shape, p) if p > 0 else np.ones((1,) * len(shape), np.float32)
                     for shape, p in zip(shapes, self.p))

    @staticmethod
    def _mask(rng: np.random.Generator, shape, p: float) -> np.ndarray:
        draws = rng.random(shape, dtype=np.float32)  # in place: (draw >= p) * 1 / (1 - p), a third faster
        np.greater_equal(draws, np.float32(p), out=draws)
        draws *= np.float32(1.0 / (1.0 - p))
        return draws

    @property
    def state(self) -> dict:
        return self.rng.bit_generator.state

    @state.setter
    def state(self, value: dict) -> None:
        self.rng.bit_generator.state = value


class BertEmbeddings(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = make_embedding(config.vocab_size, h, spec, config.pad_token_id)
        self.position_embeddings = make_embedding(config.max_position_embeddings, h, spec)
        self.token_type_embeddings = make_embedding(config.type_vocab_size, h, spec)
        self.LayerNorm = LayerNorm(h, config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def construct(self, input_ids, token_type_ids, position_ids, mask=None):
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x), mask)


class BertSelfAttention(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.scaling = self.head_dim ** -0.5
        self.query = make_dense(h, h, spec)
        self.key = make_dense(h, h, spec)
        self.value = make_dense(h, h, spec)
        self.softmax = MaskedSoftmax(self.scaling)
        self.dropout = Dropout(config.attention_probs_dropout_prob)
        self.share_input()
        self.qk = ops.BatchMatMul(transpose_b=True)
        self.pv = ops.BatchMatMul()

    def share_input(self) -> None:
        """In QAT training the three projections quantize their common input once (QuantDense.lead/follow)
        when all three quantize it; call again after reconfiguring them."""
        self.shared_input = all(getattr(cell, "shares_input", False) for cell in (self.query, self.key, self.value))

    def _heads(self, x, b, s):
        return x.reshape(b, s, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, hidden, additive_mask, probs_mask=None):
        b, s, h = hidden.shape
        if self.training and self.shared_input and self.query.quant_phase != "delay":
            x2 = hidden.reshape(-1, h)
            query, x_q, s_x, ema = self.query.lead(x2)
            q = self._heads(query, b, s)
            k = self._heads(self.key.follow(x2, x_q, s_x, ema), b, s)
            v = self._heads(self.value.follow(x2, x_q, s_x, ema), b, s)
        else:
            q = self._heads(self.query(hidden), b, s)
            k = self._heads(self.key(hidden), b, s)
            v = self._heads(self.value(hidden), b, s)
        probs = self.dropout(self.softmax(self.qk(q, k), additive_mask), probs_mask)
        context = self.pv(probs, v).transpose(0, 2, 1, 3)
        return context.reshape(b, s, h)


class BertSelfOutput(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec, in_features: int) -> None:
        super().__init__()
        self.dense = make_dense(in_features, config.hidden_size, spec)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def construct(self, hidden, residual, mask=None):
        return self.LayerNorm(self.dropout(self.dense(hidden), mask) + residual)


class BertAttention(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, spec)
        self.output = BertSelfOutput(config, spec, config.hidden_size)

    def construct(self, hidden, additive_mask, probs_mask=None, mask=None):
        return self.output(self.self(hidden, additive_mask, probs_mask), hidden, mask)


class BertIntermediate(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        self.dense = make_dense(config.hidden_size, config.intermediate_size, spec)
        self.act = Activation(config.hidden_act)

    def construct(self, hidden):
        return self.act(self.dense(hidden))


class BertLayer(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        self.attention = BertAttention(config, spec)
        self.intermediate = BertIntermediate(config, spec)
        self.output = BertSelfOutput(config, spec, config.intermediate_size)  # BertOutput: same shape of cell

    def construct(self, hidden, additive_mask, probs_mask=None, attention_mask=None, output_mask=None):
        attended = self.attention(hidden, additive_mask, probs_mask, attention_mask)
        return self.output(self.intermediate(attended), attended, output_mask)


class BertEncoder(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        self.layer = nn.CellList([BertLayer(config, spec) for _ in range(config.num_hidden_layers)])
        self.num_layers = config.num_hidden_layers

    def construct(self, hidden, additive_mask, hidden_masks=None, probs_masks=None):
        for i in range(self.num_layers):
            probs_mask = None if probs_masks is None else probs_masks[i]
            attention_mask = None if hidden_masks is None else hidden_masks[2 * i + 1]
            output_mask = None if hidden_masks is None else hidden_masks[2 * i + 2]
            hidden = self.layer[i](hidden, additive_mask, probs_mask, attention_mask, output_mask)
        return hidden


class BertPooler(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        self.dense = make_dense(config.hidden_size, config.hidden_size, spec)

    def construct(self, hidden):
        return ops.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config, spec)
        self.encoder = BertEncoder(config, spec)
        self.pooler = BertPooler(config, spec)

    def construct(self, input_ids, attention_mask, token_type_ids, hidden_masks=None, probs_masks=None):
        seq = input_ids.shape[1]
        position_ids = ops.arange(seq, dtype=ms.int32).reshape(1, seq)
        additive = (1.0 - attention_mask.astype(F32)) * MASK_VALUE
        additive = additive.reshape(attention_mask.shape[0], 1, 1, seq)
        if hidden_masks is not None:  # unstack, not index: MindSpore's CPU StridedSlice is ~10x slower
            hidden_masks = ops.unstack(hidden_masks, 0)
        if probs_masks is not None:
            probs_masks = ops.unstack(probs_masks, 0)
        embedding_mask = None if hidden_masks is None else hidden_masks[0]
        hidden = self.embeddings(input_ids, token_type_ids, ops.broadcast_to(position_ids, input_ids.shape),
                                 embedding_mask)
        return self.pooler(self.encoder(hidden, additive, hidden_masks, probs_masks))


class BertForSequenceClassification(nn.Cell):
    """``construct(input_ids, attention_mask, token_type_ids)`` -> float32 logits (batch, num_labels).

    In training the three optional mask arguments are :meth:`DropoutMasks.draw`'s arrays (``None`` for a
    dropout that is off); without them an active dropout draws its own (non-reproducible) masks."""

    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.regression = config.regression
        self.bert = BertModel(config, spec)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(dropout)
        self.classifier = make_dense(config.hidden_size, config.num_labels, spec)
        if isinstance(self.classifier, QuantDense):  # it reads the pooler's tanh (spec.tanh_range)
            self.classifier.fixed_range = spec.fixed_range("classifier", "bert")
        if spec.quantized and (spec.float_inputs or spec.asymmetric_inputs):  # each quantized Dense: its layer's spec
            dense = [(name, cell) for name, cell in self.cells_and_names() if isinstance(cell, QuantDense)]
            spec.check_float_inputs([name for name, _ in dense])
            for name, cell in dense:
                cell.configure(spec.for_layer(name))
                if cell.asymmetric:  # range Parameters made now, after the cell took its place: name them
                    cell.input_min.name, cell.input_max.name = f"{name}.input_min", f"{name}.input_max"
            for _, cell in self.cells_and_names():  # after the Q/K/V cells are configured
                if isinstance(cell, BertSelfAttention):
                    cell.share_input()

    def construct(self, input_ids, attention_mask, token_type_ids, hidden_masks=None, probs_masks=None,
                  classifier_mask=None):
        pooled = self.bert(input_ids, attention_mask, token_type_ids, hidden_masks, probs_masks)
        return self.classifier(self.dropout(pooled, classifier_mask))

    def loss(self, logits, labels):
        """MSE for regression (one output), mean cross-entropy otherwise (as transformers)."""
        if self.regression:
            diff = logits.reshape(-1) - labels.astype(F32).reshape(-1)
            return (diff * diff).mean()
        return ops.cross_entropy(logits, labels.astype(ms.int32), reduction="mean")


class LossCell(nn.Cell):
    """model + loss: ``construct(input_ids, attention_mask, token_type_ids, labels)`` -> (loss, logits)."""

    def __init__(self, model: BertForSequenceClassification) -> None:
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, attention_mask, token_type_ids, labels, hidden_masks=None, probs_masks=None,
                  classifier_mask=None):
        logits = self.model(input_ids, attention_mask, token_type_ids, hidden_masks, probs_masks, classifier_mask)
        return self.model.loss(logits, labels), logits


def hf_parameter_names(model: nn.Cell) -> list[str]:
    """The model's trainable parameters: exactly the Hugging Face state-dict keys."""
    return [name for name, param in model.parameters_and_names() if param.requires_grad]


__all__ = ["BertConfig", "BertForSequenceClassification", "DropoutMasks", "LossCell", "LayerNorm", "hf_parameter_names"]
