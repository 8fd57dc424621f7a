"""MindSpore ModelZoo BERT checkpoints through ``--model``: the .ckpt reader, the name map, the
converted Hugging Face folder both backends load, and the one-line errors.

The ModelZoo checkpoints are made here from the session's tiny random BERT: its weights renamed to
the ModelZoo naming (by a table written out below, independently of q8core.modelzoo's own) and
written as a .ckpt, by ``mindspore.save_checkpoint`` where MindSpore is installed and otherwise by the
small test-only writer below, which produces the same protobuf wire format.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from q8core import modelzoo
from q8core.errors import Q8Error
from q8core.spec import QuantSpec

from helpers import run_q8

LABELS = ("0", "1")
FP32 = QuantSpec(mode="fp32")


# -- a test-only .ckpt writer (mindspore/train/checkpoint.proto wire format) -------------------
# Checkpoint { repeated Value value = 1; }  Value { string tag = 1; TensorProto tensor = 2; }
# TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }
# MindSpore writes one Checkpoint message per tensor (or per slice of a large tensor), back to back.

_TYPE_NAMES = {"float32": "Float32", "float16": "Float16", "float64": "Float64", "int32": "Int32", "int64": "Int64"}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def write_test_ckpt(path: Path, tensors: dict[str, np.ndarray], slices: int = 1) -> Path:
    """TEST-ONLY: ``tensors`` as a MindSpore .ckpt (``slices`` > 1 splits each tensor like MindSpore
    splits one over 512 MB: consecutive entries with the same tag and the full dims)."""
    with open(path, "wb") as fh:
        for name, value in tensors.items():
            array = np.array(value, order="C")  # (np.ascontiguousarray makes a 0-d array 1-d)
            dims = b"".join(_varint(1 << 3 | 0) + _varint(d) for d in array.shape)  # proto2: unpacked
            parts = np.array_split(array.reshape(-1), slices) if array.size >= slices else [array.reshape(-1)]
            for part in parts:
                kind = _TYPE_NAMES[array.dtype.name].encode()
                tensor = dims + _bytes_field(2, kind) + _bytes_field(3, part.tobytes())
                fh.write(_bytes_field(1, _bytes_field(1, name.encode()) + _bytes_field(2, tensor)))
    return path


def mindspore():
    """MindSpore (skipping without it), its device chosen before anything starts its runtime."""
    ms = pytest.importorskip("mindspore")
    from backends.mindspore import device

    device.select("cpu")
    return ms


def write_ms_ckpt(path: Path, tensors: dict[str, np.ndarray], append: dict | None = None) -> Path:
    ms = mindspore()
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in tensors.items()], str(path),
                       append_dict=append)
    return path


# -- Hugging Face names -> ModelZoo names (the test's own table) ------------------------------

_LAYER = {"attention.self.query": "attention.attention.query_layer",
          "attention.self.key": "attention.attention.key_layer",
          "attention.self.value": "attention.attention.value_layer",
          "attention.output.dense": "attention.output.dense",
          "attention.output.LayerNorm": "attention.output.layernorm", "intermediate.dense": "intermediate",
          "output.dense": "output.dense", "output.LayerNorm": "output.layernorm"}
_EMB = {"current": {"word_embeddings": "bert_embedding_lookup.embedding_table",
                    "token_type_embeddings": "bert_embedding_postprocessor.token_type_embedding.embedding_table",
                    "position_embeddings": "bert_embedding_postprocessor.full_position_embedding.embedding_table"},
        "mindspore1": {"word_embeddings": "bert_embedding_lookup.embedding_table",
                       "token_type_embeddings": "bert_embedding_postprocessor.embedding_table",
                       "position_embeddings": "bert_embedding_postprocessor.full_position_embeddings"}}


def modelzoo_names(state: dict[str, np.ndarray], prefix: str = "bert.bert.", naming: str = "current",
                   tinybert: bool = False) -> dict[str, np.ndarray]:
    """A Hugging Face BERT state dict under ModelZoo names; the classifier goes to ``dense_1`` one level
    above the BertModel (``prefix`` less its last part)."""
    parent = prefix[:-1].rpartition(".")[0] + "." if prefix.count(".") > 1 else ""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("bert.")
        leaf = key.rpartition(".")[2]
        if key.startswith("classifier."):
            out[f"{parent}dense_1.{leaf}"] = value
            continue
        if key.endswith("position_ids"):
            continue
        match = re.fullmatch(r"embeddings\.(\w+)\.weight", key)
        if match and match.group(1) in _EMB[naming]:
            name = _EMB[naming][match.group(1)]
        elif key.startswith("embeddings.LayerNorm."):
            name = "bert_embedding_postprocessor.layernorm." + {"weight": "gamma", "bias": "beta"}[leaf]
        elif key.startswith("pooler.dense."):
            name = "dense." + leaf
        else:
            layer, cell = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.\w+", key).groups()
            zoo = _LAYER[cell]
            if zoo.endswith("layernorm"):
                leaf = {"weight": "gamma", "bias": "beta"}[leaf]
            name = f"bert_encoder.layers.{layer}.{zoo}.{leaf}"
        if tinybert and name.startswith("bert_"):
            name = "tiny" + name
        out[prefix + name] = value
    return out


def modelzoo_yaml(config: dict, **overrides) -> str:
    """A ModelZoo-style task yaml (three documents, the BertConfig block in ``bert_net_cfg``)."""
    fields = {key: config[key] for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "intermediate_size", "hidden_dropout_prob", "attention_probs_dropout_prob",
                                           "max_position_embeddings", "type_vocab_size", "initializer_range")}
    fields.update(seq_length=128, hidden_act='"gelu"', use_relative_positions=False, dtype="mstype.float32",
                  compute_type="mstype.float16")
    fields.update(overrides)
    block = "".join(f"    {key}: {value}\n" for key, value in fields.items() if value is not None)
    return ("# Builtin Configurations\nenable_modelarts: False\ndescription: \"run_classifier\"\n"
            "num_class: 2\ntrain_batch_size: 32\n\noptimizer_cfg:\n    optimizer: 'Lamb'\n"
            f"    Lamb:\n        learning_rate: 0.00002\n\nbert_net_cfg:\n{block}\n---\n"
            "description: \"help text\"\n---\ndevice_target: ['Ascend', 'GPU', 'CPU']\n")


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv(modelzoo.CACHE_ENV, str(tmp_path / "cache"))


def _copy_tokenizer(source: Path, folder: Path) -> None:
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)


@pytest.fixture(scope="module")
def ref_bert(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT as the ModelZoo would run it: tanh GELU, LayerNorm epsilon 1e-7."""
    folder = tmp_path_factory.mktemp("ref-bert")
    for file in tiny_bert.iterdir():
        shutil.copy(file, folder / file.name)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_act="gelu_new", layer_norm_eps=1e-7)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def ref_cls(ref_bert, tmp_path_factory) -> Path:
    """A 'fine-tuned' classifier of ``ref_bert``: a saved 2-label head."""
    import torch
    from transformers import BertForSequenceClassification

    folder = tmp_path_factory.mktemp("ref-cls")
    torch.manual_seed(5)
    BertForSequenceClassification.from_pretrained(str(ref_bert), num_labels=2).save_pretrained(str(folder))
    _copy_tokenizer(ref_bert, folder)
    return folder


