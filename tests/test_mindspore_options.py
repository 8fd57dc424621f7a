"""Settings of the MindSpore backend: the ModelZoo's data-sink options (declared through
``add_backend_options``, validated, stored with the run, and -- where MindSpore cannot sink (this CPU) --
one note and exactly the training the same command gives without them), and MindSpore's own compile
cache, which is refused."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mindspore", reason="MindSpore not installed")

from helpers import edited_bert, records, run_q8  # noqa: E402

PLUGINS = "torch,mindspore,glue"
CPU_NOTE = ("q8: note: --enable-data-sink: MindSpore sinks data only on GPU and Ascend; "
            "training step by step, with the same results")


@pytest.fixture
def one_layer_bert(tiny_bert, tmp_path):
    return edited_bert(tiny_bert, tmp_path / "one-layer-bert", num_hidden_layers=1)


def _run(model, data, out, *extra):
    return ["run", "--backend", "mindspore", "--task", "sst-2", "--model", str(model), "--data-dir", str(data),
            "--output-dir", str(out), "--max-steps", "4", "--train-batch-size", "32", "--max-seq-length", "16",
            "--learning-rate", "3e-3", "--eval-steps", "4", "--logging-steps", "1", "--seed", "3", "--quiet",
            *extra]


def _train_log(run_dir):
    return [(r["step"], r["loss"], json.dumps(r.get("ema"), sort_keys=True)) for r in records(run_dir)
            if r["type"] == "train"]


def test_sink_options_are_noted_stored_and_train_exactly_as_without(one_layer_bert, sst2_dir, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setenv("Q8_PLUGINS", PLUGINS)
    plain, sunk = tmp_path / "plain", tmp_path / "sunk"
    code, _, err = run_q8(_run(one_layer_bert, sst2_dir, plain), capsys)
    assert code == 0, err
    assert "data-sink" not in err
    code, _, err = run_q8(_run(one_layer_bert, sst2_dir, sunk, "--enable-data-sink", "--data-sink-steps", "2"), capsys)
    assert code == 0, err
    assert err.count(CPU_NOTE) == 1, err
    stored = json.loads((sunk / "run_config.json").read_text())["backend_options"]
    assert stored == {"enable_data_sink": True, "data_sink_steps": 2}
    manifest = json.loads((sunk / "checkpoint-4" / "q8_checkpoint.json").read_text())
    assert manifest["backend_options"] == stored
    assert json.loads((plain / "run_config.json").read_text())["backend_options"] == \
        {"enable_data_sink": False, "data_sink_steps": 1}
    a, b = (json.loads((d / "eval_results.json").read_text()) for d in (plain, sunk))
    assert a["metrics"] == b["metrics"] and a["best_metric"] == b["best_metric"]
    assert _train_log(plain) == _train_log(sunk) and len(_train_log(plain)) == 4


def test_sink_steps_without_sink_is_noted(one_layer_bert, sst2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("Q8_PLUGINS", PLUGINS)
    code, _, err = run_q8(_run(one_layer_bert, sst2_dir, tmp_path / "out", "--max-steps", "1", "--data-sink-steps",
                               "5"), capsys)
    assert code == 0, err
    assert "q8: note: --data-sink-steps 5 has no effect without --enable-data-sink" in err


@pytest.mark.parametrize("args, message", [
    (["--data-sink-steps", "0"], "q8: error: --data-sink-steps 0: must be at least 1"),
    (["--data-sink-steps", "many"], "'many' is not a valid integer"),
])
def test_bad_sink_steps_is_one_line_and_writes_nothing(one_layer_bert, sst2_dir, tmp_path, capsys, monkeypatch,
                                                       args, message):
    monkeypatch.setenv("Q8_PLUGINS", PLUGINS)
    out = tmp_path / "out"
    code, _, err = run_q8(_run(one_layer_bert, sst2_dir, out, *args), capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_sink_options_belong_to_mindspore(sst2_dir, tiny_bert, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("Q8_PLUGINS", PLUGINS)
    code, out, _ = run_q8(["run", "--help"], capsys)
    assert code == 0
    section = out[out.index("Options of backend mindspore"):]
    assert "--enable-data-sink / --no-enable-data-sink" in section and "--data-sink-steps" in section
    args = ["run", "--backend", "torch", "--task", "sst-2", "--model", str(tiny_bert), "--data-dir", str(sst2_dir),
            "--output-dir", str(tmp_path / "t"), "--enable-data-sink"]
    code, _, err = run_q8(args, capsys)
    assert code == 2 and "mindspore" in err and len(err.strip().splitlines()) == 1


def test_notes_by_device():
    from backends.mindspore import sink

    assert sink.note({"enable_data_sink": False, "data_sink_steps": 1}, "GPU") is None
    assert sink.note({"enable_data_sink": True, "data_sink_steps": 100}, "Ascend") == (
        "--enable-data-sink: this backend feeds each step to its compiled graph and does not sink data yet; "
        "training step by step, with the same results")


def test_mindspore_compile_cache_is_refused(tiny_bert, sst2_dir, tmp_path, capsys, monkeypatch):
    """MindSpore 2.10's compile cache reuses graphs across settings of the same code: refused in one line."""
    monkeypatch.setenv("Q8_PLUGINS", PLUGINS)
    monkeypatch.setenv("MS_COMPILER_CACHE_ENABLE", "1")
    out = tmp_path / "out"
    code, _, err = run_q8(_run(tiny_bert, sst2_dir, out), capsys)
    assert code == 2 and err.startswith("q8: error: MS_COMPILER_CACHE_ENABLE=1: MindSpore's compile cache") \
        and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
