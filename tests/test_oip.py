"""Open Inference Protocol (KServe v2) over REST, driven by Triton's own Python client against the real
TorchServe: POST /v2/models/{model}/infer reaches the handler, which reads and answers the protocol."""
import base64
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from conftest import served_default
from drawing import draw_digit, png_bytes
from prediction_table import PredictionTable, url_for_run_dir

MODEL = "mnist_lenet5"
DIGITS = [0, 1, 4, 7]


def triton(torchserve) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=torchserve.inference_url.removeprefix("http://"),
                                            connection_timeout=30, network_timeout=60)


def auth(torchserve, **extra) -> dict:
    return {"Authorization": f"Bearer {torchserve._key('inference')}", **extra}


def files_input(pngs: list[bytes]) -> httpclient.InferInput:
    """BYTES [N]: base64 text of image files, as KServe's image examples send them."""
    tensor = httpclient.InferInput("image", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.array([base64.b64encode(p) for p in pngs], dtype=np.object_), binary_data=False)
    return tensor


def pixels_input(pixels: np.ndarray) -> httpclient.InferInput:
    """UINT8 [N, H, W] or [N, H, W, C]: raw pixels, flattened row-major in the JSON."""
    tensor = httpclient.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    return tensor


OUTPUTS = [httpclient.InferRequestedOutput("probabilities", binary_data=False),
           httpclient.InferRequestedOutput("label", binary_data=False)]


def infer(torchserve, tensor, outputs=OUTPUTS, model=MODEL, **kwargs):
    return triton(torchserve).infer(model, [tensor], outputs=outputs, headers=auth(torchserve), **kwargs)


def labels(result) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in result.as_numpy("label")]


def drawn_pixels(digit: int) -> np.ndarray:
    """A digit drawn white on black, 84x84 (a small canvas keeps the JSON of raw pixels small)."""
    image = draw_digit(digit, size=(84, 84), box=(14, 10, 56, 64), width=7, mode="L", ink=(255,), background=(0,))
    return np.asarray(image)


def test_drawn_digits_in_both_input_forms(torchserve):
    """Works on a fresh clone: digits drawn here, no data set."""
    pixels = np.stack([drawn_pixels(d) for d in DIGITS])
    pngs = [png_bytes(Image.fromarray(p)) for p in pixels]
    from_files = infer(torchserve, files_input(pngs))
    from_pixels = infer(torchserve, pixels_input(pixels))
    for result in (from_files, from_pixels):
        assert labels(result) == [str(d) for d in DIGITS]
        probs = result.as_numpy("probabilities")
        assert probs.shape == (4, 10) and probs.dtype == np.float32
        assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs.argmax(1) == DIGITS).all()
        response = result.get_response()
        assert (response["model_name"], response["model_version"]) == (MODEL, served_default(MODEL))
    # the same images, the same preprocessing and model, whichever form: and /predictions agrees
    assert np.allclose(from_files.as_numpy("probabilities"), from_pixels.as_numpy("probabilities"), atol=1e-6)
    single = torchserve.predict(MODEL, pngs[3])
    assert single["index"] == 7 and abs(single["confidence"] - from_files.as_numpy("probabilities")[3, 7]) < 1e-6


def test_rgba_pixels_and_photos(torchserve):
    """[N, H, W, C] with C = 4 (a transparent canvas) and C = 3 (a photo, to ResNet-18)."""
    canvas = np.stack([np.asarray(draw_digit(d, size=(70, 70), box=(10, 8, 50, 54), width=6)) for d in (1, 7)])
    assert labels(infer(torchserve, pixels_input(canvas))) == ["1", "7"]
    photos = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    result = infer(torchserve, pixels_input(photos), model="cifar10_resnet18")
    assert result.as_numpy("probabilities").shape == (3, 10) and len(labels(result)) == 3


