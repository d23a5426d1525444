"""Accuracy of every shipped model on its full official test split, as a markdown table.

    python -m training.evaluate --data-dir ../shared/data      # writes results/evaluation.md

The published anchors are quoted beside each figure so the distance to the state of the art is visible.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from training.data import DEFAULT_DATA_DIR, DataMissing, data_dir_arg, test_dataset
from training.models import MODELS, dataset_of, load_weights
from training.train import PRESETS, WEIGHTS_DIR, evaluate

ANCHORS = {
    "mnist_lenet5": "LeCun et al. 1998: 99.05% (99.2% with distortions)",
    "mnist_alexnet": "strong single CNNs with BatchNorm and augmentation: 99.6-99.7%",
    "cifar10_resnet18": "kuangliu/pytorch-cifar 93.02%; Cutout paper 95.28% (flip+translate), 96.0% (+Cutout)",
}


def main(args):
    torch.set_num_threads(args.threads)
    rows = ["| model | test accuracy | test images | shipped weights | recipe | published anchor |",
            "|---|---|---|---|---|---|"]
    for name in MODELS:
        weights = WEIGHTS_DIR / f"{name}.pt"
        if not weights.exists():
            rows.append(f"| {name} | not shipped yet | | | | {ANCHORS[name]} |")
            continue
        model = load_weights(name, weights)
        try:
            ds = test_dataset(dataset_of(name), args.data_dir)
        except DataMissing as e:
            sys.exit(f"error: evaluation needs the official test splits: {e}")
        _, acc, _ = evaluate(model, DataLoader(ds, 500), desc=name)
        p = PRESETS[name]
        recipe = (f"{p.epochs} epochs, batch {p.batch_size}, one-cycle SGD lr {p.lr}, wd {p.weight_decay}, "
                  f"label smoothing {p.label_smoothing}")
        rows.append(f"| {name} | **{100 * acc:.2f}%** | {len(ds):,} | {weights.name} "
                    f"({weights.stat().st_size / 1e6:.1f} MB) | {recipe} | {ANCHORS[name]} |")
        print(f"{name}: {100 * acc:.2f}% on {len(ds)} test images")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rows) + "\n")
    print(f"wrote {out}")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=data_dir_arg, default=DEFAULT_DATA_DIR)
    p.add_argument("--output", default="results/evaluation.md")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
