"""The MindSpore backend against the NumPy reference (bit for bit) and the PyTorch backend (step for step)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="MindSpore not installed: pip install 'mindspore==2.10.0' 'numpy<2' "
                                             "'pandas<3' 'pyarrow<26' 'ml-dtypes<0.6'")

from mindspore import Tensor  # noqa: E402

from q8core import reference as R  # noqa: E402
from q8core.errors import Q8Error  # noqa: E402
from q8core.spec import QuantSpec  # noqa: E402

from helpers import run_q8  # noqa: E402

LABELS = ("0", "1")
OPTIM = dict(learning_rate=2e-3, weight_decay=0.01, warmup_steps=2, total_steps=10, adam_epsilon=1e-8, max_grad_norm=1.0)


@pytest.fixture(scope="module", autouse=True)
def _cpu_and_one_torch_thread():
    import torch

    from backends.mindspore import device

    device.select("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's and MindSpore's thread pools fight over the 2 cores otherwise
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cls_bert(tiny_bert, tmp_path_factory):
    """The tiny BERT with a saved classifier and no dropout: both backends load identical weights."""
    import torch
    from transformers import BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-cls")
    torch.manual_seed(3)
    model = BertForSequenceClassification.from_pretrained(
        str(tiny_bert), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    model.save_pretrained(str(folder))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_bert / name).exists():
            shutil.copy(tiny_bert / name, folder / name)
    return folder


def _batches(n, seed=0, b=4, s=12):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(5, 29, size=(b, s))
        ids[:, 0] = 2
        mask = np.ones((b, s), np.int64)
        mask[1, 7:] = 0  # a padded row
        ids[1, 7:] = 0
        types = np.zeros((b, s), np.int64)
        types[:, 6:] = 1
        types[1, 7:] = 0
        out.append({"input_ids": ids.astype(np.int64), "attention_mask": mask, "token_type_ids": types,
                    "labels": rng.integers(0, 2, b).astype(np.int64)})
    return out


def _pair(folder, spec):
    from backends.mindspore.backend import MindSporeBackend
    from backends.pytorch.backend import TorchBackend

    kwargs = dict(labels=LABELS, spec=spec, device="cpu", seed=1)
    return TorchBackend.from_pretrained(str(folder), **kwargs), MindSporeBackend.from_pretrained(str(folder), **kwargs)


# -- model structure and weights -------------------------------------------------------------------
def test_parameter_names_are_the_hugging_face_keys_and_fp32_logits_agree(cls_bert):
    torch_b, ms_b = _pair(cls_bert, QuantSpec(mode="fp32"))
    names = {name: p for name, p in ms_b.model.parameters_and_names()}
    state = torch_b.model.state_dict()
    assert set(names) == set(state)  # fp32: no quantizer state, exactly the HF keys
    for name, tensor in state.items():
        np.testing.assert_array_equal(names[name].asnumpy(), tensor.numpy())
    batch = _batches(1)[0]
    np.testing.assert_allclose(ms_b.predict(batch), torch_b.predict(batch), rtol=0, atol=1e-5)


def test_a_bare_bert_checkpoint_gets_a_seeded_classifier_and_bad_folders_fail_in_one_line(tiny_bert, tmp_path):
    from safetensors.numpy import load_file, save_file

    from backends.mindspore.backend import MindSporeBackend
    from backends.pytorch.backend import TorchBackend
    from q8core.heads import new_parameter

    def build(folder, seed=1):
        return MindSporeBackend.from_pretrained(str(folder), labels=None, spec=QuantSpec(mode="fp32"), device="cpu",
                                                seed=seed)

    a, b, c = build(tiny_bert), build(tiny_bert), build(tiny_bert, seed=2)
    weight = {n: p.asnumpy() for n, p in a.model.parameters_and_names()}["classifier.weight"]
    assert weight.shape == (1, 32) and a.regression
    assert np.array_equal(weight, {n: p.asnumpy() for n, p in b.model.parameters_and_names()}["classifier.weight"])
    assert not np.array_equal(weight, {n: p.asnumpy() for n, p in c.model.parameters_and_names()}["classifier.weight"])
    # the core draws the new head, so the PyTorch backend starts from the very same numbers
    np.testing.assert_array_equal(weight, new_parameter("classifier.weight", (1, 32), seed=1, initializer_range=0.02))
    torch_b = TorchBackend.from_pretrained(str(tiny_bert), labels=None, spec=QuantSpec(mode="fp32"), device="cpu", seed=1)
    np.testing.assert_array_equal(torch_b.model.classifier.weight.detach().numpy(), weight)
    batch = _batches(1)[0]
    np.testing.assert_allclose(a.predict(batch), torch_b.predict(batch), rtol=0, atol=1e-5)
    state = load_file(str(tiny_bert / "model.safetensors"))
    for broken, change in (("missing", lambda s: s.pop("encoder.layer.1.output.dense.weight")),
                           ("shape", lambda s: s.__setitem__("embeddings.LayerNorm.bias", np.zeros(3, np.float32)))):
        folder = tmp_path / broken
        folder.mkdir()
        shutil.copy(tiny_bert / "config.json", folder / "config.json")
        damaged = dict(state)
        change(damaged)
        save_file(damaged, str(folder / "model.safetensors"))
        with pytest.raises(Q8Error) as err:
            build(folder)
        message = str(err.value)
        assert "\n" not in message
        assert ("bert.encoder.layer.1.output.dense.weight" if broken == "missing" else
                "bert.embeddings.LayerNorm.bias") in message


# -- the quantized cells against the reference, bit for bit ----------------------------------------
def _dense(spec, in_f=48, out_f=16, seed=0):
    from backends.mindspore.quantization import QuantDense

    rng = np.random.default_rng(seed)
    cell = QuantDense(in_f, out_f, spec)
    weight = (rng.standard_normal((out_f, in_f)) * 0.1).astype(np.float32)
    bias = (rng.standard_normal(out_f) * 0.1).astype(np.float32)
    cell.weight.set_data(Tensor(weight))
    cell.bias.set_data(Tensor(bias))
    return cell, weight, bias


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_dense_matches_the_reference_in_training_and_inference(bits):
    rng = np.random.default_rng(1)
    spec = QuantSpec(bits=bits, ema_decay=0.9)
    cell, w, b = _dense(spec)
    cell.set_train(True)
    ema = None
    for scale in (1.0, 3.0, 0.25, 2.0):
        x = (rng.standard_normal((3, 5, 48)) * scale).astype(np.float32)
        y = cell(Tensor(x)).asnumpy()
        ema = R.ema_update(ema, R.max_abs(x), spec.ema_decay)
        assert np.float32(cell.input_ema.asnumpy()) == ema  # same float32 EMA, bit for bit
        np.testing.assert_array_equal(y, R.linear_forward(x, w, b, ema, bits=bits))
    cell.set_train(False)
    x = (rng.standard_normal((3, 5, 48)) * 5).astype(np.float32)  # clamps to the stored range, no update
    np.testing.assert_array_equal(cell(Tensor(x)).asnumpy(), R.linear_forward(x, w, b, ema, bits=bits))
    assert np.float32(cell.input_ema.asnumpy()) == ema


def test_compiled_quant_dense_rounds_halves_to_even_like_the_reference():
    """Graph mode (what training runs) on inputs whose scaled values are exact halves: the compiled
    rounding (an add/subtract of 1.5 * 2^23, not MindSpore's Round kernel) must not be folded away."""
    spec = QuantSpec(ema_decay=0.5)
    cell, _, b = _dense(spec)
    rng = np.random.default_rng(6)
    w = rng.integers(-254, 255, (16, 48)).astype(np.float32) / 2  # halves; max|W| = 127 -> S_W = 1
    w[0, 0] = 127.0
    cell.weight.set_data(Tensor(w))
    cell.set_train(True)
    forward = ms.jit(cell.construct)
    ema = None
    for step in range(3):
        x = rng.integers(-254, 255, (2, 5, 48)).astype(np.float32) / 2
        x[0, 0, 0] = 127.0  # the first batch sets the EMA to 127 -> S_x = 1: x * S_x are the halves
        ema = R.ema_update(ema, R.max_abs(x), spec.ema_decay)
        y = forward(Tensor(x)).asnumpy()
        np.testing.assert_array_equal(y, R.linear_forward(x, w, b, ema), err_msg=f"step {step}")
    assert np.float32(cell.input_ema.asnumpy()) == ema
    table = rng.integers(-254, 255, (20, 6)).astype(np.float32) / 2
    table[3, 3] = 127.0
    from backends.mindspore.quantization import QuantEmbedding

    emb = QuantEmbedding(20, 6, QuantSpec(), padding_idx=0)
    emb.weight.set_data(Tensor(table))
    emb.set_train(False)
    ids = np.array([[1, 2, 3, 19], [4, 0, 7, 1]], np.int32)
    np.testing.assert_array_equal(ms.jit(emb.construct)(Tensor(ids)).asnumpy(), R.embedding_forward(ids, table))


def test_int8_values_scales_and_fake_quant_are_the_references():
    import torch

    from backends.mindspore import quantization as Q
    from backends.pytorch import quantization as T

    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 64)) * 0.05).astype(np.float32)
    w[0, 0] = 0.5  # halves: x * S lands exactly on .5 for some entries
    s_ref = R.get_scale(R.max_abs(w))
    s = Q.get_scale(Q.max_abs(Tensor(w)), 127)
    assert np.float32(s.asnumpy()) == s_ref
    q = Q.quantize(Tensor(w), s, 127).asnumpy().astype(np.int8)
    np.testing.assert_array_equal(q, R.quantize(w, s_ref))
    np.testing.assert_array_equal(q, T.quantize(torch.from_numpy(w), torch.tensor(s_ref), 127).numpy().astype(np.int8))
    np.testing.assert_array_equal(Q.fake_quantize(Tensor(w), s, 127).asnumpy(), R.fake_quantize(w, s_ref))
    assert np.float32(Q.get_scale(Tensor(np.float32(0.0)), 127).asnumpy()) == R.get_scale(0.0) == 1.0


