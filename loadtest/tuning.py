"""Which serving settings the benchmark measures, and which it keeps: the sweep's points, the
combination of the changes that won, and the pick. Pure functions of the measured points
(loadtest/bench.py measures them), so that the logic that chose the shipped defaults (models.yaml,
config.properties; BENCHMARKS.md "Chosen defaults") is tested (tests/test_tuning.py).

A measured point is a dict: {"name", "config": ServingConfig as a dict, "summary": the load test's
summary with `passed` and series.total.throughput_rps / p99_ms, ...}.
"""
import dataclasses
from typing import Callable

from loadtest import settings

MIN_GAIN = 0.05  # a setting must beat the current defaults' throughput by this fraction to be adopted
SWEEP = {"workers": (1, 2, 3), "batch_size": (1, 4, 8, 16), "max_batch_delay_ms": (1, 5, 10), "threads": (1, 2)}
# LeNet-5 only: the cheap model is the one whose request rate can stress the frontend's Netty threads
FRONTEND_SWEEP = {"netty_threads": (1, 2, 4)}
# ResNet-18 only: a convolutional net's cost per image keeps falling with the batch (bench.md: model time)
LARGE_BATCH_SWEEP = {"batch_size": (1, 4, 8, 16, 32)}
# The two picks per model: among the served default's format (the current default version: `make
# tune`'s choice on this CPU, or models.yaml's), and among every archived format.
DEFAULT_FORMAT, ANY_FORMAT = "default's format", "any format"


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """One point of the sweep: models.yaml `defaults:` keys and config.properties' Netty threads."""
    workers: int = 1  # minWorkers = maxWorkers per model
    batch_size: int = 8  # requests per batch
    max_batch_delay_ms: int = 5  # wait for a batch to fill
    threads: int = 1  # torch / onnxruntime intra-op threads per worker
    netty_threads: int = 2  # number_of_netty_threads = netty_client_threads
    job_queue_size: int = 100  # jobQueueSize: requests queued per model version beyond it get a 503
    version: str = "1.0"  # the archived version, i.e. the format (model_store/manifest.json)

    def differences(self, other: "ServingConfig", formats: dict[str, str]) -> str:
        """The point's name: what it changes from `other`; formats: version -> format."""
        changed = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(other, f.name)]
        if self.version != other.version:
            changed[-1] += f" ({formats[self.version]})"
        return ", ".join(changed) or "current defaults"


def sweep_points(model: str, base: ServingConfig, formats: dict[str, str]) -> list[ServingConfig]:
    """The current defaults, then one setting changed at a time, then every archived format (formats:
    version -> format)."""
    values = dict(SWEEP, **(FRONTEND_SWEEP if model == "mnist_lenet5" else LARGE_BATCH_SWEEP))
    points = [base] + [dataclasses.replace(base, **{field: v}) for field, vs in values.items() for v in vs]
    points += [dataclasses.replace(base, version=v) for v in formats]
    return list(dict.fromkeys(points))  # the current value of each setting is the base point itself


def p99_limit(model: str, baseline_p99_ms: float) -> float:
    """The p99 a tuned point must keep: LeNet-5's at most the Flask baseline's (the target is "no
    worse latency"); the photo model's under the SLO (checked again at the knee by the step load)."""
    return baseline_p99_ms if model == "mnist_lenet5" else settings.SLO_P99_MS


def within(point: dict, p99_limit_ms: float) -> bool:
    p99 = point["summary"]["series"]["total"]["p99_ms"]
    return point["summary"]["passed"] and p99 is not None and p99 <= p99_limit_ms


def throughput(point: dict) -> float:
    return point["summary"]["series"]["total"]["throughput_rps"]


def candidates(points: list[dict], p99_limit_ms: float) -> list[dict]:
    """The points within the p99 limit; when none is (the limit is too tight at USERS users), every
    point that passed its checks."""
    return [p for p in points if within(p, p99_limit_ms)] or [p for p in points if p["summary"]["passed"]]


def combined_config(base: ServingConfig, points: list[dict], p99_limit_ms: float) -> ServingConfig:
    """Every single change that beat the current defaults (points[0]) by MIN_GAIN (among the
    candidates), combined; of two changes to one setting, the faster wins."""
    changes = {}
    for p in sorted(candidates(points[1:], p99_limit_ms), key=throughput):
        if throughput(p) > throughput(points[0]) * (1 + MIN_GAIN):
            changes.update({k: v for k, v in p["config"].items() if getattr(base, k) != v})
    return dataclasses.replace(base, **changes)


def pick(points: list[dict], p99_limit_ms: float) -> ServingConfig:
    """The fastest candidate, if it beats the current defaults (points[0]) by MIN_GAIN: a smaller gain
    is within run-to-run noise, and the defaults stay."""
    best = max(candidates(points, p99_limit_ms), key=throughput)
    if throughput(best) < throughput(points[0]) * (1 + MIN_GAIN):
        best = points[0]
    return ServingConfig(**best["config"])


def sweep(measure: Callable[[ServingConfig, str], dict], model: str, base: ServingConfig, formats: dict[str, str],
          p99_limit_ms: float, only: list[str] = ()) -> tuple[list[dict], dict[str, ServingConfig]]:
    """Measure the sweep points (`only` those named, if given) and the combinations of their winning
    changes; -> the points, and the pick among the default's format and among every format.
    measure(config, run) -> the point without its name; `run` names the measurement ("00", ...,
    "combined-<n>"). Changes do not always add up (two workers with two threads each oversubscribe
    2 cores): combinations are measured, not assumed."""
    configs = [c for c in sweep_points(model, base, formats) if not only or c.differences(base, formats) in only]
    points = [{"name": c.differences(base, formats), **measure(c, f"{i:02d}")} for i, c in enumerate(configs)]
    default_format = lambda: [p for p in points if p["config"]["version"] == base.version]  # noqa: E731
    for scope in (default_format, lambda: points):
        combined = combined_config(base, scope(), p99_limit_ms)
        if combined not in [ServingConfig(**p["config"]) for p in points]:
            points.append({"name": f"combined: {combined.differences(base, formats)}",
                           **measure(combined, f"combined-{len(points)}")})
    return points, {DEFAULT_FORMAT: pick(default_format(), p99_limit_ms), ANY_FORMAT: pick(points, p99_limit_ms)}
