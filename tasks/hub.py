"""GLUE through the Hugging Face ``datasets`` library: the hub's ``nyu-mll/glue``, or a local copy.

Yields exactly the :class:`~q8core.task.Example` objects the TSV reader yields for the same rows.
A local copy is a folder written by ``DatasetDict.save_to_disk`` (it holds ``dataset_dict.json``)
or a folder of parquet files named by split, as the hub stores them
(``sst2/train-00000-of-00001.parquet``, ``validation-*.parquet``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from q8core.errors import Q8Error
from q8core.task import Example

if TYPE_CHECKING:  # pragma: no cover
    from .glue import GlueTask

HUB_DATASET = "nyu-mll/glue"
#: our split names -> the hub's
HUB_SPLITS = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
              "dev_mismatched": "validation_mismatched", "test": "test"}
LOCAL_HINT = ("pass --data-dir with a local GLUE task folder (train.tsv, dev.tsv) or a `datasets` copy "
              "(save_to_disk or parquet)")


def is_local_copy(folder: Path) -> bool:
    """Whether ``folder`` holds a saved ``datasets`` copy rather than GLUE TSV files."""
    return (folder / "dataset_dict.json").is_file() or any(folder.rglob("*.parquet"))


def read(task: "GlueTask", data_dir: Path | None, split: str) -> list[Example]:
    """The examples of ``split`` from the hub (``data_dir`` None) or from a local copy."""
    hub_split = HUB_SPLITS.get(split, split)
    if data_dir is None:
        dataset, where = _from_hub(task, hub_split), f"{HUB_DATASET}/{task.hub_config}:{hub_split}"
    else:
        dataset, where = _from_folder(data_dir, hub_split), f"{data_dir} ({hub_split})"
    return _examples(task, dataset, where)


def _quiet_datasets():
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    hub_logging.set_verbosity_error()
    return datasets


def _from_hub(task: "GlueTask", hub_split: str):
    datasets = _quiet_datasets()
    try:
        return datasets.load_dataset(HUB_DATASET, task.hub_config, split=hub_split)
    except (ConnectionError, OSError) as exc:
        reason = "offline" if datasets.config.HF_HUB_OFFLINE else type(exc).__name__
        raise Q8Error(f"cannot fetch GLUE {task.hub_config} from the Hugging Face hub ({reason}); "
                      f"{LOCAL_HINT}") from None
    except ValueError as exc:  # e.g. an unknown split
        raise Q8Error(f"{HUB_DATASET}/{task.hub_config}: {str(exc).splitlines()[0]}") from None


def _from_folder(folder: Path, hub_split: str):
    datasets = _quiet_datasets()
    if (folder / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(folder))
        if hub_split not in saved:
            raise Q8Error(f"{folder}: saved dataset has no split {hub_split!r} (it has: {', '.join(saved)})")
        return saved[hub_split]
    files = sorted({*folder.rglob(f"{hub_split}-*.parquet"), *folder.rglob(f"{hub_split}.parquet")})
    if not files:
        raise Q8Error(f"{folder}: no parquet file for split {hub_split!r} ({hub_split}-*.parquet)")
    try:
        return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # pyarrow reports a damaged file in many ways
        raise Q8Error(f"{files[0].parent}: cannot read {hub_split} parquet ({type(exc).__name__})") from None


def _examples(task: "GlueTask", dataset, where: str) -> list[Example]:
    a, b = task.hub_text_columns
    missing = [c for c in (a, b, "label") if c is not None and c not in dataset.column_names]
    if missing:
        raise Q8Error(f"{where}: no column {missing[0]!r} (columns: {', '.join(dataset.column_names)})")
    to_label = _label_mapper(task, dataset.features["label"], where)
    return [Example(row[a], None if b is None else row[b], to_label(row["label"], i))
            for i, row in enumerate(dataset)]


def _label_mapper(task: "GlueTask", feature, where: str):
    """Hub labels -> ours: a score for regression; for classes, the class name when it is one of the
    task's labels (MNLI, RTE, QNLI), else the integer as a string (``0``/``1`` in the TSVs)."""
    if task.labels is None:
        def score(value, row):
            return float(value)
        return score
    names = getattr(feature, "names", None)

    def label(value, row):
        if value is None or value < 0:
            raise Q8Error(f"{where} row {row}: no label (a test split?)")
        name = names[value] if names and names[value] in task.labels else str(value)
        if name not in task.labels:
            raise Q8Error(f"{where} row {row}: label {value!r} is not one of {', '.join(task.labels)}")
        return task.labels.index(name)
    return label
