"""The ModelZoo's data-sink options, ``--enable-data-sink`` and ``--data-sink-steps``, on this backend.

In MindSpore, data sinking hands the dataset to the device, which then runs ``--data-sink-steps``
training steps per call from its own queue (``mindspore.data_sink``, ``Model.train(dataset_sink_mode=True,
sink_size=N)``). It exists on GPU and Ascend only: ``mindspore.data_sink`` raises on a CPU, and
``Model.train`` silently trains without it there, as it does in PyNative mode.

This backend feeds every step's batch to one compiled graph (``backend.py``): the trainer keeps its
per-step schedule (logging, evaluation, checkpoints, ``--resume`` at any step), and the same command
gives the same numbers on every device. The sink options are accepted so that a ModelZoo command line
moves over unchanged; they do not change the training, and one note says so. Device-side sinking on
GPU/Ascend, which would cut the per-step host round trip, is not implemented (no GPU or Ascend to
test it on).
"""

from __future__ import annotations

from q8core.errors import Q8Error


def check(options: dict) -> None:
    """One-line errors for values no device could use."""
    steps = options.get("data_sink_steps", 1)
    if steps < 1:
        raise Q8Error(f"--data-sink-steps {steps}: must be at least 1")


def note(options: dict, target: str) -> str | None:
    """What the sink options do on ``target`` (``"CPU"``, ``"GPU"``, ``"Ascend"``), or ``None`` when unset."""
    enabled, steps = bool(options.get("enable_data_sink")), int(options.get("data_sink_steps", 1))
    if not enabled:
        return f"--data-sink-steps {steps} has no effect without --enable-data-sink" if steps > 1 else None
    if target == "CPU":
        why = "MindSpore sinks data only on GPU and Ascend"
    else:
        why = "this backend feeds each step to its compiled graph and does not sink data yet"
    return f"--enable-data-sink: {why}; training step by step, with the same results"
