"""The digit and image handlers' preprocessing, on drawings and on real test images."""
import io
import itertools
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from classifier import BadInput, decode_image
from digit_handler import _erode, mnist_style
from image_handler import cifar_style
from drawing import draw_digit, mouse_drawing, png_bytes
from conftest import shipped
from model_store import archive

CANVASES = {  # name -> draw_digit keyword arguments: the ways people draw
    "canvas": {},
    "offset": dict(box=(190, 170, 80, 100), width=10),
    "tiny": dict(box=(120, 120, 16, 22), width=3),
    "huge": dict(size=(2000, 1600), box=(300, 100, 1200, 1400), width=120),
    "thick": dict(width=48),
    "thin": dict(size=(600, 600), box=(100, 80, 380, 440), width=2),
    "black_on_white": dict(mode="RGB", ink=(0, 0, 0, 255), background=(255, 255, 255, 255)),
    "grey_photo": dict(mode="L", ink=(40, 40, 40, 255), background=(200, 200, 200, 255)),
}


def served(model: str, threads: int = 1):
    """The model's Classifier over its fp32 TorchScript export, as version 1.0 serves it."""
    shipped(model)
    return archive.classifier(model, "torchscript", threads=threads)


def predicted(classifier, seen: list[np.ndarray]) -> np.ndarray:
    """What the model answers for images its handler already preprocessed."""
    return classifier.logits(classifier.batch(seen)).argmax(1)


@pytest.fixture(scope="module")
def lenet():
    return served("mnist_lenet5")


def classify(classifier, digit28: np.ndarray) -> int:
    return int(predicted(classifier, [digit28])[0])


def center_of_mass(digit28):
    ys, xs = np.mgrid[0:28, 0:28]
    m = digit28.astype(float)
    return (m * ys).sum() / m.sum(), (m * xs).sum() / m.sum()


@pytest.mark.parametrize("name", CANVASES)
@pytest.mark.parametrize("digit", [0, 1, 4, 7])
def test_drawn_digit_becomes_mnist_like_and_is_recognised(lenet, name, digit):
    drawing = draw_digit(digit, **CANVASES[name])
    seen = mnist_style(decode_image(png_bytes(drawing)))
    assert seen.shape == (28, 28) and seen.dtype == np.uint8
    cy, cx = center_of_mass(seen)
    assert abs(cy - 14) < 0.75 and abs(cx - 14) < 0.75, (cy, cx)
    rows, cols = np.nonzero(seen > 32)
    assert 16 <= max(np.ptp(rows), np.ptp(cols)) + 1 <= 22  # fitted into the 20x20 box (plus antialiasing)
    assert seen.max() >= 200  # strokes are solid ink, also when drawn 2 px thin on a large canvas
    assert classify(lenet, seen) == digit


def test_jpeg_photo_of_a_digit(lenet):
    photo = draw_digit(7, mode="RGB", ink=(30, 30, 60, 255), background=(235, 230, 220, 255))
    seen = mnist_style(decode_image(png_bytes(photo, "JPEG")))
    assert classify(lenet, seen) == 7


def test_mnist_test_digits_survive_the_canvas_round_trip(lenet, mnist_test):
    """Real MNIST digits, enlarged 10x and inverted to black-on-white like a scanned page, still classify."""
    images, labels = mnist_test
    n, correct = 300, 0
    for image, label in zip(images[:n], labels[:n]):
        page = Image.fromarray(255 - image).resize((280, 280), Image.Resampling.BICUBIC)
        correct += classify(lenet, mnist_style(decode_image(png_bytes(page)))) == label
    assert correct / n >= 0.97


def mouse_drawn_digits():
    """Every digit drawn with a mouse-like hand: brush widths 3-32 px at heights 60-240 px (a brush
    at most a quarter of the digit's height: wider ones make blobs nobody can read), upright and slanted
    both ways, two hands each. -> (what the handler made of each, labels, [(width, height, slant)])."""
    rng = np.random.default_rng(0)
    seen, labels, kinds = [], [], []
    for digit, width, height, slant, _ in itertools.product(range(10), (3, 8, 16, 32), (60, 140, 240),
                                                            (-0.2, 0.0, 0.25), range(2)):
        if width <= height / 4:
            drawing = mouse_drawing(digit, rng, width=width, box=(20, 20, round(height * 0.75), height), slant=slant)
            seen.append(mnist_style(decode_image(png_bytes(drawing))))
            labels.append(digit)
            kinds.append((width, height, slant))
    return np.stack(seen), np.array(labels), kinds


