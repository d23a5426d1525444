"""Shared TorchServe handler for the image classifiers: initialize -> preprocess -> inference -> postprocess.

Shipped inside every .mar beside digit_handler.py / image_handler.py; depends on torch, numpy and
Pillow only (onnxruntime when the archive holds an ONNX model). This module is the server's side:
reading TorchServe's requests, options, the Open Inference Protocol, explanations, the prediction log
and the error boundary. What a prediction is (decoding, preprocessing, normalisation, runtime,
softmax, the response dict) is classifier.py's Classifier, built from the archive's
model-config.yaml `handler:` settings (normalisation, class names, threads, top-k, temperature,
test-time augmentation); the Flask baseline and the tests run the same Classifier in-process.

A request carries one image in any of these forms:
  * the raw body (PNG, JPEG or WebP bytes),
  * a multipart/form-data field (any field name),
  * JSON {"data": "<base64 or data: URL>"}, as canvas demos post it.
Options, as HTTP headers (X-Top-K, X-Return-Input, X-Client: TorchServe 0.12 drops query
parameters of predictions), JSON, multipart or gRPC input fields (top_k, return_input, client):
top_k is 1..classes (default from the config); return_input=true makes the response carry the
preprocessed image as a base64 PNG; client names the caller in the prediction log (default "api").
A bad request gets HTTP 400 with a message; the other requests of its batch are served normally.

The same handler answers two more kinds of request, told apart per request (TorchServe batches
them together with predictions):
  * Open Inference Protocol (KServe v2) inference, POST /v2/models/{model}/infer: a JSON body with
    "inputs" (see oip_request); answered with OIP outputs, errors as OIP's {"error": "..."}.
  * Explanations, POST /explanations/{model}[/{version}]: TorchServe's frontend sets the request
    header `explain: True`; the image comes in any of the forms above and is answered with an
    attribution map (explain.py) and the prediction it explains.
"""
import base64
import dataclasses
import gc
import json
import logging
import os
import math
import time

import numpy as np
from PIL import Image

from classifier import BadInput, Classifier, decode_image, image_bytes, to_png
from explain import METHOD as EXPLAIN_METHOD, occlusion
from prediction_log import PredictionLog, Settings, record_row, url_from_env

OPTION_KEYS = {"top_k", "return_input", "client"}
OPTION_HEADERS = {f"x-{k.replace('_', '-')}": k for k in OPTION_KEYS}  # X-Top-K -> top_k
OIP_INPUT = "image"
OIP_OUTPUTS = ("probabilities", "label")
MAX_OIP_IMAGES = 64  # images per OIP request: bounds one request's share of a batch
RAW_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}  # channels of a UINT8 [N, H, W, C] input -> PIL mode
BINARY_OIP_HEADER = "inference-header-content-length"  # an OIP body with binary tensor data after its JSON


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _payload_and_options(row: dict, headers: dict):
    """Split one TorchServe request into (image payload, options); the payload is the parsed JSON
    body (a dict) for an Open Inference Protocol request."""
    options = {OPTION_HEADERS[k.lower()]: v for k, v in headers.items() if k.lower() in OPTION_HEADERS}
    options.update({k: _text(row[k]) for k in OPTION_KEYS if k in row})
    payload = row.get("data", row.get("body"))
    if payload is None:  # multipart: the first non-option field
        payload = next((v for k, v in row.items() if k not in OPTION_KEYS), None)
    if any(k.lower() == BINARY_OIP_HEADER for k in headers):
        raise BadInput("binary tensor data is not supported: send the tensors inside the JSON body "
                       "(tritonclient: binary_data=False)")
    if isinstance(payload, (bytes, bytearray)) and payload[:1] == b"{":
        try:
            payload = json.loads(payload)
        except ValueError as e:
            raise BadInput(f"the body starts like JSON but is not valid JSON: {e}") from None
        except RecursionError:
            raise BadInput("the JSON body is nested too deeply") from None
    if isinstance(payload, dict) and "inputs" in payload and "data" not in payload:
        return payload, options
    if isinstance(payload, dict):
        options.update({k: str(payload[k]) for k in OPTION_KEYS if k in payload})
        if "data" not in payload:
            raise BadInput('JSON body needs a "data" field holding the image as base64 or a data: URL (or "inputs", '
                           'as an Open Inference Protocol request)')
        payload = payload["data"]
    if isinstance(payload, str):
        payload = payload.encode("ascii", "replace")
    if not isinstance(payload, (bytes, bytearray)) or not payload:
        raise BadInput("empty request: send a PNG, JPEG or WebP image (raw body, multipart field, "
                       'or JSON {"data": "<base64>"})')
    return bytes(payload), options


