"""The prediction log: every served prediction recorded once, in SQLite and in a real PostgreSQL;
bounded (retention, sampled input bytes) and durable (a local spool while the database is down)."""
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from PIL import Image

from digit_handler import mnist_style
from drawing import draw_digit, png_bytes
from prediction_log import (INPUT_SAMPLE_RATE, PRUNE_BATCH_ROWS, SPOOL_SUFFIX, PredictionLog, Settings, keeps_input,
                            record_row)
from prediction_table import CONNECT_TIMEOUT_S, PredictionTable, decode_pixels, predictions, url_for_run_dir
from image_handler import cifar_style
from serving import server
from conftest import ROOT, served_default, start_torchserve

LENET = "mnist_lenet5=mnist_lenet5_v1.0.mar"
# No background work in the test process: a test that wants a replay or a prune calls it.
QUIET = dict(max_rows=0, max_age_days=0, retry_s=3600, prune_interval_s=3600)


def send(client, images, tag, version=None):
    """POST each image with X-Client: tag; returns the JSON bodies of the successful answers."""
    def one(image):
        response = requests.post(f"{client.inference_url}/predictions/mnist_lenet5" + (f"/{version}" if version else ""),
                                 data=image, timeout=30,
                                 headers={"Authorization": f"Bearer {client._key('inference')}", "X-Client": tag})
        return response.json() if response.status_code == 200 else None
    with ThreadPoolExecutor(8) as pool:
        return [r for r in pool.map(one, images) if r is not None]


def digit_rows(n: int, prefix: str, created: float | None = None, client: str = "test") -> list[dict]:
    """n rows as the digit handler records them (a drawn digit, its 28x28 pixels), ids prefix-0..n-1."""
    image = draw_digit(7)
    payload, pixels = png_bytes(image), mnist_style(image)
    result = {"label": "7", "index": 7, "confidence": 0.99, "top_k": [{"index": 7, "label": "7", "probability": 0.99}]}
    rows = [record_row(f"{prefix}-{i}", "mnist_lenet5", "1.0", "torchscript", client, payload, pixels, result, 3.0)
            for i in range(n)]
    if created is not None:
        for i, row in enumerate(rows):
            row["created"] = created + i
    return rows


def spooled(spool_dir: Path) -> list[str]:
    """The request ids in every spool file under spool_dir."""
    return [json.loads(line)["request_id"] for path in sorted(spool_dir.glob(f"*{SPOOL_SUFFIX}"))
            for line in path.read_bytes().splitlines()]


def ids(log: PredictionLog, **where) -> list[str]:
    query = sa.select(predictions.c.request_id)
    for column, value in where.items():
        query = query.where(predictions.c[column] == value)
    with log.engine.connect() as connection:
        return list(connection.scalars(query))


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.25)