def _state(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "model.safetensors"))


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def zoo_folder(tmp_path: Path, ref: Path, *, name: str = "zoo", prefix: str = "bert.bert.", naming: str = "current",
               tinybert: bool = False, writer: str = "test", extra: dict | None = None, config: str = "yaml",
               edit=None) -> Path:
    """A ModelZoo-style folder: ``bert.ckpt`` (``ref``'s weights, ModelZoo names) + config + vocab.txt."""
    folder = tmp_path / name
    folder.mkdir()
    tensors = modelzoo_names(_state(ref), prefix=prefix, naming=naming, tinybert=tinybert)
    tensors.update(extra or {})
    if edit is not None:
        edit(tensors)
    if writer == "mindspore":
        write_ms_ckpt(folder / "bert.ckpt", tensors, append={"epoch_num": 3, "step_num": 30})
    else:
        write_test_ckpt(folder / "bert.ckpt", tensors)
    if config == "yaml":
        (folder / "task_classifier_config.yaml").write_text(modelzoo_yaml(_config(ref)))
    elif config == "json":
        hf = {k: v for k, v in _config(ref).items() if k not in ("architectures", "id2label", "label2id")}
        (folder / "config.json").write_text(json.dumps(hf))
    shutil.copy(ref / "vocab.txt", folder / "vocab.txt")
    return folder


