"""One load test's specification: what it sends, to which server, for how long, how the answers are
checked and how the run is summarised. Built once, by loadtest/run.py from its command line or by
the benchmark, soak and overload runs in code, then handed to Locust as a JSON file (<out>/spec.json,
`locust --load-spec`): the locustfile and the step shape read it instead of options of their own.
Locust keeps its own options (-u, -r, -t, --processes), which run.py derives from the spec.

Light on purpose (no Locust, torch or images): every runner imports it.
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import catalog
from loadtest import settings

PING = "ping"  # a target that requests /ping (the HTTP floor) instead of a prediction


@dataclass(frozen=True)
class Target:
    model: str  # or PING
    version: str | None
    weight: float

    @property
    def name(self) -> str:  # the row in Locust's statistics and in the summary
        return self.model if self.model == PING else f"{self.model}/{self.version or 'default'}"

    @property
    def path(self) -> str:
        return "/ping" if self.model == PING else f"/predictions/{self.name if self.version else self.model}"

    def __str__(self) -> str:  # as parse_targets reads it
        return f"{self.model}{':' + self.version if self.version else ''}={self.weight:g}"


def parse_targets(text: str) -> tuple[Target, ...]:
    """"mnist_lenet5:1.0=6,cifar10_resnet18=2" -> targets; a missing weight is 1."""
    targets = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, weight = item.partition("=")
        model, _, version = name.partition(":")
        targets.append(Target(model, version or None, float(weight or 1)))
    if not targets or any(t.weight <= 0 for t in targets):
        raise ValueError(f"--targets {text!r}: need model[:version]=weight items with weights > 0")
    return tuple(targets)


def format_targets(targets: tuple[Target, ...]) -> str:
    return ",".join(map(str, targets))


@dataclass(frozen=True)
class LoadSpec:
    """The fields are loadtest/run.py's options, by the same names."""
    targets: tuple[Target, ...] = ()  # empty: every served model and version (run.py asks the server)
    protocol: str = "rest"  # rest, grpc or both (run.py USER_CLASSES)
    users: int = settings.USERS  # fixed load: concurrent users
    spawn_rate: float = settings.SPAWN_RATE  # users started per second
    duration: float = settings.DURATION_S  # seconds of fixed load
    think_ms: float = settings.THINK_TIME_MS  # pause between a user's requests
    step: bool = False  # a step load (step_users, step_s) instead of fixed users
    step_users: tuple[int, ...] = settings.STEP_USERS  # user count of each step
    step_s: float = settings.STEP_S  # seconds per step
    settle_s: float = settings.SETTLE_S  # left out at the start of each step
    slo_ms: float = settings.SLO_P99_MS  # the p99 that defines the knee
    warmup_s: float = settings.WARMUP_S  # left out of the summary
    check_every: int = settings.CHECK_EVERY  # check 1 response in this many
    max_error_rate: float = settings.MAX_ERROR_RATE  # above it the run fails
    max_requests: int = settings.MAX_REQUESTS  # the run stops after this many
    ts_config: Path = catalog.TS_CONFIG  # the server's config.properties (gRPC port; REST unless `host`)
    key_file: str = str(catalog.KEY_FILE)  # the server's key file; "" = no token (the Flask baseline)
    host: str = ""  # REST base URL; "" = inference_address of ts_config
    workers: int = 0  # Locust worker processes (0: one process; -1: one per core)
    data_dir: Path = catalog.DATA_DIR  # the real test images, when present (loadtest/images.py)

    @property
    def load_s(self) -> float:
        """Seconds of load: every step of a step load, else the duration."""
        return len(self.step_users) * self.step_s if self.step else self.duration

    def write(self, path: Path):
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1, default=str))

    @classmethod
    def read(cls, path) -> "LoadSpec":
        """The spec `write` wrote to `path`; the defaults where there is none ("")."""
        if not path:
            return cls()
        fields = json.loads(Path(path).read_text())  # lists and strings where the spec holds tuples and paths
        return cls(**{**fields, "targets": tuple(Target(**t) for t in fields["targets"]),
                      "step_users": tuple(fields["step_users"]), "ts_config": Path(fields["ts_config"]),
                      "data_dir": Path(fields["data_dir"])})
