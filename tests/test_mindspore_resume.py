"""MindSpore backend: a run killed with SIGKILL and resumed ends exactly where the uninterrupted run ends.

Dropout is on (the tiny BERT's 0.1): its masks come from a seeded NumPy generator whose state travels with
the checkpoint, so the resumed run draws the masks the uninterrupted one drew, and every kernel on the CPU
is deterministic -- the comparison is exact, loss for loss and bit for bit in the final weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mindspore", reason="MindSpore not installed")

from helpers import KILLER, edited_bert, run_q8  # noqa: E402

PLUGINS = "torch,mindspore,glue"


def _args(tiny_bert, data, out) -> list[str]:
    # evaluation only at the end (each evaluation compiles the inference graph once per process)
    return ["run", "--backend", "mindspore", "--task", "sst-2", "--model", str(tiny_bert), "--data-dir", str(data),
            "--output-dir", str(out), "--max-steps", "10", "--train-batch-size", "32", "--max-seq-length", "16",
            "--learning-rate", "3e-3", "--save-steps", "3", "--eval-steps", "10", "--logging-steps", "1",
            "--seed", "7", "--ema-decay", "0.9", "--quiet"]


def _train_log(run_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["learning_rate"], json.dumps(r.get("ema"), sort_keys=True))
            for r in records if r["type"] == "train"]


def _weights(checkpoint: Path) -> dict[str, np.ndarray]:
    import mindspore as ms

    return {name: value.asnumpy() for name, value in ms.load_checkpoint(str(checkpoint / "model.ckpt")).items()}


@pytest.fixture
def one_layer_bert(tiny_bert, tmp_path):
    """The tiny BERT cut to its first layer: half the graph, half the compile time of each of the three runs."""
    return edited_bert(tiny_bert, tmp_path / "one-layer-bert", num_hidden_layers=1)


def test_killed_and_resumed_mindspore_run_ends_exactly_like_the_uninterrupted_one(one_layer_bert, sst2_dir, tmp_path,
                                                                                   capsys, monkeypatch):
    monkeypatch.setenv("Q8_PLUGINS", PLUGINS)
    a, b = tmp_path / "a", tmp_path / "b"
    # the run to be killed goes in a subprocess while this process runs the uninterrupted one
    killed = subprocess.Popen([sys.executable, "-c", KILLER, *_args(one_layer_bert, sst2_dir, b)],
                              env=dict(os.environ, KILL_AT="7"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    code, _, err = run_q8(_args(one_layer_bert, sst2_dir, a), capsys)
    assert code == 0, err
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, stderr[-2000:]
    assert not (b / "eval_results.json").exists() and (b / "checkpoint-6").is_dir()

    code, _, err = run_q8(["run", "--resume", str(b), "--quiet"], capsys)
    assert code == 0, err
    assert "resuming" in err and "checkpoint-6" in err
    ra, rb = (json.loads((d / "eval_results.json").read_text()) for d in (a, b))
    assert ra["metrics"] == rb["metrics"] and (ra["best_step"], ra["best_metric"]) == (rb["best_step"], rb["best_metric"])
    assert _train_log(a) == _train_log(b)  # every logged loss, learning rate and EMA range
    wa, wb = _weights(a / "checkpoint-10"), _weights(b / "checkpoint-10")
    assert wa.keys() == wb.keys()
    for name in wa:  # weights, EMA ranges and step counters, bit for bit
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
    state = b / "checkpoint-6" / "training_state.safetensors"
    assert state.is_file() and "training_state.safetensors" in json.loads(
        (b / "checkpoint-6" / "q8_checkpoint.json").read_text())["files"]
