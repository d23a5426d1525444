"""Flip test-time augmentation: the runtime wrapper averages the logits of an image and of its mirror,
and ResNet-18's TTA version (models.yaml `"1.4": {format: openvino_bf16, tta: flip}`) serves exactly that."""
import io

import numpy as np
import pytest
from PIL import Image

from catalog import load_settings
from model_store import archive
from runtimes import FlipAverage, load_runtime
from optimize.formats import serialized_path
from serving import server
from conftest import start_torchserve

MODEL, TTA_VERSION, PLAIN_VERSION = "cifar10_resnet18", "1.4", "1.3"


def photos(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random 32x32 RGB images (uint8), left-right asymmetric like real photos."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(c.astype(np.uint8)).resize((32, 32), Image.BILINEAR)) for c in coarse])


def test_flip_average_is_the_mean_of_an_image_and_its_mirror_and_ignores_mirroring():
    run = load_runtime("onnx", str(serialized_path(MODEL, "onnx")), 1)
    x = np.random.default_rng(1).normal(size=(5, 3, 32, 32)).astype(np.float32)
    mirror = np.ascontiguousarray(x[..., ::-1])
    both = FlipAverage(run)(x)
    np.testing.assert_allclose(both, (run(x) + run(mirror)) / 2, atol=1e-4)
    np.testing.assert_allclose(FlipAverage(run)(mirror), both, atol=1e-4)  # a mirror is flipped across the width
    assert np.abs(both - run(x)).max() > 1e-2  # and it is not the plain model


def test_a_version_entry_carries_its_tta_into_the_archive_config():
    spec = archive.version_spec(load_settings()["models"][MODEL]["versions"][TTA_VERSION])
    assert spec == archive.VersionSpec("openvino_bf16", False, "flip")
    assert archive.model_config(load_settings(), MODEL, spec)["handler"]["tta"] == "flip"
    plain = archive.version_spec("onnx_int8")
    assert "tta" not in archive.model_config(load_settings(), MODEL, plain)["handler"]
    with pytest.raises(ValueError, match="no test-time augmentation"):
        load_runtime("onnx", str(serialized_path(MODEL, "onnx")), 1, "rotate")


@pytest.fixture(scope="module")
def tta_server(tmp_path_factory):
    """INT8 1.3 at start; the flip-TTA version 1.4 registered on demand, as `load: false` intends."""
    run_dir = tmp_path_factory.mktemp("tta")
    client = start_torchserve(run_dir, models=[f"{MODEL}={archive.archive_name(MODEL, PLAIN_VERSION)}"])
    try:
        client.register(archive.archive_name(MODEL, TTA_VERSION))
        yield client
    finally:
        server.stop(run_dir)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def probabilities(answer: dict) -> np.ndarray:
    p = np.zeros(10)
    for entry in answer["top_k"]:
        p[entry["index"]] = entry["probability"]
    return p


@pytest.mark.integration
def test_the_tta_version_answers_the_same_for_a_photo_and_its_mirror(tta_server):
    changed = 0
    for pixels in photos(6):
        image, mirror = png(pixels), png(np.ascontiguousarray(pixels[:, ::-1]))
        tta = [tta_server.predict(MODEL, x, version=TTA_VERSION, top_k=10) for x in (image, mirror)]
        plain = [tta_server.predict(MODEL, x, version=PLAIN_VERSION, top_k=10) for x in (image, mirror)]
        assert {a["version"] for a in tta} == {TTA_VERSION} and {a["format"] for a in tta} == {"openvino_bf16"}
        np.testing.assert_allclose(*map(probabilities, tta), atol=1e-5)
        changed += np.abs(probabilities(plain[0]) - probabilities(plain[1])).max() > 1e-3
    assert changed >= 3, "the plain INT8 version should answer a photo and its mirror differently"