class PostgresCluster:
    """A real PostgreSQL server on a free port, in a temporary cluster owned by the postgres user
    (PostgreSQL refuses to run as root; pytest's own temporary folders are closed to other users).
    stop() and start() take the same server down and up again, as an outage would."""

    def __init__(self):
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not binaries:
            pytest.fail("PostgreSQL is not installed: `make test` installs it (apt-get install postgresql)")
        self.bin_dir = os.path.dirname(binaries[-1])
        self.dir = Path(tempfile.mkdtemp(prefix="predlog-pg-"))
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.dir, "postgres")
        self.port = server.free_port()
        self.url = self.url_of("postgres")
        subprocess.run(self.as_postgres + [f"{self.bin_dir}/initdb", "-D", str(self.dir / "db"), "--auth=trust",
                                           "-U", "postgres"], check=True, stdout=subprocess.DEVNULL)

    def url_of(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def pg_ctl(self, *args):
        subprocess.run(self.as_postgres + [f"{self.bin_dir}/pg_ctl", "-D", str(self.dir / "db"), "-w", *args],
                       check=True, stdout=subprocess.DEVNULL)

    def start(self):
        self.pg_ctl("-l", str(self.dir / "log"), "start", "-o",
                    f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1")

    def stop(self):
        self.pg_ctl("-m", "fast", "stop")

    def database(self, name: str) -> str:
        """A new, empty database: for tests that prune or measure the whole table."""
        engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url_of(name)


@pytest.fixture(scope="module")
def postgres():
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.dir, ignore_errors=True)


# The tests that start a TorchServe of their own come first: before the session's `torchserve`
# fixture starts, so that two servers do not share the two cores.

def test_a_postgresql_outage_under_load_loses_no_prediction(postgres, tmp_path, monkeypatch):
    """PostgreSQL stopped and started again under a steady load: every request is answered, and
    every answer is in the log exactly once, the ones of the outage written from the spool."""
    monkeypatch.setenv("PREDICTION_LOG_URL", postgres.url)
    monkeypatch.delenv("PREDICTION_LOG_SPOOL_DIR", raising=False)
    client = start_torchserve(tmp_path, models=[LENET])
    tag = f"outage-{uuid.uuid4().hex[:8]}"
    images = [png_bytes(draw_digit(d)) for d in (0, 1, 4, 7)]
    answers, failures, phase, done = [], [], ["before"], threading.Event()

    def user(k):
        with requests.Session() as session:
            for i in range(k, 10 ** 6, 3):
                if done.is_set():
                    return
                current = phase[0]
                try:
                    response = session.post(f"{client.inference_url}/predictions/mnist_lenet5", data=images[i % 4],
                                            timeout=30, headers={"Authorization": f"Bearer {client._key('inference')}",
                                                                 "X-Client": tag})
                except requests.RequestException as e:
                    failures.append((current, repr(e)))
                    continue
                if response.status_code == 200:
                    answers.append((current, response.json()["request_id"]))
                else:
                    failures.append((current, response.status_code, response.text[:200]))

    try:
        with ThreadPoolExecutor(3) as pool:
            users = [pool.submit(user, k) for k in range(3)]
            try:
                time.sleep(3)
                phase[0] = "down"
                postgres.stop()
                time.sleep(4)
                phase[0] = "restarting"
                postgres.start()
                phase[0] = "up"
                time.sleep(7)  # past the workers' retry (RETRY_S) and the spool's replay
            finally:
                done.set()
                if phase[0] == "down":  # failed mid-outage: the other tests need the server
                    postgres.start()
            for u in users:
                u.result()
        assert not failures, failures[:5]
        assert {p for p, _ in answers} >= {"before", "down", "up"}, "the load did not span the outage"
        log = PredictionTable(postgres.url)
        wait_for(lambda: log.count(client=tag) >= len(answers), 30, "every answer in the log")
        recorded = ids(log, client=tag)
        assert len(recorded) == len(answers) and sorted(recorded) == sorted(r for _, r in answers)
        model_log = (tmp_path / "logs" / "model_log.log").read_text()
        assert "rows go to the spool" in model_log and "spooled rows written to the database" in model_log
        assert not spooled(tmp_path / "spool")  # all written back; the workers' emptied files remain
    finally:
        server.stop(tmp_path)


@pytest.mark.integration
def test_retention_and_input_sampling_while_serving(tmp_path, monkeypatch):
    """A server with small limits: rows past the age limit go although the table is under its row
    limit, then the oldest rows beyond the row limit go; a quarter of the rows keep their upload."""
    monkeypatch.delenv("PREDICTION_LOG_URL", raising=False)
    for name, value in dict(MAX_ROWS=60, MAX_AGE_DAYS=1, PRUNE_INTERVAL_S=0.5, INPUT_SAMPLE_RATE=0.25).items():
        monkeypatch.setenv(f"PREDICTION_LOG_{name}", str(value))
    log = PredictionTable(url_for_run_dir(tmp_path))  # the server's SQLite file, made before it starts
    with log.engine.begin() as connection:
        connection.execute(predictions.insert(), digit_rows(10, "stale", time.time() - 2 * 86400, client="stale")
                           + digit_rows(10, "hour", time.time() - 3600, client="hour"))
    client = start_torchserve(tmp_path, models=[LENET])
    try:
        first = send(client, [png_bytes(draw_digit(d)) for d in (0, 1, 4, 7)] * 8, "first")
        assert len(first) == 32
        wait_for(lambda: log.count(client="stale") == 0, 20, "rows past the age limit deleted")
        assert (log.count(client="hour"), log.count(client="first"), log.count()) == (10, 32, 42)

        images = [png_bytes(draw_digit(d, width=w)) for d in (0, 1, 4, 7) for w in (10, 14, 18, 24, 30)] * 3
        second = send(client, images, "second")
        assert len(second) == 60
        wait_for(lambda: log.count() <= 60, 20, "the table cut to its row limit")
        time.sleep(1.5)  # more prunes: they must leave the newest 60 alone
        rows = {r["request_id"]: r for r in log.recent(limit=500)}
        assert set(rows) == {a["request_id"] for a in second}  # the newest 60: older clients' rows all gone

        kept = [r for r in rows.values() if r["input_bytes"] is not None]
        assert {r["request_id"] for r in kept} == {i for i in rows if keeps_input(i, 0.25)} and 0 < len(kept) < 60
        for row in rows.values():  # metadata and what the model saw are kept for every row
            assert decode_pixels(row).shape == (28, 28) and row["input_size"] > 0 and len(row["input_sha256"]) == 64
        assert all(hashlib.sha256(r["input_bytes"]).hexdigest() == r["input_sha256"] and r["input_bytes"] in images
                   for r in kept)
    finally:
        server.stop(tmp_path)


def test_predictions_are_recorded_in_postgresql(postgres, tmp_path, monkeypatch):
    monkeypatch.setenv("PREDICTION_LOG_URL", postgres.url)
    client = start_torchserve(tmp_path, models=[LENET])
    try:
        tag = f"test-{uuid.uuid4().hex[:8]}"
        answered = send(client, [png_bytes(draw_digit(d)) for d in (0, 1, 4, 7)] * 10, tag)
    finally:
        server.stop(tmp_path)
    log = PredictionTable(postgres.url)
    assert log.engine.dialect.name == "postgresql"
    assert len(answered) == 40 and log.count(client=tag) == 40
    assert not (tmp_path / "predictions.db").exists()


@pytest.mark.integration
def test_nothing_is_lost_on_a_clean_shutdown(tmp_path):
    """Answers given right before `stop` are in the log after it."""
    client = start_torchserve(tmp_path, models=[LENET])
    tag = f"test-{uuid.uuid4().hex[:8]}"
    try:
        answered = send(client, [png_bytes(draw_digit(4))] * 50, tag)
    finally:
        started = time.time()
        server.stop(tmp_path)
    assert time.time() - started < 60
    assert PredictionTable(url_for_run_dir(tmp_path)).count(client=tag) == len(answered) == 50


def test_every_successful_prediction_is_recorded_once(torchserve):
    log = PredictionTable(url_for_run_dir(torchserve.run_dir))
    tag = f"test-{uuid.uuid4().hex[:8]}"
    good = [png_bytes(draw_digit(d)) for d in (0, 1, 4, 7)] * 25
    bad = [b"not an image"] * 10
    default = served_default("mnist_lenet5")
    other = "1.0" if default != "1.0" else "1.1"  # both loaded at start
    answered = send(torchserve, good + bad, tag) + send(torchserve, good[:20], tag, version=other)
    assert len(answered) == 120
    assert log.count(client=tag) == 120  # rows == successful responses; refused requests are not predictions
    rows = {r["request_id"]: r for r in log.recent(limit=500, client=tag)}
    assert set(rows) == {a["request_id"] for a in answered}
    row = rows[answered[0]["request_id"]]
    assert (row["label"], row["confidence"], row["version"]) == (answered[0]["label"], answered[0]["confidence"],
                                                                 answered[0]["version"])
    assert len(row["input_sha256"]) == 64 and row["latency_ms"] > 0
    assert decode_pixels(row).shape == (28, 28)
    assert {r["version"] for r in rows.values()} == {default, other} and row["top_k"][0]["label"] == row["label"]
    rate = Settings.from_env().input_sample_rate  # what the server was started with
    assert all((r["input_bytes"] is not None) == keeps_input(r["request_id"], rate) for r in rows.values())
    assert all(r["input_bytes"] in good for r in rows.values() if r["input_bytes"] is not None)


def test_a_user_correction_is_kept_and_exported(torchserve, tmp_path):
    from serving.corrections import export_corrections
    log = PredictionTable(url_for_run_dir(torchserve.run_dir))
    tag = f"test-{uuid.uuid4().hex[:8]}"
    (answer,) = send(torchserve, [png_bytes(draw_digit(7))], tag)
    assert log.correct(answer["request_id"], "1")
    assert not log.correct("no-such-request", "1")
    images, labels = export_corrections(log, "mnist_lenet5", tmp_path)
    assert answer["request_id"] in {r["request_id"] for r in log.corrections("mnist_lenet5")}
    assert images.shape[1:] == (28, 28) and "1" in labels.astype(str).tolist()
    assert (tmp_path / "corrections.npz").exists() and list((tmp_path / "1").glob("*.png"))


def test_cli_and_grpc_predictions_are_recorded_with_their_client(torchserve, tmp_path, monkeypatch, capsys):
    from serving import modelctl
    from serving.grpc_client import GrpcClient
    log = PredictionTable(url_for_run_dir(torchserve.run_dir))
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


# In-process: the log's parts on real SQLite and PostgreSQL databases.

def seed(url: str, n: int, stale: int) -> list[str]:
    """n rows a second apart ending now, the oldest `stale` of them 40 days old; their ids, oldest first."""
    log = PredictionTable(url)
    rows = digit_rows(n, "seed", time.time() - n)
    for row in rows[:stale]:
        row["created"] -= 40 * 86400
    with log.engine.begin() as connection:
        connection.execute(predictions.insert(), rows)
    log.engine.dispose()
    return [r["request_id"] for r in rows]


def test_prune_deletes_past_the_age_limit_then_the_oldest_past_the_row_limit(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    order = seed(url, 3 * PRUNE_BATCH_ROWS + 500, stale=500)
    by_age = PredictionLog(url, Settings(**dict(QUIET, max_age_days=30)))
    assert by_age.prune() == 500 and by_age.prune() == 0
    by_count = PredictionLog(url, Settings(**dict(QUIET, max_rows=1000)))
    assert by_count.prune() == 3 * PRUNE_BATCH_ROWS - 1000  # several batches
    assert by_count.prune() == 0 and sorted(ids(by_count)) == sorted(order[-1000:])


def test_workers_pruning_postgresql_at_once_delete_each_row_once(postgres):
    url = postgres.database("prune_together")
    order = seed(url, 6 * PRUNE_BATCH_ROWS, stale=0)
    logs = [PredictionLog(url, Settings(**dict(QUIET, max_rows=1000))) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        deleted = list(pool.map(PredictionLog.prune, logs))
    assert sum(deleted) == 6 * PRUNE_BATCH_ROWS - 1000 and sorted(ids(logs[0])) == sorted(order[-1000:])


def test_input_bytes_are_kept_for_a_sample_chosen_by_request_id(tmp_path):
    request_ids = [str(uuid.UUID(int=i)) for i in range(4000)]
    assert 0.22 < sum(keeps_input(i, 0.25) for i in request_ids) / 4000 < 0.28
    assert not any(keeps_input(i, 0) for i in request_ids) and all(keeps_input(i, 1) for i in request_ids)
    log = PredictionLog(f"sqlite:///{tmp_path / 'p.db'}", Settings(**dict(QUIET, input_sample_rate=0.25)))
    rows = digit_rows(400, "sample")
    for start in range(0, 400, 8):
        log.record(rows[start:start + 8])
    stored = {r["request_id"]: r for r in log.recent(limit=1000)}
    assert len(stored) == 400
    kept = {i for i, r in stored.items() if r["input_bytes"] is not None}
    assert kept == {r["request_id"] for r in rows if keeps_input(r["request_id"], 0.25)} and 60 < len(kept) < 140
    assert all(stored[i]["input_bytes"] == rows[0]["input_bytes"] for i in kept)
    assert all(r["input_sha256"] == rows[0]["input_sha256"] and r["input_size"] == rows[0]["input_size"]
               and decode_pixels(r).shape == (28, 28) for r in stored.values())


def test_rows_are_spooled_while_sqlite_cannot_be_opened_and_written_once_it_can(tmp_path):
    folder = tmp_path / "not-yet"  # SQLite cannot create a file in a missing folder: "unable to open"
    log = PredictionLog(f"sqlite:///{folder / 'p.db'}", Settings(**dict(QUIET, spool_dir=str(tmp_path / "spool"),
                                                                         input_sample_rate=1)))
    rows = digit_rows(40, "down")
    for start in range(0, 40, 8):
        log.record(rows[start:start + 8])  # no exception: the rows are on disk
    assert spooled(tmp_path / "spool") == [r["request_id"] for r in rows]
    with pytest.raises(sa.exc.OperationalError):
        log.replay_spool()  # still unavailable: nothing is lost
    folder.mkdir()
    assert log.replay_spool() == 40 and log.replay_spool() == 0 and not spooled(tmp_path / "spool")
    stored = {r["request_id"]: r for r in log.recent(limit=100)}
    for row in rows:  # bytes, floats and top-k come back exactly
        assert {k: stored[row["request_id"]][k] for k in row} == row
    log.spool.append(rows[:8])  # a batch whose commit failed after it reached the database
    assert log.replay_spool() == 8 and log.count() == 40  # written once: ON CONFLICT DO NOTHING


def test_a_stopped_workers_spool_is_written_by_the_next_worker_and_a_live_ones_is_left_alone(tmp_path):
    folder, spool = tmp_path / "db", tmp_path / "spool"
    url, settings = f"sqlite:///{folder / 'p.db'}", Settings(**dict(QUIET, spool_dir=str(spool)))
    child = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import catalog  # puts handlers/ on sys.path
import numpy as np
from prediction_log import PredictionLog, Settings, record_row
result = {{"label": "7", "index": 7, "confidence": 0.9, "top_k": []}}
log = PredictionLog({url!r}, Settings(**{dict(QUIET, spool_dir=str(spool))!r}))
for prefix in ("stopped", "stopped-again"):
    log.record([record_row(f"{{prefix}}-{{i}}", "mnist_lenet5", "1.0", "torchscript", "test", b"png",
                           np.zeros((28, 28), np.uint8), result, 1.0) for i in range(8)])
"""
    subprocess.run([sys.executable, "-c", child], check=True, cwd=ROOT, timeout=120)  # spools 16 rows and exits
    alive = PredictionLog(url, settings)
    alive.record(digit_rows(8, "alive"))  # its spool file stays locked while it lives
    assert len(spooled(spool)) == 24
    folder.mkdir()
    nxt = PredictionLog(url, settings)
    with nxt.engine.begin() as connection:  # one of them reached the database before its worker's failure
        connection.execute(predictions.insert(), digit_rows(1, "stopped"))
    nxt.record(digit_rows(8, "next"))
    assert nxt.replay_spool() == 16
    assert nxt.count() == 1 + 16 - 1 + 8 and sorted(spooled(spool)) == [f"alive-{i}" for i in range(8)]
    assert alive.replay_spool() == 8 and nxt.count() == 32 and not spooled(spool)


def test_the_spool_is_bounded_dropping_its_oldest_rows(tmp_path, caplog):
    folder, spool = tmp_path / "db", tmp_path / "spool"
    log = PredictionLog(f"sqlite:///{folder / 'p.db'}",
                        Settings(**dict(QUIET, spool_dir=str(spool), spool_max_mb=20_000 / 2 ** 20, input_sample_rate=0)))
    rows = digit_rows(100, "bounded")
    with caplog.at_level(logging.WARNING):
        for start in range(0, 100, 4):
            log.record(rows[start:start + 4])
            assert log.spool.path.stat().st_size <= 20_000 + 4 * 1500  # the limit plus one batch
    assert log.spool.dropped > 0 and "reached its limit" in caplog.text
    folder.mkdir()
    assert log.replay_spool() == 100 - log.spool.dropped
    assert sorted(ids(log)) == sorted(r["request_id"] for r in rows[log.spool.dropped:])  # the newest are kept


def test_a_database_that_does_not_answer_costs_one_connect_timeout_not_one_per_batch(tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/postgres"
        log = PredictionLog(url, Settings(**dict(QUIET, spool_dir=str(tmp_path / "spool"))))
        rows = digit_rows(84, "silent")
        started = time.monotonic()
        log.record(rows[:4])
        first = time.monotonic() - started
        started = time.monotonic()
        for start in range(4, 84, 4):
            log.record(rows[start:start + 4])
        rest = time.monotonic() - started
    assert first < CONNECT_TIMEOUT_S + 3 and rest < 0.5, (first, rest)
    assert spooled(tmp_path / "spool") == [r["request_id"] for r in rows]


def test_bad_settings_are_refused_with_the_variable_named():
    assert Settings.from_env({"PREDICTION_LOG_MAX_ROWS": "500", "PREDICTION_LOG_INPUT_SAMPLE_RATE": "0.5"}) == \
        Settings(max_rows=500, input_sample_rate=0.5)
    for name, value in (("MAX_ROWS", "many"), ("MAX_AGE_DAYS", "-1"), ("INPUT_SAMPLE_RATE", "2"),
                        ("RETRY_S", "0"), ("SPOOL_MAX_MB", "nan")):
        with pytest.raises(ValueError, match=f"PREDICTION_LOG_{name}"):
            Settings.from_env({f"PREDICTION_LOG_{name}": value})


# Bytes per row, as the module docstring and the README quote them (measured 2026-12-01).
DOCUMENTED_BYTES_PER_ROW = {
    ("sqlite", "digits", 1.0): 3967, ("sqlite", "digits", INPUT_SAMPLE_RATE): 1642,
    ("sqlite", "cifar", 1.0): 6148, ("sqlite", "cifar", INPUT_SAMPLE_RATE): 4571,
    ("postgresql", "digits", 1.0): 2261, ("postgresql", "digits", INPUT_SAMPLE_RATE): 1434,
    ("postgresql", "cifar", 1.0): 6402, ("postgresql", "cifar", INPUT_SAMPLE_RATE): 4624,
}


@pytest.fixture(scope="module")
def uploads(request):
    """2,000 (upload, pixels) of each kind: canvas drawings (280x280 RGBA PNG, as the UI posts
    them) and CIFAR-10 test images as 32x32 PNG."""
    drawings = [draw_digit(d, width=w, box=(x, y, 160 + 10 * w // 6, 180)) for d in (0, 1, 4, 7)
                for w in (8, 12, 16, 20, 26) for x, y in ((20, 20), (60, 40), (40, 70))]
    kinds = {"digits": [(png_bytes(im), mnist_style(im)) for im in drawings]}
    try:
        images, _ = request.getfixturevalue("cifar_test")
    except pytest.skip.Exception:  # no data set: the digits alone
        return {"digits": [kinds["digits"][i % len(kinds["digits"])] for i in range(2000)]}
    kinds["cifar"] = [(png_bytes(im), cifar_style(im)) for im in map(Image.fromarray, images[:2000])]
    return {kind: [pairs[i % len(pairs)] for i in range(2000)] for kind, pairs in kinds.items()}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_bytes_per_row_match_the_documented_figures(backend, uploads, postgres, tmp_path):
    measured = {}
    for kind, pairs in uploads.items():
        for rate in (1.0, INPUT_SAMPLE_RATE):
            name = f"size_{kind}_{int(rate * 100)}"
            url = postgres.database(name) if backend == "postgresql" else f"sqlite:///{tmp_path / name}.db"
            log = PredictionLog(url, Settings(**dict(QUIET, input_sample_rate=rate)))
            labels = ("7", "1", "4")
            rows = [record_row(str(uuid.UUID(int=i)), "mnist_lenet5" if kind == "digits" else "cifar10_resnet18",
                               "1.0", "torchscript", "ui", payload, pixels,
                               {"label": "7", "index": 7, "confidence": 0.93,
                                "top_k": [{"index": int(x), "label": x, "probability": 0.93 / (j + 1)}
                                          for j, x in enumerate(labels)]}, 4.2)
                    for i, (payload, pixels) in enumerate(pairs)]
            for start in range(0, len(rows), 8):
                log.record(rows[start:start + 8])
            with log.engine.connect() as connection:
                if backend == "sqlite":
                    connection.exec_driver_sql("VACUUM")
                    connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                    size = os.path.getsize(tmp_path / f"{name}.db")
                else:
                    size = connection.execute(sa.text("SELECT pg_total_relation_size('predictions')")).scalar_one()
            measured[(backend, kind, rate)] = round(size / len(rows))
    print("\nbytes per row:", {f"{k[1]}@{k[2]}": v for k, v in measured.items()})
    for key, value in measured.items():
        assert abs(value - DOCUMENTED_BYTES_PER_ROW[key]) <= 0.1 * DOCUMENTED_BYTES_PER_ROW[key], (key, value)
