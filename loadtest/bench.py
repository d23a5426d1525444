"""Benchmark: sweep TorchServe's serving settings and compare with the Flask baseline, in one run, on
this machine, under the same Locust load (`make bench-serving`).

    python -m loadtest.bench                           # the whole sweep and the side-by-side (~45 min)
    python -m loadtest.bench --models mnist_lenet5 --sweep-s 8 --final-s 8 --only "current defaults"  # a try

For each model it starts TorchServe alone on free ports once per setting (workers, batch size, batch
delay, threads per worker, Netty threads, format), each from a copy of the model's archive whose
model-config.yaml carries the setting, and runs USERS closed-loop users against it. The sweep starts
from the served defaults: models.yaml's settings and each model's default version (`make tune`'s
choice on this CPU); every other archived format is a point of it too. The changes that
beat the current defaults are combined and measured too; the fastest point whose p99 stays within
the limit (LeNet-5: the Flask baseline's p99; ResNet-18: the SLO) is "tuned" and measured side by
side with the Flask baseline (the fp32 TorchScript export, one request per thread), under the same loads: USERS users
for throughput and p99, and a step load for the knee (highest throughput with p99 under the SLO).
LOADTEST_MODEL_STORE / LOADTEST_EXPORT_DIR (loadtest/settings.py) point it at other archives and
exports than the project's. It also measures the HTTP floor
(GET /ping), splits TorchServe's request time with its own Prometheus counters (queue wait, worker
round trip, the rest outside the frontend), and times the model in-process.

Writes results/bench/<time>/: bench.json (every measurement), bench.md (the tables), sweep.png, and
each load run's own folder (spec.json, summary.md, latency.png, Locust's CSV and HTML).

This file runs the measurements in order; the parts are loadtest/servers.py (starting and stopping
TorchServe and the Flask baseline), probes.py (Prometheus counters, CPU accounting, in-process
timing), tuning.py (which settings are measured and kept), spec.py + run.py (each Locust run) and
report.py (bench.md, sweep.png).
"""
import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from catalog import archive_name
from loadtest import probes, settings
from loadtest.report import bench_markdown, machine, plot_sweep, ratio
from loadtest.run import run_load
from loadtest.servers import archived_formats, current_config, environment, flask_baseline, torchserve
from loadtest.spec import PING, LoadSpec, Target
from loadtest.tuning import ANY_FORMAT, DEFAULT_FORMAT, ServingConfig, p99_limit, sweep
from serving import server

SWEEP_S = 25  # seconds of load per sweep point (the first WARMUP_S are left out)
FINAL_S = 45  # seconds of load per side-by-side run
STEP_S = 12  # seconds per step of the knee search
MODELS = ("mnist_lenet5", "cifar10_resnet18")
BASELINE_THREADS = (1, 0)  # torch threads tried for the Flask app: 1, and torch's default (0: one per core)


def load(out: Path, server_pid: int, spec: LoadSpec) -> dict:
    """One Locust run of `spec` -> its summary, with `passed`: whether it met its checks (a
    reduced-precision format may answer a few labels differently; the run is kept, marked failed),
    and `other_cores`: the CPU that processes other than the server, Locust and this one used
    meanwhile."""
    ours = {os.getpid(), *probes.process_tree(server_pid)}
    before, start = probes.cpu_by_process(), time.time()
    code, _, summary = run_load(spec, out)
    after = probes.cpu_by_process()  # Locust has exited: it is in neither snapshot
    if code:
        print(f"    load test failed its checks: see {out / 'locust.log'}", flush=True)
    return {**summary, "passed": code == 0,
            "other_cores": probes.other_cores(before, after, ours, time.time() - start)}


# USERS users, all started at once, at one target of a TorchServe the benchmark started or of the
# Flask baseline (no token).
def against_torchserve(ts_config: Path, target: Target, duration: float) -> LoadSpec:
    return LoadSpec(targets=(target,), spawn_rate=settings.USERS, duration=duration, ts_config=ts_config,
                    key_file=str(ts_config.parent / "key_file.json"))


def against_flask(url: str, target: Target, duration: float) -> LoadSpec:
    return LoadSpec(targets=(target,), spawn_rate=settings.USERS, duration=duration, host=url, key_file="")