@pytest.mark.parametrize("name", ["mnist_lenet5", "mnist_alexnet"])
def test_mouse_drawn_digits_at_every_brush_width_and_size(name):
    """Measured with the weights trained on drawing-like distortions (training.data.DrawnDigit):
    see the model cards; the bar is a little below what they score."""
    seen, labels, kinds = mouse_drawn_digits()
    answers = predicted(served(name), list(seen))
    wrong = [(int(t), int(p), k) for t, p, k in zip(labels, answers, kinds) if t != p]
    assert (answers == labels).mean() >= 0.97, f"{len(wrong)} of {len(labels)} wrong: {wrong[:20]}"


@pytest.mark.parametrize("seed", range(5))
def test_numpy_erosion_equals_pils_min_filter(seed):
    """The stroke-width measurement's erosion, in numpy for speed, does exactly what PIL's
    MinFilter(3) did on the binary canvas (blank margins, as the handler's canvas has)."""
    rng = np.random.default_rng(seed)
    ink = np.zeros((60, 50), bool)
    ink[3:-3, 3:-3] = rng.random((54, 44)) < 0.7
    pil = np.asarray(Image.fromarray(ink.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(3))) > 0
    assert (_erode(ink) == pil).all() and _erode(ink).sum() < ink.sum()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("size", [(32, 32), (500, 375), (64, 200)])
def test_cifar_style_any_mode_and_size(mode, size):
    image = Image.new(mode, size, 128 if mode == "L" else (10, 200, 30, 255)[: len(mode)])
    seen = cifar_style(decode_image(png_bytes(image)))
    assert seen.shape == (32, 32, 3) and seen.dtype == np.uint8


def test_cifar_style_keeps_a_32x32_image_unchanged(cifar_test):
    images, _ = cifar_test
    assert np.array_equal(cifar_style(decode_image(png_bytes(Image.fromarray(images[0])))), images[0])


def test_blank_canvas_is_refused():
    with pytest.raises(BadInput, match="blank"):
        mnist_style(decode_image(png_bytes(Image.new("RGBA", (280, 280), (0, 0, 0, 0)))))


@pytest.mark.parametrize("payload, message", [
    (b"", "empty"),
    (b"hello, this is not an image", "not an image"),
    (png_bytes(draw_digit(1))[:300], "truncated"),
    (b"GIF89a" + b"\0" * 20, "not an image|unsupported"),
])
def test_bad_payloads_are_refused_with_a_message(payload, message):
    with pytest.raises(BadInput, match=message):
        decode_image(payload)


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # ~50 kB on disk, 400 Mpx decoded
    with pytest.raises(BadInput, match="too large|pixels"):
        decode_image(buf.getvalue())


@pytest.mark.slow  # ResNet-18 on 6 x 500 real test images
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("size", [(32, 32), (96, 96), (160, 120)])
def test_real_cifar10_images_at_any_size_are_recognised(cifar_test, fmt, size):
    """Real CIFAR-10 test images, enlarged (and, at 160x120, stretched) and saved as PNG or JPEG as a
    user would upload them, score within a few points of the same images as 32x32 tensors. Measured on
    1,000 images with the 92.0% weights: PNG at 32x32 costs 0.0 points, at 96x96 1.9; JPEG at quality
    75 costs 8.1 points at 32x32 (its artefacts are as large as the objects' details) and 2.2 at
    96x96. The stretched ones lose their sides to the centre crop, which costs more."""
    images, labels = cifar_test
    resnet = served("cifar10_resnet18", threads=os.cpu_count())
    n = 500

    def accuracy(batch_uint8):
        return (predicted(resnet, batch_uint8) == labels[:n]).mean()

    uploaded = [cifar_style(decode_image(png_bytes(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC), fmt)))
                for img in images[:n]]
    allowed = 0.11 if size[0] == size[1] else 0.15  # JPEG at quality 75 costs ~8 points on 32x32 photos
    assert accuracy(uploaded) >= accuracy(list(images[:n])) - allowed