def _batch(seed: int = 0, b: int = 4, s: int = 11) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((b, s), np.int64)
    mask[1, 7:] = mask[3, 4:] = 0
    ids = np.where(mask == 1, rng.integers(5, 29, size=(b, s)), 0)
    types = np.zeros((b, s), np.int64)
    types[:, 6:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types * mask}


def _torch_logits(source, labels=LABELS, seed=42) -> np.ndarray:
    from backends.pytorch.backend import TorchBackend

    backend = TorchBackend.from_pretrained(str(source), labels=labels, spec=FP32, device="cpu", seed=seed)
    return backend.predict(_batch())


# -- the .ckpt reader -------------------------------------------------------------------------

def test_reader_on_the_test_writer(tmp_path):
    tensors = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "b": np.float16([1.5, -2]),
               "ids": np.arange(6, dtype=np.int32).reshape(2, 3), "global_step": np.array(7, np.int32)}
    for slices in (1, 3):
        read = modelzoo.read_checkpoint(write_test_ckpt(tmp_path / f"t{slices}.ckpt", tensors, slices=slices))
        assert list(read) == list(tensors)
        for name, value in tensors.items():
            assert read[name].shape == value.shape
            np.testing.assert_array_equal(read[name], value)
        assert read["b"].dtype == np.float32 and read["ids"].dtype == np.int32


def test_reader_matches_mindspore_on_a_mindspore_checkpoint(tmp_path, monkeypatch):
    ms = mindspore()
    from mindspore.train import serialization

    rng = np.random.default_rng(0)
    data = {"w": rng.standard_normal((40, 8)).astype(np.float32), "h": rng.standard_normal((3,)).astype(np.float16),
            "i": np.arange(6, dtype=np.int32).reshape(2, 3), "s": np.float32(2.5)}
    params = [{"name": k, "data": ms.Tensor(v)} for k, v in data.items()]
    params.append({"name": "bf", "data": ms.Tensor(np.float32([1.5, -2.25, 3.0]), ms.bfloat16)})
    ms.save_checkpoint(params, str(tmp_path / "plain.ckpt"), append_dict={"epoch_num": 3, "note": "hello"})
    ms.save_checkpoint(params, str(tmp_path / "crc.ckpt"), crc_check=True)
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)  # KB: every tensor over 1 KB comes in slices
    ms.save_checkpoint(params, str(tmp_path / "sliced.ckpt"))
    for name in ("plain", "crc", "sliced"):
        ours = modelzoo.read_checkpoint(tmp_path / f"{name}.ckpt")
        theirs = ms.load_checkpoint(str(tmp_path / f"{name}.ckpt"))
        assert set(ours) == set(theirs)
        for key, value in theirs.items():
            if isinstance(value, str):
                assert ours[key] == value
                continue
            expected = value.float().asnumpy() if key == "bf" else value.asnumpy()
            assert ours[key].shape == expected.shape, key
            np.testing.assert_array_equal(ours[key], expected.astype(ours[key].dtype), err_msg=key)
    with modelzoo.Checkpoint(tmp_path / "sliced.ckpt") as ckpt:
        assert len(ckpt.tensors["w"].chunks) > 1  # the slicing really happened


def test_mindspore_reads_the_test_writer(tmp_path):
    ms = mindspore()
    tensors = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.float16([1.5, -2])}
    loaded = ms.load_checkpoint(str(write_test_ckpt(tmp_path / "t.ckpt", tensors, slices=2)))
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name].asnumpy(), value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_checkpoint_is_one_line(damage, tmp_path):
    path = write_test_ckpt(tmp_path / "x.ckpt", {"a": np.ones((64, 8), np.float32)})
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[:-100], "garbage": b"\xff" * 64, "empty": b""}[damage])
    with pytest.raises(Q8Error) as err:
        modelzoo.read_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# -- converted folders load in the backends as the Hugging Face folder they came from ----------

