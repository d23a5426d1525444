"""Package exported models as TorchServe archives: model_store/<model>_v<version>.mar + manifest.json.

    python -m model_store.archive            # every model of models.yaml that has an export

Each archive holds the serialized model (TorchScript .pt or ONNX .onnx), the handler with
base_classifier.py, and a model-config.yaml made of models.yaml's settings plus the training
normalisation and class names. manifest.json lists what was archived (model, version, format,
sha256 of the source weights, test accuracy from the model card, creation time).
"""
import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from optimize.export import EXPORT_DIR
from training.data import CLASSES, MEAN, STD
from training.models import dataset_of
from training.train import WEIGHTS_DIR

STORE = Path(__file__).parent
ROOT = STORE.parent
HANDLERS = ROOT / "handlers"
HANDLER_MODULES = ("base_classifier.py", "runtimes.py", "prediction_log.py")  # shipped beside every handler
SERIALIZED = {"torchscript": "model.pt", "onnx": "model.onnx"}


def load_settings(path=STORE / "models.yaml") -> dict:
    return yaml.safe_load(Path(path).read_text())


def archive_name(model: str, version: str) -> str:
    return f"{model}_v{version}.mar"


def model_config(settings: dict, model: str, fmt: str) -> dict:
    dataset = dataset_of(model)
    handler = dict(settings["defaults"]["handler"], format=fmt, classes=list(CLASSES[dataset]),
                   mean=list(MEAN[dataset]), std=list(STD[dataset]))
    return dict(settings["defaults"]["serving"], **settings["models"][model].get("serving", {}), handler=handler)


def test_accuracy(model: str):
    metrics = WEIGHTS_DIR / f"{model}_metrics.json"
    return json.loads(metrics.read_text())["shipped_test_acc"] if metrics.exists() else None


def build_archive(settings: dict, model: str, version: str, fmt: str) -> dict:
    serialized = EXPORT_DIR / model / SERIALIZED[fmt]
    if not serialized.exists():
        raise FileNotFoundError(f"{serialized} is missing: run `python -m optimize.export --model {model}`")
    entry = settings["models"][model]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "model-config.yaml"
        config.write_text(yaml.safe_dump(model_config(settings, model, fmt), sort_keys=False))
        subprocess.run([str(Path(sys.executable).parent / "torch-model-archiver"),
                        "--model-name", model, "--version", version, "--serialized-file", str(serialized),
                        "--handler", str(HANDLERS / entry["handler"]),
                        "--extra-files", ",".join(str(HANDLERS / f) for f in HANDLER_MODULES),
                        "--config-file", str(config), "--export-path", tmp, "--force"], check=True)
        shutil.move(Path(tmp) / f"{model}.mar", STORE / archive_name(model, version))
    weights = WEIGHTS_DIR / f"{model}.pt"
    return dict(model=model, version=version, format=fmt, archive=archive_name(model, version),
                default=version == entry["default"],
                weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
                test_accuracy=test_accuracy(model), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def main(args):
    settings = load_settings()
    models = args.models or list(settings["models"])
    manifest_path = STORE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else []
    for model in models:
        if model not in settings["models"]:
            sys.exit(f"error: {model!r} is not in model_store/models.yaml")
        if not (EXPORT_DIR / model).exists():
            print(f"skip {model}: no export in {EXPORT_DIR / model} (no shipped weights yet?)")
            continue
        for version, fmt in settings["models"][model]["versions"].items():
            entry = build_archive(settings, model, version, fmt)
            manifest = [m for m in manifest if (m["model"], m["version"]) != (model, version)] + [entry]
            print(f"archived {entry['archive']} ({fmt})")
    manifest_path.write_text(json.dumps(sorted(manifest, key=lambda m: (m["model"], m["version"])), indent=1))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="model names (default: all in models.yaml)")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
