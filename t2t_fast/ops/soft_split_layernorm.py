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
import contextlib

import torch
import torch.nn.functional as F

from t2t_fast._config import split_output_size
from t2t_fast.backend import requested_backend, select_backend
from t2t_fast.ops._common import (as_image, check_float_tensor, compute_dtype, image_sizes, is_int,
                                   new_output, split_geometry)
from t2t_fast.ops.restructurize_unfold import restructurize_unfold_bwd, restructurize_unfold_fwd

_OP = "soft_split_layernorm"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2**31


def soft_split_layernorm_ref(x, kernel_size, stride, padding, weight, bias, eps=1e-5, grid_size=None):
    """Reference: (tokens -> NCHW) -> ``F.unfold`` -> ``transpose(1, 2)`` -> ``F.layer_norm``.

    Args:
        x: an NCHW image (B, C, H, W), or tokens (B, H*W, C) together with ``grid_size=(H, W)``.
        kernel_size, stride, padding: of the square unfold window.
        weight, bias: LayerNorm affine parameters, shape (C*k*k,).
        eps: LayerNorm epsilon.
        grid_size: (H, W) of the token grid; only for token input.

    Returns:
        (B, L, C*k*k) with L the number of windows (row-major over the output grid). fp16/bf16 rows with
        float32 parameters are normalised in float32 and rounded once to x's dtype, on every device: torch's
        CPU LayerNorm does that for such mixed dtypes, its CUDA kernel refuses them.
    """
    unfolded = F.unfold(as_image(x, grid_size), kernel_size, padding=padding, stride=stride).transpose(1, 2)
    shape = (unfolded.shape[-1],)
    stats = compute_dtype(unfolded.dtype)
    if stats != unfolded.dtype and stats in (weight.dtype, bias.dtype):  # fp16/bf16 rows, fp32 parameters
        return F.layer_norm(unfolded.to(stats), shape, weight.to(stats), bias.to(stats), eps).to(unfolded.dtype)
    return F.layer_norm(unfolded, shape, weight, bias, eps)


def _validate(x, kernel_size, stride, padding, weight, bias, eps, grid_size):
    """Check the arguments of :func:`soft_split_layernorm`; returns (C, H, W, OH, OW)."""
    check_float_tensor("x", x, _OP)
    check_float_tensor("weight", weight, _OP)
    check_float_tensor("bias", bias, _OP)
    for name, value, least in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if not is_int(value):
            raise TypeError(f"{_OP}: {name} must be an int, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{_OP}: {name} must be >= {least}, got {value}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < float("inf"):
        raise ValueError(f"{_OP}: eps must be a finite number >= 0, got {eps!r}")
    _, channels, height, width = image_sizes(_OP, "x", x, grid_size)
    out_h = split_output_size(height, kernel_size, stride, padding)
    out_w = split_output_size(width, kernel_size, stride, padding)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"{_OP}: a {kernel_size}x{kernel_size} window with padding {padding} does not fit the "
                         f"{height}x{width} input")
    features = channels * kernel_size * kernel_size
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tuple(tensor.shape) != (features,):
            raise ValueError(f"{_OP}: {name} must have shape ({features},) = C*k*k, got {tuple(tensor.shape)}")
        if tensor.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{_OP}: {name} has dtype {tensor.dtype}; expected float32 or x's dtype {x.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {tensor.device} but x is on {x.device}")
    return channels, height, width, out_h, out_w


def _triton_unsupported(x, features):
    """Why the Triton kernels cannot take this input, or None."""
    from t2t_fast.kernels.soft_split_layernorm import MAX_FEATURES

    if x.dtype not in _TRITON_DTYPES:
        return f"dtype {x.dtype} (the Triton kernels take float32, float16 and bfloat16)"
    if features > MAX_FEATURES:
        return f"C*k*k = {features} features (the Triton kernels hold a row in registers, at most {MAX_FEATURES})"
    span = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride())) + 1
    if x.numel() >= _INT32_LIMIT or span >= _INT32_LIMIT:
        return "inputs spanning 2**31 or more elements (the Triton kernels index the input with int32)"
    return None


