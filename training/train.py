"""Train one model of the zoo, select the best epoch on a held-out validation split, report the
official test split once, and (with --ship) write the shipped weights and their model card.

    python -m training.train --model mnist_lenet5 --data-dir ../shared/data --ship

Data-parallel on N processes (torch.distributed: gloo on CPU, NCCL on GPUs), the same recipe and results:

    torchrun --standalone --nproc-per-node 2 -m training.train --model cifar10_resnet18 --output-dir runs/r18_ddp

Each process trains on its 1/N of every epoch (DistributedSampler) with batch_size/N images per step, so a
step still sees the preset's batch size and the schedule has the same number of steps; gradients are
averaged across processes (DistributedDataParallel). Validation and test are split across the processes
and their sums added up, so every process selects the same epoch. Only rank 0 writes checkpoints, the
log, metrics, plots and (with --ship) the weights and model card; --output-dir must be a folder every
process can read (any folder on one machine). Batch statistics of BatchNorm: synchronised across GPUs
(SyncBatchNorm), per process on CPU (gloo has no SyncBatchNorm), where running statistics are rank 0's.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch import distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import catalog
from catalog import CLASSES, cpu_name, dataset_of
from training.data import DataMissing, test_dataset, train_val_datasets
from training.models import build_model, load_weights
from training.report import plot_confusion, plot_curves, write_model_card

@dataclasses.dataclass
class Preset:
    """Hyper-parameters of one model, in one place."""
    epochs: int
    batch_size: int  # images per step
    lr: float  # peak learning rate of the one-cycle schedule (SGD, Nesterov momentum 0.9)
    weight_decay: float  # L2 on all weights
    label_smoothing: float
    bf16: bool  # bf16 autocast + channels_last (pays off on AVX512-BF16/AMX CPUs for the large model)
    val_size: int = 5000  # training images held out for model selection
    ship_dtype: str = "float32"  # dtype of the committed state dict
    # Train, select and test on images after the serving handler's preprocessing, training images
    # distorted like real drawings first (training.data.DrawnDigit): what is served is what was trained.
    served_preprocessing: bool = False


PRESETS = {
    # Claimed: >= 99.4% MNIST test accuracy served (see training/weights/mnist_lenet5.md for the measured run).
    "mnist_lenet5": Preset(epochs=20, batch_size=128, lr=0.1, weight_decay=5e-4, label_smoothing=0.0, bf16=False,
                           served_preprocessing=True),
    # Claimed: >= 99.6% MNIST test accuracy served (training/weights/mnist_alexnet.md).
    "mnist_alexnet": Preset(epochs=20, batch_size=128, lr=0.1, weight_decay=5e-4, label_smoothing=0.1, bf16=False,
                            served_preprocessing=True),
    # Claimed: see training/weights/cifar10_resnet18.md. 8 epochs is what one 2-core CPU session allowed;
    # 95% needs the same recipe at ~30+ epochs. A step (batch 256, bf16 autocast, channels_last) costs
    # 3.28 s eager and 3.23 s under torch.compile on the 2-core AMX Xeon (`python -m training.bench_step
    # --model cifar10_resnet18`, 2026-12-01): within noise, and compiling costs 84 s, so training runs
    # eager. That is ~10 min an epoch here (~4 min on the AMD EPYC machine of 2026-11-21).
    "cifar10_resnet18": Preset(epochs=8, batch_size=256, lr=0.2, weight_decay=5e-4, label_smoothing=0.1,
                               bf16=True, ship_dtype="float16"),
}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(PRESETS))
    p.add_argument("--data-dir", type=Path, default=catalog.DATA_DIR,
                   help="holds MNIST/raw or cifar-10-batches-bin (default: $DATA_DIR or ../shared/data)")
    p.add_argument("--download", action="store_true", help="let torchvision download the data set (needs internet)")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/<model>)")
    p.add_argument("--epochs", type=int, help="override the preset")
    p.add_argument("--batch-size", type=int, help="override the preset")
    p.add_argument("--lr", type=float, help="override the preset")
    p.add_argument("--limit", type=int, default=0, help="use only this many train/val/test images (smoke runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the cores; under torchrun, the cores / processes per node)")
    p.add_argument("--seed", type=int, default=0,
                   help="also draws the train/validation split: a warm restart (--init-from) keeps the seed of the "
                        "run that trained those weights, or its validation images are ones they were trained on")
    p.add_argument("--init-from", help="start from these weights (fine-tuning), e.g. training/weights/<model>.pt")
    p.add_argument("--extra-train", help="an .npz of extra training images and labels, e.g. from "
                                         "`python -m serving.corrections` (user-corrected predictions)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its last.pt (written after every epoch)")
    p.add_argument("--ship", action="store_true", help="write training/weights/<model>.pt and its model card")
    return p


@dataclasses.dataclass(frozen=True)
class Distributed:
    """Where this process stands in a torchrun job; the default is a single process on the CPU."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.backend)

    @property
    def main(self) -> bool:  # the process that writes files and prints progress
        return self.rank == 0


