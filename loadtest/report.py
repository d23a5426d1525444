"""The reports: of one load-test run, from its samples.csv (every request, written by the
locustfile): throughput, p50/p95/p99/max latency and error rate per protocol, model and version; for
a step load, the same per step and the knee (the highest throughput whose p99 stays under the SLO).
And of the serving benchmark (loadtest/bench.py): its tables (bench.md) and the sweep's plot.

    python -m loadtest.report results/loadtest/<run>      # writes summary.md, summary.json, latency.png
"""
import argparse
import csv
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import catalog  # noqa: E402
from loadtest.settings import MAX_ERROR_RATE, SETTLE_S, SLO_P99_MS, USERS, WARMUP_S  # noqa: E402

PERCENTILES = {"p50_ms": 50, "p95_ms": 95, "p99_ms": 99}


def load_samples(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {k: [r[k] for r in rows] for k in ("t_s", "protocol", "target", "latency_ms", "ok", "users")}
    return {"t_s": np.asarray(columns["t_s"], float), "latency_ms": np.asarray(columns["latency_ms"], float),
            "ok": np.asarray(columns["ok"], int).astype(bool), "users": np.asarray(columns["users"], int),
            "series": np.asarray([f"{p} {t}" for p, t in zip(columns["protocol"], columns["target"])])}


def select(samples: dict, mask: np.ndarray) -> dict:
    return {k: v[mask] for k, v in samples.items()}


def stats(samples: dict, seconds: float) -> dict:
    """Throughput counts answered requests (ok); latency percentiles cover every request."""
    ms, n = samples["latency_ms"], len(samples["latency_ms"])
    row = {"requests": n, "failures": int((~samples["ok"]).sum()), "seconds": round(seconds, 2),
           "throughput_rps": round(float(samples["ok"].sum()) / seconds, 1) if seconds > 0 else 0.0,
           "error_rate": round(float((~samples["ok"]).mean()), 5) if n else 0.0}
    row.update({k: round(float(np.percentile(ms, q)), 2) if n else None for k, q in PERCENTILES.items()})
    row["max_ms"] = round(float(ms.max()), 2) if n else None
    return row


def measured_window(samples: dict, warmup_s: float) -> tuple[dict, float]:
    kept = select(samples, samples["t_s"] >= warmup_s)
    return kept, (float(kept["t_s"].max()) - warmup_s if len(kept["t_s"]) else 0.0)


def per_series(samples: dict, seconds: float) -> dict[str, dict]:
    rows = {name: stats(select(samples, samples["series"] == name), seconds) for name in np.unique(samples["series"])}
    rows["total"] = stats(samples, seconds)
    return rows


def steps(samples: dict, settle_s: float) -> list[dict]:
    """One row per run of constant user count, its first settle_s seconds left out."""
    users, t = samples["users"], samples["t_s"]
    edges = np.flatnonzero(np.diff(users)) + 1
    rows = []
    for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(users)]):
        begin, end = t[lo] + settle_s, t[hi - 1]
        if end - begin < 1 or users[lo] == 0:
            continue
        part = select(samples, (np.arange(len(t)) >= lo) & (np.arange(len(t)) < hi) & (t >= begin))
        rows.append({"users": int(users[lo]), **stats(part, end - begin)})
    return rows


def knee(rows: list[dict], slo_ms: float, max_error_rate: float) -> dict | None:
    """The step with the highest throughput whose p99 meets the SLO (and whose errors stay under the limit)."""
    good = [r for r in rows if r["p99_ms"] is not None and r["p99_ms"] <= slo_ms and r["error_rate"] <= max_error_rate]
    return max(good, key=lambda r: r["throughput_rps"]) if good else None


