"""Geometry of the T2T soft splits: the three (kernel, stride, padding) unfolds and the token grids they give.

Shared by the reference, the fast model and the ops; no tensor data is touched here. The functions a model's
forward calls compile under ``torch.jit.script``."""
import numbers
from typing import List, Tuple

import torch

# (kernel, stride, padding) of the three soft splits of the T2T module.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
Splits = Tuple[Tuple[int, int, int], Tuple[int, int, int], Tuple[int, int, int]]


def split_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of one unfold along one axis (0 or less when undefined)."""
    return (size + 2 * padding - kernel) // stride + 1


def image_token_grids(x, splits: Splits = SOFT_SPLITS) -> List[Tuple[int, int]]:
    """:func:`token_grids` of an image batch (B, C, H, W)."""
    height, width = x.shape[-2], x.shape[-1]
    if torch.jit.is_tracing():  # the sizes are traced 0-dim tensors there: the grids become constants of the trace
        height, width = int(height), int(width)
    return token_grids((height, width), splits)


def token_grids(img_size: Tuple[int, int], splits: Splits = SOFT_SPLITS) -> List[Tuple[int, int]]:
    """Token grids (H, W) after each of the three soft splits for an input of ``img_size`` (H, W).

    Raises ValueError when a soft split is undefined (the image is too small)."""
    grids: List[Tuple[int, int]] = []
    h, w = img_size[0], img_size[1]
    for kernel, stride, padding in splits:
        h, w = split_output_size(h, kernel, stride, padding), split_output_size(w, kernel, stride, padding)
        if h < 1 or w < 1:
            raise ValueError(f"image size ({img_size[0]}, {img_size[1]}) is too small for the T2T soft splits "
                             f"(kernel {kernel}, stride {stride}, padding {padding} gives an empty grid)")
        grids.append((h, w))
    return grids


def is_int(value):
    """True for Python/NumPy integers and the symbolic sizes of ``torch.compile`` / ``torch.export``, False for
    bools."""
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def image_size(value):
    """``img_size`` as an (H, W) pair of ints: an int gives a square."""
    if is_int(value):
        return (int(value), int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) for v in value):
        return tuple(int(v) for v in value)
    raise TypeError(f"img_size must be an int or a pair of ints, got {value!r}")
