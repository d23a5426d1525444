"""Data sets as uint8 tensors in memory, the train/validation split, and the transforms.

MNIST comes through torchvision's MNIST class. CIFAR-10 comes either through torchvision's
CIFAR10 class (the python pickles it downloads) or from the official binary version
(`cifar-10-batches-bin/*.bin` or `*.bin.gz`), which torchvision does not read.
"""
import argparse
import gzip
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2
from tqdm import tqdm

from catalog import MEAN, STD  # also puts handlers/ on sys.path (handler_preprocessing)

# The files each data set needs, relative to the data directory (either one of a tuple will do).
SPLIT_FILES = {"mnist": ("MNIST/raw/t10k-images-idx3-ubyte",),
               "cifar10": ("cifar-10-batches-bin", "cifar-10-batches-py")}


class DataMissing(FileNotFoundError):
    """A data set that is not in the data directory (a fresh clone has none)."""


def data_dir_arg(value: str) -> Path:
    """argparse type of --data-dir: a directory given on the command line must exist (the default may not)."""
    if not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"the data directory {value} does not exist")
    return Path(value)


def has_dataset(dataset: str, data_dir) -> bool:
    return any((Path(data_dir) / name).exists() for name in SPLIT_FILES[dataset])


def require_dataset(dataset: str, data_dir):
    if not Path(data_dir).is_dir():
        raise DataMissing(f"the data directory {data_dir} does not exist (set DATA_DIR or pass --data-dir; "
                          f"see README: data sets)")
    if not has_dataset(dataset, data_dir):
        raise DataMissing(f"{dataset} is not in {data_dir} (expected {' or '.join(SPLIT_FILES[dataset])})")


CIFAR_RECORD = 1 + 32 * 32 * 3  # label byte, then 1024 red, 1024 green, 1024 blue


class ImageTensors(Dataset):
    """uint8 images (N, C, H, W) and int64 labels; the transform runs per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), self.labels[i]


def read_cifar10_binary(path) -> tuple[np.ndarray, np.ndarray]:
    """One official binary batch file (.bin or .bin.gz) -> (images N x 32 x 32 x 3 uint8, labels N)."""
    path = Path(path)
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) % CIFAR_RECORD:
        raise ValueError(f"{path}: {len(raw)} bytes is not a whole number of {CIFAR_RECORD}-byte records")
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), records[:, 0].astype(np.int64)


def _binary_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.bin", f"{stem}.bin.gz"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{folder}: neither {stem}.bin nor {stem}.bin.gz")


def load_cifar10(data_dir, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 as (N x 32 x 32 x 3 uint8, labels): the binary version when present, else torchvision's."""
    binary = Path(data_dir) / "cifar-10-batches-bin"
    if binary.is_dir():
        stems = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        parts = [read_cifar10_binary(_binary_file(binary, s)) for s in stems]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    ds = datasets.CIFAR10(data_dir, train=train, download=download)
    return ds.data, np.asarray(ds.targets, dtype=np.int64)


def load_split(dataset: str, data_dir, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as (uint8 N x C x H x W, int64 N). Raises DataMissing when the files are absent."""
    if dataset not in SPLIT_FILES:
        raise ValueError(f"unknown dataset {dataset!r}")
    if not download:
        require_dataset(dataset, data_dir)
    try:
        if dataset == "mnist":
            ds = datasets.MNIST(data_dir, train=train, download=download)
            return ds.data.unsqueeze(1), ds.targets.long()
        images, labels = load_cifar10(data_dir, train, download)
    except (RuntimeError, FileNotFoundError) as e:  # a data set only partly there: torchvision's "not found"
        raise DataMissing(f"{dataset} in {data_dir} is incomplete: {e}") from None
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def normalize(dataset: str):
    """uint8 C x H x W -> float32 scaled to [0, 1], standardised per channel. The handlers normalise
    served images in handlers/classifier.py (Classifier.batch) to the same bits (tests/test_classifier.py)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN[dataset], STD[dataset])])


def handler_preprocessing(dataset: str):
    """The serving handler's own preprocessing (PIL image -> the uint8 pixels the model sees), so that
    training, evaluation and serving cannot disagree about it."""
    from digit_handler import mnist_style
    from image_handler import cifar_style
    return {"mnist": mnist_style, "cifar10": cifar_style}[dataset]


