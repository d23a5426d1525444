"""Run a headless Locust load test against a running server and summarise it (`make loadtest`).

    python -m loadtest.run                                      # 16 users, 60 s, every served model/version
    python -m loadtest.run --users 32 --duration 30 --protocol grpc --targets "mnist_lenet5:1.1=1"
    python -m loadtest.run --step --targets cifar10_resnet18    # step load: finds the knee under the SLO
    python -m loadtest.run --host http://127.0.0.1:8090 --key-file "" --targets mnist_lenet5   # Flask baseline
    python -m loadtest.run --workers 4 --users 64                # distributed: a master and 4 worker processes
    python -m loadtest.run --workers 4 --host http://<load balancer>:8080 --key-file keys.json --targets mnist_lenet5

By default it targets the server `make serve` started (config.properties, .run/key_file.json) and
sends to every served model and version (weights: settings.MODEL_WEIGHTS). Writes
results/loadtest/<time>/: the run's LoadSpec (spec.json, loadtest/spec.py: what Locust reads),
Locust's CSV (locust_*.csv) and HTML report (report.html), its log, samples.csv (every request),
summary.md/.json and latency.png. Exits non-zero when the run fails its checks (error rate over
--max-error-rate, or a checked response with the wrong label).

--workers N runs Locust distributed on this machine (`locust --processes N`: one master that spawns
and counts, N worker processes that send, so the load is not capped by one process's core); the
results are the same files, written by the master, with a `worker` column in samples.csv and the
per-worker counts under `workers` in summary.json. Workers on other machines: see the locustfile.
"""
import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

from loadtest import settings
from loadtest.report import write_report
from loadtest.spec import LoadSpec, Target, format_targets, parse_targets
from serving.client import TorchServeClient

HERE = Path(__file__).resolve().parent
LOCUST = Path(sys.executable).parent / "locust"
USER_CLASSES = {"rest": ["RestUser"], "grpc": ["GrpcUser"], "both": ["RestUser", "GrpcUser"]}
START_MARGIN_S = 120  # Locust's start (imports, image pools) and shutdown, on top of the load itself
SHAPE_MARGIN_S = 5  # a step load stops itself after its last step; -t is only the backstop


def served_targets(ts_config, key_file) -> tuple[Target, ...]:
    """Every served model and version, each model's share split evenly over its versions."""
    client = TorchServeClient.from_config(ts_config, key_file)
    targets = []
    for model in client.models():
        versions = [v["modelVersion"] for v in client.describe(model)]
        weight = settings.MODEL_WEIGHTS.get(model, 1) / len(versions)
        targets += [Target(model, v, weight) for v in versions]
    return tuple(targets)


def locust_command(spec: LoadSpec, out: Path) -> list[str]:
    """Locust's own options (run time, users, processes), from the spec; the rest, the host included,
    the locustfile reads from <out>/spec.json."""
    files = [HERE / "locustfile.py"] + ([HERE / "step_shape.py"] if spec.step else [])
    run_time = spec.load_s + (SHAPE_MARGIN_S if spec.step else 0)
    cmd = [str(LOCUST), "-f", ",".join(map(str, files)), "--headless", "--only-summary", "--loglevel", "WARNING",
           "-t", f"{run_time:g}s", "--csv", str(out / "locust"), "--html", str(out / "report.html"),
           "--load-spec", str(out / "spec.json"), "--samples-csv", str(out / "samples.csv")]
    if not spec.step:  # the step shape sets the user count itself
        cmd += ["-u", str(spec.users), "-r", f"{spec.spawn_rate:g}"]
    if spec.workers:  # a master here, which forks the workers and waits for all of them before it starts
        cmd += ["--processes", str(spec.workers)]
    return cmd + USER_CLASSES[spec.protocol]