def test_dq_and_start_step_follow_the_torch_rules():
    rng = np.random.default_rng(3)
    xs = [(rng.standard_normal((2, 4, 48)) * s).astype(np.float32) for s in (1.0, 2.0, 3.0, 0.5)]
    cell, w, b = _dense(QuantSpec(mode="dq"))
    cell.set_train(True)
    np.testing.assert_allclose(cell(Tensor(xs[0])).asnumpy(), xs[0] @ w.T + b, rtol=1e-6, atol=1e-6)
    assert float(cell.input_ema.asnumpy()) == 0.0 and int(cell.steps.asnumpy()) == 0
    cell.set_train(False)
    np.testing.assert_array_equal(cell(Tensor(xs[1])).asnumpy(), R.linear_forward(xs[1], w, b, R.max_abs(xs[1])))

    cell, w, b = _dense(QuantSpec(start_step=2, ema_decay=0.5))
    cell.set_train(False)  # never trained: the batch's own range
    np.testing.assert_array_equal(cell(Tensor(xs[0])).asnumpy(), R.linear_forward(xs[0], w, b, R.max_abs(xs[0])))
    cell.set_train(True)
    ema = None
    for i, x in enumerate(xs):
        y = cell(Tensor(x)).asnumpy()
        if i < 2:  # delay: plain float32, no range tracking
            np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-6, atol=1e-6)
            assert float(cell.input_ema.asnumpy()) == 0.0
        else:
            ema = R.ema_update(ema, R.max_abs(x), 0.5)
            np.testing.assert_array_equal(y, R.linear_forward(x, w, b, ema))
    assert np.float32(cell.input_ema.asnumpy()) == ema == R.ema_update(R.max_abs(xs[2]), R.max_abs(xs[3]), 0.5)