def as_pixels(image: torch.Tensor) -> np.ndarray:
    """uint8 C x H x W -> H x W (one channel) or H x W x C: the layout of an image file's pixels."""
    return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()


def as_served(dataset: str, images: torch.Tensor, desc: str = "") -> torch.Tensor:
    """uint8 N x C x H x W -> the same images after the handler's preprocessing. (A PNG round trip
    would give the handler the same pixels: PNG is lossless; training/evaluate.py makes it anyway.)"""
    preprocess, seen = handler_preprocessing(dataset), []
    for image in tqdm(images, desc=desc or f"{dataset} through the handler's preprocessing", leave=False):
        out = preprocess(Image.fromarray(as_pixels(image)))
        seen.append(torch.from_numpy(out[None] if out.ndim == 2 else out.transpose(2, 0, 1).copy()))
    return torch.stack(seen)


class DrawnDigit:
    """A training digit made to differ the way canvas drawings and photos differ from MNIST, then
    preprocessed by the handler exactly as a served image is (no training/serving skew):
    pen width (dilation/erosion at 2x resolution, where a 3x3 step is half an MNIST pixel),
    proportions (aspect 0.7-1.3), slant and rotation (shear, +-12 degrees), wobble (elastic distortion).
    Position and size need no augmentation: the handler crops, fits and centres every image."""
    UPSCALE = 56  # px: dilation/erosion in steps fine enough for MNIST's ~2-3 px strokes

    def __init__(self):
        self.preprocess = handler_preprocessing("mnist")
        self.distort = v2.Compose([
            v2.RandomAffine(degrees=12, shear=(-15, 15, -5, 5)),
            v2.RandomApply([v2.ElasticTransform(alpha=40.0, sigma=5.0)], p=0.5),
        ])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        aspect = 0.7 + 0.6 * torch.rand(()).item()
        size = (max(8, round(self.UPSCALE * aspect)), self.UPSCALE)  # (width, height)
        digit = Image.fromarray(x[0].numpy()).resize(size, Image.Resampling.BILINEAR)
        pen = torch.randint(0, 5, ()).item()  # 0: thinner, 1-2: as written, 3: thicker, 4: much thicker
        if pen == 0:
            digit = digit.filter(ImageFilter.MinFilter(3))
        elif pen >= 3:
            digit = digit.filter(ImageFilter.MaxFilter(3 if pen == 3 else 5))
        distorted = self.distort(torch.from_numpy(np.asarray(digit).copy())[None])
        try:
            out = self.preprocess(Image.fromarray(distorted[0].numpy()))
        except ValueError:  # the handler's BadInput: erosion wiped a faint digit out; keep it as written
            out = self.preprocess(Image.fromarray(x[0].numpy()))
        return torch.from_numpy(out)[None]


def train_transform(dataset: str, served: bool = False):
    """Augmentation. Digits: small affine distortions (no flips: a 2 is not a mirrored 5), or with
    `served` the drawing-like distortions of DrawnDigit followed by the handler's preprocessing.
    CIFAR-10: pad-and-crop, flip and Cutout."""
    if dataset == "mnist":
        aug = [DrawnDigit()] if served else [
            v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=8)]
        return v2.Compose(aug + [normalize(dataset)])
    return v2.Compose([
        v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip(), normalize(dataset),
        v2.RandomErasing(p=1.0, scale=(0.0625, 0.0625), ratio=(1.0, 1.0), value=0),  # Cutout 8x8
    ])


def train_val_datasets(dataset: str, data_dir, val_size: int, seed: int, download: bool = False,
                       served: bool = False):
    """Hold out `val_size` training images (seeded) for model selection; the test split stays unseen.
    `served`: validation images go through the handler's preprocessing, training images through
    DrawnDigit (which ends with it)."""
    images, labels = load_split(dataset, data_dir, train=True, download=download)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    val, train = order[:val_size], order[val_size:]
    val_images = as_served(dataset, images[val], "validation through the handler") if served else images[val]
    return (ImageTensors(images[train], labels[train], train_transform(dataset, served)),
            ImageTensors(val_images, labels[val], normalize(dataset)))


def test_dataset(dataset: str, data_dir, download: bool = False, served: bool = False):
    images, labels = load_split(dataset, data_dir, train=False, download=download)
    if served:
        images = as_served(dataset, images, "test through the handler")
    return ImageTensors(images, labels, normalize(dataset))
