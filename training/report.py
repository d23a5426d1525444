"""Pictures and model cards from a training run's metrics."""
import hashlib
import shutil

import numpy as np
from pathlib import Path

import matplotlib

from catalog import CLASSES

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history, path, title):
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    ax_acc.plot(epochs, [100 * h["train_acc"] for h in history], label="train (augmented)")
    ax_acc.plot(epochs, [100 * h["val_acc"] for h in history], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title}: accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_confusion(confusion, classes, path, title):
    confusion = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}: test confusion")
    top = confusion.max()
    for t in range(len(classes)):
        for p in range(len(classes)):
            n = int(confusion[t][p])
            if n:
                ax.text(p, t, n, ha="center", va="center", fontsize=6, color="white" if n > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_model_card(metrics, weights: Path, run_dir: Path):
    """Copy the pictures beside the weights and write <model>.md from the run's metrics."""
    name = metrics["model"]
    for picture in ("curves", "confusion"):
        shutil.copy(run_dir / f"{picture}.png", weights.parent / f"{name}_{picture}.png")
    shutil.copy(run_dir / "metrics.json", weights.parent / f"{name}_metrics.json")
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    p = metrics["preset"]
    data = {"mnist": "MNIST (torchvision layout)", "cifar10": "CIFAR-10 (official binary version)"}[metrics["dataset"]]
    names = CLASSES[metrics["dataset"]]
    per_class = " | ".join(f"{names[c]}: {100 * a:.1f}" for c, a in enumerate(metrics["per_class_acc"]))
    card = f"""# Model card: {name}

| | |
|---|---|
| data | {data}: {metrics['train_images']} training images, {p['val_size']} held out for model selection; test split ({metrics['test_images']} images) used once, for this report |
| recipe | {p['epochs']} epochs, batch {p['batch_size']}, SGD Nesterov momentum 0.9, one-cycle peak lr {p['lr']}, weight decay {p['weight_decay']}, label smoothing {p['label_smoothing']}, bf16 autocast {p['bf16']} |
| command | `{metrics['command']}` |
| hardware | {metrics['hardware']} |
| wall time | {metrics['wall_seconds'] / 60:.1f} min |
| selected epoch | {metrics['best_epoch']} (validation accuracy {100 * metrics['best_val_acc']:.2f}%) |
| **test accuracy** | **{100 * metrics['shipped_test_acc']:.2f}%** with the shipped {metrics['shipped_dtype']} weights ({100 * metrics['test_acc']:.2f}% before the cast) |
| per-class test accuracy (%) | {per_class} |
| weights | `{weights.name}`, {weights.stat().st_size / 1e6:.2f} MB, sha256 `{sha}` |

![training curves]({name}_curves.png)
![confusion matrix]({name}_confusion.png)
"""
    (weights.parent / f"{name}.md").write_text(card)
