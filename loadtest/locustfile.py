"""Locust users for TorchServe: RestUser (FastHttpUser, raw image body) and GrpcUser (the project's
gRPC client), each sending real images to weighted model/version targets and checking the answers.

Run it through `make loadtest` / `python -m loadtest.run`, which passes these options:
  --targets "mnist_lenet5:1.0=6,mnist_lenet5:1.1=2,cifar10_resnet18=2"   (model[:version]=weight; ping=w)
  --ts-config / --key-file    the server's config.properties and key file (gRPC port, token)
  --think-ms, --check-every, --max-error-rate, --max-requests, --data-dir, --samples-csv
A run exits non-zero when its error rate exceeds --max-error-rate or a checked response disagrees
with the image's known label. Every request is recorded in --samples-csv for loadtest/report.py,
and beside it loadgen.json: the label checks made and failed, and the CPU Locust used during the load.
"""
import csv
import json
import sys
import time
from pathlib import Path

import gevent
import grpc.experimental.gevent
from locust import FastHttpUser, User, events, task

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]  # the project's packages, for `locust -f`
from loadtest import settings  # noqa: E402
from loadtest.images import labeled_pool  # noqa: E402
from loadtest.traffic import PING, Traffic, parse_targets  # noqa: E402
from serving.client import ServeError, read_key, read_properties, refused_key  # noqa: E402
from training.data import DEFAULT_DATA_DIR  # noqa: E402

grpc.experimental.gevent.init_gevent()  # gRPC calls must yield to gevent, or one user blocks all others


class Recorder:
    """Every request as (seconds since start, protocol, target, latency ms, ok, users): the raw data
    of the summary, so per-step and per-target percentiles are exact, not windowed estimates."""

    def __init__(self, environment, max_requests: int):
        self.environment, self.max_requests = environment, max_requests
        self.rows, self.start, self.cpu_start = [], time.time(), time.process_time()

    def users(self) -> int:
        return self.environment.runner.user_count if self.environment.runner else 0

    def add(self, request_type, name, response_time, exception, start_time=None, **_):
        self.rows.append((round((start_time or time.time()) - self.start, 4), request_type, name,
                          round(response_time, 3), int(exception is None), self.users()))
        if len(self.rows) == self.max_requests:  # the count bound; quit from outside this user's greenlet
            gevent.spawn(self.environment.runner.quit)

    def write(self, path: Path):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["t_s", "protocol", "target", "latency_ms", "ok", "users"])
            writer.writerows(self.rows)


traffic: Traffic | None = None
recorder: Recorder | None = None


def think_time(user) -> float:
    return user.environment.parsed_options.think_ms / 1000


class RestUser(FastHttpUser):
    """A client posting one image per request as the raw body (TorchServe or the Flask baseline). It
    holds the inference key it read and reads it again, once, when TorchServe refuses it."""
    network_timeout = connection_timeout = settings.REQUEST_TIMEOUT_S
    wait_time = think_time

    def on_start(self):
        self.key_file = self.environment.parsed_options.key_file
        self.headers = {"X-Client": settings.CLIENT_NAME}
        if self.key_file:  # the Flask baseline has no token
            self.read_key()

    def read_key(self, refused: str | None = None):
        self.key = read_key(self.key_file, "inference", refused)
        self.headers["Authorization"] = f"Bearer {self.key}"

    @task
    def predict(self):
        target, sample = traffic.pick()
        body = {"data": sample.image} if sample else {}
        method = self.client.post if sample else self.client.get
        response = method(target.path, headers=self.headers, name=target.name, catch_response=True, **body)
        if self.key_file and refused_key(response.status_code, response.text):
            # The key rolled over (serving/keys.py): read it again and retry once. A catch_response request
            # is reported when its with-block ends, so the refused attempt, never entered, is not counted.
            self.read_key(refused=self.key)
            response = method(target.path, headers=self.headers, name=target.name, catch_response=True, **body)
        with response:
            problem = None if response.status_code == 200 else f"HTTP {response.status_code}: {response.text[:200]}"
            if problem is None and sample and traffic.due_for_check():
                problem = traffic.check(response.json(), target, sample)
            if problem:
                response.failure(problem)


