"""Soft split (unfold) fused with the LayerNorm that follows it in every T2T layer.

``soft_split_layernorm`` computes ``F.layer_norm(unfold(x))`` without keeping the unfolded tensor;
``soft_split_layernorm_ref`` is the plain-torch oracle it must reproduce. The ``triton``, ``cpp`` and
``cuda`` paths are the ``t2t_fast::soft_split_layernorm_fwd`` / ``_bwd`` custom ops (fake and autograd
registered), so ``torch.compile(fullgraph=True)`` sees one opaque node per direction, and backward keeps only
x and the per-row mean and rstd whichever implementation runs:

* ``triton``: the fused kernels (the unfolded rows live in registers only);
* ``cpp`` / ``cuda`` (``native``): the native re-structurize + unfold gather, then torch's LayerNorm in
  float32 (float64 for float64 input); backward gathers the rows again, runs torch's LayerNorm backward and
  the native gather backward.

The ``torch`` path is the reference itself (plain torch ops, traceable by ONNX export and ``torch.export``).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from t2t_fast._native import native_module
from t2t_fast.backend import cpu_isa, requested_backend, select_backend
from t2t_fast.geometry import split_output_size
from t2t_fast.ops._common import (CPU_KERNEL_DTYPES, DTYPE_CODES, FLOAT_DTYPES, as_image, backend_cannot_take,
                                  check_float_tensor, compute_dtype, differentiable_backward, direct_calls_allowed,
                                  image_sizes, is_int, new_output, split_geometry, storage_extent)
from t2t_fast.ops.restructurize_unfold import restructurize_unfold_bwd, restructurize_unfold_fwd, square_window

_OP = "soft_split_layernorm"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def soft_split_layernorm_ref(x: torch.Tensor, kernel_size: int, stride: int, padding: int, weight: torch.Tensor,
                             bias: torch.Tensor, eps: float = 1e-5, grid_size: Optional[Tuple[int, int]] = None,
                             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Reference: (tokens -> NCHW) -> ``F.unfold`` -> ``transpose(1, 2)`` -> ``F.layer_norm``.

    Args:
        x: an NCHW image (B, C, H, W), or tokens (B, H*W, C) together with ``grid_size=(H, W)``.
        kernel_size, stride, padding: of the square unfold window.
        weight, bias: LayerNorm affine parameters, shape (C*k*k,).
        eps: LayerNorm epsilon.
        grid_size: (H, W) of the token grid; only for token input.
        out_dtype: dtype of the result (None: x's dtype).

    Returns:
        (B, L, C*k*k) with L the number of windows (row-major over the output grid). Parameters in another
        dtype than x, or another output dtype, normalise the rows in the statistics dtype (float32; float64
        for float64 x) and round once to the output dtype, on every device: torch's CPU LayerNorm does that
        for fp16/bf16 rows with float32 parameters, its CUDA kernel refuses them, and neither mixes float64
        rows with float32 parameters.
    """
    unfolded = F.unfold(as_image(x, grid_size), kernel_size, padding=padding, stride=stride).transpose(1, 2)
    shape = list(weight.shape)  # not the rows' size: a constant where an export records sizes as values
    result = unfolded.dtype if out_dtype is None else out_dtype
    if unfolded.dtype == weight.dtype and weight.dtype == bias.dtype and bias.dtype == result:
        return F.layer_norm(unfolded, shape, weight, bias, eps)
    stats = compute_dtype(unfolded.dtype)
    return F.layer_norm(unfolded.to(stats), shape, weight.to(stats), bias.to(stats), eps).to(result)


def _grid_size(x, grid_h, grid_w):
    """The wrapper's ``grid_size`` for the custom ops' (grid_h, grid_w): (0, 0) stands for an image."""
    return None if x.dim() != 3 and (grid_h, grid_w) == (0, 0) else (grid_h, grid_w)


def _validate(x, kernel_size, stride, padding, grid_size, **params):
    """Check the input, window and the LayerNorm parameter tensors ``params`` (name -> (C*k*k,) tensor in
    float32 or x's dtype, on x's device), from metadata only (no device sync). The one check of the wrapper
    and of the custom ops, so a wrong argument is a clear error before any kernel runs.

    Returns (B, C, H, W, OH, OW)."""
    check_float_tensor("x", x, _OP)
    for name, tensor in params.items():
        check_float_tensor(name, tensor, _OP)
    for name, value, least in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if not is_int(value):
            raise TypeError(f"{_OP}: {name} must be an int, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{_OP}: {name} must be >= {least}, got {value}")
    batch, channels, height, width = image_sizes(_OP, "x", x, grid_size)
    if height == 0 or width == 0:
        raise ValueError(f"{_OP}: x has an empty {height}x{width} image")
    out_h = split_output_size(height, kernel_size, stride, padding)
    out_w = split_output_size(width, kernel_size, stride, padding)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"{_OP}: a {kernel_size}x{kernel_size} window with padding {padding} does not fit the "
                         f"{height}x{width} input")
    features = channels * kernel_size * kernel_size
    for name, tensor in params.items():
        if tuple(tensor.shape) != (features,):
            raise ValueError(f"{_OP}: {name} must have shape ({features},) = C*k*k, got {tuple(tensor.shape)}")
        if tensor.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{_OP}: {name} has dtype {tensor.dtype}; expected float32 or x's dtype {x.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {tensor.device} but x is on {x.device}")
    return batch, channels, height, width, out_h, out_w


