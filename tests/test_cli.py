"""The ``q8`` command line: every bad input ends as one ``q8: error:`` line, exit 2, nothing written.

All commands run in-process (``cli.main``). Runs that should succeed are tiny (the session's
2-layer random BERT, a few steps); the ``q8 eval`` cases share one trained run and copy it
before damaging anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import traceback
from pathlib import Path

import pytest

import cli
from q8core import __version__
from q8core.errors import Q8Error
from q8core.plugins import load_registry

from conftest import write_sst2, write_stsb
from helpers import run_q8

TINY = ["--epochs", "1", "--train-batch-size", "16", "--learning-rate", "3e-3", "--quiet"]
FAST = ["--max-steps", "2", "--train-batch-size", "16", "--learning-rate", "3e-3", "--quiet"]


# -- helpers ------------------------------------------------------------------------------------
def q8(args: list[str], capsys) -> tuple[int, str, str]:
    """``run_q8``, except that an escaping exception is reported as the real process would show
    it (exit status 1, a traceback on stderr) instead of failing the test with it."""
    try:
        return run_q8(args, capsys)
    except Exception:  # a bug: the real `q8` would die with this traceback
        out, err = capsys.readouterr()
        return 1, out, err + traceback.format_exc()


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit 2 and exactly one stderr line ``q8: error: ...`` naming every one of ``needles``."""
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("q8: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def snapshot(path: Path) -> dict[str, str] | None:
    """Every file and folder under ``path`` with the SHA-256 of its bytes (None: nothing there)."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def run_args(model: Path, data_dir: Path, output_dir: Path, *extra: str, task: str = "sst-2",
             fast: bool = False) -> list[str]:
    return ["run", "--task", task, "--data-dir", str(data_dir), "--output-dir", str(output_dir),
            "--model", str(model), *(FAST if fast else TINY), *extra]


def write_split(folder: Path, name: str, data: bytes | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny runs are faster on one thread, and far faster when other work holds the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    """One tiny QAT run on toy SST-2 (16 steps): (run folder, data folder, its checkpoint)."""
    root = tmp_path_factory.mktemp("cli-run")
    data = write_sst2(root / "SST-2")
    out = root / "run"
    try:
        cli.main(run_args(tiny_bert, data, out))
    except SystemExit as exc:  # pragma: no cover - only on failure
        pytest.fail(f"the tiny run failed with exit status {exc.code}")
    checkpoint = out / "checkpoint-16"
    assert (checkpoint / "q8_checkpoint.json").is_file()
    return out, data, checkpoint


@pytest.fixture
def checkpoint_copy(trained, tmp_path) -> Path:
    """A private copy of the shared run's checkpoint, free to damage."""
    return Path(shutil.copytree(trained[2], tmp_path / "checkpoint-16"))


# -- 1. data problems -------------------------------------------------------------------------
SST2_ROWS = "sentence\tlabel\nthe movie was good .\t1\nthe plot was awful .\t0\n"


def _sst2_train(data: Path, train: bytes | str) -> tuple[Path, str]:
    write_sst2(data, n_train=8, n_dev=8)
    return write_split(data, "train.tsv", train), "sst-2"


def _stsb_train(data: Path, train: bytes | str) -> tuple[Path, str]:
    write_stsb(data, n_train=8, n_dev=8)
    return write_split(data, "train.tsv", train), "sts-b"


STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"

DATA_CASES = {
    # name: (writer, train.tsv contents, what the message must say besides the file name)
    "wrong column count": (_sst2_train, SST2_ROWS + "a film\t1\textra\n", ["line 4", "columns"]),
    "blank line inside": (_sst2_train, "sentence\tlabel\nthe film\t1\n\na film\t0\n", ["line 3", "columns"]),
    "label outside the task's set": (_sst2_train, SST2_ROWS + "a film\t2\n", ["line 4", "'2'"]),
    "non-numeric STS-B score": (_stsb_train, STSB_HEADER + "0\tg\tf\t2012\t0\tn\tn\ta cat\ta dog\t1.5\n"
                                + "1\tg\tf\t2012\t1\tn\tn\ta cat\ta dog\tfour\n", ["line 3", "'four'", "number"]),
    "infinite STS-B score": (_stsb_train, STSB_HEADER + "0\tg\tf\t2012\t0\tn\tn\ta cat\ta dog\tinf\n",
                             ["line 2", "finite"]),
    "empty train.tsv": (_sst2_train, b"", ["empty"]),
    "header-only train.tsv": (_sst2_train, "sentence\tlabel\n", ["no examples"]),
    "header without the text column": (_sst2_train, "text\tlabel\nthe film\t1\n", ["line 1", "'sentence'"]),
    "bytes that are not UTF-8": (_sst2_train, SST2_ROWS.encode() + b"caf\xe9 film\t1\n",
                                 ["line 4", "UTF-8"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_malformed_train_tsv_is_one_line_naming_file_and_line(case, tiny_bert, tmp_path, capsys):
    writer, contents, needles = DATA_CASES[case]
    train, task = writer(tmp_path / "data", contents)
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, tmp_path / "data", out, task=task), capsys)
    assert_one_line_error(code, err, str(train), *needles)
    assert not out.exists()


def test_malformed_dev_tsv_is_caught_before_anything_is_written(tiny_bert, tmp_path, capsys):
    data = write_sst2(tmp_path / "data", n_train=8, n_dev=8)
    dev = write_split(data, "dev.tsv", SST2_ROWS + "a film\tpositive\n")
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, data, out), capsys)
    assert_one_line_error(code, err, str(dev), "line 4", "'positive'")
    assert not out.exists()


