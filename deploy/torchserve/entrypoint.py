"""The server image's entrypoint: TorchServe configured from the environment, in the foreground.

    TS_MODEL_STORE      the archives (default /models: the ones built into the image, read-only)
    TS_MODELS           name=archive,... to load (default: the start-up set of the store's manifest.json,
                        each model's default version first, as serving/server.py starts them)
    TS_WORKERS          workers per loaded version (default: what each archive's model-config.yaml says)
    TS_BIND             listen address (default 127.0.0.1; 0.0.0.0 only with TS_TOKEN_AUTH=on)
    TS_INFERENCE_PORT, TS_MANAGEMENT_PORT, TS_METRICS_PORT, TS_GRPC_INFERENCE_PORT,
    TS_GRPC_MANAGEMENT_PORT   (8080, 8081, 8082, 7070, 7071)
    TS_TOKEN_AUTH       on (default: TorchServe's own random keys in ~/key_file.json) or off (behind a
                        proxy that checks the keys, on a private network: deploy/compose.yaml)
    TS_JAVA_HEAP        the frontend's fixed Java heap (1g; the container's memory limit needs ~1.5x it
                        for the frontend, plus the workers)
    PREDICTION_LOG_URL and the other PREDICTION_LOG_* variables reach the handlers unchanged
                        (handlers/prediction_log.py; default here: off).

    python3 entrypoint.py              # start TorchServe; SIGTERM stops it cleanly
    python3 entrypoint.py healthcheck  # exit 0 when /ping answers Healthy (the image's HEALTHCHECK)
    python3 entrypoint.py live         # exit 0 when the frontend answers /ping at all, whatever the
                                       # workers do (Kubernetes' liveness: TorchServe restarts a
                                       # crashed worker itself, so a restarting one is no reason to
                                       # restart the container and every model with it)
    python3 entrypoint.py ready        # exit 0 when /ping answers Healthy AND every loaded version
                                       # has a READY worker (Kubernetes' readiness: deploy/k8s/)
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DEFAULTS = {"TS_MODEL_STORE": "/models", "TS_BIND": "127.0.0.1", "TS_INFERENCE_PORT": "8080",
            "TS_MANAGEMENT_PORT": "8081", "TS_METRICS_PORT": "8082", "TS_GRPC_INFERENCE_PORT": "7070",
            "TS_GRPC_MANAGEMENT_PORT": "7071", "TS_TOKEN_AUTH": "on", "TS_JAVA_HEAP": "1g"}


def setting(name: str) -> str:
    return os.environ.get(name, "").strip() or DEFAULTS[name]


def startup_models(store: Path) -> list[str]:
    """What serving/server.py loads at start, from the manifest `make archive` wrote: per model, the
    versions marked load_at_start, the default first (TorchServe makes the first one it loads the
    default), or the first archived version when none is."""
    entries = json.loads((store / "manifest.json").read_text())
    models: dict[str, list[dict]] = {}
    for entry in entries:
        models.setdefault(entry["model"], []).append(entry)
    names = []
    for model, versions in models.items():
        versions.sort(key=lambda e: not e["default"])
        started = [e for e in versions if e["load_at_start"]] or versions[:1]
        names += [f"{model}={e['archive']}" for e in started]
    return names


def with_workers(store: Path, models: list[str], workers: int) -> Path:
    """A store holding copies of the loaded archives with `workers` workers each: TorchServe 0.12 takes
    an archive's model-config.yaml over any server-wide setting, so the copies are rewritten."""
    out = Path(tempfile.mkdtemp(prefix="store-"))
    for spec in models:
        archive = spec.split("=", 1)[1]
        with zipfile.ZipFile(store / archive) as src, zipfile.ZipFile(out / archive, "w") as dst:
            for item in src.infolist():
                data = src.read(item)
                if item.filename == "model-config.yaml":
                    config = yaml.safe_load(data) or {}
                    config["minWorkers"] = config["maxWorkers"] = workers
                    data = yaml.safe_dump(config, sort_keys=False).encode()
                dst.writestr(item, data)
    return out


