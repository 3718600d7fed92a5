"""The training loop: epochs of SGD/AdamW with a per-step schedule, evaluation, checkpoints, exact resume."""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from kdna_fx.errors import (CheckpointError, CompiledGradientWarning, ConfigError, DataError, NonFiniteLossError,
                            WrappedModelError)
from kdna_fx.timing import provenance
from kdna_fx.utils import write_json

from . import distributed as D
from .checkpoint import CHECKPOINT_NAME, load_model_weights, model_signature, read_checkpoint, \
    save_checkpoint
from .recipe import WarmupCosine, autocast, build_optimizer, make_scaler, param_groups, resolve_amp, rng_state, \
    seed_everything, set_rng_state

METRICS_NAME = "metrics.json"
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}


@dataclass
class TrainConfig:
    """Everything that defines a run. Stored in every checkpoint; resuming checks the trajectory keys match."""

    epochs: int = 10
    batch_size: int = 128
    """Per process: the global batch is batch_size x number of processes."""
    optimizer: str = "sgd"
    lr: float | None = None
    """Peak learning rate; None: 0.1 (SGD) or 1e-3 (AdamW)."""
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float | None = None
    """Conv/linear weights; None: 1e-4 (SGD, the reference's ResNet-18 value) or 0.05 (AdamW)."""
    adapter_weight_decay: float = 0.0
    """F, S and gate weights. 0 by default: see docs/training.md."""
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    workers: int = 0
    device: str | None = None
    limit_steps: int | None = None
    """Stop each epoch after this many steps (smoke runs); part of the schedule."""
    log_every: int = 10
    progress: bool = True
    model: dict[str, Any] = field(default_factory=dict)
    """How the model was built (``ModelSpec.to_dict``): lets `kdna eval` rebuild it. Informational for train()."""
    data: dict[str, Any] = field(default_factory=dict)
    """The data set (``DataSpec.to_dict``), as `kdna train` stores it. Informational for train()."""

    def __post_init__(self) -> None:
        if self.optimizer not in DEFAULT_LR:
            raise ConfigError(f"optimizer must be one of {sorted(DEFAULT_LR)}, got {self.optimizer!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer]
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options that change the numbers a run produces: resuming with a different value would not be a resume.
TRAJECTORY_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
                   "adapter_weight_decay", "warmup_epochs", "min_lr", "label_smoothing", "amp", "channels_last",
                   "sync_bn", "seed", "limit_steps", "model")


def _plain_module(model: nn.Module) -> nn.Module:
    import torch._dynamo.eval_frame as eval_frame

    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel, eval_frame.OptimizedModule)):
        raise WrappedModelError(f"train() takes the plain model, got a {type(model).__name__}: it wraps the model "
                                f"in DDP and compiles it itself, after any kdna_fx.transform. Pass model.module / "
                                f"model._orig_mod instead.")
    return model


def make_train_loader(data: Dataset, config: TrainConfig, ctx: D.DistContext) -> tuple[DataLoader, DistributedSampler]:
    """Shuffled, sharded, dropping the last partial batch (a batch of 1 would break gate BatchNorms).

    A DistributedSampler is used even on one process: its permutation depends only on (seed, epoch), so
    a one-process run sees the same global batches as an N-process run, and a resumed run the same order.
    """
    sampler = DistributedSampler(data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed)
    loader = DataLoader(data, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
                        drop_last=True, pin_memory=ctx.device.type == "cuda", generator=torch.Generator())
    if len(loader) == 0:
        raise DataError(f"the training set has {len(sampler)} images per process, fewer than batch_size="
                         f"{config.batch_size} (--batch-size); lower the batch size or use more data")
    return loader, sampler


def make_eval_loader(data: Dataset, batch_size: int, workers: int, ctx: D.DistContext) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, sampler=D.ShardSampler(len(data), ctx),  # type: ignore[arg-type]
                      num_workers=workers, pin_memory=ctx.device.type == "cuda")


