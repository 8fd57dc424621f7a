"""``--device cpu|gpu[:N]|ascend[:N]`` -> ``mindspore.set_device``, with one-line errors.

Availability is read from what ``import mindspore`` already found (the plugins of this MindSpore
package), through ``mindspore.device_context.<kind>.is_available()`` with MindSpore's own warning
logger muted, so asking about an absent GPU neither crashes nor prints a page of plugin errors.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from q8core.errors import Q8Error

TARGETS = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "ascend": "Ascend", "npu": "Ascend"}
_current: tuple[str, int] | None = None


def parse(device: str) -> tuple[str, int]:
    """``gpu:1`` -> ("GPU", 1); ``cpu`` -> ("CPU", 0)."""
    kind, _, index = device.lower().partition(":")
    if kind not in TARGETS or (index and not index.isdigit()):
        raise Q8Error(f"--device {device}: not one of cpu, gpu[:N], ascend[:N]")
    return TARGETS[kind], int(index) if index else 0


@contextmanager
def _quiet_mindspore():
    """Mute MindSpore's WARNING logger (it explains missing plugins at length)."""
    loggers = [logger for name, logger in logging.root.manager.loggerDict.items()
               if name.startswith("ME") and isinstance(logger, logging.Logger)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check(device: str) -> tuple[str, int]:
    """Raise Q8Error (one line) unless MindSpore can run on ``device`` here."""
    target, index = parse(device)
    if target == "CPU":
        return target, 0
    import mindspore as ms

    module = ms.device_context.gpu if target == "GPU" else ms.device_context.ascend
    with _quiet_mindspore():
        try:
            available = bool(module.is_available())
            count = int(module.device_count()) if available else 0
        except Exception:  # a broken driver reads as "not here"
            available, count = False, 0
    if not available:
        raise Q8Error(f"--device {device}: this MindSpore {ms.__version__} installation has no usable "
                      f"{target} backend on this machine")
    if index >= count:
        raise Q8Error(f"--device {device}: only {count} {target} device(s) here")
    return target, index


def select(device: str) -> str:
    """Check ``device`` and make it MindSpore's device for this process (once: it cannot change)."""
    global _current
    target, index = check(device)
    if _current is None:
        import mindspore as ms

        try:
            ms.set_device(target, index)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Q8Error(f"--device {device}: MindSpore cannot use it ({first})") from None
        _current = (target, index)
    elif _current != (target, index):
        raise Q8Error(f"--device {device}: this process already runs MindSpore on "
                      f"{_current[0]}:{_current[1]} (one device per process)")
    return target
