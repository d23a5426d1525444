"""Serving formats: validated against fp32 before archiving, refused when they lose accuracy, archived
without being loaded at start, served by the real TorchServe, and benchmarked (quick mode)."""
import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import catalog
from drawing import draw_digit, png_bytes
from model_store import archive
from optimize import bench_formats, formats, validate
from serving import server
from conftest import DATA_DIR, start_torchserve

MODEL = "mnist_lenet5"
# lenet5's versions beyond fp32 TorchScript/ONNX in models.yaml, all `load: false`
REDUCED = {"torchscript_bf16": "1.2", "onnx_int8": "1.3", "openvino_bf16": "1.4", "openvino_int8": "1.5", "aoti": "1.6"}
LENET5_FLOPS = 2 * (6 * 28 * 28 * 25 + 16 * 10 * 10 * 150 + 400 * 120 + 120 * 84 + 84 * 10)  # by hand, per image


@pytest.mark.integration
def test_start_up_set_and_defaults_follow_the_tuning_of_this_cpu_only(tmp_path):
    """models.yaml as committed (written out here rather than recomputed with the code's own parser):
    before `make tune` measured this CPU its defaults start first; after, the chosen version is the
    default and starts too, though models.yaml says `load: false`; a measurement of another CPU, or a
    choice that is not archived, changes nothing."""
    settings, manifest = catalog.load_settings(), [dict(m) for m in catalog.read_manifest().values()]
    for entry in manifest:
        (tmp_path / entry["archive"]).symlink_to(catalog.STORE / entry["archive"])

    def tuned(machine: dict, chosen: dict) -> dict:
        catalog.tuned_path(tmp_path).write_text(json.dumps(
            {"machine": machine, "models": {model: {"chosen": version} for model, version in chosen.items()}}))
        return archive.write_manifest(settings, manifest, tmp_path)

    untuned = ["mnist_lenet5=mnist_lenet5_v1.1.mar", "mnist_lenet5=mnist_lenet5_v1.0.mar",
               "mnist_alexnet=mnist_alexnet_v1.1.mar",
               "cifar10_resnet18=cifar10_resnet18_v1.3.mar", "cifar10_resnet18=cifar10_resnet18_v1.0.mar"]
    archive.write_manifest(settings, manifest, tmp_path)
    assert server.startup_models(tmp_path) == untuned
    assert tuned(catalog.machine(), {MODEL: "1.5", "cifar10_resnet18": "1.3"}) == \
        {MODEL: "tuned", "cifar10_resnet18": "tuned", "mnist_alexnet": "configured"}
    assert server.startup_models(tmp_path)[:3] == [f"{MODEL}={MODEL}_v1.5.mar", f"{MODEL}={MODEL}_v1.0.mar",
                                                   f"{MODEL}={MODEL}_v1.1.mar"]
    assert server.startup_models(tmp_path)[3:] == untuned[2:]
    assert catalog.served_defaults(tmp_path) == {MODEL: "1.5", "mnist_alexnet": "1.1", "cifar10_resnet18": "1.3"}
    tuned({"cpu": "another CPU", "flags": []}, {MODEL: "1.5"})
    assert server.startup_models(tmp_path) == untuned
    assert tuned(catalog.machine(), {MODEL: "9.9"})[MODEL] == "configured"  # not archived
    assert server.startup_models(tmp_path) == untuned


def test_a_bad_version_entry_is_refused_by_name():
    for bad in ({"format": "onnx", "serve": False}, "onnx_int4", {"load": False}, {"format": "onnx", "tta": "rotate"}):
        with pytest.raises(ValueError, match="bad version entry"):
            archive.version_spec(bad)


