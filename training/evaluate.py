"""Accuracy of every shipped model on its full official test split, as a markdown table.

    python -m training.evaluate --data-dir ../shared/data      # writes results/evaluation.md

Two figures per model, side by side: in-process (the raw test tensors, as training sees them) and
through the serving preprocessing (each test image sent as a PNG file through the handlers' own
decoding and preprocessing, as TorchServe runs them). The difference is the training/serving skew.
The published anchors are quoted beside each figure so the distance to the state of the art is visible.
"""
import argparse
import io
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.data import (DEFAULT_DATA_DIR, DataMissing, ImageTensors, data_dir_arg, handler_preprocessing, load_split,
                           normalize)
from training.models import MODELS, dataset_of, load_weights
from training.train import PRESETS, WEIGHTS_DIR


ANCHORS = {
    "mnist_lenet5": "LeCun et al. 1998: 99.05% (99.2% with distortions)",
    "mnist_alexnet": "strong single CNNs with BatchNorm and augmentation: 99.6-99.7%",
    "cifar10_resnet18": "kuangliu/pytorch-cifar 93.02%; Cutout paper 95.28% (flip+translate), 96.0% (+Cutout)",
}


def served_pixels(dataset: str, images: torch.Tensor) -> torch.Tensor:
    """Each uint8 test image as a PNG file, decoded and preprocessed by the handler that serves it."""
    preprocess = handler_preprocessing(dataset)  # puts handlers/ on sys.path, as they are shipped in the .mar
    from base_classifier import decode_image
    seen = []
    for image in tqdm(images, desc=f"{dataset} as PNG through the handler", leave=False):
        pixels = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        out = preprocess(decode_image(buffer.getvalue()))
        seen.append(torch.from_numpy(out[None] if out.ndim == 2 else out.transpose(2, 0, 1).copy()))
    return torch.stack(seen)


def predictions(model, dataset: str, images: torch.Tensor, desc: str) -> torch.Tensor:
    loader = DataLoader(ImageTensors(images, torch.zeros(len(images), dtype=torch.long), normalize(dataset)), 500)
    with torch.inference_mode():
        return torch.cat([model(x).argmax(1) for x, _ in tqdm(loader, desc=desc, leave=False)])


def main(args):
    torch.set_num_threads(args.threads)
    rows = ["| model | test accuracy in-process | through the serving preprocessing (PNG) | skew (points) | "
            "top-1 agreement | test images | shipped weights | recipe | published anchor |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        weights = WEIGHTS_DIR / f"{name}.pt"
        if not weights.exists():
            rows.append(f"| {name} | not shipped yet | | | | | | | {ANCHORS[name]} |")
            continue
        model, dataset = load_weights(name, weights), dataset_of(name)
        try:
            images, labels = load_split(dataset, args.data_dir, train=False)
        except DataMissing as e:
            sys.exit(f"error: evaluation needs the official test splits: {e}")
        raw = predictions(model, dataset, images, f"{name} in-process")
        served = predictions(model, dataset, served_pixels(dataset, images), f"{name} served preprocessing")
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
    p.add_argument("--data-dir", type=data_dir_arg, default=DEFAULT_DATA_DIR)
    p.add_argument("--output", default="results/evaluation.md")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
