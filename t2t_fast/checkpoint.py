"""Loading official (and our own) T2T-ViT checkpoints.

Accepted layouts: timm ``CheckpointSaver`` dicts (``state_dict_ema`` preferred when ``use_ema``, else
``state_dict``), fine-tune files ``{'net': state_dict, ...}`` (upstream ``transfer_learning.py``),
``{'model': state_dict}`` (our trainer), and bare state_dicts; ``module.`` (DataParallel/DDP) and
``_orig_mod.`` (torch.compile) prefixes are stripped, and ``model.`` where every key has it (the state_dict of an
:func:`t2t_fast.optimize_for_inference` model).

Adaptations, each logged:
* head: when the checkpoint's classifier has another number of classes than the model (or the model has
  none), ``head.*`` is dropped and the model keeps its freshly initialised head.
* ``pos_embed`` of another length (e.g. the 384 px checkpoint into a 224 px model): by default
  (``pos_embed='regenerate'``) the model's own sinusoid table is used. The official table is a fixed,
  frozen sinusoid of the token index, so regenerating gives exactly the table a model trained at that
  size has. ``pos_embed='interpolate'`` instead resamples the checkpoint's grid bicubically (for
  checkpoints whose table was learned), keeping the cls row.
* ``in_chans``: a checkpoint of another input channel count (3 for the official ones) gets its first T2T layer
  (the LayerNorm over the C*7*7 unfolded features and the projection after it) rewritten for the model's
  channels. The LayerNorm's affine part is folded into the projection, whose per-channel blocks are then
  summed (1 channel: exact, a grey image gives the 3-channel model's outputs for that image repeated 3x) or,
  for other counts, repeated cyclically and scaled by old/new channels (timm's rule for a first conv); the new
  LayerNorm is the identity affine. The transformer layers have no projection bias: their LayerNorm bias is
  set to ones and the folded bias moved into the weight through the zero-mean of normalised rows, and their q
  rows are rescaled for the attention scale of the new width.
Anything else that does not fit raises :class:`CheckpointMismatchError` listing the offending keys.
"""
import argparse
import logging
import math
import os
import re
import urllib.error

import torch
import torch.nn.functional as F

from t2t_fast import registry
from t2t_fast.geometry import SOFT_SPLITS

_logger = logging.getLogger(__name__)

