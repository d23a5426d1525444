"""Renders nginx.conf from the template, the replicas and the keys, then runs nginx in the foreground.

    NGINX_PORT     where nginx listens (8088)
    TS_REPLICAS    name=host:inference_port:management_port:metrics_port,... (the compose file's replicas)
    TS_KEY_FILE    the mounted secret (/run/secrets/ts_keys): {"inference": {"key": ...}, "management":
                   {"key": ...}}, TorchServe's key_file.json layout; "previous": [...] beside "key"
                   lists keys still accepted while clients move to a new one.

    python3 entrypoint.py reload   # after the secret changed: render again and reload nginx
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN = Path("/tmp/nginx")
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


def render() -> Path:
    servers = replicas()
    conf = (HERE / "nginx.conf.template").read_text()
    upstream = "        server {}:{} max_fails=1 fail_timeout=5s;"
    values = {
        "PORT": os.environ.get("NGINX_PORT", "8088"),
        "TRIES": str(len(servers)),
        "INFERENCE_KEYS": "\n".join(f'        "Bearer {k}" 1;' for k in keys("inference")),
        "MANAGEMENT_KEYS": "\n".join(f'        "Bearer {k}" 1;' for k in keys("management")),
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


def main() -> int:
    conf = render()
    if sys.argv[1:] == ["reload"]:
        return subprocess.run(["nginx", "-e", "/dev/stderr", "-c", str(conf), "-s", "reload"]).returncode
    print(f"nginx on :{os.environ.get('NGINX_PORT', '8088')} in front of "
          f"{', '.join(f'{n} ({h}:{i})' for n, h, i, _, _ in replicas())}", flush=True)
    os.execvp("nginx", ["nginx", "-e", "/dev/stderr", "-c", str(conf), "-g", "daemon off;"])


if __name__ == "__main__":
    sys.exit(main())
