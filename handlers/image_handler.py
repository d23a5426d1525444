"""Image handler for CIFAR-10: any RGB, RGBA or greyscale photo -> 32x32 RGB -> ResNet-18.

The short side is resized to 32 px (bicubic, antialiased), then the centre 32x32 is cropped, so the
object keeps its proportions (a squashed photo would not look like CIFAR-10). Transparent pixels
are composited onto white; greyscale is replicated into three channels.
"""
import numpy as np
from PIL import Image

from base_classifier import ImageClassifier

SIZE = 32  # CIFAR-10 images are 32x32


def cifar_style(image: Image.Image) -> np.ndarray:
    """PIL image -> uint8 32x32x3."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    w, h = image.size
    scale = SIZE / min(w, h)
    w, h = max(SIZE, round(w * scale)), max(SIZE, round(h * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (w - SIZE) // 2, (h - SIZE) // 2
    return np.asarray(image.crop((left, top, left + SIZE, top + SIZE)))


class ImageHandler(ImageClassifier):
    def preprocess_image(self, image):
        return cifar_style(image)
