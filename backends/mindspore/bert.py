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

from .quantization import make_dense, make_embedding

F32 = ms.float32
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
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        return self.norm(x, self.weight, self.bias)[0]


def activation(name: str):
    if name == "gelu":
        return lambda x: ops.gelu(x, approximate="none")
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: ops.gelu(x, approximate="tanh")
    return ops.relu


class Dropout(nn.Cell):
    """Dropout active only in training and only for p > 0."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p or 0.0)

    def construct(self, x):
        if self.training and self.p > 0:
            return ops.dropout(x, p=self.p, training=True)
        return x


class BertEmbeddings(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = make_embedding(config.vocab_size, h, spec, config.pad_token_id)
        self.position_embeddings = make_embedding(config.max_position_embeddings, h, spec)
        self.token_type_embeddings = make_embedding(config.type_vocab_size, h, spec)
        self.LayerNorm = LayerNorm(h, config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def construct(self, input_ids, token_type_ids, position_ids):
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


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
        self.dropout = Dropout(config.attention_probs_dropout_prob)
        self.qk = ops.BatchMatMul(transpose_b=True)
        self.pv = ops.BatchMatMul()

    def _heads(self, x, b, s):
        return x.reshape(b, s, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, hidden, additive_mask):
        b, s, h = hidden.shape
        q = self._heads(self.query(hidden), b, s)
        k = self._heads(self.key(hidden), b, s)
        v = self._heads(self.value(hidden), b, s)
        scores = self.qk(q, k) * self.scaling + additive_mask
        probs = self.dropout(ops.softmax(scores, axis=-1))
        context = self.pv(probs, v).transpose(0, 2, 1, 3)
        return context.reshape(b, s, h)


class BertSelfOutput(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec, in_features: int) -> None:
        super().__init__()
        self.dense = make_dense(in_features, config.hidden_size, spec)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def construct(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, spec)
        self.output = BertSelfOutput(config, spec, config.hidden_size)

    def construct(self, hidden, additive_mask):
        return self.output(self.self(hidden, additive_mask), hidden)


class BertIntermediate(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        self.dense = make_dense(config.hidden_size, config.intermediate_size, spec)
        self.act = activation(config.hidden_act)

    def construct(self, hidden):
        return self.act(self.dense(hidden))


class BertLayer(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        self.attention = BertAttention(config, spec)
        self.intermediate = BertIntermediate(config, spec)
        self.output = BertSelfOutput(config, spec, config.intermediate_size)  # BertOutput: same shape of cell

    def construct(self, hidden, additive_mask):
        attended = self.attention(hidden, additive_mask)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Cell):
    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        self.layer = nn.CellList([BertLayer(config, spec) for _ in range(config.num_hidden_layers)])

    def construct(self, hidden, additive_mask):
        for layer in self.layer:
            hidden = layer(hidden, additive_mask)
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

    def construct(self, input_ids, attention_mask, token_type_ids):
        seq = input_ids.shape[1]
        position_ids = ops.arange(seq, dtype=ms.int32).reshape(1, seq)
        additive = (1.0 - attention_mask.astype(F32)) * MASK_VALUE
        additive = additive.reshape(attention_mask.shape[0], 1, 1, seq)
        hidden = self.embeddings(input_ids, token_type_ids, ops.broadcast_to(position_ids, input_ids.shape))
        return self.pooler(self.encoder(hidden, additive))


class BertForSequenceClassification(nn.Cell):
    """``construct(input_ids, attention_mask, token_type_ids)`` -> float32 logits (batch, num_labels)."""

    def __init__(self, config: BertConfig, spec: QuantSpec) -> None:
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.regression = config.regression
        self.bert = BertModel(config, spec)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(dropout)
        self.classifier = make_dense(config.hidden_size, config.num_labels, spec)

    def construct(self, input_ids, attention_mask, token_type_ids):
        return self.classifier(self.dropout(self.bert(input_ids, attention_mask, token_type_ids)))

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

    def construct(self, input_ids, attention_mask, token_type_ids, labels):
        logits = self.model(input_ids, attention_mask, token_type_ids)
        return self.model.loss(logits, labels), logits


def hf_parameter_names(model: nn.Cell) -> list[str]:
    """The model's trainable parameters: exactly the Hugging Face state-dict keys."""
    return [name for name, param in model.parameters_and_names() if param.requires_grad]


__all__ = ["BertConfig", "BertForSequenceClassification", "LossCell", "LayerNorm", "hf_parameter_names"]
