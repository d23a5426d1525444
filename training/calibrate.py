"""Temperature scaling of the shipped models, so that a served confidence means what it says.

    python -m training.calibrate [--model M ...] [--data-dir ../shared/data]

For each model: the logits of the shipped weights (in fp32) on the validation split training held out
(the preset's `val_size` images, drawn with training's seed) and on the official test split, both
preprocessed as the preset trains (the digit models: as the serving handler preprocesses); one
temperature T > 0 that minimises the validation NLL of softmax(logits / T); the expected calibration
error (ECE: 15 equal-width bins of top-1 confidence) and the NLL on the test split before (T = 1)
and after. T divides every logit alike, so the predicted class, and the accuracy, do not change.

Written beside the weights: <model>_calibration.json (read by model_store.archive, which puts T in
the handler's config; it names the weights' sha256, so stale figures are refused), the reliability
diagram <model>_calibration.png, and the `## Calibration` section of the model card <model>.md
(replaced in place, so running this again after a re-training restores it).
"""
import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import catalog
from catalog import MODEL_DATASETS, dataset_of
from training.data import DataMissing, data_dir_arg, test_dataset, train_val_datasets
from training.models import load_weights
from training.train import PRESETS
from training.train import get_args_parser as train_args_parser

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BINS = 15  # equal-width confidence bins of the ECE (Guo et al. 2017)
# Search range of T. A fit whose NLL is no lower than at a bound found no minimum inside it (e.g. a
# validation split the model gets entirely right, whose NLL falls forever as T -> 0): refused, not shipped.
T_BOUNDS = (0.05, 20.0)
SECTION = "## Calibration"


class CalibrationFailed(ValueError):
    pass


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    z = logits / temperature
    top = z.max(1)
    log_norm = top + np.log(np.exp(z - top[:, None]).sum(1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds=T_BOUNDS, tol: float = 1e-6) -> float:
    """The T minimising nll(logits, labels, T). The NLL is convex in 1/T (a log-sum-exp of linear
    functions of it, minus a linear one), so it is unimodal in log T, and a golden-section search on
    log T finds its minimum to `tol` without gradients or a solver dependency."""
    lo, hi = np.log(bounds)
    ratio = (np.sqrt(5) - 1) / 2

    def f(log_t):
        return nll(logits, labels, float(np.exp(log_t)))

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tol:
        if fa < fb:  # the minimum is in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(a)
        else:  # in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    t = float(np.exp((lo + hi) / 2))
    # Compared, not located: where the NLL underflows to a flat 0 the search stops anywhere in the flat part.
    if min(nll(logits, labels, bound) for bound in bounds) <= nll(logits, labels, t):
        raise CalibrationFailed(f"the temperature fit found no minimum inside its bounds {bounds[0]}-{bounds[1]} "
                                "(a validation split the model gets entirely right?)")
    return t


def reliability(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = BINS) -> list[dict]:
    """Per equal-width bin (lower, upper] of top-1 confidence: images, their accuracy and mean confidence."""
    probs = softmax(logits, temperature)
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        hit = index == b
        n = int(hit.sum())
        rows.append(dict(lower=b / bins, upper=(b + 1) / bins, count=n,
                         accuracy=float(correct[hit].mean()) if n else None,
                         confidence=float(confidence[hit].mean()) if n else None))
    return rows


def ece(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = BINS) -> float:
    """Expected calibration error: the image-weighted mean |accuracy - confidence| over the bins."""
    rows = reliability(logits, labels, temperature, bins)
    return sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]) / len(labels)


def logits_of(model, dataset, desc: str) -> tuple[np.ndarray, np.ndarray]:
    out, labels = [], []
    with torch.inference_mode():
        for images, y in tqdm(DataLoader(dataset, 500), desc=desc, leave=False, dynamic_ncols=True):
            out.append(model(images).double())
            labels.append(y)
    return torch.cat(out).numpy(), torch.cat(labels).numpy()


def calibrate(name: str, data_dir) -> dict:
    """Fit and measure `name`'s temperature; -> the record written to <name>_calibration.json."""
    weights = catalog.weights_path(name).read_bytes()  # hashed and loaded from the same bytes
    model = load_weights(name, io.BytesIO(weights))
    # Exactly the images training held out (its default seed, the preset's val_size), preprocessed as the
    # preset says: for the digit models the serving handler's preprocessing, which served confidences follow.
    seed, preset = train_args_parser().get_default("seed"), PRESETS[name]
    served = preset.served_preprocessing
    _, val_ds = train_val_datasets(dataset_of(name), data_dir, preset.val_size, seed, served=served)
    val_logits, val_labels = logits_of(model, val_ds, f"{name} validation")
    test_ds = test_dataset(dataset_of(name), data_dir, served=served)
    test_logits, test_labels = logits_of(model, test_ds, f"{name} test")
    t = fit_temperature(val_logits, val_labels)
    mean_confidence = [float(softmax(test_logits, s).max(1).mean()) for s in (1.0, t)]
    return dict(
        model=name, temperature=round(t, 6), weights_sha256=hashlib.sha256(weights).hexdigest(),
        val_images=len(val_labels), test_images=len(test_labels), served_preprocessing=served,
        val_nll_before=nll(val_logits, val_labels), val_nll_after=nll(val_logits, val_labels, t),
        test_ece_before=ece(test_logits, test_labels), test_ece_after=ece(test_logits, test_labels, t),
        test_nll_before=nll(test_logits, test_labels), test_nll_after=nll(test_logits, test_labels, t),
        test_mean_confidence_before=mean_confidence[0], test_mean_confidence_after=mean_confidence[1],
        test_acc=float(np.mean(test_logits.argmax(1) == test_labels)), bins=BINS,
        reliability=dict(before=reliability(test_logits, test_labels), after=reliability(test_logits, test_labels, t)),
        command="python -m training.calibrate " + " ".join(sys.argv[1:]), date=time.strftime("%Y-%m-%d"))


