"""Package exported models as TorchServe archives: model_store/<model>_v<version>.mar + manifest.json.

    python -m model_store.archive            # every model of models.yaml that has an export

Each archive holds the serialized model of its format (optimize/formats.py: TorchScript, ONNX, bf16
TorchScript, INT8 ONNX, fp16 ONNX for TensorRT), the handler with its shared modules, and a
model-config.yaml made of models.yaml's settings plus the training normalisation and class names.

Every format is validated before it is archived (optimize/validate.py: accuracy on the full test
split, delta and top-1 agreement against eager fp32); one that loses more than 0.3 points, or that
cannot be validated here (TensorRT without a GPU), is refused with the reason, and an older archive
of that version is removed. Reduced-precision files missing from optimize/exported/ are built first.
manifest.json lists what was archived (model, version, format, precision, whether TorchServe loads it
at start, sha256 of the source weights, the validated accuracy, delta and agreement, creation time).

A version in models.yaml is either `"1.1": onnx` (loaded at start) or
`"1.3": {format: onnx_int8, load: false}`: archived, but left out of TorchServe's start-up set (each
worker costs ~400 MB and start-up time); `python -m serving.modelctl register <archive>` serves it.

The default version (the manifest's `default`, loaded at start whatever models.yaml says) is the one
`make tune` measured fastest on this CPU (model_store/tuned.json, optimize/tune.py), else models.yaml's
`default`. `make archive` runs the tuning itself when nothing was measured on this CPU yet.

`classifier(model, spec)` builds, in-process, the handlers' Classifier exactly as an archive of that
version serves (the Flask baseline and the tests use it).
"""
import argparse
import functools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import catalog
from catalog import CLASSES, MEAN, STD, VersionSpec, archive_name, dataset_of, serving_settings
from optimize import validate
from optimize.formats import BUILDERS, FORMATS, built_format, is_built, serialized_path, weights_sha256
from classifier import Classifier
from runtimes import TTA
from training.data import data_dir_arg, handler_preprocessing

HANDLER_MODULES = ("base_classifier.py", "classifier.py", "runtimes.py", "prediction_log.py", "prediction_table.py",
                   "explain.py")  # shipped beside every handler


def version_spec(value) -> VersionSpec:
    """A version's value in models.yaml -> its VersionSpec, its format and augmentation checked
    against what can be built and served."""
    spec = catalog.version_spec(value)
    if spec.format not in FORMATS or spec.tta not in (None, *TTA):
        raise ValueError(f"bad version entry {value!r} in models.yaml: expected a format ({', '.join(FORMATS)}) "
                         f"or {{format: <format>, load: false, tta: <{'|'.join(TTA)}>}}")
    return spec


def model_config(settings: dict, model: str, spec: VersionSpec) -> dict:
    dataset = dataset_of(model)
    handler = dict(settings["defaults"]["handler"], format=spec.format, classes=list(CLASSES[dataset]),
                   mean=list(MEAN[dataset]), std=list(STD[dataset]), temperature=temperature(model))
    if spec.tta:
        handler["tta"] = spec.tta
    return dict(serving_settings(settings, model), handler=handler)


def classifier(model: str, spec: VersionSpec | str, path=None, threads: int | None = None) -> Classifier:
    """`model` as its archive of `spec` (a VersionSpec, or a format name) serves it, in this process:
    the same handler settings and preprocessing, over the serialized file of that format (or `path`),
    with `threads` intra-op threads instead of the configured ones when given."""
    spec = spec if isinstance(spec, VersionSpec) else version_spec(spec)
    config = model_config(catalog.load_settings(), model, spec)["handler"]
    if threads is not None:
        config["threads"] = threads
    return Classifier.load(config, path or serialized_path(model, spec.format), handler_preprocessing(dataset_of(model)))