def measure_torchserve(out: Path, model: str, config: ServingConfig, duration: float,
                       step_s: float | None = None) -> dict:
    """TorchServe serving `model` with `config` under USERS users (or a step load of step_s seconds
    per step): the load test's summary, where its time went, its CPU per request."""
    with torchserve(out / "server", model, config) as ts_config:
        pid = server.pid(ts_config.parent)
        counters, cpu = probes.frontend_counters(ts_config), probes.cpu_seconds(pid)
        spec = against_torchserve(ts_config, Target(model, config.version, 1), duration)
        summary = load(out / "load", pid, dataclasses.replace(spec, step=True, step_s=step_s) if step_s else spec)
        split = probes.time_split(counters, probes.frontend_counters(ts_config), probes.client_mean_ms(out / "load"))
        cpu = probes.cpu_per_request(cpu, probes.cpu_seconds(pid), summary, ("frontend", "workers"))
    return {"config": dataclasses.asdict(config), "summary": summary, "split": split, "cpu": cpu}


def _line(row: dict) -> str:
    return (f"{row['throughput_rps']:.1f} req/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
            f"{row['failures']} errors")


def baseline_runs(out: Path, models: list[str], duration: float, step_s: float) -> dict:
    """The Flask baseline under the same loads: USERS users per model with each thread setting, then
    with the faster setting a step load (its knee); and /ping, its HTTP floor."""
    fixed = {}
    for threads in BASELINE_THREADS:
        with flask_baseline(models, threads, out / f"threads{threads}.log") as (url, pid):
            if threads == BASELINE_THREADS[0]:
                fixed["ping"] = load(out / "ping", pid, against_flask(url, Target(PING, None, 1), duration))
            for model in models:
                print(f"[flask, threads={threads}] {model}", flush=True)
                cpu = probes.cpu_seconds(pid)
                run = load(out / f"threads{threads}-{model}", pid, against_flask(url, Target(model, None, 1), duration))
                fixed[f"{model} threads={threads}"] = {
                    **run, "cpu": probes.cpu_per_request(cpu, probes.cpu_seconds(pid), run, ("Flask app",))}
                print(f"    {_line(run['series']['total'])}", flush=True)
    runs = {"ping": fixed["ping"], "threads": {k: v for k, v in fixed.items() if k != "ping"}}
    for model in models:
        rate = {t: fixed[f"{model} threads={t}"]["series"]["total"]["throughput_rps"] for t in BASELINE_THREADS}
        threads = max(rate, key=rate.get)
        runs[model] = {**fixed[f"{model} threads={threads}"], "threads": threads}
        with flask_baseline([model], threads, out / f"step-{model}.log") as (url, pid):
            step = dataclasses.replace(against_flask(url, Target(model, None, 1), duration), step=True, step_s=step_s)
            runs[f"{model} step"] = load(out / f"step-{model}", pid, step)
    return runs


def tune(out: Path, model: str, base: ServingConfig, duration: float, p99_limit_ms: float,
         only: list[str]) -> tuple[list[dict], dict[str, ServingConfig]]:
    """The sweep of `model` (tuning.sweep), each point measured on a TorchServe of its own."""
    formats = archived_formats(model)

    def measure(config: ServingConfig, run: str) -> dict:
        print(f"[{model}] {config.differences(base, formats)}", flush=True)
        point = measure_torchserve(out / f"{model}-{run}", model, config, duration)
        print(f"    {_line(point['summary']['series']['total'])}", flush=True)
        return point

    return sweep(measure, model, base, formats, p99_limit_ms, only)


def ping_floor(out: Path, config: ServingConfig, duration: float) -> dict:
    """The HTTP floor: GET /ping (token checked, no model) as fast as USERS users can."""
    with torchserve(out / "server", MODELS[0], config) as ts_config:
        spec = against_torchserve(ts_config, Target(PING, None, 1), duration)
        return load(out / "load", server.pid(ts_config.parent), spec)


