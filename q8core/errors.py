"""The one exception type a user ever sees.

Anything the user can fix (a bad path, a malformed TSV row, an unknown task) raises
:class:`Q8Error` with a one-line message that names the problem and where it is. The CLI
prints it as ``q8: error: <message>`` on stderr and exits with status 2; every other
exception is a bug and keeps its traceback.
"""

import os


class Q8Error(Exception):
    """A user-facing error: one line, says what is wrong and where."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_error(source: str, exc: BaseException) -> Q8Error:
    """One line for a pretrained model or tokenizer that did not load from ``source``.

    A local folder is named with the cause; a hub id that could not be fetched gets the way out:
    a local copy through ``--model``.
    """
    from pathlib import Path

    if Path(source).exists():
        return Q8Error(f"cannot load a model from {source}: {first_line(exc)}")
    if isinstance(exc, (OSError, ConnectionError)):
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        reason = "offline: HF_HUB_OFFLINE is set" if offline else "not cached here; the hub is unreachable or lacks it"
        return Q8Error(f"cannot load {source!r} from the Hugging Face hub ({reason}); "
                       f"pass --model with a local BERT folder (config.json, weights, vocab)")
    return Q8Error(f"cannot load a model from {source}: {first_line(exc)}")
