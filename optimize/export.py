"""Export shipped weights to TorchScript and ONNX (dynamic batch), each checked against eager PyTorch.

    python -m optimize.export --model mnist_lenet5 --data-dir ../shared/data

Writes optimize/exported/<model>/{model.pt, model.onnx, export.json}. The check runs the first
256 official test images (random tensors, said so in export.json, when the data set is absent)
through eager PyTorch and each export, at batch 1 and 256, and fails the pipeline (exit 1) when the
largest absolute logit difference exceeds TOLERANCE.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

import catalog
from catalog import INPUT_SHAPE, MODEL_DATASETS, dataset_of
from training.data import DataMissing, data_dir_arg, test_dataset
from training.models import load_weights

# TorchScript is deprecated in torch 2.14 in favour of torch.export, but it is still what TorchServe's
# workers load without a compiler toolchain; the ONNX file is the forward-looking format.
warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)

TOLERANCE = 1e-3  # max |logit difference| accepted between an export and eager fp32


def check_inputs(dataset: str, data_dir, n: int = 256) -> tuple[torch.Tensor, str]:
    try:
        ds = test_dataset(dataset, data_dir)
        return torch.stack([ds[i][0] for i in range(n)]), f"{dataset} test split, first {n} images"
    except DataMissing:
        return torch.randn(n, *INPUT_SHAPE[dataset], generator=torch.Generator().manual_seed(0)), \
            f"{n} random tensors ({dataset} data set not found in {data_dir})"


def export_torchscript(model, example, path: Path):
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(model, example))
    traced.save(str(path))


def export_onnx(model, example, path: Path):
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), verbose=False)
    # Each node carries the Python stack it was traced from, with this checkout's absolute paths: left
    # out, so the file is the same wherever it is built (and says nothing about the build machine).
    for node in program.model.graph.all_nodes():
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
    program.save(str(path), external_data=False)


def max_difference(reference, run, inputs) -> float:
    """Largest |logit difference| over batch-1 calls on 8 images and one call on the whole batch."""
    worst = 0.0
    for batch in [inputs[i: i + 1] for i in range(8)] + [inputs]:
        worst = max(worst, float(np.abs(reference(batch) - run(batch)).max()))
    return worst


def main(args):
    weights = catalog.weights_path(args.model)
    if not weights.exists():
        sys.exit(f"error: no shipped weights at {weights}: train with `python -m training.train "
                 f"--model {args.model} --ship` first")
    model = load_weights(args.model, weights)
    inputs, described = check_inputs(dataset_of(args.model), args.data_dir)
    out = Path(args.output_dir or catalog.EXPORT_DIR / args.model)
    out.mkdir(parents=True, exist_ok=True)

    def eager(x):
        with torch.no_grad():
            return model(x).numpy()

    steps = tqdm(["torchscript", "onnx"], desc=f"export {args.model}")
    report = {"model": args.model, "weights": weights.name, "check_inputs": described, "tolerance": TOLERANCE}
    for fmt in steps:
        steps.set_postfix_str(fmt)
        if fmt == "torchscript":
            export_torchscript(model, inputs[:2], out / "model.pt")
            scripted = torch.jit.load(str(out / "model.pt"))

            def run(x):
                with torch.no_grad():
                    return scripted(x).numpy()
        else:
            export_onnx(model, inputs[:2], out / "model.onnx")
            session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])

            def run(x):
                return session.run(None, {"images": x.numpy()})[0]
        report[f"{fmt}_max_abs_diff"] = max_difference(eager, run, inputs)
    print(json.dumps(report))
    failed = [f for f in ("torchscript", "onnx") if report[f"{f}_max_abs_diff"] > TOLERANCE]
    if failed:  # no export.json: make does not take a failed export for a finished one
        sys.exit(f"error: {', '.join(failed)} export of {args.model} differs from eager PyTorch by more than "
                 f"{TOLERANCE}: {report}")
    (out / "export.json").write_text(json.dumps(report, indent=1))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(MODEL_DATASETS))
    p.add_argument("--data-dir", type=data_dir_arg, default=catalog.DATA_DIR,
                   help="parity is checked on its first test images; on random tensors without it")
    p.add_argument("--output-dir", help="default optimize/exported/<model>")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
