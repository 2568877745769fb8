"""Stage 1 (classifier) and stage 2 (CDSP segmenter) training, after torchvision's references/segmentation.

    train_classifier(data_dir, out_dir, cfg)            multi-label classifier on image-level labels
    train_segmenter(data_dir, pseudo_dir, out_dir, cfg) L = l_seg·L_seg + l_pseudo·L_pseudo + l_lorm·L_lorm
                                                          + l_ds·L_ds + l_dc·L_dc

Both share one loop (`fit` → `train_one_epoch`): SGD with momentum, linear warm-up then cosine
decay per iteration, AMP (bf16 autocast on CPU; fp16 and a GradScaler on CUDA), channels-last,
seeds, DDP when started by `torchrun` (gloo on CPU, NCCL on GPU; only rank 0 writes).
The model folder (docs/design.md) gets `checkpoint.pt` after every epoch and every
`checkpoint_minutes` within one (atomically), and `model.pt`, `config.json`, `history.json` at
the end. A NaN/inf loss stops training with the step named and the last good checkpoint
untouched; SIGTERM (pod pre-emption, also to the data-loader workers) writes a checkpoint at
once and exits with status 143; `resume=True` continues from the checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from cdsp_core import config, data, evaluate, losses, modelfolder, models, outputs
from cdsp_core.config import ClassifierConfig, SegTrainConfig
from cdsp_core.datasets import ClassificationDataset, SegmentationDataset
from cdsp_core.errors import EXIT_PREEMPTED, CdspError, load_failure
from cdsp_core.fsutil import atomic_path, atomic_write_text, replace_dir
from cdsp_core.progress import progress
from cdsp_core.transforms import train_transform

log = logging.getLogger("cdsp.train")

MetricsCallback = Callable[[dict[str, float], int], None]  # (one epoch's metrics, that epoch: 1..n)
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]

CLS_MOMENTUM = 0.9
CLS_SCALE = (0.75, 1.5)  # classifier augmentation: random scale (IRN-like), blur, flip, crop; no rotation


# ---------------------------------------------------------------------------- setup


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) — joins the process group when started by torchrun (env:// init)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG the loop draws from, in types that torch.load(weights_only=True) accepts."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def warmup_cosine(it: int, warmup: int, total: int) -> float:
    """lr factor of iteration `it`: linear warm-up over `warmup` iterations, then cosine decay to 0."""
    if it < warmup:
        return (it + 1) / warmup
    progress_ = (it - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))


class StopOnSigterm:
    """SIGTERM (pod pre-emption) only sets a flag; the loop checkpoints at the next step and exits."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def leave_sigterm_to_the_main_process(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a worker ignores SIGTERM unless its main process sent it.

    In a KFP pod, Argo's emissary sends SIGTERM to the step's whole process group, workers
    included. torch's worker handler dies of a SIGTERM that its parent did not send, and the
    main process then fails ("DataLoader worker ... is killed by signal") instead of
    checkpointing; so SIGTERM stays blocked in the worker (`start_workers` forks it so, and a
    signal that arrives before this runs waits too) and a thread takes each one: the main
    process's own (torch and multiprocessing stop a worker with it, also at exit) ends the
    worker as torch's handler would, anyone else's is dropped. A worker whose main process has
    gone exits by itself (torch's watchdog checks its parent every few seconds).
    """
    def wait() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
                os._exit(0)

    threading.Thread(target=wait, name="cdsp-worker-sigterm", daemon=True).start()


def start_workers(loader: DataLoader):
    """`iter(loader)`, its worker processes forked with SIGTERM blocked (see `leave_sigterm_to_the_main_process`)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can leave out the batches a pre-empted epoch already trained on.

    Skipping here, not in the loader, means those samples are not even loaded, so the RNG
    draws of the augmentation stay those of an uninterrupted run.
    """

    skip = 0  # samples of the current epoch already done

    def __iter__(self):
        return islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


class Preempted(Exception):
    """Raised inside the loop when SIGTERM arrived; `iteration` batches of the epoch are done."""

    def __init__(self, iteration: int, step: int):
        super().__init__(iteration, step)
        self.iteration, self.step = iteration, step


class NonFiniteLoss(Exception):
    def __init__(self, value: float, step: int, epoch: int, iteration: int):
        super().__init__(f"loss is {value} at step {step} (epoch {epoch + 1}, batch {iteration + 1})")
        self.step = step


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    # Through a Python file: a full disk then raises OSError(ENOSPC), which atomic_path reports
    # as such (torch's own file writer only says "unexpected pos").
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def load_checkpoint(path: Path, arch: dict) -> dict:
    """A checkpoint of this same architecture (kind, network, class names), else a CdspError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files and unpickling errors come in many types
        raise CdspError(f"{path}: corrupt or unreadable checkpoint ({load_failure(e)}); "
                        "delete it to train from scratch") from e
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "epoch", "arch"} <= set(ckpt):
        raise CdspError(f"{path}: not a cdsp training checkpoint")
    differ = {k: (ckpt["arch"].get(k), v) for k, v in arch.items() if ckpt["arch"].get(k) != v}
    if differ:
        what = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in differ.items())
        raise CdspError(f"{path}: checkpoint is for another model ({what}); use another --out or matching settings")
    return ckpt


