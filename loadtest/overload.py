"""Overload: offer a model several times the request rate it can serve and see what is shed.

    python -m loadtest.overload                                   # ResNet-18, 4x its knee, queue sizes 1000 and 100
    python -m loadtest.overload --model mnist_lenet5 --offered-rps 8000 --queue-sizes 1000 100

TorchServe queues a model version's requests up to its jobQueueSize (models.yaml) and answers the
rest 503 at once. A queue far longer than the workers can drain makes every accepted request wait:
at 1,000 requests per second served, a full queue of 1,000 is a second of waiting. This starts the
model alone once per queue size (its archive's copy with that jobQueueSize, as the benchmark does:
loadtest/servers.py) and offers it --offered-rps for --duration seconds, open-loop as far as Locust
allows: many users, each pausing --think-ms between requests, so that the rate offered hardly
depends on how fast the server answers. Reported per queue size: the rate offered and answered, the
share shed (503), p50/p99 of the accepted and of the shed requests. Writes
results/overload/<time>/overload.md, overload.json and overload.png (latency of accepted requests
over time).
"""
import argparse
import csv
import dataclasses
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from loadtest import settings  # noqa: E402
from loadtest.report import load_samples, machine  # noqa: E402
from loadtest.run import run_load  # noqa: E402
from loadtest.servers import current_config, torchserve  # noqa: E402
from loadtest.spec import LoadSpec, Target  # noqa: E402

KNEE_RPS = {"cifar10_resnet18": 1082, "mnist_lenet5": 1982}  # BENCHMARKS.md: the knee (p99 <= 100 ms)
OVERLOAD_FACTOR = 4
THINK_MS = 250  # each user's pause; users = offered rate x pause, so the rate offered is set by the users


def percentiles(ms: np.ndarray) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None}


def failure_messages(path: Path) -> dict[str, int]:
    """Locust's failures CSV: message -> occurrences (what the shed requests were told)."""
    with open(path, newline="") as f:
        return {row["Error"][:160]: int(row["Occurrences"]) for row in csv.DictReader(f)}


def measure(out: Path, model: str, queue_size: int, offered_rps: float, duration: float, think_ms: float) -> dict:
    config = dataclasses.replace(current_config(), version="1.0" if model != "cifar10_resnet18" else "1.3",
                                 job_queue_size=queue_size)
    users = math.ceil(offered_rps * think_ms / 1000)
    with torchserve(out / "server", model, config) as ts_config:
        run_load(LoadSpec(targets=(Target(model, config.version, 1),), users=users, spawn_rate=users,
                          think_ms=think_ms, duration=duration, max_error_rate=1, ts_config=ts_config,
                          key_file=str(ts_config.parent / "key_file.json")), out / "load")
    samples = load_samples(out / "load" / "samples.csv")
    kept = samples["t_s"] >= settings.WARMUP_S
    seconds = float(samples["t_s"].max()) - settings.WARMUP_S
    ok, ms = samples["ok"][kept], samples["latency_ms"][kept]
    return {"queue_size": queue_size, "version": config.version, "users": users, "think_ms": think_ms,
            "offered_rps": round(len(ms) / seconds, 1), "answered_rps": round(float(ok.sum()) / seconds, 1),
            "shed": round(float((~ok).mean()), 4), "accepted": percentiles(ms[ok]), "refused": percentiles(ms[~ok]),
            "messages": failure_messages(out / "load" / "locust_failures.csv"),
            "timeline": {"t_s": samples["t_s"][kept][ok].tolist()[::20], "ms": ms[ok].tolist()[::20]}}


def markdown(result: dict) -> str:
    lines = [f"# Overload: {result['model']} offered {result['factor']:g}x its knee ({result['target_rps']:,.0f} req/s)",
             "", f"{result['machine']}; {result['duration_s']:g} s per queue size (first {settings.WARMUP_S} s left out).",
             "", "| jobQueueSize | users | offered req/s | answered req/s | shed (503) | accepted p50 / p99 ms | "
             "shed p50 / p99 ms |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['queue_size']} | {r['users']} | {r['offered_rps']:,} | {r['answered_rps']:,} | "
                     f"{r['shed']:.1%} | {r['accepted']['p50_ms']} / {r['accepted']['p99_ms']} | "
                     f"{r['refused']['p50_ms']} / {r['refused']['p99_ms']} |")
    messages = {m for r in result["runs"] for m in r["messages"]}
    lines += ["", "What shed requests were told: " + ("; ".join(sorted(messages)) or "(none shed)"),
              "", "![accepted latency over time](overload.png)"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path):
    fig, ax = plt.subplots(figsize=(9, 4))
    for r in result["runs"]:
        ax.scatter(r["timeline"]["t_s"], r["timeline"]["ms"], s=3, label=f"jobQueueSize {r['queue_size']}")
    ax.set_yscale("log")
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("accepted request latency (ms)")
    ax.set_title(f"{result['model']} at {result['factor']:g}x its knee: every 20th accepted request")
    ax.legend(markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar10_resnet18", choices=sorted(KNEE_RPS))
    p.add_argument("--offered-rps", type=float, help=f"default: {OVERLOAD_FACTOR}x the model's knee (KNEE_RPS)")
    p.add_argument("--queue-sizes", type=int, nargs="+", default=[1000, current_config().job_queue_size])
    p.add_argument("--duration", type=float, default=30, help="seconds of load per queue size")
    p.add_argument("--think-ms", type=float, default=THINK_MS)
    p.add_argument("--out", type=Path, help="results folder (default: results/overload/<time>)")
    return p


def main(args):
    out = (args.out or settings.OVERLOAD_DIR / time.strftime("%Y%m%d-%H%M%S")).resolve()
    offered = args.offered_rps or OVERLOAD_FACTOR * KNEE_RPS[args.model]
    runs = [measure(out / f"queue_{q}", args.model, q, offered, args.duration, args.think_ms) for q in args.queue_sizes]
    result = {"model": args.model, "target_rps": offered, "factor": offered / KNEE_RPS[args.model],
              "duration_s": args.duration, "machine": machine(), "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "overload.json").write_text(json.dumps(result, indent=1))
    (out / "overload.md").write_text(markdown(result))
    plot(result, out / "overload.png")
    print(markdown(result))
    print(f"results: {out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
