"""Data-parallel training: two CPU processes under torchrun (gloo) against one process with the
doubled batch, plus the backend-neutral pieces (launcher environment, batch sharding).

The two runs see the same seeded global batches; the only differences are float reduction orders
(per-rank means averaged by DDP instead of one mean, matrix products on half batches), so they agree
to float rounding, not bit for bit. Measured on CPU (torch 2.13, gloo), 12 steps at learning rate
3e-3: final weights within 6e-8 (SST-2) and 2e-7 (STS-B), EMA ranges within 2e-7 and 1.1e-6
relative, logged losses within 1.2e-7 and 1e-6, dev metrics identical. The tolerances below leave a
factor of ten; dropping the loss weighting of uneven shards, or the all-rank EMA maximum, moves the
weights by 2e-3 and the ranges by 0.2% and 7%.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from q8core import distributed
from q8core.distributed import DistributedEnv, environment, shard, shard_bounds
from q8core.errors import Q8Error

from helpers import assert_same_run, records, run_q8

WEIGHT_ATOL = 2e-6  # final model weights (measured 2e-7)
EMA_RTOL = 1e-5  # EMA activation ranges (measured 1.1e-6)
LOSS_ATOL = 1e-5  # logged training losses (measured 1e-6)
METRIC_ATOL = 1e-5  # dev metrics (measured 0)


# -- the launcher's environment ----------------------------------------------------------------
def test_environment_reads_torchrun_and_msrun_variables():
    assert environment({}) == distributed.SINGLE and not distributed.SINGLE.enabled and distributed.SINGLE.is_main
    env = environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert env == DistributedEnv(4, 3, 1, "torchrun") and env.enabled and not env.is_main
    assert environment({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) == distributed.SINGLE
    ms = {"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "8", "RANK_SIZE": "8", "MS_SCHED_HOST": "127.0.0.1"}
    assert environment({**ms, "RANK_ID": "5"}) == DistributedEnv(8, 5, None, "msrun")
    assert environment(ms) == DistributedEnv(8, None, None, "msrun")  # the rank comes from the group
    assert environment({"RANK_SIZE": "2", "RANK_ID": "1", "DEVICE_ID": "1"}) == DistributedEnv(2, 1, 1, "msrun")
    # msrun's scheduler runs the same command: it must serve the rendezvous, never train as a single process
    sched = environment({"MS_ROLE": "MS_SCHED", "MS_WORKER_NUM": "8"})
    assert sched == DistributedEnv(8, None, None, "msrun", scheduler=True) and sched.enabled and not sched.is_main
    for bad, message in (({"WORLD_SIZE": "2", "RANK": "2"}, "rank 2 is outside 0..1"),
                         ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
                         ({"MS_ROLE": "MS_WORKER"}, "MS_WORKER_NUM")):
        with pytest.raises(Q8Error, match=message):
            environment(bad)


def test_shards_cover_the_global_batch_in_order_with_exact_weights():
    for rows in range(1, 20):
        for world in (1, 2, 3, 4):
            bounds = [shard_bounds(rows, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    batch = {"input_ids": np.arange(10).reshape(5, 2), "labels": np.arange(5)}
    parts = [shard(batch, r, 2) for r in range(2)]
    assert [p["labels"].tolist() for p, _ in parts] == [[0, 1, 2], [3, 4]]
    assert [w for _, w in parts] == [0.6, 0.4]
    part, weight = shard({"input_ids": np.ones((1, 3)), "labels": np.array([7])}, 1, 2)
    assert part["labels"].tolist() == [7] and weight == 0.0  # a stand-in row: it adds nothing


def test_a_backend_without_data_parallelism_refuses_a_launcher_in_one_line():
    from q8core.backend import Backend

    class Mine(Backend):
        name = "mine"

    assert not Mine.distributed and Mine.rank_device("gpu", DistributedEnv(2, 1, 1, "msrun")) == "gpu"
    Mine.barrier()
    assert Mine.broadcast_object({"a": 1}) == {"a": 1}
    with pytest.raises(Q8Error, match="does not train data-parallel; msrun started 2 processes"):
        Mine.init_distributed(DistributedEnv(2, 0, 0, "msrun"), "cpu")


def test_torch_device_per_rank_and_no_collectives_without_a_group():
    import torch

    from backends.pytorch.backend import TorchBackend
    from backends.pytorch.quantization import all_ranks_max

    env = DistributedEnv(2, 1, 1, "torchrun")
    assert TorchBackend.rank_device("gpu", env) == "gpu:1" and TorchBackend.rank_device("cpu", env) == "cpu"
    with pytest.raises(Q8Error, match="pass --device gpu"):
        TorchBackend.rank_device("gpu:0", env)
    value = torch.tensor(1.5)
    assert all_ranks_max(value) is value and float(value) == 1.5  # one process: left as it is


# -- two processes under torchrun ----------------------------------------------------------------
B = 4  # per-rank batch
ARGS = ["--max-steps", "12", "--learning-rate", "3e-3", "--ema-decay", "0.9", "--logging-steps", "1",
        "--seed", "7"]


@pytest.fixture(scope="module")
def no_dropout_bert(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT with dropout off: dropout masks are drawn per rank, so only without it can two
    processes reproduce one."""
    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    for item in tiny_bert.iterdir():
        shutil.copy(item, folder / item.name)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", Q8_PLUGINS="torch,glue", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def _assert_equivalent(ddp: Path, one: Path) -> None:
    """The 2-process run ends where the 1-process run with batch 2B ends, within float rounding."""
    ra, rb = (json.loads((d / "eval_results.json").read_text()) for d in (ddp, one))
    assert ra["step"] == rb["step"] and ra["world_size"] == 2 and ra["best_step"] == rb["best_step"]
    assert ra["metrics"].keys() == rb["metrics"].keys()
    for name, value in rb["metrics"].items():
        assert ra["metrics"][name] == pytest.approx(value, abs=METRIC_ATOL), name
    last = f"checkpoint-{ra['step']}"
    weights_a, weights_b = load_file(str(ddp / last / "model.safetensors")), load_file(str(one / last / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    for name in weights_b:
        np.testing.assert_allclose(weights_a[name], weights_b[name], rtol=0, atol=WEIGHT_ATOL, err_msg=name)
    ema_a, ema_b = load_file(str(ddp / last / "quant_state.safetensors")), load_file(str(one / last / "quant_state.safetensors"))
    assert ema_a.keys() == ema_b.keys()
    for name in ema_b:
        np.testing.assert_allclose(ema_a[name], ema_b[name], rtol=EMA_RTOL, atol=0, err_msg=name)
    assert_same_run(ddp, one, loss_atol=LOSS_ATOL, ema_rtol=EMA_RTOL)  # rank 0 alone writes


@pytest.fixture(scope="module")
def sst2_runs(no_dropout_bert, tmp_path_factory):
    """SST-2 with 43 rows: 5 global batches of 8, then one of 3 rows that splits 2 + 1."""
    from conftest import write_sst2

    root = tmp_path_factory.mktemp("ddp-sst2")
    data = write_sst2(root / "SST-2", n_train=43, n_dev=32)
    common = ["run", "--task", "sst-2", "--model", str(no_dropout_bert), "--data-dir", str(data), *ARGS,
              "--eval-steps", "6", "--save-steps", "4"]
    ddp = _torchrun([*common, "--train-batch-size", str(B), "--output-dir", str(root / "ddp")], cwd=root)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    import cli

    try:
        cli.main([*common, "--train-batch-size", str(2 * B), "--output-dir", str(root / "one"), "--quiet"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return root, ddp, common


def test_two_processes_train_like_one_process_with_the_doubled_batch(sst2_runs):
    root, ddp, _ = sst2_runs
    _assert_equivalent(root / "ddp", root / "one")
    output = ddp.stdout + ddp.stderr
    assert output.count("step 6 (epoch 1.00)") == 1  # one progress bar: rank 0's
    assert "x2 processes" in output


def test_ddp_resume_continues_exactly_and_refuses_another_world_size(sst2_runs, capsys):
    root, _, common = sst2_runs
    resumed = root / "resumed"
    shutil.copytree(root / "ddp", resumed)
    for checkpoint in resumed.glob("checkpoint-*"):  # as if killed after step 5
        if int(checkpoint.name.split("-")[1]) > 4:
            shutil.rmtree(checkpoint)
    code, _, err = run_q8(["run", "--resume", str(resumed), "--quiet"], capsys)  # one process
    assert code == 2 and err.splitlines()[-1].startswith("q8: error: ") and "trained by 2 process(es)" in err
    proc = _torchrun(["run", "--resume", str(resumed), "--quiet"], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr and "checkpoint-4" in proc.stderr
    for name in ("model.safetensors", "quant_state.safetensors"):  # same processes, same sums: bit for bit
        assert (resumed / "checkpoint-12" / name).read_bytes() == (root / "ddp" / "checkpoint-12" / name).read_bytes()
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("sec_per_step", "elapsed_s")} for r in records]
    assert strip(records(resumed)) == strip(records(root / "ddp"))


def test_regression_with_a_last_batch_smaller_than_the_world(no_dropout_bert, tmp_path):
    """STS-B (MSE loss) with 41 rows: the last global batch has 1 row, and rank 1 trains on a
    stand-in row with weight 0."""
    from conftest import write_stsb
    import cli

    data = write_stsb(tmp_path / "STS-B", n_train=41, n_dev=24)
    common = ["run", "--task", "sts-b", "--model", str(no_dropout_bert), "--data-dir", str(data), *ARGS,
              "--quiet"]
    ddp = _torchrun([*common, "--train-batch-size", str(B), "--output-dir", str(tmp_path / "ddp")], cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    try:
        cli.main([*common, "--train-batch-size", str(2 * B), "--output-dir", str(tmp_path / "one")])
    except SystemExit as exc:
        assert exc.code in (0, None)
    _assert_equivalent(tmp_path / "ddp", tmp_path / "one")
