"""The project's facts, each written once: where things live, the models and their data sets, how
model_store/models.yaml and the manifest read, and the machine.

Torch-free on purpose: serving/, ui/ and loadtest/ import it without loading the build (torch,
onnxruntime). The handlers do not import it: they read the same facts from the archive's
model-config.yaml, which model_store/archive.py writes from here.

    python -m catalog        # the paths and the machine, as this checkout sees them
"""
import json
import os
import platform
import sys
from pathlib import Path
from typing import NamedTuple

import yaml

# Where things live. Everything below ROOT except the weights and models.yaml is built or git-ignored.
ROOT = Path(__file__).resolve().parent
# The real data sets: beside the checkout (../shared/data), or wherever DATA_DIR points. Only
# training, `make evaluate`, calibration and validating a new format read them; a fresh clone
# without them still exports, archives (from the committed validation records) and serves.
DATA_DIR = Path(os.environ.get("DATA_DIR") or ROOT.parent / "shared" / "data")
WEIGHTS_DIR = ROOT / "training" / "weights"  # shipped weights, model cards, calibration and validation records
EXPORT_DIR = ROOT / "optimize" / "exported"  # one folder per model: every serving format's file
HANDLERS_DIR = ROOT / "handlers"  # what each .mar ships
# The handler modules import each other by file name, as TorchServe loads them from the .mar's flat
# folder. Everything else imports them the same way (`from runtimes import ...`, never
# `handlers.runtimes`), so that each is loaded once per process: importing this module makes that work.
if str(HANDLERS_DIR) not in sys.path:
    sys.path.append(str(HANDLERS_DIR))
STORE = ROOT / "model_store"  # the archives
MODELS_YAML = STORE / "models.yaml"
TS_CONFIG = ROOT / "config.properties"  # what `make serve` runs TorchServe with
RUN_DIR = ROOT / ".run"  # the running server's key file, logs, pid and prediction log
KEY_FILE = RUN_DIR / "key_file.json"  # its tokens (TorchServe writes the file into its working directory)
RESULTS_DIR = ROOT / "results"  # reports of benchmarks, evaluations and load tests

# The data sets. Per-channel statistics of the training images, in [0, 1] units: training normalises
# with them and every archive carries them to its handler.
MEAN = {"mnist": (0.1307,), "cifar10": (0.4914, 0.4822, 0.4465)}
STD = {"mnist": (0.3081,), "cifar10": (0.2470, 0.2435, 0.2616)}
INPUT_SHAPE = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}  # C, H, W of one image the models take
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CLASSES = {"mnist": tuple(str(d) for d in range(10)), "cifar10": CIFAR10_CLASSES}

# The served models and the data set each one is trained on (training/models.py builds them).
MODEL_DATASETS = {"mnist_lenet5": "mnist", "mnist_alexnet": "mnist", "cifar10_resnet18": "cifar10"}


def dataset_of(model: str) -> str:
    if model not in MODEL_DATASETS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODEL_DATASETS)}")
    return MODEL_DATASETS[model]


def weights_path(model: str) -> Path:
    return WEIGHTS_DIR / f"{model}.pt"


def archive_name(model: str, version: str) -> str:
    return f"{model}_v{version}.mar"


# models.yaml: `defaults:` (TorchServe's model-config keys and the handler's), and per model its
# handler, default version and versions. A version is `"1.1": onnx` or `"1.3": {format: onnx_int8,
# load: false, tta: flip}`.
VERSION_KEYS = ("format", "load", "tta")


class VersionSpec(NamedTuple):
    format: str  # a name of optimize/formats.py FORMATS (model_store/archive.py checks it)
    load: bool  # registered when TorchServe starts
    tta: str | None  # test-time augmentation (handlers/runtimes.py TTA), or None


def load_settings(path: Path | None = None) -> dict:
    return yaml.safe_load(Path(path or MODELS_YAML).read_text())


def serving_settings(settings: dict, model: str | None = None) -> dict:
    """models.yaml's TorchServe settings (`defaults.serving`), with `model`'s own `serving:` over them."""
    return dict(settings["defaults"]["serving"], **(settings["models"][model].get("serving", {}) if model else {}))


def version_spec(value) -> VersionSpec:
    """A version's value in models.yaml -> its VersionSpec."""
    spec = {"format": value} if isinstance(value, str) else dict(value) if isinstance(value, dict) else {}
    if set(spec) - set(VERSION_KEYS) or not isinstance(spec.get("format"), str):
        raise ValueError(f"bad version entry {value!r} in models.yaml: expected a format name or "
                         "{format: <format>, load: false, tta: <augmentation>}")
    return VersionSpec(spec["format"], bool(spec.get("load", True)), spec.get("tta"))


def versions(settings: dict, model: str) -> dict[str, VersionSpec]:
    """version -> VersionSpec of `model`, in models.yaml's order."""
    return {version: version_spec(value) for version, value in settings["models"][model]["versions"].items()}


# manifest.json: what `make archive` archived, one entry per model version (model_store/archive.py
# build_archive writes the fields).
def manifest_path(store: Path | None = None) -> Path:
    return Path(store or STORE) / "manifest.json"


def read_manifest(store: Path | None = None) -> dict[tuple[str, str], dict]:
    """(model, version) -> its manifest entry in `store` (default STORE); empty before the first
    `make archive`."""
    path = manifest_path(store)
    entries = json.loads(path.read_text()) if path.exists() else []
    return {(m["model"], m["version"]): m for m in entries}


def served_defaults(store: Path | None = None) -> dict[str, str]:
    """model -> the version the manifest makes its default (models.yaml's, or `make tune`'s choice)."""
    return {model: version for (model, version), m in read_manifest(store).items() if m["default"]}


# tuned.json: what `make tune` (optimize/tune.py) measured on this machine, with the fastest version
# per model; machine-specific and git-ignored.
def tuned_path(store: Path | None = None) -> Path:
    return Path(store or STORE) / "tuned.json"


def tuned_choices(store: Path | None = None) -> dict[str, str]:
    """model -> its fastest version as `make tune` measured it on this CPU; empty when nothing was
    measured here, or it was measured on another CPU (the fastest format differs between them)."""
    path = tuned_path(store)
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("machine") != machine():
        return {}
    return {model: r["chosen"] for model, r in record["models"].items() if "chosen" in r}  # older records: none


# The machine.
# The CPU flags that decide which kernels are fast (and which a compiled package may use): vector
# width, bf16 and int8 dot products, AMX tiles.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo(key: str) -> str | None:
    path = Path("/proc/cpuinfo")
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.machine()


def cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def cpu_isa() -> list[str]:
    flags = cpu_flags()
    return [f for f in ISA_FLAGS if f in flags]


def machine() -> dict:
    """What a measurement of speed holds for: the CPU model and its relevant flags."""
    return {"cpu": cpu_name(), "flags": cpu_isa()}


if __name__ == "__main__":
    for name in ("ROOT", "DATA_DIR", "WEIGHTS_DIR", "EXPORT_DIR", "STORE", "TS_CONFIG", "RUN_DIR", "RESULTS_DIR"):
        print(f"{name:12} {globals()[name]}")
    print(f"{'CPU':12} {cpu_name()} ({os.cpu_count()} cores; {', '.join(cpu_isa()) or 'no listed ISA flags'})")
