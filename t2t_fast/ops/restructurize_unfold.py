"""Re-structurize + unfold: tokens (B, H*W, C) straight to unfolded windows (B, L, C*k*k), in one gather.

The T2T module turns tokens back into an image (``transpose`` + ``reshape`` to (B, C, H, W)) and soft-splits it
again with ``nn.Unfold``. Eager PyTorch does that with a transposed copy, an im2col per image and another
transposed copy; ``restructurize_unfold`` reads the tokens in place and writes the final layout once.

``restructurize_unfold_ref`` is the plain-torch oracle. The ``cpp`` / ``cuda`` paths are the
``t2t_fast::restructurize_unfold_fwd`` / ``_bwd`` custom ops (fake and autograd registered) over the native
extension ``t2t_fast._C``. The backward has no atomics and is deterministic: each dx element sums the window
taps that read it, in (oh, ow) order (CUDA: a thread per pixel; CPU: a thread per pixel row of token input,
or per (b, c) plane of an image, adding its windows in that order). The CPU kernels run on
``torch.get_num_threads()`` threads of torch's own OpenMP runtime (the extension links the same
``libgomp.so.1``, so no second thread team competes with torch's). The ``torch`` path is the reference
itself (plain torch ops, traceable by ONNX export and ``torch.export``).
"""
import contextlib

import torch
import torch.nn.functional as F

from t2t_fast._config import split_output_size
from t2t_fast._native import native_module
from t2t_fast.backend import select_backend
from t2t_fast.ops._common import (as_image, check_float_tensor, image_sizes, is_int, new_output,
                                   split_geometry)

