"""The TensorRT fp16 path: the fp16 ONNX graph it is built from (checked on any machine), the lazy
import, and, where tensorrt and a CUDA GPU are present, the engine itself: built with a batch
1..TRT_MAX_BATCH profile, cached by GPU and TensorRT version, and agreeing with fp32."""
import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

from optimize import formats, validate
from runtimes import TRT_MAX_BATCH, load_runtime
from conftest import DATA_DIR, ROOT

MODEL = "mnist_lenet5"
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_gpu = pytest.mark.skipif(not (HAS_TENSORRT and torch.cuda.is_available()),
                               reason="TensorRT engines need the tensorrt package and a CUDA GPU "
                                      f"(tensorrt installed: {HAS_TENSORRT}, CUDA: {torch.cuda.is_available()})")


@pytest.fixture(scope="module")
def fp16_onnx(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    formats.build_onnx_fp16(MODEL, out, DATA_DIR)
    return out / formats.FORMATS["tensorrt_fp16"].filename


@pytest.fixture(scope="module")
def test_images(mnist_test):
    x, labels = validate.test_split(MODEL, str(DATA_DIR))
    return x[:1000], labels[:1000]


def test_fp16_graph_has_fp32_io_fp16_weights_and_agrees_with_fp32(fp16_onnx, test_images):
    """What TensorRT builds from, run by ONNX Runtime on the CPU: strongly typed fp16 inside, fp32 outside."""
    graph = onnx.load(str(fp16_onnx)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [w for w in graph.initializer if len(w.dims) > 1]
    assert weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    images, _ = test_images
    fp16 = load_runtime("onnx", str(fp16_onnx), 2)(images)
    fp32 = load_runtime("onnx", str(formats.serialized_path(MODEL, "onnx")), 2)(images)
    assert (fp16.argmax(1) == fp32.argmax(1)).mean() >= 0.995
    assert np.abs(fp16 - fp32).max() < 0.1


def test_cpu_formats_never_import_tensorrt():
    """A fresh interpreter loads every CPU runtime as a worker would; tensorrt stays unimported."""
    code = textwrap.dedent(f"""
        import sys
        import catalog
        from runtimes import load_runtime
        from optimize.formats import FORMATS, serialized_path
        listed = {{s.format for s in catalog.versions(catalog.load_settings(), "{MODEL}").values()}}
        cpu = [f for f, spec in FORMATS.items() if spec.device == "cpu" and f in listed]
        assert all(serialized_path("{MODEL}", f).exists() for f in cpu), "build the formats first (make archive)"
        runtimes = [load_runtime(f, str(serialized_path("{MODEL}", f)), 1) for f in cpu]
        assert "tensorrt" not in sys.modules, "tensorrt was imported"
        """)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                   env={"PYTHONPATH": f"{ROOT}:{ROOT / 'handlers'}", "PATH": "/usr/bin:/bin"})


@pytest.mark.skipif(HAS_TENSORRT and torch.cuda.is_available(), reason="TensorRT and a GPU are here")
def test_without_tensorrt_the_format_is_refused_with_the_reason():
    with pytest.raises(validate.FormatUnavailable, match="needs (TensorRT|a CUDA GPU)"):
        validate.check_available("tensorrt_fp16")


@needs_gpu
def test_engine_is_built_once_per_gpu_and_tensorrt_version(fp16_onnx, tmp_path, monkeypatch):
    import tensorrt as trt

    import runtimes
    monkeypatch.setenv("TRT_ENGINE_CACHE", str(tmp_path))
    first = runtimes.TensorRTRuntime(str(fp16_onnx), 1)
    major, minor = torch.cuda.get_device_capability()
    assert first.engine_path.parent == tmp_path and f"_trt{trt.__version__}_" in first.engine_path.name
    assert f"_cc{major}.{minor}_" in first.engine_path.name
    built = first.engine_path.stat().st_mtime_ns
    second = runtimes.TensorRTRuntime(str(fp16_onnx), 1)
    assert second.engine_path == first.engine_path and second.engine_path.stat().st_mtime_ns == built
    assert first.max_batch == TRT_MAX_BATCH


@needs_gpu
def test_engine_agrees_with_fp32_at_every_batch_size(fp16_onnx, test_images, tmp_path, monkeypatch):
    monkeypatch.setenv("TRT_ENGINE_CACHE", str(tmp_path))
    engine = load_runtime("tensorrt_fp16", str(fp16_onnx), 1)
    images, labels = test_images
    fp32 = load_runtime("onnx", str(formats.serialized_path(MODEL, "onnx")), 2)(images)
    for batch in (1, 8, TRT_MAX_BATCH, TRT_MAX_BATCH + 36):  # the last one runs in two chunks
        logits = engine(images[:batch])
        assert logits.shape == (batch, 10) and logits.dtype == np.float32
        assert np.abs(logits - fp32[:batch]).max() < 0.1
    predicted = engine(images).argmax(1)
    assert (predicted == fp32.argmax(1)).mean() >= 0.995
    assert (predicted == labels).mean() >= 0.98