def soft_split_layernorm(x, kernel_size, stride, padding, weight, bias, eps=1e-5, grid_size=None, backend=None):
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

    Returns:
        (B, L, C*k*k) in x's dtype, L = OH*OW windows row-major, feature order (c, ki, kj) as ``F.unfold``.
        Statistics are computed in float32 (float64 for float64 x); backward keeps only x and the per-row
        mean and rstd, and recomputes the unfolded rows.
    """
    channels, height, width, _, _ = _validate(x, kernel_size, stride, padding, weight, bias, eps, grid_size)
    chosen = select_backend(_OP, x.device, ("triton", "cuda", "cpp", "torch"), backend)
    if chosen == "triton":
        reason = _triton_unsupported(x, channels * kernel_size * kernel_size)
        if reason is not None:
            if requested_backend(backend) != "auto":
                raise ValueError(f"{_OP}: backend 'triton' does not support {reason}")
            chosen = "torch"
    if chosen == "torch":
        return soft_split_layernorm_ref(x, kernel_size, stride, padding, weight, bias, eps, grid_size)
    grid_h, grid_w = (height, width) if x.dim() == 3 else (0, 0)
    return _fwd_op(x, weight, bias, int(kernel_size), int(stride), int(padding), float(eps), int(grid_h),
                   int(grid_w), chosen != "triton")[0]


def _geometry(x, kernel_size, stride, padding, grid_h, grid_w):
    """Sizes and element strides (b, c, h, w) of the input, for NCHW images and (B, H*W, C) tokens alike."""
    (batch, channels, height, width), strides = split_geometry(x, grid_h, grid_w)
    out_h = split_output_size(height, kernel_size, stride, padding)
    out_w = split_output_size(width, kernel_size, stride, padding)
    return batch, channels, height, width, out_h, out_w, strides


def _cdiv(a, b):
    return (a + b - 1) // b


def _device_guard(x):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _persistent_programs(device):
    """Program count of the persistent backward row kernel (a few per SM; small under the interpreter).

    dweight/dbias are summed from one partial per program in a fixed order: bit-reproducible on one GPU
    model, but GPUs with another SM count round differently."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def soft_split_layernorm_fwd(x, weight, bias, kernel_size, stride, padding, eps, grid_h, grid_w):
    """Launch the forward kernel: returns y (B, L, F) in x's dtype and the fp32 row mean and rstd (B*L,)."""
    from t2t_fast.kernels.soft_split_layernorm import NUM_STAGES, _fwd_kernel, row_config

    batch, channels, height, width, out_h, out_w, strides = _geometry(x, kernel_size, stride, padding,
                                                                      grid_h, grid_w)
    features = channels * kernel_size * kernel_size
    rows = batch * out_h * out_w
    y = new_output((batch, out_h * out_w, features), x.dtype, x.device)
    mean = new_output((rows,), torch.float32, x.device)
    rstd = new_output((rows,), torch.float32, x.device)
    if rows == 0:
        return y, mean, rstd
    block_m, block_f, num_warps = row_config(features)
    with _device_guard(x):
        _fwd_kernel[(_cdiv(rows, block_m),)](
            x, weight.float().contiguous(), bias.float().contiguous(), y, mean, rstd,
            rows, out_h * out_w, out_w, height, width, features, kernel_size, stride, padding, *strides, eps,
            BLOCK_M=block_m, BLOCK_F=block_f, num_warps=num_warps, num_stages=NUM_STAGES)
    return y, mean, rstd