def test_straight_through_gradients_of_dense_and_embedding():
    from backends.mindspore.quantization import QuantEmbedding

    rng = np.random.default_rng(4)
    cell, w, _ = _dense(QuantSpec(), in_f=8, out_f=3)
    cell.set_train(True)
    x = (rng.standard_normal((2, 4, 8))).astype(np.float32)
    g = rng.standard_normal((2, 4, 3)).astype(np.float32)
    grad_fn = ms.value_and_grad(lambda t: (cell(t) * Tensor(g)).sum(), 0, (cell.weight, cell.bias))
    _, (gx, (gw, gb)) = grad_fn(Tensor(x))
    fq_x = R.fake_quantize(x, R.get_scale(float(cell.input_ema.asnumpy())))
    fq_w = R.fake_quantize(w, R.get_scale(R.max_abs(w)))
    np.testing.assert_allclose(gx.asnumpy(), g @ fq_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw.asnumpy(), g.reshape(-1, 3).T @ fq_x.reshape(-1, 8), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gb.asnumpy(), g.reshape(-1, 3).sum(0), rtol=1e-5, atol=1e-6)

    emb = QuantEmbedding(20, 6, QuantSpec(), padding_idx=0)
    table = rng.standard_normal((20, 6)).astype(np.float32)
    emb.weight.set_data(Tensor(table))
    emb.set_train(True)
    ids = np.array([[1, 2, 3, 2], [4, 0, 19, 1]], np.int32)
    emb.refresh_scale()  # the backend does this before every training forward
    np.testing.assert_array_equal(emb(Tensor(ids)).asnumpy(), R.embedding_forward(ids, table))
    emb.set_train(False)
    np.testing.assert_array_equal(emb(Tensor(ids)).asnumpy(), R.embedding_forward(ids, table))
    emb.set_train(True)
    (grad,) = ms.grad(lambda t: emb(t).sum(), None, (emb.weight,))(Tensor(ids))
    expected = np.zeros((20, 6), np.float32)
    for i in ids.reshape(-1):
        if i != 0:  # the padding row gets no gradient, as in nn.Embedding
            expected[i] += 1
    np.testing.assert_array_equal(grad.asnumpy(), expected)


