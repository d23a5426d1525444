"""Start, stop and wait for TorchServe with the project's config.

    python -m serving.server start    # in the background; state in .run/ (pid, logs, key_file.json)
    python -m serving.server stop
    python -m serving.server status

TorchServe keeps its pid file in $TMPDIR and writes key_file.json to its working directory, so each
run folder (.run/ here, a temporary one per test session) is a separate server. Tests start one
on free ports with `start(run_dir, overrides={...})`. Beside each server runs its key refresher
(serving/keys.py: pid in keys.pid, log in logs/keys.log), which renews the keys before they expire.
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

import catalog
from prediction_table import spool_dir_for_run_dir, url_for_run_dir
from serving import keys
from serving.client import TorchServeClient, read_properties

LOG_CONFIG = Path(__file__).resolve().parent / "log4j2.xml"
TORCHSERVE = Path(sys.executable).parent / "torchserve"


def write_config(run_dir: Path, store: Path, overrides: dict | None = None) -> Path:
    """config.properties with `overrides` applied (other ports for tests) and the model store's
    absolute path filled in, written into run_dir."""
    lines, overrides = [], dict(overrides or {})
    for line in catalog.TS_CONFIG.read_text().replace("${MODEL_STORE}", str(Path(store).resolve())).splitlines():
        key = line.split("=", 1)[0].strip()
        lines.append(f"{key}={overrides.pop(key)}" if key in overrides and not line.startswith("#") else line)
    lines += [f"{k}={v}" for k, v in overrides.items()]
    path = run_dir / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports() -> dict:
    """config.properties overrides that put every listener on a free local port, so that a server
    can run beside `make serve` (tests, benchmarks)."""
    return {"inference_address": f"http://127.0.0.1:{free_port()}",
            "management_address": f"http://127.0.0.1:{free_port()}",
            "metrics_address": f"http://127.0.0.1:{free_port()}",
            "grpc_inference_port": free_port(), "grpc_management_port": free_port()}


def startup_models(store: Path | None = None) -> list[str]:
    """`name=archive` for every version the store's manifest marks load_at_start (models.yaml's versions
    without `load: false`, and the default: model_store/archive.py mark_defaults), each model's default
    first (TorchServe makes the first version it loads the default), models in models.yaml's order. The
    others are registered on demand: `python -m serving.modelctl register <archive>`. A model none of
    whose start-up versions is archived (e.g. built without the data sets) starts with its first one."""
    store = Path(store or catalog.STORE)
    archived = [m for m in catalog.read_manifest(store).values() if (store / m["archive"]).exists()]
    models = []
    for model in catalog.load_settings()["models"]:
        entries = sorted((m for m in archived if m["model"] == model), key=lambda m: not m["default"])
        started = [m for m in entries if m["load_at_start"]] or entries[:1]
        models += [f"{model}={m['archive']}" for m in started]
    return models


def _env(run_dir: Path) -> dict:
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # TMPDIR holds TorchServe's pid file; TEMP becomes java.io.tmpdir, where the frontend puts the
    # workers' sockets (.ts.sock.<port>): per run folder, so servers running side by side never meet.
    # The workers inherit this environment: the other PREDICTION_LOG_* settings (retention, sampling,
    # spool size; handlers/prediction_log.py) pass through from the caller's.
    return dict(os.environ, TMPDIR=str(run_dir), TEMP=str(run_dir), LOG_LOCATION=str(logs),
                METRICS_LOCATION=str(logs), PREDICTION_LOG_URL=url_for_run_dir(run_dir),
                PREDICTION_LOG_SPOOL_DIR=spool_dir_for_run_dir(run_dir))


class StartError(RuntimeError):
    """TorchServe cannot start here: the message says why and what to do."""


def check_java():
    """TorchServe 0.12's frontend is a Java 17 program."""
    java = shutil.which("java")
    if java is None:
        raise StartError("TorchServe needs Java 17 and `java` is not on PATH: `make java` installs it "
                         "(apt-get install openjdk-17-jre-headless)")
    version = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    major = re.search(r'version "(\d+)', version)
    if major is None or int(major.group(1)) < 17:
        raise StartError(f"TorchServe needs Java 17 or newer; {java} is {version.splitlines()[0] if version else '?'}")


def listeners(config: Path) -> dict[str, tuple[str, int]]:
    """Every (host, port) TorchServe will bind, by config key."""
    props = read_properties(config)
    found = {key: (urlsplit(props[key]).hostname, urlsplit(props[key]).port)
             for key in ("inference_address", "management_address", "metrics_address")}
    for kind in ("inference", "management"):
        found[f"grpc_{kind}_port"] = (props[f"grpc_{kind}_address"], int(props[f"grpc_{kind}_port"]))
    return found


