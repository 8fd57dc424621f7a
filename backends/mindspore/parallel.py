"""Data-parallel training for the MindSpore backend under ``msrun``: MindSpore's own collectives.

``msrun --worker_num N ... q8 run --backend mindspore ...`` starts N processes (workers) and a scheduler;
:func:`q8core.distributed.environment` reads each worker's rank from msrun's variables (``MS_ROLE``,
``MS_WORKER_NUM``, ``RANK_ID``, ``DEVICE_ID``) and :func:`join` joins the group with
``mindspore.communication.init()`` (``mccl`` on CPU, NCCL on GPU, HCCL on Ascend). Then:

- **Weights** start as rank 0 has them: :func:`replicate` broadcasts every Parameter of the model (weights,
  activation ranges, step counters) and the AdamW moments from rank 0, one tensor per broadcast, and hands
  every rank rank 0's dropout generator state. (MindSpore 2.10's CPU ``Broadcast`` of a *tuple* of tensors
  returns wrong values for all but the first one; its collectives take float32, so integer tensors travel
  as float32, exact below 2^24.)
- **Gradients**: the compiled gradient step of :func:`shard_step` multiplies each packed gradient (see
  :meth:`.optim.AdamW.pack`: a few stacks of 1-D gradients, then each matrix) by the rank's share of the
  global batch and sums them over ranks with ``AllReduce`` (SUM) -- the global batch's mean gradient,
  identical on every rank -- before the (replicated) clipping and AdamW update. The loss returned is the
  all-reduced weighted loss: the global batch's mean.
- **Activation ranges**: with :func:`sync_ranges` on, a quantized Dense takes the maximum of its batch
  max|x| over all ranks before each EMA update (:func:`all_ranks_max`), so every rank keeps the ranges a
  one-process run over the whole global batch would. MindSpore 2.10's CPU ``AllReduce`` reduces only with
  SUM ("AllReduce only support reduce sum on CPU, but got max"), so the maximum is an ``AllGather`` of the
  scalar followed by a local max: the same on every device.
- **Dropout** (:class:`.bert.DropoutMasks` with ``rank`` set): all ranks share one generator (rank 0's
  state, saved with a checkpoint); every step each rank draws the same key from it and its masks from a
  generator seeded by (key, rank): different masks on every rank, and a resumed data-parallel run draws
  exactly what the uninterrupted one drew on every rank.
- :func:`barrier` is an ``AllReduce`` of one float (the ``comm_func.barrier`` of 2.10 does not run on CPU)
  and :func:`broadcast_object` sends rank 0's JSON text as float32 bytes, length first.

Nothing here runs unless msrun started more than one worker; a one-process run never imports the
collectives.
"""

from __future__ import annotations

import json
import os

import numpy as np
from mindspore import Tensor, ops

from q8core.distributed import DistributedEnv
from q8core.errors import Q8Error, first_line

from . import device as devices

#: The collectives, built once the group exists (their constructors look the group up).
_SUM = None  # ops.AllReduce(): SUM over ranks
_GATHER = None  # ops.AllGather(): rank-ordered concatenation along axis 0


def joined() -> bool:
    """Whether this process has joined the group (:func:`join`)."""
    return _SUM is not None


def join(env: DistributedEnv, device: str) -> DistributedEnv:
    """Select ``device``, join msrun's group; ``env`` with the rank and local rank the group reports.

    In msrun's scheduler (``env.scheduler``), which runs the same command, serve the workers' rendezvous
    and end the process: MindSpore's ``init()`` does both there, returning only when the job is over."""
    global _SUM, _GATHER
    if env.launcher != "msrun":
        raise Q8Error(f"backend 'mindspore' trains data-parallel under msrun; {env.launcher} started this process "
                      f"(start it with msrun --worker_num {env.world_size} ...)")
    target = devices.select(device)
    from mindspore.communication import get_group_size, get_local_rank, get_rank, init
    from mindspore.communication.management import GlobalComm

    if env.scheduler:
        if env.world_size > 1:  # (one worker trains alone and never calls on the scheduler)
            try:
                init()
            except (RuntimeError, ValueError, TypeError) as exc:
                raise Q8Error(f"msrun scheduler: MindSpore could not form the cluster ({first_line(exc)})") \
                    from None
        raise SystemExit(0)
    if os.environ.get("MS_ROLE") != "MS_WORKER" and not os.environ.get("RANK_TABLE_FILE"):
        raise Q8Error(f"RANK_SIZE={env.world_size} but no msrun worker variables (MS_ROLE, MS_SCHED_HOST): "
                      f"start the processes with msrun")
    if not GlobalComm.INITED:
        try:
            init()
        except (RuntimeError, ValueError, TypeError) as exc:
            raise Q8Error(f"msrun: MindSpore on {target} could not join the process group ({first_line(exc)})") \
                from None
    rank, size = int(get_rank()), int(get_group_size())
    if size != env.world_size:
        raise Q8Error(f"msrun: the process group has {size} workers, the environment says {env.world_size}")
    if env.rank is not None and env.rank != rank:
        raise Q8Error(f"msrun: the process group made this worker rank {rank}, RANK_ID says {env.rank}")
    local = env.local_rank if env.local_rank is not None else int(get_local_rank())
    _SUM, _GATHER = ops.AllReduce(), ops.AllGather()
    return DistributedEnv(size, rank, local, "msrun")


