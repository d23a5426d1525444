"""Validate serving formats against eager fp32 PyTorch; only a format that passes may be archived.

    python -m optimize.validate --model mnist_lenet5 --data-dir ../shared/data   # every built format

Each format runs through the runtime that serves it (handlers/runtimes.py, shipped in the archives)
on the full official test split. Recorded: its accuracy, the delta against eager fp32 PyTorch on the
same images, and its top-1 agreement with eager fp32 on the first 1,000 test images. A format that
loses more than MAX_ACCURACY_LOSS points is refused, with the reason in the record.

Results go beside the weights: training/weights/<model>_formats.json (read by model_store.archive)
and <model>_formats.md (the table for the model card). A record holds for the weights (sha256) and
the recipe of the format it was measured with; when either changes, the archiver validates again.
"""
import argparse
import functools
import hashlib
import importlib.util
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from tqdm import tqdm

import catalog
from catalog import MODEL_DATASETS, cpu_name, dataset_of
from optimize.formats import FORMATS, serialized_path, weights_sha256
from runtimes import TTA, load_runtime
from training.data import DataMissing, data_dir_arg, has_dataset, load_split, normalize
from training.models import load_weights

MAX_ACCURACY_LOSS = 0.3  # points of test accuracy a format may lose against eager fp32 and still be archived
AGREEMENT_IMAGES = 1000  # first test images on which top-1 agreement with eager fp32 is reported
BATCH = 250  # images per call while validating (divides the 10,000-image test splits)


class FormatUnavailable(RuntimeError):
    """The format cannot run on this machine (TensorRT without a GPU), so it cannot be validated here."""


class NoMatchingRecord(FileNotFoundError):
    """No committed record describes this build, and the test split to validate it is not here."""


def records_path(model: str) -> Path:
    return catalog.WEIGHTS_DIR / f"{model}_formats.json"


def load_records(model: str) -> dict:
    path = records_path(model)
    return json.loads(path.read_text()) if path.exists() else {"model": model, "formats": {}}


@functools.cache
def test_split(model: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """The official test split, normalised as in training: (float32 N x C x H x W, int64 N)."""
    dataset = dataset_of(model)
    images, labels = load_split(dataset, data_dir, train=False)
    return normalize(dataset)(images).numpy(), labels.numpy()


def logits(run, images: np.ndarray, desc: str) -> np.ndarray:
    """Logits of every image, BATCH images per call."""
    starts = range(0, len(images), BATCH)
    return np.concatenate([run(images[i: i + BATCH]) for i in tqdm(starts, desc=desc, leave=False)])


@functools.cache
def fp32_reference(model: str, data_dir: str) -> np.ndarray:
    """Eager fp32 PyTorch logits on the test split: what every format is compared with."""
    net = load_weights(model, catalog.weights_path(model))

    def run(batch):
        with torch.inference_mode():
            return net(torch.from_numpy(batch)).numpy()

    return logits(run, test_split(model, data_dir)[0], f"{model} eager fp32")


def check_available(fmt: str):
    if fmt.startswith("openvino") and importlib.util.find_spec("openvino") is None:
        raise FormatUnavailable(f"{fmt} needs OpenVINO (`pip install openvino`, pinned in requirements.txt)")
    if FORMATS[fmt].device == "cuda":
        if importlib.util.find_spec("tensorrt") is None:
            raise FormatUnavailable(f"{fmt} needs TensorRT, which is not installed here")
        if not torch.cuda.is_available():
            raise FormatUnavailable(f"{fmt} needs a CUDA GPU and none is visible")


def judge(delta_points: float) -> tuple[bool, str]:
    if delta_points < -MAX_ACCURACY_LOSS:
        return False, f"loses {-delta_points:.2f} points of test accuracy against fp32 (at most {MAX_ACCURACY_LOSS})"
    return True, f"within {MAX_ACCURACY_LOSS} points of fp32"


def record_key(fmt: str, tta: str | None = None) -> str:
    """A served variant's name in the records: the format, or format+tta (`onnx_int8+flip`)."""
    return f"{fmt}+{tta}" if tta else fmt


def validate_format(model: str, fmt: str, data_dir, threads: int = os.cpu_count(), tta: str | None = None) -> dict:
    """Run `fmt` of `model` (with test-time augmentation `tta`, as the handler would) on the whole test
    split through its serving runtime -> a validation record."""
    check_available(fmt)
    path = serialized_path(model, fmt)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: build it with `python -m optimize.formats --model {model}` "
                                f"(torchscript/onnx: `python -m optimize.export --model {model}`)")
    images, labels = test_split(model, str(data_dir))
    reference_logits = fp32_reference(model, str(data_dir))
    start = time.time()
    format_logits = logits(load_runtime(fmt, str(path), threads, tta), images, f"{model} {record_key(fmt, tta)}")
    predicted, reference = format_logits.argmax(1), reference_logits.argmax(1)
    accuracy, fp32_accuracy = float((predicted == labels).mean()), float((reference == labels).mean())
    delta = 100 * (accuracy - fp32_accuracy)
    passed, reason = judge(delta)
    return {
        "format": fmt, "tta": tta, "precision": FORMATS[fmt].precision,
        "file": path.name, "file_bytes": path.stat().st_size,
        "file_sha256": file_sha256(path),
        "test_images": len(labels), "accuracy": accuracy, "fp32_accuracy": fp32_accuracy,
        "accuracy_delta_points": round(delta, 4),
        "agreement_images": AGREEMENT_IMAGES,
        "top1_agreement": float((predicted[:AGREEMENT_IMAGES] == reference[:AGREEMENT_IMAGES]).mean()),
        "top1_agreement_full_split": float((predicted == reference).mean()),
        "max_abs_logit_difference": float(np.abs(format_logits - reference_logits).max()),
        "passed": passed, "reason": reason,
        "weights_sha256": weights_sha256(model), "recipe": FORMATS[fmt].recipe,
        "measured_with": f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {cpu_name()}, "
                         f"{threads} threads",
        "validated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - start, 1),
    }


