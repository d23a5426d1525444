"""TorchScript and ONNX exports of the shipped weights agree with eager PyTorch."""
import json

import pytest

from optimize import export
import catalog


@pytest.mark.parametrize("model", ["mnist_lenet5"])
def test_exports_match_eager(tmp_path, model):
    if not catalog.weights_path(model).exists():
        pytest.fail(f"shipped weights {model}.pt are missing")
    export.main(export.get_args_parser().parse_args(["--model", model, "--output-dir", str(tmp_path)]))
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["torchscript_max_abs_diff"] <= export.TOLERANCE
    assert report["onnx_max_abs_diff"] <= export.TOLERANCE
    assert (tmp_path / "model.pt").exists() and (tmp_path / "model.onnx").exists()


def test_export_without_weights_names_the_problem(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(catalog, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(SystemExit, match="no shipped weights"):
        export.main(export.get_args_parser().parse_args(["--model", "mnist_lenet5"]))
