"""What the pages share: the TorchServe client, its errors as messages, the model and version pickers,
the prediction call and the prediction log."""
import base64
import hashlib
import io
import os
import re
import time
from pathlib import Path

import numpy as np
import requests
import sqlalchemy.exc
import streamlit as st
from PIL import Image

import catalog
from prediction_table import PredictionTable, url_for_run_dir
from serving.client import ServeError, TorchServeClient, read_properties

HISTORY_LENGTH = 50  # rows of the prediction log on the History page
# The prediction log's caller for "Predict while drawing": previews of a drawing in progress, which
# History hides unless asked. Predict logs the drawing as the client's own ("ui").
LIVE_CLIENT = "ui-live"
# A worker answers in milliseconds; the margin is for a busy two-core machine, and stays under
# TorchServe's own 30 s response timeout so that its message, not ours, explains a stuck worker.
TIMEOUT_S = 20


@st.cache_resource
def client() -> TorchServeClient:
    return TorchServeClient.from_config(timeout=TIMEOUT_S, client_name="ui")  # the prediction log's caller


SERVE_ERRORS = (ServeError, requests.RequestException)
LOG_ERRORS = (sqlalchemy.exc.SQLAlchemyError,)


@st.cache_resource
def prediction_log() -> PredictionTable | None:
    """The log TorchServe writes: $PREDICTION_LOG_URL, else predictions.db beside the server's key file."""
    url = url_for_run_dir(Path(client().key_file).parent)
    return None if url == "off" else PredictionTable(url)


def class_names(model: str) -> list[str]:
    return list(catalog.CLASSES[catalog.dataset_of(model)])


def explain(error: Exception, subject: str) -> str:
    """A sentence for the page: what went wrong with `subject` and what to do about it."""
    if not isinstance(error, ServeError):  # the client turns the usual network errors into ServeError
        return f"Talking to TorchServe failed: {error}"
    if error.status is None:  # unreachable or too slow: the client's message already says so
        return error.message
    if error.status == 400:  # the handler's reason (blank image, not an image, ...) or a refused token
        return f"{subject} refused the request: {error.message}"
    if error.status == 404:
        return f"{subject} is not loaded on TorchServe ({error.message})."
    if error.status == 503:
        return f"{subject} is busy (its queue is full) or has no worker ready: try again in a moment ({error.message})."
    if error.status in (408, 504):
        return f"{subject} took too long to answer ({error.message})."
    if error.status == 413:
        return f"The image is too large for TorchServe ({error.message})."
    return f"TorchServe answered {error.status} for {subject}: {error.message}"


def attempt(call, *args, subject: str = "TorchServe", **kwargs):
    """call(*args, **kwargs), or None after showing why it failed on the page."""
    try:
        return call(*args, **kwargs)
    except SERVE_ERRORS as e:
        st.error(explain(e, subject), icon=":material/error:")
        return None


def server_status():
    try:
        healthy = client().ping()
    except SERVE_ERRORS:
        healthy = False
    with st.sidebar:
        st.markdown(":green[●] TorchServe is healthy" if healthy else ":red[●] TorchServe is not answering")
        st.caption(f"Inference API: {client().inference_url}")


def models_for(handler: str) -> list[str]:
    """The models of model_store/models.yaml that `handler` serves: digit_handler.py takes drawings,
    image_handler.py photos."""
    models = catalog.load_settings()["models"]
    return [name for name, entry in models.items() if entry["handler"] == handler]


def pick_model(handler: str, page: str) -> tuple[str, str] | None:
    """Radio buttons for a served model of `handler` and one of its versions, the default first
    selected; None (with a message on the page) when there is nothing to pick."""
    served = attempt(client().models)
    if served is None:
        return None
    wanted = models_for(handler)
    models = [m for m in wanted if m in served]
    if not models:
        st.warning(f"TorchServe serves none of {', '.join(wanted)}. `make archive` archives the trained "
                   f"models; restart TorchServe (`make stop serve`) to load them.", icon=":material/warning:")
        return None
    left, right = st.columns(2)
    model = left.radio("Model", models, horizontal=True, key=f"{page}_model")
    versions = attempt(client().describe, model, subject=model)
    default = attempt(client().default_version, model, subject=model)
    if versions is None or default is None:
        return None
    names = [v["modelVersion"] for v in versions]
    # Keyed by the default too, so that a new default (Models page) is what gets pre-selected.
    version = right.radio("Version", names, index=names.index(default), horizontal=True,
                          format_func=lambda v: f"{v} (default)" if v == default else v,
                          key=f"{page}_version_{model}_{default}")
    return model, version


