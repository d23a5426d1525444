"""Renders nginx.conf from the template, the replicas and the keys, then runs nginx in the foreground.

    NGINX_PORT     where nginx listens (8088)
    TS_REPLICAS    name=host:inference_port:management_port:metrics_port,... (the compose file's replicas;
                   a Kubernetes pod's sidecar names its own TorchServe alone:
                   torchserve=127.0.0.1:8080:8081:8082, deploy/k8s/base/deployment.yaml)
    TS_KEY_FILE    the mounted secret (/run/secrets/ts_keys): {"inference": {"key": ...}, "management":
                   {"key": ...}}, TorchServe's key_file.json layout; "previous": [...] beside "key"
                   lists keys still accepted while clients move to a new one.
    NGINX_RUN_DIR  the rendered nginx.conf (0600: it holds the keys), pid and temporary files
                   (/tmp/nginx: a read-only root file system needs /tmp writable)

    python3 entrypoint.py reload   # after the secret changed: render again and reload nginx
    python3 entrypoint.py test     # render and check the result with `nginx -t`; start nothing
    python3 entrypoint.py quit     # graceful stop (a Kubernetes preStop hook): NGINX_DRAIN_S (5) s
                                   # more of serving while endpoints drop the pod, then in-flight
                                   # requests finish and nginx exits
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN = Path(os.environ.get("NGINX_RUN_DIR", "/tmp/nginx"))
KEY = re.compile(r"^[A-Za-z0-9_.~+/=-]{16,}$")  # nothing that could break out of the nginx string


def replicas() -> list[tuple[str, str, int, int, int]]:
    found = []
    for item in os.environ.get("TS_REPLICAS", "").split(","):
        if item.strip():
            name, address = item.strip().split("=", 1)
            host, inference, management, metrics = address.split(":")
            found.append((name, host, int(inference), int(management), int(metrics)))
    if not found:
        sys.exit("TS_REPLICAS names no replica (name=host:inference:management:metrics,...)")
    return found


def keys(kind: str) -> list[str]:
    path = Path(os.environ.get("TS_KEY_FILE", "/run/secrets/ts_keys"))
    try:
        entry = json.loads(path.read_text())[kind]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"cannot read the {kind} key from {path}: {e}")
    found = [entry["key"], *entry.get("previous", [])]
    for key in found:
        if not KEY.match(key):
            sys.exit(f"a {kind} key in {path} is too short or holds characters other than base64's")
    return found


def map_hash_bucket_size(keys: list[str]) -> int:
    """A bucket of nginx's map hash holds an entry (a pointer, the key, aligned to a pointer) and the
    end pointer: sized for the longest "Bearer <key>", at least 128, a power of two."""
    need = 8 + (len("Bearer ") + max(map(len, keys)) + 2 + 7) // 8 * 8 + 8
    size = 128
    while size < need:
        size *= 2
    return size


def render() -> Path:
    servers = replicas()
    conf = (HERE / "nginx.conf.template").read_text()
    upstream = "        server {}:{} max_fails=1 fail_timeout=5s;"
    inference, management = keys("inference"), keys("management")
    values = {
        "RUN": str(RUN),
        "PORT": os.environ.get("NGINX_PORT", "8088"),
        "TRIES": str(len(servers)),
        "MAP_HASH_BUCKET_SIZE": str(map_hash_bucket_size(inference + management)),
        "INFERENCE_KEYS": "\n".join(f'        "Bearer {k}" 1;' for k in inference),
        "MANAGEMENT_KEYS": "\n".join(f'        "Bearer {k}" 1;' for k in management),
        "INFERENCE_SERVERS": "\n".join(upstream.format(h, i) for _, h, i, _, _ in servers),
        "MANAGEMENT_SERVERS": "\n".join(upstream.format(h, m) for _, h, _, m, _ in servers),
        "METRICS_LOCATIONS": "\n".join(f"        location = /metrics/{n} {{ proxy_pass http://{h}:{p}/metrics; }}"
                                       for n, h, _, _, p in servers),
    }
    for name, value in values.items():
        conf = conf.replace(f"@{name}@", value)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (RUN / sub).mkdir(parents=True, exist_ok=True)
    path = RUN / "nginx.conf"
    path.write_text(conf)
    path.chmod(0o600)  # it holds the keys
    return path


def quit_gracefully() -> int:
    time.sleep(float(os.environ.get("NGINX_DRAIN_S", "5")))
    pid = RUN / "nginx.pid"
    done = subprocess.run(["nginx", "-e", "/dev/stderr", "-c", str(RUN / "nginx.conf"), "-s", "quit"]).returncode
    deadline = time.time() + 60
    while done == 0 and pid.exists() and time.time() < deadline:
        time.sleep(0.2)  # nginx removes its pid file when the last request has been answered
    return done


def main() -> int:
    if sys.argv[1:] == ["quit"]:
        return quit_gracefully()
    conf = render()
    if sys.argv[1:] == ["reload"]:
        return subprocess.run(["nginx", "-e", "/dev/stderr", "-c", str(conf), "-s", "reload"]).returncode
    if sys.argv[1:] == ["test"]:
        return subprocess.run(["nginx", "-e", "/dev/stderr", "-c", str(conf), "-t"]).returncode
    print(f"nginx on :{os.environ.get('NGINX_PORT', '8088')} in front of "
          f"{', '.join(f'{n} ({h}:{i})' for n, h, i, _, _ in replicas())}", flush=True)
    os.execvp("nginx", ["nginx", "-e", "/dev/stderr", "-c", str(conf), "-g", "daemon off;"])


if __name__ == "__main__":
    sys.exit(main())
