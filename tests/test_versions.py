"""Versions side by side, switched and rolled back with modelctl, over REST and gRPC, with auth on."""
import json
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from drawing import draw_digit, png_bytes
from serving import modelctl, server
from serving.client import ServeError
from serving.grpc_client import GrpcClient
from conftest import start_torchserve

pytestmark = pytest.mark.integration  # each module starts its own TorchServe

LENET = ["mnist_lenet5=mnist_lenet5_v1.0.mar", "mnist_lenet5=mnist_lenet5_v1.1.mar"]


@pytest.fixture(scope="module")
def lenet_server(tmp_path_factory):
    """A server of its own: these tests change defaults and (un)register versions."""
    run_dir = tmp_path_factory.mktemp("versions")
    client = start_torchserve(run_dir, models=LENET)
    client.grpc = GrpcClient.from_config(run_dir / "config.properties", run_dir / "key_file.json")
    yield client
    server.stop(run_dir)


def run_ctl(client, capsys, *argv):
    code = modelctl.main(["--json", "--key-file", str(client.key_file), *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else err)


@pytest.fixture()
def env(lenet_server, monkeypatch):
    """modelctl reads the server's addresses from the environment, as a user pointing it elsewhere would."""
    monkeypatch.setenv("TS_INFERENCE_URL", lenet_server.inference_url)
    monkeypatch.setenv("TS_MANAGEMENT_URL", lenet_server.management_url)
    return lenet_server


def test_two_versions_answer_at_their_urls(env):
    seven = png_bytes(draw_digit(7))
    assert env.predict("mnist_lenet5", seven, version="1.0")["format"] == "torchscript"
    assert env.predict("mnist_lenet5", seven, version="1.1")["format"] == "onnx"
    assert env.predict("mnist_lenet5", seven)["version"] == "1.0"


def test_set_default_rollback_and_refusing_to_unregister_the_default(env, capsys):
    seven = png_bytes(draw_digit(7))
    code, rows = run_ctl(env, capsys, "describe", "mnist_lenet5")
    assert code == 0 and {r["version"]: r["default"] for r in rows} == {"1.0": True, "1.1": False}
    assert run_ctl(env, capsys, "set-default", "mnist_lenet5", "1.1")[0] == 0
    assert env.predict("mnist_lenet5", seven)["version"] == "1.1"
    code, err = run_ctl(env, capsys, "unregister", "mnist_lenet5", "1.1")
    assert code == 1 and "default version" in err
    assert run_ctl(env, capsys, "rollback", "mnist_lenet5")[0] == 0
    assert env.predict("mnist_lenet5", seven)["version"] == "1.0"
    code, err = run_ctl(env, capsys, "rollback", "mnist_lenet5")
    assert code == 1 and "no earlier default" in err


def test_unregister_and_register_from_the_model_store(env, capsys):
    assert run_ctl(env, capsys, "unregister", "mnist_lenet5", "1.1")[0] == 0
    assert [v["modelVersion"] for v in env.describe("mnist_lenet5")] == ["1.0"]
    code, err = run_ctl(env, capsys, "register", "/etc/passwd")
    assert code == 1 and "only archives in" in err
    code, err = run_ctl(env, capsys, "describe", "no_such_model")
    assert code == 1 and "HTTP 404" in err
    assert run_ctl(env, capsys, "register", "mnist_lenet5_v1.1.mar")[0] == 0
    assert sorted(v["modelVersion"] for v in env.describe("mnist_lenet5")) == ["1.0", "1.1"]
    assert run_ctl(env, capsys, "scale", "mnist_lenet5", "1.1", "--workers", "1")[0] == 0


def test_no_failed_request_while_the_default_is_switched_and_rolled_back(env, capsys):
    """A steady stream of requests from a background thread; the default flips six times under it."""
    image, results, stop = png_bytes(draw_digit(4)), [], threading.Event()

    def stream():
        while not stop.is_set() and len(results) < 5000:
            try:
                results.append(env.predict("mnist_lenet5", image)["version"])
            except ServeError as e:
                results.append(e)

    def after(n):  # let n more requests through before the next switch
        target = len(results) + n
        while len(results) < target and worker.is_alive():
            time.sleep(0.005)

    worker = threading.Thread(target=stream)
    worker.start()
    for _ in range(3):
        after(50)
        assert run_ctl(env, capsys, "set-default", "mnist_lenet5", "1.1")[0] == 0
        after(50)
        assert run_ctl(env, capsys, "rollback", "mnist_lenet5")[0] == 0
    after(50)
    stop.set()
    worker.join(timeout=120)
    failures = [r for r in results if isinstance(r, Exception)]
    assert len(results) >= 300 and not failures, failures[:3]
    assert set(results) == {"1.0", "1.1"}  # both versions answered the unversioned URL
    assert results[-1] == "1.0"


def test_rest_and_grpc_give_identical_predictions(lenet_server, mnist_or_drawn):
    grpc = lenet_server.grpc
    assert grpc.ping()
    for image in mnist_or_drawn:
        for version in ("1.0", "1.1"):
            rest = lenet_server.predict("mnist_lenet5", image, version=version, top_k=10)
            over_grpc = grpc.predict("mnist_lenet5", image, version=version, top_k=10)
            assert rest.pop("request_id") != over_grpc.pop("request_id")  # each request has its own id
            assert rest == over_grpc
    with pytest.raises(ServeError) as err:
        grpc.predict("mnist_lenet5", b"not an image")
    assert err.value.status == 400


@pytest.fixture(scope="module")
def mnist_or_drawn():
    from catalog import DATA_DIR
    try:
        from training.data import load_split
        images = load_split("mnist", DATA_DIR, train=False)[0][:20, 0].numpy()
        return [png_bytes(Image.fromarray(img)) for img in images]
    except FileNotFoundError:  # training.data.DataMissing: a checkout without the data sets
        return [png_bytes(draw_digit(d)) for d in (0, 1, 4, 7)]


def test_requests_without_or_with_a_wrong_token_are_refused(lenet_server):
    """TorchServe 0.12 answers 400 InvalidKeyException (not 401) on REST, PERMISSION_DENIED on gRPC."""
    url = f"{lenet_server.inference_url}/predictions/mnist_lenet5"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = requests.post(url, data=png_bytes(draw_digit(1)), headers=headers, timeout=10)
        assert response.status_code == 400 and response.json()["type"] == "InvalidKeyException"
        response = requests.get(f"{lenet_server.management_url}/models", headers=headers, timeout=10)
        assert response.status_code == 400 and response.json()["type"] == "InvalidKeyException"
    # the inference key does not open the management API
    inference_key = lenet_server._key("inference")
    response = requests.get(f"{lenet_server.management_url}/models",
                            headers={"Authorization": f"Bearer {inference_key}"}, timeout=10)
    assert response.status_code == 400
    wrong = GrpcClient.from_config(lenet_server.run_dir / "config.properties", lenet_server.run_dir / "key_file.json")
    wrong.key_file = lenet_server.run_dir / "wrong_keys.json"
    wrong.key_file.write_text(json.dumps({"inference": {"key": "wrong"}}))
    with pytest.raises(ServeError) as err:
        wrong.predict("mnist_lenet5", png_bytes(draw_digit(1)))
    assert err.value.status == 403 and "Token Authorization failed" in err.value.message


def test_registering_from_outside_the_model_store_is_refused(lenet_server):
    for url in ("http://127.0.0.1:9/evil.mar", "file:///etc/passwd", "file:///tmp/evil.mar", "../README.md"):
        with pytest.raises(ServeError) as err:
            lenet_server.register(url)
        assert err.value.status == 404 and ("allowed URL" in err.value.message or "Relative path" in err.value.message)
    assert np.all([v["modelVersion"] in ("1.0", "1.1") for v in lenet_server.describe("mnist_lenet5")])
