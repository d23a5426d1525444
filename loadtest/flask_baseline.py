"""The baseline to beat, NOT part of the product: the classic way to serve a model, a Flask app that
loads the same TorchScript export and predicts one request at a time.

    python -m loadtest.flask_baseline --models mnist_lenet5 cifar10_resnet18 --port 8090

It answers the same URLs with the same JSON as TorchServe (POST /predictions/<model>[/<version>],
GET /ping) and preprocesses with the handlers' own functions, so both do the same work per image.
What it lacks is what is measured: no batching, no worker processes, no token. Flask's threaded
development server accepts requests concurrently; a lock makes the model run one request at a time.
torch runs one intra-op thread by default, like a TorchServe worker; --threads 0 keeps torch's own
default (one per core), whose OpenMP threads compete with the load generator for the 2 cores. The
benchmark measures both and compares TorchServe with the faster (BENCHMARKS.md).
"""
import argparse
import logging
import sys
import threading

import numpy as np
import torch
from flask import Flask, request

from loadtest.settings import BASELINE_PORT, EXPORT_DIR, ROOT

sys.path.insert(0, str(ROOT / "handlers"))  # the handlers import each other as shipped in the .mar
from base_classifier import BadInput, decode_image  # noqa: E402
from digit_handler import mnist_style  # noqa: E402
from image_handler import cifar_style  # noqa: E402
from runtimes import TorchScriptRuntime  # noqa: E402

from training.data import CLASSES, normalize  # noqa: E402
from training.models import dataset_of  # noqa: E402

PREPROCESS = {"mnist": mnist_style, "cifar10": cifar_style}
TOP_K = 3


class Predictor:
    """Image bytes -> TorchServe's response JSON, in-process: decode and preprocess as the handler
    does, normalise as training does, run the TorchScript export that the archive ships."""

    def __init__(self, model: str, threads: int = 1):
        dataset = dataset_of(model)
        self.model, self.classes = model, CLASSES[dataset]
        self.preprocess_image, self.normalize = PREPROCESS[dataset], normalize(dataset)
        self.threads = threads or torch.get_num_threads()
        self.runtime = TorchScriptRuntime(EXPORT_DIR / model / "model.pt", self.threads)

    def pixels(self, image: bytes) -> np.ndarray:
        """What the model sees: uint8 HxW (digits) or HxWx3 (photos)."""
        return self.preprocess_image(decode_image(image))

    def probabilities(self, pixels: list[np.ndarray]) -> np.ndarray:
        # OpenMP's thread count belongs to the calling OS thread, and Werkzeug serves each connection on
        # a thread of its own: set it here, or torch runs one OpenMP thread per core (measured: 3x slower).
        torch.set_num_threads(self.threads)
        chw = [torch.from_numpy(p[None] if p.ndim == 2 else p.transpose(2, 0, 1).copy()) for p in pixels]
        logits = torch.from_numpy(self.runtime(torch.stack([self.normalize(x) for x in chw]).numpy()))
        return torch.softmax(logits, 1).numpy()

    def predict(self, image: bytes) -> dict:
        p = self.probabilities([self.pixels(image)])[0]
        order = np.argsort(-p)[:TOP_K]
        return {"model": self.model, "version": "baseline", "format": "torchscript", "index": int(order[0]),
                "label": self.classes[order[0]], "confidence": float(p[order[0]]),
                "top_k": [{"index": int(j), "label": self.classes[j], "probability": float(p[j])} for j in order]}


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
