"""Locust users for TorchServe: RestUser (FastHttpUser, raw image body) and GrpcUser (the project's
gRPC client), each sending real images to weighted model/version targets and checking the answers.

Run it through `make loadtest` / `python -m loadtest.run`, which writes the run's LoadSpec
(loadtest/spec.py: targets, the server's config.properties and key file, think time, checks, data
directory) to <out>/spec.json and passes two options of this file:
  --load-spec <out>/spec.json    what to send, to which server, checked how
  --samples-csv <out>/samples.csv
A run exits non-zero when its error rate exceeds the spec's max_error_rate or a checked response
disagrees with the image's known label. Every request is recorded in --samples-csv for
loadtest/report.py, and beside it loadgen.json: the label checks made and failed, and the CPU Locust
used during the load.

Distributed (`python -m loadtest.run --workers N`: `locust --processes N`, or `--master` here and
`--worker --master-host ...` on other machines, each given a copy of the same --load-spec, which the
workers need to build their images): the workers send the requests and ship their samples and
counts to the master with every stats report; the master alone gates the run and writes samples.csv
(a `worker` column says which worker sent each request; `users` is the sum over the workers) and
loadgen.json (with a per-worker breakdown under `workers`).
"""
import csv
import json
import sys
import time
from pathlib import Path

import gevent
import grpc.experimental.gevent
from locust import FastHttpUser, User, events, task
from locust.runners import MasterRunner, WorkerRunner

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]  # the project's packages, for `locust -f`
from loadtest import settings  # noqa: E402
from loadtest.images import labeled_pool  # noqa: E402
from loadtest.spec import PING, LoadSpec  # noqa: E402
from loadtest.traffic import Traffic  # noqa: E402
from serving.client import ServeError, read_key, read_properties, refused_key  # noqa: E402

grpc.experimental.gevent.init_gevent()  # gRPC calls must yield to gevent, or one user blocks all others


class Recorder:
    """Every request as (seconds since start, protocol, target, latency ms, ok, users, worker): the raw
    data of the summary, so per-step and per-target percentiles are exact, not windowed estimates.
    Distributed, each worker's rows go to the master with its stats reports (`ship`, `receive`)."""

    def __init__(self, environment, max_requests: int):
        self.environment, self.max_requests = environment, max_requests
        self.rows, self.start, self.cpu_start = [], time.time(), time.process_time()
        self.workers: dict[str, dict] = {}  # master: the latest counts of each worker, by client id
        self.received = 0  # master: rows received from the workers
        self.local = not isinstance(environment.runner, (MasterRunner, WorkerRunner))

    def users(self) -> int:
        return self.environment.runner.user_count if self.environment.runner else 0

    def add(self, request_type, name, response_time, exception, start_time=None, **_):
        # Rows hold the request's wall-clock start: a worker's rows are put on the master's clock at the end.
        self.rows.append((start_time or time.time(), request_type, name, round(response_time, 3),
                          int(exception is None), self.users(), 0))
        if self.local and len(self.rows) == self.max_requests:  # the count bound (distributed: the master's)
            gevent.spawn(self.environment.runner.quit)  # quit from outside this user's greenlet

    def ship(self, data: dict):
        """Worker: this report's new rows, and the counts so far, for the master."""
        data["loadtest"] = {"rows": self.rows, "checked": traffic.checked, "wrong_labels": traffic.mismatches,
                            "cpu_s": time.process_time() - self.cpu_start}
        self.rows = []

    def receive(self, client_id: str, data: dict):
        """Master: a worker's report."""
        report = data.get("loadtest")
        if report is None:
            return
        worker = self.workers.setdefault(client_id, {"worker": len(self.workers) + 1, "requests": 0, "failures": 0})
        self.rows += [(*row[:6], worker["worker"]) for row in report["rows"]]
        worker["requests"] += len(report["rows"])
        worker["failures"] += sum(1 - row[4] for row in report["rows"])
        worker.update(checked=report["checked"], wrong_labels=report["wrong_labels"], cpu_s=round(report["cpu_s"], 3))
        self.received += len(report["rows"])
        if self.received >= self.max_requests > self.received - len(report["rows"]):
            gevent.spawn(self.environment.runner.quit)

    def write(self, path: Path):
        rows = sorted(self.rows) if self.workers else self.rows
        totals, current = [], {}  # users at each request: the sum of every worker's own count, as last seen
        for row in rows:
            current[row[6]] = row[5]
            totals.append(sum(current.values()))
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["t_s", "protocol", "target", "latency_ms", "ok", "users", "worker"])
            writer.writerows((round(t - self.start, 4), protocol, name, ms, ok, users, worker)
                             for (t, protocol, name, ms, ok, _, worker), users in zip(rows, totals))