def _brief(value) -> str:
    """A client's value, quoted in an error message at a readable length."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def oip_request(body: dict) -> tuple:
    """An Open Inference Protocol inference request -> (its "id" or None, the outputs asked for,
    its "image" tensor). The protocol's other fields ("parameters") change nothing here."""
    inputs = body["inputs"]
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise BadInput('"inputs" must be a list of tensors ({"name", "datatype", "shape", "data"})')
    names = [t.get("name") for t in inputs]
    if OIP_INPUT not in names:
        raise BadInput(f'no input tensor named "{OIP_INPUT}" (inputs: {_brief(names)}): send the images as '
                       f'input "{OIP_INPUT}"')
    if len(inputs) > 1:
        raise BadInput(f'this model takes one input tensor, "{OIP_INPUT}"; got {_brief(names)}')
    outputs = body.get("outputs") or [{"name": name} for name in OIP_OUTPUTS]  # none asked: all
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise BadInput('"outputs" must be a list of {"name": ...}')
    unknown = [o.get("name") for o in outputs if o.get("name") not in OIP_OUTPUTS]
    if unknown:
        raise BadInput(f'unknown output {_brief(unknown[0])}: this model answers "probabilities" and "label"')
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadInput(f'"id" must be a string, got {_brief(request_id)}')
    return request_id, list(dict.fromkeys(o["name"] for o in outputs)), inputs[0]


def tensor_shape(tensor: dict) -> list:
    """The tensor's shape, checked: a list of non-negative integers."""
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadInput(f'input "{OIP_INPUT}": "shape" must be a list of non-negative integers, got {_brief(shape)}')
    return shape


def raw_pixels(data: list, shape: list) -> np.ndarray:
    """UINT8 tensor data (flat row-major, or nested) -> uint8 array of `shape`."""
    try:
        values = np.asarray(data)
    except (ValueError, TypeError):  # ragged nesting
        values = None
    if values is None or values.dtype.kind not in "iu":  # floats, strings, booleans, None, mixed
        raise BadInput(f'input "{OIP_INPUT}" of datatype UINT8: "data" must be a list of integers 0..255, '
                       'row-major')
    if values.size != math.prod(shape):
        raise BadInput(f'input "{OIP_INPUT}" has shape {shape}, {math.prod(shape):,} values, but "data" holds '
                       f'{values.size:,}')
    if values.min() < 0 or values.max() > 255:
        raise BadInput(f'input "{OIP_INPUT}" of datatype UINT8: values must be 0..255, got {values.min()}..'
                       f'{values.max()}')
    return values.reshape(shape).astype(np.uint8)


@dataclasses.dataclass
class Item:
    """One image that passed preprocessing."""
    pixels: np.ndarray  # what the model sees, uint8
    image: bytes  # the uploaded image file (raw OIP pixels: as PNG), for the prediction log
    request_id: str  # its prediction log row: the request's id, "<id>/<i>" for an OIP request's i-th image


@dataclasses.dataclass
class Request:
    """One request that passed preprocessing."""
    kind: str  # PREDICT, EXPLAIN or OIP
    items: list  # one Item, or up to MAX_OIP_IMAGES for OIP
    options: dict
    oip_id: str | None = None  # OIP: the request's "id"
    oip_outputs: tuple = OIP_OUTPUTS  # OIP: the outputs asked for, in their order
    predictions: list = dataclasses.field(default_factory=list)  # one per item, set by postprocess


@dataclasses.dataclass
class Rejected:
    """A request answered with HTTP 400 and `message`."""
    message: str
    oip: bool  # answered in OIP's error form, {"error": message}


PREDICT, EXPLAIN, OIP = "predict", "explain", "oip"
UNREADABLE = ('this request could not be read as an image (PNG, JPEG or WebP as the raw body, a multipart field '
              'or JSON {"data": "<base64>"})')
OIP_UNREADABLE = (f'this Open Inference Protocol request could not be read: input "{OIP_INPUT}" must be BYTES of '
                  'shape [N] (base64 PNG, JPEG or WebP files) or UINT8 of shape [N, H, W] or [N, H, W, C]')


