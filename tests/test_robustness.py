"""Robustness: fuzzed input never escapes the handler as an exception; a killed worker is replaced."""
import base64
import io
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from ts.context import Context, RequestProcessor

from catalog import EXPORT_DIR, load_settings
from digit_handler import DigitHandler
from drawing import draw_digit, png_bytes
from image_handler import ImageHandler
from model_store.archive import model_config, version_spec
from serving import server
from serving.client import ServeError
from conftest import shipped, start_torchserve


def make_context(model: str, handler_config: dict) -> Context:
    """A real TorchServe Context, as the worker builds it, for the in-process handler."""
    manifest = {"model": {"modelName": model, "modelVersion": "fuzz", "serializedFile": "model.pt"}}
    return Context(model, str(EXPORT_DIR / model), manifest, 8, None, "0.12.0",
                   model_yaml_config={"handler": handler_config})


def loaded(handler_class, model: str):
    shipped(model)
    if not (EXPORT_DIR / model / "model.pt").exists():
        pytest.fail(f"{model} is not exported: `make test` exports it")
    config = model_config(load_settings(), model, version_spec("torchscript"))["handler"]
    handler = handler_class()
    handler.initialize(make_context(model, config))
    handler.log = None  # in-process: no prediction log
    return handler


@pytest.fixture(scope="module")
def digits():
    return loaded(DigitHandler, "mnist_lenet5")


def run(handler, rows: list[dict], headers: list[dict] | None = None):
    context = make_context(handler.model_name, {})
    context.request_ids = {i: f"req-{i}" for i in range(len(rows))}
    context.request_processor = [RequestProcessor(h) for h in (headers or [{}] * len(rows))]
    started = time.perf_counter()
    responses = handler.handle(rows, context)
    elapsed = time.perf_counter() - started
    assert len(responses) == len(rows) and elapsed < 5, elapsed  # one answer per request, no hang
    for i, response in enumerate(responses):
        status = context.get_response_status(i)[0] or 200
        if status == 400:
            assert response["type"] == "BadInput" and response["message"]
        else:
            assert status == 200 and 0 <= response["index"] < 10 and 0 <= response["confidence"] <= 1
    return responses


def image_strategy():
    modes = st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"])
    sizes = st.tuples(st.integers(1, 300), st.integers(1, 300))
    formats = st.sampled_from(["PNG", "JPEG", "WEBP"])

    @st.composite
    def encoded(draw):
        mode, (w, h), fmt = draw(modes), draw(sizes), draw(formats)
        seed = draw(st.integers(0, 2 ** 16))
        pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGBA").convert(mode)
        buf = io.BytesIO()
        try:
            image.save(buf, format=fmt)
        except (OSError, ValueError, KeyError):  # not every mode can be written in every format
            image.convert("RGB").save(buf, format=fmt)
        data = buf.getvalue()
        cut = draw(st.sampled_from([None, None, len(data) // 2, 20]))  # sometimes truncated
        return data if cut is None else data[:cut]
    return encoded()


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(digits, payload):
    run(digits, [{"body": payload}])


@FUZZ
@given(image_strategy())
def test_random_images_of_any_mode_size_and_format(digits, data):
    run(digits, [{"body": data}, {"data": data}, {"file": data}])


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
                 image_strategy().map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()[:-3])))
def test_malformed_base64_and_data_urls(digits, text):
    run(digits, [{"body": {"data": text}}, {"body": json.dumps({"data": text}).encode()}])


@FUZZ
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children,
                                                                                       max_size=3), max_leaves=10),
       st.sampled_from(["top_k", "return_input", "X-Top-K"]), st.text(max_size=12))
def test_malformed_json_and_options(digits, value, option, option_value):
    good = base64.b64encode(png_bytes(draw_digit(7))).decode()
    rows = [{"body": value}, {"body": {"data": good, option: option_value}},
            {"body": json.dumps(value).encode() if not isinstance(value, str) else value.encode()}]
    run(digits, rows, headers=[{}, {}, {option: option_value}])


