"""The image classifier itself, outside any server: image bytes -> decoded image -> the model's
preprocessing -> normalised batch -> runtime -> softmax(logits / temperature) -> response dict.

Shipped inside every .mar: the TorchServe handler (base_classifier.py) wraps a Classifier, and the
Flask baseline, the evaluation and the tests use the same one in-process (model_store/archive.py
`classifier(...)` builds it as an archive serves it), so every path normalises the pixels and
answers in one way. Its settings are the `handler:` section of the archive's model-config.yaml
(classes, mean, std, temperature, top_k; format, threads and tta choose the runtime).

    {"index": 7, "label": "7", "confidence": 0.98, "top_k": [{"index": 7, "label": "7", "probability": 0.98}, ...]}
"""
import base64
import binascii
import io

import numpy as np
from PIL import Image

from runtimes import load_runtime

MAX_PIXELS = 4096 * 4096  # larger images are refused before decoding (decompression bombs)
ACCEPTED_FORMATS = {"PNG", "JPEG", "WEBP"}
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class BadInput(ValueError):
    """A client error: becomes HTTP 400 with this message."""


def image_bytes(payload: bytes) -> bytes:
    """Raw image bytes pass through; a data: URL or bare base64 text is decoded."""
    if payload.startswith(b"data:"):
        header, _, payload = payload.partition(b",")
        if b";base64" not in header:
            raise BadInput("data: URL must be base64-encoded (data:image/png;base64,...)")
    elif payload[:4] in (b"\x89PNG", b"RIFF") or payload[:2] == b"\xff\xd8":
        return payload
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("not an image: expected PNG, JPEG or WebP bytes, or base64 text of one") from None


def decode_image(data: bytes) -> Image.Image:
    """Image file bytes -> a fully loaded PIL image, refusing non-images, truncated files and huge
    images (from the header, before decoding) quickly."""
    if not data:
        raise BadInput("empty image")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadInput(f"image too large: {e}") from None
    except Exception:
        raise BadInput("not an image: expected PNG, JPEG or WebP") from None
    if image.format not in ACCEPTED_FORMATS:
        raise BadInput(f"unsupported image format {image.format}: send PNG, JPEG or WebP")
    width, height = image.size
    if width * height > MAX_PIXELS or width == 0 or height == 0:
        raise BadInput(f"image is {width}x{height} pixels: at most {MAX_PIXELS:,} pixels are accepted")
    try:
        image.load()
    except Exception as e:  # truncated or corrupt data
        raise BadInput(f"corrupt or truncated {image.format} image: {e}") from None
    return image


def to_png(pixels: np.ndarray) -> bytes:
    """uint8 HxW or HxWx3 -> PNG bytes (what the model saw)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class Classifier:
    """One model's whole prediction, in-process. `preprocess_image(PIL image) -> uint8 array` is the
    model's own preprocessing (digit_handler.mnist_style, image_handler.cifar_style); `runtime` maps
    a normalised float32 NCHW batch to logits (runtimes.py, or any callable: training/evaluate.py
    passes the eager model)."""

    def __init__(self, config: dict, preprocess_image, runtime=None):
        self.classes = list(config["classes"])
        self.mean = np.asarray(config["mean"], np.float32)
        self.std = np.asarray(config["std"], np.float32)
        self.top_k = int(config.get("top_k", 3))
        self.temperature = float(config.get("temperature", 1.0))  # fitted per model on held-out data
        if not self.temperature > 0:  # also NaN: fails the worker's start, with the value
            raise ValueError(f"handler temperature must be > 0, got {self.temperature}")
        self.preprocess_image, self.runtime = preprocess_image, runtime

    @classmethod
    def load(cls, config: dict, path, preprocess_image) -> "Classifier":
        """The classifier of an archive: config's runtime (`format`, `threads`; `tta: flip` runs each
        image mirrored too, runtimes.py) over the serialized model at `path`."""
        classifier = cls(config, preprocess_image)  # the settings checked before a model loads
        classifier.runtime = load_runtime(config["format"], str(path), int(config.get("threads", 1)), config.get("tta"))
        return classifier

    def pixels(self, image: bytes) -> np.ndarray:
        """Image file bytes -> what the model sees: uint8 HxW (digits) or HxWxC (photos)."""
        return self.preprocess_image(decode_image(image))

    def batch(self, pixels: list[np.ndarray]) -> np.ndarray:
        """uint8 HxW or HxWxC images -> float32 NCHW, normalised to the bit as training normalises
        (training/data.py normalize: torchvision's ToDtype(scale=True), then Normalize)."""
        # Times float32(1/255), not / 255: torchvision's scaling, whose result differs in the last bit
        # for 42% of the pixel values.
        x = np.stack(pixels).astype(np.float32) * np.float32(1 / 255)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        # contiguous: the runtimes hand the buffer to C++ kernels that expect NCHW in memory
        return np.ascontiguousarray((x - self.mean[:, None, None]) / self.std[:, None, None])

    def to_tensor(self, pixels: np.ndarray) -> np.ndarray:
        """One uint8 image -> normalised float32 CxHxW."""
        return self.batch([pixels])[0]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.runtime(batch)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """softmax(logits / temperature), per row."""
        z = logits / self.temperature
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    def prediction(self, p: np.ndarray, top_k: int) -> dict:
        """One image's probabilities -> the response: the top class and the `top_k` most probable."""
        order = np.argsort(-p)[:top_k]
        return {"index": int(order[0]), "label": self.classes[order[0]], "confidence": float(p[order[0]]),
                "top_k": [{"index": int(j), "label": self.classes[j], "probability": float(p[j])} for j in order]}

    def predict(self, image: bytes, top_k: int | None = None) -> dict:
        """Image file bytes -> the response dict. Raises BadInput for what is not a usable image."""
        p = self.probabilities(self.logits(self.batch([self.pixels(image)])))[0]
        return self.prediction(p, top_k or self.top_k)