def soft_split_layernorm_bwd(dy, x, weight, mean, rstd, kernel_size, stride, padding, grid_h, grid_w, input_grad):
    """Launch the backward kernels: returns dx (x's shape, contiguous; empty without ``input_grad``), dweight
    and dbias (fp32)."""
    from t2t_fast.kernels.soft_split_layernorm import (DX_BLOCK, NUM_STAGES, NUM_WARPS, PARTIALS_BLOCK_G,
                                                       PARTIALS_BLOCK_N, _bwd_dx_kernel, _bwd_rows_kernel,
                                                       _sum_partials_kernel, row_config)

    batch, channels, height, width, out_h, out_w, strides = _geometry(x, kernel_size, stride, padding,
                                                                      grid_h, grid_w)
    features = channels * kernel_size * kernel_size
    rows = batch * out_h * out_w
    dy = dy.contiguous()
    w = weight.float().contiguous()
    block_m, block_f, num_warps = row_config(features)
    programs = min(_cdiv(rows, block_m), _persistent_programs(x.device))
    c1 = new_output((rows,), torch.float32, x.device)
    c2 = new_output((rows,), torch.float32, x.device)
    partials = new_output((programs, 2 * features), torch.float32, x.device)
    dweight = new_output((features,), torch.float32, x.device)
    dbias = new_output((features,), torch.float32, x.device)
    dx = new_output(tuple(x.shape) if input_grad else (0,), x.dtype, x.device)
    geometry = (out_h * out_w, out_w, height, width, features, kernel_size, stride, padding, *strides)
    with _device_guard(x):
        if programs > 0:
            _bwd_rows_kernel[(programs,)](
                x, w, dy, mean, rstd, c1, c2, partials, rows, *geometry,
                BLOCK_M=block_m, BLOCK_F=block_f, num_warps=num_warps, num_stages=NUM_STAGES)
        _sum_partials_kernel[(_cdiv(2 * features, PARTIALS_BLOCK_N),)](
            partials, dweight, dbias, programs, features, BLOCK_G=PARTIALS_BLOCK_G, BLOCK_N=PARTIALS_BLOCK_N,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        if input_grad and x.numel() > 0:
            _bwd_dx_kernel[(_cdiv(x.numel(), DX_BLOCK),)](
                x, w, dy, mean, rstd, c1, c2, dx, x.numel(), channels, height, width, out_h * out_w, out_h, out_w,
                features, kernel_size, stride, padding, *strides,
                CHANNELS_LAST=x.dim() == 3, BLOCK=DX_BLOCK, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return dx, dweight, dbias


def _native_window(kernel_size, stride, padding):
    return [kernel_size, kernel_size, stride, stride, padding, padding]


def soft_split_layernorm_native_fwd(x, weight, bias, kernel_size, stride, padding, eps, grid_h, grid_w):
    """The native gather (CPU / CUDA extension) then torch's LayerNorm in the statistics dtype: returns y
    (B, L, F) in x's dtype and the row mean and rstd (B*L,)."""
    stats = compute_dtype(x.dtype)
    unfolded = restructurize_unfold_fwd(x, grid_h, grid_w, _native_window(kernel_size, stride, padding))
    y, mean, rstd = torch.native_layer_norm(unfolded.to(stats), (unfolded.shape[-1],), weight.to(stats),
                                            bias.to(stats), eps)
    return y.to(x.dtype), mean.reshape(-1), rstd.reshape(-1)


def soft_split_layernorm_native_bwd(dy, x, weight, mean, rstd, kernel_size, stride, padding, grid_h, grid_w,
                                   input_grad):
    """Backward of :func:`soft_split_layernorm_native_fwd`: the rows are gathered again, torch's LayerNorm
    backward gives their gradient, and the native gather backward sums it into dx (x's shape, contiguous).
    Without ``input_grad`` only dweight and dbias are computed (dx is empty)."""
    stats = compute_dtype(x.dtype)
    window = _native_window(kernel_size, stride, padding)
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
            padding: int, eps: float, grid_h: int, grid_w: int,
            native: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    forward = soft_split_layernorm_native_fwd if native else soft_split_layernorm_fwd
    return forward(x, weight, bias, kernel_size, stride, padding, eps, grid_h, grid_w)


@_fwd_op.register_fake
def _(x, weight, bias, kernel_size, stride, padding, eps, grid_h, grid_w, native):
    batch, channels, _, _, out_h, out_w, _ = _geometry(x, kernel_size, stride, padding, grid_h, grid_w)
    rows = batch * out_h * out_w
    y = x.new_empty((batch, out_h * out_w, channels * kernel_size * kernel_size))
    stats = compute_dtype(x.dtype)
    return y, x.new_empty((rows,), dtype=stats), x.new_empty((rows,), dtype=stats)


@torch.library.custom_op("t2t_fast::soft_split_layernorm_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
            kernel_size: int, stride: int, padding: int, grid_h: int, grid_w: int, native: bool,
            input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backward = soft_split_layernorm_native_bwd if native else soft_split_layernorm_bwd
    return backward(dy, x, weight, mean, rstd, kernel_size, stride, padding, grid_h, grid_w, input_grad)


@_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, kernel_size, stride, padding, grid_h, grid_w, native, input_grad):
    features = weight.shape[0]
    stats = compute_dtype(x.dtype)
    dx = x.new_empty(x.shape if input_grad else (0,))
    return dx, x.new_empty((features,), dtype=stats), x.new_empty((features,), dtype=stats)


def _setup_context(ctx, inputs, output):
    x, weight, bias, kernel_size, stride, padding, _, grid_h, grid_w, native = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.geometry = (kernel_size, stride, padding, grid_h, grid_w, native)
    ctx.param_dtypes = (weight.dtype, bias.dtype)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    # The first split reads the image, which needs no gradient: then dx is skipped (the rows' LayerNorm
    # gradient and its scatter back into the image).
    input_grad = ctx.needs_input_grad[0]
    dx, dw, db = _bwd_op(dy, x, weight, mean, rstd, *ctx.geometry, input_grad)
    weight_dtype, bias_dtype = ctx.param_dtypes
    return dx if input_grad else None, dw.to(weight_dtype), db.to(bias_dtype), None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
