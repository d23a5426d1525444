"""Soak: a long mixed load against a TorchServe of its own, watching memory and latency for growth.

    python -m loadtest.soak                    # `make soak`: 20 minutes (not in CI)
    python -m loadtest.soak --minutes 2        # what tests/test_soak.py runs in `make test`

The load is the load test's (loadtest/run.py): Locust over REST and gRPC to every served model and
version, a share of the answers checked against the images' known labels. Meanwhile, every
--sample-s seconds, it records the resident memory (RSS) of TorchServe's frontend (Java) and of each
worker process, and the prediction log's row count. After the warm-up, a process "grows" when a
straight line fitted to its RSS rises by more than GROWTH_LIMIT over the run (a leak shows as a
slope; a JVM filling its heap once shows in the warm-up). Writes results/soak/<time>/: soak.md,
soak.json, soak.png (RSS and p99 over time) and the load test's own files. Exits non-zero when the
load test failed its checks, a worker was replaced, the log lost a row (rows < answers; up to one
row per user more: requests still in flight when Locust stops), or a process grew.
"""
import argparse
import json
import sys
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

import catalog  # noqa: E402,F401 - puts handlers/ on sys.path, for prediction_table
from loadtest import settings  # noqa: E402
from loadtest.report import load_samples  # noqa: E402
from loadtest.run import run_load  # noqa: E402
from loadtest.servers import environment  # noqa: E402
from loadtest.spec import LoadSpec, format_targets  # noqa: E402
from prediction_table import PredictionTable, url_for_run_dir  # noqa: E402
from serving import server  # noqa: E402

MINUTES = 20  # `make soak`
SAMPLE_S = 5  # seconds between memory samples
WARMUP_FRACTION = 0.25  # first part of the run left out of the growth fit (JIT, heap, caches filling)
GROWTH_LIMIT = 0.10  # a fitted RSS rise above this fraction of the process's RSS over the run is growth
MIN_BIN_REQUESTS = 100  # a time bin with fewer requests has no p99 worth plotting
USERS, THINK_MS = 8, 10  # a steady load below the knee: a soak looks for drift, not for the limit


def processes(frontend: psutil.Process) -> dict[str, psutil.Process]:
    """The frontend and its worker processes, named by the worker's socket (stable while it lives)."""
    found = {"frontend": frontend}
    for child in frontend.children(recursive=True):
        cmdline = child.cmdline()
        if "--sock-name" in cmdline:
            found[f"worker {cmdline[cmdline.index('--sock-name') + 1].rsplit('.', 1)[-1]}"] = child
    return found


class Sampler(threading.Thread):
    """RSS of every server process and the log's row count, every `interval` seconds, until stopped."""

    def __init__(self, frontend_pid: int, log: PredictionTable, interval: float):
        super().__init__(daemon=True)
        self.frontend, self.log, self.interval = psutil.Process(frontend_pid), log, interval
        self.rows, self.pids, self.done = [], {}, threading.Event()

    def run(self):
        start = time.time()
        while not self.done.is_set():
            sample = {"t_s": round(time.time() - start, 1), "log_rows": self.log.count()}
            for name, process in processes(self.frontend).items():
                try:
                    sample[name] = process.memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    continue
                self.pids.setdefault(name, set()).add(process.pid)
            self.rows.append(sample)
            self.done.wait(self.interval)


def growth(t: np.ndarray, rss: np.ndarray) -> float:
    """The rise of a straight line fitted to RSS over the run, as a fraction of the mean RSS."""
    if len(t) < 3:
        return 0.0
    slope = np.polyfit(t, rss, 1)[0]
    return float(slope * (t[-1] - t[0]) / rss.mean())


