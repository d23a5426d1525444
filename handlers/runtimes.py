"""Model runtimes a handler can run: one class per kind of serialized model, chosen by model-config's `format`.

Each takes (path to the serialized model, threads) and maps a normalised float32 NCHW batch to
float32 logits. Heavy or optional runtimes (onnxruntime, openvino, tensorrt) are imported only when an archive
uses them. Reduced-precision formats carry their precision inside the file (a bf16 TorchScript graph,
an INT8 ONNX graph, an fp16 ONNX graph for TensorRT), so several formats share a runtime.

TensorRT engines are tied to the GPU model and the TensorRT version: TensorRTRuntime builds the
engine from the archive's fp16 ONNX graph on the GPU it runs on, with one optimisation profile for
batch 1..TRT_MAX_BATCH, and caches it under TRT_ENGINE_CACHE (default ~/.cache/serving/tensorrt)
by (GPU, compute capability, TensorRT version, ONNX sha256, profile), so later workers load it.
"""
import hashlib
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch


class TorchScriptRuntime:
    def __init__(self, path, threads):
        torch.set_num_threads(threads)
        with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; TorchServe still loads it
            warnings.simplefilter("ignore", FutureWarning)
            self.model = torch.jit.load(path, map_location="cpu").eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(batch)).float().numpy()


class AotiRuntime:
    """An AOTInductor package (.pt2): C++ kernels compiled ahead of time for the CPU it was built on."""

    def __init__(self, path, threads):
        torch.set_num_threads(threads)
        self.model = torch._inductor.aoti_load_package(path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(batch))).float().numpy()


class OnnxRuntime:
    def __init__(self, path, threads):
        import onnxruntime as ort  # only archives holding an ONNX model need it

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


class OpenVinoRuntime:
    """OpenVINO on the CPU, from an ONNX file: fp32 (model.onnx) or INT8 QDQ (model_int8.onnx, whose
    Q/DQ pairs OpenVINO runs as int8 kernels: VNNI or AMX). Inference precision bf16 where the CPU has
    bf16 arithmetic (AMX, AVX-512 BF16), else f32; one stream of `threads` threads per worker, as the
    other runtimes (TorchServe's workers are the parallelism). No CPU pinning: by default OpenVINO pins
    the thread to the first core while it infers, so two one-thread workers shared one core and served
    half the images/s (BENCHMARKS.md)."""

    def __init__(self, path, threads):
        import openvino as ov  # only archives of an OpenVINO format need it

        core = ov.Core()
        bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.model = core.compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                      "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False,
                                                      "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"})
        self.request = self.model.create_infer_request()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # The output tensor is the request's own buffer, overwritten by the next call: copied out.
        return np.array(self.request.infer([np.ascontiguousarray(batch)])[0], np.float32)


TRT_MAX_BATCH = 64  # largest batch of the engine's optimisation profile; larger batches run in chunks
TRT_OPT_BATCH = 8  # batch TensorRT tunes its kernels for: models.yaml's default batchSize
TRT_WORKSPACE_BYTES = 1 << 30  # scratch memory TensorRT may use while choosing kernels


def engine_cache_dir() -> Path:
    return Path(os.environ.get("TRT_ENGINE_CACHE", Path.home() / ".cache" / "serving" / "tensorrt"))


def engine_cache_key(onnx_path, trt) -> str:
    """GPU name, compute capability, TensorRT version, ONNX file hash and profile: an engine built
    under any other key may not load, or may run slower, so it is never reused across them."""
    major, minor = torch.cuda.get_device_capability()
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    digest = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()[:16]
    return f"{gpu}_cc{major}.{minor}_trt{trt.__version__}_{digest}_b1-{TRT_OPT_BATCH}-{TRT_MAX_BATCH}"


def build_engine(onnx_path, trt) -> bytes:
    """Serialized engine for the fp16 ONNX graph: a strongly typed network (the graph's own fp16
    types decide the precision; TensorRT 11 removed the FP16 builder flag) with dynamic batch."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # always on in 11.x
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, TRT_WORKSPACE_BYTES)
    images = network.get_input(0)
    sample = tuple(images.shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(images.name, (1, *sample), (TRT_OPT_BATCH, *sample), (TRT_MAX_BATCH, *sample))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    return bytes(engine)


def cached_engine(onnx_path, trt) -> Path:
    """The engine for this GPU and TensorRT version, built on first use. Written under a temporary
    name and renamed, so workers starting together never read a half-written engine."""
    path = engine_cache_dir() / f"{engine_cache_key(onnx_path, trt)}.engine"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(build_engine(onnx_path, trt))
        partial.replace(path)
    return path


class TensorRTRuntime:
    """Runs the cached engine with torch's CUDA tensors as device buffers (no pycuda needed)."""

    def __init__(self, path, threads):
        import tensorrt as trt  # only archives served from a TensorRT engine need it

        if not torch.cuda.is_available():
            raise RuntimeError("the tensorrt_fp16 format needs a CUDA GPU; none is visible to this worker")
        self.engine_path = cached_engine(path, trt)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if n != self.input_name)
        self.max_batch = self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0]
        self.stream = torch.cuda.Stream()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
        self.context.set_input_shape(self.input_name, tuple(images.shape))
        logits = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=torch.float32,
                             device="cuda")
        self.context.set_tensor_address(self.input_name, images.data_ptr())
        self.context.set_tensor_address(self.output_name, logits.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # the upload above runs on the default stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return logits.cpu().numpy()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate([self._run(batch[i: i + self.max_batch]) for i in range(0, len(batch), self.max_batch)])


# model-config `format` -> runtime. The precision lives in the serialized file, so formats share runtimes.
RUNTIMES = {
    "torchscript": TorchScriptRuntime,
    "torchscript_bf16": TorchScriptRuntime,
    "onnx": OnnxRuntime,
    "onnx_int8": OnnxRuntime,
    "tensorrt_fp16": TensorRTRuntime,
    "aoti": AotiRuntime,
    "aoti_bf16": AotiRuntime,  # the package casts to bf16 and back itself
    "openvino_bf16": OpenVinoRuntime,
    "openvino_int8": OpenVinoRuntime,
}


class FlipAverage:
    """Flip test-time augmentation: the mean of the logits of each image and of its left-right mirror,
    run as one batch of twice the size (twice the compute per image). Served only as a version of its
    own (models.yaml `tta: flip`) and validated as such, never switched on silently."""

    def __init__(self, run):
        self.run = run

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        logits = self.run(np.concatenate([batch, batch[..., ::-1]]))  # NCHW: the last axis is the width
        return (logits[: len(batch)] + logits[len(batch):]) / 2


# model-config `tta` -> wrapper of a runtime
TTA = {"flip": FlipAverage}


def load_runtime(fmt: str, path: str, threads: int, tta: str | None = None):
    if fmt not in RUNTIMES:
        raise ValueError(f"no runtime for format {fmt!r}: expected one of {', '.join(RUNTIMES)}")
    if tta is not None and tta not in TTA:
        raise ValueError(f"no test-time augmentation {tta!r}: expected one of {', '.join(TTA)}")
    run = RUNTIMES[fmt](path, threads)
    return TTA[tta](run) if tta else run
