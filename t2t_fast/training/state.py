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

from t2t_fast.checkpoint import read_checkpoint

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
        "arch": run.args.model, "classes": list(run.classes), "epoch": run.epoch, "step": run.num_updates,
        "state_dict": run.model.state_dict(),
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


# Options a resumed run may change: where it runs and reads, and how fast; not what it computes. Every other option
# must be as the checkpoint's run had it (given again or left out).
RESUME_MAY_CHANGE = ("data", "output", "resume", "workers", "threads", "device", "backend", "compile",
                     "grad_checkpointing", "log_interval")


def _flag(key):
    return "--" + key.replace("_", "-")


def _shown(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def read_resume_checkpoint(path, args, explicit=None):
    """The ``last.pth`` of an earlier run with the same options (ResumeError otherwise, listing every option that
    differs). ``explicit``: the options given on the command line (None: every option set in ``args``); only these
    are compared, the others are taken from the checkpoint's run. Options of :data:`RESUME_MAY_CHANGE` may differ,
    and are logged when they do."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "optimizer" not in checkpoint or "epoch" not in checkpoint:
        raise ResumeError(f"{path} is not a training checkpoint written by t2t-fast (it has no optimizer/epoch "
                          f"state); to start from its weights use `t2t-fast finetune --checkpoint {path}`")
    last = os.path.join(os.path.dirname(path), "last.pth")
    if os.path.basename(path) != "last.pth" and os.path.exists(last):
        latest = read_checkpoint(last)
        if isinstance(latest, dict) and latest.get("epoch", -1) > checkpoint["epoch"]:
            raise ResumeError(f"{path} holds epoch {checkpoint['epoch']}, but its run went on to epoch "
                              f"{latest['epoch']}: resume from {last} (resuming {path} would write over it)")
    saved = checkpoint.get("args", {})
    if ("transfer_ratio" in saved) != hasattr(args, "transfer_ratio"):  # finetune runs record their transfer ratio
        command = "finetune" if "transfer_ratio" in saved else "train"
        raise ResumeError(f"{path} was written by `t2t-fast {command}`: resume it with `t2t-fast {command} "
                          f"--resume {path}`")
    now = _checkpoint_args(args)
    if explicit is None:  # None: left out (or resolved later, as --lr is from --lr-base): the saved value holds
        explicit = [k for k, v in now.items() if v is not None]
    changed = {k: (saved[k], v) for k, v in now.items() if k in explicit and k in saved and saved[k] != v}
    refused = [f"{_flag(k)} {_shown(old)} -> {_shown(new)}" for k, (old, new) in changed.items()
               if k not in RESUME_MAY_CHANGE]
    if refused:
        raise ResumeError(f"{path} was written by a run with other options ({', '.join(refused)}); resume with the "
                          f"same options (only {', '.join(map(_flag, RESUME_MAY_CHANGE[3:]))} and --data may "
                          f"change), or start a new run in another --output")
    for key, (old, new) in changed.items():
        if key not in ("resume", "output"):
            _logger.info("resuming with %s %s (the run had %s)", _flag(key), _shown(new), _shown(old))
    for key, value in saved.items():  # the options left out are the run's own, not the recipe's defaults
        if key not in explicit and key not in ("resume", "output"):
            setattr(args, key, tuple(value) if isinstance(value, list) and key != "model_kwargs" else value)
    return checkpoint


def check_resumed_classes(checkpoint, classes, path):
    """The resumed run's classes must be the data's, in order (ResumeError otherwise)."""
    trained = checkpoint.get("classes")
    if isinstance(trained, list) and trained != list(classes):
        raise ResumeError(f"{path} was trained on {len(trained)} classes ({', '.join(map(str, trained[:5]))}"
                          f"{', ...' if len(trained) > 5 else ''}), the data holds {len(classes)} "
                          f"({', '.join(map(str, list(classes)[:5]))}{', ...' if len(classes) > 5 else ''}): resume "
                          f"with the run's data, or start a new run")


def finished(checkpoint):
    """Whether the run of a ``last.pth`` trained every epoch of its schedule (cool-down included)."""
    saved = checkpoint.get("args", {})
    total = saved.get("epochs", 0) + (saved.get("cooldown_epochs") or 0)
    return checkpoint["epoch"] + 1 >= total


def resume(run, checkpoint):
    """Load ``checkpoint`` (from :func:`read_resume_checkpoint`) into the run: weights, EMA, optimizer, schedule,
    loss scaler, position, RNGs."""
    from t2t_fast.checkpoint import load_checkpoint

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
