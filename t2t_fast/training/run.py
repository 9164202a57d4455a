"""One training run, from resolved options to the last epoch: :func:`train`.

Setup, in order: checks, logging and seeds (:func:`_prepare`), the data and the learning rate (:func:`_data`),
the model, optimizer, autocast and EMA (:func:`_build`), the run folder and its log (:func:`_open_output`), the
loaders and the schedule (:func:`_schedule`), an optional resume, then compile / DDP wrapping, mixup and the loss
(:func:`_wrap`). Then every epoch (:func:`_run_epoch`): train, step the schedule, validate the model and its EMA,
write the checkpoint and the summary row.
"""
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import sys
import time
from typing import Any

import torch

from t2t_fast import backend, registry
from t2t_fast.training import loop, recipes, state
from t2t_fast.training import data as data_lib
from t2t_fast.training.distributed import Distributed, ShardSampler
from t2t_fast.training.logs import setup_logging

_logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """What one run holds; callbacks receive it. ``model`` is the bare model (what is saved and averaged),
    ``network`` what the loop calls (``model`` compiled and/or wrapped in DDP)."""

    args: Any
    dist: Distributed
    output: str
    numbered: Any = None  # the default folder's unnumbered name, or None for a given or resumed --output
    lock: Any = None
    resumed_stamp: Any = None  # the resumed folder's last.pth as read: its modification time (ns), None if none
    num_classes: int = 0
    classes: Any = ()
    model: Any = None
    network: Any = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    ema: Any = None
    autocast: Any = contextlib.nullcontext
    mixup: Any = None
    loss_fn: Any = None
    sampler: Any = None
    train_loader: Any = None
    val_loader: Any = None
    num_epochs: int = 0
    epoch: int = 0
    num_updates: int = 0
    best: Any = None
    best_epoch: Any = None


def train(args, builders=recipes.FROM_SCRATCH, callbacks=(), explicit=None):
    """Train with the resolved ``args`` (see ``t2t-fast train --help``), building the pieces with ``builders``
    (:class:`~t2t_fast.training.recipes.Builders`). ``callbacks``: see :mod:`t2t_fast.training.loop`.
    Returns the last epoch's metrics on the primary rank, else None (also when ``--resume`` names a finished
    run: there is nothing left to do). ``explicit``: the options given on the command line; with ``--resume``, the
    others are the resumed run's (see :func:`t2t_fast.training.state.read_resume_checkpoint`)."""
    primary = int(os.environ.get("RANK", 0)) == 0
    if args.data is not None:  # recorded absolute, so that the run resumes from any directory
        args.data = os.path.abspath(args.data)
    checkpoint = resumed_stamp = None
    if args.resume:  # checked before anything is written
        folder = os.path.dirname(args.resume) or "."
        resumed_stamp = _stamp(os.path.join(folder, "last.pth"))
        checkpoint = state.read_resume_checkpoint(args.resume, args, explicit)
        holder = state.lock_holder(folder)
        if holder is not None:
            raise _in_use(args, state.FolderInUse(folder, holder))
        if primary and os.path.basename(args.resume) == "last.pth":
            state.repair(args.resume, checkpoint)
        if state.finished(checkpoint):
            if primary:
                print(f"t2t-fast: {args.resume} is the end of a finished run (all {checkpoint['epoch'] + 1} "
                      f"epochs): nothing left to do; its checkpoints and summary are in {folder}")
            return None
    numbered = _claim_output(args, builders.output_suffix)
    threads = torch.get_num_threads()
    dist = Distributed(args.device)
    run = Run(args=args, dist=dist, output=args.output, numbered=numbered, resumed_stamp=resumed_stamp)
    try:
        started = time.perf_counter()
        _setup(run, builders, checkpoint)
        metrics = None
        with loop.terminate_between_steps():
            for epoch in range(run.epoch, run.num_epochs):
                run.epoch = epoch
                metrics = _run_epoch(run, callbacks)
                loop.stop_if_terminated()  # after the epoch's checkpoint and summary are written
        if dist.primary and metrics is not None:
            _log_done(run, metrics, time.perf_counter() - started)
        return metrics if dist.primary else None
    finally:
        if run.lock is not None:
            run.lock.release()
        dist.close()
        torch.set_num_threads(threads)  # train() is also called in-process (tests, notebooks)