@pytest.mark.parametrize("prefix, naming, tinybert, config", [
    ("bert.bert.", "current", False, "yaml"),      # saved from the fine-tuning network (BertCLS)
    ("bert.", "mindspore1", False, "yaml"),        # MindSpore 1.x names, saved from BertCLSModel
    ("", "current", True, "yaml"),                 # a bare TinyBERT-style BertModel
    ("bert.bert.", "current", False, "json"),      # a Hugging Face config.json beside the ckpt
])
def test_pretrained_checkpoint_gives_the_logits_of_its_hf_folder(prefix, naming, tinybert, config, ref_bert,
                                                                  tmp_path):
    zoo = zoo_folder(tmp_path, ref_bert, prefix=prefix, naming=naming, tinybert=tinybert, config=config)
    folder = Path(modelzoo.prepare_model(str(zoo / "bert.ckpt"), num_labels=2))
    assert folder.parent == tmp_path / "cache" / "modelzoo"
    converted, original = _config(folder), _config(ref_bert)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps"):
        assert converted[key] == original[key], key
    assert converted["model_type"] == "bert"
    reference = {("bert." + k if not k.startswith("bert.") else k): v for k, v in _state(ref_bert).items()}
    weights = _state(folder)
    assert set(weights) == set(reference)
    for key, value in weights.items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)
    # same seed, same new classifier: the logits of the folder the checkpoint was made from
    np.testing.assert_allclose(_torch_logits(folder), _torch_logits(ref_bert), rtol=0, atol=1e-6)


@pytest.mark.parametrize("writer", ["test", "mindspore"])
def test_finetuned_classifier_is_kept_exactly(writer, ref_cls, tmp_path):
    state = _state(ref_cls)
    optimizer = {f"{m}.{k}": np.zeros_like(v) for m in ("moment1", "moment2")
                 for k, v in modelzoo_names(state).items()}
    extra = {**optimizer, "global_step": np.array([30], np.int32), "learning_rate": np.float32([2e-5]),
             "beta1_power": np.float32([0.9]), "bert.cls1.dense.weight": np.zeros((32, 32), np.float32)}
    zoo = zoo_folder(tmp_path, ref_cls, writer=writer, extra=extra)
    folder = modelzoo.prepare_model(str(zoo), num_labels=2)
    weights = _state(Path(folder))
    np.testing.assert_array_equal(weights["classifier.weight"], state["classifier.weight"])
    info = json.loads((Path(folder) / modelzoo.INFO_FILE).read_text())
    assert info["classifier_outputs"] == 2 and info["skipped"]["optimizer state"] == len(optimizer)
    reference = _torch_logits(ref_cls, seed=42)
    assert np.array_equal(_torch_logits(folder, seed=42), reference)
    assert np.array_equal(_torch_logits(folder, seed=7), reference)  # loaded, not initialised from the seed


def test_a_classifier_of_another_size_is_left_out(ref_cls, ref_bert, tmp_path):
    zoo = zoo_folder(tmp_path, ref_cls)
    warnings = []
    folder = modelzoo.prepare_model(str(zoo), num_labels=3, warn=warnings.append)
    assert len(warnings) == 1 and "2 output(s)" in warnings[0] and "3" in warnings[0]
    assert not any(k.startswith("classifier.") for k in _state(Path(folder)))
    three = ("a", "b", "c")
    np.testing.assert_allclose(_torch_logits(folder, labels=three), _torch_logits(ref_bert, labels=three),
                               rtol=0, atol=1e-6)
    assert modelzoo.prepare_model(str(zoo), num_labels=3, warn=warnings.append) == folder  # cached too


