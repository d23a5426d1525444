"""Keys roll over (serving/keys.py), against the real TorchServe run with keys that expire after
LIFETIME_MIN: clients made before the keys expired keep working after; a key replaced under a client
(TorchServe's token API) costs it one re-read of the key file, REST, gRPC and the load test's Locust
users alike; and stopping the server ends its refresher."""
import csv
import json
import threading
import time
from datetime import datetime

import psutil
import pytest
import requests

from conftest import start_torchserve
from drawing import draw_digit, png_bytes
from catalog import archive_name
from serving import keys, server
from serving.client import ServeError, read_keys, refused_key
from serving.grpc_client import GrpcClient
from test_loadtest import run

pytestmark = pytest.mark.integration  # each module starts its own TorchServe

# TorchServe reads token_expiration_min as a double and keeps whole seconds of it: 15 s keys, which
# the refresher renews 7.5 s before they expire.
LIFETIME_MIN = 0.25
SEVEN = png_bytes(draw_digit(7))


@pytest.fixture(scope="module")
def short_keys(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("keys_ts")
    client = start_torchserve(run_dir, [f"mnist_lenet5={archive_name('mnist_lenet5', '1.0')}"],
                              {"token_expiration_min": LIFETIME_MIN})
    client.grpc = GrpcClient.from_config(run_dir / "config.properties", client.key_file)
    yield client
    server.stop(run_dir)


def expiry(file: dict, kind: str) -> float:
    return datetime.fromisoformat(file[kind]["expiration time"]).timestamp()


def renew(client, kind: str) -> bool:
    """A new `kind` key through TorchServe's token API, as the refresher asks for one."""
    return keys.renew(client.management_url, read_keys(client.key_file)["API"]["key"], kind)


def still_accepted(client, key: str) -> bool:
    response = requests.post(f"{client.inference_url}/predictions/mnist_lenet5", data=SEVEN,
                             headers={"Authorization": f"Bearer {key}"}, timeout=10)
    return not refused_key(response.status_code, response.text)


def test_clients_keep_working_past_the_expiry_of_their_keys(short_keys):
    assert short_keys.predict("mnist_lenet5", SEVEN)["label"] == "7"
    assert short_keys.grpc.predict("mnist_lenet5", SEVEN)["label"] == "7"
    assert short_keys.models() == short_keys.grpc.list_models() == ["mnist_lenet5"]
    first = read_keys(short_keys.key_file)
    # The short lifetime is in force (with TorchServe's default hour this test would prove nothing).
    assert all(expiry(first, kind) - time.time() <= LIFETIME_MIN * 60 for kind in keys.KINDS)
    time.sleep(max(expiry(first, kind) for kind in keys.KINDS) - time.time() + 1)
    assert not still_accepted(short_keys, first["inference"]["key"])  # expired or replaced
    now = read_keys(short_keys.key_file)
    assert all(now[kind]["key"] != first[kind]["key"] and expiry(now, kind) > time.time() for kind in keys.KINDS)
    assert short_keys.predict("mnist_lenet5", SEVEN)["label"] == "7"
    assert short_keys.grpc.predict("mnist_lenet5", SEVEN)["label"] == "7"
    assert short_keys.models() == short_keys.grpc.list_models() == ["mnist_lenet5"]
    log = (short_keys.run_dir / "logs" / "keys.log").read_text()
    assert "renewed the inference key" in log and "renewed the management key" in log


def test_a_key_replaced_under_a_client_is_read_again_once(short_keys):
    assert short_keys.predict("mnist_lenet5", SEVEN)["label"] == "7"
    assert short_keys.grpc.predict("mnist_lenet5", SEVEN)["label"] == "7"
    assert short_keys.models() == short_keys.grpc.list_models() == ["mnist_lenet5"]
    held = {kind: short_keys._key(kind) for kind in keys.KINDS}
    assert {kind: short_keys.grpc._key(kind) for kind in keys.KINDS} == held
    assert all(renew(short_keys, kind) for kind in keys.KINDS)
    renewed = read_keys(short_keys.key_file)
    assert all(0 < expiry(renewed, kind) - time.time() <= LIFETIME_MIN * 60 for kind in keys.KINDS)
    assert not still_accepted(short_keys, held["inference"])  # what the clients hold is refused now
    assert short_keys.predict("mnist_lenet5", SEVEN)["label"] == "7"
    assert short_keys.grpc.predict("mnist_lenet5", SEVEN)["label"] == "7"
    assert short_keys.models() == short_keys.grpc.list_models() == ["mnist_lenet5"]
    for client in (short_keys, short_keys.grpc):
        assert all(client._key(kind) != held[kind] for kind in keys.KINDS)


def test_load_test_users_get_through_keys_renewed_under_them(short_keys, tmp_path):
    """Inference keys replaced every RENEW_S while Locust's REST and gRPC users send: no request fails."""
    RENEW_S = 2
    done, renewals = threading.Event(), []

    def churn():
        while not done.wait(RENEW_S):
            renewals.append(renew(short_keys, "inference"))

    churner = threading.Thread(target=churn)
    churner.start()
    try:  # 100 requests of 2 users 0.1 s apart: at least 4.9 s of load
        code, summary, log = run(short_keys, tmp_path, "--protocol", "both", "--users", "2", "--think-ms", "100",
                                 "--duration", "60", "--max-requests", "100", "--max-error-rate", "0",
                                 "--targets", "mnist_lenet5=1")
    finally:
        done.set()
        churner.join()
    assert code == 0, log[-2000:]
    total = summary["series"]["total"]
    assert total["failures"] == 0 and total["requests"] >= 100, total
    with open(tmp_path / "samples.csv") as f:
        sent = [float(row["t_s"]) for row in csv.DictReader(f)]
    # Renewals ran all along Locust's run, one every RENEW_S: a load this long saw at least one.
    assert max(sent) - min(sent) > RENEW_S and renewals and all(renewals)


def test_a_key_file_caught_mid_rewrite_is_read_again(tmp_path):
    path, content = tmp_path / "key_file.json", {"inference": {"key": "abc"}}
    path.write_text('{\n  "inference": {')  # TorchServe truncates, then writes: a reader can catch this
    threading.Timer(0.02, path.write_text, [json.dumps(content)]).start()
    assert read_keys(path) == content
    path.write_text("")
    with pytest.raises(ServeError, match="not valid JSON"):
        read_keys(path)


def test_stopping_the_server_ends_its_refresher(short_keys):
    """Last in this file: it stops the module's server."""
    refresher = int((short_keys.run_dir / keys.PID_FILE).read_text())
    assert "serving.keys" in psutil.Process(refresher).cmdline()
    assert server.stop(short_keys.run_dir)
    assert not psutil.pid_exists(refresher) and not (short_keys.run_dir / keys.PID_FILE).exists()
