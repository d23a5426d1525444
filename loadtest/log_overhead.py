"""What recording every prediction costs: the same load test with the prediction log on and off.

    python -m loadtest.log_overhead            # writes results/log_overhead/summary.md

Phases alternate (on, off, on, off) on fresh TorchServe instances serving mnist_lenet5 1.0 (the
cheapest model, so the log's share of the work is the largest), each under the same Locust load.
The median throughput of the "on" phases is compared with that of the "off" phases. After each "on"
phase the log must hold a row for every successful response of the load test; it may hold up to one
more per user: requests the server answered (and logged) after Locust stopped waiting for them.
"""
import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

import catalog  # noqa: F401 - puts handlers/ on sys.path, for prediction_table
from loadtest.run import run_load
from loadtest.servers import environment
from loadtest.settings import LOG_OVERHEAD_DIR as RESULTS
from loadtest.spec import LoadSpec, Target
from prediction_table import PredictionTable, url_for_run_dir
from serving import server

MODEL = "mnist_lenet5=mnist_lenet5_v1.0.mar"


def phase(logging_on: bool, users: int, duration: float, out: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="logoverhead-"))
    spec = LoadSpec(targets=(Target("mnist_lenet5", "1.0", 1),), users=users, duration=duration,
                    ts_config=run_dir / "config.properties", key_file=str(run_dir / "key_file.json"))
    with environment(PREDICTION_LOG_URL=None if logging_on else "off"):  # None: SQLite in the run folder
        try:
            server.start(run_dir, server.free_ports(), models=[MODEL])
            code, _, summary = run_load(spec, out)
        finally:
            server.stop(run_dir)
        logged = PredictionTable(url_for_run_dir(run_dir)).count(client="loadtest") if logging_on else None
    if code:
        sys.exit(f"the load test failed its checks: see {out / 'locust.log'}")
    summary = summary["series"]["total"]
    with open(out / "samples.csv", newline="") as f:
        answered = sum(row["ok"] in ("1", "True", "true") for row in csv.DictReader(f))
    return {"log": "on" if logging_on else "off", "throughput_rps": summary["throughput_rps"],
            "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"], "answered": answered, "logged": logged}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--duration", type=float, default=20, help="seconds of load per phase")
    p.add_argument("--rounds", type=int, default=2, help="on/off pairs")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(args.rounds):
        for on in (True, False):
            rows.append(phase(on, args.users, args.duration, RESULTS / f"round{i}_{'on' if on else 'off'}"))
            print(rows[-1], flush=True)
    on = statistics.median(r["throughput_rps"] for r in rows if r["log"] == "on")
    off = statistics.median(r["throughput_rps"] for r in rows if r["log"] == "off")
    lost = [r for r in rows if r["log"] == "on" and not 0 <= r["logged"] - r["answered"] <= args.users]
    lines = ["| phase | log | throughput (req/s) | p50 (ms) | p99 (ms) | answered | logged rows |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['log']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['answered']} | "
              f"{r['logged'] if r['logged'] is not None else '-'} |" for i, r in enumerate(rows)]
    lines += ["", f"Median throughput with the log on: {on:.1f} req/s, off: {off:.1f} req/s: "
                  f"{100 * (on / off - 1):+.1f}% ({args.users} users, {args.duration:g} s per phase).",
              "Every on-phase logged all its successful responses (plus at most one in-flight request per user "
              "that was answered after the load generator stopped)." if not lost else
              f"MISMATCH between logged rows and answered requests: {lost}"]
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