def test_missing_data_dir(tiny_bert, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, tmp_path / "no-such-dir", out), capsys)
    assert_one_line_error(code, err, str(tmp_path / "no-such-dir"), "does not exist")
    assert not out.exists()


def test_data_dir_that_is_a_file(tiny_bert, tmp_path, capsys):
    data = write_split(tmp_path, "data.tsv", SST2_ROWS)
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, data, out), capsys)
    assert_one_line_error(code, err, str(data), "not a directory")
    assert not out.exists()


def test_data_dir_without_train_tsv_says_what_is_there(tiny_bert, tmp_path, capsys):
    data = write_sst2(tmp_path / "data", n_train=8, n_dev=8)
    (data / "train.tsv").unlink()
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, data, out), capsys)
    assert_one_line_error(code, err, str(data / "train.tsv"), "not found", "dev.tsv")
    assert not out.exists()


def _reencode(path: Path, crlf: bool, bom: bool) -> None:
    data = path.read_bytes()
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    if bom:
        data = b"\xef\xbb\xbf" + data
    path.write_bytes(data)


@pytest.mark.parametrize("crlf, bom", [(True, False), (False, True), (True, True)], ids=["crlf", "bom", "bom+crlf"])
def test_crlf_and_bom_are_accepted(crlf, bom, tiny_bert, tmp_path, capsys):
    data = write_sst2(tmp_path / "data", n_train=32, n_dev=16)
    for split in ("train", "dev"):
        _reencode(data / f"{split}.tsv", crlf, bom)
    out = tmp_path / "out"
    code, stdout, err = q8(run_args(tiny_bert, data, out, fast=True), capsys)
    assert code == 0, err
    assert "q8: error" not in err
    results = json.loads((out / "eval_results.json").read_text())
    assert results["step"] == 2 and "accuracy" in results["metrics"]  # dev.tsv was read too


# -- 2. model problems ------------------------------------------------------------------------
def _model_folder(tiny_bert: Path, root: Path, kind: str) -> Path:
    folder = root / kind
    if kind == "no-such-folder":
        return folder
    folder.mkdir()
    keep = {"empty": set(),
            "vocab-only": {"vocab.txt", "tokenizer.json", "tokenizer_config.json"},
            "no-weights": {"vocab.txt", "tokenizer.json", "tokenizer_config.json", "config.json"}}[kind]
    for file in tiny_bert.iterdir():
        if file.name in keep:
            shutil.copy(file, folder)
    return folder