def init_distributed() -> Distributed:
    """Join the torchrun job this process was started in (its environment says so), else a single process."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Distributed()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank,
                       int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())), device, backend)


def all_sum(values, device: torch.device) -> list[float]:
    """Element-wise sum over the processes of a torchrun job (identity when there is one process)."""
    if not dist.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def sync_buffers(model):
    """Give every process rank 0's buffers (BatchNorm running statistics), so all hold the same model."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, bf16: bool, desc: str,
                    device: torch.device = torch.device("cpu"), quiet: bool = False):
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=quiet)
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if bf16:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
            loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
    total_loss, correct, seen = all_sum([total_loss, correct, seen], device)  # every process's images
    return total_loss / seen, correct / seen


@torch.no_grad()
def evaluate(model, loader, bf16: bool = False, num_classes: int = 10, desc: str = "eval", flip_tta: bool = False,
             sharded: bool = False, device: torch.device = torch.device("cpu")):
    """-> (mean cross-entropy, accuracy, confusion matrix [true, predicted]). flip_tta averages the
    logits of each image and its mirror image (test-time augmentation, twice the cost). sharded: the
    loader holds this process's share of the split; the sums of all processes are added up (every
    process of the job must call it)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    total_loss, seen = 0.0, 0
    for images, labels in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=sharded and dist.get_rank() > 0):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if bf16:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(images).float()
            if flip_tta:
                logits = (logits + model(images.flip(3)).float()) / 2
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes ** 2).view(
            num_classes, num_classes)
        seen += len(labels)
    if sharded:
        dist.all_reduce(confusion)
        total_loss, seen = all_sum([total_loss, seen], device)
    confusion = confusion.cpu()
    return total_loss / seen, (confusion.diag().sum() / seen).item(), confusion


def _subset(ds, n):
    if n:
        ds.images, ds.labels = ds.images[:n], ds.labels[:n]
    return ds


def add_extra_training_images(train_ds, path):
    """Append an .npz of uint8 images (N x H x W [x C]) and labels to the training split."""
    extra = np.load(path)
    images = torch.from_numpy(extra["images"])
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    if images.shape[1:] != train_ds.images.shape[1:]:
        raise SystemExit(f"error: {path} holds {tuple(images.shape[1:])} images; the model trains on "
                         f"{tuple(train_ds.images.shape[1:])}")
    train_ds.images = torch.cat([train_ds.images, images])
    train_ds.labels = torch.cat([train_ds.labels, torch.from_numpy(extra["labels"]).long()])


def cast_state_dict(model, dtype: str):
    return {k: (v.to(getattr(torch, dtype)) if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}


RUN_DEFINING_ARGS = ("model", "seed", "limit", "extra_train")  # a resumed run must keep these (the split, the data)


def resume_state(path: Path, preset: Preset, args) -> dict:
    if not path.exists():
        raise SystemExit(f"error: --resume: no checkpoint at {path} (give the run's --output-dir)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    # Only the length of the schedule may change (a run shortened or stretched to fit the time it has);
    # fields added to Preset since the checkpoint take their defaults.
    saved = dataclasses.replace(Preset(**state["preset"]), epochs=preset.epochs)
    if saved != preset:
        raise SystemExit(f"error: --resume: {path} was trained with {state['preset']}, not {dataclasses.asdict(preset)}")
    changed = [k for k in RUN_DEFINING_ARGS if state["args"].get(k) != getattr(args, k)]
    if changed:
        raise SystemExit(f"error: --resume: {path} was trained with other " + ", ".join(
            f"--{k.replace('_', '-')} ({state['args'].get(k)!r}, not {getattr(args, k)!r})" for k in changed))
    return state


def main(args):
    ddp = init_distributed()
    try:
        run(args, ddp)
    finally:
        if ddp.enabled:
            dist.destroy_process_group()


def run(args, ddp: Distributed = Distributed()):
    preset = PRESETS[args.model]
    overrides = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr") if getattr(args, k) is not None}
    preset = dataclasses.replace(preset, **overrides)
    if args.limit:
        preset = dataclasses.replace(preset, val_size=min(preset.val_size, args.limit))
    if ddp.enabled and preset.batch_size % ddp.world_size:
        raise SystemExit(f"error: batch size {preset.batch_size} does not split over {ddp.world_size} processes")
    if args.threads is None:  # one thread per core, the cores shared by the processes of this machine
        args.threads = max(1, (os.cpu_count() or 1) // ddp.local_world_size)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    dataset = dataset_of(args.model)
    out = Path(args.output_dir or f"runs/{args.model}")
    out.mkdir(parents=True, exist_ok=True)

    try:
        train_ds, val_ds = train_val_datasets(dataset, args.data_dir, preset.val_size, args.seed, args.download,
                                              served=preset.served_preprocessing)
        test_ds = test_dataset(dataset, args.data_dir, args.download, served=preset.served_preprocessing)
    except DataMissing as e:
        sys.exit(f"error: training needs the real data set: {e}")
    train_ds, val_ds, test_ds = (_subset(d, args.limit) for d in (train_ds, val_ds, test_ds))
    if args.extra_train:
        add_extra_training_images(train_ds, args.extra_train)
    shuffle = torch.Generator()  # re-seeded every epoch, so a resumed run sees the same order
    # The handler's preprocessing of each training image (~1 ms) runs in a worker process beside the step;
    # a new worker each epoch takes its seed from `shuffle`, so a resumed run distorts the same way.
    workers = dict(num_workers=1) if preset.served_preprocessing else {}
    sampler = None
    if ddp.enabled:  # each process its 1/N of an epoch (the same permutation everywhere), batch_size/N per step
        sampler = DistributedSampler(train_ds, ddp.world_size, ddp.rank, shuffle=True, seed=args.seed, drop_last=True)
        train_loader = DataLoader(train_ds, preset.batch_size // ddp.world_size, sampler=sampler, drop_last=True,
                                  generator=shuffle, **workers)
        val_loader, test_loader = (DataLoader(Subset(d, range(ddp.rank, len(d), ddp.world_size)), 500)
                                   for d in (val_ds, test_ds))
    else:
        train_loader = DataLoader(train_ds, preset.batch_size, shuffle=True, drop_last=True, generator=shuffle,
                                  **workers)
        val_loader = DataLoader(val_ds, 500)
        test_loader = DataLoader(test_ds, 500)
    sharded = dict(sharded=ddp.enabled, device=ddp.device)

    model = load_weights(args.model, args.init_from).train() if args.init_from else build_model(args.model)
    if ddp.device.type == "cuda":  # batch statistics over every GPU's images: the single-process recipe
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ddp.device)
    if preset.bf16:
        model = model.to(memory_format=torch.channels_last)
    # Gradients averaged across processes; `model` stays the plain module (checkpoints, evaluation).
    trained = nn.parallel.DistributedDataParallel(model, device_ids=[ddp.device] if ddp.device.type == "cuda"
                                                  else None) if ddp.enabled else model
    if ddp.rank:  # the other processes draw other augmentations (rank 0 keeps the single-process stream)
        torch.manual_seed(args.seed + 7919 * ddp.rank)
    if ddp.enabled and ddp.main:
        print(f"distributed: {ddp.world_size} processes ({ddp.backend}), {preset.batch_size // ddp.world_size} "
              f"images per process and step, {args.threads} threads each", flush=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=preset.label_smoothing)
    optimizer = torch.optim.SGD(model.parameters(), lr=preset.lr, momentum=0.9, nesterov=True,
                                weight_decay=preset.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, preset.lr, epochs=preset.epochs,
                                                    steps_per_epoch=len(train_loader), pct_start=0.25)
    history, best_acc, done, spent = [], -1.0, 0, 0.0
    if args.resume:
        state = resume_state(out / "last.pt", preset, args)
        if state["args"].get("world_size", 1) != ddp.world_size:  # another split of every epoch
            raise SystemExit(f"error: --resume: {out / 'last.pt'} was trained by {state['args'].get('world_size', 1)} "
                             f"processes, not {ddp.world_size}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["preset"]["epochs"] == preset.epochs:
            scheduler.load_state_dict(state["scheduler"])
        else:  # the one-cycle schedule of the new length, from the step the run reached (lr and momentum)
            scheduler.last_epoch = state["scheduler"]["last_epoch"] - 1
            with warnings.catch_warnings():  # "step() before optimizer.step()": intended, no step is skipped
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            print(f"schedule changed from {state['preset']['epochs']} to {preset.epochs} epochs after epoch "
                  f"{state['epoch']}: lr {optimizer.param_groups[0]['lr']:.4f}", flush=True)
        torch.set_rng_state(state["rng_ranks"][ddp.rank] if "rng_ranks" in state else state["rng"])
        history, best_acc, done, spent = state["history"], state["best_val_acc"], state["epoch"], state["seconds"]
        if not (out / "best.pt").exists():  # only last.pt moved with the run: its epoch stands in for the best
            if ddp.main:
                torch.save(state, out / "best.pt")
            best_acc = state["history"][-1]["val_acc"]
        if ddp.main:
            print(f"resumed {out / 'last.pt'} after epoch {done}/{preset.epochs}", flush=True)
    if ddp.enabled:
        args.world_size = ddp.world_size  # saved with the checkpoints' args: a resumed run must keep it
    start = time.time() - spent
    for epoch in range(done + 1, preset.epochs + 1):
        shuffle.manual_seed(args.seed * 1000 + epoch + 10 ** 9 * ddp.rank)
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_loss, train_acc = train_one_epoch(trained, train_loader, criterion, optimizer, scheduler, preset.bf16,
                                                f"epoch {epoch}/{preset.epochs}", ddp.device, quiet=not ddp.main)
        sync_buffers(model)  # the model every process validates is the one rank 0 saves
        val_loss, val_acc, _ = evaluate(model, val_loader, preset.bf16, desc="validation", **sharded)
        history.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                            val_acc=val_acc, seconds=round(time.time() - start, 1)))
        best_acc = max(best_acc, val_acc)
        # Everything a resumed run needs: the same weights, momentum, schedule position and random stream.
        checkpoint = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                          rng=torch.get_rng_state(), epoch=epoch, history=history, best_val_acc=best_acc,
                          seconds=history[-1]["seconds"], args=vars(args), preset=dataclasses.asdict(preset))
        if ddp.enabled:  # each process's random stream, for a resumed run
            checkpoint["rng_ranks"] = [None] * ddp.world_size
            dist.all_gather_object(checkpoint["rng_ranks"], checkpoint["rng"])
        if ddp.main:
            print(json.dumps(history[-1]), flush=True)
            torch.save(checkpoint, out / "last.tmp")
            (out / "last.tmp").replace(out / "last.pt")  # never a half-written checkpoint
            with open(out / "log.jsonl", "a") as log:  # the run's progress, small enough to commit with it
                log.write(json.dumps(history[-1]) + "\n")
            if val_acc >= best_acc:
                torch.save(checkpoint, out / "best.pt")
    wall = time.time() - start
    if ddp.enabled:
        dist.barrier()  # best.pt is written

    # The test split is looked at once, with the epoch chosen on validation.
    best = torch.load(out / "best.pt", map_location=ddp.device, weights_only=False)
    model.load_state_dict(best["model"])
    test_loss, test_acc, confusion = evaluate(model, test_loader, preset.bf16, desc="test", **sharded)
    # Served models run in fp32 (or their own optimised formats); report the shipped cast in fp32 too.
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in cast_state_dict(model, preset.ship_dtype).items()})
    model = model.float().to(memory_format=torch.contiguous_format)
    _, shipped_acc, shipped_confusion = evaluate(model, test_loader, desc=f"test ({preset.ship_dtype} weights, fp32 run)",
                                                 **sharded)
    # Flip test-time augmentation costs two forward passes: measured on validation (which would decide
    # whether it is served as a version of its own) and on test (reported only).
    tta = dict(val_acc=evaluate(model, val_loader, desc="validation (shipped weights)", **sharded)[1],
               val_acc_tta=evaluate(model, val_loader, desc="validation, flip TTA", flip_tta=True, **sharded)[1],
               test_acc_tta=evaluate(model, test_loader, desc="test, flip TTA", flip_tta=True, **sharded)[1]) \
        if dataset == "cifar10" else None
    if not ddp.main:  # rank 0 writes the results
        return
    command, hardware = "python -m training.train", f"{cpu_name()}, {args.threads} threads"
    if ddp.enabled:
        command = f"torchrun --nproc-per-node {ddp.local_world_size} -m training.train"
        device = torch.cuda.get_device_name(ddp.device) if ddp.device.type == "cuda" else cpu_name()
        hardware = f"{ddp.world_size} processes ({ddp.backend}) on {device}, {args.threads} threads each"
    metrics = dict(model=args.model, dataset=dataset, preset=dataclasses.asdict(preset), best_epoch=best["epoch"],
                   best_val_acc=best_acc, test_loss=test_loss, test_acc=test_acc,
                   shipped_dtype=preset.ship_dtype, shipped_test_acc=shipped_acc,
                   per_class_acc=(shipped_confusion.diag() / shipped_confusion.sum(1)).tolist(),
                   confusion=shipped_confusion.tolist(), flip_tta=tta, history=history, wall_seconds=round(wall, 1),
                   command=f"{command} " + " ".join(sys.argv[1:]),
                   hardware=f"{hardware}, torch {torch.__version__}", train_images=len(train_ds), test_images=len(test_ds))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_curves(history, out / "curves.png", args.model)
    plot_confusion(shipped_confusion, CLASSES[dataset], out / "confusion.png", args.model)
    print(f"best epoch {best['epoch']} val {best_acc:.4f} | test {test_acc:.4f} | shipped "
          f"({preset.ship_dtype}) test {shipped_acc:.4f} | {wall / 60:.1f} min")
    if args.ship:
        catalog.WEIGHTS_DIR.mkdir(exist_ok=True)
        weights = catalog.weights_path(args.model)
        torch.save(cast_state_dict(model, preset.ship_dtype), weights)
        write_model_card(metrics, weights, out)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