spec: LoadSpec | None = None  # this run's, read once by `prepare`
traffic: Traffic | None = None
recorder: Recorder | None = None


def think_time(user) -> float:
    return spec.think_ms / 1000


class RestUser(FastHttpUser):
    """A client posting one image per request as the raw body (TorchServe or the Flask baseline). It
    holds the inference key it read and reads it again, once, when TorchServe refuses it."""
    network_timeout = connection_timeout = settings.REQUEST_TIMEOUT_S
    wait_time = think_time

    def on_start(self):
        self.key_file = spec.key_file
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
        self.client = GrpcClient.from_config(spec.ts_config, spec.key_file, timeout=settings.REQUEST_TIMEOUT_S)

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
    parser.add_argument("--load-spec", default="", help="the run's LoadSpec, as loadtest/run.py writes it "
                        "(<out>/spec.json); default: LoadSpec()'s defaults, which need targets")
    parser.add_argument("--samples-csv", default="", help="write every request here at the end")


@events.init.add_listener
def prepare(environment, **_):
    global spec, traffic, recorder
    spec = LoadSpec.read(environment.parsed_options.load_spec)
    if not spec.targets:
        raise ValueError("the LoadSpec names no targets: run through `python -m loadtest.run`, or give --load-spec")
    if not environment.host:  # REST: the spec's host, else the inference address of the server's config
        environment.host = spec.host or read_properties(spec.ts_config)["inference_address"]
    master = isinstance(environment.runner, MasterRunner)  # sends nothing itself: needs no images
    pools = {} if master else {m: labeled_pool(m, spec.data_dir) for m in {t.model for t in spec.targets} - {PING}}
    traffic = Traffic(spec.targets, pools, max(1, spec.check_every))
    recorder = Recorder(environment, spec.max_requests)
    if isinstance(environment.runner, WorkerRunner):
        environment.events.report_to_master.add_listener(lambda client_id, data: recorder.ship(data))
    elif master:
        environment.events.worker_report.add_listener(recorder.receive)


@events.test_start.add_listener
def restart_clocks(environment, **_):
    recorder.start, recorder.cpu_start = time.time(), time.process_time()


@events.request.add_listener
def record(**kwargs):
    recorder.add(**kwargs)


@events.quitting.add_listener
def gate(environment, **_):
    """Write the samples and set the exit code from the error rate and the label checks (on the master
    when distributed: a worker's samples and counts have gone to it)."""
    if isinstance(environment.runner, WorkerRunner):
        return
    opts, total = environment.parsed_options, environment.stats.total
    workers = sorted(recorder.workers.values(), key=lambda w: w["worker"])
    traffic.checked += sum(w.get("checked", 0) for w in workers)
    traffic.mismatches += sum(w.get("wrong_labels", 0) for w in workers)
    if opts.samples_csv:
        recorder.write(Path(opts.samples_csv))
        loadgen = {"checked": traffic.checked, "wrong_labels": traffic.mismatches,
                   "cpu_s": round(time.process_time() - recorder.cpu_start + sum(w.get("cpu_s", 0) for w in workers), 3)}
        if isinstance(environment.runner, MasterRunner):
            loadgen["workers"] = workers
        (Path(opts.samples_csv).parent / "loadgen.json").write_text(json.dumps(loadgen))
    error_rate = total.num_failures / max(total.num_requests, 1)
    problems = [f"error rate {error_rate:.2%} > {spec.max_error_rate:.2%}"] if error_rate > spec.max_error_rate else []
    if traffic.mismatches:
        problems.append(f"{traffic.mismatches} checked responses disagree with the known label")
    if not total.num_requests:
        problems.append("no request was made")
    for problem in problems:
        print(f"LOAD TEST FAILED: {problem}", file=sys.stderr)
    print(f"checked {traffic.checked} responses, {traffic.mismatches} wrong; "
          f"{total.num_requests} requests, {total.num_failures} failed", file=sys.stderr)
    environment.process_exit_code = 1 if problems else 0