@pytest.mark.parametrize("kind", ["empty", "vocab-only", "no-weights", "no-such-folder"])
def test_model_folder_without_config_or_weights(kind, tiny_bert, sst2_dir, tmp_path, capsys):
    model = _model_folder(tiny_bert, tmp_path, kind)
    out = tmp_path / "out"
    code, _, err = q8(run_args(model, sst2_dir, out), capsys)
    assert_one_line_error(code, err, str(model))
    assert not out.exists()


def test_model_whose_weights_do_not_fit_its_config(tiny_bert, sst2_dir, tmp_path, capsys):
    model = Path(shutil.copytree(tiny_bert, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    out = tmp_path / "out"
    code, _, err = q8(run_args(model, sst2_dir, out), capsys)
    assert_one_line_error(code, err, str(model), "do not fit its config.json",
                          "intermediate.dense.bias has shape (64,), config.json says (48,)")
    assert not out.exists()


def test_a_model_that_is_not_a_bert_family_encoder(tiny_bert, sst2_dir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2Model

    model = Path(shutil.copytree(tiny_bert, tmp_path / "model"))
    (model / "model.safetensors").unlink()
    (model / "config.json").unlink()
    GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=32, n_positions=64,
                         bos_token_id=0, eos_token_id=0)).save_pretrained(str(model))
    out = tmp_path / "out"
    code, _, err = q8(run_args(model, sst2_dir, out), capsys)
    assert_one_line_error(code, err, str(model), "'gpt2' model", "BERT-family encoders")
    assert not out.exists()


# -- 3. the output folder ---------------------------------------------------------------------
def test_previous_run_is_refused_and_left_untouched(trained, tiny_bert, tmp_path, capsys):
    run_dir, data, _ = trained
    out = Path(shutil.copytree(run_dir, tmp_path / "out"))
    before = snapshot(out)
    code, _, err = q8(run_args(tiny_bert, data, out), capsys)
    assert_one_line_error(code, err, str(out), "--overwrite", "previous run")
    assert snapshot(out) == before


def test_folder_with_other_files_is_refused(tiny_bert, sst2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    write_split(out, "notes.txt", "mine")
    before = snapshot(out)
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out), capsys)
    assert_one_line_error(code, err, str(out), "--overwrite")
    assert snapshot(out) == before


def test_overwrite_with_bad_data_leaves_the_previous_run_alone(trained, tiny_bert, tmp_path, capsys):
    run_dir, _, _ = trained
    out = Path(shutil.copytree(run_dir, tmp_path / "out"))
    before = snapshot(out)
    train, _ = _sst2_train(tmp_path / "data", SST2_ROWS + "a film\t7\n")
    code, _, err = q8(run_args(tiny_bert, tmp_path / "data", out, "--overwrite"), capsys)
    assert_one_line_error(code, err, str(train), "line 4")
    assert snapshot(out) == before


def test_overwrite_replaces_the_previous_run(trained, tiny_bert, tmp_path, capsys):
    run_dir, data, _ = trained
    out = Path(shutil.copytree(run_dir, tmp_path / "out"))
    old_config = (out / "run_config.json").read_bytes()
    assert (out / "checkpoint-16").is_dir()
    code, stdout, err = q8(run_args(tiny_bert, data, out, "--overwrite", "--no-eval", fast=True), capsys)
    assert code == 0, err
    assert (out / "run_config.json").read_bytes() != old_config
    config = json.loads((out / "run_config.json").read_text())
    assert config["max_steps"] == 2 and config["overwrite"] is True
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "eval_results.json").read_text())["step"] == 2
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in records) == 2  # the old run's log was replaced, not appended to


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_output_dir_that_is_a_regular_file(overwrite, tiny_bert, sst2_dir, tmp_path, capsys):
    out = write_split(tmp_path, "out", "not a folder")
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out, *(["--overwrite"] if overwrite else [])), capsys)
    assert_one_line_error(code, err, str(out), "--output-dir", "file")
    assert out.read_bytes() == b"not a folder"


def test_output_dir_below_a_regular_file(tiny_bert, sst2_dir, tmp_path, capsys):
    parent = write_split(tmp_path, "afile", "x")
    code, _, err = q8(run_args(tiny_bert, sst2_dir, parent / "run", fast=True), capsys)
    assert_one_line_error(code, err, str(parent))
    assert parent.read_bytes() == b"x"


