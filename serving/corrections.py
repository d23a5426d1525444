"""Export the predictions users corrected as a data set that training can fine-tune on.

    python -m serving.corrections --model mnist_lenet5 --out data/corrections/mnist_lenet5

Writes corrections.npz (images: the uint8 images the model saw, N x H x W or N x H x W x 3;
labels: the class indices users gave) and one PNG per sample under <label>/ for a person to look
at. Fine-tune with `python -m training.train --model mnist_lenet5 --init-from
training/weights/mnist_lenet5.pt --extra-train data/corrections/mnist_lenet5/corrections.npz`.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import catalog
from prediction_table import PredictionTable, decode_pixels, url_for_run_dir


def export_corrections(log: PredictionTable, model: str, out: Path):
    rows = log.corrections(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for row in rows:
        image = decode_pixels(row)
        true_index = next((t["index"] for t in row["top_k"] if t["label"] == row["true_label"]), None)
        labels.append(true_index if true_index is not None else int(row["true_label"]))
        images.append(image)
        (out / row["true_label"]).mkdir(exist_ok=True)
        Image.fromarray(image).save(out / row["true_label"] / f"{row['request_id']}.png")
    images = np.stack(images) if images else np.zeros((0, 28, 28), np.uint8)
    labels = np.asarray(labels, np.int64)
    np.savez_compressed(out / "corrections.npz", images=images, labels=labels)
    return images, labels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--log-url", default=url_for_run_dir(catalog.RUN_DIR), help="default $PREDICTION_LOG_URL or .run/predictions.db")
    args = p.parse_args(argv)
    images, labels = export_corrections(PredictionTable(args.log_url), args.model, Path(args.out))
    if not len(labels):
        sys.exit(f"error: no corrected predictions of {args.model} in the log")
    print(f"exported {len(labels)} corrected samples of {args.model} to {args.out}")


if __name__ == "__main__":
    main()
