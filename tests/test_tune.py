"""make tune: every archived version of a model timed as a worker runs it; the fastest one without
test-time augmentation is recommended, with the machine named."""
import json
import shutil
import subprocess
import sys

import pytest

import catalog
from optimize import tune
from conftest import ROOT


def test_the_fastest_version_without_tta_is_recommended():
    figures = {"1.0": {"images_per_s": 100, "tta": None}, "1.3": {"images_per_s": 300, "tta": None},
               "1.4": {"images_per_s": 900, "tta": "flip"}, "1.6": {"images_per_s": 250, "tta": None}}
    assert tune.fastest(figures) == "1.3"


def test_models_yaml_default_stays_unless_the_fastest_is_clearly_faster():
    figures = {"1.1": {"images_per_s": 100, "tta": None}, "1.3": {"images_per_s": 104, "tta": None},
               "1.4": {"images_per_s": 900, "tta": "flip"}}
    assert tune.choose(figures, "1.1") == "1.1"  # 4% is within this machine's noise
    figures["1.3"]["images_per_s"] = 106
    assert tune.choose(figures, "1.1") == "1.3"
    assert tune.choose(figures, "1.4") == "1.3"  # never a TTA version, even as models.yaml's default
    assert tune.choose(figures, "9.9") == "1.3"  # a default that is not archived here


@pytest.mark.integration  # needs the archives (make archive)
def test_tune_times_every_archived_version_names_the_machine_and_sets_the_defaults(tmp_path):
    """On a store of its own (the archived manifest copied): the served one is never touched."""
    # In a process of its own, as `make tune` runs it: OpenVINO's and AOTInductor's native threads, loaded
    # into this one after Locust's gevent patching (tests/test_soak.py), crashed a later fork.
    shutil.copy(catalog.manifest_path(), tmp_path)
    served = catalog.manifest_path().read_text()
    command = [sys.executable, "-m", "optimize.tune", "--quick", "--store", str(tmp_path),
               "--report", str(tmp_path / "tune.md")]
    subprocess.run(command, cwd=ROOT, check=True)
    result = json.loads(catalog.tuned_path(tmp_path).read_text())
    manifest = list(catalog.read_manifest().values())
    assert result["machine"] == catalog.machine() and result["machine"]["cpu"]
    for model in ("mnist_lenet5", "mnist_alexnet", "cifar10_resnet18"):
        r = result["models"][model]
        assert set(r["versions"]) == {m["version"] for m in manifest if m["model"] == model}
        assert all(f["images_per_s"] > 0 for f in r["versions"].values())
        assert r["fastest"] == tune.fastest(r["versions"]) and not r["versions"][r["fastest"]]["tta"]
        assert r["chosen"] == tune.choose(r["versions"], r["models_yaml_default"])
        assert (r["batch_size"], r["threads"]) == (8, 1)  # models.yaml defaults: batchSize 8, 1 thread
        tuned = catalog.read_manifest(tmp_path)[(model, r["chosen"])]
        assert tuned["default"] and tuned["load_at_start"]
    assert catalog.served_defaults(tmp_path) == {m: r["chosen"] for m, r in result["models"].items()}
    assert result["models"]["cifar10_resnet18"]["versions"]["1.4"]["tta"] == "flip"
    assert "| cifar10_resnet18 | 1.4 | openvino_bf16 + flip |" in (tmp_path / "tune.md").read_text()
    assert catalog.manifest_path().read_text() == served
    # What `make archive` runs: measured on this CPU for these archives, so nothing to do
    again = subprocess.run(command + ["--unless-tuned"], cwd=ROOT, check=True, capture_output=True, text=True)
    assert "already holds this CPU's measurements" in again.stdout
    assert json.loads(catalog.tuned_path(tmp_path).read_text())["measured"] == result["measured"]
