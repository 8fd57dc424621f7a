"""``--device cpu|gpu[:N]|ascend[:N]`` -> ``mindspore.set_device``, with one-line errors.

Availability is read from what ``import mindspore`` already found (the plugins of this MindSpore
package), through ``mindspore.device_context.<kind>.is_available()`` with MindSpore's own warning
logger muted, so asking about an absent GPU neither crashes nor prints a page of plugin errors.

CPU kernel threads: MindSpore's default pool has 25 threads whatever the machine. On a small one that
costs far more than it gains: every kernel launch wakes the pool, and on the 2-core CPU these numbers come
from no kernel ran faster with 2 threads than with 1 (MatMul and element-wise alike), while the tiny
test model's optimizer step went from 25 ms to 5 ms and a MiniLM QAT step from 0.8-1.2 s to 0.7 s with a
pool of 1. :func:`select` therefore sizes the pool to half the CPUs (at least 1) unless the process
already chose (``mindspore.device_context.cpu.op_tuning.threads_num``) or ``Q8_MS_THREADS`` says.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from q8core.errors import Q8Error

TARGETS = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "ascend": "Ascend", "npu": "Ascend"}
THREADS_ENV = "Q8_MS_THREADS"
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


#: MindSpore's on-disk graph cache. In 2.10 it hands back a graph compiled for another configuration of the
#: same source -- measured: a QAT run with a quantization delay got the cached graph of one without, and
#: trained on with losses of 36 instead of 0.68 -- so a run with it on could silently be wrong.
COMPILE_CACHE_ENV = "MS_COMPILER_CACHE_ENABLE"


def select(device: str) -> str:
    """Check ``device`` and make it MindSpore's device for this process (once: it cannot change)."""
    global _current
    import os

    if os.environ.get(COMPILE_CACHE_ENV, "").strip() not in ("", "0"):
        raise Q8Error(f"{COMPILE_CACHE_ENV}={os.environ[COMPILE_CACHE_ENV]}: MindSpore's compile cache can reuse a "
                      f"graph compiled for another model or quantization setting (wrong results); unset it")
    target, index = check(device)
    if _current is None:
        import mindspore as ms

        try:
            ms.set_device(target, index)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Q8Error(f"--device {device}: MindSpore cannot use it ({first})") from None
        _current = (target, index)
        _size_kernel_pool()
    elif _current != (target, index):
        raise Q8Error(f"--device {device}: this process already runs MindSpore on "
                      f"{_current[0]}:{_current[1]} (one device per process)")
    return target


def kernel_threads() -> int:
    """The CPU kernel thread count to use: ``Q8_MS_THREADS``, else half the CPUs (at least 1)."""
    import os

    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise Q8Error(f"{THREADS_ENV}={value!r}: expected a positive integer")
        return int(value)
    return max(1, (os.cpu_count() or 1) // 2)


def _size_kernel_pool() -> None:
    """Size MindSpore's CPU kernel pool (once per process; a choice the process already made stands)."""
    threads = kernel_threads()
    try:
        from mindspore._c_expression import RuntimeConf

        if RuntimeConf.get_instance().is_op_threads_num_configured():
            return
        import mindspore as ms

        ms.device_context.cpu.op_tuning.threads_num(threads)
    except (ImportError, AttributeError, RuntimeError):  # another MindSpore version: keep its default
        pass
