"""``q8 report``: figures and report.md from real tiny runs (QAT, FP32, DQ on toy STS-B), and
one-line errors for folders that are not (complete) runs.

The three runs are made once per module through the CLI; tests that damage a run copy its
JSON files first (the report never reads checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import cli
from q8core.report import REPORT_FILES, build_figures, load_run, select_ema_layers

from conftest import write_stsb
from helpers import run_q8

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_FILES = ("run_config.json", "metrics.jsonl", "eval_results.json", "trainer_state.json")
STEPS = ["--max-steps", "6", "--logging-steps", "2", "--eval-steps", "3", "--train-batch-size", "16",
         "--learning-rate", "3e-3", "--quiet"]


from test_cli import _one_torch_thread  # noqa: E402,F401 -- module-wide: the tiny runs on one thread


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory) -> dict[str, Path]:
    """Three 6-step STS-B runs, one per mode, logged every 2 steps and evaluated every 3."""
    root = tmp_path_factory.mktemp("report-runs")
    data = write_stsb(root / "STS-B")
    folders = {}
    for mode, extra in (("qat", ["--ema-decay", "0.9", "--quant-delay", "0"]), ("fp32", []), ("dq", [])):
        folders[mode] = out = root / mode
        try:
            cli.main(["run", "--task", "sts-b", "--data-dir", str(data), "--model", str(tiny_bert),
                      "--output-dir", str(out), "--mode", mode, *STEPS, *extra])
        except SystemExit as exc:  # pragma: no cover - only on failure
            pytest.fail(f"the tiny {mode} run failed with exit status {exc.code}")
    return folders


def copy_run(src: Path, dst: Path) -> Path:
    """The run's JSON files (no checkpoints) in a fresh folder."""
    dst.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy2(src / name, dst / name)
    return dst


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def row(markdown: str, label: str) -> list[str]:
    """The cells after the label of the first table row whose label is ``label``."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in report.md")


def assert_valid_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 400, (path, image.shape)
    assert image.std() > 0  # something drawn


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith("q8: error: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def legend_labels(fig) -> list[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [text.get_text() for legend in legends for text in legend.get_texts()]


# -- one run ---------------------------------------------------------------------------------------
def test_one_qat_run_gets_valid_figures_and_a_summary_in_run_dir_report(runs, tmp_path, capsys):
    run = copy_run(runs["qat"], tmp_path / "qat")
    code, out, err = run_q8(["report", str(run)], capsys)
    assert code == 0, err
    report = run / "report"
    assert f"written to {report}" in out and len(out.splitlines()) == 1
    names = {p.name for p in report.iterdir()}
    assert names == {"report.md", "loss.png", "metrics.png", "learning_rate.png", "ema.png"} <= REPORT_FILES
    for png in report.glob("*.png"):
        assert_valid_png(png)
    markdown = (report / "report.md").read_text(encoding="utf-8")
    for png in ("loss.png", "metrics.png", "learning_rate.png", "ema.png"):
        assert f"]({png})" in markdown  # embedded by relative path
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files or folders left


def test_report_numbers_are_the_runs_own(runs, tmp_path, capsys):
    run = runs["qat"]
    out = tmp_path / "report"
    code, _, err = run_q8(["report", str(run), "--output", str(out)], capsys)
    assert code == 0, err
    markdown = (out / "report.md").read_text(encoding="utf-8")
    results = json.loads((run / "eval_results.json").read_text())
    config = json.loads((run / "run_config.json").read_text())
    train, evals = records(run, "train"), records(run, "eval")

    assert row(markdown, "mode") == ["qat"] and row(markdown, "task") == ["sts-b"]
    assert row(markdown, "status") == ["finished"]
    assert row(markdown, "main metric") == [results["main_metric"]] == ["pearson"]
    assert row(markdown, "best pearson") == [f"{results['best_metric']:.4f}"]
    assert row(markdown, "best step") == [str(results["best_step"])]
    best = [r for r in evals if r["is_best"]][-1]
    assert (best["step"], best["pearson"]) == (results["best_step"], results["best_metric"])
    for name, value in results["metrics"].items():
        assert row(markdown, f"final {name}") == [f"{value:.4f}"]
        assert value == evals[-1][name]
    assert row(markdown, "steps") == [str(results["step"])] == [str(train[-1]["step"])] == ["6"]
    assert row(markdown, "logged train steps") == [str(len(train))] == ["3"]
    assert row(markdown, "evaluations") == [str(len(evals))] == ["2"]
    assert row(markdown, "final loss") == [f"{train[-1]['loss']:.4f} (step 6)"]
    assert row(markdown, "time per step") == [f"{results['sec_per_step']:.3f} s"]
    # settings, quantizer spec included
    assert row(markdown, "learning_rate") == ["0.003"]
    assert row(markdown, "spec.ema_decay") == [str(config["spec"]["ema_decay"])] == ["0.9"]
    assert row(markdown, "spec.mode") == ["qat"]
    # activation ranges at the last log: the values of metrics.jsonl
    for layer, value in train[-1]["ema"].items():
        if f"`{layer}`" in markdown:
            shown = f"{value[0]:.4f} .. {value[1]:.4f}" if isinstance(value, list) else f"{value:.4f}"  # min .. max
            assert row(markdown, f"`{layer}`") == [shown]


def test_ema_layers_are_a_representative_handful(runs):
    layers = select_ema_layers([load_run(runs["qat"])])
    assert layers == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.output.dense",
                      "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.output.dense",
                      "bert.pooler.dense", "classifier"]


def test_fp32_run_has_no_activation_range_figure(runs, tmp_path, capsys):
    code, _, err = run_q8(["report", str(runs["fp32"]), "--output", str(tmp_path / "r")], capsys)
    assert code == 0, err
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.md", "loss.png", "metrics.png",
                                                            "learning_rate.png"}
    assert "ema.png" not in (tmp_path / "r" / "report.md").read_text()


# -- several runs ----------------------------------------------------------------------------------
def test_several_runs_are_overlaid_with_one_column_each(runs, tmp_path, capsys):
    out = tmp_path / "compare"
    dirs = [runs["fp32"], runs["qat"], runs["dq"]]
    code, stdout, err = run_q8(["report", *map(str, dirs), "--output", str(out)], capsys)
    assert code == 0, err
    assert "report of 3 runs" in stdout
    for png in ("loss.png", "metrics.png", "learning_rate.png", "ema.png"):
        assert_valid_png(out / png)
    markdown = (out / "report.md").read_text(encoding="utf-8")
    header = next(line for line in markdown.splitlines() if line.startswith("|"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == ["fp32", "qat", "dq"]
    assert row(markdown, "mode") == ["fp32", "qat", "dq"]
    for i, run in enumerate(dirs):
        results = json.loads((run / "eval_results.json").read_text())
        assert row(markdown, "best pearson")[i] == f"{results['best_metric']:.4f}"
        assert row(markdown, "final spearmanr")[i] == f"{results['metrics']['spearmanr']:.4f}"
    assert row(markdown, "**spec.mode**") == ["fp32", "qat", "dq"]  # differing settings stand out

    logs = [load_run(run) for run in dirs]
    for log, label in zip(logs, ["fp32", "qat", "dq"]):
        log.label = label
    figures = build_figures(logs)
    for key in ("loss", "metrics", "learning_rate"):
        assert legend_labels(figures[key]) == ["fp32", "qat", "dq"], key
    assert legend_labels(figures["ema"]) == ["qat"]  # DQ keeps no ranges; FP32 has none


def test_labels_add_the_mode_when_the_folder_name_lacks_it(runs, tmp_path, capsys):
    a, b = copy_run(runs["qat"], tmp_path / "a" / "run"), copy_run(runs["fp32"], tmp_path / "b" / "run")
    code, _, err = run_q8(["report", str(a), str(b), "--output", str(tmp_path / "r")], capsys)
    assert code == 0, err
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert row(markdown, "mode") == ["qat", "fp32"]
    header = next(line for line in markdown.splitlines() if line.startswith("|"))
    assert "a/run (qat)" in header and "b/run (fp32)" in header


def test_rerun_replaces_a_report_but_never_other_files(runs, tmp_path, capsys):
    out = tmp_path / "r"
    assert run_q8(["report", str(runs["qat"]), "--output", str(out)], capsys)[0] == 0
    assert run_q8(["report", str(runs["fp32"]), "--output", str(out)], capsys)[0] == 0
    assert not (out / "ema.png").exists()  # the folder is replaced, not topped up
    assert row((out / "report.md").read_text(), "mode") == ["fp32"]
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, _, err = run_q8(["report", str(runs["qat"]), "--output", str(out)], capsys)
    assert_one_line_error(code, err, str(out), "notes.txt")
    assert snapshot(out) == before


def test_unfinished_run_is_reported_from_its_log(runs, tmp_path, capsys):
    run = copy_run(runs["qat"], tmp_path / "qat")
    (run / "eval_results.json").unlink()
    (run / "trainer_state.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 4]
    (run / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    code, _, err = run_q8(["report", str(run)], capsys)
    assert code == 0, err
    markdown = (run / "report" / "report.md").read_text()
    assert row(markdown, "status")[0].startswith("unfinished")
    first_eval = json.loads(next(line for line in kept if json.loads(line)["type"] == "eval"))
    assert row(markdown, "best pearson") == [f"{first_eval['pearson']:.4f}"]
    assert row(markdown, "best step") == ["3"] and row(markdown, "steps") == ["4"]


# -- bad input ---------------------------------------------------------------------------------------
def _corrupt_line(run: Path, number: int, text: str) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[number - 1] = text
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _drop_loss(run: Path) -> None:
    record = records(run, "train")[0]
    del record["loss"]
    _corrupt_line(run, 1, json.dumps(record))


DAMAGE = {
    "missing folder": (lambda run: shutil.rmtree(run), ["no such run folder"]),
    "not a run folder": (lambda run: (run / "run_config.json").unlink(),
                         ["not a q8 run folder", "run_config.json"]),
    "no metrics.jsonl": (lambda run: (run / "metrics.jsonl").unlink(), ["metrics.jsonl", "missing"]),
    "empty metrics.jsonl": (lambda run: (run / "metrics.jsonl").write_text(""), ["metrics.jsonl", "empty"]),
    "corrupt line": (lambda run: _corrupt_line(run, 3, '{"type": "train", "step": 4, "lo'),
                     ["metrics.jsonl, line 3", "not valid JSON"]),
    "not a record": (lambda run: _corrupt_line(run, 2, "[1, 2]"), ["metrics.jsonl, line 2", "not a q8 log record"]),
    "no loss": (_drop_loss, ["metrics.jsonl, line 1", "'loss'"]),
    "corrupt eval_results": (lambda run: (run / "eval_results.json").write_text('{"task": '),
                             ["eval_results.json", "not valid JSON"]),
    "corrupt run_config": (lambda run: (run / "run_config.json").write_text("[]"),
                           ["run_config.json", "expected a JSON object"]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_bad_run_folder_is_one_line_error_and_writes_nothing(case, runs, tmp_path, capsys):
    damage, needles = DAMAGE[case]
    run = copy_run(runs["qat"], tmp_path / "qat")
    damage(run)
    before = snapshot(tmp_path)
    code, out, err = run_q8(["report", str(run)], capsys)
    assert_one_line_error(code, err, str(run), *needles)
    assert out == "" and snapshot(tmp_path) == before


def test_run_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("x")
    assert_one_line_error(*run_q8(["report", str(path)], capsys)[::2], str(path), "is a file")


def test_several_runs_need_output_and_distinct_folders(runs, capsys):
    code, _, err = run_q8(["report", str(runs["qat"]), str(runs["fp32"])], capsys)
    assert_one_line_error(code, err, "--output")
    code, _, err = run_q8(["report", str(runs["qat"]), str(runs["qat"]), "--output", "x"], capsys)
    assert_one_line_error(code, err, str(runs["qat"]), "twice")
    code, _, err = run_q8(["report"], capsys)
    assert_one_line_error(code, err, "RUN_DIR")
    assert not Path("x").exists()