_NESTED_KEYS = ("state_dict", "model", "net", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model; the message lists missing, unexpected and mis-shaped keys."""


class CheckpointFileError(ValueError):
    """A checkpoint path that is a folder or a file ``torch.load`` cannot read (empty, truncated, another kind
    of file); the message is one line saying what to give instead."""


def read_checkpoint(path):
    """``torch.load`` a checkpoint file on CPU without executing arbitrary pickled code (argparse
    Namespaces, as timm saves them, are allowed). Raises FileNotFoundError for a missing path and
    :class:`CheckpointFileError` for anything else that is not a readable checkpoint file."""
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pth.tar", ".pt")))
        hint = f" (it holds {', '.join(found[:3])})" if found else ""
        raise CheckpointFileError(f"{path} is a folder, not a checkpoint file: give the .pth file inside it{hint}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on a file that is not a checkpoint; all mean that
        if "Weights only load failed" in str(exc):  # pickled objects beyond tensors and plain containers
            raise CheckpointFileError(
                f"{path} holds pickled Python objects besides tensors (a whole model saved with torch.save(model)?), "
                f"which are not loaded from a file that may run code: save model.state_dict() instead, or, if you "
                f"trust the file, torch.load it with weights_only=False and pass the result") from None
        reason = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(exc).__name__}: {exc}").splitlines()[0][:120]
        raise CheckpointFileError(
            f"{path} ({os.path.getsize(path)} bytes) is not a readable PyTorch checkpoint ({reason}): it is empty, "
            f"truncated or another kind of file; give a .pth file written by t2t-fast or an official release"
        ) from None


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
        while key.startswith(_PREFIXES):  # in any order and number (a compiled DataParallel model's)
            key = key.split(".", 1)[1]
        cleaned[key] = value
    if cleaned and all(key.startswith("model.") for key in cleaned):  # an optimize_for_inference model's
        cleaned = {key[len("model."):]: value for key, value in cleaned.items()}
    return cleaned


def _fit_pos_embed(model, table, mode):
    target = model.pos_embed
    if table.shape == target.shape:
        return table
    if mode == "regenerate":
        _logger.info("pos_embed %s -> %s: using the model's sinusoid table", tuple(table.shape), tuple(target.shape))
        return target.detach().clone()
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


_FIRST_NORM = "tokens_to_token.attention1.norm1"


def _adapt_in_chans(model, state):
    """Rewrite the first T2T layer of ``state`` for ``model.in_chans`` channels (see the module docstring)."""
    projection = registry.FIRST_LAYER.get(getattr(model, "tokens_type", None))
    own = model.state_dict()
    keys = (f"{_FIRST_NORM}.weight", f"{_FIRST_NORM}.bias", f"{projection}.weight")
    if projection is None or not all(k in state and k in own for k in keys):
        return state
    taps = SOFT_SPLITS[0][0] ** 2
    old_features, new_features = state[keys[0]].shape[0], own[keys[0]].shape[0]
    weight = state[keys[2]]
    if (old_features == new_features or old_features % taps or new_features % taps
            or weight.shape != (own[keys[2]].shape[0], old_features)):
        return state  # nothing to adapt, or a mismatch reported with the others
    old_chans, new_chans = old_features // taps, new_features // taps
    gamma, beta, w64 = (state[k].double() for k in keys)
    folded = (w64 * gamma).view(-1, old_chans, taps)       # LayerNorm scale folded into the projection
    shift = w64 @ beta                                      # and its bias: a constant added to every output
    if new_chans == 1:
        folded = folded.sum(dim=1, keepdim=True)
    else:
        folded = folded[:, [c % old_chans for c in range(new_chans)]] * (old_chans / new_chans)
    folded = folded.reshape(-1, new_features)
    state = dict(state)
    state[keys[0]] = torch.ones(new_features, dtype=state[keys[0]].dtype)
    bias_key = f"{projection}.bias"
    if bias_key in state:
        state[keys[1]] = torch.zeros(new_features, dtype=state[keys[1]].dtype)
        state[bias_key] = (state[bias_key].double() + shift).to(state[bias_key].dtype)
    else:
        # normalised rows sum to 0, so a column term u 1^T acts on the bias alone: W' (n + 1) = W n + shift
        state[keys[1]] = torch.ones(new_features, dtype=state[keys[1]].dtype)
        folded = folded + ((shift - folded.sum(dim=1)) / new_features).unsqueeze(1)
        # the attention scale is width^-0.5 of the layer's input: keep q.k * scale as it was
        in_dim = folded.shape[0] // 3
        folded[:in_dim] *= math.sqrt(new_features / old_features)
    state[keys[2]] = folded.to(weight.dtype)
    _logger.info("first T2T layer adapted from %d to %d input channels", old_chans, new_chans)
    return state


def load_checkpoint(model, path_or_dict, strict=True, use_ema=True, pos_embed="regenerate"):
    """Load a checkpoint (file path or already-loaded dict) into ``model``.

    Returns the ``(missing_keys, unexpected_keys)`` result of ``load_state_dict`` (both empty when strict).
    Raises :class:`CheckpointMismatchError` listing every missing, unexpected or mis-shaped key."""
    if pos_embed not in ("regenerate", "interpolate"):
        raise ValueError(f"pos_embed must be 'regenerate' or 'interpolate', got {pos_embed!r}")
    from t2t_fast.inference import InferenceModel

    if isinstance(model, InferenceModel):  # its converted model holds the weights (cast to their dtypes)
        return load_checkpoint(model.model, path_or_dict, strict, use_ema, pos_embed)
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
    state = _adapt_in_chans(model, state)

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
    return load_checkpoint(model, download_official(url, progress=progress))


def download_official(url, model_dir=None, progress=True):
    """A released checkpoint from ``url``, through torch.hub's cache (``model_dir``: another cache folder). A
    download that fails raises ConnectionError saying how to load a local copy instead."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the released files pickle their args
            return torch.hub.load_state_dict_from_url(url, model_dir=model_dir, map_location="cpu",
                                                      progress=progress, weights_only=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        folder = model_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
        raise ConnectionError(f"could not download {url} ({getattr(exc, 'reason', exc)}); with the file at hand, "
                              f"give its path instead (checkpoint_path=PATH, the commands' --checkpoint PATH, timm's "
                              f"pretrained_cfg_overlay=dict(file=PATH)) or put it in {folder}") from None