def _setup(run, builders, checkpoint):
    args = run.args
    _prepare(args, run.dist)
    train_set, val_set = _data(run, builders)
    if checkpoint is not None:
        state.check_resumed_classes(checkpoint, run.classes, args.resume)
    _build(run, builders)
    _open_output(run)
    _schedule(run, train_set, val_set)
    if checkpoint is not None:
        state.resume(run, checkpoint)
    # Put the lr of this point of the schedule (and each group's lr_scale) in place before the first step.
    if args.sched_on_updates:
        run.scheduler.step_update(run.num_updates)
    else:
        run.scheduler.step(run.epoch)
    _wrap(run)
    _log_start(run, len(train_set), len(val_set))


def _prepare(args, dist):
    """Check the model name, set threads, logging and seeds."""
    if args.model not in registry.VARIANTS:
        raise data_lib.DataError(str(registry.unknown_model_error(args.model)))
    reason = backend.unavailable_reason(args.backend, dist.device.type) if args.backend else None
    if reason is not None:
        raise data_lib.DataError(f"--backend {args.backend}: {reason}")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging(dist.primary)  # the run folder and its log.txt come once the model is built (_open_output)
    if args.amp is None:
        args.amp = dist.device.type == "cuda"
    state.seed_everything(args.seed)  # the same initial weights (and EMA copy) on every rank


def _holds_run(folder):
    """Whether ``folder`` holds a run: its checkpoints, or a live run that has not finished an epoch yet."""
    return (any(os.path.exists(os.path.join(folder, name)) for name in ("last.pth", "best.pth"))
            or state.lock_holder(folder) is not None)


def _numbered(base):
    """``base``, ``base-2``, ``base-3``, ..."""
    yield base
    yield from (f"{base}-{number}" for number in itertools.count(2))


def _in_use(args, exc):
    """The error for a run folder that a live run holds (``exc``: :class:`~t2t_fast.training.state.FolderInUse`)."""
    if args.resume and os.path.abspath(exc.folder) == os.path.abspath(os.path.dirname(args.resume) or "."):
        return data_lib.DataError(f"--resume {args.resume}: {exc}; resume it once that run has ended")
    return data_lib.DataError(f"--output {exc}: give another --output, or wait for that run to end")


def _claim_output(args, suffix):
    """Set ``args.output``: the resumed run's folder, ``--output``, or ``output/<model>-<data><suffix>``, numbered
    (``-2``, ``-3``, ...) past folders that hold another run. A run's checkpoints are never overwritten by
    another: an ``--output`` that holds another run, or that a live run holds, is refused. Returns the default
    folder's unnumbered name (None for a given or resumed folder), which :func:`_open_output` numbers on from."""
    if args.output == "":
        raise data_lib.DataError("--output: give a folder path (got an empty one)")
    resumed = os.path.abspath(os.path.dirname(args.resume) or ".") if args.resume else None
    base = None
    if args.output is None and resumed is not None:
        args.output = os.path.dirname(args.resume) or "."
    elif args.output is None:
        data = "digits" if args.data is None else os.path.basename(os.path.normpath(args.data))
        base = os.path.join("output", f"{args.model}-{data}{suffix}")
        args.output = next(folder for folder in _numbered(base) if not _holds_run(folder))
        if args.output != base and int(os.environ.get("RANK", 0)) == 0:
            print(f"t2t-fast: note: {base} holds another run; this run goes to {args.output}", file=sys.stderr)
    else:
        holder = state.lock_holder(args.output)
        if holder is not None:
            raise _in_use(args, state.FolderInUse(args.output, holder))
        if _holds_run(args.output) and os.path.abspath(args.output) != resumed:
            raise data_lib.DataError(
                f"--output {args.output} holds another run (its checkpoints are never overwritten): give another "
                f"--output, continue that run with --resume {os.path.join(args.output, 'last.pth')}, or remove it "
                f"first")
    existing = os.path.abspath(args.output)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise data_lib.DataError(f"--output {args.output}: {existing} is a file, not a folder; give a folder path")
    return base