def side_by_side(out: Path, models: list[str], flask: dict, tuned: dict, duration: float,
                 step_s: float) -> tuple[list[dict], dict]:
    """TorchServe with each tuned variant under the loads the baseline had; -> table rows, ratios."""
    ping = ping_floor(out / "ts-ping", tuned[models[0]][DEFAULT_FORMAT], duration)
    rows = [{"server": "Flask", "model": "ping", **flask["ping"]["series"]["total"],
             "other_cores": flask["ping"]["other_cores"]},
            {"server": "TorchServe", "model": "ping", **ping["series"]["total"], "other_cores": ping["other_cores"]}]
    ratios = {"ping": ratio(rows[1], rows[0])}
    for model in models:
        fl = {"server": f"Flask (threads={flask[model]['threads']})", "model": model, **flask[model]["series"]["total"],
              "knee": flask[f"{model} step"]["knee"], "other_cores": flask[model]["other_cores"],
              "cpu": flask[model]["cpu"]}
        rows.append(fl)
        variants = dict(tuned[model])
        if variants[ANY_FORMAT] == variants[DEFAULT_FORMAT]:
            del variants[ANY_FORMAT]
        for i, (name, config) in enumerate(variants.items()):
            print(f"[torchserve tuned, {name}] {model}", flush=True)
            ts = measure_torchserve(out / f"ts-{model}-{i}", model, config, duration)
            ts_step = measure_torchserve(out / f"ts-{model}-{i}-step", model, config, duration, step_s)
            row = {"server": f"TorchServe (tuned, {name}: {config.version})", "model": model,
                   **ts["summary"]["series"]["total"], "knee": ts_step["summary"]["knee"], "split": ts["split"],
                   "other_cores": ts["summary"]["other_cores"], "cpu": ts["cpu"]}
            rows.append(row)
            ratios[f"{model}, {name}"] = {"throughput": ratio(row, fl), "p99": ratio(row, fl, "p99_ms"),
                                          "knee_throughput": ratio(row["knee"], fl["knee"]),
                                          "knee_vs_baseline_at_users": ratio(row["knee"], fl)}
        # What the per-request database write costs (the baseline writes none).
        with environment(PREDICTION_LOG_URL="off"):
            unlogged = measure_torchserve(out / f"ts-{model}-unlogged", model, tuned[model][DEFAULT_FORMAT], duration)
        rows.append({"server": f"TorchServe (tuned, {DEFAULT_FORMAT}, prediction log off)", "model": model,
                     **unlogged["summary"]["series"]["total"], "other_cores": unlogged["summary"]["other_cores"],
                     "cpu": unlogged["cpu"]})
        ratios[f"{model}, {DEFAULT_FORMAT}"]["throughput_log_off"] = ratio(rows[-1], fl)
    return rows, ratios


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--sweep-s", type=float, default=SWEEP_S, help="seconds of load per sweep point")
    p.add_argument("--final-s", type=float, default=FINAL_S, help="seconds of load per side-by-side run")
    p.add_argument("--step-s", type=float, default=STEP_S, help="seconds per step of the knee search")
    p.add_argument("--only", nargs="*", default=[], help="sweep only these points (names as printed)")
    p.add_argument("--out", type=Path, help="results folder (default: results/bench/<time>)")
    return p


def main(args):
    out = (args.out or settings.BENCH_DIR / time.strftime("%Y%m%d-%H%M%S")).resolve()  # TorchServe runs elsewhere
    out.mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models if (settings.MODEL_STORE / archive_name(m, "1.0")).exists()]
    bases = {model: current_config(model) for model in models}  # each model's served default version
    results = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
               "prediction_log": os.environ.get("PREDICTION_LOG_URL", "serving/server.py's default"),
               "sweep_s": args.sweep_s, "final_s": args.final_s,
               "base": {model: dataclasses.asdict(base) for model, base in bases.items()},
               "model_time": {m: probes.model_time(m) for m in models}, "sweep": {}, "tuned": {}}
    print(f"model time in-process: {results['model_time']}", flush=True)
    results["baseline"] = flask = baseline_runs(out / "flask", models, args.final_s, args.step_s)
    tuned = {}
    for model in models:
        limit = p99_limit(model, flask[model]["series"]["total"]["p99_ms"])
        points, tuned[model] = tune(out, model, bases[model], args.sweep_s, limit, args.only)
        results["sweep"][model] = points
        results["tuned"][model] = {name: {"name": config.differences(bases[model], archived_formats(model)),
                                          **dataclasses.asdict(config)} for name, config in tuned[model].items()}
    rows, ratios = side_by_side(out, models, flask, tuned, args.final_s, args.step_s)
    results.update(side_by_side=rows, ratios=ratios)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    plot_sweep(results, out / "sweep.png")
    (out / "bench.md").write_text(bench_markdown(results))
    print(bench_markdown(results))
    print(f"results: {out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
