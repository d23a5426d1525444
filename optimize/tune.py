"""Which archived version of each model is fastest on this machine, as a worker serves it.

    python -m optimize.tune              # `make tune`: every model in model_store/manifest.json
    python -m optimize.tune --quick      # fewer, shorter repeats (the tests)

Every archived version passed its accuracy gate when it was archived (optimize/validate.py), so the
choice among them is speed alone: each version's runtime runs in-process with the worker's threads
(models.yaml `handler.threads`) on a batch of the served size (`serving.batchSize`), the median of
repeated timed calls (optimize/bench_formats.py's protocol). Versions with test-time augmentation are
a different offering (more accurate, more compute) and are reported but never recommended.

The fastest differs between machines of the same kind (an AMD EPYC without AMX, an Intel Xeon with
AMX: OpenVINO INT8 leads on the latter), so the record names the CPU and its relevant flags. Writes
model_store/tuned.json (machine-specific, git-ignored) and results/tune.md. Applying a choice is one
command per model on a running server, printed at the end: `python -m serving.modelctl set-default`.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import catalog
from catalog import INPUT_SHAPE, ISA_FLAGS, cpu_isa, cpu_name, dataset_of
from model_store.archive import model_config
from optimize.bench_formats import FULL, QUICK, measure
from optimize.formats import FORMATS, serialized_path
from runtimes import load_runtime

TUNED = catalog.STORE / "tuned.json"
REPORT = catalog.RESULTS_DIR / "tune.md"
def machine() -> dict:
    return {"cpu": cpu_name(), "flags": cpu_isa()}


def served_shape(settings: dict, model: str) -> tuple[int, int]:
    """(batch size, threads) of a worker of `model`, from models.yaml."""
    config = model_config(settings, model, catalog.version_spec("onnx"))  # what an archive's model-config.yaml says
    return int(config["batchSize"]), int(config["handler"]["threads"])


def fastest(figures: dict) -> str:
    """The version with the most images/s among those without test-time augmentation."""
    eligible = {v: f for v, f in figures.items() if not f["tta"]}
    return max(eligible, key=lambda v: eligible[v]["images_per_s"])


def tune_model(settings: dict, model: str, versions: list[dict], protocol: dict) -> dict:
    batch_size, threads = served_shape(settings, model)
    batch = np.random.default_rng(0).normal(size=(batch_size, *INPUT_SHAPE[dataset_of(model)])).astype(np.float32)
    figures = {}
    for entry in tqdm(versions, desc=f"tune {model}", leave=False):
        if FORMATS[entry["format"]].device != "cpu":
            continue
        run = load_runtime(entry["format"], str(serialized_path(model, entry["format"])), threads, entry.get("tta"))
        figures[entry["version"]] = {"format": entry["format"], "tta": entry.get("tta"),
                                     "images_per_s": round(batch_size / measure(run, batch, protocol)["median_s"], 1),
                                     "test_accuracy": entry["test_accuracy"]}
    choice = fastest(figures)
    current = settings["models"][model]["default"]
    return {"batch_size": batch_size, "threads": threads, "versions": figures, "fastest": choice,
            "models_yaml_default": current,
            "speedup_over_default": round(figures[choice]["images_per_s"] / figures[current]["images_per_s"], 2)
            if current in figures else None}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Fastest version per model on this machine ({result['measured']})", "",
             f"{m['cpu']}; flags: {', '.join(m['flags']) or 'none of ' + ', '.join(ISA_FLAGS)}. In-process, "
             "each version's serving runtime at the worker's batch size and threads (models.yaml), median of "
             f"{result['protocol']['repeats']} repeats. Written by `python -m optimize.tune`.", "",
             "| model | version | format | images/s per worker | test accuracy | |", "|---|---|---|---|---|---|"]
    for model, r in result["models"].items():
        for version, f in r["versions"].items():
            note = ("**fastest**" if version == r["fastest"] else "") + \
                   (" models.yaml default" if version == r["models_yaml_default"] else "") + \
                   (" flip TTA: not a candidate" if f["tta"] else "")
            lines.append(f"| {model} | {version} | {f['format']}{' + ' + f['tta'] if f['tta'] else ''} | "
                         f"{f['images_per_s']:,.0f} | {100 * f['test_accuracy']:.2f}% | {note.strip()} |")
    return "\n".join(lines) + "\n"


def main(args):
    settings = catalog.load_settings()
    manifest = list(catalog.read_manifest().values())
    models = args.models or list(dict.fromkeys(m["model"] for m in manifest))
    protocol = QUICK if args.quick else FULL
    result = {"machine": machine(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "protocol": protocol,
              "models": {model: tune_model(settings, model, [m for m in manifest if m["model"] == model], protocol)
                         for model in models}}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(markdown(result))
    print(markdown(result))
    for model, r in result["models"].items():
        if r["fastest"] != r["models_yaml_default"]:
            print(f"{model}: {r['fastest']} is {r['speedup_over_default']}x the default {r['models_yaml_default']}; "
                  f"on a running server: python -m serving.modelctl set-default {model} {r['fastest']} "
                  f"(register it first if it is not loaded)")
    print(f"wrote {args.output} and {report}")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="default: every archived model")
    p.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    p.add_argument("--output", default=str(TUNED))
    p.add_argument("--report", default=str(REPORT))
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
