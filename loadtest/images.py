"""The images a load test sends, each with the label a correct server must answer.

Real test images (MNIST, CIFAR-10) when the data directory holds them, otherwise images drawn here
(digits with tests/drawing.py's strokes, simple coloured scenes for the photo model). A served model
is not 100% accurate, so "the known label" is checked in-process first: an image is used only when
the shipped export, run through the same preprocessing (loadtest.flask_baseline.Predictor), gives
its true label with a clear margin. A served answer that differs is then a serving fault (a version
mix-up, responses swapped within a batch, broken preprocessing), never a model error.
"""
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from catalog import CLASSES, dataset_of, load_settings, versions
from loadtest.flask_baseline import Predictor
from loadtest.settings import MIN_MARGIN, POOL_SIZE
from tests.drawing import STROKES, draw_digit, png_bytes
from training.data import has_dataset, load_cifar10, load_split

STROKE_WIDTHS_PX = (10, 18, 26)  # pen widths of drawn digits on a 280x280 canvas
DRAWN_SCENES = 64  # coloured scenes drawn when CIFAR-10 is absent


@dataclass(frozen=True)
class Sample:
    image: bytes  # PNG file
    label: str


def mnist_images(data_dir: Path, n: int) -> list[tuple[bytes, str]]:
    images, labels = load_split("mnist", data_dir, train=False)
    return [(png_bytes(Image.fromarray(images[i, 0].numpy())), str(int(labels[i]))) for i in range(n)]


def cifar_images(data_dir: Path, n: int) -> list[tuple[bytes, str]]:
    images, labels = load_cifar10(data_dir, train=False)
    return [(png_bytes(Image.fromarray(images[i])), CLASSES["cifar10"][labels[i]]) for i in range(n)]


def drawn_digits() -> list[tuple[bytes, str]]:
    return [(png_bytes(draw_digit(d, width=w)), str(d)) for d in STROKES for w in STROKE_WIDTHS_PX]


def drawn_scenes(n: int, seed: int = 0) -> list[tuple[bytes, None]]:
    """Sky over ground with a blob in front: no true label, the reference model's answer is used."""
    rng = random.Random(seed)
    scenes = []
    for _ in range(n):
        image = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
        pen = ImageDraw.Draw(image)
        horizon = rng.randrange(16, 48)
        pen.rectangle((0, horizon, 64, 64), fill=tuple(rng.randrange(256) for _ in range(3)))
        x, y, r = rng.randrange(12, 52), rng.randrange(12, 52), rng.randrange(6, 20)
        pen.ellipse((x - r, y - r // 2, x + r, y + r // 2), fill=tuple(rng.randrange(256) for _ in range(3)))
        scenes.append((png_bytes(image), None))
    return scenes


def candidates(dataset: str, data_dir: Path, n: int) -> list[tuple[bytes, str | None]]:
    """(PNG, true label or None): real test images when present, else drawn ones."""
    if has_dataset(dataset, data_dir):
        return {"mnist": mnist_images, "cifar10": cifar_images}[dataset](data_dir, n)
    return drawn_digits() if dataset == "mnist" else drawn_scenes(DRAWN_SCENES)


def labeled_pool(model: str, data_dir: Path, size: int = POOL_SIZE) -> list[Sample]:
    """Images `model` labels right (or, without a true label, confidently), with that label."""
    reference = Predictor(model)
    images = candidates(dataset_of(model), data_dir, size)
    pixels = [reference.pixels(image) for image, _ in images]
    probs = reference.probabilities(pixels)
    # A flip-TTA version (models.yaml `tta: flip`) answers the mean of the logits of the image and its
    # mirror: an image whose mirror gets the same label gets it from the mean too.
    mirror = (reference.probabilities([p[:, ::-1] for p in pixels]).argmax(1) if has_flip_tta(model)
              else probs.argmax(1))
    top2 = np.sort(probs, axis=1)[:, -2:]
    pool = []
    for (image, truth), p, (second, first), mirrored in zip(images, probs, top2, mirror):
        label = reference.classes[int(p.argmax())]
        if first - second >= MIN_MARGIN and truth in (None, label) and mirrored == p.argmax():
            pool.append(Sample(image, label))
    if not pool:
        raise RuntimeError(f"no image of {dataset_of(model)} is labelled with a margin >= {MIN_MARGIN} by {model}")
    return pool


def has_flip_tta(model: str) -> bool:
    return any(spec.tta == "flip" for spec in versions(load_settings(), model).values())
