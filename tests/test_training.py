"""A few training steps on a tiny MNIST written in torchvision's layout: the pipeline runs end to end."""
import json
import struct

import numpy as np
import pytest
import torch

import catalog
from drawing import draw_digit
from training import train
from training.models import MODELS, build_model

pytestmark = pytest.mark.slow  # short training runs: minutes in all


def write_idx(path, array: np.ndarray):
    dims = array.shape
    magic = {1: 0x801, 3: 0x803}[len(dims)]
    path.write_bytes(struct.pack(f">I{len(dims)}I", magic, *dims) + array.astype(np.uint8).tobytes())


def tiny_mnist(root, n=480):
    """Drawn digits (0, 1, 4, 7) at random places, as MNIST IDX files."""
    rng = np.random.default_rng(0)
    digits = rng.choice([0, 1, 4, 7], n)
    images = np.stack([np.asarray(draw_digit(int(d), size=(28, 28), box=(int(rng.integers(3, 8)),
                                                                         int(rng.integers(3, 6)), 16, 19),
                                             width=2, mode="L", background=(0,) * 4)) for d in digits])
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", digits)


def test_model_shapes():
    assert set(MODELS) == set(catalog.MODEL_DATASETS)  # a builder for every served model
    for name in MODELS:
        x = torch.zeros(2, *catalog.INPUT_SHAPE[catalog.dataset_of(name)])
        assert build_model(name).eval()(x).shape == (2, 10)


def test_a_short_training_run_writes_checkpoint_metrics_and_curves(tmp_path):
    tiny_mnist(tmp_path)
    out = tmp_path / "run"
    args = train.get_args_parser().parse_args(["--model", "mnist_lenet5", "--data-dir", str(tmp_path),
                                               "--output-dir", str(out), "--epochs", "3", "--batch-size", "32",
                                               "--limit", "200", "--threads", "1"])
    train.main(args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 3 and metrics["test_images"] == 200
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    checkpoint = torch.load(out / "best.pt", weights_only=False)
    assert set(checkpoint) >= {"model", "optimizer", "epoch", "args"}
    assert (out / "curves.png").stat().st_size > 1000 and (out / "confusion.png").stat().st_size > 1000


def test_fine_tuning_on_corrections_starts_from_weights_and_adds_the_samples(tmp_path):
    tiny_mnist(tmp_path)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "corrections.npz", images=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8),
             labels=rng.integers(0, 10, 16))
    out = tmp_path / "finetune"
    args = train.get_args_parser().parse_args([
        "--model", "mnist_lenet5", "--data-dir", str(tmp_path), "--output-dir", str(out), "--epochs", "1",
        "--batch-size", "32", "--limit", "200", "--threads", "1", "--lr", "0.01",
        "--init-from", str(catalog.weights_path("mnist_lenet5")), "--extra-train", str(tmp_path / "corrections.npz")])
    train.main(args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_images"] == 200 + 16
    # from scratch, 7 steps at lr 0.01 stay near chance (4 classes); the shipped weights know these digits
    assert metrics["test_acc"] > 0.5


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Stopped after epoch 2 of 3 and resumed: the same weights, schedule and history as a run that was
    never stopped (the checkpoint holds momentum, schedule position and the random stream)."""
    tiny_mnist(tmp_path)
    common = ["--model", "mnist_lenet5", "--data-dir", str(tmp_path), "--epochs", "3", "--batch-size", "32",
              "--limit", "200", "--threads", "1"]
    train.main(train.get_args_parser().parse_args(common + ["--output-dir", str(tmp_path / "whole")]))

    real_epoch, calls = train.train_one_epoch, []

    def stop_in_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", stop_in_third_epoch)
    parts = common + ["--output-dir", str(tmp_path / "parts")]
    try:
        train.main(train.get_args_parser().parse_args(parts))
    except KeyboardInterrupt:
        pass
    assert torch.load(tmp_path / "parts" / "last.pt", weights_only=False)["epoch"] == 2
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    train.main(train.get_args_parser().parse_args(parts + ["--resume"]))

    whole, parts_state = (torch.load(tmp_path / d / "last.pt", weights_only=False) for d in ("whole", "parts"))
    assert [h["train_loss"] for h in whole["history"]] == [h["train_loss"] for h in parts_state["history"]]
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, parts_state["model"][name]), name


def test_a_resumed_run_may_be_given_another_length(tmp_path):
    """--epochs with --resume (a run shortened to fit its time): the one-cycle schedule of the new
    length continues from the step the run reached; any other change of the recipe is refused."""
    tiny_mnist(tmp_path)
    common = ["--model", "mnist_lenet5", "--data-dir", str(tmp_path), "--batch-size", "32", "--limit", "200",
              "--threads", "1", "--output-dir", str(tmp_path / "run")]
    train.main(train.get_args_parser().parse_args(common + ["--epochs", "2"]))
    train.main(train.get_args_parser().parse_args(common + ["--epochs", "3", "--resume"]))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    steps = state["scheduler"]["last_epoch"]
    assert steps == 3 * (200 // 32)  # the schedule went on from epoch 2's last step, not from its start
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    reference = torch.optim.lr_scheduler.OneCycleLR(probe, 0.1, total_steps=steps, pct_start=0.25)
    for _ in range(steps):
        probe.step()
        reference.step()
    lr = state["optimizer"]["param_groups"][0]["lr"]
    assert abs(lr - probe.param_groups[0]["lr"]) < 1e-9 * max(lr, 1e-9) + 1e-12
    with pytest.raises(SystemExit, match="was trained with"):
        train.main(train.get_args_parser().parse_args(common + ["--epochs", "3", "--lr", "0.05", "--resume"]))