def test_mindspore_backend_loads_the_converted_folder(ref_cls, tmp_path, monkeypatch):
    mindspore()
    from backends.mindspore.backend import MindSporeBackend

    monkeypatch.setenv("Q8_MS_MODE", "pynative")
    folder = modelzoo.prepare_model(str(zoo_folder(tmp_path, ref_cls) / "bert.ckpt"), num_labels=2)

    def logits(source, seed):
        return MindSporeBackend.from_pretrained(str(source), labels=LABELS, spec=FP32, device="cpu",
                                                seed=seed).predict(_batch())

    reference = logits(ref_cls, 42)
    assert np.array_equal(logits(folder, 42), reference)
    assert np.array_equal(logits(folder, 7), reference)
    np.testing.assert_allclose(reference, _torch_logits(ref_cls), rtol=0, atol=1e-5)


def test_conversion_is_cached_and_follows_the_inputs(ref_bert, tmp_path):
    zoo = zoo_folder(tmp_path, ref_bert)
    first = Path(modelzoo.prepare_model(str(zoo)))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert Path(modelzoo.prepare_model(str(zoo / "bert.ckpt"))) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    yaml = zoo / "task_classifier_config.yaml"
    yaml.write_text(yaml.read_text().replace("attention_probs_dropout_prob: 0.1", "attention_probs_dropout_prob: 0.0"))
    second = Path(modelzoo.prepare_model(str(zoo)))
    assert second != first and _config(second)["attention_probs_dropout_prob"] == 0.0
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, second.name])  # no temporaries


@pytest.mark.parametrize("layout", ["flat", "bert_network", "the-one-that-fits"])
def test_yaml_layouts(layout, tmp_path):
    implied = {"vocab_size": 29, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
               "max_position_embeddings": 64, "type_vocab_size": 2}
    small = "    hidden_size: 32\n    num_hidden_layers: 2\n    num_attention_heads: 4\n"
    large = "    hidden_size: 1024\n    num_hidden_layers: 24\n    num_attention_heads: 16\n"
    text = {"flat": "hidden_size: 32\nnum_hidden_layers: 2\nnum_attention_heads: 4\nhidden_act: relu\n",
            "bert_network": f"bert_network: 'base'\nbase_net_cfg:\n{small}large_net_cfg:\n{large}",
            "the-one-that-fits": f"large_net_cfg:\n{large}base_net_cfg:\n{small}"}[layout]
    (tmp_path / "c.yaml").write_text(text)
    config, _ = modelzoo.config_from_yaml(tmp_path / "c.yaml", implied)
    assert config["num_attention_heads"] == 4 and config["vocab_size"] == 29 and config["intermediate_size"] == 64
    assert config["hidden_act"] == ("relu" if layout == "flat" else "gelu_new")
    assert config["layer_norm_eps"] == 1e-7


def test_float16_checkpoint_converts_to_float32(ref_bert, tmp_path):
    def half(tensors):
        for key in tensors:
            tensors[key] = tensors[key].astype(np.float16)

    folder = Path(modelzoo.prepare_model(str(zoo_folder(tmp_path, ref_bert, edit=half))))
    weights = _state(folder)
    word = weights["bert.embeddings.word_embeddings.weight"]
    assert word.dtype == np.float32
    np.testing.assert_array_equal(word, _state(ref_bert)["embeddings.word_embeddings.weight"].astype(np.float16))


def test_hub_ids_and_hf_folders_are_left_alone(tiny_bert, tmp_path):
    assert modelzoo.prepare_model("bert-base-uncased") == "bert-base-uncased"
    assert modelzoo.prepare_model(str(tiny_bert)) == str(tiny_bert)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert modelzoo.prepare_model(str(empty)) == str(empty)


def test_tokenizer_of_the_converted_folder(ref_bert, tmp_path):
    from transformers import AutoTokenizer

    folder = modelzoo.prepare_model(str(zoo_folder(tmp_path, ref_bert)))
    ours, theirs = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(str(ref_bert))
    text = ("The movie was GREAT .", "a Boring plot")
    assert ours(*text)["input_ids"] == theirs(*text)["input_ids"]


# -- through the command line -----------------------------------------------------------------

