"""Distributed runs, for real: data-parallel training under torchrun (2 processes, torch.distributed with
gloo on the CPU), and a distributed Locust load test (one master, 2 worker processes) against a real
TorchServe."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catalog import archive_name
from conftest import ROOT, start_torchserve
from serving import server
from test_training import tiny_mnist
from training import train

pytestmark = pytest.mark.integration  # real processes: torchrun's, Locust's master and workers, TorchServe

TORCHRUN = Path(sys.executable).parent / "torchrun"
TINY = ["--model", "mnist_lenet5", "--epochs", "2", "--batch-size", "32", "--limit", "200", "--threads", "1"]


def test_torchrun_trains_data_parallel_and_only_rank_0_writes(tmp_path):
    """2 processes, 2 epochs on 200 drawn digits: the results of a single-process run, in its format,
    written once; every step saw the preset's batch (16 images in each process), so the schedule has
    the single-process run's number of steps."""
    tiny_mnist(tmp_path)
    out, single = tmp_path / "ddp", tmp_path / "single"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "training.train", *TINY,
                           "--data-dir", str(tmp_path), "--output-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "distributed: 2 processes (gloo), 16 images per process and step" in done.stdout
    assert done.stdout.count('"epoch": 1,') == 1  # progress printed by rank 0 only
    train.main(train.get_args_parser().parse_args([*TINY, "--data-dir", str(tmp_path), "--output-dir", str(single)]))

    metrics, reference = (json.loads((d / "metrics.json").read_text()) for d in (out, single))
    assert set(metrics) == set(reference)  # the same results format
    assert metrics["command"].startswith("torchrun --nproc-per-node 2 -m training.train")
    assert metrics["hardware"].startswith("2 processes (gloo)")
    assert len(metrics["history"]) == 2 and metrics["train_images"] == 200 and metrics["test_images"] == 200
    assert sum(map(sum, metrics["confusion"])) == 200  # the test shards of both processes, added up
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # one writer (two would log 4 lines)
    assert {p.name for p in out.iterdir()} == {p.name for p in single.iterdir()}

    state, single_state = (torch.load(d / "last.pt", weights_only=False) for d in (out, single))
    assert state["scheduler"]["last_epoch"] == single_state["scheduler"]["last_epoch"] == 2 * (200 // 32)
    assert state["args"]["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert not any(name.startswith("module.") for name in state["model"])  # the plain model's weights
    assert set(state["model"]) == set(single_state["model"])
    # Both processes trained: the gradients were averaged, so the weights differ from the single run's
    # (which saw each batch of 32 in one piece, with BatchNorm over all 32) but the model learnt.
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    # Resumed by another number of processes, every epoch would be split otherwise: refused.
    with pytest.raises(SystemExit, match="was trained by 2 processes, not 1"):
        train.main(train.get_args_parser().parse_args([*TINY, "--epochs", "3", "--data-dir", str(tmp_path),
                                                       "--output-dir", str(out), "--resume"]))



@pytest.fixture(scope="module")
def lenet_server(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distributed_ts")
    yield start_torchserve(run_dir, [f"mnist_lenet5={archive_name('mnist_lenet5', '1.0')}"])
    server.stop(run_dir)


def test_distributed_load_test_has_both_workers_sending_and_no_failures(lenet_server, tmp_path):
    """`python -m loadtest.run --workers 2`: a Locust master and 2 worker processes, a few seconds of
    REST and gRPC load; the master's samples and summary hold both workers' requests, none failed,
    every checked label right."""
    from loadtest.run import get_args_parser, run_load, spec_of
    args = get_args_parser().parse_args([
        "--ts-config", str(lenet_server.run_dir / "config.properties"),
        "--key-file", str(lenet_server.run_dir / "key_file.json"), "--warmup-s", "0",
        "--workers", "2", "--users", "4", "--spawn-rate", "4", "--duration", "8", "--protocol", "both",
        "--check-every", "1", "--max-error-rate", "0", "--targets", "mnist_lenet5:1.0=1,mnist_lenet5=1"])
    code, _, summary = run_load(spec_of(args), tmp_path)
    log = (tmp_path / "locust.log").read_text()
    assert code == 0, log[-3000:]
    total = summary["series"]["total"]
    assert total["failures"] == 0 and total["requests"] >= 20, total
    assert summary["wrong_labels"] == 0 and summary["checked"] == summary["all_requests"]  # --check-every 1
    workers = summary["workers"]
    assert [w["worker"] for w in workers] == [1, 2], workers
    assert all(w["requests"] > 0 and w["failures"] == 0 and w["checked"] == w["requests"] for w in workers), workers
    assert sum(w["requests"] for w in workers) == summary["all_requests"]
    with open(tmp_path / "samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["worker"] for r in rows} == {"1", "2"} and all(r["ok"] == "1" for r in rows)
    assert max(int(r["users"]) for r in rows) == 4  # the users of both workers, 2 each
    # Locust's own statistics (the master's aggregate of the workers' reports) count the same requests.
    with open(tmp_path / "locust_stats.csv", newline="") as f:
        aggregated = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    assert int(aggregated["Request Count"]) == len(rows) and int(aggregated["Failure Count"]) == 0