def plot_latency(samples: dict, path: Path, slo_ms: float):
    """Per second over the whole run: p50 and p99 latency above, answered requests and users below."""
    t, ms = samples["t_s"], samples["latency_ms"]
    second = t.astype(int)
    seconds = np.arange(second.max() + 1)
    per_second = [ms[second == s] for s in seconds]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=(2, 1))
    for q in (50, 99):
        top.plot(seconds, [np.percentile(v, q) if len(v) else np.nan for v in per_second], label=f"p{q}")
    top.axhline(slo_ms, color="grey", ls="--", lw=1, label=f"SLO: p99 {slo_ms:g} ms")
    top.set(ylabel="latency (ms)", yscale="log")
    top.legend(loc="upper left", fontsize=8)
    bottom.plot(seconds, np.bincount(second[samples["ok"]], minlength=len(seconds)), color="green")
    bottom.set(xlabel="time (s)", ylabel="answered req/s")
    users = bottom.twinx()
    users.step(seconds, [samples["users"][second == s].max() if (second == s).any() else np.nan for s in seconds],
               color="black", lw=1, ls=":", where="post")
    users.set_ylabel("users (dotted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: dict[str, dict] | list[dict], first: str) -> list[str]:
    items = rows.items() if isinstance(rows, dict) else [(r["users"], r) for r in rows]
    lines = [f"| {first} | req/s | p50 ms | p95 ms | p99 ms | max ms | requests | errors |", "|---" * 8 + "|"]
    for name, r in items:
        lines.append(f"| {name} | {r['throughput_rps']:.1f} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
                     f"{r['max_ms']} | {r['requests']} | {r['failures']} ({r['error_rate']:.2%}) |")
    return lines


def markdown(summary: dict) -> str:
    lines = [f"# Load test {summary['run']}", "",
             f"Measured after a {summary['warmup_s']:g} s warm-up, over {summary['series']['total']['seconds']:g} s. "
             "Throughput counts answered requests; latencies are client-side (Locust), every request counted.", ""]
    lines += table(summary["series"], "protocol, target") + [""]
    if "cpu_s" in summary and summary["all_requests"]:
        lines += [f"Labels checked: {summary['checked']}, wrong: {summary['wrong_labels']}. The load generator "
                  f"(Locust) used {1000 * summary['cpu_s'] / summary['all_requests']:.2f} CPU ms per request, "
                  "on the same cores as the server.", ""]
    if summary["steps"]:
        best = summary["knee"]
        lines += [f"## Steps (first {summary['settle_s']:g} s of each left out)", ""] + table(summary["steps"], "users")
        lines += ["", f"**Knee** (highest throughput with p99 <= {summary['slo_ms']:g} ms): "
                  + (f"{best['throughput_rps']:.1f} req/s at {best['users']} users, p99 {best['p99_ms']} ms"
                     if best else "none: no step met the SLO"), ""]
    lines += ["![latency over time](latency.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: Path, warmup_s: float = WARMUP_S, slo_ms: float = SLO_P99_MS,
                 settle_s: float = SETTLE_S, max_error_rate: float = MAX_ERROR_RATE) -> dict:
    """Write summary.json, summary.md and latency.png for the run in run_dir; -> the summary."""
    run_dir = Path(run_dir)
    samples = load_samples(run_dir / "samples.csv")
    kept, seconds = measured_window(samples, warmup_s)
    step_rows = steps(samples, settle_s) if len(np.unique(samples["users"][samples["users"] > 0])) > 1 else []
    summary = {"run": run_dir.name, "warmup_s": warmup_s, "settle_s": settle_s, "slo_ms": slo_ms,
               "series": per_series(kept, seconds), "steps": step_rows,
               "knee": knee(step_rows, slo_ms, max_error_rate) if step_rows else None,
               "all_requests": len(samples["t_s"])}
    loadgen = run_dir / "loadgen.json"  # label checks and Locust's CPU, written by the locustfile
    summary.update(json.loads(loadgen.read_text()) if loadgen.exists() else {})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (run_dir / "summary.md").write_text(markdown(summary))
    if len(samples["t_s"]):
        plot_latency(samples, run_dir / "latency.png", slo_ms)
    return summary


# The serving benchmark's report (bench.json -> bench.md, sweep.png).
def machine() -> str:
    """The machine, for a report's heading."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{catalog.cpu_name()}, {os.cpu_count()} cores, {memory_gib:.0f} GiB"


def ratio(numerator: dict | None, denominator: dict | None, key: str = "throughput_rps") -> float | None:
    return round(numerator[key] / denominator[key], 2) if numerator and denominator else None


def plot_sweep(results: dict, path: Path):
    """Throughput (bars) and p99 (dots) of every sweep point, one panel per model."""
    models = [m for m in results["sweep"] if results["sweep"][m]]
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 4 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        points = results["sweep"][model]
        names = [p["name"] for p in points]
        totals = [p["summary"]["series"]["total"] for p in points]
        ax.bar(names, [t["throughput_rps"] for t in totals], color="tab:blue")
        flask = results["baseline"][model]["series"]["total"]["throughput_rps"]
        ax.axhline(flask, color="tab:red", ls="--", label=f"Flask baseline: {flask:.0f} req/s")
        ax.legend(loc="upper left", fontsize=8)
        ax.set_ylabel("req/s (bars)")
        ax.set_title(f"{model}: {USERS} users, closed loop")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        p99 = ax.twinx()
        p99.plot(names, [t["p99_ms"] for t in totals], "o", color="black")
        p99.set_ylabel("p99 ms (dots)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cells(row: dict, other_cores: float) -> str:
    return (f"{row['throughput_rps']:.1f} | {row['p50_ms']} | {row['p99_ms']} | {row['failures']} | "
            f"{other_cores:.2f}")


def bench_markdown(results: dict) -> str:
    """bench.md: every table of a benchmark run (loadtest/bench.py's bench.json)."""
    lines = [f"# Serving benchmark {results['started']}", "", f"Prediction log: {results['prediction_log']}. "
             f"Machine: {results['machine']}. {USERS} closed-loop users unless said otherwise. "
             "`other cores`: CPU that other processes on the machine used during the run (contention).", ""]
    for model, points in results["sweep"].items():
        lines += [f"## Sweep: {model} ({results['sweep_s']:g} s per point)", "",
                  "| setting | req/s | p50 ms | p99 ms | errors | other cores | queue ms | worker ms | "
                  "outside frontend ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in points:
            split = p["split"]
            lines.append(f"| {p['name']} | {_cells(p['summary']['series']['total'], p['summary']['other_cores'])} | "
                         f"{split['queue_ms']} | {split['worker_ms']} | {split['outside_frontend_ms']} |")
        lines += [""] + [f"Tuned ({model}, {name}): {c['name']}" for name, c in results["tuned"][model].items()]
        lines += [""]
    lines += ["## Flask baseline by torch threads (0 = torch's default, one per core)", "",
              "| run | req/s | p50 ms | p99 ms | errors | other cores |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {_cells(r['series']['total'], r['other_cores'])} |"
              for k, r in results["baseline"]["threads"].items()]
    lines += ["", "## Side by side", "",
              "| server | model | req/s | p50 ms | p99 ms | errors | other cores | knee req/s (p99 ms, users) |",
              "|---|---|---|---|---|---|---|---|"]
    for row in results["side_by_side"]:
        k = row.get("knee")
        knee = f"{k['throughput_rps']:.1f} ({k['p99_ms']}, {k['users']})" if k else "-"
        lines.append(f"| {row['server']} | {row['model']} | {_cells(row, row['other_cores'])} | {knee} |")
    lines += ["", "Ratios, TorchServe / Flask (p99: below 1 is better):", "",
              "| model, TorchServe variant | req/s | p99 | knee req/s / Flask's knee | knee req/s / Flask at "
              f"{USERS} users | req/s, prediction log off |", "|---|---|---|---|---|---|",
              f"| /ping (HTTP floor) | {results['ratios']['ping']} | - | - | - | - |"]
    lines += [f"| {name} | {r['throughput']} | {r['p99']} | {r['knee_throughput']} | {r['knee_vs_baseline_at_users']} | "
              f"{r.get('throughput_log_off', '-')} |" for name, r in results["ratios"].items() if name != "ping"]
    lines += ["", "## Where TorchServe's time goes (mean ms per request, tuned settings)", "",
              "| server | model | client | outside frontend (HTTP, Netty, load generator) | queue | "
              "worker (IPC + handler) |", "|---|---|---|---|---|---|"]
    for r in results["side_by_side"]:
        if "split" in r:
            s = r["split"]
            lines.append(f"| {r['server']} | {r['model']} | {s['client_mean_ms']} | {s['outside_frontend_ms']} | "
                         f"{s['queue_ms']} | {s['worker_ms']} |")
    lines += ["", "## CPU per request (ms, user + system, whole run; 2 cores = 2000 ms per second)", "",
              "| server | model | load generator | frontend (Java) | workers (Python) | Flask app |",
              "|---|---|---|---|---|---|"]
    for r in results["side_by_side"]:
        if "cpu" in r:
            c = r["cpu"]
            lines.append(f"| {r['server']} | {r['model']} | {c['load generator']} | {c.get('frontend', '-')} | "
                         f"{c.get('workers', '-')} | {c.get('Flask app', '-')} |")
    lines += ["", f"Model time in-process, one thread (ms): {json.dumps(results['model_time'])}", ""]
    return "\n".join(lines)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a folder holding samples.csv")
    p.add_argument("--warmup-s", type=float, default=WARMUP_S)
    p.add_argument("--slo-ms", type=float, default=SLO_P99_MS)
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    print(markdown(write_report(args.run_dir, args.warmup_s, args.slo_ms)))