def check_ports_free(config: Path):
    for key, (host, port) in listeners(config).items():
        if port is None:
            raise StartError(f"{key} in config.properties names no port")
        with socket.socket() as s:
            # As Java's listener binds: connections of a stopped server in TIME_WAIT do not block it,
            # a listening socket does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                raise StartError(f"port {port} on {host} ({key} in config.properties) is already in use: another "
                                 "TorchServe (`make stop`) or another program holds it") from None


def start(run_dir: Path = catalog.RUN_DIR, overrides: dict | None = None, models: list[str] | None = None,
          store: Path | None = None, timeout: float = 240) -> TorchServeClient:
    """Start TorchServe in the background and wait until every model has a ready worker."""
    run_dir, store = Path(run_dir).resolve(), Path(store or catalog.STORE)
    if pid(run_dir) is not None:
        raise StartError(f"TorchServe already runs from {run_dir} (pid {pid(run_dir)}): `make stop` first")
    models = startup_models(store) if models is None else models
    if not models:
        raise StartError(f"no archives in {store}: `make archive` builds them (`make demo` does it all)")
    check_java()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "key_file.json").unlink(missing_ok=True)
    config = write_config(run_dir, store, overrides)
    check_ports_free(config)
    # Not a pipe: the Java frontend it leaves running would hold it open, and this call would never return.
    env = _env(run_dir)  # creates run_dir/logs
    launcher_log = run_dir / "logs" / "torchserve_start.log"
    with open(launcher_log, "w") as err:
        started = subprocess.run([str(TORCHSERVE), "--start", "--ncs", "--ts-config", str(config), "--model-store",
                                  str(store), "--log-config", str(LOG_CONFIG), "--models", *models],
                                 cwd=run_dir, env=env, stdout=subprocess.DEVNULL, stderr=err)
    if started.returncode:
        stop(run_dir)
        raise StartError(f"torchserve --start failed ({launcher_log.read_text().strip()[-300:] or 'no message'}); "
                         f"see {run_dir / 'logs'}")
    server_pid = pid(run_dir)
    if server_pid is None:
        raise StartError(f"TorchServe exited as soon as it started; see {run_dir / 'logs'}")
    keys.start_refresher(run_dir, server_pid)  # now, not once ready: loading models can outlast a short key lifetime
    client = TorchServeClient.from_config(config, run_dir / "key_file.json")
    try:
        wait_ready(client, {m.split("=")[0] for m in models}, timeout, run_dir)
    except StartError:
        stop(run_dir)  # never leave a half-started server behind
        raise
    return client


def wait_ready(client: "TorchServeClient", models: set, timeout: float, run_dir: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if client.ping() and all(client.ready_workers(m) > 0 for m in models):
                return
        except (requests.ConnectionError, FileNotFoundError, KeyError, json.JSONDecodeError):
            pass
        except RuntimeError:
            pass
        time.sleep(0.5)
    raise StartError(f"TorchServe not ready after {timeout:.0f}s; see {run_dir / 'logs'}")


def pid(run_dir: Path = catalog.RUN_DIR) -> int | None:
    path = Path(run_dir) / ".model_server.pid"
    if not path.exists():
        return None
    value = int(path.read_text().strip() or 0)
    if value <= 0:  # os.kill(0, ...) would signal our own process group
        return None
    try:
        os.kill(value, 0)
        return value
    except OSError:
        return None


def stop(run_dir: Path = catalog.RUN_DIR, timeout: float = 60):
    """Stop the frontend; its shutdown ends the Python workers. Waits until the process is gone."""
    run_dir = Path(run_dir).resolve()
    keys.stop_refresher(run_dir)  # first, and also when the server has already gone
    running = pid(run_dir)
    if running is None:
        return False
    subprocess.run([str(TORCHSERVE), "--stop"], cwd=run_dir, env=_env(run_dir), stdout=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while pid(run_dir) is not None and time.time() < deadline:
        time.sleep(0.2)
    if pid(run_dir) is not None:
        os.kill(running, 9)
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop", "status"])
    action = p.parse_args().action
    if action == "start":
        try:
            client = start()
        except StartError as e:
            sys.exit(f"error: {e}")
        props = read_properties(catalog.TS_CONFIG)
        print(f"TorchServe is up: inference {props['inference_address']}, management "
              f"{props['management_address']}, metrics {props['metrics_address']}, gRPC "
              f"{props['grpc_inference_address']}:{props['grpc_inference_port']}")
        print(f"tokens: {catalog.RUN_DIR / 'key_file.json'}; logs: {catalog.RUN_DIR / 'logs'}")
        for model in client.models():
            print(f"  {model}: versions {', '.join(v['modelVersion'] for v in client.describe(model))}")
    elif action == "stop":
        print("TorchServe stopped" if stop() else "TorchServe was not running")
    else:
        print(f"TorchServe runs, pid {pid()}" if pid() else "TorchServe is not running")


if __name__ == "__main__":
    main()