def _open_output(run):
    """Create the run folder, hold it for the run's life (:func:`~t2t_fast.training.state.lock_folder`) and start
    its log.txt: only once the data, options and model have been found usable, so a run refused for bad input
    leaves nothing behind. A default folder that another run took since :func:`_claim_output` moves this run on to
    the next free number; a given or resumed one is refused."""
    taken = None
    if run.dist.primary:
        while True:
            os.makedirs(run.output, exist_ok=True)
            try:
                run.lock = state.lock_folder(run.output)
            except state.FolderInUse as exc:
                if run.numbered is None:
                    raise _in_use(run.args, exc) from None
                taken = taken or str(exc)
            else:  # held now: what another run may have written since _claim_output looked
                changed = _written_since_claimed(run)
                if changed is None:
                    break
                if run.lock is not None:
                    run.lock.release()
                    run.lock = None
                if run.numbered is None:
                    raise data_lib.DataError(changed)
                taken = taken or changed
            run.output = next(folder for folder in _numbered(run.numbered) if not _holds_run(folder))
    run.output = run.args.output = run.dist.gather_objects(run.output)[0]  # the folder rank 0 holds
    setup_logging(run.dist.primary, os.path.join(run.output, "log.txt") if run.dist.primary else None)
    if taken is not None:
        _logger.warning("%s; this run goes to %s", taken, run.output)


def _written_since_claimed(run):
    """Why the folder just locked cannot take this run (another run wrote checkpoints in it, or went on with the
    run resumed here, since :func:`_claim_output` looked), or None."""
    last = os.path.join(run.output, "last.pth")
    if run.args.resume and os.path.abspath(run.output) == os.path.abspath(os.path.dirname(run.args.resume) or "."):
        if _stamp(last) != run.resumed_stamp:
            return f"--resume {run.args.resume}: {last} was written by another run since this one read it; resume again"
        return None
    if any(os.path.exists(os.path.join(run.output, name)) for name in ("last.pth", "best.pth")):
        return f"--output {run.output} holds another run (its checkpoints are never overwritten): give another --output"
    return None


def _stamp(path):
    """``path``'s modification time in ns, or None where it does not exist."""
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def _data(run, builders):
    """(train, val) datasets; sets the number of classes and the learning rate for the global batch."""
    args, dist = run.args, run.dist
    train_set, val_set = builders.datasets(args, builders.transforms(args))
    run.classes = list(train_set.classes)
    run.num_classes = len(run.classes)
    if run.num_classes < 2:
        raise data_lib.DataError(f"the training data holds {run.num_classes} class ({', '.join(run.classes)}): a "
                                 f"classifier needs at least two")
    if args.lr is None:
        args.lr = args.lr_base * (args.batch_size * dist.world_size) / args.lr_base_size
    if args.min_lr > args.lr and dist.primary:
        _logger.warning("the learning rate %.3g (for this global batch) is below --min-lr %.3g, so the schedule "
                        "raises it towards --min-lr instead of lowering it: give a lower --min-lr or a higher --lr",
                        args.lr, args.min_lr)
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise data_lib.DataError(f"--batch-size {args.batch_size} is odd, but mixup / cutmix pair the images of a "
                                 f"batch: give an even --batch-size, or --mixup 0 --cutmix 0")
    per_rank = len(train_set) // dist.world_size
    if args.batch_size > per_rank:
        raise data_lib.DataError(
            f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images"
            + (f" ({per_rank} per process over {dist.world_size} processes)" if dist.distributed else "")
            + "; use a smaller batch")
    return train_set, val_set


def _build(run, builders):
    """Model, optimizer, autocast, loss scaler and EMA; then a data / dropout stream per rank."""
    from timm.utils import ModelEmaV3, NativeScaler

    args, device = run.args, run.dist.device
    run.model = builders.model(args, run.num_classes).to(device)
    if run.model.in_chans != 3:  # every dataset here yields RGB images
        raise data_lib.DataError(f"--model-kwargs in_chans={run.model.in_chans}: the training images are RGB (3 "
                                 f"channels); train a 3-channel model (load_checkpoint adapts its weights to "
                                 f"other channel counts)")
    if args.grad_checkpointing:
        run.model.set_grad_checkpointing(True)
    run.optimizer = builders.optimizer(args, run.model)
    amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    if args.amp:
        run.autocast = functools.partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
    if args.amp and amp_dtype == torch.float16:
        run.scaler = NativeScaler(device=device.type)
    if args.model_ema:  # before compile and the DDP wrap (timm train.py)
        run.ema = ModelEmaV3(run.model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    state.seed_everything(args.seed + run.dist.rank)  # timm's seed + rank


def _schedule(run, train_set, val_set):
    """The train / val loaders and the lr schedule over them."""
    from timm.scheduler import create_scheduler_v2

    args, dist = run.args, run.dist
    run.sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank,
                                                      shuffle=True, seed=args.seed, drop_last=True)
    loader_kwargs = dict(num_workers=min(args.workers, os.cpu_count() or 1),
                         collate_fn=data_lib.collate_skip_unreadable, pin_memory=dist.device.type == "cuda")
    run.train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=run.sampler,
                                                   drop_last=True, **loader_kwargs)
    run.val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=args.batch_size, sampler=ShardSampler(len(val_set), dist.rank, dist.world_size),
        **loader_kwargs)
    run.scheduler, run.num_epochs = create_scheduler_v2(
        run.optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=len(run.train_loader))


