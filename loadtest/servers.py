"""The servers the benchmark and the overload run measure, each started for one measurement and
stopped after it (context managers): TorchServe serving one model alone with a ServingConfig, on free
ports, and the Flask baseline; and the settings they start from (models.yaml `defaults:`,
config.properties, the archives in settings.MODEL_STORE).
"""
import dataclasses
import os
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import requests
import yaml

import catalog
from catalog import archive_name
from loadtest import settings
from loadtest.tuning import ServingConfig
from serving import server
from serving.client import read_properties

BASELINE_START_S = 180  # the Flask app imports torch and loads the models before it answers /ping


def current_config(model: str | None = None) -> ServingConfig:
    """The shipped defaults: models.yaml's `defaults:` and config.properties' Netty threads; with a
    model, its own `serving:` settings and its served default version (`make tune`'s choice on this
    CPU, or models.yaml's)."""
    yaml_settings, props = catalog.load_settings(), read_properties(catalog.TS_CONFIG)
    defaults, serving = yaml_settings["defaults"], catalog.serving_settings(yaml_settings, model)
    config = ServingConfig(serving["maxWorkers"], serving["batchSize"], serving["maxBatchDelay"],
                           defaults["handler"]["threads"], int(props["number_of_netty_threads"]),
                           serving["jobQueueSize"])
    return dataclasses.replace(config, version=catalog.served_defaults(settings.MODEL_STORE)[model]) if model else config


def archived_formats(model: str) -> dict[str, str]:
    """version -> format of every archive of `model` in the store."""
    return {version: entry["format"] for (name, version), entry in catalog.read_manifest(settings.MODEL_STORE).items()
            if name == model and (settings.MODEL_STORE / archive_name(model, version)).exists()}


def write_archive(store: Path, model: str, config: ServingConfig) -> str:
    """A copy of the model's archive whose model-config.yaml carries `config`; -> its file name."""
    source = settings.MODEL_STORE / archive_name(model, config.version)
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(store / source.name, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            if item.filename == "model-config.yaml":
                model_config = yaml.safe_load(data)
                model_config.update(minWorkers=config.workers, maxWorkers=config.workers,
                                    batchSize=config.batch_size, maxBatchDelay=config.max_batch_delay_ms,
                                    jobQueueSize=config.job_queue_size)
                model_config["handler"]["threads"] = config.threads
                data = yaml.safe_dump(model_config, sort_keys=False).encode()
            copy.writestr(item, data)
    return source.name


@contextmanager
def torchserve(run_dir: Path, model: str, config: ServingConfig):
    """TorchServe serving `model` alone with `config`, on free ports; -> its config.properties.
    Stopped on exit."""
    store = run_dir / "store"
    store.mkdir(parents=True)
    mar = write_archive(store, model, config)
    overrides = dict(server.free_ports(), number_of_netty_threads=config.netty_threads,
                     netty_client_threads=config.netty_threads)
    try:
        server.start(run_dir, overrides, models=[f"{model}={mar}"], store=store)
        yield run_dir / "config.properties"
    finally:
        server.stop(run_dir)


@contextmanager
def flask_baseline(models: list[str], threads: int, log: Path):
    """The Flask baseline serving `models` on a free port; -> (its base URL, pid). Terminated on exit."""
    port = server.free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "loadtest.flask_baseline", "--models", *models,
                                    "--port", str(port), "--threads", str(threads)],
                                   cwd=catalog.ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + BASELINE_START_S
        while not _answers(f"{url}/ping"):
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Flask baseline did not start; see {log}")
            time.sleep(0.5)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.ConnectionError:
        return False


@contextmanager
def environment(**values: str | None):
    """os.environ with `values` set (None: unset) inside, as it was after. A TorchServe started inside
    passes them on to its workers (serving/server.py), e.g. PREDICTION_LOG_URL="off": no prediction log."""
    before = {name: os.environ.get(name) for name in values}
    _set(values)
    try:
        yield
    finally:
        _set(before)


def _set(values: dict[str, str | None]):
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