def run_load(spec: LoadSpec, out: Path | None = None) -> tuple[int, Path, dict]:
    """Run Locust as `spec` says, writing into `out` (default: results/loadtest/<time>); -> (its exit
    code, the results folder, the summary). Its output: <out>/locust.log."""
    if not spec.step and spec.duration <= spec.warmup_s:
        sys.exit(f"--duration {spec.duration:g} s leaves nothing after the {spec.warmup_s:g} s warm-up (--warmup-s)")
    if not spec.targets:
        spec = dataclasses.replace(spec, targets=served_targets(spec.ts_config, spec.key_file))
    out = Path(out or settings.RESULTS_DIR / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    spec.write(out / "spec.json")
    load = (f"steps of {','.join(map(str, spec.step_users))} users, {spec.step_s:g} s each" if spec.step else
            f"{spec.users} users for {spec.duration:g} s")
    if spec.workers:
        load += " from one worker process per core" if spec.workers < 0 else f" from {spec.workers} worker processes"
    print(f"Locust: {load}, {spec.protocol}, targets {format_targets(spec.targets)}; log: {out / 'locust.log'}",
          flush=True)
    with open(out / "locust.log", "w") as log:
        code = subprocess.run(locust_command(spec, out), stdout=log, stderr=subprocess.STDOUT,
                              timeout=spec.load_s + START_MARGIN_S).returncode
    if not (out / "samples.csv").exists():
        sys.exit(f"Locust wrote no samples (exit code {code}); see {out / 'locust.log'}")
    return code, out, write_report(out, spec.warmup_s, spec.slo_ms, spec.settle_s, spec.max_error_rate)


def targets_arg(text: str) -> tuple[Target, ...]:
    try:
        return parse_targets(text) if text.strip() else ()  # "": every served model and version
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def user_counts(text: str) -> tuple[int, ...]:
    return tuple(int(u) for u in text.split(","))


def get_args_parser():
    """The LoadSpec's fields as options, by the same names, with its defaults; and --out."""
    d = LoadSpec()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--spawn-rate", type=float, default=d.spawn_rate, help="users started per second")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of load")
    p.add_argument("--protocol", choices=USER_CLASSES, default=d.protocol)
    p.add_argument("--targets", type=targets_arg, default=d.targets,
                   help="model[:version]=weight,...; ping=weight (default: all served)")
    p.add_argument("--think-ms", type=float, default=d.think_ms, help="pause between a user's requests")
    p.add_argument("--step", action="store_true", help="step load (--step-users, --step-s) instead of fixed users")
    p.add_argument("--step-users", type=user_counts, default=d.step_users, help="users per step, comma-separated")
    p.add_argument("--step-s", type=float, default=d.step_s)
    p.add_argument("--settle-s", type=float, default=d.settle_s, help="left out at the start of each step")
    p.add_argument("--slo-ms", type=float, default=d.slo_ms, help="p99 SLO that defines the knee")
    p.add_argument("--warmup-s", type=float, default=d.warmup_s, help="left out of the summary")
    p.add_argument("--check-every", type=int, default=d.check_every, help="check 1 response in N")
    p.add_argument("--max-error-rate", type=float, default=d.max_error_rate)
    p.add_argument("--max-requests", type=int, default=d.max_requests, help="stop after this many")
    p.add_argument("--ts-config", type=Path, default=d.ts_config, help="the server's config.properties")
    p.add_argument("--key-file", default=d.key_file, help="the server's key file ('' = no token)")
    p.add_argument("--host", default=d.host, help="REST base URL (default: inference_address of --ts-config)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="distributed: a Locust master and this many worker processes (0: one process; -1: one per core)")
    p.add_argument("--data-dir", type=Path, default=d.data_dir)
    p.add_argument("--out", type=Path, help="results folder (default: results/loadtest/<time>)")
    return p


def spec_of(args) -> LoadSpec:
    return LoadSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LoadSpec)})


def main(args):
    code, out, summary = run_load(spec_of(args), args.out)
    print((out / "summary.md").read_text())
    for worker in summary.get("workers", []):
        print(f"worker {worker['worker']}: {worker['requests']} requests, {worker['failures']} failed, "
              f"{worker.get('cpu_s', 0):.1f} CPU s")
    print(f"results: {out}")
    if code:
        print("".join(open(out / "locust.log").readlines()[-15:]), file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