def plot_reliability(record: dict, path: Path):
    """Before/after reliability diagrams of the test split, with how many images each bin holds."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.6), sharex=True, gridspec_kw=dict(height_ratios=(3, 1)))
    panels = (("before", 1.0, record["test_ece_before"]), ("after", record["temperature"], record["test_ece_after"]))
    for column, (when, t, error) in enumerate(panels):
        rows = [r for r in record["reliability"][when] if r["count"]]
        centres = [(r["lower"] + r["upper"]) / 2 for r in rows]
        width = 1 / record["bins"]
        top, bottom = axes[0, column], axes[1, column]
        top.bar(centres, [r["accuracy"] for r in rows], width=width, edgecolor="black", label="accuracy in the bin")
        # Hatched, not filled: the gap lies above the bar (over-confident) or over it (under-confident).
        top.bar(centres, [r["confidence"] - r["accuracy"] for r in rows], bottom=[r["accuracy"] for r in rows],
                width=width, facecolor="none", edgecolor="tab:red", hatch="//", label="gap to mean confidence")
        top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        top.set(ylim=(0, 1), ylabel="test accuracy", title=f"{when} (T = {t:.3g}): ECE {100 * error:.2f}%")
        top.legend(loc="upper left", fontsize=8)
        bottom.bar(centres, [r["count"] for r in rows], width=width, color="tab:gray", edgecolor="black")
        bottom.set(yscale="log", xlim=(0, 1), ylim=(0.5, 2 * record["test_images"]), xlabel="top-1 confidence",
                   ylabel="test images")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    fig.suptitle(f"{record['model']}: reliability on the test split, before and after temperature scaling")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def card_section(record: dict) -> str:
    r, name = record, record["model"]
    inputs = ", both through the serving handler's preprocessing" if r["served_preprocessing"] else ""
    return f"""{SECTION}

Temperature scaling (Guo et al. 2017): served probabilities are softmax(logits / T), with one T
fitted on the {r['val_images']:,} validation images training held out (minimum NLL) and measured on
the {r['test_images']:,} test images, which the fit never saw{inputs}. T changes no prediction, only
how sure they are. ECE: {r['bins']} equal-width bins of top-1 confidence.

| test split | before (T = 1) | after (T = {r['temperature']:.3f}) |
|---|---|---|
| expected calibration error | {100 * r['test_ece_before']:.2f}% | **{100 * r['test_ece_after']:.2f}%** |
| negative log-likelihood | {r['test_nll_before']:.4f} | {r['test_nll_after']:.4f} |
| mean top-1 confidence (accuracy {100 * r['test_acc']:.2f}%) | {100 * r['test_mean_confidence_before']:.2f}% | \
{100 * r['test_mean_confidence_after']:.2f}% |
| validation NLL (the fitted quantity) | {r['val_nll_before']:.4f} | {r['val_nll_after']:.4f} |

Measured by `{r['command']}` on {r['date']} for the weights with sha256 `{r['weights_sha256'][:16]}...`.
The archives read T from `{name}_calibration.json` and refuse one fitted to other weights.

![{name}: reliability diagrams of the test split before and after temperature scaling]({name}_calibration.png)
"""


def replace_section(card: str, section: str) -> str:
    """`card` with its `## Calibration` section (up to the next heading of level 1 or 2) replaced by
    `section`, or with `section` appended when it has none."""
    lines = card.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        return card.rstrip("\n") + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))), len(lines))
    rest = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + rest if rest else "")


def main(args):
    torch.set_num_threads(args.threads)
    for name in args.model:
        if not catalog.weights_path(name).exists():
            sys.exit(f"error: {name} has no shipped weights ({catalog.weights_path(name)}): train it first")
        try:
            record = calibrate(name, args.data_dir)
        except DataMissing as e:
            sys.exit(f"error: calibration needs the real data set: {e}")
        except CalibrationFailed as e:
            sys.exit(f"error: {name}: {e}")
        (catalog.WEIGHTS_DIR / f"{name}_calibration.json").write_text(json.dumps(record, indent=1) + "\n")
        plot_reliability(record, catalog.WEIGHTS_DIR / f"{name}_calibration.png")
        card = catalog.WEIGHTS_DIR / f"{name}.md"
        card.write_text(replace_section(card.read_text(), card_section(record)))
        print(f"{name}: T = {record['temperature']:.3f}; test ECE {100 * record['test_ece_before']:.2f}% -> "
              f"{100 * record['test_ece_after']:.2f}%, NLL {record['test_nll_before']:.4f} -> "
              f"{record['test_nll_after']:.4f} (accuracy {100 * record['test_acc']:.2f}%)")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", choices=list(MODEL_DATASETS), default=list(MODEL_DATASETS),
                   help="models to calibrate (default: all)")
    p.add_argument("--data-dir", type=data_dir_arg, default=catalog.DATA_DIR,
                   help="holds MNIST/raw or cifar-10-batches-bin (default: $DATA_DIR or ../shared/data)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
