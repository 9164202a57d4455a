"""The training and validation loops of a run.

Callbacks are objects with any of ``on_step_end(run)`` (after every optimizer update) and
``on_epoch_end(run, row)`` (after the epoch's checkpoint and summary row are written); one may raise
:class:`StopTraining` to end the run at once, like a killed process: nothing of the epoch in progress is
saved.
"""
import contextlib
import logging
import os
import signal

import torch

from t2t_fast.training.data import DataError, readable_batches
from t2t_fast.training.logs import Progress

_logger = logging.getLogger(__name__)


class StopTraining(Exception):
    """Raised by a callback to end the run at once (the commands exit with code 3)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM during a training command (a scheduler's or a container's stop): it ends the run as Ctrl-C does."""


class _Termination:
    """Where SIGTERM stands: requested, and whether the epochs are running (then the run stops at the next step,
    after a checkpoint being written is complete, rather than wherever the signal lands: an exception raised in
    the middle of logging or of a ``__del__`` can deadlock or be lost)."""

    requested = False
    between_steps = False
    pid = None  # the training process: a loader worker forked before its init inherits the handler


def install_termination():
    """Make :func:`terminate` the process's SIGTERM handler target (call from the main thread)."""
    _Termination.requested, _Termination.between_steps, _Termination.pid = False, False, os.getpid()


def terminate(signum=None, frame=None):
    """The SIGTERM handler of the training commands: stop the run with :class:`Terminated`, at once outside the
    epochs, at the next step during them."""
    if os.getpid() != _Termination.pid:  # a loader worker forked with this handler: end as SIGTERM's default does
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _Termination.requested = True
    if not _Termination.between_steps:
        raise Terminated()


@contextlib.contextmanager
def terminate_between_steps():
    """Within the block a SIGTERM stops the run at the next step (:func:`stop_if_terminated`)."""
    _Termination.between_steps = True
    try:
        yield
    finally:
        _Termination.between_steps = False


def termination_requested():
    """Whether SIGTERM was received (a loader worker it ended may make the run fail before the next step)."""
    return _Termination.requested


def stop_if_terminated():
    """Raise :class:`Terminated` where SIGTERM was received."""
    if _Termination.requested:
        raise Terminated()


def notify(callbacks, event, *args):
    """Call ``callback.<event>(*args)`` on every callback that has it."""
    for callback in callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            method(*args)


def _mix(mixup, images, targets):
    """timm's mixup / cutmix pairs the images of a batch, so it takes even batches only: a batch left odd by images
    skipped as unreadable leaves out its last image (a batch of one is not mixed, only its target smoothed)."""
    if len(images) % 2:
        if len(images) == 1:
            from timm.data.mixup import mixup_target

            return images, mixup_target(targets, mixup.num_classes, 1.0, mixup.label_smoothing)
        images, targets = images[:-1], targets[:-1]
    return mixup(images, targets)


def train_step(run, images, targets):
    """One optimizer update on a batch: forward under autocast, backward (loss-scaled for fp16), clipping,
    the optimizer and EMA updates and the per-update schedule. Returns the loss."""
    images, targets = images.to(run.dist.device, non_blocking=True), targets.to(run.dist.device, non_blocking=True)
    if run.mixup is not None:
        images, targets = _mix(run.mixup, images, targets)
    with run.autocast():
        loss = run.loss_fn(run.network(images), targets)
    run.optimizer.zero_grad(set_to_none=True)
    clip_grad = run.args.clip_grad
    if run.scaler is not None:
        run.scaler(loss, run.optimizer, clip_grad=clip_grad, parameters=run.model.parameters())
    else:
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip_grad)
        run.optimizer.step()
    run.num_updates += 1
    if run.ema is not None:
        run.ema.update(run.model, step=run.num_updates)
    run.scheduler.step_update(run.num_updates)
    return loss