def training_folder(out: Path, kind: str, inputs: tuple, resume: bool, is_main: bool) -> Path:
    """Where a run into `out` trains, checked by the output policy (outputs.py): `out` itself while it
    holds no finished model (its checkpoint is what --resume continues; nothing finished can be lost),
    else `outputs.staging(out)` beside it, which `fit` swaps in only once the new model is finished:
    a failed or pre-empted run leaves the finished model whole (and its checkpoint, if any, in the
    staging folder, where --resume continues). The first checkpoint makes the folder, with its marker:
    a run refused before it writes nothing."""
    work = outputs.staging(out) if (out / modelfolder.WEIGHTS).is_file() else out
    if is_main:
        outputs.check_target(out, kind, inputs=inputs)
        if work != out and not resume:
            shutil.rmtree(work, ignore_errors=True)  # an earlier failed run's: this one starts afresh
        for stale in filter(outputs.is_temporary, work.iterdir() if work.is_dir() else []):
            stale.unlink()  # left by a run killed in the middle of a write
    return work


def swap_in(work: Path, out: Path, kind: str, resumed_from: Path) -> None:
    """Make the finished model in `work` the model folder `out` (a finished model gives way only to a
    finished one), with its checkpoint: the one this run wrote or, when nothing was left to train,
    the one it resumed from (its time kept: it is the same checkpoint)."""
    outputs.write_marker(work, kind)
    if work == out:
        return
    checkpoint = work / modelfolder.CHECKPOINT
    if not checkpoint.exists() and resumed_from.exists():
        with atomic_path(checkpoint) as tmp:
            shutil.copy2(resumed_from, tmp)
    replace_dir(work, out)


