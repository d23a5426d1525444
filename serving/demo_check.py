"""Check that what `make demo` started answers: a prediction from every served model and the UI.

    python -m serving.demo_check            # exit 1, with one line per failure, when something does not answer

Each model gets an image drawn here (a digit-like stroke or a coloured scene: no data set needed)
through the same REST call a user makes; the UI is asked for Streamlit's health endpoint.
"""
import argparse
import io
import sys
import time

import requests
from PIL import Image, ImageDraw

from serving.client import ServeError, TorchServeClient

UI_HEALTH = "http://127.0.0.1:{port}/_stcore/health"


def drawn_image(model: str) -> bytes:
    """A white stroke on black (a "1") for the digit models, a sky-over-ground scene for the others."""
    if model.startswith("mnist"):
        image = Image.new("L", (280, 280))
        ImageDraw.Draw(image).line([(140, 40), (140, 240)], fill=255, width=22)
    else:
        image = Image.new("RGB", (64, 64), (90, 140, 220))
        ImageDraw.Draw(image).rectangle((0, 40, 64, 64), fill=(60, 120, 40))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def check_models(client: TorchServeClient) -> list[str]:
    failures = []
    models = client.models()
    if not models:
        return ["TorchServe serves no model"]
    for model in models:
        start = time.perf_counter()
        try:
            answer = client.predict(model, drawn_image(model))
        except ServeError as e:
            failures.append(f"{model}: {e}")
            continue
        print(f"{model} {answer['version']} ({answer['format']}): '{answer['label']}' at "
              f"{100 * answer['confidence']:.1f}% in {1000 * (time.perf_counter() - start):.0f} ms")
    return failures


def check_ui(port: int) -> list[str]:
    try:
        response = requests.get(UI_HEALTH.format(port=port), timeout=10)
    except requests.RequestException as e:
        return [f"the UI at port {port} does not answer: {e.__class__.__name__}"]
    if response.status_code != 200:
        return [f"the UI at port {port} answers HTTP {response.status_code}"]
    print(f"UI: http://127.0.0.1:{port} answers")
    return []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ui-port", type=int, default=8501)
    p.add_argument("--ui-wait", type=float, default=60, help="seconds to wait for the UI to come up")
    args = p.parse_args(argv)
    try:
        failures = check_models(TorchServeClient.from_config(client_name="cli"))
    except ServeError as e:
        failures = [str(e)]
    deadline = time.time() + args.ui_wait
    while (ui := check_ui(args.ui_port)) and time.time() < deadline:
        time.sleep(1)
    for failure in failures + ui:
        print(f"error: {failure}", file=sys.stderr)
    sys.exit(1 if failures or ui else 0)


if __name__ == "__main__":
    main()
