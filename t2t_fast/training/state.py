"""The state a run leaves on disk and reads back: seeds and RNG states, atomic checkpoint writes, the
per-epoch summary, and resuming from ``last.pth``."""
import csv
import json
import logging
import os
import random
import shutil
import tempfile

import numpy as np
import torch

_logger = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A ``--resume`` checkpoint that does not belong to this run."""


# ------------------------------------------------------------------------------------------------ RNG
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


# ------------------------------------------------------------------------------------- atomic writes
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


# -------------------------------------------------------------------------------- checkpoints of a run
def _checkpoint_args(args):
    """The run's options as plain JSON-able values (stored in every checkpoint)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def save_epoch(run, rng, row, is_best):
    """Write ``last.pth`` (everything needed to resume) and, for a new best, copy it to ``best.pth``."""
    checkpoint = {
        "arch": run.args.model, "epoch": run.epoch, "step": run.num_updates, "state_dict": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None, "rng": rng, "best": run.best,
        "metrics": row, "num_classes": run.model.num_classes, "args": _checkpoint_args(run.args),
    }
    if run.ema is not None:
        checkpoint["state_dict_ema"] = run.ema.module.state_dict()
    last = os.path.join(run.output, "last.pth")
    save_atomic(checkpoint, last)
    if is_best:
        tmp = os.path.join(run.output, ".best.pth.tmp")
        shutil.copyfile(last, tmp)
        os.replace(tmp, os.path.join(run.output, "best.pth"))


def read_resume_checkpoint(path, args):
    """The ``last.pth`` of an earlier run with the same model and image size (ResumeError otherwise)."""
    from t2t_fast.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "optimizer" not in checkpoint or "epoch" not in checkpoint:
        raise ResumeError(f"{path} is not a training checkpoint written by t2t-fast (it has no optimizer/epoch "
                          f"state); to start from its weights use `t2t-fast finetune --checkpoint {path}`")
    saved = checkpoint.get("args", {})
    for key in ("model", "img_size"):
        if saved.get(key) != getattr(args, key):
            raise ResumeError(f"{path} was written by a run with --{key.replace('_', '-')} {saved.get(key)}, "
                              f"but this run has {getattr(args, key)}; resume with the same options")
    return checkpoint


def resume(run):
    """Load ``run.args.resume`` into the run: weights, EMA, optimizer, schedule, loss scaler, position, RNGs."""
    from t2t_fast.checkpoint import load_checkpoint

    checkpoint = read_resume_checkpoint(run.args.resume, run.args)
    load_checkpoint(run.model, checkpoint, use_ema=False)
    if run.ema is not None and "state_dict_ema" in checkpoint:
        run.ema.module.load_state_dict(checkpoint["state_dict_ema"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if run.scaler is not None and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    run.epoch, run.num_updates, run.best = checkpoint["epoch"] + 1, checkpoint["step"], checkpoint.get("best")
    rng = checkpoint.get("rng") or []
    if len(rng) == run.dist.world_size:
        set_rng_state(rng[run.dist.rank])
    else:
        _logger.warning("the checkpoint holds RNG states of %d processes, this run has %d: continuing with "
                        "fresh random streams (not bit-exact)", len(rng), run.dist.world_size)
    _logger.info("resumed %s at epoch %d (step %d)", run.args.resume, run.epoch, run.num_updates)