@pytest.mark.integration
def test_reduced_precision_archives_hold_their_format_and_validated_accuracy():
    entries = catalog.read_manifest()
    for fmt, version in REDUCED.items():
        entry = entries[(MODEL, version)]
        assert (entry["format"], entry["precision"]) == (fmt, formats.FORMATS[fmt].precision)
        assert entry["load_at_start"] == entry["default"]  # `load: false`, unless `make tune` chose it here
        assert entry["accuracy_delta_points"] >= -validate.MAX_ACCURACY_LOSS and entry["top1_agreement"] >= 0.99
        with zipfile.ZipFile(catalog.STORE / entry["archive"]) as mar:
            meta = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            assert meta["model"]["serializedFile"] == formats.FORMATS[fmt].filename
            assert f"format: {fmt}" in mar.read("model-config.yaml").decode()
    record = validate.load_records(MODEL)["formats"]["onnx_int8"]
    assert validate.is_current(record, MODEL, "onnx_int8") and record["test_images"] == 10_000


@pytest.mark.integration  # calibrates, validates on the full test split and archives: ~15 s
def test_int8_calibrated_on_blank_images_is_refused_and_not_archived(tmp_path, monkeypatch, capsys, mnist_test):
    """The real quantiser, validator and archiver on a badly calibrated INT8 model: blank calibration
    images give the input quantiser a range that clips every stroke away. (mnist_test: skips without data.)"""
    exported, weights, store = tmp_path / "exported", tmp_path / "weights", tmp_path / "store"
    for folder in (exported / MODEL, weights, store):
        folder.mkdir(parents=True)
    for name in ("model.pt", "model.onnx"):
        shutil.copy(catalog.EXPORT_DIR / MODEL / name, exported / MODEL / name)
    shutil.copy(catalog.weights_path(MODEL), weights)
    monkeypatch.setattr(catalog, "EXPORT_DIR", exported)
    monkeypatch.setattr(catalog, "WEIGHTS_DIR", weights)  # no committed calibration ranges there: calibrates
    monkeypatch.setattr(catalog, "STORE", store)
    monkeypatch.setattr(archive, "build_isolated", formats.build)  # in this process, to see the patches
    real_images = formats.calibration_images

    def blank_images(model, data_dir, n, seed):  # every pixel at the normalised value of black
        one = real_images(model, data_dir, 1, seed)
        return np.full((n, *one.shape[1:]), one.min(), np.float32)

    monkeypatch.setattr(formats, "calibration_images", blank_images)
    archive.main(archive.get_args_parser().parse_args([MODEL, "--data-dir", str(DATA_DIR)]))
    err = capsys.readouterr().err
    assert f"refused {MODEL} 1.3 (onnx_int8): loses" in err
    assert not (store / catalog.archive_name(MODEL, "1.3")).exists()
    assert (store / catalog.archive_name(MODEL, "1.2")).exists()
    archived = {version for _, version in catalog.read_manifest(store)}
    assert f"refused {MODEL} 1.5 (openvino_int8): loses" in err  # OpenVINO runs the same INT8 file
    assert archived == {"1.0", "1.1", "1.2", "1.4", "1.6"}
    record = json.loads((weights / f"{MODEL}_formats.json").read_text())["formats"]["onnx_int8"]
    assert not record["passed"] and record["accuracy_delta_points"] < -validate.MAX_ACCURACY_LOSS
    assert "| onnx_int8 | int8 |" in (weights / f"{MODEL}_formats.md").read_text()


@pytest.fixture(scope="module")
def reduced_precision_server(tmp_path_factory):
    """fp32 1.0 and bf16 1.2 loaded at start; the others are registered on demand, as `load: false` intends."""
    run_dir = tmp_path_factory.mktemp("formats")
    client = start_torchserve(run_dir, models=[f"{MODEL}={catalog.archive_name(MODEL, v)}" for v in ("1.0", "1.2")])
    for version in set(REDUCED.values()) - {"1.2"}:
        client.register(catalog.archive_name(MODEL, version))
    yield client
    server.stop(run_dir)


@pytest.mark.integration
def test_reduced_precision_versions_are_served_like_fp32(reduced_precision_server):
    for digit in (0, 1, 4, 7):
        image = png_bytes(draw_digit(digit))
        fp32 = reduced_precision_server.predict(MODEL, image, version="1.0", top_k=10)
        for fmt, version in REDUCED.items():
            served = reduced_precision_server.predict(MODEL, image, version=version, top_k=10)
            assert (served["format"], served["version"], served["index"]) == (fmt, version, digit)
            assert abs(served["confidence"] - fp32["confidence"]) < 0.02


