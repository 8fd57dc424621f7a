"""The nine GLUE tasks, read from the official GLUE TSV files.

Each task directory holds ``<split>.tsv`` (``train``, ``dev``; MNLI has ``dev_matched`` and
``dev_mismatched``). Columns are found by header name; only CoLA has no header.

======  ==================================  =======================  =====================
task    text_a / text_b                     label column             labels
======  ==================================  =======================  =====================
CoLA    column 3 (no header, 4 columns)     column 1                 0, 1
SST-2   sentence                            label                    0, 1
MRPC    #1 String / #2 String               Quality                  0, 1
STS-B   sentence1 / sentence2               score                    float (regression)
QQP     question1 / question2               is_duplicate             0, 1
MNLI    sentence1 / sentence2               gold_label (last)        contradiction, ...
QNLI    question / sentence                 label                    (not_)entailment
RTE     sentence1 / sentence2               label                    (not_)entailment
WNLI    sentence1 / sentence2               label                    0, 1
======  ==================================  =======================  =====================

The files are read with ``quoting=csv.QUOTE_NONE`` (STS-B carries unbalanced double quotes);
a UTF-8 BOM (MRPC) and CRLF line endings are accepted. Only trailing empty lines are skipped;
anything else malformed raises :class:`Q8Error` naming the file and line.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from q8core.errors import Q8Error
from q8core.hookspecs import hookimpl
from q8core.task import Example, Task

from . import hub

_BOM = b"\xef\xbb\xbf"
SAMPLES = Path(__file__).resolve().parent / "samples"  # small samples for `q8 run --example`
Row = tuple[int, list[str]]  # (1-based line number, fields)


@dataclass(frozen=True, kw_only=True)
class GlueTask(Task):
    """A GLUE task: column names of a headered TSV, or positions when ``num_columns`` is set."""

    text_a_column: str | int
    text_b_column: str | int | None
    label_column: str | int
    num_columns: int | None = None  # headerless files (CoLA): the fixed column count
    hub_config: str = ""  # the configuration of nyu-mll/glue on the Hugging Face hub
    hub_text_columns: tuple[str, str | None] = ("sentence", None)

    def read(self, data_dir: Path | str | None, split: str) -> list[Example]:
        """``split`` from a GLUE TSV folder, a local `datasets` copy, or (``data_dir`` None) the hub."""
        if data_dir is None or hub.is_local_copy(Path(data_dir)):
            return hub.read(self, None if data_dir is None else Path(data_dir), split)
        path = _split_file(Path(data_dir), split)
        rows = _rows(path)
        if self.num_columns is None:
            width, columns = len(rows[0][1]), self._header_columns(path, rows[0][1])
            rows = rows[1:]
            if not rows:
                raise Q8Error(f"{path}: has a header but no examples")
        else:
            width, columns = self.num_columns, (self.text_a_column, self.text_b_column, self.label_column)
        return [self._example(path, line, fields, width, columns) for line, fields in rows]

    def _header_columns(self, path: Path, header: list[str]) -> tuple[int, int | None, int]:
        """Positions of text_a, text_b and label in ``header``."""

        def position(name: str | int | None) -> int | None:
            if name is None:
                return None
            if name not in header:
                raise Q8Error(f"{path} line 1: header has no column {name!r} (columns: {', '.join(header)})")
            return header.index(name)

        return position(self.text_a_column), position(self.text_b_column), position(self.label_column)

    def _example(self, path: Path, line: int, fields: list[str], width: int, columns) -> Example:
        if len(fields) != width:
            raise Q8Error(f"{path} line {line}: expected {width} columns, found {len(fields)}")
        a, b, label = columns
        where = f"{path} line {line}"
        return Example(fields[a], None if b is None else fields[b], self._label(where, fields[label]))

    def _label(self, where: str, value: str) -> int | float:
        """The class index of ``value``, or its float score for regression."""
        if self.labels is None:
            try:
                score = float(value)
            except ValueError:
                raise Q8Error(f"{where}: score {value!r} is not a number") from None
            if not math.isfinite(score):
                raise Q8Error(f"{where}: score {value!r} is not a finite number")
            return score
        if value not in self.labels:
            raise Q8Error(f"{where}: label {value!r} is not one of {', '.join(self.labels)}")
        return self.labels.index(value)


def _split_file(data_dir: Path, split: str) -> Path:
    """``<data_dir>/<split>.tsv``, or a Q8Error saying what is there instead."""
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        raise Q8Error(f"data directory {data_dir} {what}")
    path = data_dir / f"{split}.tsv"
    if not path.is_file():
        names = sorted(p.name for p in data_dir.iterdir())
        has = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "nothing"
        raise Q8Error(f"{path} not found ({data_dir} has: {has})")
    return path


def _decode(path: Path) -> str:
    """The file's text: strict UTF-8, an optional BOM dropped."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Q8Error(f"{path}: cannot read ({exc.strerror or exc})") from None
    offset = len(_BOM) if data.startswith(_BOM) else 0
    try:
        return data[offset:].decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        pos = offset + exc.start
        line = data.count(b"\n", 0, pos) + 1
        raise Q8Error(f"{path} line {line}: not valid UTF-8 (byte 0x{data[pos]:02x} at offset {pos})") from None


