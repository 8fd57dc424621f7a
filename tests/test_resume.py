"""A run killed with SIGKILL and resumed ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import KILLER, run_q8



def _args(tiny_bert, data, out) -> list[str]:
    return ["run", "--task", "sst-2", "--model", str(tiny_bert), "--data-dir", str(data), "--output-dir", str(out),
            "--max-steps", "20", "--learning-rate", "3e-3", "--save-steps", "3", "--eval-steps", "8",
            "--logging-steps", "1", "--seed", "7", "--ema-decay", "0.9", "--quiet"]


def _train_log(run_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["learning_rate"], json.dumps(r.get("ema"), sort_keys=True))
            for r in records if r["type"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert, tmp_path_factory):
    from conftest import write_sst2
    import cli

    root = tmp_path_factory.mktemp("resume")
    data = write_sst2(root / "SST-2")
    try:
        cli.main(_args(tiny_bert, data, root / "a"))
    except SystemExit as exc:
        assert exc.code in (0, None)
    return data, root / "a"


def _killed_run(tiny_bert, data, out, kill_at: int) -> None:
    env = dict(os.environ, KILL_AT=str(kill_at))
    proc = subprocess.run([sys.executable, "-c", KILLER, *_args(tiny_bert, data, out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _assert_same_end(a: Path, b: Path) -> None:
    ra, rb = (json.loads((d / "eval_results.json").read_text()) for d in (a, b))
    assert ra["metrics"] == rb["metrics"] and (ra["best_step"], ra["best_metric"]) == (rb["best_step"], rb["best_metric"])
    last = f"checkpoint-{ra['step']}"
    for name in ("model.safetensors", "quant_state.safetensors"):
        assert (a / last / name).read_bytes() == (b / last / name).read_bytes(), name
    assert _train_log(a) == _train_log(b)  # every logged loss, learning rate and EMA range


def test_killed_and_resumed_run_ends_exactly_like_the_uninterrupted_one(uninterrupted, tiny_bert, tmp_path, capsys):
    data, a = uninterrupted
    b = tmp_path / "b"
    _killed_run(tiny_bert, data, b, kill_at=13)
    assert not (b / "eval_results.json").exists()
    code, _, err = run_q8(["run", "--resume", str(b), "--quiet"], capsys)
    assert code == 0, err
    assert "resuming" in err and "checkpoint-12" in err
    _assert_same_end(a, b)


def test_resume_falls_back_past_a_damaged_checkpoint(uninterrupted, tiny_bert, tmp_path, capsys):
    data, a = uninterrupted
    b = tmp_path / "b"
    _killed_run(tiny_bert, data, b, kill_at=19)  # kill inside the second epoch (16 steps each)
    newest = sorted(b.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated, as by a full disk
    code, _, err = run_q8(["run", "--resume", str(b), "--quiet"], capsys)
    assert code == 0, err
    assert f"skipping a damaged checkpoint: {weights}: truncated" in err
    _assert_same_end(a, b)


def test_resume_refuses_other_options_and_empty_folders(tmp_path, capsys):
    code, _, err = run_q8(["run", "--resume", str(tmp_path), "--epochs", "5"], capsys)
    assert code == 2 and err == (f"q8: error: --resume continues {tmp_path} with the settings in its "
                                 f"run_config.json; drop --epochs\n")
    code, _, err = run_q8(["run", "--resume", str(tmp_path)], capsys)
    assert code == 2 and err.startswith("q8: error: ") and "run_config.json" in err and err.count("\n") == 1
