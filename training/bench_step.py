"""Cost of one training step on this CPU, eager against torch.compile, for a model's preset.

    python -m training.bench_step --model cifar10_resnet18          # writes results/train_step_<model>.md

Random images of the model's input shape at the preset's batch size, the preset's autocast and
memory format, SGD Nesterov as in training. Each mode runs `--warmup` steps (torch.compile compiles
during them, and that time is reported on its own) and then `--steps` timed steps; the median step
time decides which mode `training.train` should use (`--compile`).
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from catalog import INPUT_SHAPE, cpu_name, dataset_of
from training.models import build_model
from training.train import PRESETS


def time_steps(model_name: str, compiled: bool, batch: int, warmup: int, steps: int) -> dict:
    preset = PRESETS[model_name]
    torch.manual_seed(0)
    model = build_model(model_name).train()
    images = torch.randn(batch, *INPUT_SHAPE[dataset_of(model_name)])
    labels = torch.randint(0, 10, (batch,))
    if preset.bf16:
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if compiled else model
    criterion = nn.CrossEntropyLoss(label_smoothing=preset.label_smoothing)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                weight_decay=preset.weight_decay)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=preset.bf16):
            loss = criterion(forward(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    mode = "torch.compile" if compiled else "eager"
    start = time.perf_counter()
    for _ in tqdm(range(warmup), desc=f"{mode} warm-up", leave=False):
        step()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in tqdm(range(steps), desc=f"{mode} steps", leave=False):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return {"mode": mode, "batch": batch, "warmup_steps": warmup, "warmup_s": round(warmup_s, 2),
            "steps": steps, "median_step_s": round(median, 4), "min_step_s": round(min(times), 4),
            "max_step_s": round(max(times), 4), "images_per_s": round(batch / median, 1)}


def main(args):
    torch.set_num_threads(args.threads)
    batch = args.batch_size or PRESETS[args.model].batch_size
    rows = [time_steps(args.model, compiled, batch, args.warmup, args.steps) for compiled in (False, True)]
    eager, compiled = rows
    faster = min(rows, key=lambda r: r["median_step_s"])
    result = {"model": args.model, "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
              "bf16_autocast": PRESETS[args.model].bf16, "rows": rows, "faster": faster["mode"],
              "compiled_over_eager": round(eager["median_step_s"] / compiled["median_step_s"], 3)}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_step_{args.model}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Training step cost: {args.model}", "",
             f"{result['cpu']}, {args.threads} threads, torch {result['torch']}, batch {batch}, bf16 autocast "
             f"{result['bf16_autocast']}. Written by `python -m training.bench_step --model {args.model}`.", "",
             "| mode | warm-up (s, steps) | median step (s) | min / max (s) | images/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['warmup_s']} ({r['warmup_steps']}) | {r['median_step_s']} | {r['min_step_s']} / "
              f"{r['max_step_s']} | {r['images_per_s']} |" for r in rows]
    lines += ["", f"torch.compile runs a step {result['compiled_over_eager']}x as fast as eager: "
                  f"**{result['faster']}** is the faster mode."]
    (out / f"train_step_{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, help="default: the preset's")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--output-dir", default="results")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
