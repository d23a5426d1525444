"""A checkout without the data sets (a fresh clone, a container build) archives every format from the
committed weights, validation records and INT8 calibration ranges; a record that does not describe
the build is refused with the reason. `.ci/run` also runs `make demo` and `make test` in an empty folder."""
import json
import shutil
import zipfile

import pytest

import catalog
from model_store import archive
from optimize import formats, validate
from training.data import DataMissing, load_split

MODEL = "mnist_lenet5"


def test_every_version_is_archived_from_the_committed_records_without_data(tmp_path, monkeypatch, capsys):
    """The formats built here are the files the committed records validated, byte for byte where it matters."""
    empty, store = tmp_path / "no_data", tmp_path / "store"
    empty.mkdir()
    store.mkdir()
    monkeypatch.setattr(catalog, "STORE", store)
    archive.main(archive.get_args_parser().parse_args([MODEL, "--data-dir", str(empty)]))
    captured = capsys.readouterr()
    assert "refused" not in captured.err, captured.err
    versions = catalog.load_settings()["models"][MODEL]["versions"]
    # An AOTInductor package is compiled for the CPU's flags: on a CPU other than the one its committed
    # record was validated on, it cannot be certified without the test split, and says so.
    aoti = [v for v, spec in versions.items() if archive.version_spec(spec).format == "aoti"]
    other_cpu = validate.load_records(MODEL)["formats"]["aoti"]["recipe"]["cpu_isa"] != catalog.cpu_isa()
    for version in aoti if other_cpu else []:
        assert f"skipped {MODEL} {version} (aoti): the validation record is for another recipe (cpu_isa differ)" \
            in captured.err, captured.err
    assert captured.err.count("skipped") == (len(aoti) if other_cpu else 0), captured.err
    archived = {m["version"]: m for m in catalog.read_manifest(store).values()}
    assert set(archived) == set(versions) - (set(aoti) if other_cpu else set())
    records = validate.load_records(MODEL)["formats"]
    for entry in archived.values():
        assert entry["test_accuracy"] == records[validate.record_key(entry["format"], entry["tta"])]["accuracy"]


def test_int8_built_from_the_committed_ranges_is_the_validated_file(tmp_path, monkeypatch):
    exported = tmp_path / "exported"
    (exported / MODEL).mkdir(parents=True)
    shutil.copy(formats.serialized_path(MODEL, "onnx"), exported / MODEL)
    monkeypatch.setattr(catalog, "EXPORT_DIR", exported)
    monkeypatch.setattr(formats, "calibration_images", lambda *a: pytest.fail("calibrated instead of using the ranges"))
    built = formats.build(MODEL, "onnx_int8", tmp_path / "no_data")
    assert validate.file_sha256(built) == validate.load_records(MODEL)["formats"]["onnx_int8"]["file_sha256"]


def test_stale_ranges_without_data_name_the_problem(tmp_path, monkeypatch):
    exported, weights = tmp_path / "exported", tmp_path / "weights"
    (exported / MODEL).mkdir(parents=True)
    weights.mkdir()
    shutil.copy(formats.serialized_path(MODEL, "onnx"), exported / MODEL)
    shutil.copy(catalog.weights_path(MODEL), weights)  # no calibration ranges beside these weights
    monkeypatch.setattr(catalog, "EXPORT_DIR", exported)
    monkeypatch.setattr(catalog, "WEIGHTS_DIR", weights)
    with pytest.raises(DataMissing, match="does not exist"):
        formats.build(MODEL, "onnx_int8", tmp_path / "no_data")


def test_a_record_for_other_weights_is_refused_without_data(tmp_path, monkeypatch):
    records = validate.load_records(MODEL)
    for fmt in ("onnx", "torchscript_bf16"):
        stale = json.loads(json.dumps(records))
        stale["formats"][fmt]["weights_sha256"] = "0" * 64
        monkeypatch.setattr(validate, "load_records", lambda model: stale)
        with pytest.raises(validate.NoMatchingRecord, match="for other weights and the mnist test split is not in"):
            validate.ensure_validated(MODEL, fmt, tmp_path)
    stale["formats"]["onnx"] = dict(records["formats"]["onnx"], file_sha256="0" * 64)
    with pytest.raises(validate.NoMatchingRecord, match="another build of model.onnx"):
        validate.ensure_validated(MODEL, "onnx", tmp_path)


def test_torchscript_hash_leaves_out_source_paths_only(tmp_path):
    """Two checkouts write different debug records (absolute source paths); the weights and code decide."""
    original = formats.serialized_path(MODEL, "torchscript")

    def rewritten(name, change):
        path = tmp_path / name
        with zipfile.ZipFile(original) as src, zipfile.ZipFile(path, "w") as dst:
            for item in src.infolist():
                data = src.read(item.filename)
                dst.writestr(item, change(item.filename, data))
        return path

    moved = rewritten("moved.pt", lambda n, d: d.replace(b"/", b"\\") if n.endswith((".debug_pkl", "serialization_id")) else d)
    assert validate.file_sha256(moved) == validate.file_sha256(original)
    changed = rewritten("changed.pt", lambda n, d: d[:-1] + bytes([d[-1] ^ 1]) if "/constants/" in n else d)
    assert validate.file_sha256(changed) != validate.file_sha256(original)


def test_missing_data_is_named_not_torchvisions_download_hint(tmp_path):
    with pytest.raises(DataMissing, match=f"mnist is not in {tmp_path}"):
        load_split("mnist", tmp_path, train=False)
    with pytest.raises(DataMissing, match="does not exist"):
        load_split("cifar10", tmp_path / "nowhere", train=True)