def test_adamw_clipping_and_schedule_match_torch():
    import torch

    from backends.mindspore.optim import AdamW, linear_schedule
    from transformers import get_linear_schedule_with_warmup

    rng = np.random.default_rng(5)
    init = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)]
    grads = [[rng.standard_normal(a.shape).astype(np.float32) * 3 for a in init] for _ in range(4)]
    t_params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    opt = torch.optim.AdamW([{"params": [t_params[0]], "weight_decay": 0.1}, {"params": [t_params[1]], "weight_decay": 0.0}],
                            lr=0.01, eps=1e-6, fused=True)
    sched = get_linear_schedule_with_warmup(opt, 1, 4)
    m_params = [ms.Parameter(Tensor(a.copy()), name=f"p{i}") for i, a in enumerate(init)]
    adam = AdamW(m_params, [True, False], eps=1e-6, max_grad_norm=1.0)
    for step, gs in enumerate(grads):
        lr = 0.01 * linear_schedule(step, 1, 4)
        assert lr == pytest.approx(sched.get_last_lr()[0], abs=1e-12)
        for p, g in zip(t_params, gs):
            p.grad = torch.from_numpy(g.copy())
        torch.nn.utils.clip_grad_norm_(t_params, 1.0)
        opt.step()
        sched.step()
        adam(adam.pack(tuple(Tensor(g) for g in gs)), *adam.scalars(lr, 0.1))  # clips, then steps
    for t, m in zip(t_params, m_params):
        np.testing.assert_allclose(m.asnumpy(), t.detach().numpy(), rtol=1e-5, atol=1e-6)


# -- the two backends, step for step ---------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(cls_bert):
    """Both backends after 5 identical QAT steps (dropout off), with what they returned on the way."""
    torch_b, ms_b = _pair(cls_bert, QuantSpec(ema_decay=0.9))
    probe = _batches(1, seed=9)[0]
    before = (torch_b.predict(probe), ms_b.predict(probe))
    int8 = {}
    from backends.mindspore import quantization as Q
    from backends.pytorch import quantization as T
    import torch

    for name, param in ms_b.model.parameters_and_names():
        if name.endswith("weight") and "LayerNorm" not in name:
            w = param.asnumpy()
            s = R.get_scale(R.max_abs(w))
            int8[name] = (Q.quantize(param, Q.get_scale(Q.max_abs(param), 127), 127).asnumpy().astype(np.int8),
                          T.quantize(torch.from_numpy(w), T.get_scale(torch.from_numpy(w).abs().max(), 127),
                                     127).numpy().astype(np.int8), R.quantize(w, s))
    torch_b.configure_optimizer(**OPTIM)
    ms_b.configure_optimizer(**OPTIM)
    losses, lrs = [], []
    for batch in _batches(5, seed=1):
        lrs.append((torch_b.learning_rate(), ms_b.learning_rate()))
        losses.append((torch_b.train_step(batch), ms_b.train_step(batch)))
    return torch_b, ms_b, probe, before, int8, losses, lrs


