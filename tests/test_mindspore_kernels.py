"""The MindSpore backend's fused CPU kernels (backends/mindspore/cpu_kernels.*): the reference's bits,
torch's AdamW, the same model as with MindSpore's own ops, and the fallback where they cannot be built."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="MindSpore not installed: pip install 'mindspore==2.10.0' 'numpy<2' "
                                             "'pandas<3' 'pyarrow<26' 'ml-dtypes<0.6'")

from mindspore import Tensor  # noqa: E402
from scipy.special import erf  # noqa: E402

from backends.mindspore import cpu_kernels  # noqa: E402
from q8core import reference as R  # noqa: E402
from q8core.errors import Q8Error  # noqa: E402
from q8core.spec import QuantSpec  # noqa: E402


@pytest.fixture(scope="module")
def kernels():
    from backends.mindspore import device

    device.select("cpu")
    loaded = cpu_kernels.load()
    if loaded is None:
        pytest.skip("the CPU kernels cannot be built here (no g++, or Q8_MS_CPU_KERNELS=0): "
                    "the backend runs on MindSpore's own ops, which the parity tests cover")
    return loaded


def _both_modes(kernel, *args):
    """kernel(*args) in PyNative and compiled (graph) form: the two must agree."""
    def call(*inputs):
        return kernel(*inputs)

    eager = call(*args).asnumpy()
    compiled = ms.jit(call)(*args).asnumpy()
    np.testing.assert_array_equal(eager, compiled)
    return eager


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_and_max_abs_give_the_reference_bits(kernels, bits):
    rng = np.random.default_rng(bits)
    threshold = np.float32(2.5)
    scale = R.get_scale(threshold, bits)
    qmax = np.float32(R.qmax(bits))
    halves = (np.arange(-40, 40) + np.float32(0.5)) / scale  # scaled values at exact ties, rounded to even
    x = np.concatenate([rng.standard_normal(997) * 2, halves, [0.0, -0.0, 7.5, -9.0, threshold, -threshold]])
    x = x.astype(np.float32).reshape(-1, 1) if bits == 4 else x.astype(np.float32)
    q = _both_modes(kernels.quantize, Tensor(x), Tensor(scale), Tensor(qmax))
    np.testing.assert_array_equal(q, R.quantize(x, scale, bits).astype(np.float32))
    assert q.dtype == np.float32 and q.shape == x.shape
    for tensor in (x, -np.abs(x), x.reshape(-1, 3)[:, :2].copy(), np.zeros((2, 3), np.float32)):
        top = _both_modes(kernels.max_abs, Tensor(tensor))
        assert top.shape == () and top == R.max_abs(tensor)


def test_gelu_its_gradient_and_the_cell_that_uses_them(kernels):
    from backends.mindspore.bert import Gelu

    x = np.concatenate([np.linspace(-8, 8, 1601), np.random.default_rng(0).standard_normal(3999) * 3])
    x = x.astype(np.float32).reshape(-1, 7)
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    x64 = x.astype(np.float64)
    cdf = 0.5 * (1 + erf(x64 / math.sqrt(2)))
    exact = x64 * cdf
    exact_grad = dy * (cdf + x64 * np.exp(-0.5 * x64 * x64) / math.sqrt(2 * math.pi))
    y = _both_modes(kernels.gelu, Tensor(x))
    np.testing.assert_allclose(y, exact, rtol=1e-6, atol=1e-6)
    grad = _both_modes(kernels.gelu_grad, Tensor(x), Tensor(dy))
    np.testing.assert_allclose(grad, exact_grad, rtol=1e-5, atol=1e-6)
    cell = Gelu()  # forward and hand-written backward through the kernels
    np.testing.assert_array_equal(cell(Tensor(x))[0].asnumpy(), y)
    backward = ms.grad(lambda t: (cell(t)[0] * Tensor(dy)).sum())(Tensor(x)).asnumpy()
    np.testing.assert_array_equal(backward, grad)


def _layer_norm64(x, w, b, dy, eps):
    """LayerNorm over the last axis in float64, and the gradients of sum(y * dy) by hand."""
    x, w, dy = (a.astype(np.float64) for a in (x, w, dy))
    mean = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    g = dy * w
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    rows = (-1, x.shape[-1])
    return xhat * w + b, dx, (dy * xhat).reshape(rows).sum(0), dy.reshape(rows).sum(0)


@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_layer_norm_and_its_gradients(kernels, eps, monkeypatch):
    from backends.mindspore.bert import LayerNorm

    rng = np.random.default_rng(6)
    x = (rng.standard_normal((3, 11, 384)) * 4 + 2).astype(np.float32)
    x[0, 0] = 1.5  # a constant row: variance 0, normalised to 0
    w, b = (rng.standard_normal(384).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y64, dx64, dw64, db64 = _layer_norm64(x, w, b, dy, eps)
    e = Tensor(np.float32(eps))
    y = _both_modes(kernels.layer_norm, Tensor(x), Tensor(w), Tensor(b), e)
    np.testing.assert_allclose(y, y64, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(y[0, 0], b)
    dx = _both_modes(kernels.layer_norm_grad, Tensor(x), Tensor(w), Tensor(dy), e)
    np.testing.assert_allclose(dx, dx64, rtol=1e-4, atol=2e-5 if eps < 1e-6 else 1e-5)
    params = _both_modes(kernels.layer_norm_param_grad, Tensor(x.reshape(-1, 384)), Tensor(dy.reshape(-1, 384)), e)
    assert params.shape == (2, 384)
    np.testing.assert_allclose(params[0], dw64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(params[1], db64, rtol=1e-5, atol=1e-4)

    def cell_run():  # the cell: its forward and its hand-written backward, through the kernels or not
        cell = LayerNorm(384, eps)
        cell.weight.set_data(Tensor(w))
        cell.bias.set_data(Tensor(b))
        out = cell(Tensor(x)).asnumpy()
        grads = ms.grad(lambda t: (cell(t) * Tensor(dy)).sum(), grad_position=0, weights=cell.trainable_params())(Tensor(x))
        return out, grads[0].asnumpy(), grads[1][0].asnumpy(), grads[1][1].asnumpy()

    fused = cell_run()
    np.testing.assert_array_equal(fused[0], y)
    np.testing.assert_array_equal(fused[1], dx)
    np.testing.assert_array_equal(fused[2], params[0])
    np.testing.assert_array_equal(fused[3], params[1])
    monkeypatch.setattr(cpu_kernels, "ACTIVE", None)
    # (rtol 1e-4 as against float64: the constant row's gradient, scaled by 1 / sqrt(eps), is ill-conditioned)
    for mine, theirs, rtol, atol in zip(fused, cell_run(), (1e-5, 1e-4, 1e-5, 1e-5), (1e-5, 2e-5, 1e-4, 1e-4)):
        np.testing.assert_allclose(mine, theirs, rtol=rtol, atol=atol)


def test_masked_softmax_and_its_gradient(kernels, monkeypatch):
    from backends.mindspore.bert import MASK_VALUE, MaskedSoftmax

    rng = np.random.default_rng(7)
    scores = (rng.standard_normal((3, 4, 9, 9)) * 6).astype(np.float32)
    keep = np.ones((3, 9), np.float32)
    keep[1, 5:] = keep[2, 1:] = 0  # padding: batch row 1 keeps 5 keys, row 2 one
    additive = ((1.0 - keep) * MASK_VALUE).reshape(3, 1, 1, 9).astype(np.float32)
    dprobs = rng.standard_normal(scores.shape).astype(np.float32)
    scale = np.float32(8 ** -0.5)
    z = scores.astype(np.float64) * scale + additive
    p64 = np.exp(z - z.max(-1, keepdims=True))
    p64 /= p64.sum(-1, keepdims=True)
    ds64 = p64 * (dprobs - (p64 * dprobs).sum(-1, keepdims=True)) * scale
    probs = _both_modes(kernels.masked_softmax, Tensor(scores), Tensor(additive), Tensor(scale))
    np.testing.assert_allclose(probs, p64, rtol=1e-5, atol=1e-7)
    assert (probs[1, :, :, 5:] == 0).all() and (probs[2, :, :, 0] == 1).all()  # padded keys get exactly 0
    grad = _both_modes(kernels.softmax_grad, Tensor(probs), Tensor(dprobs), Tensor(scale))
    np.testing.assert_allclose(grad, ds64, rtol=1e-4, atol=1e-6)

    def cell_run():
        cell = MaskedSoftmax(float(scale))
        out = cell(Tensor(scores), Tensor(additive)).asnumpy()
        return out, ms.grad(lambda t: (cell(t, Tensor(additive)) * Tensor(dprobs)).sum())(Tensor(scores)).asnumpy()

    fused = cell_run()
    np.testing.assert_array_equal(fused[0], probs)
    np.testing.assert_array_equal(fused[1], grad)
    monkeypatch.setattr(cpu_kernels, "ACTIVE", None)
    plain = cell_run()
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fused[1], plain[1], rtol=1e-4, atol=1e-6)


def test_dequantize_gives_bias_add_then_division_bits(kernels):
    rng = np.random.default_rng(8)
    acc = rng.integers(-2 ** 23, 2 ** 23, size=(37, 24)).astype(np.float32)
    bias_q = rng.integers(-2 ** 20, 2 ** 20, size=24).astype(np.float32)
    s_b = np.float32(R.get_scale(np.float32(0.37), 8) * R.get_scale(np.float32(5.1), 8))
    y = _both_modes(kernels.dequantize, Tensor(acc), Tensor(bias_q), Tensor(s_b))
    np.testing.assert_array_equal(y, (acc + bias_q) / s_b)


@pytest.mark.parametrize("threads", [1, 3])
def test_matrix_products_through_onednn(kernels, threads):
    if kernels.matmul_nt is None:
        pytest.skip("this MindSpore ships no oneDNN library: the layers use MindSpore's MatMul")
    import ctypes

    ctypes.CDLL(str(cpu_kernels.build())).Q8SetThreads(threads)  # 3: rows split unevenly over threads
    try:
        rng = np.random.default_rng(9)
        for m, k, n in ((200, 48, 70), (5, 3, 2), (130, 0, 4)):
            a = rng.standard_normal((m, k)).astype(np.float32)
            b = rng.standard_normal((n, k)).astype(np.float32)
            c = rng.standard_normal((k, n)).astype(np.float32)
            d = rng.standard_normal((m, n)).astype(np.float32)
            a64 = a.astype(np.float64)
            for got, exact in ((_both_modes(kernels.matmul_nt, Tensor(a), Tensor(b)), a64 @ b.T),
                               (_both_modes(kernels.matmul_nn, Tensor(a), Tensor(c)), a64 @ c),
                               (_both_modes(kernels.matmul_tn, Tensor(d), Tensor(a)), d.astype(np.float64).T @ a)):
                assert got.shape == exact.shape and got.dtype == np.float32
                np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)
        ints = rng.integers(-127, 128, size=(256, 384)).astype(np.float32)  # the integer layer: exact
        np.testing.assert_array_equal(kernels.matmul_nt(Tensor(ints), Tensor(ints[:96])).asnumpy(),
                                      (ints.astype(np.int64) @ ints[:96].T.astype(np.int64)).astype(np.float32))
    finally:
        ctypes.CDLL(str(cpu_kernels.build())).Q8SetThreads(cpu_kernels.threads())


def test_threads_change_no_bits(kernels):
    """Every threaded kernel splits rows or elements only: 1 and 3 threads give the same bits (tensors
    large enough to be split, unevenly)."""
    import ctypes

    rng = np.random.default_rng(10)
    x = (rng.standard_normal((301, 384)) * 3).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b = (rng.standard_normal(384).astype(np.float32) for _ in range(2))
    scores = (rng.standard_normal((4, 12, 41, 41)) * 5).astype(np.float32)
    additive = np.where(rng.random((4, 1, 1, 41)) < 0.2, np.float32(-1e9), np.float32(0)).astype(np.float32)
    eps, scale, qmax = Tensor(np.float32(1e-12)), Tensor(np.float32(0.125)), Tensor(np.float32(127))
    calls = [(kernels.gelu, x), (kernels.gelu_grad, x, dy), (kernels.quantize, x, Tensor(np.float32(9.5)), qmax),
             (kernels.layer_norm, x, w, b, eps), (kernels.layer_norm_grad, x, w, dy, eps),
             (kernels.masked_softmax, scores, additive, scale), (kernels.softmax_grad, scores, scores, scale),
             (kernels.dequantize, np.rint(x * 1000), b, Tensor(np.float32(7.0)))]
    if kernels.matmul_nt is not None:
        calls.append((kernels.matmul_nt, x, x[:70]))
    library = ctypes.CDLL(str(cpu_kernels.build()))
    results = []
    try:
        for count in (1, 3):
            library.Q8SetThreads(count)
            results.append([op(*(Tensor(a) if isinstance(a, np.ndarray) else a for a in args)).asnumpy()
                            for op, *args in calls])
    finally:
        library.Q8SetThreads(cpu_kernels.threads())
    for one, three in zip(*results):
        np.testing.assert_array_equal(one, three)


def test_sum_of_squares(kernels):
    x = np.random.default_rng(2).standard_normal((300, 70)).astype(np.float32)
    total = _both_modes(kernels.sum_squares, Tensor(x))
    assert total.shape == () and total == pytest.approx(float(np.sum(x.astype(np.float64) ** 2)), rel=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernels", "mindspore-ops"])
def test_adamw_with_clipping_follows_torch_on_both_paths(kernels, fused, monkeypatch):
    import torch

    from backends.mindspore.optim import AdamW

    if not fused:
        monkeypatch.setattr(cpu_kernels, "ACTIVE", None)
    rng = np.random.default_rng(5)
    init = [rng.standard_normal((40, 30)).astype(np.float32), rng.standard_normal(30).astype(np.float32),
            rng.standard_normal(30).astype(np.float32)]
    t_params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    opt = torch.optim.AdamW([{"params": t_params[:1], "weight_decay": 0.1}, {"params": t_params[1:], "weight_decay": 0.0}],
                            lr=0.01, eps=1e-6, foreach=False)
    m_params = [ms.Parameter(Tensor(a.copy()), name=f"p{i}") for i, a in enumerate(init)]
    adam = AdamW(m_params, [True, False, False], eps=1e-6, max_grad_norm=1.0)
    for step, scale in enumerate((3.0, 0.01, 5.0, 0.02)):  # clipped, not clipped, ...
        gs = [(rng.standard_normal(a.shape) * scale).astype(np.float32) for a in init]
        for p, g in zip(t_params, gs):
            p.grad = torch.from_numpy(g.copy())
        torch.nn.utils.clip_grad_norm_(t_params, 1.0)
        opt.step()
        lr = 0.01 * (1 - step / 8)
        for group in opt.param_groups:
            group["lr"] = 0.01 * (1 - (step + 1) / 8)
        adam(adam.pack(tuple(Tensor(g) for g in gs)), *adam.scalars(lr, 0.1))
    for t, m in zip(t_params, m_params):
        np.testing.assert_allclose(m.asnumpy(), t.detach().numpy(), rtol=1e-5, atol=1e-6)
    state = [(m.asnumpy(), v.asnumpy()) for m, v in zip(adam.exp_avg, adam.exp_avg_sq)]
    for p, (m, v) in zip(t_params, state):  # the moments too: a checkpoint resumes on either path
        np.testing.assert_allclose(m, opt.state[p]["exp_avg"].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(v, opt.state[p]["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-9)


def test_the_model_is_the_same_with_and_without_the_kernels(kernels, tiny_bert, monkeypatch):
    """QAT with dropout: the integer weights and activations agree bit for bit, so logits and losses
    differ only by GELU's last-ulp differences."""
    from backends.mindspore.backend import MindSporeBackend

    rng = np.random.default_rng(4)
    ids = rng.integers(5, 29, size=(4, 10))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
             "labels": np.array([0, 1, 1, 0])}
    optim = dict(learning_rate=1e-3, weight_decay=0.01, warmup_steps=0, total_steps=4, adam_epsilon=1e-8,
                 max_grad_norm=1.0)

    def run():
        backend = MindSporeBackend.from_pretrained(str(tiny_bert), labels=("0", "1"), spec=QuantSpec(ema_decay=0.9),
                                                   device="cpu", seed=3)
        backend.configure_optimizer(**optim)
        losses = [backend.train_step(batch) for _ in range(3)]
        return losses, backend.predict(batch), backend.quant_state()

    with monkeypatch.context() as patch:
        patch.setattr(cpu_kernels, "ACTIVE", None)
        plain = run()
    fused = run()
    np.testing.assert_allclose(fused[0], plain[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(fused[1], plain[1], rtol=0, atol=1e-4)
    assert fused[2] == pytest.approx(plain[2], rel=1e-5)


def test_no_compiler_means_one_note_and_mindspores_own_ops(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "ACTIVE", None)
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    assert cpu_kernels.load() is None and cpu_kernels.load() is None
    err = capsys.readouterr().err
    assert err.count("q8: note: MindSpore CPU kernels not built") == 1 and "using MindSpore's own ops" in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written left in the cache


def test_the_switch_and_the_cache(kernels, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "ACTIVE", None)
    monkeypatch.setenv(cpu_kernels.ENABLE_ENV, "0")
    assert cpu_kernels.load() is None and capsys.readouterr().err == ""
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setenv(cpu_kernels.ENABLE_ENV, "maybe")
    with pytest.raises(Q8Error, match=r"^Q8_MS_CPU_KERNELS='maybe': expected 0 or 1$"):
        cpu_kernels.load()
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
    first = cpu_kernels.build()
    built = first.stat().st_mtime_ns
    assert cpu_kernels.build() == first and first.stat().st_mtime_ns == built  # compiled once, then reused
    assert [p.name for p in tmp_path.iterdir()] == [first.name] and os.access(first, os.R_OK)
