"""Plugins: a third-party backend installed through a real entry point, custom tasks, broken,
duplicate and unknown plugins, and the ``Q8_PLUGINS`` selection.

Third-party packages are written into ``tmp_path`` as a module plus a ``*.dist-info`` folder
with ``entry_points.txt``, exactly what ``pip install`` leaves in site-packages, and found
through ``PYTHONPATH`` (subprocess) or ``sys.path`` (in-process).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from q8core import checkpoints
from q8core.errors import Q8Error
from q8core.hookspecs import hookimpl
from q8core.plugins import load_registry
from q8core.task import Example, Task
import cli
from conftest import VOCAB
from helpers import run_q8

# -- a third-party backend: NumPy-only bag-of-words classifier / regressor ----------------------

NUMPY_BACKEND = '''
"""A NumPy-only q8bert backend: hashed bag of token ids -> linear layer, trained with Adam."""

from pathlib import Path

import numpy as np

from q8core.backend import Backend
from q8core.errors import Q8Error
from q8core.hookspecs import hookimpl

__version__ = "0.1"
BUCKETS = 1024
WEIGHTS = "bow_weights.npz"


class NumpyBowBackend(Backend):
    name = "numpy-bow"
    aliases = ("bow",)

    def __init__(self, weight, bias, spec, regression):
        self.weight = np.asarray(weight, dtype=np.float32)
        self.bias = np.asarray(bias, dtype=np.float32)
        self.spec = spec
        self.regression = bool(regression)
        self._base_lr, self._warmup, self._total, self._eps = 1e-3, 0, 1, 1e-8
        self._step = 0
        self._m = [np.zeros_like(self.weight), np.zeros_like(self.bias)]
        self._v = [np.zeros_like(self.weight), np.zeros_like(self.bias)]

    @classmethod
    def framework_version(cls):
        return f"numpy {np.__version__}"

    @classmethod
    def from_pretrained(cls, source, *, labels, spec, device, seed):
        n = 1 if labels is None else len(labels)
        rng = np.random.default_rng(seed)
        return cls(rng.normal(0.0, 0.01, (BUCKETS, n)), np.zeros(n), spec, labels is None)

    @classmethod
    def from_checkpoint(cls, path, *, spec, device):
        file = Path(path) / WEIGHTS
        if not file.is_file():
            raise Q8Error(f"{path}: no {WEIGHTS}")
        with np.load(file) as data:
            return cls(data["weight"], data["bias"], spec, bool(data["regression"]))

    @staticmethod
    def _features(batch):
        ids = np.asarray(batch["input_ids"]) % BUCKETS
        mask = np.asarray(batch["attention_mask"], dtype=np.float32)
        x = np.zeros((ids.shape[0], BUCKETS), dtype=np.float32)
        rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
        np.add.at(x, (rows, ids), mask)
        return x

    def configure_optimizer(self, *, learning_rate, weight_decay, warmup_steps, total_steps,
                            adam_epsilon, max_grad_norm):
        self._base_lr, self._warmup = learning_rate, warmup_steps
        self._total, self._eps = max(total_steps, 1), adam_epsilon

    def learning_rate(self):
        if self._step < self._warmup:
            return self._base_lr * (self._step + 1) / self._warmup
        return self._base_lr * max(0.0, (self._total - self._step) / max(1, self._total - self._warmup))

    def train_step(self, batch):
        x = self._features(batch)
        logits = x @ self.weight + self.bias
        n = x.shape[0]
        if self.regression:
            diff = logits[:, 0] - np.asarray(batch["labels"], dtype=np.float32)
            loss = float(np.mean(diff ** 2))
            grad = (2.0 * diff / n)[:, None]
        else:
            labels = np.asarray(batch["labels"], dtype=np.int64)
            z = logits - logits.max(axis=1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            loss = float(-np.mean(np.log(p[np.arange(n), labels] + 1e-12)))
            grad = p
            grad[np.arange(n), labels] -= 1.0
            grad /= n
        l2 = getattr(self, "options", {}).get("l2", 0.0)  # this backend's own option (add_backend_options)
        lr = self.learning_rate()
        self._step += 1
        for i, (param, g) in enumerate(((self.weight, x.T @ grad + l2 * self.weight), (self.bias, grad.sum(axis=0)))):
            self._m[i] = 0.9 * self._m[i] + 0.1 * g
            self._v[i] = 0.999 * self._v[i] + 0.001 * g * g
            m_hat = self._m[i] / (1 - 0.9 ** self._step)
            v_hat = self._v[i] / (1 - 0.999 ** self._step)
            param -= (lr * m_hat / (np.sqrt(v_hat) + self._eps)).astype(np.float32)
        return loss

    def predict(self, batch):
        return (self._features(batch) @ self.weight + self.bias).astype(np.float32)

    def save(self, directory):
        np.savez(Path(directory) / WEIGHTS, weight=self.weight, bias=self.bias,
                 regression=np.array(self.regression))
        return [WEIGHTS]


    @classmethod
    def check_options(cls, options):
        if options.get("l2", 0.0) < 0:  # q8 eval passes only the eval options
            raise Q8Error(f"--l2 must be >= 0, got {options['l2']}")


@hookimpl
def register_backends(register):
    register(NumpyBowBackend)


@hookimpl
def add_backend_options(parser):
    parser.group("numpy-bow").add("l2", type=float, default=0.0, help="L2 penalty on the weights.",
                                  commands=("run",))
'''


def make_dist(root: Path, dist: str, version: str, entry_points: dict[str, str],
              modules: dict[str, str]) -> Path:
    """Install ``dist`` into ``root`` the way pip lays it out: modules plus a dist-info folder."""
    root.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[q8bert]\n" + "".join(f"{name} = {target}\n" for name, target in entry_points.items()), encoding="utf-8")
    return root


def install_numpy_backend(root: Path) -> Path:
    return make_dist(root, "q8-numpy-backend", "0.1", {"numpy-bow": "q8_numpy_backend"},
                     {"q8_numpy_backend": NUMPY_BACKEND})


def install_duplicate(root: Path) -> Path:
    """A second package registering a backend whose name clashes (case-insensitively) with numpy-bow."""
    return make_dist(root, "q8-bow-clone", "2.0", {"bow-clone": "q8_bow_clone"}, {"q8_bow_clone": """
        from q8core.hookspecs import hookimpl
        from q8_numpy_backend import NumpyBowBackend

        class CloneBackend(NumpyBowBackend):
            name = "NumPy-BOW"
            aliases = ()

        @hookimpl
        def register_backends(register):
            register(CloneBackend)
        """})


def install_broken(root: Path) -> Path:
    return make_dist(root, "q8-broken", "0.3", {"broken": "q8_broken_plugin"}, {"q8_broken_plugin": """
        raise ImportError("q8_broken_plugin needs libwarp.so, which is not installed")
        """})


# -- running q8 -------------------------------------------------------------------------------

def q8_subprocess(args: list[str], pythonpath: Path, plugins: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed ``q8`` console script in a fresh interpreter."""
    script = Path(sys.executable).with_name("q8")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "import cli; cli.main()"]
    env = dict(os.environ, PYTHONPATH=str(pythonpath), Q8_PLUGINS=plugins)
    return subprocess.run(command + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh site-packages folder on sys.path; modules imported from it are forgotten afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    before = set(sys.modules)
    yield root
    for name in set(sys.modules) - before:
        module = sys.modules.get(name)
        if str(root) in str(getattr(module, "__file__", "") or ""):
            del sys.modules[name]


# -- 1. a third-party backend through a real entry point, end to end via the CLI -------------

@pytest.fixture
def bow_model(tmp_path) -> Path:
    """What ``--model`` needs for the NumPy backend: only a WordPiece tokenizer folder.

    (conftest's ``tiny_bert`` is not used: with transformers 5 its ``BertTokenizerFast(vocab_file=...)``
    ignores the vocabulary, so every word of the toy sentences becomes [UNK].)
    """
    folder = tmp_path / "bow-model"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}), encoding="utf-8")
    return folder