def test_mnist_test_images_in_both_input_forms(torchserve, mnist_test):
    images, truth = mnist_test
    n = 128  # two requests of 64, the most a request takes
    answers = {"files": [], "pixels": []}
    for start in range(0, n, 64):
        batch = images[start: start + 64]
        answers["files"].append(infer(torchserve, files_input([png_bytes(Image.fromarray(i)) for i in batch])))
        answers["pixels"].append(infer(torchserve, pixels_input(batch)))
    predicted = {form: np.concatenate([r.as_numpy("probabilities") for r in results]).argmax(1)
                 for form, results in answers.items()}
    assert (predicted["files"] == predicted["pixels"]).all()
    accuracy = (predicted["files"] == truth[:n]).mean()
    print(f"OIP on {n} MNIST test images: accuracy {accuracy:.4f}")
    assert accuracy >= 0.97
    assert [int(label) for r in answers["files"] for label in labels(r)] == predicted["files"].tolist()


def test_outputs_asked_for_and_id(torchserve):
    tensor = files_input([png_bytes(draw_digit(4))])
    only_label = infer(torchserve, tensor, outputs=[httpclient.InferRequestedOutput("label", binary_data=False)],
                       request_id="my-request-7")
    response = only_label.get_response()
    assert [o["name"] for o in response["outputs"]] == ["label"] and response["id"] == "my-request-7"
    assert only_label.as_numpy("probabilities") is None and labels(only_label) == ["4"]
    # no outputs named: all of them (tritonclient then asks for binary outputs; JSON ones are read alike)
    everything = triton(torchserve).infer(MODEL, [tensor], headers=auth(torchserve))
    assert [o["name"] for o in everything.get_response()["outputs"]] == ["probabilities", "label"]
    assert everything.as_numpy("probabilities").shape == (1, 10)


def test_one_log_row_per_image_with_unique_ids(torchserve):
    tag = f"oip-{uuid.uuid4().hex[:8]}"
    pngs = [png_bytes(draw_digit(d)) for d in DIGITS]
    result = triton(torchserve).infer(MODEL, [files_input(pngs)], outputs=OUTPUTS,
                                      headers=auth(torchserve, **{"X-Client": tag}))
    request_id = result.get_response()["id"]  # no "id" sent: TorchServe's own request id comes back
    rows = {r["request_id"]: r for r in PredictionTable(url_for_run_dir(torchserve.run_dir)).recent(limit=10, client=tag)}
    assert set(rows) == {request_id, f"{request_id}/1", f"{request_id}/2", f"{request_id}/3"}
    assert [rows[i]["label"] for i in (request_id, f"{request_id}/1", f"{request_id}/2", f"{request_id}/3")] == \
        [str(d) for d in DIGITS]
    assert rows[request_id]["input_bytes"] in (None, pngs[0])  # the upload itself, when sampled


def test_health_and_metadata_are_not_served_by_torchserve_0_12(torchserve):
    """TorchServe 0.12 routes only .../infer (and .../explain) of the protocol to the handler; its own
    OIP endpoints are off unless ts_open_inference_protocol=true, and even then it has no model metadata."""
    client = triton(torchserve)
    assert not client.is_server_live(headers=auth(torchserve))
    assert not client.is_server_ready(headers=auth(torchserve))
    assert not client.is_model_ready(MODEL, headers=auth(torchserve))
    for path in ("v2/health/live", "v2/health/ready", f"v2/models/{MODEL}", f"v2/models/{MODEL}/ready"):
        response = requests.get(f"{torchserve.inference_url}/{path}", headers=auth(torchserve), timeout=10)
        assert response.status_code == 404, (path, response.text)
    with pytest.raises(InferenceServerException) as err:  # no versions in the v2 path: the default answers
        infer(torchserve, files_input([png_bytes(draw_digit(1))]), model_version="1.1")
    assert err.value.status() == "404"


def bad_tensor(name="image", shape=(1,), datatype="BYTES", data=None) -> dict:
    return {"name": name, "shape": list(shape), "datatype": datatype,
            "data": [base64.b64encode(png_bytes(draw_digit(1))).decode()] if data is None else data}


