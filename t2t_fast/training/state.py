"""The state a run leaves on disk and reads back: seeds and RNG states, atomic checkpoint writes, the
per-epoch summary, and resuming from ``last.pth``."""
import contextlib
import csv
import json
import logging
import os
import random
import shlex
import shutil
import tempfile
import time

try:
    import fcntl
except ImportError:  # no flock (Windows): run folders are not locked
    fcntl = None

import numpy as np
import torch

from t2t_fast.checkpoint import CheckpointFileError, read_checkpoint

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


@contextlib.contextmanager
def _replacing(path, mode="wb", **open_kwargs):
    """A file to write in place of ``path``: a temp file beside it, fsynced and renamed over ``path`` when the
    block ends, so a reader (or a crash) sees the old file or the new one, never half of one; removed if the block
    fails (Ctrl-C, a full disk)."""
    fd, tmp = _mkstemp_beside(path)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_atomic(obj, path):
    """``torch.save`` ``obj`` in place of ``path`` atomically. A failed write (a full disk: torch's writer raises
    RuntimeError) is an OSError saying so; the previous file is left as it was."""
    try:
        with _replacing(path) as f:
            torch.save(obj, f)
    except RuntimeError as exc:
        raise OSError(f"could not write {path} (is the disk full? {str(exc).splitlines()[0]}); the previous "
                      f"{os.path.basename(path)} is unchanged") from None


def copy_atomic(source, path):
    """Copy the file ``source`` in place of ``path`` atomically."""
    with _replacing(path) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f)


def write_json_atomic(obj, path):
    with _replacing(path, "w") as f:
        json.dump(obj, f, indent=1)


class Summary:
    """summary.csv and summary.json, one row per finished epoch. Rewritten whole (atomically) each epoch rather
    than appended as timm's ``update_summary`` does, so a resumed run replaces the rows of epochs it redoes."""

    def __init__(self, output_dir):
        self.csv_path = os.path.join(output_dir, "summary.csv")
        self.json_path = os.path.join(output_dir, "summary.json")

    def rows(self):
        """The rows written so far: summary.json's, or where it is missing or unreadable summary.csv's (with a
        warning; an earlier run's rows are kept either way)."""
        try:
            with open(self.json_path) as f:
                rows = json.load(f)
            if isinstance(rows, list) and all(isinstance(row, dict) and "epoch" in row for row in rows):
                return rows
            problem = "does not hold a list of rows"
        except FileNotFoundError:
            problem = "is missing"
        except (OSError, ValueError) as exc:  # ValueError: not JSON (a damaged file)
            problem = f"is unreadable ({str(exc).splitlines()[0]})"
        if not os.path.exists(self.csv_path):
            if problem != "is missing":
                _logger.warning("%s %s, and there is no summary.csv: the summary starts again from this epoch",
                                self.json_path, problem)
            return []
        try:
            with open(self.csv_path, newline="") as f:
                rows = [{key: _csv_value(value) for key, value in row.items() if value != ""}
                        for row in csv.DictReader(f)]
        except (OSError, ValueError, csv.Error) as exc:
            _logger.warning("%s %s, and %s is unreadable too (%s): the summary starts again from this epoch",
                            self.json_path, problem, self.csv_path, str(exc).splitlines()[0])
            return []
        _logger.warning("%s %s: the summary's earlier rows are read from %s", self.json_path, problem, self.csv_path)
        return [row for row in rows if isinstance(row.get("epoch"), int)]

    def append(self, row, rows=None):
        """Add ``row`` (a flat dict with an ``epoch`` key); rows at or after it (from a run that was killed
        and resumed from an earlier epoch) are replaced. ``rows``: those :meth:`rows` returned (read when None)."""
        rows = [r for r in (self.rows() if rows is None else rows) if r["epoch"] < row["epoch"]] + [row]
        write_json_atomic(rows, self.json_path)
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with _replacing(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def _csv_value(text):
    """A summary.csv cell as the number it was written from (text where it is none)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# ------------------------------------------------------------------------------------------ run folder lock
_LOCK_NAME = ".lock"


class FolderInUse(Exception):
    """The run folder is held by a live run: its process id (0 where unknown) is ``pid``."""

    def __init__(self, folder, pid):
        super().__init__(f"{folder} is in use by a live run (pid {pid or 'unknown'})")
        self.folder, self.pid = folder, pid


class FolderLock:
    """The hold of a run on its folder (see :func:`lock_folder`); :meth:`release` ends it."""

    def __init__(self, path, fd):
        self.path, self.fd = path, fd

    def release(self):
        """Remove the lock file, then unlock (:func:`lock_folder` retries when the file it locked was removed)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)


