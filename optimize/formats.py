"""Serving formats beyond export.py's fp32 ones, built from the shipped weights.

    python -m optimize.formats --model mnist_lenet5 --data-dir ../shared/data   # the formats built here

`make archive` runs this (and optimize.validate) itself for every format models.yaml lists.

FORMATS names every format a version in model_store/models.yaml can use; the name is what the
handler reads from model-config (`format`) to pick its runtime in handlers/runtimes.py.
  * torchscript, onnx: fp32, written and parity-checked by optimize.export.
  * torchscript_bf16: the model traced under CPU bf16 autocast in channels_last and frozen, so the
    bf16 weights and casts are constants of the graph and TorchScriptRuntime runs it unchanged.
  * onnx_int8: ONNX Runtime static quantisation of model.onnx after quant_pre_process (shape
    inference + graph optimisation), activations calibrated on training images (never test images).
  * tensorrt_fp16: an fp16 ONNX graph with fp32 inputs/outputs (what TensorRT 11's strongly typed
    networks need; 10.x accepts it too). The engine is built from it on the GPU it will run on, by
    TensorRTRuntime (handlers/runtimes.py) when it is first loaded there, never here.
  * aoti: torch.export with a dynamic batch dimension (1..AOTI_MAX_BATCH), compiled ahead of time by
    AOTInductor (freezing on: weights become constants) into a .pt2 package of C++ kernels for this
    CPU's instruction set, checked against eager PyTorch when built. The successor of TorchScript,
    which torch 2.14 deprecates; its compiled code is specific to the CPU flags it was built on.
  * aoti_bf16: the same with bf16 weights and arithmetic in channels_last (fp32 in and out), checked
    against the same bf16 graph run eagerly. Measured (torch 2.14.1, AMD EPYC with AVX-512 BF16, one
    thread, batch 64): ResNet-18 341 images/s against 175 for the fp32 package; LeNet-5's bf16 package
    came out wrong with freezing on (max |logit difference| 6.1 against eager bf16; exact without
    freezing, but then slower than fp32), which the parity check refuses: only ResNet-18 lists it.
  * openvino_bf16, openvino_int8: no file of their own: OpenVINO (OpenVinoRuntime) compiles model.onnx
    or model_int8.onnx when the worker loads it, with bf16 inference precision where the CPU has bf16
    arithmetic (AMX, AVX-512 BF16; f32 elsewhere) and the INT8 file's Q/DQ pairs as int8 kernels.
Files land in optimize/exported/<model>/ beside model.pt and model.onnx, each with the recipe it was
built with (<file>.recipe.json), so a changed recipe rebuilds it.
"""
import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import catalog
from catalog import INPUT_SHAPE, MODEL_DATASETS, cpu_isa, dataset_of
from optimize.export import TOLERANCE, export_onnx
from training.data import DataMissing, data_dir_arg, load_split, normalize
from training.models import load_weights

# ONNX Runtime static INT8. QDQ, ONNX Runtime's recommended format: its graph optimiser fuses the Q/DQ
# pairs into QLinearConv/QLinearAdd/QGemm, giving the same graph (and speed) as QOperator here, while
# other runtimes can still read it. U8 activations x S8 weights is the AVX512-VNNI fast path;
# per-channel weight scales keep the thin first and last layers accurate.
INT8_RECIPE = {
    "quant_format": "QDQ",
    "activation_type": "QUInt8",
    "weight_type": "QInt8",
    "per_channel": True,
    "calibrate_method": "MinMax",
    "calibration_images": 512,  # random training images (seeded)
    "calibration_batch": 64,  # images per calibration call
    "calibration_seed": 0,
}
BF16_RECIPE = {"autocast": "bfloat16", "memory_format": "channels_last", "export": "torch.jit.trace + freeze"}
FP16_ONNX_RECIPE = {"weights": "float16", "io": "float32", "export": "torch.onnx dynamo"}
# Export.py's formats; recorded so a validation record names what it certified.
FP32_RECIPES = {"torchscript": {"export": "torch.jit.trace + freeze"},
                "onnx": {"export": "torch.onnx dynamo", "runtime": "ORT_ENABLE_ALL"}}