class ImageClassifier:
    """Subclasses define `preprocess_image(PIL image) -> uint8 array (what the model saw)`; the
    prediction itself is `self.classifier`'s."""

    def __init__(self):
        self.initialized = False

    def initialize(self, context):
        # The worker logs a line per request at INFO; on 2 cores that costs throughput. Warnings stay.
        logging.getLogger().setLevel(logging.WARNING)
        manifest = context.manifest["model"]
        config = (context.model_yaml_config or {}).get("handler", {})
        self.model_name = context.model_name
        self.version = manifest.get("modelVersion", "")
        self.format = config["format"]
        path = os.path.join(context.system_properties["model_dir"], manifest["serializedFile"])
        self.classifier = Classifier.load(config, path, self.preprocess_image)
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

    def _options(self, options: dict) -> dict:
        classes = len(self.classifier.classes)
        try:
            top_k = int(options.get("top_k", self.classifier.top_k))
        except ValueError:
            raise BadInput(f"top_k must be an integer, got {options['top_k']!r}") from None
        if not 1 <= top_k <= classes:
            raise BadInput(f"top_k must be between 1 and {classes}, got {top_k}")
        return {"top_k": top_k, "return_input": options.get("return_input", "false").lower() in ("1", "true", "yes"),
                "client": options.get("client") or "api"}  # who asked, for the prediction log

    def preprocess(self, data, context):
        """-> one Request or Rejected per request."""
        requests = []
        for i, row in enumerate(data):
            headers = context.get_all_request_header(i)
            oip = any(k.lower() == BINARY_OIP_HEADER for k in headers)
            try:
                payload, options = _payload_and_options(row, headers)
                oip = isinstance(payload, dict)
                requests.append(self._request(payload, options, headers, context.request_ids[i]))
            except BadInput as e:
                requests.append(Rejected(str(e), oip))
            except Exception as e:  # noqa: BLE001 - the error boundary: one request never fails its batch
                logging.getLogger(__name__).warning("request %s: unreadable payload (%s)", context.request_ids[i],
                                                    e.__class__.__name__)
                requests.append(Rejected(OIP_UNREADABLE if oip else UNREADABLE, oip))
        return requests

    def _request(self, payload, options: dict, headers: dict, request_id: str) -> Request:
        # TorchServe's frontend sets `explain` on every request it routes to a handler: "True" on
        # /explanations (and /v2/models/{model}/explain), "False" on the others, after any header of
        # that name the client sent (the last value wins), so a client cannot turn it on elsewhere.
        explain = headers.get("explain") == "True"
        if isinstance(payload, dict):
            if explain:
                raise BadInput("explanations are not served over the Open Inference Protocol: POST the image to "
                               "/explanations/{model}")
            oip_id, outputs, tensor = oip_request(payload)
            return Request(OIP, self._oip_items(tensor, request_id), self._options(options), oip_id, tuple(outputs))
        image = image_bytes(payload)
        item = Item(self.classifier.pixels(image), image, request_id)
        return Request(EXPLAIN if explain else PREDICT, [item], self._options(options))

    def _oip_items(self, tensor: dict, request_id: str) -> list:
        """The OIP "image" tensor -> one Item per image: BYTES [N] of base64 image files, or UINT8
        [N, H, W] / [N, H, W, C] of raw pixels."""
        datatype, shape, data = tensor.get("datatype"), tensor_shape(tensor), tensor.get("data")
        if datatype == "BYTES" and len(shape) != 1:
            raise BadInput(f'input "{OIP_INPUT}" of datatype BYTES has shape [N] (N image files), got {shape}')
        if datatype == "UINT8" and (len(shape) not in (3, 4) or len(shape) == 4 and shape[3] not in RAW_CHANNELS
                                    or 0 in shape[1:3]):
            raise BadInput(f'input "{OIP_INPUT}" of datatype UINT8 has shape [N, H, W] or [N, H, W, C] with C 1, 3 '
                           f'or 4, got {shape}')
        if datatype not in ("BYTES", "UINT8"):
            raise BadInput(f'input "{OIP_INPUT}" has datatype {_brief(datatype)}: send BYTES (base64 PNG, JPEG or '
                           'WebP files) or UINT8 (raw pixels)')
        if not 1 <= shape[0] <= MAX_OIP_IMAGES:
            raise BadInput(f'input "{OIP_INPUT}" holds {shape[0]:,} images: 1 to {MAX_OIP_IMAGES} per request')
        if not isinstance(data, list):
            raise BadInput(f'input "{OIP_INPUT}" needs "data": a list (binary tensor data is not supported)')
        ids = [request_id] + [f"{request_id}/{k}" for k in range(1, shape[0])]
        if datatype == "UINT8":
            pixels = raw_pixels(data, shape)
            if pixels.ndim == 4 and pixels.shape[3] == 1:
                pixels = pixels[..., 0]
            mode = RAW_CHANNELS[pixels.shape[3] if pixels.ndim == 4 else 1]
            return [self._item(Image.fromarray(p, mode), to_png(p), k, rid) for k, (p, rid) in enumerate(zip(pixels, ids))]
        if len(data) != shape[0] or not all(isinstance(d, str) for d in data):
            raise BadInput(f'input "{OIP_INPUT}" of datatype BYTES and shape {shape} needs {shape[0]} base64 strings '
                           f'in "data"')
        items = []
        for k, (text, rid) in enumerate(zip(data, ids)):
            try:
                image = image_bytes(text.encode("ascii", "replace"))
                items.append(self._item(decode_image(image), image, k, rid))
            except BadInput as e:
                raise BadInput(f"image {k}: {e}") from None
        return items

    def _item(self, image: Image.Image, uploaded: bytes, k: int, request_id: str) -> Item:
        try:
            return Item(self.preprocess_image(image), uploaded, request_id)
        except BadInput as e:
            raise BadInput(f"image {k}: {e}") from None

    def inference(self, requests):
        good = [item.pixels for r in requests if isinstance(r, Request) for item in r.items]
        if not good:
            return None
        return self.classifier.logits(self.classifier.batch(good))

    def postprocess(self, requests, logits, context):
        probs = None if logits is None else self.classifier.probabilities(logits)
        responses, row = [], 0
        for i, request in enumerate(requests):
            if isinstance(request, Rejected):
                context.set_response_status(400, request.message, idx=i)
                responses.append({"error": request.message} if request.oip else
                                 {"code": 400, "type": "BadInput", "message": request.message})
                continue
            p = probs[row: row + len(request.items)]
            row += len(request.items)
            request.predictions = [self.classifier.prediction(q, request.options["top_k"]) for q in p]
            header = {"model": self.model_name, "version": self.version, "format": self.format,
                      "request_id": context.request_ids[i]}
            if request.kind == OIP:
                responses.append(self._oip_response(request, p, context.request_ids[i]))
            elif request.kind == EXPLAIN:
                responses.append(self._explanation(request, header, context, i))
            else:
                response = {**header, **request.predictions[0]}
                if request.options["return_input"]:
                    response["input_image"] = base64.b64encode(to_png(request.items[0].pixels)).decode("ascii")
                responses.append(response)
        return responses

    def _oip_response(self, request: Request, p: np.ndarray, request_id: str) -> dict:
        outputs = {
            "probabilities": {"name": "probabilities", "datatype": "FP32", "shape": list(p.shape),
                              "data": p.astype(np.float32).ravel().tolist()},
            "label": {"name": "label", "datatype": "BYTES", "shape": [len(p)],
                      "data": [prediction["label"] for prediction in request.predictions]},
        }
        return {"id": request_id if request.oip_id is None else request.oip_id, "model_name": self.model_name,
                "model_version": self.version, "outputs": [outputs[name] for name in request.oip_outputs]}

    def explain_baseline(self) -> np.ndarray:
        """What an occluded pixel becomes, per channel, normalised: the training mean colour (0)."""
        return np.zeros_like(self.classifier.mean)

    def _explanation(self, request: Request, header: dict, context, i: int) -> dict:
        item, prediction = request.items[0], request.predictions[0]
        try:
            attribution = occlusion(self.classifier.runtime, self.classifier.to_tensor(item.pixels),
                                    prediction["index"], self.explain_baseline())
        except Exception:  # noqa: BLE001 - a failed explanation fails its own request only
            logging.getLogger(__name__).exception("request %s: explanation failed", header["request_id"])
            context.set_response_status(500, "the explanation failed", idx=i)
            return {"code": 500, "type": "ExplanationFailed", "message": "the explanation failed"}
        return {**header, "index": prediction["index"], "label": prediction["label"],
                "confidence": prediction["confidence"], "method": EXPLAIN_METHOD,
                "attribution": np.round(attribution, 4).tolist(),
                "input_image": base64.b64encode(to_png(item.pixels)).decode("ascii")}

    def record(self, requests, latency_ms: float):
        """Write the batch's successful predictions to the prediction log, one row per image, in one
        transaction, before they are answered: a worker crash loses only the batch in flight, whose
        requests fail too. While the database is unavailable the log spools the rows to local disk
        instead. Explanations are not predictions a client asked for: not recorded."""
        rows = [record_row(item.request_id, self.model_name, self.version, self.format, r.options["client"],
                           item.image, item.pixels, prediction, latency_ms)
                for r in requests if isinstance(r, Request) and r.kind != EXPLAIN
                for item, prediction in zip(r.items, r.predictions)]
        try:
            self.log.record(rows)
        except Exception:  # a bug, or a spool on a full disk, must not fail the predictions themselves
            logging.getLogger(__name__).exception("prediction log: %d rows not recorded", len(rows))

    def handle(self, data, context):
        start = time.perf_counter()
        requests = self.preprocess(data, context)
        responses = self.postprocess(requests, self.inference(requests), context)
        if self.log is not None:
            self.record(requests, (time.perf_counter() - start) * 1000)
        return responses