# -- 4. devices -------------------------------------------------------------------------------
def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.mark.skipif(not _no_cuda(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("device", ["gpu", "gpu:1", "cuda:0"])
def test_gpu_without_cuda(device, tiny_bert, sst2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out, "--device", device), capsys)
    assert_one_line_error(code, err, f"--device {device}", "no CUDA GPU")
    assert not out.exists()


def test_ascend_is_not_a_torch_device(tiny_bert, sst2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out, "--device", "ascend"), capsys)
    assert_one_line_error(code, err, "'torch'", "does not support", "'ascend'")
    assert not out.exists()


@pytest.mark.parametrize("device", ["tpu", "gpu:x"])
def test_unknown_device_is_a_usage_error(device, tiny_bert, sst2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out, "--device", device), capsys)
    assert code == 2 and "Traceback" not in err
    assert "--device" in err and repr(device) in err
    assert not out.exists()


@pytest.mark.skipif(not _no_cuda(), reason="this machine has a CUDA GPU")
def test_eval_on_gpu_without_cuda(trained, capsys):
    _, data, checkpoint = trained
    code, _, err = q8(["eval", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--device", "gpu"], capsys)
    assert_one_line_error(code, err, "--device gpu", "no CUDA GPU")


# -- 5. quantizer spec ------------------------------------------------------------------------
SPEC_CASES = {
    "unknown key": ('{"bits": 8, "ema_dacay": 0.9}', ["ema_dacay", "unknown"]),
    "bits 9": ('{"bits": 9}', ["bits", "9"]),
    "ema_decay 1.0": ('{"ema_decay": 1.0}', ["ema_decay", "1.0"]),
    "invalid JSON": ('{"bits": 8,}', ["not valid JSON", "line 1"]),
    "not an object": ("[8]", ["JSON object"]),
    "mode unknown": ('{"mode": "int4"}', ["'int4'"]),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_bad_spec_file_names_the_file(case, tiny_bert, sst2_dir, tmp_path, capsys):
    text, needles = SPEC_CASES[case]
    spec = write_split(tmp_path, "spec.json", text)
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out, "--spec", str(spec)), capsys)
    assert_one_line_error(code, err, str(spec), *needles)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "not UTF-8"])
def test_unreadable_spec_file(kind, tiny_bert, sst2_dir, tmp_path, capsys):
    spec = tmp_path / "spec.json"
    if kind == "not UTF-8":
        spec.write_bytes(b'{"bits": 8, "mode": "q\xe9t"}')
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out, "--spec", str(spec)), capsys)
    assert_one_line_error(code, err, str(spec))
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "1.5", "1", "-0.5", "nan"])
def test_bad_ema_decay_option(value, tiny_bert, sst2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out, "--ema-decay", value), capsys)
    line = assert_one_line_error(code, err)
    assert re.search(r"ema[-_]decay", line) and re.search(r"\(0, 1\)|0<x<1", line), line
    assert not out.exists()


def test_negative_quant_delay_names_the_option(tiny_bert, sst2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out, "--quant-delay", "-1"), capsys)
    assert_one_line_error(code, err, "--quant-delay", "-1")
    assert not out.exists()


def test_a_quant_delay_that_outlasts_the_run_is_refused(tiny_bert, sst2_dir, tmp_path, capsys):
    """A QAT run whose --quant-delay reaches its last step would never quantize: refused before anything is
    written (an FP32 run ignores the delay)."""
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out, "--quant-delay", "2", fast=True), capsys)
    assert_one_line_error(code, err, "--quant-delay 2 is not below the run's 2 steps", "end unquantized")
    assert not out.exists()
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out, "--quant-delay", "1", fast=True), capsys)
    assert code == 0, err


class _Captured(Exception):
    pass


@pytest.fixture
def captured_config(monkeypatch):
    """Replace the Trainer: the RunConfig that `q8 run` builds is stored, then a Q8Error stops the run."""
    seen = []

    class FakeTrainer:
        def __init__(self, config, registry, progress=True):
            seen.append(config)

        def run(self):
            raise Q8Error("stopped by the test")

    monkeypatch.setattr("q8core.trainer.Trainer", FakeTrainer)
    return seen


