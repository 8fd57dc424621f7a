"""Data-parallel training, the backend-neutral half: which process am I, and which rows are mine.

A launcher starts one process per device: ``torchrun`` for the PyTorch backend, ``msrun`` for
MindSpore. Each process runs the ordinary ``q8 run`` command; :func:`environment` reads its rank
and the world size from the variables the launcher sets, and the backend joins its framework's
process group (:meth:`q8core.backend.Backend.init_distributed`).

The trainer keeps one seeded global data order, exactly as a one-process run draws it: with
``W`` processes and ``--train-batch-size B`` each step takes the next global batch of ``W * B``
rows (cut to the longest row of the *global* batch), and rank ``r`` trains on its contiguous slice
(:func:`shard`). The backend weights each rank's mean loss by the rank's share of the global batch
(``weight``), so the averaged gradient is the global batch's mean gradient even when the last batch
of an epoch splits unevenly: a ``W``-process run is a one-process run with batch ``W * B``, up to
the order of float reductions.

Nothing here imports a deep-learning framework.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .errors import Q8Error


@dataclass(frozen=True)
class DistributedEnv:
    """This process's place in a data-parallel run; the default is a single process."""

    world_size: int = 1
    #: Global rank, 0 .. world_size - 1. ``None`` when the launcher assigns it only as the process
    #: joins the group (msrun across machines without ``--node_rank``): the backend's
    #: ``init_distributed`` returns the environment with it filled in.
    rank: int | None = 0
    #: Rank among the processes on this machine (picks the GPU: ``--device gpu`` is ``gpu:LOCAL_RANK``);
    #: ``None`` when the launcher does not say (the backend asks its framework).
    local_rank: int | None = 0
    #: Who started the process: ``"torchrun"``, ``"msrun"``, or ``None`` for a plain single process.
    launcher: str | None = None
    #: msrun's scheduler: msrun starts the same command once more with ``MS_ROLE=MS_SCHED``; that process
    #: trains nothing, it serves the workers' rendezvous (the backend's ``init_distributed``) and exits.
    scheduler: bool = False

    @property
    def enabled(self) -> bool:
        """More than one process (or msrun's scheduler): the trainer shards batches and only rank 0 writes."""
        return self.world_size > 1 or self.scheduler

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that evaluates and writes the run folder."""
        return self.rank == 0 or self.rank is None and not self.enabled


SINGLE = DistributedEnv()


def _int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise Q8Error(f"environment variable {name}={value!r} is not an integer") from None


def environment(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """Rank and world size from the launcher's environment variables.

    - ``torchrun`` (and other PyTorch launchers): ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``.
    - ``msrun`` / MindSpore dynamic cluster: ``MS_ROLE=MS_WORKER``, ``MS_WORKER_NUM`` (or ``RANK_SIZE``),
      ``RANK_ID`` (``MS_NODE_ID`` when it is an integer; msrun sets ``RANK_ID`` only after the cluster
      forms when it spans machines without ``--node_rank``: then the rank stays ``None`` for the
      backend to fill in). The older rank-table launch sets ``RANK_SIZE``, ``RANK_ID``, ``DEVICE_ID``.
      The local rank is ``DEVICE_ID`` when set, else ``None``: the MindSpore backend asks
      ``mindspore.communication.get_local_rank()`` once it has joined the group. (msrun 2.10 gives a
      worker ``MS_ROLE=MS_WORKER``, ``MS_WORKER_NUM``, ``RANK_SIZE``, ``RANK_ID``, ``MS_NODE_ID``,
      ``DEVICE_ID`` = its local rank, ``MS_SCHED_HOST`` and ``MS_SCHED_PORT``.)
    - ``MS_ROLE=MS_SCHED``: msrun's scheduler, which runs the same command (with ``RANK_SIZE`` and
      ``RANK_ID=0`` set too): an environment with ``scheduler=True`` and no rank, never rank 0.

    Without any of them (or with a world size of 1) it is :data:`SINGLE`.
    """
    environ = os.environ if environ is None else environ
    world = _int(environ, "WORLD_SIZE")
    if world is not None:
        rank, local = _int(environ, "RANK"), _int(environ, "LOCAL_RANK")
        env = DistributedEnv(world, 0 if rank is None else rank, 0 if local is None else local, "torchrun")
    elif environ.get("MS_ROLE") == "MS_SCHED":
        world = _int(environ, "MS_WORKER_NUM") or _int(environ, "RANK_SIZE") or 1
        return DistributedEnv(world, None, None, "msrun", scheduler=True)
    elif environ.get("MS_ROLE") == "MS_WORKER" or "RANK_SIZE" in environ:
        world = _int(environ, "MS_WORKER_NUM") or _int(environ, "RANK_SIZE")
        if world is None:
            raise Q8Error("MS_ROLE=MS_WORKER but neither MS_WORKER_NUM nor RANK_SIZE says how many workers run")
        rank = _int(environ, "RANK_ID")
        if rank is None and (environ.get("MS_NODE_ID") or "").isdigit():
            rank = int(environ["MS_NODE_ID"])
        env = DistributedEnv(world, rank, _int(environ, "DEVICE_ID"), "msrun")
    else:
        return SINGLE
    return check(env)


def check(env: DistributedEnv) -> DistributedEnv:
    """``env`` after checking its numbers fit together (one-line :class:`Q8Error` otherwise)."""
    if env.world_size < 1:
        raise Q8Error(f"{env.launcher}: world size {env.world_size} is not a positive number of processes")
    if env.world_size == 1:
        return SINGLE
    if env.rank is not None and not 0 <= env.rank < env.world_size:
        raise Q8Error(f"{env.launcher}: rank {env.rank} is outside 0..{env.world_size - 1}")
    if env.local_rank is not None and env.local_rank < 0:
        raise Q8Error(f"{env.launcher}: local rank {env.local_rank} is negative")
    return env


def shard_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a global batch of ``rows`` that ``rank`` trains on: contiguous
    slices in rank order, sizes differing by at most one (the first ``rows % world_size`` ranks
    take one more)."""
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(batch: dict[str, np.ndarray], rank: int, world_size: int) -> tuple[dict[str, np.ndarray], float]:
    """This rank's rows of a global ``batch`` and their ``weight``, the share of the global batch they
    are: the backend scales its mean loss by ``weight * world_size`` before the framework averages
    gradients over ranks, which makes the gradient the global batch's mean however it splits.

    A rank left without rows (a last batch of fewer rows than processes) still has to take part in
    every collective of the step; it gets the batch's first row as a stand-in with weight 0. That
    row is a real row of the global batch, so it leaves the all-rank maximum of every activation
    range (the EMA update) as it is.
    """
    rows = len(batch["labels"])
    start, stop = shard_bounds(rows, rank, world_size)
    if stop == start:
        start, stop, weight = 0, 1, 0.0
    else:
        weight = (stop - start) / rows
    return {name: np.ascontiguousarray(values[start:stop]) for name, values in batch.items()}, weight


def fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """A short hash of a tokenized data set: ranks compare theirs before training together."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(arrays):
        values = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{values.dtype}:{values.shape};".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()[:16]