AOTI_MAX_BATCH = 256  # the largest batch the compiled package accepts (validation runs 250 at a time)
AOTI_RECIPE = {"export": f"torch.export, dynamic batch 1..{AOTI_MAX_BATCH}", "compile": "AOTInductor, freezing",
               "torch": torch.__version__, "cpu_isa": cpu_isa()}  # its kernels are compiled for these flags
AOTI_BF16_RECIPE = AOTI_RECIPE | {"weights": "bfloat16", "memory_format": "channels_last"}
# A bf16 package against the same bf16 graph run eagerly: another order of bf16 roundings moves
# logits by a few 1e-2 (ResNet-18: 0.016); a miscompiled one by whole units.
BF16_TOLERANCE = 0.1
# OpenVINO runs the ONNX files above (handlers/runtimes.py OpenVinoRuntime: these settings).
OPENVINO_RECIPE = {"runtime": "openvino CPU", "inference_precision": "bf16 where the CPU has it, else f32",
                   "streams": 1, "performance_hint": "LATENCY"}


@dataclasses.dataclass
class Format:
    filename: str  # serialized file in optimize/exported/<model>/ and in the archive
    precision: str  # arithmetic of the convolutions and matmuls: fp32, bf16, int8 or fp16
    device: str  # "cpu" or "cuda": where it can be validated and served
    recipe: dict  # what shapes the file; a validation record holds for these weights and this recipe only
    source: str | None = None  # the format whose file this one runs with another runtime (built for it)
    # Whether a rebuild writes the same file (what a validation record's file hash can certify). An
    # AOTInductor package does not: its generated sources and library are named after hashes of the
    # build; its record holds for the weights and the recipe (CPU flags included), and every build is
    # checked against eager PyTorch before it is kept.
    reproducible: bool = True


FORMATS = {
    "torchscript": Format("model.pt", "fp32", "cpu", FP32_RECIPES["torchscript"]),
    "onnx": Format("model.onnx", "fp32", "cpu", FP32_RECIPES["onnx"]),
    "torchscript_bf16": Format("model_bf16.pt", "bf16", "cpu", BF16_RECIPE),
    "onnx_int8": Format("model_int8.onnx", "int8", "cpu", INT8_RECIPE),
    "tensorrt_fp16": Format("model_fp16.onnx", "fp16", "cuda", FP16_ONNX_RECIPE),
    "aoti": Format("model.pt2", "fp32", "cpu", AOTI_RECIPE, reproducible=False),
    "aoti_bf16": Format("model_bf16.pt2", "bf16", "cpu", AOTI_BF16_RECIPE, reproducible=False),
    "openvino_bf16": Format("model.onnx", "bf16", "cpu", OPENVINO_RECIPE | {"file": "onnx"}, source="onnx"),
    "openvino_int8": Format("model_int8.onnx", "int8", "cpu", OPENVINO_RECIPE | {"file": "onnx_int8"},
                            source="onnx_int8"),
}


class Bf16Autocast(torch.nn.Module):
    """fp32 NCHW in, fp32 logits out; bf16 channels_last inside (oneDNN's fast layout for bf16 convs)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


class Bf16Graph(torch.nn.Module):
    """bf16 weights and arithmetic in channels_last with fp32 inputs and outputs (AOTInductor's bf16
    package: exported and compiled as a plain bf16 graph, no autocast region)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.to(torch.bfloat16).to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.model(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)).float()