def lock_folder(folder):
    """Hold ``folder`` for this process's run: an exclusive ``flock`` on ``folder/.lock`` (which holds the process
    id) until :meth:`FolderLock.release`. Raises :class:`FolderInUse` when a live run holds it (OSError where the
    lock file cannot be created); returns None where files cannot be locked (no fcntl, or a file system without
    flock: then two runs in one folder go unnoticed)."""
    if fcntl is None:
        return None
    path = os.path.join(folder, _LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock_exclusive(fd)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise FolderInUse(folder, pid) from None
        except OSError as exc:
            os.close(fd)
            _logger.warning("%s cannot be locked (%s): another run started in it would not be noticed", folder, exc)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:  # the run that held it removed the file on release
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return FolderLock(path, fd)
        os.close(fd)


def _flock_exclusive(fd, tries=10, pause=0.01):
    """``flock(LOCK_EX | LOCK_NB)``, tried again for a moment: :func:`lock_holder`'s look holds a shared lock for as
    long as it reads."""
    for _ in range(tries - 1):
        try:
            return fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(pause)
    return fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def lock_holder(folder):
    """The process id of the live run that holds ``folder`` (0 where unknown), or None when none does."""
    if fcntl is None:
        return None
    try:
        fd = os.open(os.path.join(folder, _LOCK_NAME), os.O_RDONLY)
    except OSError:  # no lock file: no run holds the folder
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _read_pid(fd)
    except OSError:  # a file system without flock: nothing to tell
        return None
    finally:
        os.close(fd)


def _read_pid(fd):
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return 0


# -------------------------------------------------------------------------------- checkpoints of a run
def _checkpoint_args(args):
    """The run's options as plain JSON-able values (stored in every checkpoint)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def save_epoch(run, rng, row, is_best):
    """Write ``last.pth`` (everything needed to resume) and, for a new best, copy it to ``best.pth``. A run
    stopped between the two is put right when it is resumed (:func:`repair`)."""
    checkpoint = {
        "arch": run.args.model, "classes": list(run.classes), "epoch": run.epoch, "step": run.num_updates,
        "state_dict": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None, "rng": rng, "best": run.best,
        "best_epoch": run.best_epoch, "metrics": row, "num_classes": run.model.num_classes,
        "args": _checkpoint_args(run.args),
    }
    if run.ema is not None:
        checkpoint["state_dict_ema"] = run.ema.module.state_dict()
    last = os.path.join(run.output, "last.pth")
    save_atomic(checkpoint, last)
    if is_best:
        copy_atomic(last, os.path.join(run.output, "best.pth"))


def repair(path, checkpoint):
    """Bring the run folder of ``path`` (a ``last.pth``, read as ``checkpoint``) up to it, where the run was stopped
    after writing it (Ctrl-C, a crash, a full disk): ``best.pth`` when its epoch was the best and ``best.pth`` is
    missing or older, and its summary row."""
    folder = os.path.dirname(path) or "."
    epoch = checkpoint["epoch"]
    best = os.path.join(folder, "best.pth")
    if checkpoint.get("best_epoch") == epoch and (
            not os.path.exists(best) or os.path.getmtime(best) < os.path.getmtime(path)):
        _logger.warning("%s: best.pth was not updated to epoch %d, the best; copying it from last.pth", folder, epoch)
        copy_atomic(path, best)
    summary = Summary(folder)
    rows = summary.rows()
    if "metrics" in checkpoint and epoch not in [row["epoch"] for row in rows]:
        _logger.warning("%s: the summary lacks epoch %d; adding it from last.pth", folder, epoch)
        summary.append(checkpoint["metrics"], rows)


# Options a resumed run may change: where it runs and reads, and how fast; not what it computes. Every other option
# must be as the checkpoint's run had it (given again or left out).
RESUME_MAY_CHANGE = ("data", "output", "resume", "workers", "threads", "device", "backend", "compile",
                     "grad_checkpointing", "log_interval")


def _flag(key):
    return "--" + key.replace("_", "-")


def _shown(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def read_resume_checkpoint(path, args, explicit=None):
    """The ``last.pth`` of an earlier run with the same options and number of processes (ResumeError otherwise,
    listing every option that differs). ``explicit``: the options given on the command line (None: every option set
    in ``args``); only these are compared, the others are taken from the checkpoint's run. Options of
    :data:`RESUME_MAY_CHANGE` may differ, and are logged when they do. ``args.data``, when given, is an absolute
    path (as runs record it)."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "optimizer" not in checkpoint or "epoch" not in checkpoint:
        raise ResumeError(f"{path} is not a training checkpoint written by t2t-fast (it has no optimizer/epoch "
                          f"state); to start from its weights use `t2t-fast finetune --checkpoint {path}`")
    _check_is_latest(path, checkpoint)
    saved = dict(checkpoint.get("args", {}))
    command = "finetune" if "transfer_ratio" in saved else "train"  # finetune runs record their transfer ratio
    if ("transfer_ratio" in saved) != hasattr(args, "transfer_ratio"):
        raise ResumeError(f"{path} was written by `t2t-fast {command}`: resume it with `t2t-fast {command} "
                          f"--resume {path}`")
    _check_processes(path, checkpoint, command)
    if saved.get("data") is not None:  # an earlier version recorded --data as given, relative to where it ran
        saved["data"] = os.path.abspath(saved["data"])
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
    if "data" not in explicit and args.data is not None and not os.path.isdir(args.data):
        raise ResumeError(f"{args.data}, the data folder {path}'s run recorded, does not exist: give --data DIR "
                          f"where the run's data lies now")
    return checkpoint


def _check_is_latest(path, checkpoint):
    """A checkpoint other than its folder's ``last.pth`` (its ``best.pth``) may be resumed only when that
    ``last.pth`` holds no later epoch (resuming would write over it); a damaged ``last.pth`` is replaced."""
    last = os.path.join(os.path.dirname(path), "last.pth")
    if os.path.basename(path) == "last.pth" or not os.path.exists(last):
        return
    try:
        latest = read_checkpoint(last)
    except CheckpointFileError:
        _logger.warning("%s is unreadable (damaged or truncated); resuming from %s, the next epoch writes a new "
                        "last.pth", last, path)
        return
    if isinstance(latest, dict) and latest.get("epoch", -1) > checkpoint["epoch"]:
        raise ResumeError(f"{path} holds epoch {checkpoint['epoch']}, but its run went on to epoch "
                          f"{latest['epoch']}: resume from {last} (resuming {path} would write over it)")


def _check_processes(path, checkpoint, command):
    """The run must resume with the number of processes it had (one RNG state each): the updates per epoch of its
    schedule and its global batch depend on it."""
    from t2t_fast.training.distributed import launch_command, processes_from_env

    had, has = len(checkpoint.get("rng") or ()), processes_from_env()
    if had and had != has:
        raise ResumeError(f"{path} was written by a run of {had} process{'es' * (had > 1)}, this one has {has}: "
                          f"its schedule and global batch depend on the number, so resume with {had}: "
                          f"{shlex.join([*launch_command(command, had), '--resume', path])}")


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
    run.best_epoch = checkpoint.get("best_epoch")
    rng = checkpoint.get("rng")
    if rng:  # one state per process (read_resume_checkpoint checked the number)
        set_rng_state(rng[run.dist.rank])
    else:
        _logger.warning("the checkpoint holds no RNG states: continuing with fresh random streams (not bit-exact)")
    _logger.info("resumed %s at epoch %d (step %d)", run.args.resume, run.epoch, run.num_updates)