def train_one_epoch(run, callbacks=()):
    """Train ``run`` for its current epoch; returns ``{'loss', 'skipped'}`` summed over the ranks."""
    run.network.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.dist.device)
    seen, skipped = 0, 0
    log_interval = run.args.log_interval
    progress = Progress(len(run.train_loader), f"Train {run.epoch}/{run.num_epochs}", run.dist.primary,
                        log_interval)

    def status():
        return f"Loss {loss_sum.item() / max(seen, 1):.4f} LR {peak_lr(run.optimizer):.3g}"

    try:
        for step, (images, targets, n_skipped) in enumerate(readable_batches(run.train_loader), 1):
            stop_if_terminated()
            skipped += n_skipped
            if images is None:  # every process steps together (DDP): a step with no image would hang the others
                raise DataError(f"all {n_skipped} images of a training batch were unreadable (see the warnings "
                                f"above)")
            loss = train_step(run, images, targets)
            loss_sum += loss.detach().double() * images.shape[0]
            seen += images.shape[0]
            progress.update(step, status)
            if step % log_interval == 0:
                check_finite(loss_sum, run.epoch, step)
            notify(callbacks, "on_step_end", run)
    finally:
        progress.close()
    check_finite(loss_sum, run.epoch, len(run.train_loader))
    total, count, skipped = run.dist.all_reduce_sum([loss_sum.item(), seen, skipped])
    if skipped:
        _logger.warning("epoch %d: skipped %d unreadable training images", run.epoch, int(skipped))
    return {"loss": total / max(count, 1), "skipped": int(skipped)}


def peak_lr(optimizer):
    """The largest learning rate of the optimizer's groups: fine-tuning's head lr (its backbone's is a fraction)."""
    return max(group["lr"] for group in optimizer.param_groups)


def check_finite(loss_sum, epoch, step):
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(
            f"the training loss became {loss_sum.item()} in epoch {epoch} (by step {step}); stopping without "
            f"saving this epoch (the last checkpoint is intact). Try a lower --lr, --clip-grad 1, or "
            f"--amp-dtype bfloat16 instead of float16")


@torch.no_grad()
def validate(model, loader, dist_info, amp_autocast, desc="Eval", log_interval=50):
    """Loss, top-1 and top-5 (%) of ``model`` over ``loader``, exact over all ranks (each rank holds a
    :class:`~t2t_fast.training.distributed.ShardSampler` shard). Returns a dict with ``loss``, ``top1``,
    ``top5``, ``count``, ``skipped``."""
    from timm.utils import AverageMeter, accuracy

    model.eval()
    device = dist_info.device
    loss_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    skipped = 0
    progress = Progress(len(loader), desc, dist_info.primary, log_interval)
    for step, (images, targets, n_skipped) in enumerate(readable_batches(loader), 1):
        stop_if_terminated()
        skipped += n_skipped
        if images is None:  # no image of the batch could be read: counted as skipped
            continue
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with amp_autocast():
            output = model(images)
        output = output.float()
        loss = torch.nn.functional.cross_entropy(output, targets)
        top1, top5 = accuracy(output, targets, topk=(1, min(5, output.shape[-1])))
        n = images.shape[0]
        loss_m.update(loss.item(), n)
        top1_m.update(top1.item(), n)
        top5_m.update(top5.item(), n)
        progress.update(step, lambda: f"Loss {loss_m.avg:.4f} Acc@1 {top1_m.avg:.3f} Acc@5 {top5_m.avg:.3f}")
    progress.close()
    loss_sum, top1_sum, top5_sum, count, skipped = dist_info.all_reduce_sum(
        [loss_m.sum, top1_m.sum, top5_m.sum, loss_m.count, skipped])
    if count == 0:
        raise RuntimeError("validation saw no images")
    return {"loss": loss_sum / count, "top1": top1_sum / count, "top5": top5_sum / count, "count": int(count),
            "skipped": int(skipped)}
