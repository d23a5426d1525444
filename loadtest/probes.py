"""What the benchmark measures beside the load test's own samples: TorchServe's Prometheus counters
(where a request's time goes), CPU time by process (psutil: the server's, the load generator's, and
everyone else's, i.e. contention), and the model's cost in-process.

prometheus_client is not a dependency: the few lines below read the text format TorchServe serves.
"""
import time
from pathlib import Path

import psutil
import requests

import catalog
from loadtest.flask_baseline import Predictor
from loadtest.images import labeled_pool
from loadtest.report import load_samples
from serving.client import read_properties

FRONTEND_COUNTERS = ("ts_inference_requests_total", "ts_inference_latency_microseconds",
                     "ts_queue_latency_microseconds")
MODEL_TIME_REPEATS = 50  # forward passes timed per batch size


def metric_totals(text: str, names) -> dict[str, float]:
    """Prometheus' text format -> each of `names` summed over its label sets (TorchServe has one per
    model version): `name{labels} value [timestamp]` lines, `#` lines are help and types."""
    totals = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            value = rest[rest.rindex("}") + 1:].split()[0]
        else:
            name, value = line.split()[:2]
        if name in totals:
            totals[name] += float(value)
    return totals


def frontend_counters(ts_config: Path) -> dict[str, float]:
    """TorchServe's cumulative request count and inference / queue time (us), summed over models."""
    text = requests.get(f"{read_properties(ts_config)['metrics_address']}/metrics", timeout=10).text
    return metric_totals(text, FRONTEND_COUNTERS)


def time_split(before: dict, after: dict, client_mean_ms: float) -> dict:
    """Mean time per request: waiting in TorchServe's queue, in the worker (IPC, preprocessing, model),
    and outside the frontend's measurement (HTTP, Netty, the load generator's own scheduling)."""
    n = after["ts_inference_requests_total"] - before["ts_inference_requests_total"]
    inference = (after["ts_inference_latency_microseconds"] - before["ts_inference_latency_microseconds"]) / n / 1000
    queue = (after["ts_queue_latency_microseconds"] - before["ts_queue_latency_microseconds"]) / n / 1000
    return {"client_mean_ms": round(client_mean_ms, 2), "frontend_ms": round(inference, 2),
            "queue_ms": round(queue, 2), "worker_ms": round(inference - queue, 2),
            "outside_frontend_ms": round(client_mean_ms - inference, 2)}


def client_mean_ms(run_dir: Path) -> float:
    """Mean client latency over the whole run, warm-up included: the frontend's counters cover it too."""
    return float(load_samples(run_dir / "samples.csv")["latency_ms"].mean())


def cpu_by_process() -> dict[int, float]:
    """CPU seconds (user + system) used so far by every process on the machine, by pid."""
    used = {}
    for process in psutil.process_iter(["cpu_times"]):
        times = process.info["cpu_times"]
        if times:
            used[process.pid] = times.user + times.system
    return used


def process_tree(pid: int) -> set[int]:
    return {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}


def other_cores(before: dict[int, float], after: dict[int, float], ours: set[int], seconds: float) -> float:
    """Cores that processes other than `ours` used between two cpu_by_process snapshots."""
    return round(sum(after[p] - before[p] for p in after.keys() & before.keys() if p not in ours) / seconds, 2)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by a process, and by its children (TorchServe's workers)."""
    process = psutil.Process(pid)
    used = lambda p: sum(p.cpu_times()[:2])  # noqa: E731
    return used(process), sum(used(child) for child in process.children(recursive=True))


def cpu_per_request(before: tuple, after: tuple, summary: dict, names: tuple[str, ...]) -> dict:
    """CPU ms per request: the server's processes over the whole run (idle while Locust starts),
    the load generator's during the load."""
    n = summary["all_requests"]
    cpu = {name: round(1000 * (a - b) / n, 3) for name, b, a in zip(names, before, after)}
    return {**cpu, "load generator": round(1000 * summary["cpu_s"] / n, 3)}


def model_time(model: str, batch_sizes=(1, 8)) -> dict:
    """In-process cost with one thread: preprocessing per image, forward pass per batch (ms)."""
    predictor, pool = Predictor(model, threads=1), labeled_pool(model, catalog.DATA_DIR)
    start = time.perf_counter()
    pixels = [predictor.pixels(s.image) for s in pool]
    result = {"preprocess_ms_per_image": round((time.perf_counter() - start) * 1000 / len(pool), 3)}
    for b in batch_sizes:
        predictor.probabilities(pixels[:b])  # warm-up
        start = time.perf_counter()
        for _ in range(MODEL_TIME_REPEATS):
            predictor.probabilities(pixels[:b])
        result[f"forward_ms_batch_{b}"] = round((time.perf_counter() - start) * 1000 / MODEL_TIME_REPEATS, 3)
    return result
