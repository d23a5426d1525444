"""Which archived version of each model is fastest on this machine, as a worker serves it: the default.

    python -m optimize.tune                  # `make tune`: every model in model_store/manifest.json
    python -m optimize.tune --unless-tuned   # what `make archive` runs: only when this CPU was not measured
    python -m optimize.tune --quick          # fewer, shorter repeats (the tests)

Every archived version passed its accuracy gate when it was archived (optimize/validate.py), so the
choice among them is speed alone: each version's runtime runs in-process with the worker's threads
(models.yaml `handler.threads`) on a batch of the served size (`serving.batchSize`), the median of
repeated timed calls (optimize/bench_formats.py's protocol). Versions with test-time augmentation are
a different offering (more accurate, more compute) and are reported but never chosen. models.yaml's
default stays when the fastest is less than MARGIN (5%) ahead of it: closer than that is noise here.

The fastest differs between machines of the same kind (an AMD EPYC without AMX, an Intel Xeon with
AMX: OpenVINO INT8 leads on the latter), so the record names the CPU and its relevant flags and holds
for that CPU alone. Writes <store>/tuned.json (machine-specific, git-ignored) and results/tune.md, and
makes each model's chosen version its default in <store>/manifest.json (model_store/archive.py
mark_defaults: loaded at start), which `make serve` and the containers serve. A running server takes
it at its next start, or now with `python -m serving.modelctl set-default`.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import catalog
from catalog import INPUT_SHAPE, ISA_FLAGS, dataset_of
from model_store.archive import model_config, write_manifest
from optimize.bench_formats import FULL, QUICK, measure
from optimize.formats import FORMATS, serialized_path
from runtimes import load_runtime

REPORT = catalog.RESULTS_DIR / "tune.md"


def served_shape(settings: dict, model: str) -> tuple[int, int]:
    """(batch size, threads) of a worker of `model`, from models.yaml."""
    config = model_config(settings, model, catalog.version_spec("onnx"))  # what an archive's model-config.yaml says
    return int(config["batchSize"]), int(config["handler"]["threads"])


def fastest(figures: dict) -> str:
    """The version with the most images/s among those without test-time augmentation."""
    eligible = {v: f for v, f in figures.items() if not f["tta"]}
    return max(eligible, key=lambda v: eligible[v]["images_per_s"])


# Closer than this to models.yaml's default is within the noise of a shared 2-core machine (repeated
# runs move a version's figure by a few percent): the default stays, rather than flipping between runs.
MARGIN = 1.05


def choose(figures: dict, default: str) -> str:
    """The fastest version, unless models.yaml's default is within MARGIN of it."""
    best = fastest(figures)
    keep = default in figures and not figures[default]["tta"] and \
        figures[best]["images_per_s"] < MARGIN * figures[default]["images_per_s"]
    return default if keep else best


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
    current = settings["models"][model]["default"]
    choice = choose(figures, current)
    return {"batch_size": batch_size, "threads": threads, "versions": figures, "fastest": fastest(figures),
            "chosen": choice, "models_yaml_default": current,
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
            note = ("fastest" if version == r["fastest"] else "") + \
                   (" **the default**" if version == r["chosen"] else "") + \
                   (" (models.yaml's default)" if version == r["models_yaml_default"] else "") + \
                   (" flip TTA: not a candidate" if f["tta"] else "")
            lines.append(f"| {model} | {version} | {f['format']}{' + ' + f['tta'] if f['tta'] else ''} | "
                         f"{f['images_per_s']:,.0f} | {100 * f['test_accuracy']:.2f}% | {note.strip()} |")
    return "\n".join(lines) + "\n"


def is_tuned(store: Path, manifest: list[dict]) -> bool:
    """Whether `store`'s tuned.json was measured on this CPU, on the versions and formats archived now."""
    path = catalog.tuned_path(store)
    if not catalog.tuned_choices(store):
        return False
    measured = {(model, v, f["format"]) for model, r in json.loads(path.read_text())["models"].items()
                for v, f in r["versions"].items()}
    return measured == {(m["model"], m["version"], m["format"]) for m in manifest
                        if FORMATS[m["format"]].device == "cpu"}


def main(args):
    settings, store = catalog.load_settings(), Path(args.store)
    manifest = list(catalog.read_manifest(store).values())
    if not manifest:
        sys.exit(f"error: nothing archived in {store} (make archive)")
    if args.unless_tuned and is_tuned(store, manifest):
        print(f"tune: {catalog.tuned_path(store)} already holds this CPU's measurements (make tune measures again)")
        return
    models = args.models or list(dict.fromkeys(m["model"] for m in manifest))
    protocol = QUICK if args.quick else FULL
    measured = {model: tune_model(settings, model, [m for m in manifest if m["model"] == model], protocol)
                for model in models}
    earlier = json.loads(catalog.tuned_path(store).read_text())["models"] if catalog.tuned_choices(store) else {}
    result = {"machine": catalog.machine(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "protocol": protocol,
              "models": {**{m: r for m, r in earlier.items() if m not in measured}, **measured}}  # this CPU's others kept
    catalog.tuned_path(store).write_text(json.dumps(result, indent=1) + "\n")
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(markdown(result))
    print(markdown(result))
    source = write_manifest(settings, manifest, store)
    for model, r in result["models"].items():
        if source.get(model) == "tuned" and r["chosen"] != r["models_yaml_default"]:
            print(f"{model}: default {r['chosen']} ({r['speedup_over_default']}x models.yaml's "
                  f"{r['models_yaml_default']}); a running server: python -m serving.modelctl set-default "
                  f"{model} {r['chosen']} (register it first if it is not loaded), or restart it")
    print(f"wrote {catalog.tuned_path(store)}, {catalog.manifest_path(store)}'s defaults and {report}")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="default: every archived model")
    p.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    p.add_argument("--unless-tuned", action="store_true",
                   help="do nothing when the store's tuned.json was measured on this CPU for the archived versions")
    p.add_argument("--store", default=str(catalog.STORE), help="the model store: its manifest.json is read and "
                   "its defaults set; tuned.json is written beside it")
    p.add_argument("--report", default=str(REPORT))
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