@pytest.mark.slow
def test_quick_benchmark_writes_table_chart_and_peak_fractions(tmp_path):
    bench_formats.main(bench_formats.get_args_parser().parse_args(
        ["--quick", "--models", MODEL, "--output-dir", str(tmp_path)]))
    result = json.loads((tmp_path / "bench_formats.json").read_text())
    assert result["meta"]["flops"][MODEL] == LENET5_FLOPS
    cells = {(r["format"], r["batch"]) for r in result["rows"]}
    served_cpu_formats = ("torchscript", "onnx", *REDUCED)
    assert cells == {(f, b) for f in served_cpu_formats for b in bench_formats.BATCH_SIZES}
    for row in result["rows"]:
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
        assert 0 < row["peak_fraction"] < 1
    table = (tmp_path / "bench_formats.md").read_text()
    assert table.count(f"| {MODEL} |") == len(cells) and "GFLOP/s" in table
    assert (tmp_path / "bench_formats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peaks_follow_the_cpu_flags_amx_included():
    """AVX2 only, AVX-512 with BF16/VNNI, and AMX: each precision's peak is its fastest instruction's."""
    avx2 = bench_formats.peak(2, 3.0, {"avx2", "fma"})
    assert avx2["fp32"][0] == avx2["bf16"][0] == avx2["int8"][0] == 2 * 3.0 * 2 * 8 * 2
    avx512 = bench_formats.peak(2, 3.0, {"avx512f", "avx512_bf16", "avx512_vnni"})
    assert [avx512[p][0] for p in ("fp32", "bf16", "int8")] == [2 * 3.0 * 2 * 16 * ops for ops in (2, 4, 8)]
    amx = bench_formats.peak(2, 3.0, {"avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"})
    assert amx["fp32"] == avx512["fp32"]
    assert amx["bf16"][0] == 2 * 3.0 * 2048 and amx["int8"][0] == 2 * 3.0 * 4096
    assert "AMX TDPBF16PS" in amx["bf16"][1]


def test_every_format_has_a_runtime_and_a_way_to_be_built():
    from runtimes import RUNTIMES
    assert set(RUNTIMES) == set(formats.FORMATS)
    for fmt in formats.FORMATS:
        built = formats.built_format(fmt)
        assert built in formats.BUILDERS or built in formats.FP32_RECIPES, fmt  # FP32: optimize.export
        assert formats.FORMATS[built].filename == formats.FORMATS[fmt].filename, fmt


PINNED_THREADS = """
import json, pathlib, sys, threading, time, numpy as np
from runtimes import load_runtime
run, seen, end = load_runtime(sys.argv[1], sys.argv[2], 1), set(), time.monotonic() + 1
def watch():  # OpenVINO pins a thread while it infers and lets it go after: watched meanwhile
    while time.monotonic() < end:
        for task in pathlib.Path("/proc/self/task").iterdir():
            try:
                seen.add((task / "status").read_text().split("Cpus_allowed_list:")[1].split()[0])
            except OSError:  # a thread that ended
                pass
watcher = threading.Thread(target=watch)
watcher.start()
while time.monotonic() < end:
    run(np.zeros((8, 1, 28, 28), np.float32))
watcher.join()
print(json.dumps(sorted(seen)))
"""


@pytest.mark.parametrize("fmt", ["openvino_bf16", "openvino_int8"])
def test_openvino_threads_may_run_on_every_core(fmt):
    """OpenVINO pins a worker's thread to the first core by default: two one-thread workers then shared
    one core and the served ResNet-18 answered half its images/s. Every thread of the runtime keeps the
    process's CPUs."""
    handlers = catalog.ROOT / "handlers"
    allowed = subprocess.run([sys.executable, "-c", PINNED_THREADS, fmt, str(formats.serialized_path(MODEL, fmt))],
                             env={"PYTHONPATH": str(handlers), "PATH": "/usr/bin:/bin"}, cwd=handlers,
                             capture_output=True, text=True, check=True).stdout
    whole = open("/proc/self/status").read().split("Cpus_allowed_list:")[1].split()[0]
    assert json.loads(allowed) == [whole]
