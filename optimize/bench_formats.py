"""In-process throughput and latency of every serving format, per model and batch size, against the
machine's peak arithmetic rate.

    python -m optimize.bench_formats           # make bench-formats: batch 1, 8, 32, 64, 7 repeats
    python -m optimize.bench_formats --quick   # CI smoke run: 3 short repeats

Each format runs through the runtime that serves it (handlers/runtimes.py) on random normalised
inputs (dense kernels do not care about pixel values). Per model x format x batch: warm-up calls
(TorchScript's profiling executor optimises on its first calls), then repeats of enough calls to
last REPEAT_SECONDS each; the median latency per call is quoted, with the slowest and fastest
repeat beside it, and throughput is batch / median latency.

FLOPs per image are counted on the eager fp32 model (torch.utils.flop_counter: 2 per
multiply-accumulate of convolutions and matmuls; BatchNorm, ReLU and pooling are not counted).
Achieved GFLOP/s = FLOPs per image x images/s, as a fraction of the peak of the arithmetic the
format runs in (see `peak`). Results: <output-dir>/bench_formats.{md,json,png} (results/ is git-ignored).
Other processes skew the numbers: the load average before and after is recorded with them.
"""
import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import catalog
from catalog import INPUT_SHAPE, MODEL_DATASETS, cpu_flags, cpu_name, dataset_of
from optimize.formats import FORMATS, serialized_path
from optimize.validate import load_records
from runtimes import load_runtime
from training.models import build_model

BATCH_SIZES = (1, 8, 32, 64)
FULL = {"warmup_calls": 5, "repeats": 7, "repeat_seconds": 0.5}
QUICK = {"warmup_calls": 3, "repeats": 3, "repeat_seconds": 0.02}
OUTPUT_DIR = Path("results/formats")

# Peak: cores x clock x 512-bit FMA-capable vector pipes per core x lanes x operations per lane per
# instruction. Two such pipes per core holds for AMD Zen 5 (this machine: family 0x1A) and Intel server
# cores; Zen 4 issues 512-bit instructions at half that rate, so its peaks would be half these.
VECTOR_PIPES = 2
OPS_PER_FP32_LANE = {
    "fp32": (2, "avx512f", "FMA: multiply + add"),
    "bf16": (4, "avx512_bf16", "VDPBF16PS: two bf16 products + accumulate"),
    "int8": (8, "avx512_vnni", "VPDPBUSD: four u8 x s8 products + accumulate"),
}


# The clock a busy core really runs at: a chain of dependent 64-bit multiplies, 3 cycles each (AMD Zen 1-5,
# Intel since Sandy Bridge), timed best of 10. Under a hypervisor /proc/cpuinfo shows only the nominal
# clock (2.6 GHz here, where this probe measures ~3.7 GHz), which would understate the peak.
IMUL_LATENCY = 3
CLOCK_PROBE = r"""
#include <stdio.h>
#include <stdint.h>
#include <time.h>
int main(void) {
    double best = 1e9; uint64_t x = 3; const long n = 100000000L;
    for (int r = 0; r < 10; r++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (long i = 0; i < n; i++) __asm__ volatile("imul %0, %0" : "+r"(x));
        clock_gettime(CLOCK_MONOTONIC, &b);
        double t = (b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec);
        if (t < best) best = t;
    }
    printf("%f\n", %d * n / best / 1e9);
    return (int)(x & 0);
}
""".replace("%d", str(IMUL_LATENCY))


def nominal_clock_ghz() -> float:
    """The highest `cpu MHz` in /proc/cpuinfo."""
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("cpu MHz")] if Path("/proc/cpuinfo").exists() else []
    return max(mhz) / 1000 if mhz else float("nan")


