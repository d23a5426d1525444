"""Digits drawn with strokes, as a person draws them on a canvas: for tests that need no data set."""
import io

from PIL import Image, ImageDraw

# Strokes of each digit in a unit box (x, y in [0, 1]); one polyline per stroke.
STROKES = {
    0: [[(0.5, 0.05), (0.25, 0.15), (0.15, 0.5), (0.25, 0.85), (0.5, 0.95), (0.75, 0.85), (0.85, 0.5),
         (0.75, 0.15), (0.5, 0.05)]],
    1: [[(0.45, 0.2), (0.55, 0.05), (0.55, 0.95)]],
    4: [[(0.6, 0.05), (0.15, 0.65), (0.85, 0.65)], [(0.65, 0.35), (0.65, 0.95)]],
    7: [[(0.15, 0.08), (0.85, 0.08), (0.4, 0.95)]],
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


def png_bytes(image: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()