def test_spec_file_options_and_command_line_overrides_combine(captured_config, sst2_dir, tmp_path, capsys):
    spec = write_split(tmp_path, "spec.json", '{"bits": 6, "ema_decay": 0.5, "quantize_bias": false}')
    code, _, err = q8(["run", "--task", "sst-2", "--data-dir", str(sst2_dir), "--output-dir", str(tmp_path / "o"),
                       "--spec", str(spec), "--mode", "dq", "--quant-delay", "5"], capsys)
    assert code == 2 and "stopped by the test" in err
    (config,) = captured_config
    assert (config.spec.mode, config.spec.bits, config.spec.ema_decay) == ("dq", 6, 0.5)
    assert config.spec.quantize_bias is False and config.spec.start_step == 5
    code, _, _ = q8(["run", "--task", "sst-2", "--data-dir", str(sst2_dir), "--output-dir", str(tmp_path / "o"),
                     "--spec", str(spec), "--ema-decay", "0.99"], capsys)
    assert captured_config[-1].spec.ema_decay == 0.99 and captured_config[-1].spec.bits == 6


def test_spec_file_mode_is_kept_when_mode_is_not_given(captured_config, sst2_dir, tmp_path, capsys):
    spec = write_split(tmp_path, "spec.json", '{"mode": "fp32"}')
    q8(["run", "--task", "sst-2", "--data-dir", str(sst2_dir), "--output-dir", str(tmp_path / "o"),
        "--spec", str(spec)], capsys)
    assert captured_config[-1].spec.mode == "fp32"


# -- 6. bad numbers ---------------------------------------------------------------------------
NUMBER_CASES = [
    (["--train-batch-size", "0"], ["--train-batch-size", "0"]),
    (["--eval-batch-size", "-4"], ["--eval-batch-size", "-4"]),
    (["--max-seq-length", "1024"], ["--max-seq-length", "1024", "512"]),
    (["--max-seq-length", "0"], ["--max-seq-length"]),
    (["--learning-rate", "0"], ["--learning-rate"]),
    (["--learning-rate", "-1e-5"], ["--learning-rate"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--max-steps", "0"], ["--max-steps"]),
    (["--warmup-ratio", "1"], ["--warmup-ratio"]),
    (["--logging-steps", "0"], ["--logging-steps"]),
]


@pytest.mark.parametrize("option, needles", NUMBER_CASES, ids=[" ".join(c[0]) for c in NUMBER_CASES])
def test_bad_numbers(option, needles, tiny_bert, sst2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out, *option), capsys)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


@pytest.mark.parametrize("option", [["--learning-rate", "nan"], ["--epochs", "inf"], ["--epochs", "nan"]],
                         ids=["lr nan", "epochs inf", "epochs nan"])
def test_non_finite_numbers(option, tiny_bert, sst2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out, *option), capsys)
    assert_one_line_error(code, err, option[0])
    assert not out.exists()


def test_non_integer_is_a_usage_error(tiny_bert, sst2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, sst2_dir, out, "--train-batch-size", "many"), capsys)
    assert code == 2 and "Traceback" not in err and "--train-batch-size" in err
    assert not out.exists()


# -- 7. q8 eval -------------------------------------------------------------------------------
def test_eval_checkpoint_pointing_nowhere(trained, tmp_path, capsys):
    _, data, _ = trained
    missing = tmp_path / "nothing-here"
    code, _, err = q8(["eval", "--checkpoint", str(missing), "--data-dir", str(data)], capsys)
    assert_one_line_error(code, err, str(missing), "no such")
    assert not missing.exists()


@pytest.mark.parametrize("contents", ["empty", "stray file", "regular file"])
def test_eval_folder_that_is_not_a_checkpoint(contents, trained, tmp_path, capsys):
    _, data, _ = trained
    path = tmp_path / "not-a-checkpoint"
    if contents == "regular file":
        write_split(tmp_path, path.name, "x")
    else:
        path.mkdir()
        if contents == "stray file":
            write_split(path, "config.json", "{}")
    before = snapshot(path)
    code, _, err = q8(["eval", "--checkpoint", str(path), "--data-dir", str(data)], capsys)
    assert_one_line_error(code, err, str(path))
    assert snapshot(path) == before


