"""GLUE task plugin: every layout read from hand-written TSVs, and every malformed input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from q8core.errors import Q8Error
from q8core.task import Example
from tasks.glue import GLUE_TASKS, GlueTask

TASKS = {t.name: t for t in GLUE_TASKS}

MNLI_TRAIN_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
                     "sentence1_parse sentence2_parse sentence1 sentence2 label1 gold_label").split()
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
STSB_HEADER = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()


def tsv(rows: list[list[str]]) -> str:
    return "".join("\t".join(r) + "\n" for r in rows)


def write(directory: Path, split: str, text: str | bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{split}.tsv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def read(task: str, tmp_path: Path, text: str | bytes, split: str = "train") -> list[Example]:
    write(tmp_path / task, split, text)
    return TASKS[task].read(tmp_path / task, split)


def raises(task: str, tmp_path: Path, text: str | bytes, pattern: str, split: str = "train") -> str:
    with pytest.raises(Q8Error, match=pattern) as info:
        read(task, tmp_path, text, split)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / task / f"{split}.tsv") in message
    return message


# -- metadata ---------------------------------------------------------------------------------

def test_all_nine_tasks_with_glue_names():
    assert [t.name for t in GLUE_TASKS] == ["cola", "sst-2", "mrpc", "sts-b", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert all(isinstance(t, GlueTask) and t.description for t in GLUE_TASKS)
    assert all(t.main_metric in t.metrics for t in GLUE_TASKS)


def test_task_metadata():
    stsb, mnli = TASKS["sts-b"], TASKS["mnli"]
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.labels is None
    assert stsb.metrics == ("pearson", "spearmanr", "corr") and stsb.main_metric == "pearson"
    assert mnli.num_labels == 3 and mnli.labels == ("contradiction", "entailment", "neutral")
    assert mnli.eval_splits == {"": "dev_matched", "_mm": "dev_mismatched"}
    assert TASKS["rte"].eval_splits == {"": "dev"}
    assert (TASKS["cola"].metrics, TASKS["cola"].main_metric) == (("mcc", "accuracy"), "mcc")
    assert (TASKS["mrpc"].main_metric, TASKS["qqp"].main_metric) == ("f1", "f1")
    assert TASKS["qnli"].labels == TASKS["rte"].labels == ("entailment", "not_entailment")
    assert TASKS["wnli"].labels == TASKS["sst-2"].labels == ("0", "1")


def test_register_tasks_hook_registers_every_task():
    from tasks import glue

    seen = []
    glue.register_tasks(seen.append)
    assert seen == GLUE_TASKS


# -- each layout -------------------------------------------------------------------------------

def test_cola_headerless(tmp_path):
    text = tsv([["gj04", "1", "", "Our friends won't buy this analysis."], ["gj04", "0", "*", "They drank the pub."]])
    assert read("cola", tmp_path, text) == [Example("Our friends won't buy this analysis.", None, 1),
                                            Example("They drank the pub.", None, 0)]


def test_sst2(tmp_path):
    text = tsv([["sentence", "label"], ["a charming journey . ", "1"], ["dull", "0"]])
    assert read("sst-2", tmp_path, text, "dev") == [Example("a charming journey . ", None, 1), Example("dull", None, 0)]


def test_mrpc_with_bom_header(tmp_path):
    text = "\ufeff" + tsv([["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                          ["1", "702876", "702977", 'He said "hi".', "He greeted."], ["0", "1", "2", "x", "y"]])
    assert text.encode("utf-8").startswith(b"\xef\xbb\xbf")
    assert read("mrpc", tmp_path, text) == [Example('He said "hi".', "He greeted.", 1), Example("x", "y", 0)]


def test_stsb_scores_and_unbalanced_quote(tmp_path):
    rows = [STSB_HEADER,
            ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", '"A plane is taking off.', "A plane.", "5.000"],
            ["1", "main-news", "x", "2014", "2", "none", "none", "It said.", 'Bye"', "0.8"],
            ["2", "main-news", "x", "2014", "3", "none", "none", "c", "d", "3.2"]]
    assert read("sts-b", tmp_path, tsv(rows), "dev") == [Example('"A plane is taking off.', "A plane.", 5.0),
                                                         Example("It said.", 'Bye"', 0.8), Example("c", "d", 3.2)]


def test_qqp(tmp_path):
    text = tsv([["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                ["133273", "213221", "213222", "How is life?", "How's life?", "1"], ["5", "6", "7", "a?", "b?", "0"]])
    assert read("qqp", tmp_path, text) == [Example("How is life?", "How's life?", 1), Example("a?", "b?", 0)]


def test_mnli_train_12_and_dev_matched_16_columns(tmp_path):
    def row(n, s1, s2, gold, width):
        return [str(n), "p", "q", "fiction", "(", "(", "(", "(", s1, s2] + ["neutral"] * (width - 11) + [gold]

    train = tsv([MNLI_TRAIN_HEADER, row(0, "A man.", "A person.", "entailment", 12)])
    assert read("mnli", tmp_path, train) == [Example("A man.", "A person.", 1)]
    dev = tsv([MNLI_DEV_HEADER, row(0, "It rains.", "It is dry.", "contradiction", 16), row(1, "a", "b", "neutral", 16)])
    assert len(MNLI_DEV_HEADER) == 16 and MNLI_DEV_HEADER[-1] == "gold_label"
    assert read("mnli", tmp_path, dev, "dev_matched") == [Example("It rains.", "It is dry.", 0), Example("a", "b", 2)]


def test_qnli_rte_wnli(tmp_path):
    qnli = tsv([["index", "question", "sentence", "label"], ["0", "Who?", "Him.", "not_entailment"]])
    assert read("qnli", tmp_path, qnli) == [Example("Who?", "Him.", 1)]
    rte = tsv([["index", "sentence1", "sentence2", "label"], ["0", "A.", "B.", "entailment"]])
    assert read("rte", tmp_path, rte) == [Example("A.", "B.", 0)]
    wnli = tsv([["index", "sentence1", "sentence2", "label"], ["0", "A.", "B.", "1"]])
    assert read("wnli", tmp_path, wnli) == [Example("A.", "B.", 1)]


def test_columns_found_by_header_name(tmp_path):
    text = tsv([["label", "sentence2", "index", "sentence1"], ["entailment", "B.", "0", "A."]])
    assert read("rte", tmp_path, text) == [Example("A.", "B.", 0)]


def test_crlf_gives_same_examples_as_lf(tmp_path):
    rows = [["index", "sentence1", "sentence2", "label"], ["0", "A.", "B.", "entailment"], ["1", "C.", "D.", "not_entailment"]]
    lf = read("rte", tmp_path / "lf", tsv(rows))
    crlf = read("rte", tmp_path / "crlf", tsv(rows).replace("\n", "\r\n").encode("utf-8"))
    assert crlf == lf == [Example("A.", "B.", 0), Example("C.", "D.", 1)]
    stsb = [STSB_HEADER, ["0", "g", "f", "y", "1", "n", "n", "a", "b", "2.5"]]
    assert read("sts-b", tmp_path, tsv(stsb).replace("\n", "\r\n").encode("utf-8"))[0].label == 2.5


def test_trailing_empty_lines_are_skipped(tmp_path):
    text = tsv([["sentence", "label"], ["ok", "1"]]) + "\n\n"
    assert read("sst-2", tmp_path, text) == [Example("ok", None, 1)]


# -- errors ------------------------------------------------------------------------------------

def test_missing_data_dir(tmp_path):
    with pytest.raises(Q8Error, match=r"does not exist") as info:
        TASKS["rte"].read(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(info.value) and "\n" not in str(info.value)


def test_data_dir_is_a_file(tmp_path):
    (tmp_path / "RTE").write_text("x")
    with pytest.raises(Q8Error, match=r"RTE is not a directory"):
        TASKS["rte"].read(tmp_path / "RTE", "train")


def test_missing_split_file_lists_directory(tmp_path):
    write(tmp_path / "MNLI", "train", "x\n")
    write(tmp_path / "MNLI", "dev_matched", "x\n")
    with pytest.raises(Q8Error, match=r"dev_mismatched\.tsv not found .*has: dev_matched\.tsv, train\.tsv"):
        TASKS["mnli"].read(tmp_path / "MNLI", "dev_mismatched")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Q8Error, match=r"dev\.tsv not found .*has: nothing"):
        TASKS["mnli"].read(tmp_path / "empty", "dev")


def test_not_utf8_names_line(tmp_path):
    head = b"\xef\xbb\xbf" + tsv([["sentence", "label"], ["good", "1"]]).encode()
    raises("sst-2", tmp_path, head + b"caf\xe9\t0\n", rf"train\.tsv line 3: not valid UTF-8 \(byte 0xe9 at offset {len(head) + 3}\)")


def test_empty_file(tmp_path):
    raises("sst-2", tmp_path, "", r"train\.tsv: file is empty")
    raises("cola", tmp_path, "\n\n", r"train\.tsv: file is empty")


def test_header_only(tmp_path):
    raises("sst-2", tmp_path, "sentence\tlabel\n", r"train\.tsv: has a header but no examples")


def test_header_missing_column(tmp_path):
    text = tsv([["index", "promptID", "sentence1", "sentence2", "label1"], ["0", "1", "a", "b", "neutral"]])
    raises("mnli", tmp_path, text, r"train\.tsv line 1: header has no column 'gold_label'")


def test_wrong_column_count(tmp_path):
    rows = [STSB_HEADER] + [["0", "g", "f", "y", "1", "n", "n", "a", "b", "2.5"]] * 5
    rows.append(["0", "g", "f", "y", "1", "n", "n", "a", "2.5"])
    raises("sts-b", tmp_path, tsv(rows), r"dev\.tsv line 7: expected 10 columns, found 9$", split="dev")
    raises("cola", tmp_path, tsv([["s", "1", "", "ok"], ["s", "1", "ok"]]), r"line 2: expected 4 columns, found 3")


def test_empty_line_in_the_middle_is_an_error(tmp_path):
    text = tsv([["sentence", "label"], ["a", "1"]]) + "\n" + tsv([["b", "0"]])
    raises("sst-2", tmp_path, text, r"line 3: expected 2 columns, found 0")


def test_label_outside_task_set(tmp_path):
    text = tsv([["index", "sentence1", "sentence2", "label"], ["0", "A.", "B.", "entailment"], ["1", "C.", "D.", "neutral"]])
    message = raises("rte", tmp_path, text, r"train\.tsv line 3: label 'neutral' is not one of entailment, not_entailment")
    assert message.endswith("not_entailment")


def test_stsb_non_numeric_score(tmp_path):
    rows = [STSB_HEADER, ["0", "g", "f", "y", "1", "n", "n", "a", "b", "high"]]
    raises("sts-b", tmp_path, tsv(rows), r"train\.tsv line 2: score 'high' is not a number")


@pytest.mark.parametrize("score", ["nan", "inf", "-Infinity"])
def test_stsb_non_finite_score(tmp_path, score):
    rows = [STSB_HEADER, ["0", "g", "f", "y", "1", "n", "n", "a", "b", "1.0"], ["1", "g", "f", "y", "1", "n", "n", "a", "b", score]]
    raises("sts-b", tmp_path, tsv(rows), rf"train\.tsv line 3: score '{re.escape(score)}' is not a finite number")


def test_oversized_field_is_a_q8error(tmp_path):
    """A csv.Error becomes a Q8Error naming file and line (the limit is process-wide: other
    libraries raise it, so the test sets it)."""
    import csv

    previous = csv.field_size_limit(131072)
    try:
        text = tsv([["sentence", "label"], ["x" * 200_000, "1"]])
        raises("sst-2", tmp_path, text, r"train\.tsv line 2: field larger than field limit")
    finally:
        csv.field_size_limit(previous)