def _run(model: Path, sst2_dir: Path, out: Path, capsys, *more: str):
    return run_q8(["run", "--task", "sst-2", "--model", str(model), "--data-dir", str(sst2_dir),
                   "--output-dir", str(out), "--max-steps", "2", "--train-batch-size", "8", "--no-eval",
                   "--quiet", *more], capsys)


def test_q8_run_on_a_modelzoo_checkpoint(ref_cls, sst2_dir, tmp_path, capsys):
    zoo = zoo_folder(tmp_path, ref_cls)
    out = tmp_path / "out"
    code, _, err = _run(zoo, sst2_dir, out, capsys, "--mode", "fp32")
    assert code == 0, err
    assert json.loads((out / "run_config.json").read_text())["model"] == str(zoo)
    assert (out / "checkpoint-2" / "model.safetensors").exists()


def _rename(tensors):
    key = "bert.bert.bert_encoder.layers.1.attention.attention.query_layer.weight"
    tensors[key.replace("query_layer", "query_proj")] = tensors.pop(key)


def _transpose(tensors):
    key = "bert.bert.bert_encoder.layers.0.intermediate.weight"
    tensors[key] = np.ascontiguousarray(tensors[key].T)


def _drop(tensors):
    del tensors["bert.bert.bert_encoder.layers.1.output.layernorm.beta"]


