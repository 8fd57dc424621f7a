"""Shared fixtures: a tiny random BERT with its own WordPiece vocabulary, and toy GLUE folders.

Nothing here reads ../shared or the network: every file is written by the fixtures.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

# Tests see only the built-in plugins, whatever else is installed on the machine.
os.environ["Q8_PLUGINS"] = "torch,glue"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["good", "great", "fine", "nice", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "a", "movie", "film", "plot", "acting", "was", "is", "very", "really", "story", "cast"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER + [".", ","]


def sentiment_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """SST-2-style (sentence, label) rows: the label says whether a positive word occurs."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words) + " .", str(label)))
    return rows


def similarity_rows(n: int, seed: int) -> list[tuple[str, str, str]]:
    """STS-B-style (sentence1, sentence2, score) rows: the score counts shared words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.sample(FILLER, 5)
        shared = rng.randint(0, 5)
        b = a[:shared] + rng.sample([w for w in FILLER if w not in a], 5 - shared)
        rows.append((" ".join(a), " ".join(b), f"{shared:.3f}"))
    return rows


def write_sst2(folder: Path, n_train: int = 256, n_dev: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("dev", n_dev, 2)):
        lines = ["sentence\tlabel"] + [f"{s}\t{label}" for s, label in sentiment_rows(n, seed)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_stsb(folder: Path, n_train: int = 96, n_dev: int = 48) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split, n, seed in (("train", n_train, 3), ("dev", n_dev, 4)):
        lines = [header] + [f"{i}\tmain-news\tx\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{s}"
                            for i, (a, b, s) in enumerate(similarity_rows(n, seed))]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 random BERT folder with a WordPiece tokenizer, as from save_pretrained."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(str(folder))
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture
def sst2_dir(tmp_path) -> Path:
    return write_sst2(tmp_path / "SST-2")


@pytest.fixture
def stsb_dir(tmp_path) -> Path:
    return write_stsb(tmp_path / "STS-B")