class Fp16Graph(torch.nn.Module):
    """fp16 weights and arithmetic with fp32 inputs and outputs, for a strongly typed TensorRT network."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, x):
        return self.model(x.half()).float()


def example_batch(model: str) -> torch.Tensor:
    return torch.zeros(2, *INPUT_SHAPE[dataset_of(model)])


def build_torchscript_bf16(model: str, out: Path, data_dir):
    wrapped = Bf16Autocast(load_weights(model, catalog.weights_path(model))).eval()
    with torch.no_grad(), warnings.catch_warnings():  # TorchScript is deprecated; TorchServe still loads it
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.freeze(torch.jit.trace(wrapped, example_batch(model)))
    traced.save(str(out / FORMATS["torchscript_bf16"].filename))


def calibration_images(model: str, data_dir, n: int, seed: int) -> np.ndarray:
    """`n` random training images, normalised as in training (float32 NCHW)."""
    dataset = dataset_of(model)
    images, _ = load_split(dataset, data_dir, train=True)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return normalize(dataset)(images[pick]).numpy()


def calibration_cache_path(model: str) -> Path:
    """The INT8 activation ranges measured on training images, committed beside the weights, so that a
    checkout without the data sets builds the same INT8 file."""
    return catalog.WEIGHTS_DIR / f"{model}_int8_calibration.json"


def calibration_batches(model: str, data_dir):
    """ONNX Runtime's calibration reader over the recipe's training images (needs the data set)."""
    from onnxruntime.quantization import CalibrationDataReader

    r = INT8_RECIPE
    images = calibration_images(model, data_dir, r["calibration_images"], r["calibration_seed"])

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(images), r["calibration_batch"]))

        def get_next(self):
            start = next(self.batches, None)
            return None if start is None else {"images": images[start: start + r["calibration_batch"]]}

    return Batches()


def build_onnx_int8(model: str, out: Path, data_dir):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = out / FORMATS["onnx"].filename
    if not fp32.exists():
        raise FileNotFoundError(f"{fp32} is missing: run `python -m optimize.export --model {model}` first")
    r, cache = INT8_RECIPE, calibration_cache_path(model)
    stored = json.loads(cache.read_text()) if cache.exists() else None
    current = stored is not None and stored["built_with"] == calibration_key(model)
    with tempfile.TemporaryDirectory() as tmp:
        ranges = Path(tmp) / "ranges.json"  # ONNX Runtime's calibration cache: read when present, else written
        if current:
            ranges.write_text(json.dumps(stored["ranges"]))
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(out / FORMATS["onnx_int8"].filename),
                        None if current else calibration_batches(model, data_dir),
                        quant_format=getattr(QuantFormat, r["quant_format"]), per_channel=r["per_channel"],
                        activation_type=getattr(QuantType, r["activation_type"]),
                        weight_type=getattr(QuantType, r["weight_type"]),
                        calibrate_method=getattr(CalibrationMethod, r["calibrate_method"]),
                        calibration_cache_path=ranges)
        if not current:
            cache.write_text(json.dumps({"built_with": calibration_key(model),
                                         "ranges": json.loads(ranges.read_text())}, indent=1) + "\n")


def build_onnx_fp16(model: str, out: Path, data_dir):
    wrapped = Fp16Graph(load_weights(model, catalog.weights_path(model))).eval()
    export_onnx(wrapped, example_batch(model), out / FORMATS["tensorrt_fp16"].filename)


def compile_aoti(model: str, net: torch.nn.Module, fmt: str, out: Path, tolerance: float):
    """torch.export `net` with a dynamic batch, compile it with AOTInductor into `fmt`'s package and
    keep it only if it agrees with `net` run eagerly within `tolerance`."""
    batch = torch.export.Dim("batch", min=1, max=AOTI_MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(net, (example_batch(model),), dynamic_shapes=({0: batch},))
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(out / FORMATS[fmt].filename),
                                                        inductor_configs={"freezing": True})
    compiled = torch._inductor.aoti_load_package(path)
    images = torch.randn(5, *INPUT_SHAPE[dataset_of(model)], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        difference = (compiled(images) - net(images)).abs().max().item()
    if difference > tolerance:
        Path(path).unlink()
        raise RuntimeError(f"the AOTInductor package ({fmt}) differs from eager PyTorch by {difference:.2g} "
                           f"(limit {tolerance})")


def build_aoti(model: str, out: Path, data_dir):
    net = load_weights(model, catalog.weights_path(model)).eval()
    compile_aoti(model, net, "aoti", out, TOLERANCE)  # the parity limit of optimize/export.py's exports


def build_aoti_bf16(model: str, out: Path, data_dir):
    net = Bf16Graph(load_weights(model, catalog.weights_path(model))).eval()
    compile_aoti(model, net, "aoti_bf16", out, BF16_TOLERANCE)


# Formats built here; torchscript and onnx come from optimize.export.
BUILDERS = {"torchscript_bf16": build_torchscript_bf16, "onnx_int8": build_onnx_int8,
            "tensorrt_fp16": build_onnx_fp16, "aoti": build_aoti, "aoti_bf16": build_aoti_bf16}


def serialized_path(model: str, fmt: str) -> Path:
    return catalog.EXPORT_DIR / model / FORMATS[fmt].filename


def recipe_path(model: str, fmt: str) -> Path:
    """Written beside a built file: the recipe and weights it was built from."""
    path = serialized_path(model, fmt)
    return path.with_name(path.name + ".recipe.json")


def weights_sha256(model: str) -> str:
    return hashlib.sha256(catalog.weights_path(model).read_bytes()).hexdigest()


def built_with(model: str, fmt: str) -> dict:
    """What a build depends on: the recipe and the shipped weights (retrained weights rebuild it), and
    for INT8 the fp32 ONNX file it quantises."""
    key = {"recipe": FORMATS[fmt].recipe, "weights_sha256": weights_sha256(model)}
    if fmt == "onnx_int8":
        source = serialized_path(model, "onnx")
        key["onnx_sha256"] = hashlib.sha256(source.read_bytes()).hexdigest() if source.exists() else None
    return key


def calibration_key(model: str) -> dict:
    """What the INT8 activation ranges depend on: the recipe's calibration images and the fp32 ONNX
    file whose tensors they measure (the weights, and the names a new exporter may give)."""
    return built_with(model, "onnx_int8")


def built_format(fmt: str) -> str:
    """The format whose file `fmt` serves: itself, or its source (openvino_int8 -> onnx_int8)."""
    return FORMATS[fmt].source or fmt


def is_built(model: str, fmt: str) -> bool:
    """Whether the file exists and, for the formats built here, was built from the current weights
    with the current recipe."""
    fmt = built_format(fmt)
    if fmt not in BUILDERS:
        return serialized_path(model, fmt).exists()
    return recipe_path(model, fmt).exists() and json.loads(recipe_path(model, fmt).read_text()) == built_with(model, fmt)


def build(model: str, fmt: str, data_dir) -> Path:
    """Build `fmt` of `model` into optimize/exported/<model>/ and return the file."""
    if fmt not in BUILDERS:
        raise ValueError(f"{fmt} is written by `python -m optimize.export`, not here")
    out = catalog.EXPORT_DIR / model
    out.mkdir(parents=True, exist_ok=True)
    BUILDERS[fmt](model, out, data_dir)
    recipe_path(model, fmt).write_text(json.dumps(built_with(model, fmt)))
    return serialized_path(model, fmt)


def main(args):
    steps = tqdm(args.formats, desc=f"formats of {args.model}")
    for fmt in steps:
        steps.set_postfix_str(fmt)
        try:
            path = build(args.model, fmt, args.data_dir)
        except DataMissing as e:
            sys.exit(f"error: {fmt} of {args.model} needs calibration images and its committed ranges "
                     f"({calibration_cache_path(args.model).name}) are for other weights or another recipe: {e}")
        tqdm.write(f"built {path} ({path.stat().st_size / 1e6:.2f} MB)")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(MODEL_DATASETS))
    p.add_argument("--formats", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    p.add_argument("--data-dir", type=data_dir_arg, default=catalog.DATA_DIR,
                   help="training images calibrate the INT8 model (when its committed ranges are stale)")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