def test_eval_run_folder_with_damaged_trainer_state(trained, tmp_path, capsys):
    _, data, _ = trained
    path = tmp_path / "run"
    write_split(path, "trainer_state.json", '{"best_checkpoint": ')
    code, _, err = q8(["eval", "--checkpoint", str(path), "--data-dir", str(data)], capsys)
    assert_one_line_error(code, err, str(path / "trainer_state.json"))


def test_eval_truncated_weights(checkpoint_copy, trained, capsys):
    _, data, _ = trained
    weights = checkpoint_copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size // 2)
    before = snapshot(checkpoint_copy)
    code, _, err = q8(["eval", "--checkpoint", str(checkpoint_copy), "--data-dir", str(data)], capsys)
    assert_one_line_error(code, err, str(weights), "truncated", str(size))
    assert snapshot(checkpoint_copy) == before


def test_eval_corrupted_weights_of_the_same_size(checkpoint_copy, trained, capsys):
    _, data, _ = trained
    weights = checkpoint_copy / "model.safetensors"
    data_bytes = bytearray(weights.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0x01
    weights.write_bytes(bytes(data_bytes))
    before = snapshot(checkpoint_copy)
    code, _, err = q8(["eval", "--checkpoint", str(checkpoint_copy), "--data-dir", str(data)], capsys)
    assert_one_line_error(code, err, str(weights), "corrupted")
    assert snapshot(checkpoint_copy) == before


def test_eval_missing_checkpoint_file(checkpoint_copy, trained, capsys):
    _, data, _ = trained
    (checkpoint_copy / "quant_state.safetensors").unlink()
    code, _, err = q8(["eval", "--checkpoint", str(checkpoint_copy), "--data-dir", str(data)], capsys)
    assert_one_line_error(code, err, str(checkpoint_copy), "quant_state.safetensors", "missing")


def test_eval_damaged_manifest(checkpoint_copy, trained, capsys):
    _, data, _ = trained
    manifest = checkpoint_copy / "q8_checkpoint.json"
    manifest.write_text('{"format": "q8bert-checkpoint",', encoding="utf-8")
    code, _, err = q8(["eval", "--checkpoint", str(checkpoint_copy), "--data-dir", str(data)], capsys)
    assert_one_line_error(code, err, str(manifest), "manifest")


@pytest.mark.parametrize("labels", [["0", "1", "2"], ["1", "0"], None], ids=["three", "swapped", "null"])
def test_eval_manifest_labels_that_do_not_fit_the_task(labels, checkpoint_copy, trained, capsys):
    _, data, _ = trained
    manifest = checkpoint_copy / "q8_checkpoint.json"
    content = json.loads(manifest.read_text())
    assert content["task"] == "sst-2"
    content["labels"] = labels
    manifest.write_text(json.dumps(content), encoding="utf-8")
    before = snapshot(checkpoint_copy)
    code, _, err = q8(["eval", "--checkpoint", str(checkpoint_copy), "--data-dir", str(data)], capsys)
    assert_one_line_error(code, err, str(checkpoint_copy), "labels", "sst-2")
    assert snapshot(checkpoint_copy) == before


def test_eval_data_dir_without_dev_tsv(trained, tmp_path, capsys):
    _, _, checkpoint = trained
    data = write_sst2(tmp_path / "data", n_train=8, n_dev=8)
    (data / "dev.tsv").unlink()
    code, _, err = q8(["eval", "--checkpoint", str(checkpoint), "--data-dir", str(data)], capsys)
    assert_one_line_error(code, err, str(data / "dev.tsv"), "not found")


@pytest.mark.parametrize("size", ["0", "-1"])
def test_eval_bad_batch_size(size, trained, capsys):
    _, data, checkpoint = trained
    code, _, err = q8(["eval", "--checkpoint", str(checkpoint), "--data-dir", str(data),
                       "--eval-batch-size", size], capsys)
    assert_one_line_error(code, err, "--eval-batch-size")


# -- 8. --debug -------------------------------------------------------------------------------
def test_debug_shows_the_traceback_and_still_exits_2(tiny_bert, tmp_path, capsys):
    out = tmp_path / "out"
    args = run_args(tiny_bert, tmp_path / "no-such-dir", out)
    code, _, err = q8(["--debug", *args], capsys)
    assert code == 2
    assert "Traceback" in err and "Q8Error" in err
    assert err.splitlines()[-1] == f"q8: error: data directory {tmp_path / 'no-such-dir'} does not exist"
    assert not out.exists()
    code, _, err = q8(args, capsys)  # and without it, one line again
    assert_one_line_error(code, err, "does not exist")


def test_debug_on_eval(trained, tmp_path, capsys):
    _, data, _ = trained
    code, _, err = q8(["--debug", "eval", "--checkpoint", str(tmp_path / "nope"), "--data-dir", str(data)], capsys)
    assert code == 2 and "Traceback" in err
    assert err.splitlines()[-1].startswith("q8: error: ")


# -- 9. task names ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["STS-B", "stsb", "sts-b", "Sts_B"])
def test_task_name_spellings_resolve(name):
    assert load_registry().task(name).name == "sts-b"


def test_unknown_task_lists_the_installed_ones(tiny_bert, stsb_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, stsb_dir, out, task="sts-c"), capsys)
    assert_one_line_error(code, err, "'sts-c'", "sts-b", "sst-2")
    assert not out.exists()