def test_third_party_numpy_backend_end_to_end(tmp_path, bow_model, sst2_dir):
    site = install_numpy_backend(tmp_path / "site")
    plugins = "torch,glue,numpy-bow"

    listing = q8_subprocess(["plugins"], site, plugins, tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "Traceback" not in listing.stderr and "warning" not in listing.stderr
    backends = listing.stdout.split("tasks:")[0]
    assert re.search(r"^\s+numpy-bow\s+numpy-bow q8-numpy-backend 0\.1\s+\[numpy \d", backends, re.M), listing.stdout
    assert "aliases: bow" in backends
    assert re.search(r"^\s+torch\s+torch q8bert ", backends, re.M), listing.stdout
    assert re.search(r"^\s+sst-2\s+glue q8bert ", listing.stdout, re.M)

    run_dir = tmp_path / "run"
    run = q8_subprocess(["run", "--backend", "numpy-bow", "--task", "SST-2", "--model", str(bow_model),
                         "--data-dir", str(sst2_dir), "--output-dir", str(run_dir), "--mode", "fp32",
                         "--epochs", "3", "--learning-rate", "0.05", "--max-seq-length", "32", "--quiet"],
                        site, plugins, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "(numpy-bow)" in run.stdout

    results = json.loads((run_dir / "eval_results.json").read_text(encoding="utf-8"))
    assert results["backend"] == "numpy-bow" and results["task"] == "sst-2" and results["mode"] == "fp32"
    assert results["main_metric"] == "accuracy"
    assert results["step"] == 48  # 256 examples / 16 per batch * 3 epochs
    assert 0.8 < results["metrics"]["accuracy"] <= 1.0  # the toy label is a word's presence: learnable
    assert results["best_metric"] >= results["metrics"]["accuracy"]

    found = checkpoints.list_checkpoints(run_dir)
    assert found and found[-1].name == "checkpoint-48"
    for path in found:
        manifest = checkpoints.read_manifest(path)
        assert manifest["backend"] == "numpy-bow" and manifest["task"] == "sst-2"
        assert manifest["labels"] == ["0", "1"]
        assert {"bow_weights.npz", "q8_spec.json"} <= set(manifest["files"])
        assert "tokenizer_config.json" in manifest["files"]  # the core saved the tokenizer next to the weights
    state = json.loads((run_dir / "trainer_state.json").read_text(encoding="utf-8"))
    best = run_dir / state["best_checkpoint"]
    assert state["best_step"] == results["best_step"]
    assert checkpoints.read_manifest(best)["metrics"]["accuracy"] == pytest.approx(results["best_metric"])

    # The run folder resolves to its best checkpoint; evaluating it reproduces best_metric.
    evaluated = q8_subprocess(["eval", "--checkpoint", str(run_dir), "--data-dir", str(sst2_dir), "--json"],
                              site, plugins, tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert metrics["task"] == "sst-2" and metrics["checkpoint"] == str(best) and metrics["mode"] == "fp32"
    assert metrics["accuracy"] == pytest.approx(results["best_metric"], abs=1e-9)
    assert metrics["accuracy"] > 0.8


# -- 2. a custom task from an in-process plugin -------------------------------------------------

class WordsTask(Task):
    """A task with its own file format: one ``label<TAB>text`` per line in ``<split>.txt``."""

    def read(self, data_dir, split):
        lines = (Path(data_dir) / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        return [Example(text, None, self.labels.index(label)) for label, text in (l.split("\t", 1) for l in lines)]


class WordsPlugin:
    __version__ = "1.2.3"
    task = WordsTask(name="Toy-Words", labels=("neg", "pos"), metrics=("accuracy",), main_metric="accuracy")

    @staticmethod
    @hookimpl
    def register_tasks(register):
        register(WordsPlugin.task)


def test_extra_plugin_registers_custom_task(tmp_path):
    registry = load_registry(extra_plugins=(WordsPlugin,))
    for spelling in ("Toy-Words", "toy-words", "TOYWORDS", "toy_words"):
        assert registry.task(spelling) is WordsPlugin.task
    entry = registry.tasks["toywords"]
    assert entry.name == "Toy-Words" and entry.plugin == "WordsPlugin" and entry.version == "1.2.3"
    assert registry.task("sts-b").is_regression  # the entry-point plugins are still there
    assert registry.backend("torch").name == "torch"

    (tmp_path / "train.txt").write_text("pos\ta fine film\nneg\tdull\n", encoding="utf-8")
    task = registry.task("toywords")
    examples = task.read(tmp_path, "train")
    assert examples == [Example("a fine film", None, 1), Example("dull", None, 0)]
    assert task.label_array(examples).tolist() == [1, 0]

    with pytest.raises(Q8Error, match=r"unknown task 'words'; installed: .*Toy-Words"):
        registry.task("words")


def test_custom_task_registered_twice_names_both_plugins():
    class Again:
        @staticmethod
        @hookimpl
        def register_tasks(register):
            register(WordsTask(name="toy words", labels=("a", "b"), metrics=("accuracy",), main_metric="accuracy"))

    with pytest.raises(Q8Error) as info:
        load_registry(extra_plugins=(WordsPlugin, Again))
    message = str(info.value)
    assert "\n" not in message and "registered twice" in message
    assert "WordsPlugin" in message and "Again" in message

    with pytest.raises(Q8Error, match=r"^task 'SST2' is registered twice: by plugin glue and by plugin Glue2$"):
        load_registry(extra_plugins=(type("Glue2", (), {"register_tasks": staticmethod(hookimpl(
            lambda register: register(Task("SST2", ("0", "1"), ("accuracy",), "accuracy"))))}),))


# -- 3. a plugin that fails to import ---------------------------------------------------------

def test_broken_plugin_is_reported_and_others_keep_working(site, monkeypatch, capsys):
    install_broken(site)
    monkeypatch.setenv("Q8_PLUGINS", "torch,glue,broken")

    registry = load_registry()
    assert set(registry.failures) == {"broken"}
    assert registry.failures["broken"] == "ImportError: q8_broken_plugin needs libwarp.so, which is not installed"
    assert registry.backend("torch").name == "torch" and registry.task("STS-B").name == "sts-b"
    with pytest.raises(Q8Error, match=r"unknown backend 'numpy-bow'; installed: torch \(failed to load: broken\)"):
        registry.backend("numpy-bow")

    code, out, err = run_q8(["plugins"], capsys)
    assert code == 0
    assert err.strip() == ("q8: warning: plugin broken failed to load: "
                           "ImportError: q8_broken_plugin needs libwarp.so, which is not installed")
    assert re.search(r"^\s+torch\s+torch q8bert", out, re.M) and re.search(r"^\s+sts-b\s+glue q8bert", out, re.M)
    assert "failed: broken: ImportError: q8_broken_plugin needs libwarp.so" in out


def test_broken_plugin_via_console_script(tmp_path):
    site = install_broken(tmp_path / "site")
    proc = q8_subprocess(["plugins"], site, "glue,broken", tmp_path)
    assert proc.returncode == 0
    assert "q8: warning: plugin broken failed to load: ImportError" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(r"^\s+sts-b\s+glue q8bert", proc.stdout, re.M)


def test_plugin_failing_inside_its_register_hook_is_isolated(site, monkeypatch):
    make_dist(site, "q8-lazy", "0.1", {"lazy": "q8_lazy_plugin"}, {"q8_lazy_plugin": """
        from q8core.hookspecs import hookimpl

        @hookimpl
        def register_backends(register):
            import q8_framework_that_is_not_installed  # noqa: F401 -- deferred, like backends.pytorch
        """})
    monkeypatch.setenv("Q8_PLUGINS", "torch,glue,lazy")
    registry = load_registry()
    assert "lazy" in registry.failures
    assert registry.backend("torch").name == "torch" and registry.task("sts-b").name == "sts-b"


# -- 4. two backends with the same name ------------------------------------------------------

def test_duplicate_backend_name_is_one_line_error(site, monkeypatch, capsys):
    install_numpy_backend(site)
    install_duplicate(site)
    monkeypatch.setenv("Q8_PLUGINS", "glue,numpy-bow,bow-clone")

    with pytest.raises(Q8Error) as info:
        load_registry()
    message = str(info.value)
    assert "\n" not in message
    assert re.fullmatch(r"backend '(numpy-bow|NumPy-BOW)' is registered twice: by plugin (numpy-bow|bow-clone) "
                        r"and by plugin (numpy-bow|bow-clone)", message), message
    assert "by plugin numpy-bow" in message and "by plugin bow-clone" in message

    code, out, err = run_q8(["plugins"], capsys)
    assert code == 2 and out == ""
    assert err == f"q8: error: {message}\n"


def test_duplicate_backend_via_console_script(tmp_path):
    site = install_duplicate(install_numpy_backend(tmp_path / "site"))
    proc = q8_subprocess(["plugins"], site, "glue,numpy-bow,bow-clone", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("q8: error: backend ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "registered twice" in proc.stderr and "numpy-bow" in proc.stderr and "bow-clone" in proc.stderr
    assert proc.stdout == ""


def test_backend_named_like_another_backends_alias_is_a_duplicate():
    class Impostor:
        @staticmethod
        @hookimpl
        def register_backends(register):
            register(type("PyTorchClone", (), {"name": "PyTorch"}))

    with pytest.raises(Q8Error, match=r"^backend 'PyTorch' is registered twice: by plugin torch and by plugin Impostor$"):
        load_registry(extra_plugins=(Impostor,))


def test_alias_cannot_shadow_an_existing_backend_name():
    class Shadow:
        @staticmethod
        @hookimpl
        def register_backends(register):
            register(type("ShadowBackend", (), {"name": "shadow", "aliases": ("torch",)}))

    try:
        registry = load_registry(extra_plugins=(Shadow,))
    except Q8Error as exc:  # refusing the clash is fine too
        assert "torch" in str(exc) and "Shadow" in str(exc)
        return
    assert registry.backend("torch").name == "torch"


# -- 5. unknown backend / task in q8 run -----------------------------------------------------

def test_unknown_backend_and_task_in_run(tmp_path, sst2_dir, capsys):
    out_dir = tmp_path / "never-created"
    base = ["run", "--data-dir", str(sst2_dir), "--output-dir", str(out_dir), "--model", str(tmp_path)]

    code, out, err = run_q8(base + ["--task", "sst-2", "--backend", "jax"], capsys)
    assert code == 2 and out == ""
    assert err == "q8: error: unknown backend 'jax'; installed: torch\n"

    code, out, err = run_q8(base + ["--task", "sst-3"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("q8: error: unknown task 'sst-3'; installed: ") and err.count("\n") == 1
    assert "sts-b" in err and "sst-2" in err and "mnli" in err
    assert not out_dir.exists()

    # Aliases and case-insensitive names are accepted for backends.
    registry = load_registry()
    assert registry.backend("PyTorch") is registry.backend("TORCH") is registry.backend("torch")


def test_unknown_backend_lists_third_party_backends(site, monkeypatch, capsys, tmp_path, sst2_dir):
    install_numpy_backend(site)
    monkeypatch.setenv("Q8_PLUGINS", "torch,glue,numpy-bow")
    code, out, err = run_q8(["run", "--task", "sst-2", "--backend", "numpy", "--data-dir", str(sst2_dir),
                                   "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2
    assert err == "q8: error: unknown backend 'numpy'; installed: numpy-bow, torch\n"
    assert load_registry().backend("BOW").name == "numpy-bow"  # its alias, case-insensitively


# -- 6. Q8_PLUGINS selects entry points ------------------------------------------------------

def test_empty_q8_plugins_loads_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("Q8_PLUGINS", "")
    registry = load_registry()
    assert registry.backends == {} and registry.tasks == {} and registry.failures == {}

    code, out, err = run_q8(["plugins"], capsys)
    assert code == 0 and err == ""
    assert out == "backends:\ntasks:\n"

    code, out, err = run_q8(["run", "--task", "sst-2", "--data-dir", str(tmp_path),
                                   "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and err == "q8: error: unknown task 'sst-2'; installed: none\n"


def test_q8_plugins_selects_only_named_entry_points(site, monkeypatch):
    install_numpy_backend(site)
    install_broken(site)
    monkeypatch.setenv("Q8_PLUGINS", " glue , numpy-bow ")
    registry = load_registry()
    assert sorted(registry.backends) == ["numpy-bow"] and registry.failures == {}
    assert registry.backends["numpy-bow"].version == "q8-numpy-backend 0.1"
    assert registry.backends["numpy-bow"].plugin == "numpy-bow"
    assert "sts-b" in [e.name for e in registry.tasks.values()]

    monkeypatch.delenv("Q8_PLUGINS")  # unset: every installed entry point, the broken one included
    registry = load_registry()
    assert {"torch", "numpy-bow"} <= set(registry.backends) and "broken" in registry.failures


# -- the NumPy backend honours the Backend contract in-process --------------------------------

def test_numpy_backend_contract_in_process(site, monkeypatch, tmp_path):
    install_numpy_backend(site)
    monkeypatch.setenv("Q8_PLUGINS", "numpy-bow")
    from q8core.spec import QuantSpec

    cls = load_registry().backend("numpy-bow")
    spec = QuantSpec(mode="fp32")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, (8, 6)).astype(np.int64)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
             "labels": (ids == 5).any(axis=1).astype(np.int64)}
    backend = cls.from_pretrained("anything", labels=("0", "1"), spec=spec, device="cpu", seed=1)
    backend.configure_optimizer(learning_rate=0.1, weight_decay=0.0, warmup_steps=0, total_steps=20,
                                adam_epsilon=1e-8, max_grad_norm=1.0)
    losses = [backend.train_step(batch) for _ in range(10)]
    assert losses[-1] < losses[0]
    logits = backend.predict(batch)
    assert logits.dtype == np.float32 and logits.shape == (8, 2)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    assert backend.save(folder) == ["bow_weights.npz"]
    again = cls.from_checkpoint(folder, spec=spec, device="cpu")
    np.testing.assert_array_equal(again.predict(batch), logits)
    with pytest.raises(Q8Error, match="does not support device 'gpu'"):
        cls.check_device("gpu")


# -- 7. a backend whose framework is missing is listed, and says how to install it -------------

def test_unavailable_backend_is_listed_and_refuses_with_the_install_hint(monkeypatch, capsys, tmp_path, sst2_dir):
    from q8core.backend import unavailable_backend

    class Missing:
        @staticmethod
        @hookimpl
        def register_backends(register):
            register(unavailable_backend("jaxbert", "JAX is not installed (pip install jax)"))

    monkeypatch.setattr(cli, "load_registry", lambda: load_registry(extra_plugins=(Missing,)))
    code, out, _ = run_q8(["plugins"], capsys)
    assert code == 0
    assert re.search(r"^\s+jaxbert\s+Missing -\s+\[unavailable: JAX is not installed \(pip install jax\)\]$", out, re.M)
    code, out, err = run_q8(["run", "--backend", "jaxbert", "--task", "sst-2", "--data-dir", str(sst2_dir),
                             "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and out == ""
    assert err == "q8: error: backend 'jaxbert' is not usable here: JAX is not installed (pip install jax)\n"
    assert not (tmp_path / "out").exists()


# -- 6. a backend's own options (add_backend_options) ---------------------------------------------

def test_backend_options_appear_with_their_backend_and_round_trip(tmp_path, bow_model, sst2_dir):
    site = install_numpy_backend(tmp_path / "site")
    plugins = "torch,glue,numpy-bow"
    helptext = q8_subprocess(["run", "--help"], site, plugins, tmp_path)
    assert helptext.returncode == 0, helptext.stderr
    section = helptext.stdout.split("Options of backend numpy-bow (with --backend numpy-bow):")[1]
    assert "--l2 FLOAT" in section and "L2 penalty on the weights." in section
    assert "--l2" not in helptext.stdout.split("Options of backend numpy-bow")[0]
    # without the plugin the option does not exist
    alone = q8_subprocess(["run", "--help"], site, "torch,glue", tmp_path)
    assert "--l2" not in alone.stdout and "Options of backend" not in alone.stdout

    common = ["run", "--task", "sst-2", "--data-dir", str(sst2_dir), "--model", str(bow_model),
              "--max-steps", "8", "--learning-rate", "0.05", "--quiet"]
    wrong = q8_subprocess(common + ["--backend", "torch", "--l2", "0.1", "--output-dir", str(tmp_path / "w")],
                          site, plugins, tmp_path)
    assert wrong.returncode == 2 and wrong.stderr.strip() == \
        "q8: error: --l2 is an option of backend numpy-bow; this uses backend torch"
    bad = q8_subprocess(common + ["--backend", "bow", "--l2", "-1", "--output-dir", str(tmp_path / "b")],
                        site, plugins, tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "q8: error: --l2 must be >= 0, got -1.0"
    assert not (tmp_path / "w").exists() and not (tmp_path / "b").exists()

    weights = {}
    for l2 in (None, "0.5"):
        out = tmp_path / f"run-{l2}"
        proc = q8_subprocess(common + ["--backend", "numpy-bow", "--output-dir", str(out)]
                             + (["--l2", l2] if l2 else []), site, plugins, tmp_path)
        assert proc.returncode == 0, proc.stderr
        stored = json.loads((out / "run_config.json").read_text())["backend_options"]
        manifest = checkpoints.read_manifest(out / "checkpoint-8")
        assert stored == manifest["backend_options"] == {"l2": float(l2 or 0.0)}
        weights[l2] = np.load(out / "checkpoint-8" / "bow_weights.npz")["weight"]
        # the stored options come back with --resume (a run-only option is not one of q8 eval's)
        evaluated = q8_subprocess(["eval", "--checkpoint", str(out), "--data-dir", str(sst2_dir), "--json"],
                                  site, plugins, tmp_path)
        assert evaluated.returncode == 0, evaluated.stderr
    assert not np.allclose(weights[None], weights["0.5"])  # the backend received and used the option
