"""The in-process Classifier (handlers/classifier.py): the one normalisation, the softmax with its
temperature, the response schema, and that the handler and model_store/archive.py's factory answer
with it."""
import math

import numpy as np
import pytest
import torch
from ts.context import RequestProcessor

from catalog import CLASSES, MEAN, STD, load_settings
from classifier import BadInput, Classifier, decode_image
from conftest import shipped
from digit_handler import DigitHandler, mnist_style
from drawing import draw_digit, png_bytes
from model_store import archive
from training.data import normalize

SHAPES = {"mnist": (28, 28), "cifar10": (32, 32, 3)}  # what each data set's preprocessing returns


def facts(dataset: str, **config) -> dict:
    return {"classes": CLASSES[dataset], "mean": MEAN[dataset], "std": STD[dataset], **config}


@pytest.mark.parametrize("dataset", SHAPES)
def test_batch_is_trainings_normalisation(dataset):
    """Served pixels are normalised to the very numbers training's torchvision transform gives."""
    pixels = list(np.random.default_rng(0).integers(0, 256, (5, *SHAPES[dataset]), dtype=np.uint8))
    batch = Classifier(facts(dataset), mnist_style).batch(pixels)
    chw = [torch.from_numpy(p[None] if p.ndim == 2 else p.transpose(2, 0, 1).copy()) for p in pixels]
    training = torch.stack([normalize(dataset)(x) for x in chw]).numpy()
    assert batch.dtype == np.float32 and batch.flags.c_contiguous and batch.shape == training.shape
    np.testing.assert_array_equal(batch, training)


def test_to_tensor_is_one_row_of_a_batch():
    classifier = Classifier(facts("cifar10"), mnist_style)
    pixels = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(classifier.to_tensor(pixels[1]), classifier.batch(list(pixels))[1])


def test_probabilities_are_the_softmax_of_the_logits_over_the_temperature():
    logits = np.random.default_rng(2).normal(scale=4, size=(6, 10)).astype(np.float32)
    plain, warm = (Classifier(facts("mnist", temperature=t), mnist_style).probabilities(logits) for t in (1.0, 2.5))
    np.testing.assert_allclose(warm, torch.softmax(torch.from_numpy(logits) / 2.5, 1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(warm.sum(1), 1, rtol=1e-6)
    assert (warm.argmax(1) == plain.argmax(1)).all() and (warm.max(1) < plain.max(1)).all()


@pytest.mark.parametrize("temperature", [0, -1.0, math.nan])
def test_a_temperature_that_is_not_positive_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Classifier(facts("mnist", temperature=temperature), mnist_style)


def test_prediction_is_the_response_schema():
    classifier = Classifier(facts("cifar10"), mnist_style)
    p = np.array([0.05, 0.1, 0.02, 0.5, 0.03, 0.2, 0.04, 0.01, 0.03, 0.02], np.float32)
    answer = classifier.prediction(p, 3)
    assert answer == {"index": 3, "label": "cat", "confidence": pytest.approx(0.5),
                      "top_k": [{"index": 3, "label": "cat", "probability": pytest.approx(0.5)},
                                {"index": 5, "label": "dog", "probability": pytest.approx(0.2)},
                                {"index": 1, "label": "automobile", "probability": pytest.approx(0.1)}]}
    assert list(answer) == ["index", "label", "confidence", "top_k"]
    assert type(answer["index"]) is int and type(answer["confidence"]) is float  # JSON-ready, not numpy


def test_predict_runs_bytes_through_every_step():
    seen = []

    def runtime(batch):
        seen.append(batch)
        return np.eye(10, dtype=np.float32)[[4]] * 10  # sure of "4"

    classifier = Classifier(facts("mnist", top_k=2), mnist_style, runtime)
    seven = png_bytes(draw_digit(7))
    answer = classifier.predict(seven)
    assert (answer["index"], answer["label"], len(answer["top_k"])) == (4, "4", 2)
    assert len(classifier.predict(seven, top_k=5)["top_k"]) == 5
    assert seen[0].shape == (1, 1, 28, 28)
    np.testing.assert_array_equal(seen[0], classifier.batch([mnist_style(decode_image(seven))]))
    with pytest.raises(BadInput, match="not an image"):
        classifier.predict(b"%PDF-1.4 not a picture")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_the_factory_builds_the_classifier_an_archive_serves(fmt):
    shipped("mnist_lenet5")
    classifier = archive.classifier("mnist_lenet5", fmt)
    config = archive.model_config(load_settings(), "mnist_lenet5", archive.version_spec(fmt))["handler"]
    assert classifier.temperature == config["temperature"] == archive.temperature("mnist_lenet5")
    assert (classifier.classes, classifier.top_k) == (config["classes"], config["top_k"])
    assert classifier.predict(png_bytes(draw_digit(7)))["index"] == 7


def test_the_handler_answers_what_the_classifier_answers():
    """The TorchServe handler adds its header to the Classifier's answer and changes nothing in it."""
    from test_robustness import loaded, make_context
    handler = loaded(DigitHandler, "mnist_lenet5")
    image = png_bytes(draw_digit(4))
    context = make_context("mnist_lenet5", {})
    context.request_ids = {0: "req-0"}
    context.request_processor = [RequestProcessor({})]
    (response,) = handler.handle([{"body": image}], context)
    expected = archive.classifier("mnist_lenet5", "torchscript").predict(image)
    assert response == {"model": "mnist_lenet5", "version": "fuzz", "format": "torchscript", "request_id": "req-0",
                        **expected}