def hostile_rows():
    """Structured hostile requests, as TorchServe hands them to the handler: JSON nested thousands deep,
    huge strings, odd unicode, multipart forms of many parts, odd option values."""
    text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)  # includes lone surrogates
    depth = st.sampled_from([1_000, 5_000, 20_000]) | st.integers(50, 20_000)  # Python's limit is ~1,000
    nested = depth.map(lambda d: {"body": ('{"data":' * d + '"x"' + "}" * d).encode()})
    arrays = depth.map(lambda d: {"body": ("[" * d + "]" * d).encode()})
    huge = st.integers(1, 6).map(lambda mb: {"body": json.dumps({"data": "A" * (mb << 20)}).encode()})
    unicode_json = text.map(lambda t: {"body": json.dumps({"data": t, "top_k": t}).encode()})
    surrogates = st.just({"body": b'{"data": "\\ud800\\udfff\\u0000", "return_input": "\\ud83d"}'})
    raw_unicode = text.map(lambda t: {"body": t.encode("utf-8", "surrogatepass")})
    many_parts = st.integers(2, 500).map(lambda n: {f"field{i}": bytes([i % 256]) * (i % 7) for i in range(n)})
    odd_types = st.sampled_from([{"body": {"data": {"data": "x"}}}, {"body": {"data": ["x"]}}, {"body": {"data": 7}},
                                 {"body": [1, 2]}, {"body": 3.5}, {"data": None}, {}, {"body": {"data": None}},
                                 {"body": {"data": "x", "top_k": [1]}}, {"body": {"data": "x", "client": {"a": 1}}}])
    return st.one_of(nested, arrays, huge, unicode_json, surrogates, raw_unicode, many_parts, odd_types)


ODD_HEADER_VALUES = st.one_of(st.text(max_size=30), st.just("9" * 5000), st.just("\x00\xff"), st.just(" 3 "))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_rows(), min_size=1, max_size=4), ODD_HEADER_VALUES,
       st.sampled_from(["X-Top-K", "X-Return-Input", "X-Client"]))
def test_structured_hostile_requests_never_fail_a_good_neighbour(digits, rows, header_value, header):
    good = png_bytes(draw_digit(7))
    batch = [{"body": good}, *rows, {"body": good}]
    headers = [{}] + [{header: header_value}] * len(rows) + [{}]
    responses = run(digits, batch, headers)
    assert responses[0]["index"] == 7 and responses[-1]["index"] == 7


@settings(max_examples=40, deadline=None)
@given(image_strategy())
def test_cifar_handler_takes_any_image(data):
    handler = ImageHandlerCache.get()
    run(handler, [{"body": data}])


class ImageHandlerCache:
    handler = None

    @classmethod
    def get(cls):
        if cls.handler is None:
            cls.handler = loaded(ImageHandler, "cifar10_resnet18")
        return cls.handler


def test_a_deeply_nested_json_body_does_not_fail_its_batch(digits):
    """5,000 levels of {"data": ...} once raised RecursionError, which escaped the handler and failed
    every request batched with it."""
    good = png_bytes(draw_digit(7))
    nested = ('{"data":' * 5000 + '"x"' + "}" * 5000).encode()
    responses = run(digits, [{"body": good}, {"body": nested}, {"body": good}])
    assert [r.get("index") for r in responses] == [7, None, 7]
    assert "nested too deeply" in responses[1]["message"]


def test_decompression_bomb_is_refused_quickly(digits):
    buf = io.BytesIO()
    Image.new("L", (30000, 30000)).save(buf, format="PNG", optimize=True)  # ~1 MB file, 900 Mpx decoded
    started = time.perf_counter()
    (response,) = run(digits, [{"body": buf.getvalue()}])
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0 and ("too large" in response["message"] or "pixels" in response["message"]), elapsed


