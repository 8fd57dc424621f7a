"""Test helpers (import as ``from helpers import ...``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

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


#: ``python -c KILLER q8-args...``: the q8 command, SIGKILLed at the end of step ``$KILL_AT`` (resume tests).
KILLER = textwrap.dedent("""
    import os, signal, sys
    import cli
    from q8core import plugins
    from q8core.hookspecs import hookimpl

    class Killer:
        @hookimpl
        def on_step_end(self, trainer, step, logs):
            if step == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)

    load = plugins.load_registry
    cli.load_registry = lambda: load(extra_plugins=(Killer(),))
    cli.main(sys.argv[1:])
""")


def edited_bert(source: Path, folder: Path, **config) -> Path:
    """A copy of the model folder ``source`` in ``folder`` with ``config.json`` fields changed (e.g. one layer:
    half the graph, half a MindSpore compile)."""
    shutil.copytree(source, folder)
    values = json.loads((folder / "config.json").read_text())
    values.update(config)
    (folder / "config.json").write_text(json.dumps(values))
    return folder


def records(run_dir: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(ddp: Path, one: Path, *, loss_atol: float, ema_rtol: float) -> None:
    """A data-parallel run folder holds what the one-process run's holds: the same records (losses and EMA
    ranges within the tolerances, no line twice: only rank 0 writes) and the same files."""
    import pytest

    log_a, log_b = records(ddp), records(one)
    assert [(r["type"], r["step"]) for r in log_a] == [(r["type"], r["step"]) for r in log_b]
    for a, b in zip(log_a, log_b):
        if a["type"] == "train":
            assert a["loss"] == pytest.approx(b["loss"], abs=loss_atol) and a["learning_rate"] == b["learning_rate"]
            assert a["ema"].keys() == b["ema"].keys()
            for name in b["ema"]:
                assert a["ema"][name] == pytest.approx(b["ema"][name], rel=ema_rtol), name
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in one.iterdir())
    for checkpoint in one.glob("checkpoint-*"):
        assert sorted(p.name for p in (ddp / checkpoint.name).iterdir()) == sorted(p.name for p in checkpoint.iterdir())
    assert json.loads((ddp / "trainer_state.json").read_text())["world_size"] == 2