def _rows(path: Path) -> list[Row]:
    """Every record with its line number; trailing empty lines dropped, never an empty list."""
    reader = csv.reader(io.StringIO(_decode(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    rows: list[Row] = []
    try:
        for fields in reader:
            rows.append((reader.line_num, fields))
    except csv.Error as exc:
        raise Q8Error(f"{path} line {reader.line_num}: {exc}") from None
    while rows and not rows[-1][1]:
        rows.pop()
    if not rows:
        raise Q8Error(f"{path}: file is empty")
    return rows


def _glue(name: str, labels, metrics, a, b, label, description: str, hub: tuple, **extra) -> GlueTask:
    return GlueTask(name=name, labels=labels, metrics=metrics, main_metric=metrics[0], text_a_column=a,
                    text_b_column=b, label_column=label, description=description, hub_config=hub[0],
                    hub_text_columns=hub[1:], **extra)


_BINARY, _NLI2 = ("0", "1"), ("entailment", "not_entailment")

GLUE_TASKS: list[GlueTask] = [
    _glue("cola", _BINARY, ("mcc", "accuracy"), 3, None, 1, "CoLA: grammatical acceptability",
          ("cola", "sentence", None), num_columns=4),
    _glue("sst-2", _BINARY, ("accuracy",), "sentence", None, "label", "SST-2: sentiment of movie reviews",
          ("sst2", "sentence", None), sample_dir=SAMPLES / "sst-2"),
    _glue("mrpc", _BINARY, ("f1", "accuracy"), "#1 String", "#2 String", "Quality", "MRPC: paraphrase detection",
          ("mrpc", "sentence1", "sentence2")),
    _glue("sts-b", None, ("pearson", "spearmanr", "corr"), "sentence1", "sentence2", "score",
          "STS-B: semantic similarity score, 0-5 (regression)", ("stsb", "sentence1", "sentence2")),
    _glue("qqp", _BINARY, ("f1", "accuracy"), "question1", "question2", "is_duplicate",
          "QQP: duplicate Quora questions", ("qqp", "question1", "question2")),
    _glue("mnli", ("contradiction", "entailment", "neutral"), ("accuracy",), "sentence1", "sentence2",
          "gold_label", "MNLI: natural language inference, matched and mismatched dev",
          ("mnli", "premise", "hypothesis"), eval_splits={"": "dev_matched", "_mm": "dev_mismatched"}),
    _glue("qnli", _NLI2, ("accuracy",), "question", "sentence", "label", "QNLI: does the sentence answer the question",
          ("qnli", "question", "sentence")),
    _glue("rte", _NLI2, ("accuracy",), "sentence1", "sentence2", "label", "RTE: textual entailment",
          ("rte", "sentence1", "sentence2")),
    _glue("wnli", _BINARY, ("accuracy",), "sentence1", "sentence2", "label", "WNLI: Winograd pronoun resolution",
          ("wnli", "sentence1", "sentence2")),
]


@hookimpl
def register_tasks(register):
    for task in GLUE_TASKS:
        register(task)
