"""AdamW, gradient clipping and the linear warm-up/decay schedule, step for step as PyTorch's.

:class:`AdamW` is ``torch.optim.AdamW`` (decoupled weight decay, bias correction, ``eps`` outside the
square root)::

    p <- p * (1 - lr * wd)                       (decay group only)
    m <- m + (1 - beta1) * (g - m)               (torch's lerp)
    v <- beta2 * v + (1 - beta2) * g * g
    p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The per-step scalars (lr, 1 - lr*wd, lr / bias_correction1, sqrt(bias_correction2)) are computed in
Python (float64, as torch's fused kernel does) and passed in as float32 tensors, so a compiled update
never recompiles. :func:`clip_by_global_norm` is ``torch.nn.utils.clip_grad_norm_``: the global L2 norm
over all gradients, scaled by ``max_norm / (norm + 1e-6)`` when that is below 1.
"""

from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

F32 = ms.float32


def no_weight_decay(name: str) -> bool:
    """The torch backend's groups: no decay for biases and LayerNorm parameters."""
    return name.endswith("bias") or "LayerNorm" in name


def linear_schedule(step: int, warmup_steps: int, total_steps: int) -> float:
    """transformers.get_linear_schedule_with_warmup's multiplier for the step about to run."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def clip_by_global_norm(grads: tuple, max_norm: float) -> tuple:
    """Scale all gradients by min(1, max_norm / (global_norm + 1e-6)), as clip_grad_norm_."""
    norms = ops.stack([ops.sqrt((g * g).sum()) for g in grads])
    total = ops.sqrt((norms * norms).sum())
    coef = ops.minimum(max_norm / (total + 1e-6), 1.0)
    return tuple(g * coef for g in grads)


class AdamW(nn.Cell):
    """torch.optim.AdamW over ``params``; ``decay[i]`` says whether params[i] takes weight decay."""

    def __init__(self, params: list[Parameter], decay: list[bool], *, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(params)
        self.exp_avg = ParameterTuple([Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"adam_m.{p.name}",
                                                 requires_grad=False) for p in params])
        self.exp_avg_sq = ParameterTuple([Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"adam_v.{p.name}",
                                                    requires_grad=False) for p in params])
        self.decay = tuple(bool(d) for d in decay)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.one_minus_beta1 = Tensor(np.float32(1.0 - self.beta1), F32)
        self.beta2_t = Tensor(np.float32(self.beta2), F32)
        self.one_minus_beta2 = Tensor(np.float32(1.0 - self.beta2), F32)
        self.eps = Tensor(np.float32(eps), F32)
        self.step_count = 0

    def scalars(self, lr: float, weight_decay: float) -> tuple[Tensor, Tensor, Tensor]:
        """Count the step; the float32 scalars ``construct`` takes for it."""
        self.step_count += 1
        t = self.step_count
        bias_correction1 = 1.0 - self.beta1 ** t
        bias_correction2 = 1.0 - self.beta2 ** t
        return (Tensor(np.float32(1.0 - lr * weight_decay), F32), Tensor(np.float32(lr / bias_correction1), F32),
                Tensor(np.float32(math.sqrt(bias_correction2)), F32))

    def construct(self, grads, decay_factor, step_size, bias_correction2_sqrt):
        for i in range(len(self.decay)):
            param, grad = self.params[i], grads[i]
            m, v = self.exp_avg[i], self.exp_avg_sq[i]
            p = param * decay_factor if self.decay[i] else param
            m_new = m + self.one_minus_beta1 * (grad - m)
            v_new = self.beta2_t * v + self.one_minus_beta2 * (grad * grad)
            denom = ops.sqrt(v_new) / bias_correction2_sqrt + self.eps
            ops.assign(m, m_new)
            ops.assign(v, v_new)
            ops.assign(param, p - step_size * m_new / denom)
        return decay_factor