def measured_clock_ghz() -> float | None:
    """The clock from CLOCK_PROBE, or None without an x86-64 C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.machine() != "x86_64":
        return None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "probe.c").write_text(CLOCK_PROBE)
        subprocess.run([compiler, "-O1", "-o", f"{tmp}/probe", f"{tmp}/probe.c"], check=True)
        return float(subprocess.run([f"{tmp}/probe"], capture_output=True, text=True, check=True).stdout)


# Intel AMX (Sapphire Rapids and later): one tile matrix unit per core, whose TDPBF16PS does 1,024 bf16
# multiply-adds per cycle and TDPBUSD 2,048 u8 x s8 ones (Intel's optimization manual). oneDNN (torch
# bf16) and ONNX Runtime's MLAS (INT8 GEMMs) use it where the CPU flags it, so it is those formats' peak.
AMX_OPS_PER_CYCLE = {
    "bf16": (2 * 1024, "amx_bf16", "AMX TDPBF16PS: 1,024 bf16 multiply-adds per cycle"),
    "int8": (2 * 2048, "amx_int8", "AMX TDPBUSD: 2,048 int8 multiply-adds per cycle"),
}


def peak(cores: int, ghz: float, flags: set) -> dict:
    """precision -> (peak GFLOP/s, how it was computed)."""
    lanes = 16 if "avx512f" in flags else 8  # fp32 lanes per vector register (AVX-512 or AVX2)
    peaks = {}
    for precision, (ops, flag, instruction) in OPS_PER_FP32_LANE.items():
        if precision in AMX_OPS_PER_CYCLE and AMX_OPS_PER_CYCLE[precision][1] in flags:
            per_cycle, _, instruction = AMX_OPS_PER_CYCLE[precision]
            value = cores * ghz * per_cycle
            peaks[precision] = (value, f"{cores} cores x {ghz:.3f} GHz x {per_cycle} ({instruction}) = "
                                       f"{value:.0f} GFLOP/s")
            continue
        if flag not in flags:  # no native instruction: the work runs at the fp32 rate at best
            ops, instruction = OPS_PER_FP32_LANE["fp32"][0], f"no {flag}: fp32 FMA rate"
        value = cores * ghz * VECTOR_PIPES * lanes * ops
        peaks[precision] = (value, f"{cores} cores x {ghz:.3f} GHz x {VECTOR_PIPES} pipes x {lanes} lanes x "
                                   f"{ops} ({instruction}) = {value:.0f} GFLOP/s")
    return peaks


def flops_per_image(model: str) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        build_model(model).eval()(torch.zeros(1, *INPUT_SHAPE[dataset_of(model)]))
    return counter.get_total_flops()


def time_calls(run, batch: np.ndarray, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run(batch)
    return (time.perf_counter() - start) / calls


def measure(run, batch: np.ndarray, protocol: dict) -> dict:
    """Median, fastest and slowest per-call latency (s) over the repeats, after warm-up. The calls per
    repeat come from the fastest warm-up call: one preempted call must not shrink every repeat to a
    single call."""
    warmup = [time_calls(run, batch, 1) for _ in range(protocol["warmup_calls"])]
    calls = max(1, math.ceil(protocol["repeat_seconds"] / min(warmup)))
    latencies = [time_calls(run, batch, calls) for _ in range(protocol["repeats"])]
    return {"median_s": statistics.median(latencies), "min_s": min(latencies), "max_s": max(latencies),
            "calls_per_repeat": calls}


def bench_model(model: str, formats: list[str], batch_sizes, threads: int, protocol: dict, flops: int,
                peaks: dict) -> list[dict]:
    rows, validated = [], load_records(model)["formats"]
    inputs = torch.randn(max(batch_sizes), *INPUT_SHAPE[dataset_of(model)],
                         generator=torch.Generator().manual_seed(0)).numpy()
    for fmt in formats:
        run = load_runtime(fmt, str(serialized_path(model, fmt)), threads)
        precision = FORMATS[fmt].precision
        for batch in tqdm(batch_sizes, desc=f"{model} {fmt}", leave=False):
            timing = measure(run, np.ascontiguousarray(inputs[:batch]), protocol)
            images_per_s = batch / timing["median_s"]
            gflops = flops * images_per_s / 1e9
            rows.append(dict(model=model, format=fmt, precision=precision, batch=batch, **timing,
                             images_per_s=images_per_s, gflops=gflops, peak_fraction=gflops / peaks[precision][0],
                             accuracy_delta_points=validated.get(fmt, {}).get("accuracy_delta_points")))
        del run
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Serving formats: in-process throughput ({meta['mode']} run)", "",
             f"{meta['started']}; {meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}, onnxruntime "
             f"{meta['onnxruntime']}. Protocol: {meta['protocol']}. Load average (1 min) before/after: "
             f"{meta['load_before']:.2f} / {meta['load_after']:.2f} on {meta['cores']} cores: a load above the "
             "benchmark's own threads means other processes shared the CPU and slowed these numbers.", "",
             f"Peak used for the last column (per the format's arithmetic), at {meta['clock']}:", ""]
    lines += [f"- {p}: {how}" for p, (_, how) in meta["peaks"].items()]
    lines += ["", "FLOPs per image (eager fp32, 2 per multiply-accumulate): "
              + ", ".join(f"{m} {f / 1e6:.2f} MFLOP" for m, f in meta["flops"].items()), "",
              "| model | format | batch | median latency (ms) | fastest / slowest repeat (ms) | images/s | "
              "vs torchscript fp32 | GFLOP/s | % of peak | accuracy delta vs fp32 (points) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    baseline = {(r["model"], r["batch"]): r["images_per_s"] for r in rows if r["format"] == "torchscript"}
    for r in rows:
        delta = "" if r["accuracy_delta_points"] is None else f"{r['accuracy_delta_points']:+.2f}"
        reference = baseline.get((r["model"], r["batch"]))
        speedup = "" if reference is None else f"{r['images_per_s'] / reference:.2f}x"
        lines.append(f"| {r['model']} | {r['format']} | {r['batch']} | {1e3 * r['median_s']:.3f} | "
                     f"{1e3 * r['min_s']:.3f} / {1e3 * r['max_s']:.3f} | {r['images_per_s']:,.0f} | {speedup} | "
                     f"{r['gflops']:.1f} | {100 * r['peak_fraction']:.1f}% | {delta} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], meta: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for fmt in dict.fromkeys(r["format"] for r in mine):
            points = [(r["batch"], r["images_per_s"]) for r in mine if r["format"] == fmt]
            ax.plot(*zip(*points), marker="o", label=fmt)
        ceiling = meta["peaks"]["fp32"][0] * 1e9 / meta["flops"][model]
        ax.axhline(ceiling, color="grey", linestyle="--", label="fp32 peak")
        ax.set(yscale="log", xlabel="batch size", ylabel="images/s (median)",
               title=f"{model} ({meta['flops'][model] / 1e6:.1f} MFLOP/image)")
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in mine})
        ax.set_xticks(batches, labels=[str(b) for b in batches])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{meta['cpu']}, {meta['threads']} threads, {meta['mode']} run, load {meta['load_before']:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_formats(model: str) -> list[str]:
    return [f for f, spec in FORMATS.items() if spec.device == "cpu" and serialized_path(model, f).exists()]


def main(args):
    protocol = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    models = args.models or [m for m in MODEL_DATASETS if (catalog.EXPORT_DIR / m).exists()]
    cores = min(args.threads, len(os.sched_getaffinity(0)))
    nominal, measured = nominal_clock_ghz(), measured_clock_ghz()
    clock = args.clock_ghz or max(nominal, measured or 0)  # the higher clock: peaks are upper bounds
    peaks = peak(cores, clock, cpu_flags())
    meta = dict(mode="quick" if args.quick else "full", started=time.strftime("%Y-%m-%d %H:%M %Z"),
                cpu=f"{cpu_name()} ({platform.machine()})", threads=args.threads, cores=len(os.sched_getaffinity(0)),
                torch=torch.__version__, onnxruntime=onnxruntime.__version__,
                protocol=f"{protocol['warmup_calls']} warm-up calls, {protocol['repeats']} repeats of >= "
                         f"{protocol['repeat_seconds']} s, median", load_before=os.getloadavg()[0],
                clock=f"{clock:.3f} GHz ({'given' if args.clock_ghz else 'the higher'} of nominal {nominal:.3f} GHz "
                      f"from /proc/cpuinfo and {f'{measured:.3f}' if measured else 'no'} GHz measured by a chain "
                      f"of dependent multiplies)",
                peaks=peaks, flops={m: flops_per_image(m) for m in models})
    rows = []
    for model in tqdm(models, desc="models"):
        formats = [f for f in (args.formats or cpu_formats(model)) if serialized_path(model, f).exists()]
        rows += bench_model(model, formats, args.batch_sizes, args.threads, protocol, meta["flops"][model], peaks)
    meta["load_after"] = os.getloadavg()[0]
    out = Path(args.output_dir or (OUTPUT_DIR / "quick" if args.quick else OUTPUT_DIR))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_formats.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "bench_formats.md").write_text(markdown(rows, meta))
    chart(rows, meta, out / "bench_formats.png")
    print(markdown(rows, meta))
    print(f"wrote {out / 'bench_formats.md'}, .json and .png")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODEL_DATASETS), help="default: every model with an export")
    p.add_argument("--formats", nargs="+", choices=[f for f, s in FORMATS.items() if s.device == "cpu"],
                   help="default: every CPU format built for the model")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads of every runtime")
    p.add_argument("--quick", action="store_true", help="few, short repeats: a smoke run for CI")
    p.add_argument("--clock-ghz", type=float, help="clock for the peak (default: measured, or /proc/cpuinfo's)")
    p.add_argument("--output-dir", help="default results/formats (results/formats/quick with --quick)")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
