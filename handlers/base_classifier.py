"""Shared TorchServe handler for the image classifiers: initialize -> preprocess -> inference -> postprocess.

Shipped inside every .mar beside digit_handler.py / image_handler.py; depends on torch, numpy and
Pillow only (onnxruntime when the archive holds an ONNX model). Per-model settings (normalisation,
class names, threads, top-k) come from the archive's model-config.yaml under `handler:`.

A request carries one image in any of these forms:
  * the raw body (PNG, JPEG or WebP bytes),
  * a multipart/form-data field (any field name),
  * JSON {"data": "<base64 or data: URL>"}, as canvas demos post it.
Options, as HTTP headers (X-Top-K, X-Return-Input: TorchServe 0.12 drops query parameters of
predictions), JSON fields or multipart fields (top_k, return_input): top_k is 1..classes (default
from the config); return_input=true makes the response carry the preprocessed image as a base64 PNG.
A bad request gets HTTP 400 with a message; the other requests of its batch are served normally.
"""
import base64
import binascii
import io
import json
import logging
import os

import numpy as np
from PIL import Image

from runtimes import load_runtime

MAX_PIXELS = 4096 * 4096  # larger images are refused before decoding (decompression bombs)
ACCEPTED_FORMATS = {"PNG", "JPEG", "WEBP"}
OPTION_KEYS = {"top_k", "return_input"}
OPTION_HEADERS = {f"x-{k.replace('_', '-')}": k for k in OPTION_KEYS}  # X-Top-K -> top_k
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class BadInput(ValueError):
    """A client error: becomes HTTP 400 with this message."""


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _payload_and_options(row: dict, headers: dict):
    """Split one TorchServe request into (image payload, options)."""
    options = {OPTION_HEADERS[k.lower()]: v for k, v in headers.items() if k.lower() in OPTION_HEADERS}
    options.update({k: _text(row[k]) for k in OPTION_KEYS if k in row})
    payload = row.get("data", row.get("body"))
    if payload is None:  # multipart: the first non-option field
        payload = next((v for k, v in row.items() if k not in OPTION_KEYS), None)
    if isinstance(payload, (bytes, bytearray)) and payload[:1] == b"{":
        try:
            payload = json.loads(payload)
        except ValueError as e:
            raise BadInput(f"the body starts like JSON but is not valid JSON: {e}") from None
    if isinstance(payload, dict):
        options.update({k: str(payload[k]) for k in OPTION_KEYS if k in payload})
        if "data" not in payload:
            raise BadInput('JSON body needs a "data" field holding the image as base64 or a data: URL')
        payload = payload["data"]
    if isinstance(payload, str):
        payload = payload.encode("ascii", "replace")
    if not isinstance(payload, (bytes, bytearray)) or not payload:
        raise BadInput("empty request: send a PNG, JPEG or WebP image (raw body, multipart field, "
                       'or JSON {"data": "<base64>"})')
    return bytes(payload), options


def _maybe_base64(payload: bytes) -> bytes:
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


def decode_image(payload: bytes) -> Image.Image:
    """Bytes -> a fully loaded PIL image, refusing non-images, truncated files and huge images quickly."""
    data = _maybe_base64(payload)
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


def to_png_base64(pixels: np.ndarray) -> str:
    """uint8 HxW or HxWx3 -> base64 PNG (what the model saw)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class ImageClassifier:
    """Subclasses define `preprocess_image(PIL image) -> uint8 array (what the model saw)`."""

    def __init__(self):
        self.initialized = False

    def initialize(self, context):
        # The worker logs a line per request at INFO; on 2 cores that costs throughput. Warnings stay.
        logging.getLogger().setLevel(logging.WARNING)
        manifest = context.manifest["model"]
        config = (context.model_yaml_config or {}).get("handler", {})
        self.model_name = context.model_name
        self.version = manifest.get("modelVersion", "")
        self.classes = list(config["classes"])
        self.mean = np.asarray(config["mean"], np.float32)
        self.std = np.asarray(config["std"], np.float32)
        self.top_k = int(config.get("top_k", 3))
        path = os.path.join(context.system_properties["model_dir"], manifest["serializedFile"])
        self.format = config["format"]
        self.runtime = load_runtime(self.format, path, int(config.get("threads", 1)))
        self.initialized = True

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        raise NotImplementedError

    def to_tensor(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 HxW or HxWxC -> normalised float32 CxHxW."""
        x = pixels.astype(np.float32) / 255.0
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def _options(self, options: dict) -> dict:
        try:
            top_k = int(options.get("top_k", self.top_k))
        except ValueError:
            raise BadInput(f"top_k must be an integer, got {options['top_k']!r}") from None
        if not 1 <= top_k <= len(self.classes):
            raise BadInput(f"top_k must be between 1 and {len(self.classes)}, got {top_k}")
        return {"top_k": top_k, "return_input": options.get("return_input", "false").lower() in ("1", "true", "yes")}

    def preprocess(self, data, context):
        """-> (list of (pixels, options) or BadInput per request)."""
        items = []
        for i, row in enumerate(data):
            try:
                payload, options = _payload_and_options(row, context.get_all_request_header(i))
                items.append((self.preprocess_image(decode_image(payload)), self._options(options)))
            except BadInput as e:
                items.append(e)
        return items

    def inference(self, items):
        good = [item[0] for item in items if not isinstance(item, BadInput)]
        if not good:
            return None
        return self.runtime(np.stack([self.to_tensor(p) for p in good]))

    def postprocess(self, items, logits, context):
        responses, row = [], 0
        if logits is not None:
            logits = logits - logits.max(1, keepdims=True)
            probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        for i, item in enumerate(items):
            if isinstance(item, BadInput):
                context.set_response_status(400, str(item), idx=i)
                responses.append({"code": 400, "type": "BadInput", "message": str(item)})
                continue
            (pixels, options), p = item, probs[row]
            row += 1
            order = np.argsort(-p)[: options["top_k"]]
            response = {
                "model": self.model_name, "version": self.version, "format": self.format,
                "index": int(order[0]), "label": self.classes[order[0]], "confidence": float(p[order[0]]),
                "top_k": [{"index": int(j), "label": self.classes[j], "probability": float(p[j])} for j in order],
            }
            if options["return_input"]:
                response["input_image"] = to_png_base64(pixels)
            responses.append(response)
        return responses

    def handle(self, data, context):
        items = self.preprocess(data, context)
        return self.postprocess(items, self.inference(items), context)