# ---------------------------------------------------------------------------- the loop


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def train_one_epoch(net: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, scheduler, loader: DataLoader,
                    device: torch.device, epoch: int, *, scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None,
                    step: int = 0, first_batch: int = 0, stop: StopOnSigterm | None = None,
                    after_step: Callable[[int, int], None] | None = None,
                    show: bool = True, frozen: tuple[nn.Module, ...] = ()) -> tuple[dict[str, float], int]:
    """One pass over `loader` (batches counted from `first_batch` in a resumed epoch) → (mean metrics, step).

    Raises NonFiniteLoss before the optimiser touches a NaN/inf loss, Preempted after the step
    in which SIGTERM arrived. Under DDP both are agreed by all ranks (one all-reduce per step).
    SIGTERM in the epoch's last step lets the epoch end (with `stop.requested` set on every
    rank): a checkpoint after the last batch would resume into an empty epoch.
    `after_step(batches done in this epoch, step)` runs after every other step (timed checkpoints).
    `frozen` modules stay in eval mode (frozen BatchNorm statistics).
    """
    net.train()
    for module in frozen:
        module.eval()
    distributed = dist.is_available() and dist.is_initialized()
    sums: dict[str, float] = {}
    n_batches = n_images = 0
    start = time.perf_counter()
    end = first_batch + len(loader)
    batches = progress(start_workers(loader), f"epoch {epoch + 1}", total=len(loader), enabled=show)
    for i, batch in enumerate(batches, start=first_batch):
        batch = _to(batch, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, terms = loss_fn(net, batch)
        # One small all-reduce per step: mean of the loss terms, NaN anywhere and SIGTERM anywhere.
        values = torch.stack([loss.detach().float(), *(t.detach().float() for t in terms.values()),
                              torch.tensor(float(bool(stop and stop.requested)), device=loss.device)])
        if distributed:
            dist.all_reduce(values)
            values[:-1] /= dist.get_world_size()
        values = values.tolist()
        if not math.isfinite(values[0]):
            raise NonFiniteLoss(values[0], step + 1, epoch, i)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        for name, v in zip(["loss", *terms], values[:-1]):
            sums[name] = sums.get(name, 0.0) + v
        n_batches += 1
        n_images += batch["image"].shape[0]
        batches.set_postfix(loss=values[0])
        if i + 1 == end:
            if values[-1] > 0 and stop is not None:
                stop.requested = True
            continue
        if values[-1] > 0:
            raise Preempted(i + 1, step)
        if after_step is not None:
            after_step(i + 1, step)
    elapsed = time.perf_counter() - start
    world = dist.get_world_size() if distributed else 1
    metrics = {k: v / max(1, n_batches) for k, v in sums.items()}
    metrics["images_per_sec"] = n_images * world / elapsed if elapsed > 0 else 0.0
    return metrics, step


def in_backbone(name: str) -> bool:
    """Whether a parameter or module name of a training network lies in its backbone."""
    return f".{models.BACKBONE_PREFIX}" in f".{name}"


def param_groups(net: nn.Module, backbone_lr: float) -> list[dict]:
    """The backbone's parameters at `backbone_lr` times the learning rate, the rest (heads, LoRM) at 1."""
    if not backbone_lr >= 0:  # also NaN
        raise CdspError(f"backbone learning-rate factor must be >= 0, got {backbone_lr}")
    named = list(net.named_parameters())
    return [{"params": [p for n, p in named if in_backbone(n)], "lr_factor": backbone_lr},
            {"params": [p for n, p in named if not in_backbone(n)], "lr_factor": 1.0}]


def make_optimizer(name: str, groups: list[dict], lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """SGD or AdamW over `param_groups`, each group at its `lr_factor` times `lr`."""
    params = [{**g, "lr": lr * g["lr_factor"]} for g in groups]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    raise CdspError(f"unknown optimizer {name!r}: use sgd or adamw")


def fit(net: nn.Module, loss_fn: LossFn, dataset, out_dir: str, *, arch: dict, model_config: dict,
        final_model: Callable[[nn.Module], nn.Module], epochs: int, batch_size: int, lr: float, momentum: float,
        optimizer_name: str = "sgd",
        weight_decay: float, warmup_epochs: int, workers: int, amp: bool, device: torch.device, seed: int,
        resume: bool, on_metrics: MetricsCallback | None,
        validate: Callable[[nn.Module, torch.device], float] | None = None,
        on_checkpoint: Callable[[Path], None] | None = None, checkpoint_minutes: float = 0.0,
        backbone_lr: float = 1.0, freeze_bn: bool = False, inputs: tuple = ()) -> dict:
    """Train `net` on `dataset` and write the model folder; the shared body of both stages.

    A checkpoint is written after every epoch, on SIGTERM, and, when `checkpoint_minutes` > 0,
    within an epoch once that long has passed since the last one (it records the batches done,
    so `resume` continues mid-epoch). `on_checkpoint(path)` runs after every checkpoint write
    (on rank 0), e.g. to copy it to storage that outlives the pod, so that a retried pipeline
    step can resume from it. The backbone learns at `backbone_lr` times `lr`, and with `freeze_bn` its
    BatchNorm layers keep their statistics (eval mode). `inputs`: the folders it reads, which the
    output folder must not be, lie in or hold.
    """
    out = Path(out_dir)
    rank, world, device = init_distributed(device)
    is_main = rank == 0
    work = training_folder(out, arch["kind"], inputs, resume, is_main)
    ckpt_path = work / modelfolder.CHECKPOINT
    seed_everything(seed + rank)  # the model is built already; DDP broadcasts rank 0's weights

    net.to(device, memory_format=torch.channels_last)  # faster convolutions on CUDA and on CPU (oneDNN)
    optimizer = make_optimizer(optimizer_name, param_groups(net, backbone_lr), lr, momentum, weight_decay)
    frozen = tuple(m for n, m in net.named_modules()
                   if freeze_bn and isinstance(m, nn.modules.batchnorm._BatchNorm) and in_backbone(n))
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        worker_init_fn=leave_sigterm_to_the_main_process)
    if len(loader) == 0:
        raise CdspError(f"{len(dataset)} training images{f' over {world} processes' if world > 1 else ''} do not "
                        f"fill one batch of {batch_size}; lower the batch size")
    iters = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(warmup_cosine, warmup=warmup_epochs * iters, total=epochs * iters))
    use_amp = amp and device.type in ("cpu", "cuda")
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if use_amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and device.type == "cuda")

    start_epoch, skip, step, history = 0, 0, 0, []
    # In the staging folder, a run that starts from a finished model resumes from its checkpoint.
    resume_from = ckpt_path if ckpt_path.exists() or work == out else out / modelfolder.CHECKPOINT
    if resume and resume_from.exists():
        ckpt = load_checkpoint(resume_from, arch)
        try:
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CdspError(f"{resume_from}: does not fit this model: {str(e).splitlines()[0]}") from e
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, skip, step, history = ckpt["epoch"], ckpt["iteration"], ckpt["step"], ckpt["history"]
        if is_main:
            set_rng_state(ckpt["rng"])
        log.info("resumed from epoch %d%s (%s)", start_epoch, f", batch {skip}" if skip else "", resume_from)
    elif resume:
        log.info("no checkpoint in %s: training from scratch", out)
    if is_main:  # only now that the checkpoint is accepted: a refused resume keeps a finished model
        (work / modelfolder.WEIGHTS).unlink(missing_ok=True)  # model.pt means "finished"; this run is not yet

    ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else net

    last_checkpoint = time.monotonic()

    def checkpoint(epoch: int, iteration: int, step: int) -> None:
        nonlocal last_checkpoint
        if is_main:
            if outputs.kind_of(work) is None:  # what the folder holds, from its first file on
                outputs.write_marker(work, arch["kind"])
            save_checkpoint(ckpt_path, {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "iteration": iteration, "step": step,
                "history": history, "rng": rng_state(), "arch": arch})
            if on_checkpoint is not None:
                on_checkpoint(ckpt_path)
        last_checkpoint = time.monotonic()

    def timed_checkpoint(epoch: int) -> Callable[[int, int], None] | None:
        """After each step of `epoch`: a checkpoint if `checkpoint_minutes` have passed since the last."""
        if checkpoint_minutes <= 0:
            return None

        def after_step(iteration: int, step: int) -> None:
            if time.monotonic() - last_checkpoint >= checkpoint_minutes * 60:
                checkpoint(epoch, iteration, step)
                if is_main:
                    log.info("timed checkpoint written to %s (epoch %d, batch %d)", ckpt_path, epoch + 1, iteration)

        return after_step

    started = time.perf_counter()
    with StopOnSigterm() as stop:
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)
            sampler.skip = skip * batch_size
            lr_now = optimizer.param_groups[-1]["lr"]  # the base rate (the backbone's group may be scaled)
            try:
                metrics, step = train_one_epoch(ddp, loss_fn, optimizer, scheduler, loader, device, epoch,
                                                scaler=scaler, amp_dtype=amp_dtype, step=step, first_batch=skip,
                                                stop=stop, after_step=timed_checkpoint(epoch), show=is_main,
                                                frozen=frozen)
            except NonFiniteLoss as e:
                kept = f"the last good checkpoint {ckpt_path} (epoch {epoch}) is kept" if ckpt_path.exists() \
                    else "no checkpoint was written"
                raise CdspError(f"{out}: training stopped: {e}; {kept}. Lower the learning rate or check the data") \
                    from None
            except Preempted as e:
                step = e.step
                checkpoint(epoch, e.iteration, step)
                log.warning("SIGTERM: checkpoint written to %s (epoch %d, batch %d); exiting, rerun with --resume",
                            ckpt_path, epoch + 1, e.iteration)
                raise SystemExit(EXIT_PREEMPTED) from None
            skip = sampler.skip = 0
            metrics.update(epoch=epoch + 1, lr=lr_now, step=step)
            if validate is not None:
                metrics["val_miou"] = validate(net, device)
            history.append(metrics)
            checkpoint(epoch + 1, 0, step)
            if is_main:
                log.info("epoch %d/%d %s", epoch + 1, epochs,
                         " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
                if on_metrics is not None:  # step = epoch: curves of runs with other batch counts line up
                    on_metrics(metrics, epoch + 1)
            if stop.requested:  # arrived during validation or checkpointing: the checkpoint is written
                log.warning("SIGTERM: checkpoint written to %s after epoch %d; exiting", ckpt_path, epoch + 1)
                raise SystemExit(EXIT_PREEMPTED)

    summary = summarize(history, time.perf_counter() - started)
    if is_main:
        atomic_write_text(work / modelfolder.HISTORY, json.dumps(history, indent=2) + "\n")
        atomic_write_text(work / modelfolder.CONFIG, json.dumps(model_config, indent=2, sort_keys=True) + "\n")
        save_checkpoint(work / modelfolder.WEIGHTS, final_model(net).state_dict())  # last: it means "finished"
        swap_in(work, out, arch["kind"], resume_from)
    if world > 1:
        dist.barrier()
    return summary


SUMMARY_ONLY = ("best_val_miou", "train_seconds", "epochs")  # summary numbers that are no epoch's


def summary_only(summary: dict) -> dict:
    """The numbers of a training summary that no per-epoch curve holds (`final_<loss>`,
    `best_val_miou`, `train_seconds`): what a stage records once at its end. The last epoch's
    own `lr`, `val_miou`, ... are the last point of their curves already; logged again at step 0
    they would put that point at the start of the curve too."""
    return {k: v for k, v in summary.items() if k.startswith("final_") or k in SUMMARY_ONLY}


def summarize(history: list[dict], seconds: float | None = None) -> dict:
    """The numbers a pipeline step reports: the last epoch's metrics, best val mIoU, time."""
    if not history:
        return {"epochs": 0}
    summary = {f"final_{k}" if k.startswith("loss") else k: v for k, v in history[-1].items()}
    vals = [h["val_miou"] for h in history if "val_miou" in h]
    if vals:
        summary["best_val_miou"] = max(vals)
    if seconds is not None:
        summary["train_seconds"] = seconds
    return summary


# ---------------------------------------------------------------------------- stage 1: classifier


class ClassMaps(nn.Module):
    """Calls `Classifier.class_maps` through `forward`, so that DDP sees it (and syncs its gradients)."""

    def __init__(self, classifier: models.Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier.class_maps(images)


def classifier_loss(scribble_ce: float) -> LossFn:
    """Multi-label soft-margin loss on the image-level labels (+ the optional CAM-head scribble CE)."""

    def loss_fn(net: nn.Module, batch: dict[str, torch.Tensor]):
        maps, logits = net(batch["image"])
        terms = {"loss_cls": F.multilabel_soft_margin_loss(logits.float(), batch["labels"])}
        total = terms["loss_cls"]
        if scribble_ce:
            terms["loss_scribble_ce"] = losses.cam_partial_ce(maps, batch["scribble"])
            total = total + scribble_ce * terms["loss_scribble_ce"]
        return total, terms

    return loss_fn


def train_classifier(data_dir: str, out_dir: str, cfg: ClassifierConfig, *, device: str = "auto",
                     resume: bool = False, seed: int = 0, on_metrics: MetricsCallback | None = None,
                     on_checkpoint: Callable[[Path], None] | None = None) -> dict:
    """Stage 1: the multi-label CAM classifier on the image-level labels hidden in the scribbles."""
    index = data.load_index(data_dir)
    n = len(index.classes)
    dataset = ClassificationDataset(index.train, n, train_transform(cfg.cls_crop_size, *CLS_SCALE, rotation=0.0))
    torch.manual_seed(seed)  # the same initial weights on every rank
    classifier = models.build_classifier(cfg.cls_backbone, n, cfg.cls_output_stride, cfg.cls_pretrained,
                                         cfg.cls_width)
    arch = {"kind": "classifier", "cls_backbone": cfg.cls_backbone, "cls_output_stride": cfg.cls_output_stride,
            "class_names": index.classes, "cls_width": cfg.cls_width}
    model_config = {**config.to_dict(cfg), **arch, "seed": seed}
    return fit(ClassMaps(classifier), classifier_loss(cfg.cls_scribble_ce), dataset, out_dir, arch=arch,
               model_config=model_config, final_model=lambda net: net.classifier,
               epochs=cfg.cls_epochs, batch_size=cfg.cls_batch_size, lr=cfg.cls_lr, momentum=CLS_MOMENTUM,
               weight_decay=cfg.cls_weight_decay, warmup_epochs=cfg.cls_warmup_epochs, workers=cfg.cls_workers,
               amp=cfg.cls_amp, device=evaluate.resolve_device(device), seed=seed, resume=resume, inputs=(data_dir,),
               on_metrics=on_metrics, on_checkpoint=on_checkpoint, backbone_lr=cfg.cls_backbone_lr,
               checkpoint_minutes=cfg.cls_checkpoint_minutes)


# ---------------------------------------------------------------------------- stage 2: segmenter


class CDSPNet(nn.Module):
    """What stage 2 trains: the segmenter, and LoRM when its loss is on (LoRM is training only)."""

    def __init__(self, segmenter: nn.Module, lorm: models.LoRM | None):
        super().__init__()
        self.segmenter = segmenter
        self.lorm = lorm

    def forward(self, images: torch.Tensor, pseudo: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.segmenter(images)
        if self.lorm is not None:
            out["rectified"] = self.lorm(out["features"], pseudo)
        return out


# The CDSP loss terms, in the order of L, each with its weight setting of SegTrainConfig; term t is
# reported as the metric loss_<t>.
LOSS_WEIGHTS = {"seg": "l_seg", "pseudo": "l_pseudo", "lorm": "l_lorm", "ds": "l_ds", "dc": "l_dc"}
LOSS_TERMS = tuple(LOSS_WEIGHTS)


def loss_weights(cfg: SegTrainConfig) -> dict[str, float]:
    """{term: its weight in `cfg`} for every loss term (0: off)."""
    return {term: getattr(cfg, name) for term, name in LOSS_WEIGHTS.items()}


def needed_maps(cfg: SegTrainConfig) -> tuple[str, ...]:
    """The pseudo-label folder's maps that the loss terms in use read."""
    w = loss_weights(cfg)
    needs = []
    if w["pseudo"] or w["lorm"]:
        needs.append("pseudo")
    if w["ds"]:
        needs.append("distance_scribble")
    if w["dc"]:
        needs.append("distance_boundary")
    return tuple(needs)


def cdsp_loss(cfg: SegTrainConfig) -> LossFn:
    """L = l_seg·L_seg + l_pseudo·L_pseudo + l_lorm·L_lorm + l_ds·L_ds + l_dc·L_dc.

    A term at weight 0 is not computed (and its metric is absent).
    """
    w = loss_weights(cfg)

    def loss_fn(net: nn.Module, batch: dict[str, torch.Tensor]):
        out = net(batch["image"], batch.get("pseudo"))
        logits = out["out"]
        terms: dict[str, torch.Tensor] = {}
        if w["seg"]:
            terms["seg"] = losses.partial_ce(logits, batch["seg_target"])
        if w["pseudo"]:
            terms["pseudo"] = losses.pseudo_ce(logits, batch["pseudo"], cfg.label_smoothing)
        if w["lorm"]:
            where = models.LoRM.foreground(batch["pseudo"], out["features"].shape[-2:]) \
                if cfg.lorm_scope == "foreground" else None
            terms["lorm"] = losses.lorm_loss(out["features"], out["rectified"], where, cfg.lorm_distance)
        if w["ds"]:
            terms["ds"] = losses.distance_entropy_loss(logits, batch["distance_scribble"])
        if w["dc"]:
            terms["dc"] = losses.distance_entropy_loss(logits, batch["distance_boundary"])
        total = sum(w[t] * v for t, v in terms.items())
        return total, {f"loss_{t}": v for t, v in terms.items()}

    return loss_fn


def _val_miou(items: list[data.Item], n_classes: int) -> Callable[[nn.Module, torch.device], float]:
    """Single-scale val mIoU, each DDP rank on its share of the images, matrices summed."""

    def validate(net: nn.Module, device: torch.device) -> float:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        cm = evaluate.confusion_on(net.segmenter, items[rank::world], n_classes, device, show=rank == 0,
                                   desc="val")
        cm.reduce_from_all_processes()
        return cm.miou()

    return validate


def train_segmenter(data_dir: str, pseudo_dir: str | None, out_dir: str, cfg: SegTrainConfig, *,
                    resume: bool = False, on_metrics: MetricsCallback | None = None,
                    on_checkpoint: Callable[[Path], None] | None = None) -> dict:
    """Stage 2: the CDSP segmenter on scribbles + pseudo-labels + both distance maps."""
    weights = loss_weights(cfg)
    if not any(weights.values()):
        raise CdspError("every loss weight is 0: nothing to train "
                        f"(set one of {'/'.join(config.flag(name) for name in LOSS_WEIGHTS.values())})")
    # Each setting's own range and choices were checked as `cfg` was made (config.py); what is left
    # are the rules between settings.
    if weights["lorm"] and cfg.lorm_distance == "cosine" and cfg.lorm_scope != "foreground":
        raise CdspError("lorm_distance cosine needs lorm_scope foreground: off the foreground F' is 0 and "
                        "has no direction")
    if weights["lorm"] and not any(w for t, w in weights.items() if t != "lorm"):
        raise CdspError("--l-lorm alone trains no classifier head; switch on another loss term")
    index = data.load_index(data_dir)
    n = len(index.classes)
    transform = train_transform(cfg.crop_size, cfg.scale_min, cfg.scale_max, cfg.rotation)
    dataset = SegmentationDataset(index.train, n, transform, pseudo_dir=pseudo_dir, needs=needed_maps(cfg),
                                  target=cfg.seg_target)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    segmenter = models.build_segmenter(cfg.segmenter, cfg.backbone, n, cfg.pretrained, cfg.output_stride,
                                       cfg.width, cfg.aspp_rates, cfg.stem_stride)
    lorm = models.LoRM(segmenter.backbone.out_channels, cfg.lorm_temperature) if weights["lorm"] else None
    arch = {"kind": "segmenter", "segmenter": cfg.segmenter, "backbone": cfg.backbone, "class_names": index.classes,
            "lorm": lorm is not None, "output_stride": cfg.output_stride, "width": cfg.width,
            "aspp_rates": cfg.aspp_rates, "stem_stride": cfg.stem_stride}
    model_config = {**config.to_dict(cfg), **arch, "pseudo_dir": str(pseudo_dir or "")}
    val_items = [it for it in index.val if it.gt is not None]
    return fit(CDSPNet(segmenter, lorm), cdsp_loss(cfg), dataset, out_dir, arch=arch, model_config=model_config,
               final_model=lambda net: net.segmenter, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
               optimizer_name=cfg.optimizer,
               momentum=cfg.momentum, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs,
               workers=cfg.workers, amp=cfg.amp, device=evaluate.resolve_device(cfg.device), seed=cfg.seed,
               resume=resume, inputs=(data_dir, pseudo_dir), on_metrics=on_metrics,
               validate=_val_miou(val_items, n) if val_items else None,
               on_checkpoint=on_checkpoint, checkpoint_minutes=cfg.checkpoint_minutes,
               backbone_lr=cfg.backbone_lr, freeze_bn=cfg.freeze_bn)


def to_flags(cfg) -> list[str]:
    """The CLI flags that reproduce a config (the inverse of `config.from_namespace`)."""
    flags = []
    for f in config.fields_of(type(cfg)):
        value = getattr(cfg, f.name)
        if isinstance(value, bool):
            flags.append(config.flag(f.name) if value else "--no-" + config.flag(f.name)[2:])
        else:
            flags += [config.flag(f.name), str(value)]
    return flags


def launch_ddp(data_dir: str, pseudo_dir: str | None, out_dir: str, cfg: SegTrainConfig, *, nproc: int,
               resume: bool = False) -> dict:
    """Run `cdsp train-seg` under torchrun with `nproc` processes on this machine; its summary."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "cdsp_core", "train-seg", "--data", data_dir, "--out", out_dir]
    if pseudo_dir:
        args += ["--pseudo", pseudo_dir]
    if resume:
        args.append("--resume")
    args += to_flags(cfg)
    log.info("starting %d training processes: %s", nproc, " ".join(args))
    rc = subprocess.call(args)
    if rc != 0:
        raise CdspError(f"{out_dir}: distributed training failed (torchrun exit status {rc}; see the log above)")
    history = json.loads((Path(out_dir) / modelfolder.HISTORY).read_text(encoding="utf-8"))
    return summarize(history)


# ---------------------------------------------------------------------------- CLI


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-classifier", help="stage 1: multi-label classifier on the scribbles' class labels",
                              description="Writes checkpoint.pt, model.pt, config.json, history.json to --out.")
    p.add_argument("--data", required=True, help="dataset root (VOC layout, or a `cdsp prepare` output)")
    p.add_argument("--out", required=True, help="model folder")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    config.add_field_argument(p, SegTrainConfig, "device")
    config.add_field_argument(p, SegTrainConfig, "seed")
    config.add_arguments(p, ClassifierConfig)
    p.set_defaults(func=_run_classifier)

    p = subparsers.add_parser("train-seg", help="stage 2: CDSP segmentation training",
                              description="Writes checkpoint.pt, model.pt, config.json, history.json to --out. "
                                          "Under torchrun it trains with DDP (gloo on CPU, NCCL on GPU).")
    p.add_argument("--data", required=True, help="dataset root (VOC layout, or a `cdsp prepare` output)")
    p.add_argument("--pseudo", default=None, help="pseudo-label folder from cdsp pseudo-label (needed unless "
                                                  "--l-pseudo, --l-lorm, --l-ds and --l-dc are all 0)")
    p.add_argument("--out", required=True, help="model folder")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    config.add_arguments(p, SegTrainConfig)
    p.set_defaults(func=_run_segmenter)


def _print_summary(summary: dict, out: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
              + f" -> {out}")


def _run_classifier(args: argparse.Namespace) -> int:
    summary = train_classifier(args.data, args.out, config.from_namespace(ClassifierConfig, args),
                               device=args.device, resume=args.resume, seed=args.seed)
    _print_summary(summary, args.out)
    return 0


def _run_segmenter(args: argparse.Namespace) -> int:
    summary = train_segmenter(args.data, args.pseudo, args.out, config.from_namespace(SegTrainConfig, args),
                              resume=args.resume)
    _print_summary(summary, args.out)
    return 0

