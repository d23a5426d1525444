"""The baseline to beat, NOT part of the product: the classic way to serve a model, a Flask app that
loads the same TorchScript export and predicts one request at a time.

    python -m loadtest.flask_baseline --models mnist_lenet5 cifar10_resnet18 --port 8090

It answers the same URLs with the same JSON as TorchServe (POST /predictions/<model>[/<version>],
GET /ping) through the handlers' own Classifier (handlers/classifier.py, built as the archive of
the fp32 TorchScript version serves it), so both do the same work per image.
What it lacks is what is measured: no batching, no worker processes, no token. Flask's threaded
development server accepts requests concurrently; a lock makes the model run one request at a time.
torch runs one intra-op thread by default, like a TorchServe worker; --threads 0 keeps torch's own
default (one per core), whose OpenMP threads compete with the load generator for the 2 cores. The
benchmark measures both and compares TorchServe with the faster (BENCHMARKS.md).
"""
import argparse
import logging
import threading

import numpy as np
import torch
from flask import Flask, request

import catalog  # noqa: F401 - puts handlers/ on sys.path, for `from classifier import ...`
from classifier import BadInput
from loadtest.settings import BASELINE_PORT, EXPORT_DIR
from model_store import archive

FORMAT = "torchscript"  # the fp32 export, as archive version 1.0 of every model serves it


class Predictor:
    """Image bytes -> TorchServe's response JSON, in-process: the handlers' Classifier over the
    TorchScript export in EXPORT_DIR, on whichever Werkzeug thread asks."""

    def __init__(self, model: str, threads: int = 1):
        self.model, self.threads = model, threads or torch.get_num_threads()
        self.classifier = archive.classifier(model, FORMAT, EXPORT_DIR / model / "model.pt", self.threads)
        self.classes, self.pixels = self.classifier.classes, self.classifier.pixels

    def probabilities(self, pixels: list[np.ndarray]) -> np.ndarray:
        """What the model sees (Classifier.pixels) -> one row of probabilities per image."""
        # OpenMP's thread count belongs to the calling OS thread, and Werkzeug serves each connection on
        # a thread of its own: set it here, or torch runs one OpenMP thread per core (measured: 3x slower).
        torch.set_num_threads(self.threads)
        return self.classifier.probabilities(self.classifier.logits(self.classifier.batch(pixels)))

    def predict(self, image: bytes) -> dict:
        torch.set_num_threads(self.threads)  # see probabilities
        return {"model": self.model, "version": "baseline", "format": FORMAT, **self.classifier.predict(image)}


def create_app(models: list[str], threads: int = 1) -> Flask:
    predictors = {m: Predictor(m, threads) for m in models}
    one_at_a_time = threading.Lock()
    app = Flask(__name__)

    @app.get("/ping")
    def ping():
        return {"status": "Healthy"}

    @app.post("/predictions/<model>")
    @app.post("/predictions/<model>/<version>")
    def predict(model, version=None):  # one version per model: the URL's version is not checked
        if model not in predictors:
            return {"code": 404, "message": f"model {model} is not served"}, 404
        try:
            with one_at_a_time:
                return predictors[model].predict(request.get_data())
        except BadInput as e:
            return {"code": 400, "message": str(e)}, 400

    return app


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mnist_lenet5"], help="exported models to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=BASELINE_PORT)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 = torch's default")
    return p


def main(args):
    # A line per request on stderr would cost this app what TorchServe's quiet log4j2.xml saves it.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    create_app(args.models, args.threads).run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
