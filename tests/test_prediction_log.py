"""The prediction log: every served prediction recorded once, in SQLite and in a real PostgreSQL."""
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from drawing import draw_digit, png_bytes
from handlers.prediction_log import PredictionLog, decode_pixels, url_for_run_dir
from serving import server
from tests.conftest import start_torchserve


def send(client, images, tag, version=None):
    """POST each image with X-Client: tag; returns the JSON bodies of the successful answers."""
    def one(image):
        response = requests.post(f"{client.inference_url}/predictions/mnist_lenet5" + (f"/{version}" if version else ""),
                                 data=image, timeout=30,
                                 headers={"Authorization": f"Bearer {client._key('inference')}", "X-Client": tag})
        return response.json() if response.status_code == 200 else None
    with ThreadPoolExecutor(8) as pool:
        return [r for r in pool.map(one, images) if r is not None]


def test_every_successful_prediction_is_recorded_once(torchserve):
    log = PredictionLog(url_for_run_dir(torchserve.run_dir))
    tag = f"test-{uuid.uuid4().hex[:8]}"
    good = [png_bytes(draw_digit(d)) for d in (0, 1, 4, 7)] * 25
    bad = [b"not an image"] * 10
    answered = send(torchserve, good + bad, tag) + send(torchserve, good[:20], tag, version="1.1")
    assert len(answered) == 120
    assert log.count(client=tag) == 120  # rows == successful responses; refused requests are not predictions
    rows = {r["request_id"]: r for r in log.recent(limit=500, client=tag)}
    assert set(rows) == {a["request_id"] for a in answered}
    row = rows[answered[0]["request_id"]]
    assert (row["label"], row["confidence"], row["version"]) == (answered[0]["label"], answered[0]["confidence"],
                                                                 answered[0]["version"])
    assert row["input_bytes"] in good and len(row["input_sha256"]) == 64 and row["latency_ms"] > 0
    assert decode_pixels(row).shape == (28, 28)
    assert {r["version"] for r in rows.values()} == {"1.0", "1.1"} and row["top_k"][0]["label"] == row["label"]


def test_a_user_correction_is_kept_and_exported(torchserve, tmp_path):
    from serving.corrections import export_corrections
    log = PredictionLog(url_for_run_dir(torchserve.run_dir))
    tag = f"test-{uuid.uuid4().hex[:8]}"
    (answer,) = send(torchserve, [png_bytes(draw_digit(7))], tag)
    assert log.correct(answer["request_id"], "1")
    assert not log.correct("no-such-request", "1")
    images, labels = export_corrections(log, "mnist_lenet5", tmp_path)
    assert answer["request_id"] in {r["request_id"] for r in log.corrections("mnist_lenet5")}
    assert images.shape[1:] == (28, 28) and "1" in labels.astype(str).tolist()
    assert (tmp_path / "corrections.npz").exists() and list((tmp_path / "1").glob("*.png"))


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server on a free port, in a temporary cluster owned by the postgres user
    (PostgreSQL refuses to run as root; pytest's own temporary folders are closed to other users)."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not binaries:
        pytest.fail("PostgreSQL is not installed: `make test` installs it (apt-get install postgresql)")
    bin_dir = os.path.dirname(binaries[-1])
    data = Path(tempfile.mkdtemp(prefix="predlog-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(data, "postgres")
    port = server.free_port()
    subprocess.run(as_postgres + [f"{bin_dir}/initdb", "-D", str(data / "db"), "--auth=trust", "-U", "postgres"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(as_postgres + [f"{bin_dir}/pg_ctl", "-D", str(data / "db"), "-l", str(data / "log"), "-w", "start",
                                  "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL)
    yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    subprocess.run(as_postgres + [f"{bin_dir}/pg_ctl", "-D", str(data / "db"), "-m", "fast", "stop"],
                   stdout=subprocess.DEVNULL)
    shutil.rmtree(data, ignore_errors=True)


def test_predictions_are_recorded_in_postgresql(postgres, tmp_path, monkeypatch):
    monkeypatch.setenv("PREDICTION_LOG_URL", postgres)
    client = start_torchserve(tmp_path, models=["mnist_lenet5=mnist_lenet5_v1.0.mar"])
    try:
        tag = f"test-{uuid.uuid4().hex[:8]}"
        answered = send(client, [png_bytes(draw_digit(d)) for d in (0, 1, 4, 7)] * 10, tag)
    finally:
        server.stop(tmp_path)
    log = PredictionLog(postgres)
    assert log.engine.dialect.name == "postgresql"
    assert len(answered) == 40 and log.count(client=tag) == 40
    assert not (tmp_path / "predictions.db").exists()


def test_nothing_is_lost_on_a_clean_shutdown(tmp_path):
    """Answers given right before `stop` are in the log after it."""
    client = start_torchserve(tmp_path, models=["mnist_lenet5=mnist_lenet5_v1.0.mar"])
    tag = f"test-{uuid.uuid4().hex[:8]}"
    try:
        answered = send(client, [png_bytes(draw_digit(4))] * 50, tag)
    finally:
        started = time.time()
        server.stop(tmp_path)
    assert time.time() - started < 60
    assert PredictionLog(url_for_run_dir(tmp_path)).count(client=tag) == len(answered) == 50


def test_cli_and_grpc_predictions_are_recorded_with_their_client(torchserve, tmp_path, monkeypatch, capsys):
    from serving import modelctl
    from serving.grpc_client import GrpcClient
    log = PredictionLog(url_for_run_dir(torchserve.run_dir))
    before = {name: log.count(client=name) for name in ("cli", "grpc-test")}
    (tmp_path / "seven.png").write_bytes(png_bytes(draw_digit(7)))
    monkeypatch.setenv("TS_INFERENCE_URL", torchserve.inference_url)
    monkeypatch.setenv("TS_MANAGEMENT_URL", torchserve.management_url)
    assert modelctl.main(["--json", "--key-file", str(torchserve.key_file), "predict", "mnist_lenet5",
                          str(tmp_path / "seven.png")]) == 0
    assert json.loads(capsys.readouterr().out)["index"] == 7
    grpc = GrpcClient.from_config(torchserve.run_dir / "config.properties", torchserve.key_file, client_name="grpc-test")
    assert grpc.predict("mnist_lenet5", png_bytes(draw_digit(1)))["index"] == 1
    assert log.count(client="cli") == before["cli"] + 1 and log.count(client="grpc-test") == before["grpc-test"] + 1
