"""Shared TorchServe handler for the image classifiers: initialize -> preprocess -> inference -> postprocess.

Shipped inside every .mar beside digit_handler.py / image_handler.py; depends on torch, numpy and
Pillow only (onnxruntime when the archive holds an ONNX model). Per-model settings (normalisation,
class names, threads, top-k) come from the archive's model-config.yaml under `handler:`.

A request carries one image in any of these forms:
  * the raw body (PNG, JPEG or WebP bytes),
  * a multipart/form-data field (any field name),
  * JSON {"data": "<base64 or data: URL>"}, as canvas demos post it.
Options, as HTTP headers (X-Top-K, X-Return-Input, X-Client: TorchServe 0.12 drops query
parameters of predictions), JSON, multipart or gRPC input fields (top_k, return_input, client):
top_k is 1..classes (default from the config); return_input=true makes the response carry the
preprocessed image as a base64 PNG; client names the caller in the prediction log (default "api").
A bad request gets HTTP 400 with a message; the other requests of its batch are served normally.
"""
import base64
import binascii
import dataclasses
import gc
import io
import json
import logging
import os
import time

import numpy as np
from PIL import Image

from prediction_log import PredictionLog, Settings, record_row, url_from_env
from runtimes import load_runtime

MAX_PIXELS = 4096 * 4096  # larger images are refused before decoding (decompression bombs)
ACCEPTED_FORMATS = {"PNG", "JPEG", "WEBP"}
OPTION_KEYS = {"top_k", "return_input", "client"}
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
        except RecursionError:
            raise BadInput("the JSON body is nested too deeply") from None
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


@dataclasses.dataclass
class Item:
    """One request that passed preprocessing."""
    pixels: np.ndarray  # what the model sees, uint8
    options: dict
    image: bytes  # the uploaded image file


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
        url = url_from_env()
        # Settings from the environment here: a bad PREDICTION_LOG_* value fails the worker's start, with its name.
        self.log = PredictionLog(url, Settings.from_env()) if url else None
        # Everything loaded so far (torch, the model, SQLAlchemy) lives as long as the worker: moved
        # out of the garbage collector's sight, a collection no longer walks it. Each batch allocates
        # (the prediction log's rows most), and those walks cost 10% of LeNet-5's throughput.
        gc.freeze()
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
        return {"top_k": top_k, "return_input": options.get("return_input", "false").lower() in ("1", "true", "yes"),
                "client": options.get("client") or "api"}  # who asked, for the prediction log

    def preprocess(self, data, context):
        """-> one Item or BadInput per request."""
        items = []
        for i, row in enumerate(data):
            try:
                payload, options = _payload_and_options(row, context.get_all_request_header(i))
                image = image_bytes(payload)
                items.append(Item(self.preprocess_image(decode_image(image)), self._options(options), image))
            except BadInput as e:
                items.append(e)
            except Exception as e:  # noqa: BLE001 - the error boundary: one request never fails its batch
                logging.getLogger(__name__).warning("request %s: unreadable payload (%s)", context.request_ids[i],
                                                    e.__class__.__name__)
                items.append(BadInput("this request could not be read as an image (PNG, JPEG or WebP as the raw "
                                      'body, a multipart field or JSON {"data": "<base64>"})'))
        return items

    def inference(self, items):
        good = [item.pixels for item in items if isinstance(item, Item)]
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
            p = probs[row]
            row += 1
            order = np.argsort(-p)[: item.options["top_k"]]
            response = {
                "model": self.model_name, "version": self.version, "format": self.format,
                "request_id": context.request_ids[i],
                "index": int(order[0]), "label": self.classes[order[0]], "confidence": float(p[order[0]]),
                "top_k": [{"index": int(j), "label": self.classes[j], "probability": float(p[j])} for j in order],
            }
            if item.options["return_input"]:
                response["input_image"] = base64.b64encode(to_png(item.pixels)).decode("ascii")
            responses.append(response)
        return responses

    def record(self, items, responses, latency_ms: float):
        """Write the batch's successful predictions to the prediction log, in one transaction, before
        they are answered: a worker crash loses only the batch in flight, whose requests fail too.
        While the database is unavailable the log spools the rows to local disk instead."""
        rows = [record_row(r["request_id"], self.model_name, self.version, self.format, item.options["client"],
                           item.image, item.pixels, r, latency_ms)
                for item, r in zip(items, responses) if isinstance(item, Item)]
        try:
            self.log.record(rows)
        except Exception:  # a bug, or a spool on a full disk, must not fail the predictions themselves
            logging.getLogger(__name__).exception("prediction log: %d rows not recorded", len(rows))

    def handle(self, data, context):
        start = time.perf_counter()
        items = self.preprocess(data, context)
        responses = self.postprocess(items, self.inference(items), context)
        if self.log is not None:
            self.record(items, responses, (time.perf_counter() - start) * 1000)
        return responses