def _validate_forward(x, kernel_size, stride, padding, weight, bias, eps, grid_size, out_dtype):
    """:func:`_validate` plus eps and the output dtype; returns (B, C, H, W, OH, OW)."""
    sizes = _validate(x, kernel_size, stride, padding, grid_size, weight=weight, bias=bias)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < float("inf"):
        raise ValueError(f"{_OP}: eps must be a finite number >= 0, got {eps!r}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_OP}: out_dtype must be one of float32, float16, bfloat16, float64, got {out_dtype!r}")
    return sizes


def _validate_backward(dy, x, weight, mean, rstd, kernel_size, stride, padding, grid_size):
    """:func:`_validate` plus the output gradient and the saved row statistics."""
    batch, channels, _, _, out_h, out_w = _validate(x, kernel_size, stride, padding, grid_size, weight=weight)
    check_float_tensor("dy", dy, _OP)
    rows = batch * out_h * out_w
    expected = {"dy": (batch, out_h * out_w, channels * kernel_size * kernel_size), "mean": (rows,), "rstd": (rows,)}
    for name, tensor in (("dy", dy), ("mean", mean), ("rstd", rstd)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{_OP}: {name} must have shape {expected[name]}, got {tuple(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {tensor.device} but x is on {x.device}")
    stats = compute_dtype(x.dtype)
    for name, tensor in (("mean", mean), ("rstd", rstd)):
        if tensor.dtype != stats:
            raise TypeError(f"{_OP}: {name} has dtype {tensor.dtype}; expected {stats} (the forward's statistics)")


def _triton_unsupported(x, features, rows, *dtypes):
    """Why the Triton kernels cannot take this input (x, and the output or output-gradient ``dtypes``), or None."""
    from t2t_fast.kernels.soft_split_layernorm import INDEX_LIMIT, MAX_FEATURES

    for dtype in (x.dtype, *dtypes):
        if dtype not in _TRITON_DTYPES:
            return f"dtype {dtype} (the Triton kernels take float32, float16 and bfloat16)"
    if features > MAX_FEATURES:
        return f"C*k*k = {features} features (the Triton kernels hold a row in registers, at most {MAX_FEATURES})"
    span = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride())) + 1
    if max(x.numel(), span, rows) >= INDEX_LIMIT:
        return (f"inputs or outputs of {INDEX_LIMIT} or more elements or rows (the Triton kernels index them "
                f"with int32)")
    return None


def soft_split_layernorm(x, kernel_size, stride, padding, weight, bias, eps=1e-5, grid_size=None, backend=None,
                         out_dtype=None):
    """Soft split followed by LayerNorm: ``F.layer_norm(F.unfold(x).transpose(1, 2))``, fused.

    Args:
        x: an NCHW image (B, C, H, W) (the first split, e.g. k=7 s=4 p=2 on RGB: 147 features), or tokens
            (B, H*W, C) with ``grid_size=(H, W)`` (re-structurize + split, e.g. k=3 s=2 p=1, C=64: 576).
            May be non-contiguous.
        kernel_size, stride, padding: of the square unfold window (zero padding, which takes part in the
            LayerNorm statistics exactly as in the reference).
        weight, bias: LayerNorm affine parameters of shape (C*k*k,), in float32 or x's dtype.
        eps: LayerNorm epsilon.
        grid_size: (H, W) of the token grid; only for token input.
        backend: None/'auto', 'triton', 'cuda'/'cpp' (native gather + torch LayerNorm) or 'torch'
            (see :mod:`t2t_fast.backend`).
        out_dtype: dtype of the result, None for x's dtype. Under autocast pass the autocast dtype: a float32
            image is then normalised in float32 and written once at that precision (the Triton kernels write it
            directly), with no float32 copy of the rows. The input gradient keeps x's dtype.

    Returns:
        (B, L, C*k*k) in ``out_dtype``, L = OH*OW windows row-major, feature order (c, ki, kj) as ``F.unfold``.
        Statistics are computed in float32 (float64 for float64 x, whatever the parameters' dtype); backward
        keeps only x and the per-row mean and rstd, and recomputes the unfolded rows.
    """
    out_dtype = x.dtype if out_dtype is None and isinstance(x, torch.Tensor) else out_dtype
    batch, channels, height, width, out_h, out_w = _validate_forward(x, kernel_size, stride, padding, weight, bias,
                                                                     eps, grid_size, out_dtype)
    chosen = select_backend(_OP, x.device, ("triton", "cuda", "cpp", "torch"), backend)
    if chosen == "triton":
        reason = _triton_unsupported(x, channels * kernel_size * kernel_size, batch * out_h * out_w, out_dtype)
        if reason is not None:
            if requested_backend(backend) != "auto":
                backend_cannot_take(_OP, "triton", reason)
            chosen = "torch"
    if chosen == "torch":
        return soft_split_layernorm_ref(x, kernel_size, stride, padding, weight, bias, eps, grid_size, out_dtype)
    grid_h, grid_w = (height, width) if x.dim() == 3 else (0, 0)
    arguments = (x, weight, bias, int(kernel_size), int(stride), int(padding), float(eps), int(grid_h), int(grid_w),
                 out_dtype)
    if chosen != "triton" and direct_calls_allowed(x) and not (torch.is_grad_enabled() and any(
            t.requires_grad for t in (x, weight, bias))):
        return soft_split_layernorm_native_fwd(*arguments)[0]  # nothing to record: no dispatcher, no autograd
    return _fwd_op(*arguments, chosen != "triton")[0]


def soft_split_layernorm_native_fwd(x, weight, bias, kernel_size, stride, padding, eps, grid_h, grid_w, out_dtype):
    """The native forward: returns y (B, L, F) in ``out_dtype`` and the row mean and rstd (B*L,).

    CPU tensors in float32/bfloat16 (x and out_dtype): the fused C++ kernel (gather + LayerNorm per window
    row, vectorised with :func:`t2t_fast.backend.cpu_isa`). Otherwise (CUDA, float16, float64): the native
    gather, then torch's LayerNorm in the statistics dtype."""
    if x.device.type == "cpu" and x.dtype in CPU_KERNEL_DTYPES and out_dtype in CPU_KERNEL_DTYPES:
        return _fused_cpu_fwd(x, weight, bias, kernel_size, stride, padding, eps, grid_h, grid_w, out_dtype)
    stats = compute_dtype(x.dtype)
    unfolded = restructurize_unfold_fwd(x, grid_h, grid_w, square_window(kernel_size, stride, padding))
    y, mean, rstd = torch.native_layer_norm(unfolded.to(stats), (unfolded.shape[-1],), weight.to(stats),
                                            bias.to(stats), eps)
    return y.to(out_dtype), mean.reshape(-1), rstd.reshape(-1)


def _fused_cpu_fwd(x, weight, bias, kernel_size, stride, padding, eps, grid_h, grid_w, out_dtype):
    sizes, strides = split_geometry(x, grid_h, grid_w)
    batch, channels, height, width = sizes
    out_h = split_output_size(height, kernel_size, stride, padding)
    out_w = split_output_size(width, kernel_size, stride, padding)
    rows, features = batch * out_h * out_w, channels * kernel_size * kernel_size
    y = new_output((batch, out_h * out_w, features), out_dtype, x.device)
    mean, rstd = new_output((rows,), torch.float32, x.device), new_output((rows,), torch.float32, x.device)
    if rows == 0:
        return y, mean, rstd
    weight, bias = weight.float().contiguous(), bias.float().contiguous()
    native_module().soft_split_layernorm_forward_cpu(
        x.data_ptr(), storage_extent(x), sizes, (kernel_size,) * 2, (stride,) * 2, (padding,) * 2, strides,
        DTYPE_CODES[x.dtype], weight.data_ptr(), bias.data_ptr(), features, eps, y.data_ptr(), y.numel(),
        DTYPE_CODES[out_dtype], mean.data_ptr(), rstd.data_ptr(), rows, cpu_isa(), torch.get_num_threads())
    return y, mean, rstd


def soft_split_layernorm_native_bwd(dy, x, weight, mean, rstd, kernel_size, stride, padding, grid_h, grid_w,
                                   input_grad):
    """Backward of :func:`soft_split_layernorm_native_fwd`: the rows are gathered again, torch's LayerNorm
    backward gives their gradient, and the native gather backward sums it into dx (x's shape, contiguous).
    Without ``input_grad`` only dweight and dbias are computed (dx is empty)."""
    stats = compute_dtype(x.dtype)
    window = square_window(kernel_size, stride, padding)
    unfolded = restructurize_unfold_fwd(x, grid_h, grid_w, window).to(stats)
    row_shape = (*unfolded.shape[:-1], 1)
    weight = weight.to(stats)
    # the bias only tells the kernel dbias's shape and dtype: its values do not enter the backward
    drows, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
        dy.to(stats), unfolded, (unfolded.shape[-1],), mean.reshape(row_shape), rstd.reshape(row_shape),
        weight, torch.zeros_like(weight), [input_grad, True, True])
    if not input_grad:
        return x.new_empty((0,)), dweight, dbias
    dx = restructurize_unfold_bwd(drows, tuple(x.shape), grid_h, grid_w, window)
    return dx.to(x.dtype), dweight, dbias


