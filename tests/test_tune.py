"""make tune: every archived version of a model timed as a worker runs it; the fastest one without
test-time augmentation is recommended, with the machine named."""
import json
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


@pytest.mark.integration  # needs the archives (make archive)
def test_tune_times_every_archived_version_and_names_the_machine(tmp_path):
    # In a process of its own, as `make tune` runs it: OpenVINO's and AOTInductor's native threads, loaded
    # into this one after Locust's gevent patching (tests/test_soak.py), crashed a later fork.
    out = tmp_path / "tuned.json"
    subprocess.run([sys.executable, "-m", "optimize.tune", "--quick", "mnist_lenet5", "cifar10_resnet18",
                    "--output", str(out), "--report", str(tmp_path / "tune.md")], cwd=ROOT, check=True)
    result = json.loads(out.read_text())
    manifest = list(catalog.read_manifest().values())
    assert result["machine"]["cpu"] and isinstance(result["machine"]["flags"], list)
    for model in ("mnist_lenet5", "cifar10_resnet18"):
        r = result["models"][model]
        assert set(r["versions"]) == {m["version"] for m in manifest if m["model"] == model}
        assert all(f["images_per_s"] > 0 for f in r["versions"].values())
        assert r["fastest"] == tune.fastest(r["versions"]) and not r["versions"][r["fastest"]]["tta"]
        assert (r["batch_size"], r["threads"]) == (8, 1)  # models.yaml defaults: batchSize 8, 1 thread
    assert result["models"]["cifar10_resnet18"]["versions"]["1.4"]["tta"] == "flip"
    assert "| cifar10_resnet18 | 1.4 | openvino_bf16 + flip |" in (tmp_path / "tune.md").read_text()