def _wrap(run):
    """What the loop calls (compiled, DDP-wrapped), the mixup / cutmix transform and the loss."""
    from timm.data import Mixup

    args = run.args
    run.network = run.dist.wrap(torch.compile(run.model) if args.compile else run.model)
    if args.mixup > 0 or args.cutmix > 0:
        run.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                          switch_prob=args.mixup_switch_prob, mode="batch", label_smoothing=args.smoothing,
                          num_classes=run.num_classes)
    run.loss_fn = recipes.build_loss(args).to(run.dist.device)


def _run_epoch(run, callbacks):
    """Train and validate one epoch, save the checkpoint and the summary row; returns the row."""
    run.sampler.set_epoch(run.epoch)
    t0 = time.perf_counter()
    train_metrics = loop.train_one_epoch(run, callbacks)
    run.scheduler.step(run.epoch + 1)
    row = {"epoch": run.epoch, "step": run.num_updates, "lr": loop.peak_lr(run.optimizer),
           "train_loss": train_metrics["loss"], "train_skipped": train_metrics["skipped"],
           "train_time_s": round(time.perf_counter() - t0, 2)}
    row.update(_validate(run, run.model, "val", f"Val {run.epoch}"))
    if run.ema is not None:
        row.update(_validate(run, run.ema.module, "val_ema", f"Val EMA {run.epoch}"))
    score = row.get("val_ema_top1", row["val_top1"])
    is_best = run.best is None or score > run.best
    if is_best:
        run.best, run.best_epoch = score, run.epoch
    row["best_top1"] = run.best
    row["time_s"] = round(time.perf_counter() - t0, 2)
    rng = run.dist.gather_objects(state.get_rng_state())
    if run.dist.primary:
        state.save_epoch(run, rng, row, is_best)
        state.Summary(run.output).append(row)
        _log_epoch(row)
    loop.notify(callbacks, "on_epoch_end", run, row)
    return row


def _validate(run, model, prefix, desc):
    metrics = loop.validate(model, run.val_loader, run.dist, run.autocast, desc=desc,
                            log_interval=run.args.log_interval)
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def _log_start(run, num_train, num_val):
    args = run.args
    n_params = sum(p.numel() for p in run.model.parameters())
    _logger.info("%s: %.2fM params, %d classes, %d train / %d val images, %d processes x batch %d, lr %.3g, "
                 "%d epochs (%d updates/epoch), device %s%s, output %s", args.model, n_params / 1e6,
                 run.num_classes, num_train, num_val, run.dist.world_size, args.batch_size, args.lr, run.num_epochs,
                 len(run.train_loader), run.dist.device, f" autocast {args.amp_dtype}" if args.amp else "",
                 run.output)


def _log_epoch(row):
    text = (f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, val top-1 {row['val_top1']:.2f}% "
            f"top-5 {row['val_top5']:.2f}%")
    if "val_ema_top1" in row:
        text += f", EMA top-1 {row['val_ema_top1']:.2f}%"
    _logger.info("%s (%.1fs)", text, row["time_s"])


def _log_done(run, metrics, seconds):
    final = f"validation top-1 {metrics['val_top1']:.2f}%" + (
        f" (EMA {metrics['val_ema_top1']:.2f}%)" if "val_ema_top1" in metrics else "")
    _logger.info("done in %.0fs: %s, best %.2f%%; checkpoints and summary in %s", seconds, final, run.best,
                 run.output)