BAD_REQUESTS = {  # body -> what the error says
    "wrong datatype": ({"inputs": [bad_tensor(datatype="FP32", data=[0.5])]}, "datatype"),
    "BYTES of two dimensions": ({"inputs": [bad_tensor(shape=(1, 1))]}, r"shape \[N\]"),
    "UINT8 of one dimension": ({"inputs": [bad_tensor(shape=(784,), datatype="UINT8", data=[0] * 784)]},
                               r"\[N, H, W\]"),
    "data not matching the shape": ({"inputs": [bad_tensor(shape=(1, 28, 28), datatype="UINT8", data=[0] * 700)]},
                                    "784 values"),
    "pixel out of range": ({"inputs": [bad_tensor(shape=(1, 2, 2), datatype="UINT8", data=[0, 1, 2, 300])]},
                           "0..255"),
    "pixels not integers": ({"inputs": [bad_tensor(shape=(1, 2, 2), datatype="UINT8", data=[0, 1, 2, "x"])]},
                            "integers"),
    "missing input": ({"inputs": [bad_tensor(name="pixels")]}, 'no input tensor named "image"'),
    "no inputs": ({"inputs": []}, '"image"'),
    "two inputs": ({"inputs": [bad_tensor(), bad_tensor(name="extra")]}, "one input tensor"),
    "too many images": ({"inputs": [bad_tensor(shape=(65,), data=[base64.b64encode(b"x").decode()] * 65)]},
                        "1 to 64"),
    "bad base64": ({"inputs": [bad_tensor(data=["!!!notbase64!!!"])]}, "image 0: not an image"),
    "not an image": ({"inputs": [bad_tensor(data=[base64.b64encode(b"%PDF-1.4").decode()])]}, "not an image"),
    "a blank image among good ones": ({"inputs": [bad_tensor(shape=(2,), data=[
        base64.b64encode(png_bytes(draw_digit(7))).decode(),
        base64.b64encode(png_bytes(Image.new("RGBA", (50, 50)))).decode()])]}, "image 1: blank"),
    "unknown output": ({"inputs": [bad_tensor()], "outputs": [{"name": "logits"}]}, "unknown output"),
    "binary data": ({"inputs": [bad_tensor()]}, "binary tensor data"),  # sent with Inference-Header-Content-Length
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_oip_request_gets_400_with_the_protocols_error(torchserve, case):
    body, message = BAD_REQUESTS[case]
    extra = {"Inference-Header-Content-Length": "10"} if case == "binary data" else {}
    response = requests.post(f"{torchserve.inference_url}/v2/models/{MODEL}/infer", json=body,
                             headers=auth(torchserve, **extra), timeout=30)
    assert response.status_code == 400, response.text
    assert pytest.importorskip("re").search(message, response.json()["error"]), response.text


def test_bad_requests_through_tritonclient(torchserve):
    """What Triton's client raises: InferenceServerException with the status and the handler's message."""
    wrong = httpclient.InferInput("image", [1, 4], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 4), np.float32), binary_data=False)
    cases = [(wrong, "datatype 'FP32'"),
             (files_input([png_bytes(draw_digit(1))] * 65), "1 to 64"),
             (pixels_input(np.zeros((2, 28), np.uint8)), r"\[N, H, W\]"),
             (pixels_input(np.zeros((1, 28, 28), np.uint8)), "image 0: blank")]
    for tensor, message in cases:
        with pytest.raises(InferenceServerException) as err:
            infer(torchserve, tensor)
        assert err.value.status() == "400" and pytest.importorskip("re").search(message, err.value.message())


def test_bad_oip_requests_do_not_fail_their_batch(torchserve):
    """Good OIP requests, bad ones and /predictions, sent at once so that TorchServe batches them
    together (batches of 8 within 5 ms): each gets its own answer."""
    seven = png_bytes(draw_digit(7))
    good = {"inputs": [bad_tensor(data=[base64.b64encode(seven).decode()])]}
    bad = BAD_REQUESTS["bad base64"][0]

    def send(i):
        if i % 3 == 2:
            return requests.post(f"{torchserve.inference_url}/predictions/{MODEL}", data=seven,
                                 headers=auth(torchserve), timeout=30)
        return requests.post(f"{torchserve.inference_url}/v2/models/{MODEL}/infer", json=bad if i % 3 else good,
                             headers=auth(torchserve), timeout=30)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, range(60)))
    assert [r.status_code for r in responses] == [400 if i % 3 == 1 else 200 for i in range(60)]
    for i, response in enumerate(responses):
        body = response.json()
        if i % 3 == 0:
            assert body["outputs"][1]["data"] == ["7"]
        elif i % 3 == 1:
            assert body["error"].startswith("image 0: not an image")
        else:
            assert body["index"] == 7 and "outputs" not in body
