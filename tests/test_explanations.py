"""Explanations through the real TorchServe: POST /explanations/{model}[/{version}] answers the prediction
with an occlusion map over the image the model saw (handlers/explain.py)."""
import base64
import io
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

import catalog
from conftest import served_default
from drawing import draw_digit, png_bytes
from prediction_table import PredictionTable, url_for_run_dir
from serving.client import ServeError

MODEL = "mnist_lenet5"


def seen(response: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response["input_image"]))))


def check_map(response: dict, shape: tuple) -> np.ndarray:
    attribution = np.asarray(response["attribution"], np.float64)
    assert attribution.shape == shape and np.isfinite(attribution).all()
    assert np.abs(attribution).max() == pytest.approx(1, abs=1e-4)  # scaled to [-1, 1] by its peak
    assert response["method"] == "occlusion"
    return attribution


@pytest.mark.parametrize("digit", [0, 1, 4, 7])
def test_a_drawn_digit_is_explained_by_its_ink(torchserve, digit):
    image = png_bytes(draw_digit(digit))
    started = time.perf_counter()
    explained = torchserve.explain(MODEL, image)
    elapsed = time.perf_counter() - started
    predicted = torchserve.predict(MODEL, image, return_input=True)
    default = served_default(MODEL)
    assert explained["index"] == predicted["index"] == digit and explained["label"] == str(digit)
    assert explained["confidence"] == pytest.approx(predicted["confidence"], abs=1e-6)
    assert (explained["model"], explained["version"], explained["format"]) == (MODEL, default, catalog.read_manifest()[(MODEL, default)]["format"])
    attribution = check_map(explained, (28, 28))
    pixels = seen(explained)
    assert (pixels == seen(predicted)).all()  # the map is over exactly what the model saw
    ink = pixels > 64
    on_ink, off_ink = np.abs(attribution[ink]).mean(), np.abs(attribution[~ink]).mean()
    print(f"digit {digit}: mean |attribution| on ink {on_ink:.3f}, background {off_ink:.3f}; {elapsed * 1000:.0f} ms")
    assert on_ink > 3 * off_ink
    assert attribution[ink].sum() > 0  # the ink supports the prediction: occluding it lowers the digit's logit


def test_formats_without_gradients_and_photos_are_explained(torchserve):
    """ONNX (1.1) has no gradients: occlusion drives the archive's own runtime, whichever ResNet-18's default is."""
    onnx = torchserve.explain(MODEL, png_bytes(draw_digit(4)), version="1.1")
    assert (onnx["version"], onnx["format"], onnx["index"]) == ("1.1", "onnx", 4)
    check_map(onnx, (28, 28))
    photo = np.zeros((48, 64, 3), np.uint8)
    photo[:24] = (90, 140, 220)  # sky over sand
    photo[24:] = (200, 170, 120)
    explained = torchserve.explain("cifar10_resnet18", png_bytes(Image.fromarray(photo)))
    predicted = torchserve.predict("cifar10_resnet18", png_bytes(Image.fromarray(photo)))
    default = catalog.read_manifest()[("cifar10_resnet18", served_default("cifar10_resnet18"))]
    assert explained["format"] == default["format"] and explained["index"] == predicted["index"]
    check_map(explained, (32, 32))
    assert seen(explained).shape == (32, 32, 3)


@pytest.mark.parametrize("body, message", [
    (png_bytes(Image.new("RGBA", (280, 280))), "blank image"),
    (b"%PDF-1.4 not a picture", "not an image"),
    (b"", "empty"),
    (b'{"data": "!!!"}', "not an image"),
    (b'{"inputs": []}', "not served over the Open Inference Protocol"),
])
def test_bad_input_gets_400(torchserve, body, message):
    with pytest.raises(ServeError) as err:
        torchserve.explain(MODEL, body)
    assert err.value.status == 400 and message in err.value.message
    assert torchserve.explain(MODEL, png_bytes(draw_digit(1)))["index"] == 1  # the worker keeps serving


def test_explanations_predictions_and_bad_requests_share_batches(torchserve):
    seven = png_bytes(draw_digit(7))
    key = torchserve._key("inference")

    def send(i):
        api = "predictions" if i % 3 == 2 else "explanations"
        return requests.post(f"{torchserve.inference_url}/{api}/{MODEL}", data=b"garbage" if i % 3 == 1 else seven,
                             headers={"Authorization": f"Bearer {key}"}, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, range(36)))
    assert [r.status_code for r in responses] == [400 if i % 3 == 1 else 200 for i in range(36)]
    for i, response in enumerate(responses):
        body = response.json()
        if i % 3 != 1:
            assert body["index"] == 7 and ("attribution" in body) == (i % 3 == 0)


def test_explanations_are_not_written_to_the_prediction_log(torchserve):
    tag = f"explain-{uuid.uuid4().hex[:8]}"
    torchserve.explain(MODEL, png_bytes(draw_digit(0)), client=tag)
    torchserve.predict(MODEL, png_bytes(draw_digit(0)), client=tag)
    assert PredictionTable(url_for_run_dir(torchserve.run_dir)).count(client=tag) == 1
