"""Accuracy of every shipped model on its full official test split, as a markdown table.

    python -m training.evaluate --data-dir ../shared/data      # writes results/evaluation.md

Two figures per model, side by side: in-process (the raw test tensors, as training sees them) and
through the serving preprocessing (each test image as a PNG file through the handlers' Classifier:
decoded, preprocessed and normalised as TorchServe's workers do, then the same weights). The
difference is the training/serving skew.
The published anchors are quoted beside each figure so the distance to the state of the art is visible.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import catalog
from catalog import CLASSES, MEAN, MODEL_DATASETS, STD, dataset_of
from classifier import Classifier, to_png
from training.data import (DataMissing, ImageTensors, as_pixels, data_dir_arg, handler_preprocessing, load_split,
                           normalize)
from training.models import load_weights
from training.train import PRESETS


ANCHORS = {
    "mnist_lenet5": "LeCun et al. 1998: 99.05% (99.2% with distortions)",
    "mnist_alexnet": "strong single CNNs with BatchNorm and augmentation: 99.6-99.7%",
    "cifar10_resnet18": "kuangliu/pytorch-cifar 93.02%; Cutout paper 95.28% (flip+translate), 96.0% (+Cutout)",
}


BATCH = 500


def predictions(model, dataset: str, images: torch.Tensor, desc: str) -> torch.Tensor:
    """The raw uint8 test tensors, normalised as training normalises them."""
    loader = DataLoader(ImageTensors(images, torch.zeros(len(images), dtype=torch.long), normalize(dataset)), BATCH)
    with torch.inference_mode():
        return torch.cat([model(x).argmax(1) for x, _ in tqdm(loader, desc=desc, leave=False)])


def served_classifier(model, dataset: str) -> Classifier:
    """The handlers' Classifier with the settings an archive carries (catalog's facts: training does
    not read model_store/), running the eager model instead of an exported file."""
    config = {"classes": CLASSES[dataset], "mean": MEAN[dataset], "std": STD[dataset]}
    return Classifier(config, handler_preprocessing(dataset), lambda batch: model(torch.from_numpy(batch)).numpy())


def served_predictions(model, dataset: str, images: torch.Tensor, desc: str) -> torch.Tensor:
    """Each uint8 test image as a PNG file, decoded, preprocessed and normalised by the Classifier
    the handlers serve with."""
    classifier = served_classifier(model, dataset)
    seen = [classifier.pixels(to_png(as_pixels(image))) for image in tqdm(images, desc=desc, leave=False)]
    with torch.inference_mode():
        logits = [classifier.logits(classifier.batch(seen[i: i + BATCH])) for i in range(0, len(seen), BATCH)]
    return torch.from_numpy(np.concatenate(logits).argmax(1))


def main(args):
    torch.set_num_threads(args.threads)
    rows = ["| model | test accuracy in-process | through the serving preprocessing (PNG) | skew (points) | "
            "top-1 agreement | test images | shipped weights | recipe | published anchor |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in MODEL_DATASETS:
        weights = catalog.weights_path(name)
        if not weights.exists():
            rows.append(f"| {name} | not shipped yet | | | | | | | {ANCHORS[name]} |")
            continue
        model, dataset = load_weights(name, weights), dataset_of(name)
        try:
            images, labels = load_split(dataset, args.data_dir, train=False)
        except DataMissing as e:
            sys.exit(f"error: evaluation needs the official test splits: {e}")
        raw = predictions(model, dataset, images, f"{name} in-process")
        served = served_predictions(model, dataset, images, f"{name} as PNG through the handler")
        acc, served_acc = (raw == labels).float().mean().item(), (served == labels).float().mean().item()
        p = PRESETS[name]
        recipe = (f"{p.epochs} epochs, batch {p.batch_size}, one-cycle SGD lr {p.lr}, wd {p.weight_decay}, "
                  f"label smoothing {p.label_smoothing}")
        rows.append(f"| {name} | **{100 * acc:.2f}%** | {100 * served_acc:.2f}% | {100 * (served_acc - acc):+.2f} | "
                    f"{100 * (raw == served).float().mean().item():.2f}% | {len(labels):,} | {weights.name} "
                    f"({weights.stat().st_size / 1e6:.1f} MB) | {recipe} | {ANCHORS[name]} |")
        print(f"{name}: {100 * acc:.2f}% in-process, {100 * served_acc:.2f}% through the serving preprocessing, "
              f"on {len(labels)} test images")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rows) + "\n")
    print(f"wrote {out}")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=data_dir_arg, default=catalog.DATA_DIR)
    p.add_argument("--output", default="results/evaluation.md")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
