"""MindSpore data-parallel training: two CPU workers under msrun against one process with the doubled batch,
plus the pieces that need no cluster (msrun's variables, per-rank dropout streams, one-line refusals).

The two runs see the same seeded global batches; they differ only in float reduction order (two half-batch
means weighted 0.5 + 0.5 and summed by ``AllReduce`` instead of one mean; matrix products on half batches).
Measured with MindSpore 2.10 on this 2-core CPU, 6 steps at learning rate 3e-3 on the one-layer tiny BERT
(the last global batch of 3 rows splits 2 + 1): final weights within 1.2e-8, logged losses within 6e-8;
EMA activation ranges, the embeddings' weight scales, step counters and dev metrics identical. The tolerances below leave a wide margin for other
CPUs' kernels. Without the all-rank EMA maximum the ranges move by 5-6% and the losses by 1.3e-4.
Wall time of the msrun test: 55-60 s here, with the one-process twin running beside it (msrun's start-up ~10 s, one graph compilation per worker).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="MindSpore not installed")

from q8core.distributed import SINGLE, DistributedEnv, environment  # noqa: E402
from q8core.errors import Q8Error  # noqa: E402

from helpers import assert_same_run, edited_bert, run_q8  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MSRUN = shutil.which("msrun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
PLUGINS = "torch,mindspore,glue"

WEIGHT_ATOL = 1e-6  # final weights (measured 1.2e-8)
SCALE_RTOL = 1e-5  # the embeddings' weight_scale = 127 / max|W| (relative; measured 0)
EMA_RTOL = 1e-5  # EMA activation ranges (measured 0)
LOSS_ATOL = 1e-5  # logged training losses (measured 6e-8)
METRIC_ATOL = 1e-5  # dev metrics (measured 0)


# -- msrun's variables (as MindSpore 2.10's msrun sets them) ---------------------------------------
WORKER_1 = {"DEVICE_ID": "1", "MS_NODE_ID": "1", "MS_ROLE": "MS_WORKER", "MS_SCHED_HOST": "127.0.0.1",
            "MS_SCHED_PORT": "8118", "MS_TOPO_TIMEOUT": "600", "MS_WORKER_NUM": "2", "RANK_ID": "1", "RANK_SIZE": "2"}
SCHEDULER = {"MS_ROLE": "MS_SCHED", "MS_SCHED_HOST": "127.0.0.1", "MS_SCHED_PORT": "8118", "MS_TOPO_TIMEOUT": "600",
             "MS_WORKER_NUM": "2", "RANK_ID": "0", "RANK_SIZE": "2"}


def test_msrun_workers_and_scheduler_environment():
    assert environment(WORKER_1) == DistributedEnv(2, 1, 1, "msrun")
    # msrun runs the same command as its scheduler (RANK_ID=0 too): never rank 0, it trains nothing
    scheduler = environment(SCHEDULER)
    assert scheduler.scheduler and scheduler.enabled and not scheduler.is_main and scheduler.rank is None
    assert environment({**SCHEDULER, "MS_WORKER_NUM": "1", "RANK_SIZE": "1"}).scheduler  # it must still not train
    assert not SINGLE.scheduler


def test_one_line_refusals_and_no_collectives_without_a_group(monkeypatch):
    from backends.mindspore import parallel
    from backends.mindspore.backend import MindSporeBackend

    env = DistributedEnv(2, 1, 1, "msrun")
    assert MindSporeBackend.distributed
    assert MindSporeBackend.rank_device("gpu", env) == "gpu:1" and MindSporeBackend.rank_device("cpu", env) == "cpu"
    with pytest.raises(Q8Error, match="pass --device gpu$"):
        MindSporeBackend.rank_device("gpu:0", env)
    with pytest.raises(Q8Error, match="under msrun; torchrun started this process"):
        MindSporeBackend.init_distributed(DistributedEnv(2, 1, 1, "torchrun"), "cpu")
    monkeypatch.delenv("MS_ROLE", raising=False)
    monkeypatch.delenv("RANK_TABLE_FILE", raising=False)
    with pytest.raises(Q8Error, match="start the processes with msrun"):  # RANK_SIZE/RANK_ID set by hand
        MindSporeBackend.init_distributed(DistributedEnv(2, 1, 1, "msrun"), "cpu")
    assert not parallel.joined()
    MindSporeBackend.barrier()
    assert MindSporeBackend.broadcast_object({"a": [1, 2]}) == {"a": [1, 2]}


def test_dropout_streams_differ_per_rank_and_share_one_resumable_state():
    from backends.mindspore.bert import BertConfig, DropoutMasks

    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    ranks = [DropoutMasks(config, seed=7) for _ in range(2)]
    for rank, masks in enumerate(ranks):
        masks.rank = rank
    start = ranks[0].state
    first = [m.draw(2, 5) for m in ranks]
    assert not np.array_equal(first[0][0], first[1][0]) and not np.array_equal(first[0][1], first[1][1])
    assert ranks[0].state == ranks[1].state  # one shared generator: rank 0's saved state serves every rank
    again = DropoutMasks(config, seed=0)
    again.rank, again.state = 1, start
    for mine, theirs in zip(again.draw(2, 5), first[1]):  # a resumed rank 1 draws what it drew
        np.testing.assert_array_equal(mine, theirs)
    plain = DropoutMasks(config, seed=7)  # one process: the stream of a run without msrun is unchanged
    reference = np.random.Generator(np.random.PCG64(7)).random((3, 2, 5, 8), dtype=np.float32) >= np.float32(0.1)
    hidden = plain.draw(2, 5)[0]
    np.testing.assert_array_equal(hidden, np.where(reference, np.float32(1 / 0.9), np.float32(0)))  # kept units scaled as torch's
    assert hidden.dtype == np.float32


# -- two workers under msrun -----------------------------------------------------------------------
B = 4  # per-worker batch
ARGS = ["--max-steps", "6", "--max-seq-length", "16", "--learning-rate", "3e-3", "--ema-decay", "0.9",
        "--logging-steps", "1", "--seed", "7", "--eval-steps", "3", "--save-steps", "3", "--quiet"]


@pytest.fixture
def one_layer_no_dropout_bert(tiny_bert, tmp_path) -> Path:
    """The tiny BERT cut to one layer (half the compile time), dropout off: masks differ per rank, so only
    without dropout can two workers reproduce one process."""
    return edited_bert(tiny_bert, tmp_path / "bert", num_hidden_layers=1, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _msrun(args: list[str], cwd: Path, logs: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MS_", "RANK_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DEVICE_ID")}
    # msrun starts `python` from PATH: this interpreter's
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", Q8_PLUGINS=PLUGINS,
               Q8_MS_THREADS="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [MSRUN, "--worker_num", "2", "--local_worker_num", "2", "--master_port", str(_free_port()),
               "--join", "True", "--cluster_time_out", "120", "--log_dir", str(logs), str(ROOT / "cli.py"), *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _log(path: Path) -> str:
    """A worker's log without MindSpore's [WARNING] / [INFO] lines."""
    if not path.exists():
        return ""
    return "\n".join(line for line in path.read_text(errors="replace").splitlines()
                     if not line.startswith(("[WARNING]", "[INFO]")))


def _checkpoint(path: Path) -> dict[str, np.ndarray]:
    return {name: value.asnumpy() for name, value in ms.load_checkpoint(str(path / "model.ckpt")).items()}


@pytest.mark.skipif(MSRUN is None, reason="msrun not on PATH")
def test_two_msrun_workers_train_like_one_process_with_the_doubled_batch(one_layer_no_dropout_bert, tmp_path,
                                                                         capsys, monkeypatch):
    """SST-2 with 43 rows and a global batch of 8: five batches, then one of 3 rows that splits 2 + 1."""
    from conftest import write_sst2

    monkeypatch.setenv("Q8_PLUGINS", PLUGINS)
    data = write_sst2(tmp_path / "SST-2", n_train=43, n_dev=32)
    common = ["run", "--backend", "mindspore", "--task", "sst-2", "--model", str(one_layer_no_dropout_bert),
              "--data-dir", str(data), *ARGS]
    ddp, one, logs = tmp_path / "ddp", tmp_path / "one", tmp_path / "logs"
    # the workers train while this process trains the one-process twin
    proc = _msrun([*common, "--train-batch-size", str(B), "--output-dir", str(ddp)], cwd=tmp_path, logs=logs)
    code, _, err = run_q8([*common, "--train-batch-size", str(2 * B), "--output-dir", str(one)], capsys)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    worker0, worker1 = _log(logs / "worker_0.log"), _log(logs / "worker_1.log")
    assert code == 0, err
    assert proc.returncode == 0, f"{output[-1500:]}\n--- worker 0:\n{worker0[-2000:]}\n--- worker 1:\n{worker1[-2000:]}"

    ra, rb = (json.loads((d / "eval_results.json").read_text()) for d in (ddp, one))
    assert ra["step"] == rb["step"] == 6 and ra["world_size"] == 2 and ra["best_step"] == rb["best_step"]
    assert ra["metrics"].keys() == rb["metrics"].keys()
    for name, value in rb["metrics"].items():
        assert ra["metrics"][name] == pytest.approx(value, abs=METRIC_ATOL), name
    for step in (3, 6):
        wa, wb = _checkpoint(ddp / f"checkpoint-{step}"), _checkpoint(one / f"checkpoint-{step}")
        assert wa.keys() == wb.keys()
        for name in wb:
            if name.endswith(".steps"):
                np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
            elif name.endswith(".input_ema"):
                np.testing.assert_allclose(wa[name], wb[name], rtol=EMA_RTOL, atol=0, err_msg=name)
            elif name.endswith(".weight_scale"):
                np.testing.assert_allclose(wa[name], wb[name], rtol=SCALE_RTOL, atol=0, err_msg=name)
            else:
                np.testing.assert_allclose(wa[name], wb[name], rtol=0, atol=WEIGHT_ATOL, err_msg=name)
        assert any(name.endswith(".input_ema") and wb[name] > 0 for name in wb)
    assert_same_run(ddp, one, loss_atol=LOSS_ATOL, ema_rtol=EMA_RTOL)  # worker 0 alone writes
    assert "accuracy=" in worker0 and "accuracy=" not in worker1 and "Traceback" not in worker1