def leave() -> None:
    """Forget the collectives and release the group (no-op when not joined)."""
    global _SUM, _GATHER
    if _SUM is None:
        return
    _SUM = _GATHER = None
    from mindspore.communication import release

    try:
        release()
    except RuntimeError:  # the process ends anyway; nothing to tidy that would change a result
        pass


def barrier() -> None:
    if _SUM is not None:
        _SUM(Tensor(np.zeros(1, np.float32))).asnumpy()


def broadcast_array(values: np.ndarray, src: int = 0) -> np.ndarray:
    """``values`` (any shape; its dtype must be exact in float32) as rank ``src`` has them, on every rank.
    Every rank passes an array of the same shape."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    out = ops.Broadcast(src)((Tensor(flat),))[0]
    return out.asnumpy().astype(values.dtype, copy=False).reshape(values.shape)


def broadcast_object(obj, src: int = 0):
    """``obj`` (JSON: tuples arrive as lists) as rank ``src`` has it, on every rank."""
    if _SUM is None:
        return obj
    from mindspore.communication import get_rank

    payload = np.frombuffer(json.dumps(obj).encode(), np.uint8) if get_rank() == src else np.zeros(0, np.uint8)
    length = int(broadcast_array(np.array([payload.size], np.int64), src)[0])
    if length > 1 << 24:
        raise Q8Error(f"broadcast_object: {length} bytes is not a small value")
    if payload.size != length:
        payload = np.zeros(length, np.uint8)
    return json.loads(broadcast_array(payload, src).tobytes().decode()) if length else None


def replicate(backend) -> None:
    """Rank 0's model Parameters, AdamW moments and dropout generator state on every rank."""
    params = list(backend.model.get_parameters())
    if backend.optimizer is not None:
        params += list(backend.optimizer.exp_avg) + list(backend.optimizer.exp_avg_sq)
    for param in params:
        value = param.asnumpy()
        if value.dtype != np.float32 and value.size and np.abs(value).max() >= 1 << 24:
            raise Q8Error(f"{param.name}: values too large to broadcast exactly as float32")
        param.set_data(Tensor(broadcast_array(value), param.dtype))
    backend.dropout.state = broadcast_object(backend.dropout.state)


def all_ranks_max(x: Tensor) -> Tensor:
    """The maximum of the scalar ``x`` over all ranks (no gradient); used inside compiled graphs."""
    return ops.stop_gradient(_GATHER(ops.stop_gradient(x).reshape(1)).max())


def all_ranks_sum(x: Tensor) -> Tensor:
    return _SUM(x)


def sync_ranges(model, enabled: bool = True) -> None:
    """Make every quantized Dense of ``model`` take the all-rank batch max|x| in its EMA updates (or not).
    Takes effect in graphs compiled afterwards."""
    from .quantization import QuantDense

    for _, cell in model.cells_and_names():
        if isinstance(cell, QuantDense):
            cell.sync_ranges = bool(enabled)


def shard_step(grad_step):
    """The data-parallel gradient step around ``grad_step`` (features, labels, masks -> loss, packed
    gradients): the same inputs plus the rank's ``weight`` (float32 scalar); returns the global batch's
    mean loss and the global mean gradients, both all-reduced."""

    def step(input_ids, attention_mask, token_type_ids, labels, hidden_masks, probs_masks, classifier_mask,
             weight):
        loss, packed = grad_step(input_ids, attention_mask, token_type_ids, labels, hidden_masks, probs_masks,
                                 classifier_mask)
        return all_ranks_sum(loss * weight), tuple(all_ranks_sum(g * weight) for g in packed)

    return step


def rank_device(device: str, env: DistributedEnv) -> str:
    """``gpu`` / ``ascend`` -> the device of this worker's local rank; ``cpu`` as it is."""
    kind, _, index = device.partition(":")
    if kind.lower() == "cpu" or env.scheduler:  # the scheduler builds no model: any device of the kind
        return kind
    if index:
        raise Q8Error(f"--device {device}: under msrun every worker takes the device of its local rank "
                      f"(DEVICE_ID); pass --device {kind}")
    if env.local_rank is None:
        raise Q8Error(f"--device {device}: msrun did not set DEVICE_ID, so this worker does not know its "
                      f"{kind}; set it per worker")
    return f"{kind}:{env.local_rank}"
