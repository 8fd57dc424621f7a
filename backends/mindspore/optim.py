"""AdamW, gradient clipping and the linear warm-up/decay schedule, step for step as PyTorch's.

:class:`AdamW` is ``torch.optim.AdamW`` (decoupled weight decay, bias correction, ``eps`` outside the
square root)::

    p <- p * (1 - lr * wd)                       (decay group only)
    m <- m + (1 - beta1) * (g - m)               (torch's lerp)
    v <- beta2 * v + (1 - beta2) * g * g
    p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The moment and parameter update is MindSpore's fused ``Adam`` kernel (one multi-threaded pass over
``p, m, v, g``; an unfused update took ~14 element-wise passes, 0.15 s per step on MiniLM's word
embedding alone) with bias-corrections folded into its two scalars: it computes
``p -= lr' * m / (sqrt(v) + eps')``, and with ``lr' = lr * sqrt(bc2) / bc1``, ``eps' = eps * sqrt(bc2)``
(and ``beta^t`` inputs 0, so it applies no correction of its own) that is torch's update exactly in real
arithmetic, within float32 rounding in practice. The per-step scalars are computed in Python (float64,
as torch's fused kernel does) and passed in as float32 tensors, so a compiled update never recompiles.

On the CPU, where :mod:`.cpu_kernels` is loaded, the whole update is instead one fused kernel per
parameter that follows torch's single-tensor AdamW step operation for operation (the clipping coefficient,
weight decay, both moments and the parameter, in one pass that updates ``p``, ``m`` and ``v`` in place),
and each gradient's sum of squares for the clipping norm is one kernel too: on MiniLM that replaces six
passes over every weight matrix, the 30522 x 384 word embedding included, by two.

Clipping is ``torch.nn.utils.clip_grad_norm_``: the global L2 norm over all gradients, which are scaled by
``max_norm / (norm + 1e-6)`` when that is below 1. Sums of squares are reduced over the last axis first:
MindSpore's CPU reductions over the last axis are vectorised and threaded, one over all axes at once is
4x slower on MiniLM's word-embedding gradient.
"""

from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from . import cpu_kernels

F32 = ms.float32


def no_weight_decay(name: str) -> bool:
    """The torch backend's groups: no decay for biases and LayerNorm parameters."""
    return name.endswith("bias") or "LayerNorm" in name


