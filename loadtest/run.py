"""Run a headless Locust load test against a running server and summarise it (`make loadtest`).

    python -m loadtest.run                                      # 16 users, 60 s, every served model/version
    python -m loadtest.run --users 32 --duration 30 --protocol grpc --targets "mnist_lenet5:1.1=1"
    python -m loadtest.run --step --targets cifar10_resnet18    # step load: finds the knee under the SLO
    python -m loadtest.run --host http://127.0.0.1:8090 --key-file "" --targets mnist_lenet5   # Flask baseline
    python -m loadtest.run --workers 4 --users 64                # distributed: a master and 4 worker processes
    python -m loadtest.run --workers 4 --host http://<load balancer>:8080 --key-file keys.json --targets mnist_lenet5

By default it targets the server `make serve` started (config.properties, .run/key_file.json) and
sends to every served model and version (weights: settings.MODEL_WEIGHTS). Writes
results/loadtest/<time>/: Locust's CSV (locust_*.csv) and HTML report (report.html), its log,
samples.csv (every request), summary.md/.json and latency.png. Exits non-zero when the run fails its
checks (error rate over --max-error-rate, or a checked response with the wrong label).

--workers N runs Locust distributed on this machine (`locust --processes N`: one master that spawns
and counts, N worker processes that send, so the load is not capped by one process's core); the
results are the same files, written by the master, with a `worker` column in samples.csv and the
per-worker counts under `workers` in summary.json. Workers on other machines: see the locustfile.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

from loadtest import settings
from loadtest.report import write_report
from training.data import DEFAULT_DATA_DIR
from serving.client import TorchServeClient

HERE = Path(__file__).resolve().parent
LOCUST = Path(sys.executable).parent / "locust"
USER_CLASSES = {"rest": ["RestUser"], "grpc": ["GrpcUser"], "both": ["RestUser", "GrpcUser"]}
START_MARGIN_S = 120  # Locust's start (imports, image pools) and shutdown, on top of the load itself
SHAPE_MARGIN_S = 5  # a step load stops itself after its last step; -t is only the backstop


def served_targets(ts_config, key_file) -> str:
    """Every served model and version, each model's share split evenly over its versions."""
    client = TorchServeClient.from_config(ts_config, key_file)
    targets = []
    for model in client.models():
        versions = [v["modelVersion"] for v in client.describe(model)]
        weight = settings.MODEL_WEIGHTS.get(model, 1) / len(versions)
        targets += [f"{model}:{v}={weight:g}" for v in versions]
    return ",".join(targets)


def load_seconds(args) -> float:
    return len(args.step_users.split(",")) * args.step_s if args.step else args.duration


def locust_command(args, out: Path) -> list[str]:
    files = [HERE / "locustfile.py"] + ([HERE / "step_shape.py"] if args.step else [])
    run_time = load_seconds(args) + (SHAPE_MARGIN_S if args.step else 0)
    cmd = [str(LOCUST), "-f", ",".join(map(str, files)), "--headless", "--only-summary", "--loglevel", "WARNING",
           "-t", f"{run_time:g}s", "--csv", str(out / "locust"), "--html", str(out / "report.html"),
           "--targets", args.targets, "--ts-config", str(args.ts_config), "--key-file", str(args.key_file),
           "--think-ms", f"{args.think_ms:g}", "--check-every", str(args.check_every),
           "--max-error-rate", f"{args.max_error_rate:g}", "--max-requests", str(args.max_requests),
           "--data-dir", str(args.data_dir), "--samples-csv", str(out / "samples.csv")]
    if args.step:
        cmd += ["--step-users", args.step_users, "--step-s", f"{args.step_s:g}"]
    else:
        cmd += ["-u", str(args.users), "-r", f"{args.spawn_rate:g}"]
    if args.host:
        cmd += ["--host", args.host]
    if args.workers:  # a master here, which forks the workers and waits for all of them before it starts
        cmd += ["--processes", str(args.workers)]
    return cmd + USER_CLASSES[args.protocol]


def run_load(args) -> tuple[int, Path, dict]:
    """Run Locust as configured; -> (its exit code, results folder, summary). Its output: <out>/locust.log."""
    if not args.step and args.duration <= args.warmup_s:
        sys.exit(f"--duration {args.duration:g} s leaves nothing after the {args.warmup_s:g} s warm-up (--warmup-s)")
    if not args.targets:
        args.targets = served_targets(args.ts_config, args.key_file)
    out = Path(args.out or settings.RESULTS_DIR / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    load = f"steps of {args.step_users} users, {args.step_s:g} s each" if args.step else \
        f"{args.users} users for {args.duration:g} s"
    if args.workers:
        load += " from one worker process per core" if args.workers < 0 else f" from {args.workers} worker processes"
    print(f"Locust: {load}, {args.protocol}, targets {args.targets}; log: {out / 'locust.log'}", flush=True)
    with open(out / "locust.log", "w") as log:
        code = subprocess.run(locust_command(args, out), stdout=log, stderr=subprocess.STDOUT,
                              timeout=load_seconds(args) + START_MARGIN_S).returncode
    if not (out / "samples.csv").exists():
        sys.exit(f"Locust wrote no samples (exit code {code}); see {out / 'locust.log'}")
    return code, out, write_report(out, args.warmup_s, args.slo_ms, args.settle_s, args.max_error_rate)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=settings.USERS)
    p.add_argument("--spawn-rate", type=float, default=settings.SPAWN_RATE, help="users started per second")
    p.add_argument("--duration", type=float, default=settings.DURATION_S, help="seconds of load")
    p.add_argument("--protocol", choices=USER_CLASSES, default="rest")
    p.add_argument("--targets", default="", help="model[:version]=weight,...; ping=weight (default: all served)")
    p.add_argument("--think-ms", type=float, default=settings.THINK_TIME_MS, help="pause between a user's requests")
    p.add_argument("--step", action="store_true", help="step load (--step-users, --step-s) instead of fixed users")
    p.add_argument("--step-users", default=",".join(map(str, settings.STEP_USERS)))
    p.add_argument("--step-s", type=float, default=settings.STEP_S)
    p.add_argument("--settle-s", type=float, default=settings.SETTLE_S, help="left out at the start of each step")
    p.add_argument("--slo-ms", type=float, default=settings.SLO_P99_MS, help="p99 SLO that defines the knee")
    p.add_argument("--warmup-s", type=float, default=settings.WARMUP_S, help="left out of the summary")
    p.add_argument("--check-every", type=int, default=settings.CHECK_EVERY, help="check 1 response in N")
    p.add_argument("--max-error-rate", type=float, default=settings.MAX_ERROR_RATE)
    p.add_argument("--max-requests", type=int, default=settings.MAX_REQUESTS, help="stop after this many")
    p.add_argument("--ts-config", type=Path, default=settings.TS_CONFIG, help="the server's config.properties")
    p.add_argument("--key-file", default=str(settings.KEY_FILE), help="the server's key file ('' = no token)")
    p.add_argument("--host", default="", help="REST base URL (default: inference_address of --ts-config)")
    p.add_argument("--workers", type=int, default=0,
                   help="distributed: a Locust master and this many worker processes (0: one process; -1: one per core)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--out", type=Path, help="results folder (default: results/loadtest/<time>)")
    return p


def main(args):
    code, out, summary = run_load(args)
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