@pytest.mark.parametrize("case, edit, needles", [
    ("renamed", _rename, ["bert.bert.bert_encoder.layers.1.attention.attention.query_proj.weight", "cannot be placed"]),
    ("reshaped", _transpose, ["bert.bert.bert_encoder.layers.0.intermediate.weight", "(32, 64)", "(64, 32)"]),
    ("missing", _drop, ["missing parameter bert.bert.bert_encoder.layers.1.output.layernorm.beta"]),
])
def test_bad_parameter_is_one_line_naming_it(case, edit, needles, ref_bert, sst2_dir, tmp_path, capsys):
    zoo = zoo_folder(tmp_path, ref_bert, edit=edit)
    out = tmp_path / "out"
    code, stdout, err = _run(zoo / "bert.ckpt", sst2_dir, out, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("q8: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert str(zoo / "bert.ckpt") in lines[0]
    assert not out.exists()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # nothing half-converted left behind


def _no_vocab(zoo):
    (zoo / "vocab.txt").unlink()


def _no_config(zoo):
    (zoo / "task_classifier_config.yaml").unlink()


def _no_heads(zoo):
    yaml = zoo / "task_classifier_config.yaml"
    yaml.write_text(re.sub(r"\n    num_attention_heads: \d+", "", yaml.read_text()))


def _wrong_vocab_size(zoo):
    yaml = zoo / "task_classifier_config.yaml"
    yaml.write_text(yaml.read_text().replace("vocab_size: 29", "vocab_size: 30"))


def _fast_gelu(zoo):
    yaml = zoo / "task_classifier_config.yaml"
    yaml.write_text(yaml.read_text().replace('hidden_act: "gelu"', 'hidden_act: "fast_gelu"'))


def _two_ckpts(zoo):
    shutil.copy(zoo / "bert.ckpt", zoo / "other.ckpt")


@pytest.mark.parametrize("case, damage, needles", [
    ("no-vocab", _no_vocab, ["no vocab.txt"]),
    ("no-config", _no_config, ["no configuration"]),
    ("no-heads", _no_heads, ["task_classifier_config.yaml", "num_attention_heads"]),
    ("vocab-size", _wrong_vocab_size, ["bert_embedding_lookup.embedding_table", "(29, 32)", "(30, 32)"]),
    ("fast-gelu", _fast_gelu, ["fast_gelu"]),
    ("two-ckpts", _two_ckpts, ["2 .ckpt files"]),
])
def test_bad_modelzoo_folder_is_one_line(case, damage, needles, ref_bert, sst2_dir, tmp_path, capsys):
    zoo = zoo_folder(tmp_path, ref_bert)
    damage(zoo)
    out = tmp_path / "out"
    code, _, err = _run(zoo, sst2_dir, out, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("q8: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()


def test_missing_ckpt_file_is_one_line(sst2_dir, tmp_path, capsys):
    code, _, err = _run(tmp_path / "nowhere.ckpt", sst2_dir, tmp_path / "out", capsys)
    assert code == 2 and err.strip() == f"q8: error: --model {tmp_path / 'nowhere.ckpt'}: no such file"


# -- q8 eval --model: the ModelZoo's run_eval.sh ------------------------------------------------

def _transformers_accuracy(folder: Path, dev_tsv: Path) -> float:
    """The dev accuracy of ``folder`` computed with transformers alone (no q8 code)."""
    import torch
    from sklearn.metrics import accuracy_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [line.split("\t") for line in dev_tsv.read_text().splitlines()[1:]]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    enc = tokenizer([r[0] for r in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1).numpy()
    return accuracy_score([int(r[1]) for r in rows], predicted)


@pytest.mark.parametrize("kind, backend", [("hf-folder", "torch"), ("modelzoo-ckpt", "torch"),
                                           ("modelzoo-ckpt", "mindspore")])
def test_eval_model_scores_a_finetuned_model_as_transformers_does(kind, backend, ref_cls, sst2_dir, tmp_path, capsys,
                                                                  monkeypatch):
    if backend == "mindspore":
        pytest.importorskip("mindspore", reason="MindSpore not installed")
        monkeypatch.setenv("Q8_PLUGINS", "torch,mindspore,glue")
    model = ref_cls if kind == "hf-folder" else zoo_folder(tmp_path, ref_cls) / "bert.ckpt"
    code, out, err = run_q8(["eval", "--model", str(model), "--task", "sst-2", "--data-dir", str(sst2_dir), "--json",
                             "--backend", backend], capsys)
    assert code == 0, err
    result = json.loads(out.splitlines()[0])
    assert result["mode"] == "fp32" and result["checkpoint"] == str(model)
    assert result["accuracy"] == pytest.approx(_transformers_accuracy(ref_cls, sst2_dir / "dev.tsv"), abs=1e-12)
    code, out, err = run_q8(["eval", "--model", str(model), "--task", "sst-2", "--data-dir", str(sst2_dir)], capsys)
    assert code == 0, err
    acc = result["accuracy"]
    assert out.splitlines()[-1] == f"The current result is {{'accuracy': {acc}}}, the best result is  {acc}"


def test_eval_model_dq_runs_the_dynamic_baseline(ref_cls, sst2_dir, capsys):
    code, out, err = run_q8(["eval", "--model", str(ref_cls), "--task", "sst-2", "--data-dir", str(sst2_dir),
                             "--mode", "dq"], capsys)
    assert code == 0, err
    assert f"sst-2 dev, {ref_cls} (dq, torch): accuracy=" in out


@pytest.mark.parametrize("case, needle", [
    ("pretrained", "has no classifier: it is a pre-trained model"),
    ("no task", "say which task it was fine-tuned on with --task"),
    ("qat", "--mode qat needs a q8 checkpoint"),
    ("regression", "its classifier has 2 output(s), the task needs 1"),
    ("both", "pass --checkpoint or --model, not both"),
    ("neither", "q8 eval needs --checkpoint"),
    ("task with checkpoint", "--task goes with --model"),
])
def test_eval_model_bad_input_is_one_line(case, needle, ref_bert, ref_cls, sst2_dir, stsb_dir, tmp_path, capsys):
    base = ["eval", "--data-dir", str(sst2_dir)]
    args = {"pretrained": ["--model", str(ref_bert), "--task", "sst-2"],
            "no task": ["--model", str(ref_cls)],
            "qat": ["--model", str(ref_cls), "--task", "sst-2", "--mode", "qat"],
            "regression": ["--model", str(ref_cls), "--task", "sts-b"],
            "both": ["--model", str(ref_cls), "--checkpoint", str(tmp_path)],
            "neither": [],
            "task with checkpoint": ["--checkpoint", str(tmp_path), "--task", "sst-2"]}[case]
    if case == "regression":
        base = ["eval", "--data-dir", str(stsb_dir)]
    code, out, err = run_q8(base + args, capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