def predict(page: str, model: str, version: str, image: bytes, top_k: int, force: bool = True,
            live: bool = False) -> dict | None:
    """Ask TorchServe and remember the answer as the page's result (TorchServe logs it). Without
    `force`, the page's last answer to the same request is reused: Streamlit reruns the whole page on
    every click, and that should not send (and log) the same prediction again. `live`: a prediction
    of a drawing still in progress, logged as client LIVE_CLIENT so the history tells it apart."""
    if not force and (result := answered(page, model, version, image, top_k)):
        return result
    start = time.perf_counter()
    result = attempt(client().predict, model, image, version, top_k=top_k, return_input=True,
                     subject=f"{model} {version}", **({"client": LIVE_CLIENT} if live else {}))
    if result is None:
        return None
    result["latency_ms"] = (time.perf_counter() - start) * 1000
    result["input_png"] = base64.b64decode(result.pop("input_image"))
    st.session_state[f"{page}_result"] = (_request(model, version, image, top_k), result)
    return result


def answered(page: str, model: str, version: str, image: bytes | None, top_k: int) -> dict | None:
    """The page's last result if it answers this very request (not an older drawing or model)."""
    last = st.session_state.get(f"{page}_result")
    if image is None or last is None or last[0] != _request(model, version, image, top_k):
        return None
    return last[1]


def explanation(page: str, model: str, version: str, image: bytes) -> dict | None:
    """TorchServe's explanation of this image (POST /explanations: Occlusion over what the model saw),
    asked once per model, version and image; None after showing why it failed."""
    asked = st.session_state.setdefault(f"{page}_explanations", {})
    key = (model, version, hashlib.sha256(image).hexdigest())
    if key not in asked:
        answer = attempt(client().explain, model, image, version=version)
        if answer is None:
            return None
        asked[key] = answer
    return asked[key]


def overlay(explanation: dict, size: int) -> Image.Image:
    """What the model saw with the attribution over it: red where a region made the prediction more
    likely, blue where it spoke against it, the stronger the more it mattered."""
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(explanation["input_image"]))).convert("RGB"),
                      np.float32) / 255
    attribution = np.asarray(explanation["attribution"], np.float32)
    colour = np.stack([attribution.clip(0, 1), np.zeros_like(attribution), (-attribution).clip(0, 1)], -1)
    weight = 0.75 * np.abs(attribution)[..., None]
    return enlarged((255 * ((1 - weight) * seen + weight * colour)).round().astype(np.uint8), size)


def _request(model: str, version: str, image: bytes, top_k: int) -> tuple:
    return model, version, top_k, hashlib.sha256(image).hexdigest()


# What TorchServe accepts (config.properties: max_request_size; handlers: MAX_PIXELS). A larger photo is
# shrunk here before it is sent: a 5000x4000 phone photo is a fine picture of a ship at 32x32.
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_UPLOAD_SIDE_PX = 2048


def readable_photo(data: bytes) -> Image.Image | None:
    """The uploaded file as a loaded image, or None when it is not one (a renamed text file, a truncated photo)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception:  # noqa: BLE001 - PIL raises many kinds; every one means "not a readable image"
        return None


def fit_for_upload(data: bytes, image: Image.Image) -> bytes:
    """The file itself when TorchServe takes it, else the photo shrunk to MAX_UPLOAD_SIDE_PX on its
    long side as a JPEG (transparency composited onto white, as the handler does)."""
    if len(data) <= MAX_UPLOAD_BYTES and max(image.size) <= MAX_UPLOAD_SIDE_PX * 2:
        return data
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    image.thumbnail((MAX_UPLOAD_SIDE_PX, MAX_UPLOAD_SIDE_PX), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def enlarged(image: bytes | np.ndarray, size: int) -> Image.Image:
    """The model's input (a PNG from a response, or pixels from the prediction log), blown up with
    nearest-neighbour so that its pixels stay visible."""
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else Image.open(io.BytesIO(image))
    return image.resize((size, size * image.height // image.width), Image.Resampling.NEAREST)


def metrics_url() -> str:
    """TorchServe's Prometheus endpoint: $TS_METRICS_URL, else config.properties' metrics_address."""
    if os.environ.get("TS_METRICS_URL"):
        return os.environ["TS_METRICS_URL"].rstrip("/")
    return read_properties(catalog.TS_CONFIG)["metrics_address"].rstrip("/")


def serving_metrics() -> list[tuple[str, dict, float]]:
    """GET /metrics (Prometheus text) as (name, labels, value) samples."""
    answer = requests.get(f"{metrics_url()}/metrics", timeout=5)
    answer.raise_for_status()
    samples = []
    for line in answer.text.splitlines():
        match = PROMETHEUS_LINE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
            samples.append((match["name"], labels, float(match["value"])))
    return samples


PROMETHEUS_LINE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>[-+\w.]+)")


def metric(samples: list, name: str, labels: dict) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(value for n, have, value in samples if n == name and labels.items() <= have.items())