class GrpcUser(User):
    """A client calling TorchServe's gRPC Predictions API through serving/grpc_client.py."""
    wait_time = think_time

    def on_start(self):
        from serving.grpc_client import GrpcClient  # needs the generated stubs; REST-only runs do not
        opts = self.environment.parsed_options
        self.client = GrpcClient.from_config(opts.ts_config, opts.key_file, timeout=settings.REQUEST_TIMEOUT_S)

    @task
    def predict(self):
        target, sample = traffic.pick()
        started, problem = time.time(), None
        try:
            if sample:
                result = self.client.predict(target.model, sample.image, target.version)
                if traffic.due_for_check():
                    problem = traffic.check(result, target, sample)
            else:
                self.client.ping()
        except ServeError as e:
            problem = str(e)
        self.environment.events.request.fire(
            request_type="gRPC", name=target.name, response_time=(time.time() - started) * 1000,
            response_length=0, exception=AssertionError(problem) if problem else None, context={},
            start_time=started)


@events.init_command_line_parser.add_listener
def add_options(parser):
    parser.add_argument("--targets", default="mnist_lenet5=1", help="model[:version]=weight,...; ping=weight")
    parser.add_argument("--ts-config", default=str(settings.TS_CONFIG), help="TorchServe's config.properties")
    parser.add_argument("--key-file", default=str(settings.KEY_FILE), help="TorchServe's key file; '' for none")
    parser.add_argument("--think-ms", type=float, default=settings.THINK_TIME_MS)
    parser.add_argument("--check-every", type=int, default=settings.CHECK_EVERY)
    parser.add_argument("--max-error-rate", type=float, default=settings.MAX_ERROR_RATE)
    parser.add_argument("--max-requests", type=int, default=settings.MAX_REQUESTS)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--samples-csv", default="", help="write every request here at the end")


@events.init.add_listener
def prepare(environment, **_):
    global traffic, recorder
    opts = environment.parsed_options
    if not environment.host:  # REST goes to the inference address of the server's config
        environment.host = read_properties(opts.ts_config)["inference_address"]
    targets = parse_targets(opts.targets)
    pools = {m: labeled_pool(m, Path(opts.data_dir)) for m in {t.model for t in targets} - {PING}}
    traffic = Traffic(targets, pools, max(1, opts.check_every))
    recorder = Recorder(environment, opts.max_requests)


@events.test_start.add_listener
def restart_clocks(environment, **_):
    recorder.start, recorder.cpu_start = time.time(), time.process_time()


@events.request.add_listener
def record(**kwargs):
    recorder.add(**kwargs)


@events.quitting.add_listener
def gate(environment, **_):
    """Write the samples and set the exit code from the error rate and the label checks."""
    opts, total = environment.parsed_options, environment.stats.total
    if opts.samples_csv:
        recorder.write(Path(opts.samples_csv))
        (Path(opts.samples_csv).parent / "loadgen.json").write_text(json.dumps(
            {"checked": traffic.checked, "wrong_labels": traffic.mismatches,
             "cpu_s": round(time.process_time() - recorder.cpu_start, 3)}))
    error_rate = total.num_failures / max(total.num_requests, 1)
    problems = [f"error rate {error_rate:.2%} > {opts.max_error_rate:.2%}"] if error_rate > opts.max_error_rate else []
    if traffic.mismatches:
        problems.append(f"{traffic.mismatches} checked responses disagree with the known label")
    if not total.num_requests:
        problems.append("no request was made")
    for problem in problems:
        print(f"LOAD TEST FAILED: {problem}", file=sys.stderr)
    print(f"checked {traffic.checked} responses, {traffic.mismatches} wrong; "
          f"{total.num_requests} requests, {total.num_failures} failed", file=sys.stderr)
    environment.process_exit_code = 1 if problems else 0