def temperature(model: str) -> float:
    """The handler divides the logits by this before the softmax: the T fitted on the validation split
    (training/calibrate.py, committed as <model>_calibration.json, so archives build without data).
    Figures of other weights would serve confidences nobody measured, so they stop the build."""
    path, fix = catalog.WEIGHTS_DIR / f"{model}_calibration.json", f"python -m training.calibrate --model {model}"
    if not path.exists():
        _note_uncalibrated(model, path, fix)
        return 1.0
    record = json.loads(path.read_text())
    if record["weights_sha256"] != weights_sha256(model):
        raise SystemExit(f"error: {path.name} was fitted to other weights than {model}.pt: run `{fix}` "
                         "(needs the data sets)")
    return float(record["temperature"])


@functools.cache  # once per model, not once per archived version
def _note_uncalibrated(model: str, path: Path, fix: str):
    print(f"note: {model} has no {path.name}: served with temperature 1.0 (uncalibrated); `{fix}` fits one",
          file=sys.stderr)


def build_isolated(model: str, fmt: str, data_dir):
    """Build `fmt` in a fresh interpreter: a TorchScript file names its classes after what the process
    traced before, so only a fresh process writes the same bytes as the build that was validated."""
    data = ["--data-dir", str(data_dir)] if Path(data_dir).is_dir() else []  # else the committed ranges serve
    done = subprocess.run([sys.executable, "-m", "optimize.formats", "--model", model, "--formats", fmt, *data],
                          cwd=catalog.ROOT, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildFailed(f"building {fmt} failed: {last.removeprefix('error: ')}")


class BuildFailed(RuntimeError):
    pass


def admission(model: str, spec: VersionSpec, data_dir) -> tuple[dict | None, str | None]:
    """(validation record, None) when this version of `model` may be archived, else (None, why not)."""
    fmt = spec.format
    try:
        validate.check_available(fmt)
        built = built_format(fmt)  # openvino_int8 runs onnx_int8's file
        if built in BUILDERS and not is_built(model, built):  # missing, or built with an older recipe or weights
            build_isolated(model, built, data_dir)
        record = validate.ensure_validated(model, fmt, data_dir, spec.tta)
    except (validate.FormatUnavailable, validate.NoMatchingRecord, BuildFailed, FileNotFoundError) as e:
        return None, str(e)
    return (record, None) if record["passed"] else (None, record["reason"])


def build_archive(settings: dict, model: str, version: str, spec: VersionSpec, record: dict) -> dict:
    serialized = serialized_path(model, spec.format)
    handler = settings["models"][model]["handler"]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "model-config.yaml"
        config.write_text(yaml.safe_dump(model_config(settings, model, spec), sort_keys=False))
        subprocess.run([str(Path(sys.executable).parent / "torch-model-archiver"),
                        "--model-name", model, "--version", version, "--serialized-file", str(serialized),
                        "--handler", str(catalog.HANDLERS_DIR / handler),
                        "--extra-files", ",".join(str(catalog.HANDLERS_DIR / f) for f in HANDLER_MODULES),
                        "--config-file", str(config), "--export-path", tmp, "--force"], check=True)
        shutil.move(Path(tmp) / f"{model}.mar", catalog.STORE / archive_name(model, version))
    return dict(model=model, version=version, format=spec.format, tta=spec.tta,
                precision=FORMATS[spec.format].precision, archive=archive_name(model, version),
                default=False, load_at_start=spec.load,  # both set by mark_defaults
                weights_sha256=weights_sha256(model),
                test_accuracy=record["accuracy"], fp32_test_accuracy=record["fp32_accuracy"],
                accuracy_delta_points=record["accuracy_delta_points"], top1_agreement=record["top1_agreement"],
                agreement_images=record["agreement_images"], validated=record["validated"],
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def main(args):
    settings = catalog.load_settings()
    models = args.models or list(settings["models"])
    manifest = list(catalog.read_manifest().values())
    for model in models:
        if model not in settings["models"]:
            sys.exit(f"error: {model!r} is not in model_store/models.yaml")
        if not (catalog.EXPORT_DIR / model).exists():
            print(f"skip {model}: no export in {catalog.EXPORT_DIR / model} (no shipped weights yet?)")
            continue
        for version, value in settings["models"][model]["versions"].items():
            spec = version_spec(value)
            variant = validate.record_key(spec.format, spec.tta)
            manifest = [m for m in manifest if (m["model"], m["version"]) != (model, version)]
            record, refused = admission(model, spec, args.data_dir)
            if refused:
                (catalog.STORE / archive_name(model, version)).unlink(missing_ok=True)  # never serve a stale archive
                verdict = "refused" if refused.startswith("loses") else "skipped"  # failed, or not checkable here
                print(f"{verdict} {model} {version} ({variant}): {refused}", file=sys.stderr)
                continue
            manifest.append(build_archive(settings, model, version, spec, record))
            print(f"archived {archive_name(model, version)} ({variant}: {100 * record['accuracy']:.2f}%, "
                  f"{record['accuracy_delta_points']:+.2f} points vs fp32)"
                  f"{'' if spec.load else ', not loaded at start'}")
    summarize(settings, models, manifest, write_manifest(settings, manifest))


def mark_defaults(settings: dict, manifest: list[dict], store: Path | None = None) -> dict[str, str]:
    """Set each entry's `default` and `load_at_start`: per model, the version `make tune` measured
    fastest on this CPU when it is archived, else models.yaml's default; the default is loaded at
    start. Returns model -> where its default came from: "tuned", or "configured" (models.yaml)."""
    tuned, source = catalog.tuned_choices(store), {}
    for model in {m["model"] for m in manifest}:
        entries = [m for m in manifest if m["model"] == model]
        specs = catalog.versions(settings, model) if model in settings["models"] else {}
        default = tuned.get(model)
        source[model] = "tuned" if default in {m["version"] for m in entries} else "configured"
        if source[model] == "configured":
            default = settings["models"].get(model, {}).get("default")
        for m in entries:
            m["default"] = m["version"] == default
            m["load_at_start"] = m["default"] or (specs[m["version"]].load if m["version"] in specs
                                                   else m["load_at_start"])
    return source


def write_manifest(settings: dict, manifest: list[dict], store: Path | None = None) -> dict[str, str]:
    """manifest.json of `store` with its defaults marked (mark_defaults, whose result it returns)."""
    source = mark_defaults(settings, manifest, store)
    catalog.manifest_path(store).write_text(json.dumps(sorted(manifest, key=lambda m: (m["model"], m["version"])),
                                                       indent=1))
    return source


def summarize(settings: dict, models: list[str], manifest: list[dict], source: dict[str, str]):
    """Say which version each model serves as its default and why; exit 1 when a model has no archive."""
    empty = []
    for model in models:
        entries = [m for m in manifest if m["model"] == model]
        if not (catalog.EXPORT_DIR / model).exists():
            continue  # no shipped weights yet: said above, not an error
        if not entries:
            empty.append(model)
            continue
        default = next((m["version"] for m in entries if m["default"]), None)
        if source.get(model) == "tuned":
            print(f"{model}: default {default}, the fastest on this CPU (model_store/tuned.json: make tune)")
        elif default is None:
            started = next((m["version"] for m in entries if m["load_at_start"]), entries[0]["version"])
            print(f"note: {model}'s default version {settings['models'][model]['default']} is not archived here; "
                  f"TorchServe serves {started} as its default", file=sys.stderr)
    if empty:
        sys.exit(f"error: nothing archived for {', '.join(empty)} (see the reasons above)")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="model names (default: all in models.yaml)")
    p.add_argument("--data-dir", type=data_dir_arg, default=catalog.DATA_DIR,
                   help="test split for validating a format no committed record describes, training images "
                        "for INT8 calibration when its committed ranges are stale (default: $DATA_DIR or "
                        "../shared/data; a checkout without it archives what the committed records cover)")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
