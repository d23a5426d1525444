"""Digits drawn with strokes, as a person draws them on a canvas: for tests that need no data set."""
import io
import math

import numpy as np
from PIL import Image, ImageDraw


def _arc(cx, cy, rx, ry, start, end, n=12):
    """Points of an ellipse from angle `start` to `end` (degrees; 0 = right, 90 = down)."""
    return [(cx + rx * math.cos(math.radians(start + (end - start) * i / n)),
             cy + ry * math.sin(math.radians(start + (end - start) * i / n))) for i in range(n + 1)]


# Strokes of each digit in a unit box (x, y in [0, 1]); one polyline per stroke.
STROKES = {
    0: [[(0.5, 0.05), (0.25, 0.15), (0.15, 0.5), (0.25, 0.85), (0.5, 0.95), (0.75, 0.85), (0.85, 0.5),
         (0.75, 0.15), (0.5, 0.05)]],
    1: [[(0.45, 0.2), (0.55, 0.05), (0.55, 0.95)]],
    4: [[(0.6, 0.05), (0.15, 0.65), (0.85, 0.65)], [(0.65, 0.35), (0.65, 0.95)]],
    7: [[(0.15, 0.08), (0.85, 0.08), (0.4, 0.95)]],
    2: [_arc(0.5, 0.3, 0.3, 0.22, 200, 380) + [(0.15, 0.95), (0.88, 0.95)]],
    3: [_arc(0.5, 0.27, 0.3, 0.22, 200, 450) + _arc(0.5, 0.72, 0.33, 0.24, 270, 520)],
    5: [[(0.8, 0.05), (0.25, 0.05), (0.2, 0.45)] + _arc(0.5, 0.67, 0.32, 0.28, 230, 500)],
    6: [[(0.7, 0.05), (0.4, 0.3)] + _arc(0.5, 0.68, 0.3, 0.27, 200, 560)],
    8: [_arc(0.5, 0.27, 0.26, 0.22, 90, 450) + _arc(0.5, 0.72, 0.32, 0.24, -90, 270)],
    9: [_arc(0.5, 0.3, 0.3, 0.25, 0, 360) + [(0.8, 0.3), (0.7, 0.95)]],
}


def draw_digit(digit: int, size=(280, 280), box=(40, 30, 200, 200), width=18, ink=(255, 255, 255, 255),
               background=(0, 0, 0, 0), mode="RGBA") -> Image.Image:
    """`digit` drawn with `width`-px strokes inside `box` (left, top, box width, box height)."""
    image = Image.new(mode, size, background if mode == "RGBA" else background[: len(mode)])
    pen = ImageDraw.Draw(image)
    left, top, w, h = box
    for stroke in STROKES[digit]:
        points = [(left + x * w, top + y * h) for x, y in stroke]
        pen.line(points, fill=ink if mode == "RGBA" else ink[: len(mode)], width=width, joint="curve")
        r = width / 2
        for x, y in points:  # round caps, like a canvas brush
            pen.ellipse((x - r, y - r, x + r, y + r), fill=ink if mode == "RGBA" else ink[: len(mode)])
    return image


def mouse_drawing(digit: int, rng: np.random.Generator, width=12, box=(40, 30, 200, 200), size=(280, 280),
                  slant=0.0, tremor=0.015) -> Image.Image:
    """`digit` as a hand with a mouse draws it on a transparent canvas: a pointer event every ~4 px
    along each stroke, a hand tremor (a random walk of `tremor` box units per event that ends where
    the stroke ends), slanted by `slant` (x moves by slant * (0.5 - y)), a round `width`-px brush."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    pen = ImageDraw.Draw(image)
    left, top, w, h = box
    for stroke in STROKES[digit]:
        points = np.asarray(stroke, float)
        along = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(points, axis=0) * (w, h), axis=1))])
        events = np.arange(0, along[-1] + 1e-9, 4.0)
        path = np.stack([np.interp(events, along, points[:, 0]), np.interp(events, along, points[:, 1])], 1)
        wobble = np.cumsum(rng.normal(0, tremor, path.shape), 0)
        path += wobble - np.linspace(0, 1, len(path))[:, None] * wobble[-1]
        path[:, 0] += slant * (0.5 - path[:, 1])
        xy = [(left + x * w, top + y * h) for x, y in path]
        pen.line(xy, fill=(255, 255, 255, 255), width=width, joint="curve")
        for x, y in (xy[0], xy[-1]):  # round caps
            pen.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=(255, 255, 255, 255))
    return image


def png_bytes(image: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()