def p99_over_time(samples: dict, bin_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin start s, p99 ms of the bin, failed requests in the bin)."""
    edges = np.arange(0, samples["t_s"].max() + bin_s, bin_s)
    which = np.digitize(samples["t_s"], edges) - 1
    starts, p99, errors = [], [], []
    for b in np.unique(which):
        mask = which == b
        if mask.sum() < MIN_BIN_REQUESTS:  # the run's last moments: too few answers for a p99
            continue
        starts.append(edges[b])
        p99.append(np.percentile(samples["latency_ms"][mask], 99))
        errors.append(int((~samples["ok"][mask]).sum()))
    return np.asarray(starts), np.asarray(p99), np.asarray(errors)


def analyse(memory: list[dict], pids: dict, samples: dict, load_summary: dict, rows: int, seconds: float) -> dict:
    t = np.asarray([m["t_s"] for m in memory])
    kept = t >= WARMUP_FRACTION * seconds
    names = sorted({k for m in memory for k in m} - {"t_s", "log_rows"})
    per_process = {}
    for name in names:
        have = np.asarray([name in m for m in memory]) & kept
        rss = np.asarray([m[name] for m, h in zip(memory, have) if h])
        per_process[name] = {"rss_start_mb": round(float(rss[0]), 1) if len(rss) else None,
                             "rss_end_mb": round(float(rss[-1]), 1) if len(rss) else None,
                             "growth": round(growth(t[have], rss), 4), "pids": len(pids.get(name, ()))}
    bin_s = max(10, round(seconds / 20 / 10) * 10)  # about 20 bins, whole tens of seconds
    starts, p99, errors = p99_over_time(samples, bin_s)
    total = load_summary["series"]["total"]
    answers = int(samples["ok"].sum())
    problems = [f"{n} grew {p['growth']:.1%} (limit {GROWTH_LIMIT:.0%})" for n, p in per_process.items()
                if p["growth"] > GROWTH_LIMIT]
    problems += [f"{n} was replaced ({p['pids']} processes)" for n, p in per_process.items() if p["pids"] > 1]
    # Requests in flight when Locust stops are answered and logged but never counted: at most one per user.
    if not answers <= rows <= answers + USERS:
        problems.append(f"the prediction log holds {rows} rows for {answers} answers ({USERS} users)")
    if total["failures"] or load_summary.get("wrong_labels"):
        problems.append(f"{total['failures']} failed requests, {load_summary.get('wrong_labels')} wrong labels")
    return {"seconds": round(seconds, 1), "requests": int(len(samples["ok"])), "answers": answers, "log_rows": rows,
            "failures": total["failures"], "wrong_labels": load_summary.get("wrong_labels"),
            "throughput_rps": total["throughput_rps"], "p50_ms": total["p50_ms"], "p99_ms": total["p99_ms"],
            "p99_bins": {"bin_s": bin_s, "start_s": starts.tolist(), "p99_ms": np.round(p99, 2).tolist(),
                         "errors": errors.tolist()},
            "processes": per_process, "memory": memory, "problems": problems}


def plot(result: dict, path: Path):
    fig, (mem, lat) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    t = [m["t_s"] for m in result["memory"]]
    for name in result["processes"]:
        mem.plot(t, [m.get(name, np.nan) for m in result["memory"]], label=name)
    mem.axvline(WARMUP_FRACTION * result["seconds"], color="grey", ls=":", label="end of warm-up")
    mem.set_ylabel("RSS (MiB)")
    mem.set_title("Memory of TorchServe's processes")
    mem.legend(fontsize=8)
    bins = result["p99_bins"]
    lat.plot(bins["start_s"], bins["p99_ms"], marker="o", label=f"p99 per {bins['bin_s']:g} s")
    lat.set_ylabel("p99 latency (ms)")
    lat.set_xlabel("seconds into the soak")
    lat.set_title(f"{result['answers']:,} answers, {result['failures']} failed, {result['log_rows']:,} log rows")
    lat.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict, load: str) -> str:
    lines = [f"# Soak: {result['seconds'] / 60:.1f} min, {load}", "",
             f"{result['answers']:,} answers at {result['throughput_rps']:,} req/s, p50 {result['p50_ms']} ms, "
             f"p99 {result['p99_ms']} ms; {result['failures']} failed, {result['wrong_labels']} wrong labels; "
             f"prediction log: {result['log_rows']:,} rows.", "",
             "| process | RSS after warm-up (MiB) | RSS at end (MiB) | fitted growth after warm-up | processes |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {p['rss_start_mb']} | {p['rss_end_mb']} | {p['growth']:+.1%} | {p['pids']} |"
              for n, p in result["processes"].items()]
    bins = result["p99_bins"]
    lines += ["", f"p99 per {bins['bin_s']:g} s (ms): " + ", ".join(f"{v:g}" for v in bins["p99_ms"]), "",
              "Verdict: " + ("; ".join(result["problems"]) if result["problems"] else
                             f"no growth beyond the warm-up (limit {GROWTH_LIMIT:.0%}), no failure, no row lost"),
              "", "![memory and p99 over time](soak.png)"]
    return "\n".join(lines) + "\n"


def soak(out: Path, minutes: float, sample_s: float = SAMPLE_S) -> dict:
    """Start a TorchServe in out/server, soak it for `minutes`, stop it; -> the result (also written)."""
    run_dir = out / "server"
    run_dir.mkdir(parents=True)
    # No row limit for this server (its workers inherit this environment): the soak counts one row
    # per answer; retention is tested apart (tests/test_prediction_log.py).
    with environment(PREDICTION_LOG_MAX_ROWS="0"):
        server.start(run_dir, server.free_ports())
    try:
        sampler = Sampler(server.pid(run_dir), PredictionTable(url_for_run_dir(run_dir)), sample_s)
        spec = LoadSpec(protocol="both", users=USERS, spawn_rate=USERS, think_ms=THINK_MS, duration=minutes * 60,
                        warmup_s=0, ts_config=run_dir / "config.properties", key_file=str(run_dir / "key_file.json"))
        sampler.start()
        code, _, load_summary = run_load(spec, out / "load")
        sampler.done.set()
        sampler.join()
        rows = sampler.log.count()
    finally:
        server.stop(run_dir)
    samples = load_samples(out / "load" / "samples.csv")
    result = analyse(sampler.rows, sampler.pids, samples, load_summary, rows, float(samples["t_s"].max()))
    if code and not result["problems"]:
        result["problems"].append(f"the load test failed its checks (exit code {code}): see load/locust.log")
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    targets = format_targets(LoadSpec.read(out / "load" / "spec.json").targets)  # as run_load found them served
    (out / "soak.md").write_text(markdown(result, f"{USERS} users ({THINK_MS:g} ms think time), REST + gRPC, "
                                                  f"targets {targets}"))
    plot(result, out / "soak.png")
    return result


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=MINUTES)
    p.add_argument("--sample-s", type=float, default=SAMPLE_S, help="seconds between memory samples")
    p.add_argument("--out", type=Path, help="results folder (default: results/soak/<time>)")
    return p


def main(args):
    out = args.out or settings.SOAK_DIR / time.strftime("%Y%m%d-%H%M%S")
    result = soak(out, args.minutes, args.sample_s)
    print((out / "soak.md").read_text())
    print(f"results: {out}")
    sys.exit(1 if result["problems"] else 0)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
