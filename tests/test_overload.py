"""Overload is shed, not queued: past a model version's jobQueueSize the real TorchServe answers 503
at once, the requests it accepted are answered right, and serving/client.py's retry with backoff
gets a prediction through a flood. (The figures at 4x the knee: python -m loadtest.overload.)"""
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from drawing import draw_digit, png_bytes
from loadtest.servers import torchserve
from loadtest.tuning import ServingConfig
from serving.client import TorchServeClient

pytestmark = pytest.mark.integration  # each module starts its own TorchServe

FLOOD = 48  # requests sent at once, far more than the server below holds


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory):
    """LeNet-5 alone: one worker, batches of 8 filled for up to 300 ms, 4 more requests queued."""
    config = ServingConfig(workers=1, batch_size=8, max_batch_delay_ms=300, job_queue_size=4)
    with torchserve(tmp_path_factory.mktemp("overload"), "mnist_lenet5", config) as ts_config:
        yield TorchServeClient.from_config(ts_config, ts_config.parent / "key_file.json")


def flood(client: TorchServeClient, image: bytes) -> list[tuple[int, float, dict | str]]:
    """FLOOD requests at once -> (status, seconds, body) each."""
    key = client._key("inference")

    def one(_):
        started = time.perf_counter()
        r = requests.post(f"{client.inference_url}/predictions/mnist_lenet5", data=image, timeout=30,
                          headers={"Authorization": f"Bearer {key}"})
        return r.status_code, time.perf_counter() - started, r.json() if r.status_code == 200 else r.text
    with ThreadPoolExecutor(FLOOD) as pool:
        return list(pool.map(one, range(FLOOD)))


def test_past_the_queue_requests_get_a_fast_503_and_the_rest_are_answered(small_queue):
    answers = flood(small_queue, png_bytes(draw_digit(4)))
    assert sorted({status for status, _, _ in answers}) == [200, 503], answers
    accepted = [body for status, _, body in answers if status == 200]
    shed = [(seconds, body) for status, seconds, body in answers if status == 503]
    assert all(body["label"] == "4" for body in accepted)
    assert sorted(s for s, _ in shed)[len(shed) // 2] < 0.1  # refused at once, not after waiting
    assert "has no worker to serve inference request" in shed[0][1]  # TorchServe's words for a full queue


def test_the_client_retries_a_shed_request_with_backoff(small_queue, caplog):
    """A prediction sent into a burst that fills the queue is answered: its 503s are retried."""
    caplog.set_level(logging.INFO, logger="serving.client")
    with ThreadPoolExecutor(1) as pool:
        for _ in range(20):  # until a request of ours lands on a full queue
            crowd = pool.submit(flood, small_queue, png_bytes(draw_digit(4)))
            time.sleep(0.02)
            assert small_queue.predict("mnist_lenet5", png_bytes(draw_digit(7)))["label"] == "7"
            crowd.result()
            if any("503" in r.getMessage() for r in caplog.records):
                break
    assert any("retry" in r.getMessage() for r in caplog.records), "no request of ours was ever shed"
