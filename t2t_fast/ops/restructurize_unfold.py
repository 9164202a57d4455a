"""Re-structurize + unfold: tokens (B, H*W, C) straight to unfolded windows (B, L, C*k*k), in one gather.

The T2T module turns tokens back into an image (``transpose`` + ``reshape`` to (B, C, H, W)) and soft-splits it
again with ``nn.Unfold``. Eager PyTorch does that with a transposed copy, an im2col per image and another
transposed copy; ``restructurize_unfold`` reads the tokens in place and writes the final layout once.

``restructurize_unfold_ref`` is the plain-torch oracle. The ``cpp`` / ``cuda`` paths are the
``t2t_fast::restructurize_unfold_fwd`` / ``_bwd`` custom ops (fake and autograd registered) over the native
extension ``t2t_fast._C``. Both custom ops are public, so they check their arguments exactly as
``restructurize_unfold`` does (one validation, shapes only: no host sync) before any kernel runs; the extension
itself also checks the geometry's reach against the element counts of the buffers it is given. The CUDA
forward of token input stages tiles of the output in shared memory so that its loads run along the channels.
The backward has no atomics and is deterministic: each dx element sums the window
taps that read it, in (oh, ow) order (CUDA: tiles of dx whose windows are staged in shared memory with loads
along dy's rows, then a thread per (pixel, channel); CPU: a thread per pixel row of token input, or per (b, c)
plane of an image, adding its windows in that order), so both give the same bits. The CPU kernels run on
``torch.get_num_threads()`` threads of torch's own OpenMP runtime (the extension links the same
``libgomp.so.1``, so no second thread team competes with torch's). The ``torch`` path is the reference
itself (plain torch ops, traceable by ONNX export and ``torch.export``).
"""
from typing import Tuple

import torch
import torch.nn.functional as F

from t2t_fast._native import native_module
from t2t_fast.backend import cpu_isa, select_backend, unavailable_reason
from t2t_fast.geometry import split_output_size
from t2t_fast.ops._common import (DTYPE_CODES, as_image, backend_cannot_take, check_float_tensor, device_guard,
                                   direct_calls_allowed, image_sizes, is_int, new_output, split_geometry,
                                   storage_extent)

_OP = "restructurize_unfold"
# The native kernels index in int64 and add a few such offsets: sizes stay well below that.
_MAX_ELEMENTS = 2**62


