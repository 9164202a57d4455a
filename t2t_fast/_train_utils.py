"""Plumbing shared by ``t2t-fast train``, ``finetune`` and ``eval``: logging, distributed setup, RNG
state, atomic checkpoints, samplers, progress reporting, validation and the per-epoch summary.
Imports timm; the model package itself never imports this module."""
import csv
import json
import logging
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

_logger = logging.getLogger("t2t_fast.train")


def setup_logging(primary, log_file=None):
    """Bare INFO lines on stdout for the primary rank (warnings only elsewhere), plus an optional file."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if primary and log_file:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(file_handler)
    logging.basicConfig(level=logging.INFO if primary else logging.WARNING, format="%(message)s",
                        handlers=handlers, force=True)


class Distributed:
    """Rank facts from torchrun's environment (RANK/WORLD_SIZE/LOCAL_RANK; SLURM works too)."""

    def __init__(self, device=None):
        from timm.utils.distributed import init_distributed_device_so

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        info = init_distributed_device_so(device)  # nccl for CUDA, gloo for CPU
        self.device = torch.device(info["device"])
        self.rank = info["global_rank"]
        self.local_rank = info["local_rank"]
        self.world_size = info["world_size"]
        self.distributed = info["distributed"]
        self.primary = self.rank == 0
        if self.distributed and self.device.type == "cpu":
            # N processes on one machine share its cores; more threads than cores thrash.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))

    def all_reduce_sum(self, values):
        """Sum a list of floats over the ranks (identity when not distributed)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather_objects(self, obj):
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state():
    """Every RNG the training loop draws from (python, numpy, torch CPU, CUDA), in a form
    ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _mkstemp_beside(path):
    """A temp file next to ``path`` (same file system, so ``os.replace`` is atomic) with the permissions
    a plain ``open`` would give (mkstemp makes 0600 files)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def save_atomic(obj, path):
    """``torch.save`` to a temp file in the target's folder, fsync, then ``os.replace``: a reader (or a
    crash) sees the old file or the new one, never half of one."""
    fd, tmp = _mkstemp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(obj, path):
    fd, tmp = _mkstemp_beside(path)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class ShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``, in order, without the padding DistributedSampler adds:
    validation sees each image exactly once, so the summed accuracy is exact."""

    def __init__(self, length, rank, world_size):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class Progress:
    """tqdm bar on an interactive terminal (primary rank), else a plain log line every ``interval`` steps."""

    def __init__(self, total, desc, primary, interval):
        self.total, self.desc, self.interval = total, desc, max(1, interval)
        self.bar = None
        self.start = time.perf_counter()
        self.enabled = primary
        if primary and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, step, text):
        """``text`` is a callable (so metrics are only synced and formatted when shown)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % self.interval == 0 or step == self.total:
                self.bar.set_postfix_str(text())
        elif step % self.interval == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            _logger.info("%s [%d/%d (%.0f%%)] %s  %.3fs/step", self.desc, step, self.total,
                         100.0 * step / self.total, text(), elapsed / step)

    def close(self):
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def validate(model, loader, device, dist_info, amp_autocast, desc="Eval", log_interval=50):
    """Loss, top-1 and top-5 (%) of ``model`` over ``loader``, exact over all ranks (each rank holds a
    :class:`ShardSampler` shard). Returns a dict with ``loss``, ``top1``, ``top5``, ``count``, ``skipped``."""
    from timm.utils import AverageMeter, accuracy

    model.eval()
    loss_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    skipped = 0
    progress = Progress(len(loader), desc, dist_info.primary, log_interval)
    for step, (images, targets, n_skipped) in enumerate(loader, 1):
        skipped += n_skipped
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


class Summary:
    """summary.csv and summary.json, one row per finished epoch. Rewritten whole (atomically) each epoch rather
    than appended as timm's ``update_summary`` does, so a resumed run replaces the rows of epochs it redoes."""

    def __init__(self, output_dir):
        self.csv_path = os.path.join(output_dir, "summary.csv")
        self.json_path = os.path.join(output_dir, "summary.json")

    def rows(self):
        if not os.path.exists(self.json_path):
            return []
        with open(self.json_path) as f:
            return json.load(f)

    def append(self, row):
        """Add ``row`` (a flat dict with an ``epoch`` key); rows at or after it (from a run that was killed
        and resumed from an earlier epoch) are replaced."""
        rows = [r for r in self.rows() if r["epoch"] < row["epoch"]] + [row]
        write_json_atomic(rows, self.json_path)
        fields = list(dict.fromkeys(k for r in rows for k in r))
        fd, tmp = _mkstemp_beside(self.csv_path)
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.csv_path)
