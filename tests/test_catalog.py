"""catalog.py holds each of the project's facts once, and the clients run without the build."""
import re
import subprocess
import sys

import pytest

import catalog
from catalog import ROOT

PRODUCT = ("catalog.py", "training", "optimize", "model_store", "handlers", "serving", "ui", "loadtest")


def product_sources() -> dict[str, str]:
    files = [ROOT / "catalog.py"] + [p for d in PRODUCT[1:] for p in sorted((ROOT / d).rglob("*.py"))
                                     if "grpc_stubs" not in p.parts]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


@pytest.mark.parametrize("fact, pattern", [
    ("the repository root", r"^ROOT\s*="),
    ("the data directory's default", r"""["']shared["']\s*/\s*["']data["']"""),
    ("the MNIST mean", r"0\.1307"),
    ("the CIFAR-10 standard deviations", r"0\.2470"),
    ("the manifest's file name", r"""["']manifest\.json["']"""),
    ("the models.yaml path", r"""["']models\.yaml["']\s*$"""),
    ("the weights folder", r"""["']training["']\s*/\s*["']weights["']"""),
])
def test_each_fact_is_written_once(fact, pattern):
    found = [f"{name}:{i}" for name, text in product_sources().items()
             for i, line in enumerate(text.splitlines(), 1)
             if re.search(pattern, line.split("#")[0]) and not line.lstrip().startswith(("#", '"', "'"))]
    assert len(found) == 1, f"{fact} is written in {len(found)} places: {found}"


def test_handler_modules_are_imported_by_file_name_only():
    """The .mar ships the handlers flat, so they import each other by file name; everything else does
    too, or a module would be loaded twice (`runtimes` and `handlers.runtimes`) in one process."""
    sources = product_sources()
    sources.update({str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "tests").glob("*.py"))})
    offenders = [name for name, text in sources.items() if re.search(r"^\s*(from|import) handlers\b", text, re.M)]
    assert not offenders


CLIENTS = ("catalog", "prediction_table", "serving.server", "serving.modelctl", "serving.corrections", "ui.shared",
           "ui.overview")
HEAVY = ("torch", "onnxruntime", "openvino", "training", "optimize", "model_store")


def test_serving_and_the_ui_import_neither_the_build_nor_training():
    """One fresh interpreter imports the clients one by one: the first that loads the build is named."""
    code = (f"import importlib, sys\nfor module in {CLIENTS!r}:\n    importlib.import_module(module)\n"
            f"    heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "    if heavy:\n        sys.exit(f'{module} loads {heavy}')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_models_yaml_reads_into_named_fields():
    settings = catalog.load_settings()
    for model, entry in settings["models"].items():
        specs = catalog.versions(settings, model)
        assert entry["default"] in specs
        assert all(isinstance(s, catalog.VersionSpec) and isinstance(s.load, bool) for s in specs.values())
    assert catalog.version_spec("onnx") == catalog.VersionSpec("onnx", True, None)
    assert catalog.version_spec({"format": "openvino_bf16", "tta": "flip", "load": False}) == \
        catalog.VersionSpec("openvino_bf16", False, "flip")
    for bad in ({"fromat": "onnx"}, {"load": False}, 3, None, {"format": "onnx", "workers": 2}):
        with pytest.raises(ValueError, match="bad version entry"):
            catalog.version_spec(bad)


def test_the_data_directory_follows_DATA_DIR(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import catalog; print(catalog.DATA_DIR)"], cwd=ROOT,
                          capture_output=True, text=True, env={"DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip() == str(tmp_path), done.stderr
    assert catalog.DATA_DIR == (ROOT.parent / "shared" / "data") or "DATA_DIR" in __import__("os").environ


def test_every_served_model_has_a_data_set_and_its_facts():
    for model, dataset in catalog.MODEL_DATASETS.items():
        assert catalog.dataset_of(model) == dataset
        channels = catalog.INPUT_SHAPE[dataset][0]
        assert len(catalog.MEAN[dataset]) == len(catalog.STD[dataset]) == channels
        assert len(catalog.CLASSES[dataset]) == 10
    with pytest.raises(ValueError, match="unknown model"):
        catalog.dataset_of("mnist_vgg")
