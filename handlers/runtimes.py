"""Model runtimes a handler can run: one class per archived format, chosen by model-config's `format`.

Each takes (path to the serialized model, threads) and maps a normalised float32 NCHW batch to
float32 logits. Heavy or optional runtimes (onnxruntime) are imported only when an archive uses them.
"""
import warnings

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


RUNTIMES = {"torchscript": TorchScriptRuntime, "onnx": OnnxRuntime}


def load_runtime(fmt: str, path: str, threads: int):
    if fmt not in RUNTIMES:
        raise ValueError(f"no runtime for format {fmt!r}: expected one of {', '.join(RUNTIMES)}")
    return RUNTIMES[fmt](path, threads)
