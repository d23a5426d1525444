"""Temperature scaling (training/calibrate.py) and the temperature the archives carry (model_store/archive.py)."""
import hashlib
import json
import shutil
import zipfile

import numpy as np
import pytest
import yaml

import catalog
from model_store import archive
from optimize import formats, validate
from training import calibrate

MODEL = "mnist_lenet5"


def calibrated_logits(n=20000, classes=10, scale=2.0, seed=0):
    """Logits and labels drawn from softmax(logits): confidences that are right by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, (n, classes))
    cumulative = calibrate.softmax(logits).cumsum(1)
    labels = np.minimum((cumulative < rng.random((n, 1))).sum(1), classes - 1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 3.0])
def test_fit_recovers_the_temperature_the_logits_were_scaled_by(true_t):
    logits, labels = calibrated_logits()
    assert calibrate.fit_temperature(logits * true_t, labels) == pytest.approx(true_t, rel=0.03)


def test_overconfident_logits_get_a_temperature_above_one_and_lose_their_ece():
    logits, labels = calibrated_logits()
    sharp = logits * 3  # over-confident: the same ranking, three times the margin
    t = calibrate.fit_temperature(sharp, labels)
    assert t > 1
    assert calibrate.ece(sharp, labels) > 0.15
    assert calibrate.ece(sharp, labels, t) < 0.015
    assert calibrate.nll(sharp, labels, t) < calibrate.nll(sharp, labels)


def test_ece_near_zero_when_calibrated_and_exact_on_a_small_case():
    logits, labels = calibrated_logits()
    assert calibrate.ece(logits, labels) < 0.015
    # Two images at confidence 0.95 (one right) and two at 0.65 (both right): bins 15 and 10 of 15.
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.65, 0.35], [0.65, 0.35]])
    labels = np.array([0, 1, 0, 0])
    expected = (2 * abs(0.5 - 0.95) + 2 * abs(1.0 - 0.65)) / 4
    assert calibrate.ece(np.log(probs), labels) == pytest.approx(expected)
    rows = calibrate.reliability(np.log(probs), labels)
    assert [r["count"] for r in rows] == [0] * 9 + [2] + [0] * 4 + [2]


def test_a_fit_that_ends_on_its_bound_is_refused():
    """Every validation image right and far apart: the NLL falls forever as T -> 0, no T is 'best'."""
    labels = np.arange(1000) % 10
    logits = np.eye(10)[labels] * 5
    with pytest.raises(calibrate.CalibrationFailed, match="no minimum inside its bounds"):
        calibrate.fit_temperature(logits, labels)


CARD = "# Model card: m\n\n| | |\n|---|---|\n\n![training curves](m_curves.png)\n"


def test_card_section_is_added_once_and_replaced_in_place():
    record = json.loads((catalog.WEIGHTS_DIR / f"{MODEL}_calibration.json").read_text())
    section = calibrate.card_section(record)
    once = calibrate.replace_section(CARD, section)
    assert once.startswith(CARD) and once.count("## Calibration") == 1
    assert calibrate.replace_section(once, section) == once
    later = once + "\n## How it was trained\n\nby hand\n"  # a hand-written section after it stays
    changed = calibrate.replace_section(later, calibrate.card_section(dict(record, temperature=2.5)))
    assert "T = 2.500" in changed and f"T = {record['temperature']:.3f}" not in changed
    assert changed.endswith("\n## How it was trained\n\nby hand\n") and changed.count("## Calibration") == 1


@pytest.mark.parametrize("model", ["mnist_lenet5", "mnist_alexnet", "cifar10_resnet18"])
def test_committed_calibration_matches_the_committed_weights(model):
    """A re-training that forgot `python -m training.calibrate` would fail every archive build."""
    record = json.loads((catalog.WEIGHTS_DIR / f"{model}_calibration.json").read_text())
    assert record["weights_sha256"] == hashlib.sha256(catalog.weights_path(model).read_bytes()).hexdigest()
    assert record["test_ece_after"] <= record["test_ece_before"] + 0.002
    assert record["val_nll_after"] <= record["val_nll_before"]
    assert "## Calibration" in (catalog.WEIGHTS_DIR / f"{model}.md").read_text()


def test_model_config_carries_the_committed_temperature():
    committed = json.loads((catalog.WEIGHTS_DIR / f"{MODEL}_calibration.json").read_text())["temperature"]
    config = archive.model_config(catalog.load_settings(), MODEL, archive.version_spec("onnx"))
    assert config["handler"]["temperature"] == committed != 1.0


def test_the_archive_ships_the_temperature_in_its_model_config(tmp_path, monkeypatch):
    """The .mar itself, as TorchServe reads it, not only the dict."""
    if not formats.serialized_path(MODEL, "torchscript").exists():
        pytest.skip("no TorchScript export here (make export)")
    monkeypatch.setattr(catalog, "STORE", tmp_path)
    record = validate.load_records(MODEL)["formats"]["torchscript"]
    archive.build_archive(catalog.load_settings(), MODEL, "9.9", catalog.VersionSpec("torchscript", False, None), record)
    with zipfile.ZipFile(tmp_path / catalog.archive_name(MODEL, "9.9")) as mar:
        config = yaml.safe_load(mar.read("model-config.yaml"))
    assert config["handler"]["temperature"] == archive.temperature(MODEL)


def weights_beside(tmp_path, monkeypatch, weights: bytes, calibration: bool = True):
    """A weights folder of its own: `weights` as the model's .pt, the committed calibration beside it."""
    (tmp_path / f"{MODEL}.pt").write_bytes(weights)
    if calibration:
        shutil.copy(catalog.WEIGHTS_DIR / f"{MODEL}_calibration.json", tmp_path)
    monkeypatch.setattr(catalog, "WEIGHTS_DIR", tmp_path)


def test_calibration_of_other_weights_stops_the_build_and_names_the_fix(tmp_path, monkeypatch):
    weights_beside(tmp_path, monkeypatch, b"re-trained weights")
    with pytest.raises(SystemExit, match=f"other weights .*python -m training.calibrate --model {MODEL}"):
        archive.model_config(catalog.load_settings(), MODEL, archive.version_spec("onnx"))


def test_a_model_without_calibration_is_served_at_temperature_one_with_a_note(tmp_path, monkeypatch, capsys):
    weights_beside(tmp_path, monkeypatch, catalog.weights_path(MODEL).read_bytes(), calibration=False)
    assert archive.model_config(catalog.load_settings(), MODEL, archive.version_spec("onnx"))["handler"]["temperature"] == 1.0
    assert f"python -m training.calibrate --model {MODEL}" in capsys.readouterr().err


def test_missing_data_is_one_line_not_a_traceback(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        calibrate.main(calibrate.get_args_parser().parse_args(["--model", MODEL, "--data-dir", str(tmp_path)]))
    assert exit_.value.code == (f"error: calibration needs the real data set: mnist is not in {tmp_path} "
                                "(expected MNIST/raw/t10k-images-idx3-ubyte)")