def _to_device(x: Tensor, y: Tensor, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, device: torch.device, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, ctx: D.DistContext | None = None, progress: bool = False,
             desc: str = "eval") -> dict[str, float]:
    """Top-1 accuracy, mean cross-entropy and images/s of ``model`` over ``loader`` (summed over all ranks)."""
    ctx = ctx or D.DistContext(device=device)
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not (progress and ctx.is_main))
    for x, y in bar:
        x, y = _to_device(x, y, device, channels_last)
        with autocast(device, amp_dtype):
            out = model(x)
        totals += torch.stack([nn.functional.cross_entropy(out.float(), y, reduction="sum").double(),
                               (out.argmax(1) == y).sum().double(), torch.tensor(float(len(y)), device=device)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    D.all_reduce_sum(totals, ctx)
    loss, correct, count = totals.tolist()
    return {"top1": 100.0 * correct / max(count, 1), "loss": loss / max(count, 1), "images": int(count),
            "images_per_s": count / elapsed if elapsed > 0 else float("nan")}


def train(model: nn.Module, train_set: Dataset, val_set: Dataset | None, config: TrainConfig, run_dir: str, *,
          resume: bool = False, on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None
          ) -> dict[str, Any]:
    """Train ``model`` (a plain or kdna_fx-transformed nn.Module, not yet wrapped) and return its history.

    Under torchrun every process calls this; only rank 0 writes ``run_dir/last.pt`` (every epoch) and
    ``run_dir/metrics.json``. ``resume`` continues from ``run_dir/last.pt`` and reproduces the uninterrupted
    run exactly (same data order, RNG states, optimizer and schedule state). ``on_epoch_end(epoch, record)``
    runs on every rank after each epoch's checkpoint (epoch is 1-based).
    """
    model = _plain_module(model)
    ctx = D.setup(config.device)
    try:
        return _train(model, train_set, val_set, config, run_dir, ctx, resume, on_epoch_end)
    finally:
        D.cleanup(ctx)


def _train(model: nn.Module, train_set: Dataset, val_set: Dataset | None, config: TrainConfig, run_dir: str,
           ctx: D.DistContext, resume: bool, on_epoch_end: Callable[[int, dict[str, Any]], None] | None
           ) -> dict[str, Any]:
    ckpt_path = os.path.join(run_dir, CHECKPOINT_NAME)
    if not resume and ctx.is_main and os.path.exists(ckpt_path):
        raise CheckpointError(f"{run_dir!r} already holds a checkpoint; pass resume=True (--resume) to continue "
                              f"that run, or choose another run_dir (--run-dir; nothing was overwritten)")
    seed_everything(config.seed + ctx.rank)
    amp_dtype = resolve_amp(config.amp, ctx.device)
    if config.sync_bn and ctx.distributed:
        if ctx.device.type != "cuda":
            raise ConfigError("sync_bn=True (--sync-bn) needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel). On "
                             "CPU, train without it (per-process BatchNorm statistics) or use a model without batch "
                             "statistics (GroupNorm/LayerNorm, gate_norm='layer').")
        model = D.convert_sync_batchnorm(model)
    D.warn_per_process_bn(model, ctx, config.sync_bn)
    model.to(ctx.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    groups = param_groups(model, config.weight_decay, config.adapter_weight_decay)  # type: ignore[arg-type]
    optimizer = build_optimizer(groups, config.optimizer, config.lr,  # type: ignore[arg-type]
                                momentum=config.momentum, nesterov=config.nesterov)
    scaler = make_scaler(ctx.device, amp_dtype)
    loader, sampler = make_train_loader(train_set, config, ctx)
    steps = min(len(loader), config.limit_steps or len(loader))
    schedule = WarmupCosine(optimizer, total_steps=steps * config.epochs,
                            warmup_steps=round(config.warmup_epochs * steps), min_lr=config.min_lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    started = provenance()  # the commit at the start, not whatever is checked out when an epoch ends
    start_epoch, history = 0, []
    if resume:
        start_epoch, history = _restore(ckpt_path, model, optimizer, schedule, scaler, config, ctx)
    elif ctx.is_main:
        _write_metrics(run_dir, config, [], started)

    net = D.wrap_ddp(model, ctx)
    if config.compile:
        backend = compile_backend(model, _example_batch(train_set, ctx.device, config.channels_last))
        if backend is not None:
            net = torch.compile(net, backend=backend)
    val_loader = make_eval_loader(val_set, config.batch_size, config.workers, ctx) if val_set is not None else None

    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        # Seeds the workers' augmentation RNGs; a pure function of (seed, epoch, rank), so resume is exact.
        loader.generator.manual_seed(config.seed * 100_003 + epoch * 1_009 + ctx.rank)  # type: ignore[union-attr]
        train_stats = _train_epoch(net, loader, steps, epoch, optimizer, schedule, scaler, criterion, amp_dtype,
                                   config, ctx, ckpt_path)
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": schedule.get_last_lr()[0], **train_stats}
        if val_loader is not None:
            val = evaluate(net, val_loader, device=ctx.device, amp_dtype=amp_dtype,
                           channels_last=config.channels_last, ctx=ctx, progress=config.progress,
                           desc=f"val {epoch + 1}/{config.epochs}")
            record.update({f"val_{k}": v for k, v in val.items()})
        history.append(record)
        rngs = D.all_gather_object(rng_state(), ctx)
        if ctx.is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                "scaler": scaler.state_dict(), "rng": rngs, "epoch": epoch + 1, "world_size": ctx.world_size,
                "config": config.to_dict(), "signature": model_signature(model), "history": history})
            _write_metrics(run_dir, config, history, started)
            _print_record(record, config.epochs)
        D.barrier(ctx)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    return {"history": history, "checkpoint": ckpt_path, "final": history[-1] if history else {},
            "params": sum(p.numel() for p in model.parameters())}


def compile_backend(model: nn.Module, example: torch.Tensor,
                    backends: tuple[str | Callable, ...] = ("inductor", "aot_eager")) -> str | Callable | None:
    """The first of ``backends`` whose compiled training step gives ``model`` the gradients eager gives
    (kdna_fx.testing.check_compiled_gradients on ``example``, in training mode), or None (train eagerly).
    Inductor on CPU has given wrong gradients for transformed models in some processes on one machine
    (docs/known-issues.md): a user is told in one line, never trained on them silently."""
    from ..utils import KeptModes
    from ..testing import check_compiled_gradients

    failed = []
    with KeptModes(model):
        model.train()
        for backend in backends:
            result = check_compiled_gradients(model, (example,), backend=backend)
            if result.ok:
                break
            failed.append(result)
        else:
            backend = None
    if failed:
        instead = (f"training compiled with backend={getattr(backend, '__name__', backend)!r} instead" if backend
                   else "training eagerly instead")
        warnings.warn(f"compile=True (--compile): {failed[0]}; {instead} (docs/known-issues.md).",
                      CompiledGradientWarning, stacklevel=3)
    return backend


def _example_batch(train_set: Dataset, device: torch.device, channels_last: bool, size: int = 4) -> torch.Tensor:
    """A few training images for the compiled-gradient check, drawn without touching any RNG state."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x = torch.stack([train_set[i][0] for i in range(min(size, len(train_set)))]).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _train_epoch(net: nn.Module, loader: DataLoader, steps: int, epoch: int, optimizer: torch.optim.Optimizer,
                 schedule: WarmupCosine, scaler: torch.amp.GradScaler, criterion: nn.Module,
                 amp_dtype: torch.dtype | None, config: TrainConfig, ctx: D.DistContext, ckpt_path: str
                 ) -> dict[str, float]:
    net.train()
    device = ctx.device
    # Running sums stay on the device; they are read (and all-reduced) every log_every steps only.
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
               disable=not (config.progress and ctx.is_main))
    start = time.perf_counter()
    seen = torch.zeros_like(totals)
    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        x, y = _to_device(x, y, device, config.channels_last)
        with autocast(device, amp_dtype):
            out = net(x)
            loss = criterion(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        totals += torch.stack([loss.detach().double() * len(y), (out.detach().argmax(1) == y).sum().double(),
                               torch.tensor(float(len(y)), device=device)])
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            seen = D.all_reduce_sum(totals.clone(), ctx)
            loss_sum, correct, count = seen.tolist()
            if not math.isfinite(loss_sum):
                bar.close()
                raise NonFiniteLossError(_non_finite_message(epoch, step, config, ckpt_path))
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{100 * correct / count:.2f}%",
                            img_s=f"{count / elapsed:.0f}", refresh=False)
            bar.update(step + 1 - bar.n)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    loss_sum, correct, count = seen.tolist()
    return {"train_loss": loss_sum / count, "train_top1": 100.0 * correct / count, "train_images": int(count),
            "train_images_per_s": count / elapsed, "train_seconds": elapsed}


def _non_finite_message(epoch: int, step: int, config: TrainConfig, ckpt_path: str) -> str:
    if os.path.exists(ckpt_path):
        kept = f"the last good checkpoint {ckpt_path!r} (after epoch {epoch}) was kept, not overwritten"
    else:
        kept = "no checkpoint was written (the run diverged in its first epoch)"
    return (f"non-finite loss in epoch {epoch + 1} by step {step + 1}: training stopped; {kept}. Usual fixes: a "
            f"lower lr= (--lr, now {config.lr:g}), a longer warmup_epochs= (--warmup-epochs, now "
            f"{config.warmup_epochs:g}), or amp='none' (now {config.amp!r}); then start again (or resume from the "
            f"kept checkpoint).")


def _restore(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: WarmupCosine,
             scaler: torch.amp.GradScaler, config: TrainConfig, ctx: D.DistContext) -> tuple[int, list[Any]]:
    ckpt = read_checkpoint(path)
    saved = ckpt.get("config", {})
    changed = [k for k in TRAJECTORY_KEYS if k in saved and saved[k] != getattr(config, k)]
    if changed:
        diff = ", ".join(f"{k}: checkpoint {saved[k]!r} vs now {getattr(config, k)!r}" for k in changed[:4])
        raise CheckpointError(f"cannot resume {path!r} with different training options ({diff}); resume with the "
                              f"options of the original run (`kdna train --resume --run-dir DIR` reuses them), or "
                              f"start a new --run-dir")
    load_model_weights(ckpt, model, path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"the optimizer/schedule state in {path!r} does not fit this run ({exc}); "
                              f"resume with the same model, options and data, or start a new --run-dir") from None
    scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt["rng"]
    if ckpt.get("world_size") == ctx.world_size:
        set_rng_state(rngs[ctx.rank])
    else:
        if ctx.is_main:
            print(f"note: {path!r} was written by {ckpt.get('world_size')} processes, this run has "
                  f"{ctx.world_size}: data order is kept but augmentation randomness differs from the original run")
        set_rng_state(rngs[0])
    return int(ckpt["epoch"]), list(ckpt.get("history", []))


def _write_metrics(run_dir: str, config: TrainConfig, history: list[dict[str, Any]],
                   started: dict[str, Any]) -> None:
    write_json(os.path.join(run_dir, METRICS_NAME),
               {"provenance": started, "config": config.to_dict(), "epochs": history})


def _print_record(record: dict[str, Any], epochs: int) -> None:
    text = (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
            f"top-1 {record['train_top1']:.2f}% ({record['train_images_per_s']:.0f} img/s)")
    if "val_top1" in record:
        text += f" | val loss {record['val_loss']:.4f} top-1 {record['val_top1']:.2f}% " \
                f"({record['val_images_per_s']:.0f} img/s)"
    tqdm.write(text)