def _pair(name, value, least):
    """An int or an (h, w) pair of ints, each >= ``least`` -> (h, w)."""
    pair = (value, value) if is_int(value) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(is_int(v) for v in pair):
        raise TypeError(f"{_OP}: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < least:
        raise ValueError(f"{_OP}: {name} must be >= {least}, got {value!r}")
    if max(pair) >= _MAX_ELEMENTS:
        raise ValueError(f"{_OP}: {name} must be < 2**62, got {value!r}")
    return tuple(int(v) for v in pair)


def restructurize_unfold_ref(tokens: torch.Tensor, grid_size: Tuple[int, int], kernel_size: int, stride: int,
                             padding: int) -> torch.Tensor:
    """Reference: ``transpose`` + ``reshape`` to NCHW, ``F.unfold``, ``transpose(1, 2)``, ``contiguous``.

    Args and return value as :func:`restructurize_unfold`.
    """
    unfolded = F.unfold(as_image(tokens, grid_size), kernel_size, padding=padding, stride=stride)
    return unfolded.transpose(1, 2).contiguous()


def _validate(tokens, grid_size, kernel_size, stride, padding, name="tokens"):
    """Check the arguments of the op and of its custom ops (through :func:`_window_arguments`), before any
    kernel runs and without reading tensor data. Returns ((B, C, H, W), kernel, stride, padding, (OH, OW)) with
    (h, w) pairs."""
    check_float_tensor(name, tokens, _OP)
    kernel = _pair("kernel_size", kernel_size, 1)
    step = _pair("stride", stride, 1)
    pad = _pair("padding", padding, 0)
    sizes = image_sizes(_OP, name, tokens, grid_size)
    if 0 in sizes[2:]:
        raise ValueError(f"{_OP}: {name} is an empty image ({sizes[2]}x{sizes[3]}); height and width must be >= 1")
    for index, axis in enumerate(("height", "width")):
        size = sizes[2 + index]
        if size + 2 * pad[index] < kernel[index]:
            raise ValueError(f"{_OP}: a window of {kernel[index]} with padding {pad[index]} does not fit the "
                             f"input {axis} {size}")
    out_grid = tuple(split_output_size(sizes[2 + i], kernel[i], step[i], pad[i]) for i in range(2))
    if sizes[0] * out_grid[0] * out_grid[1] * sizes[1] * kernel[0] * kernel[1] >= _MAX_ELEMENTS:
        raise ValueError(f"{_OP}: the output of {sizes} with window {kernel} would have 2**62 elements or more")
    return sizes, kernel, step, pad, out_grid


def _window_arguments(x, grid_h, grid_w, window, name="tokens"):
    """:func:`_validate` for the custom ops' arguments: ``grid_h``, ``grid_w`` (both 0 for an image) and
    ``window`` = [kh, kw, sh, sw, ph, pw]."""
    if not isinstance(window, (list, tuple)) or len(window) != 6 or not all(is_int(v) for v in window):
        raise TypeError(f"{_OP}: window must be 6 ints [kh, kw, sh, sw, ph, pw], got {window!r}")
    if not (is_int(grid_h) and is_int(grid_w)):
        raise TypeError(f"{_OP}: grid_h and grid_w must be ints, got {grid_h!r}, {grid_w!r}")
    image = isinstance(x, torch.Tensor) and x.dim() == 4 and grid_h == 0 and grid_w == 0
    return _validate(x, None if image else (grid_h, grid_w), window[0:2], window[2:4], window[4:6], name)


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
    _, kernel, step, pad, _ = _validate(tokens, grid_size, kernel_size, stride, padding)
    chosen = select_backend(_OP, tokens.device, ("cpp", "cuda", "torch"), backend)
    if chosen == "torch":
        return restructurize_unfold_ref(tokens, grid_size, kernel, step, pad)
    grid_h, grid_w = grid_size if grid_size is not None else (0, 0)
    window = [*kernel, *step, *pad]
    if direct_calls_allowed(tokens) and not (torch.is_grad_enabled() and tokens.requires_grad):
        return restructurize_unfold_fwd(tokens, grid_h, grid_w, window)  # nothing to record: no dispatcher needed
    return _fwd_op(tokens, grid_h, grid_w, window)


# ---------------------------------------------------------------------------------- native launches

def _contiguous_strides(shape, grid_h, grid_w):
    """Element strides as (B, C, H, W) of a contiguous tensor of ``shape`` (tokens or image)."""
    if len(shape) == 3:
        _, tokens, channels = shape
        return (tokens * channels, 1, grid_w * channels, channels)
    _, channels, height, width = shape
    return (channels * height * width, height * width, width, 1)


def _native_launch(tensor, cuda_name, cpu_name):
    """The extension's entry point for ``tensor``'s device, and the arguments that follow the geometry's; a
    device the extension cannot run raises :class:`~t2t_fast.backend.BackendUnavailableError`."""
    backend = "cuda" if tensor.is_cuda else "cpp"
    reason = unavailable_reason(backend, tensor.device.type)
    if reason is not None:
        backend_cannot_take(_OP, backend, reason)
    module = native_module()
    if tensor.is_cuda:
        stream = torch.cuda.current_stream(tensor.device).cuda_stream
        return getattr(module, cuda_name), (tensor.device.index, stream)
    return getattr(module, cpu_name), (torch.get_num_threads(),)


def square_window(kernel_size, stride, padding):
    """The ``window`` argument of :func:`restructurize_unfold_fwd` / :func:`restructurize_unfold_bwd` for a square
    window (a T2T soft split's)."""
    return [kernel_size, kernel_size, stride, stride, padding, padding]


def restructurize_unfold_fwd(x, grid_h, grid_w, window):
    """Launch the native forward: (B, L, C*kh*kw) from tokens (B, H*W, C) on a ``grid_h`` x ``grid_w`` grid
    or an image (B, C, H, W) with ``grid_h = grid_w = 0`` (any strides); ``window`` = [kh, kw, sh, sw, ph, pw].
    Arguments are checked as :func:`restructurize_unfold` checks its own."""
    sizes, kernel, step, pad, (out_h, out_w) = _window_arguments(x, grid_h, grid_w, window)
    y = new_output((sizes[0], out_h * out_w, sizes[1] * kernel[0] * kernel[1]), x.dtype, x.device)
    if y.numel() == 0:
        return y
    launch, extra = _native_launch(x, "restructurize_unfold_forward_cuda", "restructurize_unfold_forward_cpu")
    extra = extra if x.is_cuda else (*extra, cpu_isa())
    _, strides = split_geometry(x, grid_h, grid_w)
    with device_guard(x):
        launch(x.data_ptr(), storage_extent(x), y.data_ptr(), storage_extent(y), sizes, kernel, step, pad, strides,
               DTYPE_CODES[x.dtype], *extra)
    return y


def _backward_arguments(dy, input_shape, grid_h, grid_w, window):
    """Check the backward's arguments: :func:`_window_arguments` for an input of ``input_shape`` and dy's
    dtype, and dy's shape (B, L, C*kh*kw) against it. Returns what :func:`_validate` returns."""
    check_float_tensor("dy", dy, _OP)
    # (symbolic sizes while tracing with dynamic shapes)
    if (not isinstance(input_shape, (list, tuple)) or len(input_shape) not in (3, 4)
            or not all((is_int(v) or isinstance(v, torch.SymInt)) and 0 <= v < _MAX_ELEMENTS for v in input_shape)):
        raise ValueError(f"{_OP}: input_shape must be 3 (tokens) or 4 (image) non-negative ints, got "
                         f"{input_shape!r}")
    shape = tuple(input_shape)
    geometry = _window_arguments(torch.empty(shape, dtype=dy.dtype, device="meta"), grid_h, grid_w, window,
                                 name="input_shape")
    (batch, channels, _, _), kernel, _, _, (out_h, out_w) = geometry
    expected = (batch, out_h * out_w, channels * kernel[0] * kernel[1])
    if tuple(dy.shape) != expected:
        raise ValueError(f"{_OP}: dy has shape {tuple(dy.shape)}; input_shape {list(shape)} with window "
                         f"{list(window)} gives {expected}")
    return geometry


def restructurize_unfold_bwd(dy, input_shape, grid_h, grid_w, window):
    """Launch the native backward: dx of ``input_shape`` (contiguous, dy's dtype) from dy (B, L, C*kh*kw).
    Arguments as :func:`restructurize_unfold_fwd`'s, checked likewise."""
    sizes, kernel, step, pad, _ = _backward_arguments(dy, input_shape, grid_h, grid_w, window)
    dx = new_output(tuple(input_shape), dy.dtype, dy.device)
    if dx.numel() == 0:
        return dx
    dy = dy.contiguous()
    launch, extra = _native_launch(dy, "restructurize_unfold_backward_cuda", "restructurize_unfold_backward_cpu")
    with device_guard(dy):
        launch(dy.data_ptr(), storage_extent(dy), dx.data_ptr(), storage_extent(dx), sizes, kernel, step, pad,
               _contiguous_strides(tuple(input_shape), grid_h, grid_w), DTYPE_CODES[dy.dtype], *extra)
    return dx


@torch.library.custom_op("t2t_fast::restructurize_unfold_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, grid_h: int, grid_w: int, window: list[int]) -> torch.Tensor:
    return restructurize_unfold_fwd(x, grid_h, grid_w, window)


@_fwd_op.register_fake
def _(x, grid_h, grid_w, window):
    (batch, channels, _, _), kernel, _, _, (out_h, out_w) = _window_arguments(x, grid_h, grid_w, window)
    return x.new_empty((batch, out_h * out_w, channels * kernel[0] * kernel[1]))


@torch.library.custom_op("t2t_fast::restructurize_unfold_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, input_shape: list[int], grid_h: int, grid_w: int, window: list[int]) -> torch.Tensor:
    return restructurize_unfold_bwd(dy, input_shape, grid_h, grid_w, window)


@_bwd_op.register_fake
def _(dy, input_shape, grid_h, grid_w, window):
    _backward_arguments(dy, input_shape, grid_h, grid_w, window)
    return dy.new_empty(tuple(input_shape))


def _setup_context(ctx, inputs, output):
    x, grid_h, grid_w, window = inputs
    ctx.geometry = (list(x.shape), grid_h, grid_w, list(window))


def _backward(ctx, dy):
    return _bwd_op(dy, *ctx.geometry), None, None, None


def _setup_bwd_context(ctx, inputs, output):
    _, _, grid_h, grid_w, window = inputs
    ctx.geometry = (grid_h, grid_w, window)


def _backward_of_backward(ctx, ddx):
    """The backward is linear in ``dy`` (a fold): its derivative is the forward (double backward)."""
    return _fwd_op(ddx, *ctx.geometry), None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_bwd_op.register_autograd(_backward_of_backward, setup_context=_setup_bwd_context)
