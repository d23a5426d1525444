"""Explanations: which pixels of the image the model saw made it predict what it predicted.

Occlusion (Captum): a window slides over the model's input and replaces what it covers with the
background (the baseline); the attribution of a pixel is the mean drop of the predicted class's
logit over the windows that covered it. It needs only forward passes, so it drives the archive's own
runtime and explains every served format the same way: ONNX and INT8 ONNX have no gradients.
Its cost is bounded: at most MAX_WINDOWS_PER_SIDE**2 (64) forward passes of one image, in one batch.

The logit, not the probability, is attributed: a confident digit's probability is 1.0 in float32
whatever is occluded, so its map would be blank.
"""
import numpy as np
import torch

METHOD = "occlusion"
WINDOW_FRACTION = 1 / 8  # window side per input side: 4 px on MNIST's 28 and on CIFAR-10's 32
MAX_WINDOWS_PER_SIDE = 8  # so at most 64 forward passes of one image per explanation
PERTURBATIONS_PER_EVAL = 64  # occluded copies per forward batch: one batch per explanation


def window_and_stride(size: int) -> tuple[int, int]:
    """Occlusion window and stride (px) along a side of `size` px: the window an eighth of the side
    (or larger), the stride from half the window up to the window (no pixel left uncovered: it would
    get no attribution), with at most MAX_WINDOWS_PER_SIDE windows, the last one on the edge."""
    for window in range(max(2, round(size * WINDOW_FRACTION)), size + 1):
        for stride in range(max(1, window // 2), window + 1):
            if (size - window) % stride == 0 and (size - window) // stride + 1 <= MAX_WINDOWS_PER_SIDE:
                return window, stride
    return size, 1  # a side of 1 px


def occlusion(runtime, image: np.ndarray, target: int, baseline: np.ndarray) -> np.ndarray:
    """Attribution of `target`'s logit over a normalised CxHxW image, HxW float32 scaled to [-1, 1]
    (positive: the region supports the prediction). `runtime` maps an NCHW float32 batch to logits;
    `baseline` is the per-channel value an occluded pixel takes."""
    from captum.attr import Occlusion  # only explanations need Captum

    channels, height, width = image.shape
    (window_h, stride_h), (window_w, stride_w) = window_and_stride(height), window_and_stride(width)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runtime(np.ascontiguousarray(batch.numpy(), dtype=np.float32)))

    inputs = torch.from_numpy(image[None])
    baselines = torch.from_numpy(np.broadcast_to(baseline[:, None, None], image.shape)[None].copy())
    attribution = Occlusion(forward).attribute(
        inputs, target=target, baselines=baselines, sliding_window_shapes=(channels, window_h, window_w),
        strides=(channels, stride_h, stride_w), perturbations_per_eval=PERTURBATIONS_PER_EVAL)
    # Occlusion spreads a window's drop over all its channels alike: one channel holds the map
    heat = attribution[0].sum(0).numpy() / channels
    peak = float(np.abs(heat).max())
    return (heat / peak if peak > 0 else heat).astype(np.float32)