def test_every_int8_weight_tensor_is_identical_across_backends_and_reference(trained):
    int8 = trained[4]
    assert len(int8) == 3 + 2 * 6 + 2  # 3 embedding tables, 6 dense per layer, pooler, classifier
    for name, (mine, theirs, ref) in int8.items():
        np.testing.assert_array_equal(mine, ref, err_msg=name)
        np.testing.assert_array_equal(theirs, ref, err_msg=name)


def test_qat_logits_losses_and_ema_follow_pytorch(trained):
    torch_b, ms_b, probe, before, _, losses, lrs = trained
    np.testing.assert_allclose(before[1], before[0], rtol=0, atol=1e-4)
    for t, m in lrs:
        assert m == pytest.approx(t, abs=1e-12)
    t_losses, m_losses = map(np.array, zip(*losses))
    np.testing.assert_allclose(m_losses, t_losses, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ms_b.predict(probe), torch_b.predict(probe), rtol=0, atol=1e-3)
    t_state, m_state = torch_b.quant_state(), ms_b.quant_state()
    assert set(m_state) == set(t_state) and len(m_state) == 14
    assert "bert.encoder.layer.0.attention.self.query" in m_state
    for name in t_state:  # float32 EMAs of (almost) the same activations
        assert m_state[name] == pytest.approx(t_state[name], rel=1e-5), name


