"""Distillation from an FP32 teacher (``q8 run --teacher``): the loss against the NumPy reference and hand
values, the teacher read-only and recorded, and every mistake in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from q8core import distillation
from q8core.config import RunConfig
from test_cli import assert_one_line_error, q8, run_args, snapshot


# -- the formula -----------------------------------------------------------------------------------

def test_kd_term_hand_values():
    # regression: the mean squared difference
    assert distillation.kd_term(np.array([[1.0], [2.0]]), np.array([[0.0], [4.0]]), 1.0, True) == 2.5
    # identical logits: no distance, at any temperature
    logits = np.array([[1.0, -2.0, 0.5]])
    assert abs(distillation.kd_term(logits, logits, 3.0, False)) < 1e-15
    # two classes, T = 1: KL([0.5, 0.5] || softmax([ln 3, 0]) = [0.75, 0.25])
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    got = distillation.kd_term(np.array([[math.log(3.0), 0.0]]), np.array([[0.0, 0.0]]), 1.0, False)
    assert got == pytest.approx(kl, rel=1e-12)
    # T = 2 softens both sides and multiplies by T^2
    p_s = np.array([math.sqrt(3), 1.0]) / (math.sqrt(3) + 1)
    assert distillation.kd_term(np.array([[math.log(3.0), 0.0]]), np.array([[0.0, 0.0]]), 2.0, False) == \
        pytest.approx(4 * (0.5 * math.log(0.5 / p_s[0]) + 0.5 * math.log(0.5 / p_s[1])), rel=1e-12)
    assert distillation.loss(np.array([[1.0]]), np.array([[3.0]]), 0.5, 0.25, 1.0, True) == 0.75 * 0.5 + 0.25 * 4


@pytest.mark.parametrize("labels, regression", [(("0", "1"), False), (None, True)])
def test_the_torch_loss_is_the_reference_formula(tiny_bert, labels, regression):
    import torch

    from q8core.plugins import load_registry
    from q8core.spec import QuantSpec

    backend = load_registry().backend("torch").from_pretrained(str(tiny_bert), labels=labels,
                                                               spec=QuantSpec(mode="fp32"), device="cpu", seed=0)
    backend.set_distillation(0.3, 2.0)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(5, 27, (6, 10)), "attention_mask": np.ones((6, 10), np.int64),
             "token_type_ids": np.zeros((6, 10), np.int64),
             "labels": rng.random(6).astype(np.float32) if regression else rng.integers(0, 2, 6)}
    teacher = rng.standard_normal((6, 1 if regression else 2)).astype(np.float32)
    backend.model.eval()  # no dropout: the same logits as predict()
    with torch.no_grad():
        task_loss = float(backend._loss(backend.model, batch))
        got = float(backend._loss(backend.model, {**batch, "teacher_logits": teacher}))
    expected = distillation.loss(backend.predict(batch), teacher, task_loss, 0.3, 2.0, regression)
    assert got == pytest.approx(float(expected), rel=1e-5)


# -- through the command line ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_run(tiny_bert, tmp_path_factory):
    """An FP32 run on toy SST-2: the teacher."""
    import cli
    from conftest import write_sst2

    root = tmp_path_factory.mktemp("teacher")
    data = write_sst2(root / "SST-2")
    try:
        cli.main(["run", "--task", "sst-2", "--model", str(tiny_bert), "--data-dir", str(data), "--output-dir",
                  str(root / "fp32"), "--mode", "fp32", "--max-steps", "4", "--learning-rate", "3e-3", "--quiet"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return data, root / "fp32"


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "train"]


def test_a_run_distils_from_the_teacher_records_it_and_leaves_it_untouched(tiny_bert, teacher_run, tmp_path, capsys):
    data, teacher = teacher_run
    before = snapshot(teacher)
    args = ("--max-steps", "4", "--logging-steps", "1", "--ema-decay", "0.9", "--quant-delay", "1")
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "plain", *args, fast=True), capsys)
    assert code == 0, err
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "taught", *args, "--teacher", str(teacher),
                               "--distill-weight", "0.7", "--distill-temperature", "2", fast=True), capsys)
    assert code == 0, err
    assert snapshot(teacher) == before  # the teacher never trains, nothing is written into it
    config = RunConfig.load(tmp_path / "taught")
    assert (config.teacher, config.distill_weight, config.distill_temperature) == (str(teacher), 0.7, 2.0)
    plain, taught = _losses(tmp_path / "plain"), _losses(tmp_path / "taught")
    assert len(plain) == len(taught) == 4 and plain != taught  # the loss is another one from the first step


def test_a_teacher_of_another_task_or_without_a_classifier_is_refused(tiny_bert, teacher_run, tmp_path, capsys):
    from conftest import write_stsb

    data, teacher = teacher_run
    stsb = write_stsb(tmp_path / "STS-B")
    code, _, err = q8(run_args(tiny_bert, stsb, tmp_path / "out", "--teacher", str(teacher), task="sts-b",
                               fast=True), capsys)
    assert_one_line_error(code, err, f"--teacher {teacher}", "trained on sst-2", "this run is sts-b")
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "out", "--teacher", str(tiny_bert), fast=True), capsys)
    assert_one_line_error(code, err, f"--teacher {tiny_bert} has no classifier")
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "out", "--teacher", str(tmp_path / "nowhere"), fast=True),
                      capsys)
    assert_one_line_error(code, err, "--teacher", "nowhere: no such folder")
    assert snapshot(tmp_path / "out") is None


def test_distillation_options_are_checked(tiny_bert, teacher_run, tmp_path, capsys):
    data, teacher = teacher_run
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "out", "--distill-weight", "0.3", fast=True), capsys)
    assert_one_line_error(code, err, "--distill-weight goes with --teacher")
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "out", "--teacher", str(teacher), "--distill-weight", "0",
                               fast=True), capsys)
    assert_one_line_error(code, err, "--distill-weight must be in (0, 1], got 0.0")
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "out", "--teacher", str(teacher),
                               "--distill-temperature", "-1", fast=True), capsys)
    assert_one_line_error(code, err, "--distill-temperature must be a positive number")
    assert snapshot(tmp_path / "out") is None


def test_mindspore_says_it_cannot_distil_yet(tiny_bert, teacher_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("mindspore")
    monkeypatch.setenv("Q8_PLUGINS", "torch,mindspore,glue")
    data, teacher = teacher_run
    code, _, err = q8(run_args(tiny_bert, data, tmp_path / "ms", "--backend", "mindspore", "--teacher", str(teacher),
                               fast=True), capsys)
    assert_one_line_error(code, err, "backend 'mindspore' cannot train with a --teacher yet")
    assert snapshot(tmp_path / "ms") is None