def write_config(path: Path) -> Path:
    auth = setting("TS_TOKEN_AUTH").lower()
    if auth not in ("on", "off"):
        sys.exit(f"TS_TOKEN_AUTH={auth!r}: on or off")
    if auth == "off" and setting("TS_BIND") not in ("127.0.0.1", "localhost"):
        sys.exit("TS_TOKEN_AUTH=off listens on 127.0.0.1 only (TS_BIND): without keys, anything that "
                 "reaches the listeners could use them")
    values = {name: setting(name) for name in DEFAULTS} | {"TS_DISABLE_TOKEN_AUTH": str(auth == "off").lower()}
    text = (HERE / "config.properties").read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    path.write_text(text)
    return path


def _get(api: str, path: str):
    """GET a TorchServe API on this container's loopback, with TorchServe's own key when it made one."""
    port = setting("TS_INFERENCE_PORT" if api == "inference" else "TS_MANAGEMENT_PORT")
    headers = {}
    key_file = Path.home() / "key_file.json"
    if setting("TS_TOKEN_AUTH") == "on" and key_file.exists():
        headers["Authorization"] = "Bearer " + json.loads(key_file.read_text())[api]["key"]
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=4) as response:
        return json.load(response)


def ping_status() -> str | None:
    try:
        return _get("inference", "/ping").get("status")
    except (urllib.error.URLError, OSError, ValueError, KeyError, AttributeError):
        return None


def healthcheck() -> int:
    return 0 if ping_status() == "Healthy" else 1


def live() -> int:
    return 0 if ping_status() is not None else 1


def not_ready() -> list[str]:
    """The loaded versions without a READY worker (/ping alone is no per-version check)."""
    found = []
    models = _get("management", "/models?limit=1000").get("models", [])
    if not models:
        return ["no model is loaded"]
    for model in models:
        for version in _get("management", f"/models/{model['modelName']}/all"):
            if not any(w.get("status") == "READY" for w in version.get("workers", [])):
                found.append(f"{version['modelName']} {version['modelVersion']}")
    return found


def ready() -> int:
    status = ping_status()
    if status != "Healthy":
        print(f"/ping: {status or 'no answer'}")
        return 1
    try:
        waiting = not_ready()
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"management API: {e}")
        return 1
    if waiting:
        print(f"no READY worker: {', '.join(waiting)}")
    return 1 if waiting else 0


def main() -> int:
    checks = {"healthcheck": healthcheck, "live": live, "ready": ready}
    if len(sys.argv) == 2 and sys.argv[1] in checks:
        return checks[sys.argv[1]]()
    store = Path(setting("TS_MODEL_STORE"))
    models = [m.strip() for m in os.environ.get("TS_MODELS", "").split(",") if m.strip()] or startup_models(store)
    if os.environ.get("TS_WORKERS", "").strip():
        store = with_workers(store, models, int(os.environ["TS_WORKERS"]))
    home = Path.home()
    config = write_config(home / "config.properties")
    env = dict(os.environ, TEMP=str(home), TMPDIR=str(home), LOG_LOCATION=str(home / "logs"),
               METRICS_LOCATION=str(home / "logs"))
    env.setdefault("PREDICTION_LOG_URL", "off")
    env.setdefault("PREDICTION_LOG_SPOOL_DIR", str(home / "spool"))
    print(f"TorchServe: {', '.join(models)} from {store}; listeners on {setting('TS_BIND')}, "
          f"token authorization {setting('TS_TOKEN_AUTH')}", flush=True)
    launcher = subprocess.Popen(["torchserve", "--start", "--foreground", "--ncs", "--ts-config", str(config),
                                 "--model-store", str(store), "--log-config", str(HERE / "log4j2.xml"),
                                 "--models", *models], cwd=home, env=env)

    def stop(signum, _frame):
        # The launcher does not pass signals on to the Java frontend; `torchserve --stop` does, and
        # the frontend's shutdown ends its workers.
        subprocess.run(["torchserve", "--stop"], cwd=home, env=env, stdout=subprocess.DEVNULL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return launcher.wait()


if __name__ == "__main__":
    sys.exit(main())