def file_sha256(path: Path) -> str:
    """sha256 of what a serialized model computes with. A TorchScript file is a zip whose `*.debug_pkl`
    entries hold the absolute paths of the Python sources it was traced from, and whose
    `.data/serialization_id` is derived from them: they differ between checkouts and never change a
    result, so they are left out. Any other file (ONNX: exported without stack traces) is hashed whole."""
    if not zipfile.is_zipfile(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    ignored = (".debug_pkl", "/.data/serialization_id")
    with zipfile.ZipFile(path) as archive:
        for name in sorted(n for n in archive.namelist() if not n.endswith(ignored)):
            digest.update(name.encode() + b"\0" + hashlib.sha256(archive.read(name)).digest())
    return digest.hexdigest()


def mismatch(record: dict | None, model: str, fmt: str) -> str | None:
    """Why a stored record does not describe the file that would be served, or None when it does
    (a format rebuilt from retrained weights or with another recipe is validated again)."""
    path = serialized_path(model, fmt)
    if not record:
        return "no validation record"
    if record["weights_sha256"] != weights_sha256(model):
        return "the validation record is for other weights"
    if record["recipe"] != FORMATS[fmt].recipe:
        changed = sorted(k for k in {**record["recipe"], **FORMATS[fmt].recipe}
                         if record["recipe"].get(k) != FORMATS[fmt].recipe.get(k))
        return f"the validation record is for another recipe ({', '.join(changed)} differ)"
    if not path.exists():
        return f"{path} is missing"
    if FORMATS[fmt].reproducible and record["file_sha256"] != file_sha256(path):
        return f"the validation record is for another build of {path.name}"
    return None


def is_current(record: dict | None, model: str, fmt: str) -> bool:
    return mismatch(record, model, fmt) is None


def save_record(model: str, record: dict):
    records = load_records(model)
    records["formats"][record_key(record["format"], record.get("tta"))] = record
    order = [record_key(f, t) for f in FORMATS for t in (None, *TTA)]
    records["formats"] = {k: records["formats"][k] for k in order if k in records["formats"]}
    records_path(model).write_text(json.dumps(records, indent=1) + "\n")
    records_path(model).with_suffix(".md").write_text(format_card(records))


def ensure_validated(model: str, fmt: str, data_dir, tta: str | None = None) -> dict:
    """The stored record when it is current, else a fresh validation (saved). Raises FormatUnavailable,
    or NoMatchingRecord when the record is stale and the test split is not in data_dir."""
    record = load_records(model)["formats"].get(record_key(fmt, tta))
    why = mismatch(record, model, fmt)
    if why is None:
        return record
    if not has_dataset(dataset_of(model), data_dir):
        raise NoMatchingRecord(f"{why} and the {dataset_of(model)} test split is not in {data_dir} to validate it")
    record = validate_format(model, fmt, data_dir, tta=tta)
    save_record(model, record)
    return record


def format_card(records: dict) -> str:
    model, rows = records["model"], records["formats"].values()
    first = next(iter(rows), None)
    lines = [f"# Serving formats: {model}", ""]
    if first:
        lines += [f"Each format runs through its serving runtime (`handlers/runtimes.py`) on the {first['test_images']:,} "
                  f"official test images and is compared with eager fp32 PyTorch on the shipped weights "
                  f"(`{model}.pt`, sha256 `{first['weights_sha256'][:12]}`; fp32 accuracy "
                  f"**{100 * first['fp32_accuracy']:.2f}%**). A format that loses more than {MAX_ACCURACY_LOSS} "
                  f"points is not archived. Written by `python -m optimize.validate --model {model}`.", "",
                  "| format | precision | file | test accuracy | delta vs fp32 (points) | top-1 agreement with fp32, "
                  f"first {AGREEMENT_IMAGES:,} images (all) | max abs logit difference | archivable | validated | "
                  "measured with |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tta = " + flip TTA (2 passes)" if r.get("tta") == "flip" else ""
        lines.append(f"| {r['format']}{tta} | {r['precision']} | {r['file']} ({r['file_bytes'] / 1e6:.2f} MB) | "
                     f"{100 * r['accuracy']:.2f}% | {r['accuracy_delta_points']:+.2f} | "
                     f"{100 * r['top1_agreement']:.1f}% ({100 * r['top1_agreement_full_split']:.2f}%) | "
                     f"{r['max_abs_logit_difference']:.2g} | {'yes' if r['passed'] else 'no: ' + r['reason']} | "
                     f"{r['validated'][:10]} | {r['measured_with']} |")
    missing = [f for f in FORMATS if f not in records["formats"]]
    if missing:
        lines += ["", f"Not validated here: {', '.join(missing)}. TensorRT engines are built and validated on the "
                      f"GPU they serve on: `python -m optimize.validate --model {model} --formats tensorrt_fp16`."]
    return "\n".join(lines) + "\n"


def main(args):
    torch.set_num_threads(args.threads)
    for fmt in args.formats or [f for f in FORMATS if serialized_path(args.model, f).exists()]:
        try:
            record = validate_format(args.model, fmt, args.data_dir, args.threads)
        except FormatUnavailable as e:
            print(f"skip {fmt}: {e}")
            continue
        except DataMissing as e:
            sys.exit(f"error: validating needs the official test split: {e}")
        save_record(args.model, record)
        print(f"{args.model} {fmt}: accuracy {100 * record['accuracy']:.2f}% "
              f"({record['accuracy_delta_points']:+.2f} points vs fp32), top-1 agreement "
              f"{100 * record['top1_agreement']:.1f}% on {AGREEMENT_IMAGES} images: "
              f"{'archivable' if record['passed'] else 'REFUSED, ' + record['reason']}")
    print(f"wrote {records_path(args.model)} and {records_path(args.model).with_suffix('.md')}")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(MODEL_DATASETS))
    p.add_argument("--formats", nargs="+", choices=list(FORMATS), help="default: every format built for the model")
    p.add_argument("--data-dir", type=data_dir_arg, default=catalog.DATA_DIR)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
