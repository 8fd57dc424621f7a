"""Test helpers (import as ``from helpers import ...``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import cli


def run_q8(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the ``q8`` command in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        cli.main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err