@pytest.mark.integration
def test_a_killed_worker_is_replaced_and_service_resumes(tmp_path):
    """SIGKILL one of the model's two workers (models.yaml: one per core) under a steady stream of
    requests: only requests in flight on it may fail, the other worker keeps answering, and TorchServe
    starts a replacement. Reports the failures, the longest wait for an answer, and how long until
    two workers were ready again (full throughput). The clients do not retry: a failed request is
    reported to the caller, who decides."""
    client = start_torchserve(tmp_path, models=["mnist_lenet5=mnist_lenet5_v1.0.mar"])
    image, log, stop, streams = png_bytes(draw_digit(7)), [], threading.Event(), 4

    def stream():
        while not stop.is_set():
            try:
                client.predict("mnist_lenet5", image)
                log.append((time.time(), True))
            except ServeError:
                log.append((time.time(), False))

    try:
        threads = [threading.Thread(target=stream) for _ in range(streams)]
        for t in threads:
            t.start()
        time.sleep(3)
        pids = worker_pids(client)
        assert len(pids) == 2, pids
        killed_at = time.time()
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.time() + 90
        while time.time() < deadline and not (len(worker_pids(client)) == 2 and pids[0] not in worker_pids(client)):
            time.sleep(0.2)
        restored = time.time() - killed_at
        # Service resumes: at least 10 answers after the kill. Usually within milliseconds; but when
        # the kill lands while the dead worker's thread has just taken requests for its next batch,
        # those wait until the client's own timeout (10 s) before they fail (seen once in CI).
        while time.time() < killed_at + 30 and sum(ok and t > killed_at for t, ok in list(log)) <= 10:
            time.sleep(0.2)
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        failed = [t for t, ok in log if not ok]
        answered = [killed_at] + [t for t, ok in log if ok and t > killed_at]
        longest_wait = max(b - a for a, b in zip(answered, answered[1:]))
        print(f"one of 2 workers killed: {len(failed)} of {len(log)} requests failed; longest wait for an answer "
              f"{longest_wait:.2f} s; two workers ready again after {restored:.1f} s")
        assert restored < 90 and pids[0] not in worker_pids(client)
        assert len(failed) <= streams  # only what was in flight on the killed worker
        assert len(answered) > 10 and client.predict("mnist_lenet5", image)["index"] == 7
    finally:
        stop.set()
        server.stop(tmp_path)


def worker_pids(client) -> list[int]:
    """The model's workers that are up (TorchServe lists a restarting worker without READY)."""
    return [w["pid"] for v in client.describe("mnist_lenet5") for w in v["workers"]
            if w.get("pid") and w.get("status") == "READY"]


MIXED_LOAD_S = 12  # seconds of mixed traffic


def test_mixed_good_and_hostile_load_has_no_5xx_and_no_failed_good_request(torchserve):
    """Good requests in every form to all three models, side by side with hostile bodies that share
    their batches: every good request is answered right, nothing gets a 5xx."""
    key = torchserve._key("inference")
    url = f"{torchserve.inference_url}/predictions"
    seven, scene = png_bytes(draw_digit(7)), png_bytes(Image.new("RGB", (64, 48), (90, 140, 220)))
    seven_b64 = base64.b64encode(seven).decode()
    good = [("mnist_lenet5", dict(data=seven)), ("mnist_alexnet", dict(files={"file": ("d.png", seven)})),
            ("mnist_lenet5", dict(json={"data": f"data:image/png;base64,{seven_b64}"})),
            ("cifar10_resnet18", dict(data=scene))]
    hostile = [dict(data=('{"data":' * 5000 + '"x"' + "}" * 5000).encode()), dict(data=b"[" * 20000),
               dict(json={"data": "A" * (3 << 20)}), dict(data=b"\x89PNG\r\n\x1a\n" + b"\0" * 5000),
               dict(files={f"part{i}": (f"p{i}", b"x" * i) for i in range(300)}),
               dict(data=seven, headers={"X-Top-K": "9" * 400, "X-Return-Input": "\u00ff"}),
               dict(data="\ud800\udfff".encode("utf-8", "surrogatepass")), dict(json={"data": {"data": ["x"]}})]
    counts = {"good": 0, "hostile": 0}
    failures, lock, deadline = [], threading.Lock(), time.time() + MIXED_LOAD_S

    def send(kind, requests_list, offset):
        session, i = requests.Session(), offset
        while time.time() < deadline:
            model, kwargs = requests_list[i % len(requests_list)] if kind == "good" else ("mnist_lenet5",
                                                                                        requests_list[i % len(requests_list)])
            kwargs = dict(kwargs)
            headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
            response = session.post(f"{url}/{model}", headers=headers, timeout=30, **kwargs)
            i += 1
            with lock:
                counts[kind] += 1
                if response.status_code >= 500:
                    failures.append(f"{kind} {model}: {response.status_code} {response.text[:120]}")
                elif kind == "good" and (response.status_code != 200 or
                                         (model.startswith("mnist") and response.json()["index"] != 7)):
                    failures.append(f"good {model}: {response.status_code} {response.text[:120]}")

    def guarded(*args):
        try:
            send(*args)
        except Exception as e:  # a client-side error is a failure too, not a silent thread death
            failures.append(f"{args[0]} sender: {e!r}")

    threads = [threading.Thread(target=guarded, args=("good", good, n)) for n in range(4)]
    threads += [threading.Thread(target=guarded, args=("hostile", hostile, n * 3)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, f"{len(failures)} failures of {counts}: {failures[:5]}"
    assert counts["good"] > 50 and counts["hostile"] > 20, counts
