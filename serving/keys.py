"""Keeps TorchServe's keys valid for as long as the server runs.

TorchServe 0.12 keeps three keys in key_file.json. The inference and management keys expire
token_expiration_min after they were issued (a request with an expired key gets HTTP 400
InvalidKeyException, PERMISSION_DENIED on gRPC). The third, "API", never expires and only opens
TorchServe's token API on the management address: `POST /token?type=inference|management` issues a
new key of that kind with a new expiry, the old one stops working at once, and TorchServe rewrites
key_file.json. serving/server.py starts this refresher beside every server; it renews each key once
REFRESH_FRACTION of its lifetime has passed, so that the rest of the lifetime is left for retries
should the server be busy. Clients hold the key they read and read the file again, once, when a
request is refused (serving/client.py, serving/grpc_client.py, loadtest/locustfile.py).

    python -m serving.keys RUN_DIR --server-pid PID    # what serving.server runs; log: RUN_DIR/logs/keys.log
"""
import argparse
import logging
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import requests

import catalog
from serving.client import ServeError, read_keys, read_properties

REFRESH_FRACTION = 0.5  # renew a key when this fraction of its lifetime has passed
POLL_S = 2  # how often the refresher looks for its server (and for the key file while it starts)
DEFAULT_LIFETIME_MIN = 60  # TorchServe's own default when config.properties sets no token_expiration_min
KINDS = ("inference", "management")
PID_FILE = "keys.pid"  # in the run folder, beside TorchServe's .model_server.pid
log = logging.getLogger("keys")


def renewal_time(keys: dict, kind: str, lifetime_s: float) -> float:
    """When the `kind` key is due (epoch seconds): its expiry minus the part of its lifetime left unused."""
    expires = datetime.fromisoformat(keys[kind]["expiration time"]).timestamp()  # an ISO instant, in UTC
    return expires - (1 - REFRESH_FRACTION) * lifetime_s


def renew(management_url: str, api_key: str, kind: str) -> bool:
    """Ask TorchServe for a new `kind` key; False (logged) when it did not answer with one."""
    try:
        response = requests.post(f"{management_url}/token", params={"type": kind},
                                 headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
    except requests.RequestException as e:
        log.warning("could not renew the %s key: %s", kind, e)
        return False
    if response.status_code != 200:
        log.warning("could not renew the %s key: HTTP %s %s", kind, response.status_code, response.text[:200])
        return False
    log.info("renewed the %s key", kind)
    return True


def server_runs(server_pid: int) -> bool:
    try:
        os.kill(server_pid, 0)
        return True
    except OSError:
        return False


def refresh(run_dir: Path, server_pid: int):
    """Renew the keys of the server run from run_dir until that server's process is gone."""
    config = read_properties(run_dir / "config.properties")
    lifetime_s = float(config.get("token_expiration_min", DEFAULT_LIFETIME_MIN)) * 60
    key_file = run_dir / "key_file.json"
    log.info("renewing the keys of TorchServe pid %d after %g s (%g of their %g s lifetime)",
             server_pid, REFRESH_FRACTION * lifetime_s, REFRESH_FRACTION, lifetime_s)
    while server_runs(server_pid):
        try:
            keys = read_keys(key_file)
        except ServeError:  # not written yet (the server is starting) or removed (it is stopping)
            time.sleep(POLL_S)
            continue
        kind = min(KINDS, key=lambda k: renewal_time(keys, k, lifetime_s))
        wait = renewal_time(keys, kind, lifetime_s) - time.time()
        if wait > 0:
            time.sleep(min(wait, POLL_S))
        elif not renew(config["management_address"], keys["API"]["key"], kind):
            time.sleep(POLL_S)  # the server is busy or stopping: the unused part of the lifetime is for this
    log.info("TorchServe pid %d is gone: refresher stops", server_pid)


def start_refresher(run_dir: Path, server_pid: int):
    """Start the refresher of the server run from run_dir as a detached process; its pid goes to PID_FILE."""
    with open(run_dir / "logs" / "keys.log", "a") as out:
        process = subprocess.Popen([sys.executable, "-m", "serving.keys", str(run_dir), "--server-pid", str(server_pid)],
                                   cwd=catalog.ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # not in the terminal's group: Ctrl-C there leaves it
    (run_dir / PID_FILE).write_text(str(process.pid))


def stop_refresher(run_dir: Path):
    """End the run's refresher, if it still runs, and wait until it has."""
    path = run_dir / PID_FILE
    if not path.exists():
        return
    try:
        process = psutil.Process(int(path.read_text()))
        if "serving.keys" in process.cmdline():  # not another program that got the pid of an ended refresher
            process.terminate()
            process.wait(10)  # reaps it too when it is our child (tests)
    except psutil.NoSuchProcess:
        pass
    path.unlink()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the server's run folder (config.properties, key_file.json)")
    p.add_argument("--server-pid", type=int, required=True, help="TorchServe's pid: the refresher ends with it")
    args = p.parse_args()
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    refresh(args.run_dir.resolve(), args.server_pid)


if __name__ == "__main__":
    main()
