"""The container deployment for real (deploy/, README "Deploy"): the images `make test-deploy` builds,
the compose stack with 2 TorchServe replicas behind nginx, PostgreSQL and the UI, brought up with
podman-compose under its own name and ports (beside a `make deploy-up` stack, if one runs).

- keys: nginx accepts the secret's keys (inference for inference, management for the read-only
  management API) and answers anything else as TorchServe does (400 InvalidKeyException); the
  replicas and PostgreSQL publish nothing; Prometheus metrics of both replicas through nginx;
- failover: a headless Locust load (loadtest/, sampled answers checked against known labels) through
  nginx while one replica's main process is killed (SIGKILL from the host): no request fails, nginx's retries are
  counted from its access log, the replica comes back by its restart policy and serves again;
- the shared PostgreSQL log holds a row for every answer.

Runs with `make test-deploy` (DEPLOY_TESTS=1; it builds the images first); skips with the reason
otherwise, and where podman cannot run or the images are not built.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(DEPLOY))
import wait as deploy_wait  # noqa: E402

NAME = "digits-test"  # containers digits-test-ts1, ...; compose project digits-test
IMAGES = ["localhost/digits-serve:latest", "localhost/digits-ui:latest", "localhost/digits-nginx:latest",
          "localhost/digits-postgres:latest"]
# What the replicas load here: both versions of LeNet-5 with one worker each (the full start-up set
# would be 10 workers per replica on a 2-core machine).
MODELS = "mnist_lenet5=mnist_lenet5_v1.0.mar,mnist_lenet5=mnist_lenet5_v1.1.mar"
TARGETS = "mnist_lenet5:1.0=2,mnist_lenet5:1.1=1,mnist_lenet5=1"
USERS = 6
LOAD_S = 45
KILL_AFTER_S = 12  # into the load
HEALTHY_TIMEOUT_S = 900  # the first start on a busy 2-core machine: Java, then a worker per version
COMPOSE = DEPLOY / ".tools" / "bin" / "podman-compose"


def podman_problem() -> str | None:
    if os.environ.get("DEPLOY_TESTS") != "1":
        return ("the deployment test runs with `make test-deploy` (DEPLOY_TESTS=1): it builds the images and "
                "runs the stack for several minutes")
    if shutil.which("podman") is None:
        return "podman is not installed (`make deploy-tools` installs it; `make test-deploy` runs this test)"
    if not COMPOSE.exists():
        return "podman-compose is not installed in deploy/.tools (`make deploy-tools`)"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, env=env())
    if info.returncode:
        return f"podman cannot run here: {info.stderr.strip()[-300:]}"
    missing = [i for i in IMAGES if subprocess.run(["podman", "image", "exists", i], env=env()).returncode]
    if missing:
        return f"images not built: {', '.join(missing)} (`make test-deploy` builds them)"
    return None


def env(**extra) -> dict:
    return dict(os.environ, CONTAINERS_CONF=os.environ.get("CONTAINERS_CONF", str(DEPLOY / "containers.conf")),
                **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def podman(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=env(), check=check, **kwargs)


def psql(query: str) -> str:
    return podman("exec", f"{NAME}-postgres", "psql", "-h", "/tmp", "-U", "digits", "-d", "predictions",
                  "-tAc", query).stdout.strip()


class Stack:
    def __init__(self, tmp: Path):
        self.port, self.ui_port = free_port(), free_port()
        self.keys_file = tmp / "secrets" / "ts_keys.json"
        self.keys_file.parent.mkdir(mode=0o700)
        keys = {kind: {"key": os.urandom(24).hex()} for kind in ("inference", "management")}
        self.keys_file.write_text(json.dumps(keys))
        self.keys_file.chmod(0o644)
        self.keys = {kind: keys[kind]["key"] for kind in keys}
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env(DEPLOY_NAME=NAME, DEPLOY_PORT=str(self.port), DEPLOY_UI_PORT=str(self.ui_port),
                       DEPLOY_KEYS=str(self.keys_file), DEPLOY_MODELS=MODELS, DEPLOY_WORKERS="1")

    def compose(self, *args, check=True) -> subprocess.CompletedProcess:
        return subprocess.run([str(COMPOSE), "-p", NAME, "-f", str(DEPLOY / "compose.yaml"), *args],
                              capture_output=True, text=True, env=self.env, check=check, cwd=DEPLOY)

    def get(self, path: str, kind: str | None = "inference", **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.keys[kind]}"} if kind else {}
        return requests.get(self.url + path, headers=headers, timeout=30, **kwargs)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    problem = podman_problem()
    if problem:
        pytest.skip(problem)
    s = Stack(tmp_path_factory.mktemp("deploy"))
    s.compose("down", "-v", check=False)  # what an interrupted run left behind
    started = time.time()
    s.compose("up", "-d")
    try:
        s.up_s = deploy_wait.wait([f"{NAME}-{c}" for c in deploy_wait.SERVICES], HEALTHY_TIMEOUT_S, quiet=True)
        print(f"\nstack healthy {time.time() - started:.0f} s after `up -d`")
        yield s
    finally:
        for service in ("ts1", "ts2", "nginx"):
            log = podman("logs", "--tail", "30", f"{NAME}-{service}", check=False)
            print(f"--- {service}:\n{(log.stdout + log.stderr)[-3000:]}")
        s.compose("down", "-v", check=False)


def test_the_requirements_pins_agree_with_requirements_txt():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("#")[0].strip().split("==")
            pins[re.sub(r"\[.*\]", "", name).lower()] = version
    for file in ("requirements-server.txt", "requirements-ui.txt"):
        for line in (DEPLOY / file).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                name, version = line.split("#")[0].strip().split("==")
                name = re.sub(r"\[.*\]", "", name).lower()
                assert pins.get(name, version) == version, f"{file}: {name}=={version}, requirements.txt {pins[name]}"


def test_keys_are_checked_at_nginx_and_only_nginx_and_the_ui_are_published(stack):
    assert stack.get("/ping").json()["status"] == "Healthy"
    for kind in (None, "management"):  # no key, or the wrong kind: TorchServe's own refusal
        refused = stack.get("/ping", kind=kind)
        assert refused.status_code == 400 and refused.json()["type"] == "InvalidKeyException", refused.text
    from drawing import draw_digit, png_bytes
    seven = png_bytes(draw_digit(7))
    answer = requests.post(f"{stack.url}/predictions/mnist_lenet5", data=seven, timeout=30,
                           headers={"Authorization": f"Bearer {stack.keys['inference']}"})
    assert answer.status_code == 200 and answer.json()["label"] == "7", answer.text
    models = stack.get("/models", kind="management")
    assert models.status_code == 200 and [m["modelName"] for m in models.json()["models"]] == ["mnist_lenet5"]
    assert stack.get("/models", kind="inference").status_code == 400
    change = requests.put(f"{stack.url}/models/mnist_lenet5/1.1/set-default", timeout=30,
                          headers={"Authorization": f"Bearer {stack.keys['management']}"})
    assert change.status_code == 405 and "read-only" in change.json()["message"]
    assert stack.get("/token?type=inference", kind="management").status_code == 404
    # Published: nginx and the UI only, on the host's loopback.
    ports = podman("port", f"{NAME}-net").stdout.split()
    assert sorted(p for p in ports if ":" in p) == sorted([f"127.0.0.1:{stack.port}", f"127.0.0.1:{stack.ui_port}"])
    for service in ("ts1", "ts2", "postgres", "nginx", "ui"):
        mode = podman("inspect", "--format", "{{.HostConfig.NetworkMode}}", f"{NAME}-{service}").stdout.strip()
        assert mode.startswith("container:"), (service, mode)
    assert podman("exec", f"{NAME}-ts1", "id", "-un").stdout.strip() == "model-server"
    assert requests.get(f"http://127.0.0.1:{stack.ui_port}/_stcore/health", timeout=30).text == "ok"


def test_metrics_of_each_replica_are_reachable(stack):
    for replica in ("ts1", "ts2"):
        metrics = stack.get(f"/metrics/{replica}", kind=None)
        assert metrics.status_code == 200 and "# TYPE" in metrics.text, (replica, metrics.text[:300])


def nginx_log() -> list[str]:
    log = podman("logs", f"{NAME}-nginx")
    return [line for line in (log.stdout + log.stderr).splitlines() if " upstream=" in line]


def test_a_replica_killed_under_load_fails_no_request_and_comes_back(stack, tmp_path):
    from loadtest.run import get_args_parser, run_load, spec_of
    rows_before = int(psql("SELECT count(*) FROM predictions WHERE client = 'loadtest'") or 0)
    lines_before = len(nginx_log())
    args = get_args_parser().parse_args([
        "--host", stack.url, "--key-file", str(stack.keys_file), "--targets", TARGETS, "--protocol", "rest",
        "--users", str(USERS), "--spawn-rate", str(USERS), "--duration", str(LOAD_S), "--warmup-s", "0",
        "--check-every", "5", "--max-error-rate", "0"])
    result = {}
    load = threading.Thread(target=lambda: result.update(zip(("code", "out", "summary"), run_load(spec_of(args), tmp_path))))
    load.start()
    # Kill once Locust is sending (its start, with the reference model's image check, takes seconds).
    deadline = time.time() + 120
    while time.time() < deadline and len(nginx_log()) - lines_before < 50:
        time.sleep(0.5)
    time.sleep(KILL_AFTER_S)
    restarts = int(podman("inspect", "--format", "{{.RestartCount}}", f"{NAME}-ts1").stdout)
    killed_at = time.time()
    # A crash, as the kernel's OOM killer would make one: SIGKILL to the container's main process from
    # the host. (`podman kill` counts as stopped by the user, which no restart policy undoes.)
    os.kill(int(podman("inspect", "--format", "{{.State.Pid}}", f"{NAME}-ts1").stdout), signal.SIGKILL)
    back_s = None
    while back_s is None and time.time() - killed_at < HEALTHY_TIMEOUT_S:
        if (int(podman("inspect", "--format", "{{.RestartCount}}", f"{NAME}-ts1", check=False).stdout or 0) > restarts
                and deploy_wait.healthy(f"{NAME}-ts1")):
            back_s = time.time() - killed_at
        else:
            time.sleep(1)
    load.join(LOAD_S + 300)
    summary = result["summary"]
    total = summary["series"]["total"]
    lines = nginx_log()[lines_before:]
    retried = [line for line in lines if "ustatus=" in line and "," in line.split("ustatus=")[1]]
    report = {"requests": total["requests"], "failures": total["failures"], "checked": summary["checked"],
              "wrong_labels": summary["wrong_labels"], "nginx_retries": len(retried),
              "replica_back_s": back_s and round(back_s, 1), "retried_examples": retried[:5]}
    print("\nfailover:", json.dumps(report, indent=1))
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "deploy_failover.json").write_text(json.dumps(report, indent=1))
    assert back_s is not None, f"{NAME}-ts1 did not come back within {HEALTHY_TIMEOUT_S} s"
    assert total["requests"] >= 200 and total["failures"] == 0, report
    assert summary["wrong_labels"] == 0 and summary["checked"] > 0, report
    assert result["code"] == 0, (tmp_path / "locust.log").read_text()[-2000:]
    assert retried, "no request was retried by nginx: the kill missed the load?"

    # The replica serves again: new requests reach both (nginx retries a server after fail_timeout).
    ts1_port = "127.0.0.1:8080"
    for _ in range(40):
        requests.get(f"{stack.url}/ping", headers={"Authorization": f"Bearer {stack.keys['inference']}"}, timeout=30)
    recent = nginx_log()[-40:]
    assert any(f"upstream={ts1_port} " in line for line in recent), recent[-5:]

    # One row per answer in the shared log. A request the killed replica had logged but not answered
    # was answered by the other one and logged again: at most one extra row per request in flight.
    rows = int(psql("SELECT count(*) FROM predictions WHERE client = 'loadtest'")) - rows_before
    answered = total["requests"] - total["failures"]
    print(f"log rows {rows} for {answered} answers")
    assert answered <= rows <= answered + 2 * USERS, (rows, answered)
    versions = psql("SELECT string_agg(DISTINCT version, ',' ORDER BY version) FROM predictions")
    assert versions == "1.0,1.1"