def test_checkpoint_mindir_and_hf_exports_reproduce_the_model(trained, cls_bert, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from backends.mindspore.backend import MindSporeBackend

    torch_b, ms_b, probe, *_ = trained
    spec = QuantSpec(ema_decay=0.9)
    (tmp_path / "ckpt").mkdir()
    files = ms_b.save(tmp_path / "ckpt")
    assert files == ["config.json", "model.ckpt"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"} and config["architectures"] == ["BertForSequenceClassification"]
    loaded = MindSporeBackend.from_checkpoint(tmp_path / "ckpt", spec=spec, device="cpu")
    np.testing.assert_array_equal(loaded.predict(probe), ms_b.predict(probe))
    assert loaded.quant_state() == ms_b.quant_state()
    fp32_dir = tmp_path / "fp32"
    fp32_dir.mkdir()
    MindSporeBackend.from_pretrained(str(cls_bert), labels=LABELS, spec=QuantSpec(mode="fp32"), device="cpu",
                                     seed=0).save(fp32_dir)
    with pytest.raises(Q8Error, match="fp32 or dq"):  # a QAT evaluation needs the EMA ranges
        MindSporeBackend.from_checkpoint(fp32_dir, spec=spec, device="cpu")

    (tmp_path / "mindir").mkdir()
    assert "model.mindir" in ms_b.export(tmp_path / "mindir", "mindir")
    graph = ms.nn.GraphCell(ms.load(str(tmp_path / "mindir" / "model.mindir")))
    one = {k: np.zeros((1, 64), np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    one["input_ids"][0, :12], one["attention_mask"][0, :12] = probe["input_ids"][0], 1
    one["token_type_ids"][0, :12] = probe["token_type_ids"][0]
    out = graph(*[Tensor(one[k].astype(np.int32)) for k in ("input_ids", "attention_mask", "token_type_ids")])
    from backends.mindspore import cpu_kernels

    assert b"q8_cpu_kernels" not in (tmp_path / "mindir" / "model.mindir").read_bytes()  # portable: standard ops
    with cpu_kernels.standard_ops():  # the cell compiled on the same ops: bit for bit
        fresh = MindSporeBackend.from_checkpoint(tmp_path / "ckpt", spec=spec, device="cpu")
        np.testing.assert_array_equal(out.asnumpy(), fresh.predict(one))
    # the cell as trained, on the CPU kernels where they are built: GELU's last bits differ
    np.testing.assert_allclose(out.asnumpy(), ms_b.predict(one), rtol=0, atol=1e-5)

    (tmp_path / "hf").mkdir()
    ms_b.export(tmp_path / "hf", "hf")
    exported = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).state_dict()
    mine = {n: p.asnumpy() for n, p in ms_b.model.parameters_and_names() if p.requires_grad}
    assert set(exported) == set(mine)
    assert all(np.array_equal(exported[n].numpy(), mine[n]) for n in mine)
    with pytest.raises(Q8Error, match="Ascend") as err:
        ms_b.export(tmp_path, "air")
    assert "\n" not in str(err.value)
    assert isinstance(torch_b.model, torch.nn.Module)


# -- the command line --------------------------------------------------------------------------------
def test_q8_run_and_eval_with_the_mindspore_backend(tiny_bert, sst2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("Q8_PLUGINS", "torch,mindspore,glue")
    out = tmp_path / "run"
    code, stdout, err = run_q8(["run", "--backend", "ms", "--task", "sst-2", "--model", str(tiny_bert),
                                "--data-dir", str(sst2_dir), "--output-dir", str(out), "--max-steps", "12",
                                "--train-batch-size", "16", "--learning-rate", "3e-3", "--eval-steps", "12",
                                "--max-seq-length", "32", "--ema-decay", "0.9", "--quiet"], capsys)
    assert code == 0, err
    results = json.loads((out / "eval_results.json").read_text())
    assert results["backend"] == "mindspore" and results["step"] == 12
    manifest = json.loads((out / "checkpoint-12" / "q8_checkpoint.json").read_text())
    assert manifest["backend"] == "mindspore" and "model.ckpt" in manifest["files"]
    code, stdout, err = run_q8(["eval", "--checkpoint", str(out / "checkpoint-12"), "--data-dir", str(sst2_dir),
                                "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["accuracy"] == results["metrics"]["accuracy"]

    code, _, err = run_q8(["run", "--backend", "mindspore", "--device", "gpu", "--task", "sst-2", "--model",
                           str(tiny_bert), "--data-dir", str(sst2_dir), "--output-dir", str(tmp_path / "gpu")], capsys)
    assert code == 2 and err.count("\n") == 1 and "GPU" in err
    assert not (tmp_path / "gpu").exists()


def test_quant_delay_compiles_one_graph_per_phase_and_follows_pytorch(cls_bert):
    """With --quant-delay the MindSpore backend trains the delay and the quantized steps with two graphs
    (not one graph computing both); the run still follows the PyTorch backend step for step."""
    torch_b, ms_b = _pair(cls_bert, QuantSpec(ema_decay=0.9, start_step=2))
    torch_b.configure_optimizer(**OPTIM)
    ms_b.configure_optimizer(**OPTIM)
    losses = [(torch_b.train_step(batch), ms_b.train_step(batch)) for batch in _batches(5, seed=4)]
    t_losses, m_losses = map(np.array, zip(*losses))
    np.testing.assert_allclose(m_losses, t_losses, rtol=0, atol=1e-4)
    assert sorted(phase for _, phase in ms_b._step_fns) == ["active", "delay"]
    t_state, m_state = torch_b.quant_state(), ms_b.quant_state()
    assert set(m_state) == set(t_state) and len(m_state) == 14
    for name in t_state:  # ranges from the first quantized step (3) on
        assert m_state[name] == pytest.approx(t_state[name], rel=1e-5), name
    probe = _batches(1, seed=9)[0]
    np.testing.assert_allclose(ms_b.predict(probe), torch_b.predict(probe), rtol=0, atol=1e-3)


def test_float_inputs_layers_follow_pytorch(cls_bert):
    """``float_inputs`` picks the same layers by their Hugging Face names on both backends (Q, K and V no
    longer share one quantized input when one of them is float), and QAT then trains alike."""
    from backends.mindspore.quantization import QuantDense

    spec = QuantSpec(ema_decay=0.9, float_inputs=[r"layer\.\d+\.output\.dense$", r"layer\.0\.attention\.self\.query"])
    torch_b, ms_b = _pair(cls_bert, spec)
    floats = sorted(n for n, c in ms_b.model.cells_and_names() if isinstance(c, QuantDense) and not c.q_acts)
    assert floats == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.output.dense",
                      "bert.encoder.layer.1.output.dense"]
    attention = dict(ms_b.model.cells_and_names())
    assert not attention["bert.encoder.layer.0.attention.self"].shared_input
    assert attention["bert.encoder.layer.1.attention.self"].shared_input
    torch_b.configure_optimizer(**OPTIM)
    ms_b.configure_optimizer(**OPTIM)
    losses = [(torch_b.train_step(batch), ms_b.train_step(batch)) for batch in _batches(3, seed=5)]
    t_losses, m_losses = map(np.array, zip(*losses))
    np.testing.assert_allclose(m_losses, t_losses, rtol=0, atol=1e-4)
    probe = _batches(1, seed=9)[0]
    np.testing.assert_allclose(ms_b.predict(probe), torch_b.predict(probe), rtol=0, atol=1e-3)


# -- beyond the paper: asymmetric inputs, per-channel weights ------------------------------------------
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_asymmetric_per_channel_dense_matches_the_reference(per_channel, compiled):
    rng = np.random.default_rng(11)
    spec = QuantSpec(ema_decay=0.9, activation_grid="asymmetric", per_channel_weights=per_channel)
    cell, w, b = _dense(spec)
    w[3] *= 20.0  # one large row: per channel differs from per tensor
    cell.weight.set_data(Tensor(w))
    cell.set_train(True)
    forward = ms.jit(cell.construct) if compiled else cell
    lo = hi = None
    for scale in (1.0, 3.0, 0.25, 2.0):
        x = np.maximum(rng.standard_normal((3, 5, 48)) * scale, -0.17).astype(np.float32)  # GELU-like
        y = forward(Tensor(x)).asnumpy()
        lo = R.ema_update(lo, R.min_max(x)[0], spec.ema_decay)
        hi = R.ema_update(hi, R.min_max(x)[1], spec.ema_decay)
        assert (np.float32(cell.input_min.asnumpy()), np.float32(cell.input_max.asnumpy())) == (lo, hi)
        np.testing.assert_array_equal(y, R.linear_forward(x, w, b, (lo, hi), per_channel=per_channel))
    cell.set_train(False)
    x = (rng.standard_normal((3, 5, 48)) * 5).astype(np.float32)  # clamps to the stored range
    np.testing.assert_array_equal(cell(Tensor(x)).asnumpy(), R.linear_forward(x, w, b, (lo, hi),
                                                                              per_channel=per_channel))
    dq, w2, b2 = _dense(QuantSpec(mode="dq", activation_grid="asymmetric", per_channel_weights=per_channel))
    dq.set_train(False)
    np.testing.assert_array_equal(dq(Tensor(x)).asnumpy(), R.linear_forward(x, w2, b2, R.min_max(x),
                                                                            per_channel=per_channel))


def test_asymmetric_per_channel_model_trains_like_pytorch(cls_bert):
    """The FFN output layers on the asymmetric grid, per-channel weights, tanh's range for the classifier: both
    backends pick the same layers, train alike and keep the same ranges (the classifier's: 1)."""
    spec = QuantSpec(ema_decay=0.9, asymmetric_inputs=[r"layer\.\d+\.output\.dense$"], per_channel_weights=True,
                     tanh_range=True)
    torch_b, ms_b = _pair(cls_bert, spec)
    torch_b.configure_optimizer(**OPTIM)
    ms_b.configure_optimizer(**OPTIM)
    losses = [(torch_b.train_step(batch), ms_b.train_step(batch)) for batch in _batches(3, seed=5)]
    t_losses, m_losses = map(np.array, zip(*losses))
    np.testing.assert_allclose(m_losses, t_losses, rtol=0, atol=1e-4)
    t_state, m_state = torch_b.quant_state(), ms_b.quant_state()
    assert set(t_state) == set(m_state)
    ffn = "bert.encoder.layer.1.output.dense"
    assert isinstance(t_state[ffn], tuple) and isinstance(m_state[ffn], tuple)
    np.testing.assert_allclose(m_state[ffn], t_state[ffn], rtol=1e-4)
    assert t_state["classifier"] == m_state["classifier"] == 1.0 != t_state["bert.pooler.dense"]
    probe = _batches(1, seed=9)[0]
    np.testing.assert_allclose(ms_b.predict(probe), torch_b.predict(probe), rtol=0, atol=1e-3)