@torch.library.custom_op("t2t_fast::soft_split_layernorm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel_size: int, stride: int,
            padding: int, eps: float, grid_h: int, grid_w: int, out_dtype: torch.dtype,
            native: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grid_size = _grid_size(x, grid_h, grid_w)
    batch, channels, _, _, out_h, out_w = _validate_forward(x, kernel_size, stride, padding, weight, bias, eps,
                                                            grid_size, out_dtype)
    if native:
        return soft_split_layernorm_native_fwd(x, weight, bias, kernel_size, stride, padding, eps, grid_h, grid_w,
                                               out_dtype)
    reason = _triton_unsupported(x, channels * kernel_size * kernel_size, batch * out_h * out_w, out_dtype)
    if reason is not None:
        backend_cannot_take(_OP, "triton", reason)
    from t2t_fast.kernels.soft_split_layernorm import forward

    return forward(x, weight, bias, kernel_size, stride, padding, eps, grid_h, grid_w, out_dtype)


@_fwd_op.register_fake
def _(x, weight, bias, kernel_size, stride, padding, eps, grid_h, grid_w, out_dtype, native):
    batch, channels, _, _, out_h, out_w = _validate_forward(x, kernel_size, stride, padding, weight, bias, eps,
                                                            _grid_size(x, grid_h, grid_w), out_dtype)
    rows = batch * out_h * out_w
    y = x.new_empty((batch, out_h * out_w, channels * kernel_size * kernel_size), dtype=out_dtype)
    stats = compute_dtype(x.dtype)
    return y, x.new_empty((rows,), dtype=stats), x.new_empty((rows,), dtype=stats)


@torch.library.custom_op("t2t_fast::soft_split_layernorm_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
            kernel_size: int, stride: int, padding: int, grid_h: int, grid_w: int, native: bool,
            input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _validate_backward(dy, x, weight, mean, rstd, kernel_size, stride, padding, _grid_size(x, grid_h, grid_w))
    if native:
        return soft_split_layernorm_native_bwd(dy, x, weight, mean, rstd, kernel_size, stride, padding, grid_h,
                                               grid_w, input_grad)
    reason = _triton_unsupported(x, weight.shape[0], mean.shape[0], dy.dtype)
    if reason is not None:
        backend_cannot_take(_OP, "triton", reason)
    from t2t_fast.kernels.soft_split_layernorm import backward

    return backward(dy, x, weight, mean, rstd, kernel_size, stride, padding, grid_h, grid_w, input_grad)


@_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, kernel_size, stride, padding, grid_h, grid_w, native, input_grad):
    _validate_backward(dy, x, weight, mean, rstd, kernel_size, stride, padding, _grid_size(x, grid_h, grid_w))
    features = weight.shape[0]
    stats = compute_dtype(x.dtype)
    dx = x.new_empty(x.shape if input_grad else (0,))
    return dx, x.new_empty((features,), dtype=stats), x.new_empty((features,), dtype=stats)


def _setup_context(ctx, inputs, output):
    x, weight, bias, kernel_size, stride, padding, eps, grid_h, grid_w, out_dtype, native = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.geometry = (kernel_size, stride, padding, grid_h, grid_w, native)
    ctx.param_dtypes = (weight.dtype, bias.dtype)
    ctx.eps, ctx.out_dtype = eps, out_dtype
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiated, through the reference
        kernel_size, stride, padding, grid_h, grid_w, _ = ctx.geometry
        grid_size = _grid_size(x, grid_h, grid_w)

        def reference(x, weight, bias):
            return soft_split_layernorm_ref(x, kernel_size, stride, padding, weight, bias, ctx.eps, grid_size,
                                            ctx.out_dtype)

        return (*differentiable_backward(reference, (x, weight, bias), ctx.needs_input_grad[:3], dy),
                None, None, None, None, None, None, None, None)
    # The first split reads the image, which needs no gradient: then dx is skipped (the rows' LayerNorm
    # gradient and its scatter back into the image).
    input_grad = ctx.needs_input_grad[0]
    dx, dw, db = _bwd_op(dy, x, weight, mean, rstd, *ctx.geometry, input_grad)
    weight_dtype, bias_dtype = ctx.param_dtypes
    return (dx if input_grad else None, dw.to(weight_dtype), db.to(bias_dtype), None, None, None, None, None, None,
            None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
