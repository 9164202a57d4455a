"""Loading official (and our own) T2T-ViT checkpoints.

Accepted layouts: timm ``CheckpointSaver`` dicts (``state_dict_ema`` preferred when ``use_ema``, else
``state_dict``), fine-tune files ``{'net': state_dict, ...}`` (upstream ``transfer_learning.py``),
``{'model': state_dict}`` (our trainer), and bare state_dicts; ``module.`` (DataParallel/DDP) and
``_orig_mod.`` (torch.compile) prefixes are stripped.

Adaptations, each logged:
* head: when the checkpoint's classifier has another number of classes than the model (or the model has
  none), ``head.*`` is dropped and the model keeps its freshly initialised head.
* ``pos_embed`` of another length (e.g. the 384 px checkpoint into a 224 px model): by default
  (``pos_embed='regenerate'``) the model's own sinusoid table is used. The official table is a fixed,
  frozen sinusoid of the token index, so regenerating gives exactly the table a model trained at that
  size has. ``pos_embed='interpolate'`` instead resamples the checkpoint's grid bicubically (for
  checkpoints whose table was learned), keeping the cls row.
Anything else that does not fit raises :class:`CheckpointMismatchError` listing the offending keys.
"""
import argparse
import logging
import math
import os

import torch
import torch.nn.functional as F

from t2t_fast import registry

_logger = logging.getLogger(__name__)

_NESTED_KEYS = ("state_dict", "model", "net", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model; the message lists missing, unexpected and mis-shaped keys."""


def read_checkpoint(path):
    """``torch.load`` a checkpoint file on CPU without executing arbitrary pickled code (argparse
    Namespaces, as timm saves them, are allowed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def extract_state_dict(checkpoint, use_ema=True):
    """The model state_dict inside any supported checkpoint layout, with wrapper prefixes stripped."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"a checkpoint must be a dict (a state_dict or a dict holding one), got "
                        f"{type(checkpoint).__name__}")
    state = None
    if use_ema and isinstance(checkpoint.get("state_dict_ema"), dict):
        state = checkpoint["state_dict_ema"]
    else:
        for key in _NESTED_KEYS:
            if isinstance(checkpoint.get(key), dict):
                state = checkpoint[key]
                break
    if state is None:
        if not checkpoint or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise CheckpointMismatchError(
                f"no state_dict found in the checkpoint (looked for state_dict_ema, {', '.join(_NESTED_KEYS)} "
                f"and a bare state_dict); top-level keys: {sorted(checkpoint)[:20]}")
        state = checkpoint
    cleaned = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def _fit_pos_embed(model, table, mode):
    target = model.pos_embed
    if table.shape == target.shape:
        return table
    if mode == "regenerate":
        _logger.info("pos_embed %s -> %s: using the model's sinusoid table", tuple(table.shape), tuple(target.shape))
        return target.detach().clone()
    if mode != "interpolate":
        raise ValueError(f"pos_embed must be 'regenerate' or 'interpolate', got {mode!r}")
    if table.ndim != 3 or table.shape[-1] != target.shape[-1]:
        raise CheckpointMismatchError(f"pos_embed: checkpoint shape {tuple(table.shape)} cannot be resampled to "
                                      f"{tuple(target.shape)} (embedding widths differ)")
    old = table.shape[1] - 1
    side = math.isqrt(old)
    if side * side != old:
        raise CheckpointMismatchError(f"pos_embed: the checkpoint's {old} position rows are not a square grid")
    grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=model.grid_size, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, table.shape[-1]).to(table.dtype)
    _logger.info("pos_embed %s -> %s: bicubic interpolation", tuple(table.shape), tuple(target.shape))
    return torch.cat([table[:, :1], grid], dim=1)


def load_checkpoint(model, path_or_dict, strict=True, use_ema=True, pos_embed="regenerate"):
    """Load a checkpoint (file path or already-loaded dict) into ``model``.

    Returns the ``(missing_keys, unexpected_keys)`` result of ``load_state_dict`` (both empty when strict).
    Raises :class:`CheckpointMismatchError` listing every missing, unexpected or mis-shaped key."""
    if isinstance(path_or_dict, (str, os.PathLike)):
        checkpoint = read_checkpoint(os.fspath(path_or_dict))
    else:
        checkpoint = path_or_dict
    state = extract_state_dict(checkpoint, use_ema=use_ema)
    own = model.state_dict()

    head_weight = state.get("head.weight")
    if head_weight is not None and own.get("head.weight", torch.empty(0)).shape != head_weight.shape:
        _logger.info("dropping the checkpoint's %d-class head: the model has num_classes=%d",
                     head_weight.shape[0], model.num_classes)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if "pos_embed" in state and "pos_embed" in own:
        state["pos_embed"] = _fit_pos_embed(model, state["pos_embed"], pos_embed)

    if not any(k.startswith("head.") for k in state):
        # dropped above, or saved without one: the model keeps its own head
        state.update({k: v for k, v in own.items() if k.startswith("head.")})
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k in own and state[k].shape != own[k].shape]
    problems = []
    if mis_shaped:
        problems.append("shape mismatches:\n  " + "\n  ".join(mis_shaped))
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}):\n  " + "\n  ".join(missing))
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}):\n  " + "\n  ".join(unexpected))
    if problems:
        name = getattr(model, "variant", None) or type(model).__name__
        raise CheckpointMismatchError(f"checkpoint does not fit {name}:\n" + "\n".join(problems))
    return model.load_state_dict(state, strict=strict)


def load_pretrained(model, name, progress=True):
    """Download (cached by torch.hub) and load the official ImageNet weights of variant ``name``."""
    url = registry.checkpoint_url(name)
    if not url:
        released = [n for n in registry.VARIANTS if registry.checkpoint_url(n)]
        raise ValueError(f"no official checkpoint was released for {name}; released: {', '.join(released)}. "
                         f"Pass checkpoint_path= to load a local file.")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=progress,
                                                        weights_only=True)
    return load_checkpoint(model, checkpoint)