_OP = "restructurize_unfold"
# dtype codes of csrc/restructurize_unfold.h (enum DType).
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _pair(name, value, least):
    """An int or an (h, w) pair of ints, each >= ``least`` -> (h, w)."""
    pair = (value, value) if is_int(value) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(is_int(v) for v in pair):
        raise TypeError(f"{_OP}: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < least:
        raise ValueError(f"{_OP}: {name} must be >= {least}, got {value!r}")
    return tuple(pair)


def restructurize_unfold_ref(tokens, grid_size, kernel_size, stride, padding):
    """Reference: ``transpose`` + ``reshape`` to NCHW, ``F.unfold``, ``transpose(1, 2)``, ``contiguous``.

    Args and return value as :func:`restructurize_unfold`.
    """
    unfolded = F.unfold(as_image(tokens, grid_size), kernel_size, padding=padding, stride=stride)
    return unfolded.transpose(1, 2).contiguous()


def _validate(tokens, grid_size, kernel_size, stride, padding):
    """Check the arguments; returns ((B, C, H, W), kernel, stride, padding) with (h, w) pairs."""
    check_float_tensor("tokens", tokens, _OP)
    kernel = _pair("kernel_size", kernel_size, 1)
    step = _pair("stride", stride, 1)
    pad = _pair("padding", padding, 0)
    sizes = image_sizes(_OP, "tokens", tokens, grid_size)
    for axis, size in (("height", sizes[2]), ("width", sizes[3])):
        index = 0 if axis == "height" else 1
        if size + 2 * pad[index] < kernel[index]:
            raise ValueError(f"{_OP}: a window of {kernel[index]} with padding {pad[index]} does not fit the "
                             f"input {axis} {size}")
    return sizes, kernel, step, pad


def restructurize_unfold(tokens, grid_size, kernel_size, stride, padding, backend=None):
    """Tokens -> image -> ``F.unfold`` -> (B, L, C*kh*kw), fused into one gather.

    Args:
        tokens: (B, H*W, C) tokens with ``grid_size=(H, W)``, or an NCHW image (B, C, H, W) with
            ``grid_size=None``. float32, float16, bfloat16 or float64; may be non-contiguous.
        grid_size: (H, W) of the token grid (row-major), or None for an image.
        kernel_size, stride, padding: int or (h, w) pair, as ``nn.Unfold`` (zero padding, dilation 1).
        backend: None/'auto', 'cpp' (CPU), 'cuda' (CUDA) or 'torch' (see :mod:`t2t_fast.backend`).

    Returns:
        (B, L, C*kh*kw) contiguous, in the input's dtype: L = OH*OW windows row-major over the output grid,
        feature index c*kh*kw + ki*kw + kj (the order of ``F.unfold``).
    """
    sizes, kernel, step, pad = _validate(tokens, grid_size, kernel_size, stride, padding)
    chosen = select_backend(_OP, tokens.device, ("cpp", "cuda", "torch"), backend)
    if chosen == "torch":
        return restructurize_unfold_ref(tokens, grid_size, kernel, step, pad)
    grid_h, grid_w = sizes[2:] if grid_size is not None else (0, 0)
    return _fwd_op(tokens, grid_h, grid_w, [*kernel, *step, *pad])


# ---------------------------------------------------------------------------------- native launches

def _geometry(x, grid_h, grid_w, window):
    """Sizes (B, C, H, W), (kernel, stride, padding) pairs, output grid, and x's element strides as (B, C, H, W)."""
    kh, kw, sh, sw, ph, pw = window
    sizes, strides = split_geometry(x, grid_h, grid_w)
    out_grid = (split_output_size(sizes[2], kh, sh, ph), split_output_size(sizes[3], kw, sw, pw))
    return sizes, ((kh, kw), (sh, sw), (ph, pw)), out_grid, strides


def _contiguous_strides(shape, grid_h, grid_w):
    """Element strides as (B, C, H, W) of a contiguous tensor of ``shape`` (tokens or image)."""
    if len(shape) == 3:
        _, tokens, channels = shape
        return (tokens * channels, 1, grid_w * channels, channels)
    _, channels, height, width = shape
    return (channels * height * width, height * width, width, 1)


def _device_guard(x):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def restructurize_unfold_fwd(x, grid_h, grid_w, window):
    """Launch the native forward: (B, L, C*kh*kw) from tokens or an image (any strides)."""
    sizes, pairs, (out_h, out_w), strides = _geometry(x, grid_h, grid_w, window)
    batch, channels = sizes[:2]
    y = new_output((batch, out_h * out_w, channels * pairs[0][0] * pairs[0][1]), x.dtype, x.device)
    if y.numel() == 0:
        return y
    module = native_module()
    if x.is_cuda:
        with _device_guard(x):
            module.restructurize_unfold_forward_cuda(x.data_ptr(), y.data_ptr(), sizes, *pairs, strides,
                                                     _DTYPE_CODES[x.dtype], x.device.index,
                                                     torch.cuda.current_stream(x.device).cuda_stream)
    else:
        module.restructurize_unfold_forward_cpu(x.data_ptr(), y.data_ptr(), sizes, *pairs, strides,
                                                _DTYPE_CODES[x.dtype], torch.get_num_threads())
    return y


def restructurize_unfold_bwd(dy, input_shape, grid_h, grid_w, window):
    """Launch the native backward: dx of ``input_shape`` (contiguous) from dy (B, L, C*kh*kw)."""
    dy = dy.contiguous()
    dx = new_output(tuple(input_shape), dy.dtype, dy.device)
    if dx.numel() == 0:
        return dx
    sizes, pairs, _, _ = _geometry(dx, grid_h, grid_w, window)
    strides = _contiguous_strides(tuple(input_shape), grid_h, grid_w)
    channels_last = len(input_shape) == 3
    module = native_module()
    if dy.is_cuda:
        with _device_guard(dy):
            module.restructurize_unfold_backward_cuda(dy.data_ptr(), dx.data_ptr(), sizes, *pairs, strides,
                                                      channels_last, _DTYPE_CODES[dy.dtype], dy.device.index,
                                                      torch.cuda.current_stream(dy.device).cuda_stream)
    else:
        module.restructurize_unfold_backward_cpu(dy.data_ptr(), dx.data_ptr(), sizes, *pairs, strides,
                                                 _DTYPE_CODES[dy.dtype], torch.get_num_threads())
    return dx


@torch.library.custom_op("t2t_fast::restructurize_unfold_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, grid_h: int, grid_w: int, window: list[int]) -> torch.Tensor:
    return restructurize_unfold_fwd(x, grid_h, grid_w, window)


@_fwd_op.register_fake
def _(x, grid_h, grid_w, window):
    sizes, pairs, (out_h, out_w), _ = _geometry(x, grid_h, grid_w, window)
    return x.new_empty((sizes[0], out_h * out_w, sizes[1] * pairs[0][0] * pairs[0][1]))


@torch.library.custom_op("t2t_fast::restructurize_unfold_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, input_shape: list[int], grid_h: int, grid_w: int, window: list[int]) -> torch.Tensor:
    return restructurize_unfold_bwd(dy, input_shape, grid_h, grid_w, window)


@_bwd_op.register_fake
def _(dy, input_shape, grid_h, grid_w, window):
    return dy.new_empty(tuple(input_shape))


def _setup_context(ctx, inputs, output):
    x, grid_h, grid_w, window = inputs
    ctx.geometry = (list(x.shape), grid_h, grid_w, list(window))


def _backward(ctx, dy):
    return _bwd_op(dy, *ctx.geometry), None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
