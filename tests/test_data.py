"""Data loading: the CIFAR-10 binary reader agrees with torchvision's reader of the python version."""
import gzip
import pickle

import numpy as np
import pytest
import torch
from torchvision import datasets

from training.data import load_split, read_cifar10_binary, train_val_datasets


def write_cifar_fixture(root, n_per_batch=7, seed=0):
    """The same random images written in both official formats: cifar-10-batches-bin (gzip for the
    test batch, plain for the rest) and cifar-10-batches-py."""
    rng = np.random.default_rng(seed)
    binary, python = root / "bin" / "cifar-10-batches-bin", root / "py" / "cifar-10-batches-py"
    binary.mkdir(parents=True)
    python.mkdir(parents=True)
    expected = {}
    for stem in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).astype(np.uint8)
        planes = images.transpose(0, 3, 1, 2).reshape(n_per_batch, -1)  # R, G, B planes, row-major
        raw = np.concatenate([labels[:, None], planes], axis=1).tobytes()
        if stem == "test_batch":
            (binary / f"{stem}.bin.gz").write_bytes(gzip.compress(raw))
        else:
            (binary / f"{stem}.bin").write_bytes(raw)
        with open(python / stem, "wb") as f:
            pickle.dump({"data": planes, "labels": labels.tolist()}, f)  # str keys, as the official py2 pickles
        expected[stem] = (images, labels)
    with open(python / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["c"] * 10}, f)
    return expected


def test_binary_reader_matches_torchvision_cifar10(tmp_path, monkeypatch):
    expected = write_cifar_fixture(tmp_path)
    # torchvision verifies the md5 of the official files; the fixture is ours, so skip that check only.
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args: True)
    for train in (True, False):
        ours = load_split("cifar10", tmp_path / "bin", train)
        theirs = load_split("cifar10", tmp_path / "py", train)
        assert ours[0].shape == theirs[0].shape == ((35 if train else 7), 3, 32, 32)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    images, labels = read_cifar10_binary(tmp_path / "bin" / "cifar-10-batches-bin" / "test_batch.bin.gz")
    assert np.array_equal(images, expected["test_batch"][0]) and np.array_equal(labels, expected["test_batch"][1])


def test_binary_reader_refuses_a_torn_file(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(b"\0" * 3074)
    with pytest.raises(ValueError, match="whole number"):
        read_cifar10_binary(tmp_path / "data_batch_1.bin")


def test_real_cifar10_test_split(cifar_test):
    images, labels = cifar_test
    assert images.shape == (10000, 32, 32, 3) and list(labels[:10]) == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.bincount(labels).tolist() == [1000] * 10


def test_validation_split_is_disjoint_and_seeded(mnist_test):
    from catalog import DATA_DIR
    train, val = train_val_datasets("mnist", DATA_DIR, val_size=5000, seed=0)
    assert len(train) == 55000 and len(val) == 5000
    again = train_val_datasets("mnist", DATA_DIR, val_size=5000, seed=0)[1]
    assert torch.equal(val.images, again.images)


def _centre_of_mass(digit: np.ndarray):
    rows, cols = np.mgrid[0:28, 0:28]
    return (digit * rows).sum() / digit.sum(), (digit * cols).sum() / digit.sum()


def test_served_preprocessing_is_the_handlers_own(mnist_test):
    """Training on `served` images means training on what the handler makes of a PNG upload."""
    import io
    from PIL import Image
    from base_classifier import decode_image
    from digit_handler import mnist_style
    from training.data import as_served
    images = torch.from_numpy(mnist_test[0][:50, None])
    for image, seen in zip(images, as_served("mnist", images)):
        buffer = io.BytesIO()
        Image.fromarray(image[0].numpy()).save(buffer, "PNG")
        assert np.array_equal(seen[0].numpy(), mnist_style(decode_image(buffer.getvalue())))


def test_drawn_digit_distorts_then_preprocesses_like_the_handler(mnist_test):
    from training.data import DrawnDigit
    torch.manual_seed(0)
    drawn, digit = DrawnDigit(), torch.from_numpy(mnist_test[0][:1])
    samples = [drawn(digit) for _ in range(20)]
    for s in samples:
        assert s.shape == (1, 28, 28) and s.dtype == torch.uint8 and s.max() >= 200
        cy, cx = _centre_of_mass(s[0].numpy().astype(float))
        assert abs(cy - 14) < 1 and abs(cx - 14) < 1  # centred as the handler centres every upload
        rows, cols = np.nonzero(s[0].numpy() > 32)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 <= 22  # fitted into MNIST's 20x20 box
    ink = [int((s > 128).sum()) for s in samples]
    assert max(ink) > 1.3 * min(ink)  # pen widths differ between samples
    assert len({s.numpy().tobytes() for s in samples}) == len(samples)  # each one distorted differently