def linear_schedule(step: int, warmup_steps: int, total_steps: int) -> float:
    """transformers.get_linear_schedule_with_warmup's multiplier for the step about to run."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


class AdamW(nn.Cell):
    """torch.optim.AdamW over ``params``, with ``clip_grad_norm_(max_grad_norm)`` first (0: no clipping);
    ``decay[i]`` says whether params[i] takes weight decay.

    ``construct`` takes the gradients *packed* by :meth:`pack` (call it where the gradients are made, inside
    the compiled gradient step): the 1-D gradients (biases, LayerNorm) stacked by size into a few 2-D
    tensors, then each matrix gradient. Clipping then costs a few kernels per matrix instead of ~6 per
    parameter -- each kernel costs 15-30 us of dispatch on CPU whatever its size, and 64 of MiniLM's 105
    parameters are 1-D -- and the gradient hand-over between the two compiled steps moves 44 tensors, not
    105. (Stacked, not concatenated: splitting a concatenation back is one StridedSlice per piece, and
    that CPU kernel costs ~1 ms even for 384 floats; unstacking is one cheap kernel per stack.)
    """

    def __init__(self, params: list[Parameter], decay: list[bool], *, betas=(0.9, 0.999), eps: float = 1e-8,
                 max_grad_norm: float = 0.0) -> None:
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(params)
        self.exp_avg = ParameterTuple([Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"adam_m.{p.name}",
                                                 requires_grad=False) for p in params])
        self.exp_avg_sq = ParameterTuple([Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"adam_v.{p.name}",
                                                    requires_grad=False) for p in params])
        self.decay = tuple(bool(d) for d in decay)
        stacks: dict[int, list[int]] = {}
        for i, p in enumerate(params):
            if len(p.shape) <= 1:
                stacks.setdefault(int(np.prod(p.shape)), []).append(i)
        self.stacks = tuple(tuple(members) for members in stacks.values())  # 1-D parameters by size
        self.matrices = tuple(i for i, p in enumerate(params) if len(p.shape) > 1)
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self.beta1_t = Tensor(np.float32(self.beta1), F32)
        self.beta2_t = Tensor(np.float32(self.beta2), F32)
        self.no_correction = Tensor(np.float32(0.0), F32)  # beta^t inputs of the kernel: 0 = no correction
        self.adam = ops.Adam()
        self.one = Tensor(np.float32(1.0), F32)  # the fused kernels' clipping coefficient without clipping
        self.step_count = 0

    def pack(self, grads) -> tuple:
        """``grads`` (one per parameter, in order) -> (1-D stack 0, 1-D stack 1, ..., matrix 0, matrix 1, ...)."""
        stacked = tuple(ops.stack([grads[i].reshape(-1) for i in members]) for members in self.stacks)
        return stacked + tuple(grads[i] for i in self.matrices)

    def scalars(self, lr: float, weight_decay: float) -> tuple[Tensor, ...]:
        """Count the step; the float32 scalars ``construct`` takes for it.

        MindSpore's ``Adam`` kernel: ``1 - lr * wd``, the kernel's learning rate ``lr * sqrt(bc2) / bc1`` and
        its epsilon ``eps * sqrt(bc2)``. The fused CPU kernel: its ``hyper`` vector for the decay group and
        for the rest (see cpu_kernels.cc)."""
        self.step_count += 1
        t = self.step_count
        bias_correction1 = 1.0 - self.beta1 ** t
        bc2_sqrt = math.sqrt(1.0 - self.beta2 ** t)
        if cpu_kernels.ACTIVE is not None:
            common = [1.0 - self.beta1, self.beta2, 1.0 - self.beta2, bc2_sqrt, self.eps, -lr / bias_correction1]
            return (Tensor(np.array([1.0 - lr * weight_decay] + common, np.float32)),
                    Tensor(np.array([1.0] + common, np.float32)))
        return (Tensor(np.float32(1.0 - lr * weight_decay), F32),
                Tensor(np.float32(lr * bc2_sqrt / bias_correction1), F32),
                Tensor(np.float32(self.eps * bc2_sqrt), F32))

    def unpack(self, packed) -> list:
        """The gradients in parameter order from :meth:`pack`'s tuple."""
        grads = [None] * len(self.decay)
        for members, stack in zip(self.stacks, packed[:len(self.stacks)]):
            for i, g in zip(members, ops.unstack(stack, 0)):
                grads[i] = g.reshape(self.params[i].shape)
        for i, g in zip(self.matrices, packed[len(self.stacks):]):
            grads[i] = g
        return grads

    def construct(self, packed, *scalars):
        if cpu_kernels.ACTIVE is not None:
            return self.fused_update(packed, scalars[0], scalars[1])
        decay_factor, kernel_lr, kernel_eps = scalars
        if self.max_grad_norm > 0:
            # the global norm, as clip_grad_norm_: squares summed per row, then all together
            total = ops.sqrt(ops.concat([(g * g).reshape(-1, g.shape[-1]).sum(-1) for g in packed]).sum())
            coef = ops.minimum(self.max_grad_norm / (total + 1e-6), 1.0)
            # (not in place: Tensor.mul_ on a graph input compiles to a copy, a multiplication and an Assign)
            packed = tuple(g * coef for g in packed)
        grads = self.unpack(packed)
        zero = self.no_correction
        for i in range(len(self.decay)):
            param = self.params[i]
            if self.decay[i]:
                ops.assign(param, param * decay_factor)
            self.adam(param, self.exp_avg[i], self.exp_avg_sq[i], zero, zero, kernel_lr, self.beta1_t,
                      self.beta2_t, kernel_eps, grads[i])
        return decay_factor

    def fused_update(self, packed, hyper_decay, hyper_plain):
        """The update with the fused CPU kernels; returns the sum of their (zero) outputs, which the caller
        keeps so that the graph keeps the in-place updates."""
        kernels = cpu_kernels.ACTIVE
        coef = self.one
        if self.max_grad_norm > 0:
            total = ops.sqrt(ops.stack([kernels.sum_squares(g) for g in packed]).sum())
            coef = ops.minimum(self.max_grad_norm / (total + 1e-6), 1.0)
        grads = self.unpack(packed)
        done = []
        for i in range(len(self.decay)):
            done.append(kernels.adamw(self.params[i], self.exp_avg[i], self.exp_avg_sq[i], grads[i], coef,
                                      hyper_decay if self.decay[i] else hyper_plain))
        return ops.stack(done).sum()