@pytest.mark.parametrize("name", ["STS-B", "stsb", "sts-b"])
def test_task_name_spellings_run(name, tiny_bert, tmp_path, capsys):
    data = write_stsb(tmp_path / "STS-B", n_train=32, n_dev=8)
    out = tmp_path / "out"
    code, _, err = q8(run_args(tiny_bert, data, out, "--no-eval", task=name, fast=True), capsys)
    assert code == 0, err
    manifest = json.loads((out / "checkpoint-2" / "q8_checkpoint.json").read_text())
    assert manifest["task"] == "sts-b" and manifest["labels"] is None


# -- 10. q8 eval output -----------------------------------------------------------------------
def test_eval_json_is_one_object_line(trained, capsys):
    run_dir, data, checkpoint = trained
    code, out, err = q8(["eval", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--json"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 and out.endswith("\n")
    shown = json.loads(lines[0])
    assert isinstance(shown, dict)
    assert shown["task"] == "sst-2" and shown["mode"] == "qat" and shown["checkpoint"] == str(checkpoint)
    assert 0.0 <= shown["accuracy"] <= 1.0 and not math.isnan(shown["accuracy"])
    final = json.loads((run_dir / "eval_results.json").read_text())["metrics"]["accuracy"]
    assert shown["accuracy"] == final  # same model, same dev set: same number


def test_eval_human_line(trained, capsys):
    run_dir, data, _ = trained
    code, out, err = q8(["eval", "--checkpoint", str(run_dir), "--data-dir", str(data)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2  # q8's line, then the ModelZoo's "The current result is ..." line
    assert lines[1].startswith("The current result is {'accuracy': ")
    assert "sst-2" in lines[0] and "accuracy=" in lines[0] and "qat" in lines[0]
    assert "checkpoint-16" in lines[0]  # a run folder resolves to its best checkpoint
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


# -- 11. version and help ---------------------------------------------------------------------
def test_version(capsys):
    code, out, err = q8(["--version"], capsys)
    assert code == 0 and err == ""
    assert __version__ in out and "q8" in out


def test_run_help_lists_the_modes(capsys):
    code, out, err = q8(["run", "--help"], capsys)
    assert code == 0 and err == ""
    assert "--mode" in out
    mode_help = out[out.index("--mode"):]
    assert all(mode in mode_help for mode in ("qat", "fp32", "dq"))
    assert "[qat|fp32|dq]" in out.replace("\n", "").replace(" ", "")


def test_eval_help(capsys):
    code, out, _ = q8(["eval", "-h"], capsys)
    assert code == 0 and "--checkpoint" in out and "--json" in out


def test_missing_required_option_is_a_usage_error(tmp_path, capsys):
    code, _, err = q8(["run", "--task", "sst-2", "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and "--output-dir" in err and "Traceback" not in err
