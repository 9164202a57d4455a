"""soft_split_layernorm: the fused Triton kernels and the native path (extension gather + torch LayerNorm,
recomputed in backward) against F.unfold -> F.layer_norm.

On CPU-only machines the Triton kernels run on CPU tensors in the Triton interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small: both T2T configurations (k7 s4 p2 on RGB: 147 features;
k3 s2 p1 on 64-channel tokens: 576 features) on small grids, plus odd geometries.
"""
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from t2t_fast.backend import BackendUnavailableError
from t2t_fast.kernels import soft_split_layernorm as kernels
from t2t_fast.ops import soft_split_layernorm, soft_split_layernorm_ref
from t2t_fast.ops._common import as_image
from t2t_fast.testing import (GEOMETRY_CHANGES, RELATIVE_TOLERANCE, assert_call_raised, assert_relative_close,
                              assert_within_reference_error, change_split_geometry, poison_outputs,
                              run_calls_in_subprocess)

# CUDA tensors where there is a GPU, else CPU tensors in the Triton interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
randn = functools.partial(torch.randn, device=DEVICE)
# The two paths behind the custom ops: the Triton kernels, and the native extension's gather.
FUSED_BACKENDS = ("triton", "cuda" if DEVICE == "cuda" else "cpp")

# (id, input maker, kernel, stride, padding, grid_size): inputs are fresh randn, float64 masters.
CASES = [
    ("image-k7s4p2-147-17x19", lambda: randn(2, 3, 17, 19), 7, 4, 2, None),
    ("image-k7s4p2-147-24x24", lambda: randn(1, 3, 24, 24), 7, 4, 2, None),
    ("tokens-k3s2p1-576-8x8", lambda: randn(2, 64, 64), 3, 2, 1, (8, 8)),
    ("tokens-k3s2p1-576-7x5", lambda: randn(1, 35, 64), 3, 2, 1, (7, 5)),
    # stride > kernel: pixels no window reads get a zero gradient
    ("image-k2s3p0-C5-uncovered", lambda: randn(2, 5, 7, 9), 2, 3, 0, None),
    # stride 1, three windows per axis read each pixel
    ("tokens-k3s1p2-C6-overlap", lambda: randn(1, 20, 6), 3, 1, 2, (5, 4)),
    # windows entirely inside the padding: all-zero rows (variance 0)
    ("image-k2s2p3-C3-padded", lambda: randn(1, 3, 3, 4), 2, 2, 3, None),
    # non-contiguous inputs: a channels-last image and tokens that are a transposed (B, C, N) tensor
    ("image-channels-last", lambda: randn(2, 9, 11, 3).permute(0, 3, 1, 2), 7, 4, 2, None),
    ("tokens-transposed", lambda: randn(2, 64, 36).transpose(1, 2), 3, 2, 1, (6, 6)),
    # token tiles: 32 channels with overlapping windows, padded channels (48 of 64), and channels sliced out
    # of wider tokens (16-aligned, rows not contiguous)
    ("tokens-k3s1p0-C32-overlap", lambda: randn(2, 30, 32), 3, 1, 0, (6, 5)),
    ("tokens-k3s2p1-C48-padded", lambda: randn(1, 25, 48), 3, 2, 1, (5, 5)),
    ("tokens-channel-slice", lambda: randn(2, 16, 128)[:, :, 32:96], 3, 2, 1, (4, 4)),
]
CASE_IDS = [case[0] for case in CASES]
# The three soft splits of T2T-ViT at 224x224, batch 1: 3136, 784 and 196 tokens.
T2T_CASES = [
    ("t2t-split0-3136x147", lambda: randn(1, 3, 224, 224), 7, 4, 2, None),
    ("t2t-split1-784x576", lambda: randn(1, 56 * 56, 64), 3, 2, 1, (56, 56)),
    ("t2t-split2-196x576", lambda: randn(1, 28 * 28, 64), 3, 2, 1, (28, 28)),
]
T2T_IDS = [case[0] for case in T2T_CASES]


def _features(x, kernel, grid):
    return (x.shape[2] if grid is not None else x.shape[1]) * kernel * kernel


def _run(fn, x, weight, bias, dy, kernel, stride, padding, **kwargs):
    """Output and (dx, dweight, dbias) of ``fn`` for output gradient ``dy``; NaN-poisoned buffers."""
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    with poison_outputs():
        y = fn(leaves[0], kernel, stride, padding, leaves[1], leaves[2], **kwargs)
        y.backward(dy)
    return (y.detach(), *(t.grad for t in leaves))


def _make(case, dtype, param_dtype):
    _, make, kernel, stride, padding, grid = case
    x64 = make().to(torch.float64)
    features = _features(x64, kernel, grid)
    w64 = randn(features, dtype=torch.float64)
    b64 = randn(features, dtype=torch.float64)
    # same (possibly non-contiguous) strides as the master copy
    x = torch.empty_strided(x64.shape, x64.stride(), dtype=dtype, device=DEVICE).copy_(x64)
    return x64, w64, b64, x, w64.to(param_dtype), b64.to(param_dtype)


@pytest.mark.parametrize("case", CASES + T2T_CASES[2:], ids=CASE_IDS + T2T_IDS[2:])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_soft_split_layernorm_fwd_bwd_fp32(case, backend):
    _, _, kernel, stride, padding, grid = case
    x64, w64, b64, x, w, b = _make(case, torch.float32, torch.float32)
    assert x.stride() == x64.stride()
    exact_y = soft_split_layernorm_ref(x64, kernel, stride, padding, w64, b64, grid_size=grid)
    dy = torch.randn_like(exact_y)
    exact = _run(soft_split_layernorm_ref, x64, w64, b64, dy, kernel, stride, padding, grid_size=grid)
    ours = _run(soft_split_layernorm, x, w, b, dy.float(), kernel, stride, padding, grid_size=grid,
                backend=backend)
    assert ours[0].dtype == torch.float32
    for what, actual, expected in zip(("y", "dx", "dweight", "dbias"), ours, exact):
        assert_relative_close(actual, expected, 1e-5, what=what)


@pytest.mark.parametrize("case", T2T_CASES[:2], ids=T2T_IDS[:2])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_soft_split_layernorm_fwd_t2t_shapes(case, backend):
    """Forward at the full token counts of the first two splits (their backward is covered on smaller grids:
    the interpreter needs seconds per thousand rows)."""
    _, _, kernel, stride, padding, grid = case
    x64, w64, b64, x, w, b = _make(case, torch.float32, torch.float32)
    with poison_outputs():
        y = soft_split_layernorm(x, kernel, stride, padding, w, b, grid_size=grid, backend=backend)
    exact = soft_split_layernorm_ref(x64, kernel, stride, padding, w64, b64, grid_size=grid)
    assert_relative_close(y, exact, 1e-5)


@pytest.mark.parametrize("param_dtype", ["fp32", "same"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=[CASES[0][0], CASES[3][0], CASES[5][0]])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_soft_split_layernorm_fwd_bwd_low_precision(case, dtype, param_dtype, backend):
    _, _, kernel, stride, padding, grid = case
    param_dtype = torch.float32 if param_dtype == "fp32" else dtype
    x64, w64, b64, x, w, b = _make(case, dtype, param_dtype)
    # the exact answer is for the inputs as rounded to the low precision
    x64, w64, b64 = x.double(), w.double(), b.double()
    exact_y = soft_split_layernorm_ref(x64, kernel, stride, padding, w64, b64, grid_size=grid)
    dy = torch.randn_like(exact_y).to(dtype)
    exact = _run(soft_split_layernorm_ref, x64, w64, b64, dy.double(), kernel, stride, padding, grid_size=grid)
    reference = _run(soft_split_layernorm_ref, x, w, b, dy, kernel, stride, padding, grid_size=grid)
    ours = _run(soft_split_layernorm, x, w, b, dy, kernel, stride, padding, grid_size=grid, backend=backend)
    assert ours[0].dtype == dtype and ours[2].dtype == param_dtype and ours[3].dtype == param_dtype
    for what, actual, ref, ex in zip(("y", "dx", "dweight", "dbias"), ours, reference, exact):
        assert_within_reference_error(actual, ref, ex, what=what)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_soft_split_layernorm_backward_is_deterministic(backend):
    x = randn(2, 64, 64)
    w, b = randn(576), randn(576)
    dy = randn(2, 16, 576)
    first = _run(soft_split_layernorm, x, w, b, dy, 3, 2, 1, grid_size=(8, 8), backend=backend)
    second = _run(soft_split_layernorm, x, w, b, dy, 3, 2, 1, grid_size=(8, 8), backend=backend)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_soft_split_layernorm_ref_never_mixes_dtypes_in_layer_norm(dtype, monkeypatch):
    """fp16/bf16 rows with float32 parameters (the op's contract): torch's CUDA LayerNorm refuses mixed dtypes
    (its CPU kernel accepts them), so the reference, which is also the 'torch' backend, must not pass them on.
    The refusal is emulated here; the result is the float32 LayerNorm rounded once."""
    layer_norm = F.layer_norm

    def cuda_like_layer_norm(input, shape, weight=None, bias=None, eps=1e-5):
        if any(t is not None and t.dtype != input.dtype for t in (weight, bias)):
            raise RuntimeError(f"expected scalar type {input.dtype} but found {weight.dtype}")
        return layer_norm(input, shape, weight, bias, eps)

    monkeypatch.setattr(F, "layer_norm", cuda_like_layer_norm)
    x, w, b = randn(2, 3, 13, 10).to(dtype), randn(147), randn(147)
    y = soft_split_layernorm_ref(x, 7, 4, 2, w, b)
    assert torch.equal(soft_split_layernorm(x, 7, 4, 2, w, b, backend="torch"), y)
    expected = layer_norm(F.unfold(x.float(), 7, padding=2, stride=4).transpose(1, 2), (147,), w, b).to(dtype)
    assert y.dtype == dtype and torch.equal(y, expected)


def test_soft_split_layernorm_torch_backend_is_reference():
    x = randn(2, 3, 13, 10, requires_grad=True)
    w, b = randn(147), randn(147)
    ours = soft_split_layernorm(x, 7, 4, 2, w, b, backend="torch")
    assert torch.equal(ours, soft_split_layernorm_ref(x, 7, 4, 2, w, b))
    assert ours.grad_fn is not None and "t2t_fast" not in type(ours.grad_fn).__name__


def test_soft_split_layernorm_auto_backend():
    x = randn(1, 3, 9, 9)
    w, b = randn(147), randn(147)
    expected = soft_split_layernorm_ref(x, 7, 4, 2, w, b)
    assert_relative_close(soft_split_layernorm(x, 7, 4, 2, w, b), expected, 1e-5)
    # auto sends what the kernels cannot take (float64) to the torch path; a forced 'triton' refuses it
    x64, w64, b64 = x.double(), w.double(), b.double()
    assert torch.equal(soft_split_layernorm(x64, 7, 4, 2, w64, b64, backend="auto"),
                       soft_split_layernorm_ref(x64, 7, 4, 2, w64, b64))
    with pytest.raises(BackendUnavailableError, match="float64"):
        soft_split_layernorm(x64, 7, 4, 2, w64, b64, backend="triton")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_soft_split_layernorm_empty_batch(backend):
    x = randn(0, 20, 6, requires_grad=True)
    w = randn(54, requires_grad=True)
    b = randn(54, requires_grad=True)
    y = soft_split_layernorm(x, 3, 2, 1, w, b, grid_size=(5, 4), backend=backend)
    assert y.shape == (0, 6, 54)
    y.sum().backward()
    assert x.grad.shape == x.shape
    zeros = torch.zeros(54, device=DEVICE)
    assert torch.equal(w.grad, zeros) and torch.equal(b.grad, zeros)


@pytest.mark.parametrize("native", [False, True], ids=["triton", "native"])
def test_soft_split_layernorm_opcheck(native):
    x = randn(2, 12, 5)
    w, b = randn(45), randn(45)
    torch.library.opcheck(torch.ops.t2t_fast.soft_split_layernorm_fwd.default,
                          (x, w, b, 3, 2, 1, 1e-5, 4, 3, x.dtype, native))
    y, mean, rstd = torch.ops.t2t_fast.soft_split_layernorm_fwd(x, w, b, 3, 2, 1, 1e-5, 4, 3, x.dtype, native)
    for input_grad in (True, False):
        torch.library.opcheck(torch.ops.t2t_fast.soft_split_layernorm_bwd.default,
                              (torch.randn_like(y), x, w, mean, rstd, 3, 2, 1, 4, 3, native, input_grad))
    image = randn(1, 3, 9, 10, requires_grad=True)
    torch.library.opcheck(torch.ops.t2t_fast.soft_split_layernorm_fwd.default,
                          (image, randn(147, requires_grad=True), randn(147), 7, 4, 2, 1e-5, 0, 0, torch.bfloat16,
                           native))


@pytest.mark.parametrize("native", [False, True], ids=["triton", "native"])
def test_soft_split_layernorm_backward_without_input_grad(native):
    """An input that needs no gradient (the image of the first split): the backward op skips dx and gives the
    same dweight, dbias; through autograd, x gets no gradient and the parameters the reference's."""
    x, w, b = randn(2, 3, 13, 11), randn(147), randn(147)
    y, mean, rstd = torch.ops.t2t_fast.soft_split_layernorm_fwd(x, w, b, 7, 4, 2, 1e-5, 0, 0, x.dtype, native)
    dy = torch.randn_like(y)
    dx, dw, db = torch.ops.t2t_fast.soft_split_layernorm_bwd(dy, x, w, mean, rstd, 7, 4, 2, 0, 0, native, True)
    no_dx, dw_only, db_only = torch.ops.t2t_fast.soft_split_layernorm_bwd(dy, x, w, mean, rstd, 7, 4, 2, 0, 0,
                                                                          native, False)
    assert dx.shape == x.shape and no_dx.numel() == 0
    assert torch.equal(dw, dw_only) and torch.equal(db, db_only)

    backend = "triton" if not native else FUSED_BACKENDS[1]
    expected = _run(soft_split_layernorm_ref, x, w, b, dy, 7, 4, 2)
    params = [t.detach().requires_grad_() for t in (w, b)]
    with poison_outputs():
        soft_split_layernorm(x, 7, 4, 2, *params, backend=backend).backward(dy)
    assert not x.requires_grad and x.grad is None
    for what, param, exact in zip(("dweight", "dbias"), params, expected[2:]):
        assert_relative_close(param.grad, exact, 1e-5, what=what)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_soft_split_layernorm_keeps_no_unfolded_tensor_for_backward(backend):
    """Autograd holds x, the weight and the per-row statistics only: nothing of the unfolded (B, L, C*k*k)
    size, on either fused path (the torch reference path, for contrast, keeps it)."""
    x = randn(2, 64, 64, requires_grad=True)
    w, b = randn(576, requires_grad=True), randn(576, requires_grad=True)
    unfolded_numel = 2 * 16 * 576

    def saved_sizes(backend_name):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            soft_split_layernorm(x, 3, 2, 1, w, b, grid_size=(8, 8), backend=backend_name).sum().backward()
        return sizes

    assert max(saved_sizes(backend)) < unfolded_numel
    assert max(saved_sizes("torch")) >= unfolded_numel


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_soft_split_layernorm_torch_compile_fullgraph(backend):
    """Both fused paths compile as one graph, forward and backward (Inductor calls the custom ops; the Triton
    kernels run in the interpreter on CPU)."""
    def fn(x, w, b):
        return soft_split_layernorm(x, 3, 2, 1, w, b, grid_size=(4, 6), backend=backend).square().sum()

    x, w, b = randn(2, 24, 5), randn(45), randn(45)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    loss = compiled(*leaves)
    loss.backward()
    expected = [t.clone().requires_grad_() for t in (x, w, b)]
    expected_loss = soft_split_layernorm_ref(expected[0], 3, 2, 1, expected[1], expected[2],
                                             grid_size=(4, 6)).square().sum()
    expected_loss.backward()
    assert_relative_close(loss.detach(), expected_loss.detach(), 1e-5)
    for what, ours, ref in zip(("dx", "dweight", "dbias"), leaves, expected):
        assert_relative_close(ours.grad, ref.grad, 1e-5, what=what)


def _bad_inputs():
    x, w, b = torch.randn(2, 3, 16, 16), torch.randn(147), torch.randn(147)
    tokens, tw, tb = torch.randn(2, 16, 4), torch.randn(36), torch.randn(36)
    return [
        ("ndim", dict(x=torch.randn(3, 16, 16)), ValueError, "needs grid_size"),
        ("ndim-5", dict(x=torch.randn(1, 2, 3, 16, 16)), ValueError, "dims"),
        ("int-x", dict(x=x.long()), TypeError, "dtype"),
        ("not-tensor", dict(x=x.numpy()), TypeError, "torch.Tensor"),
        ("kernel-0", dict(kernel_size=0), ValueError, "kernel_size"),
        ("stride-0", dict(stride=0), ValueError, "stride"),
        ("padding-neg", dict(padding=-1), ValueError, "padding"),
        ("kernel-float", dict(kernel_size=7.0), TypeError, "kernel_size"),
        ("too-small", dict(x=torch.randn(2, 3, 2, 2), padding=0), ValueError, "does not fit"),
        ("weight-shape", dict(weight=torch.randn(146)), ValueError, "weight must have shape"),
        ("bias-shape", dict(bias=torch.randn(1, 147)), ValueError, "bias must have shape"),
        ("weight-dtype", dict(x=x.half(), weight=w.bfloat16()), TypeError, "weight has dtype"),
        ("eps-neg", dict(eps=-1.0), ValueError, "eps"),
        ("grid-for-image", dict(grid_size=(4, 4)), ValueError, "grid_size is only"),
        ("tokens-no-grid", dict(x=tokens, weight=tw, bias=tb, kernel_size=3, stride=2, padding=1), ValueError,
         "needs grid_size"),
        ("grid-mismatch", dict(x=tokens, weight=tw, bias=tb, kernel_size=3, stride=2, padding=1, grid_size=(4, 5)),
         ValueError, "20 positions"),
        ("grid-bad", dict(x=tokens, weight=tw, bias=tb, kernel_size=3, stride=2, padding=1, grid_size=(16,)),
         ValueError, "two positive ints"),
        ("device", dict(weight=torch.randn(147, device="meta")), ValueError, "is on meta"),
        ("backend", dict(backend="nope"), ValueError, "unknown backend"),
    ], dict(x=x, kernel_size=7, stride=4, padding=2, weight=w, bias=b)


_BAD, _GOOD = _bad_inputs()


@pytest.mark.parametrize("change, error, match", [case[1:] for case in _BAD], ids=[case[0] for case in _BAD])
def test_soft_split_layernorm_bad_inputs(change, error, match):
    kwargs = dict(_GOOD, **change)
    with pytest.raises(error, match=match):
        soft_split_layernorm(**kwargs)


def test_soft_split_layernorm_triton_needs_interpreter_or_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU tensors only")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        soft_split_layernorm(torch.randn(1, 3, 8, 8), 7, 4, 2, torch.randn(147), torch.randn(147), backend="triton")


# ----------------------------------------------------------------------------------------- kernel tiles

TILE_SHAPES = [  # (id, input, kernel size, takes the token tiles)
    ("image-147", torch.empty(2, 3, 224, 224), 7, False),
    ("tokens-576-56x56", torch.empty(2, 56 * 56, 64), 3, True),
    ("tokens-576-28x28", torch.empty(2, 28 * 28, 64), 3, True),
]


@pytest.mark.parametrize("row_tile", [kernels.FWD_ROW_TILE, kernels.BWD_ROW_TILE], ids=["fwd", "bwd"])
@pytest.mark.parametrize("x, kernel, tokens", [case[1:] for case in TILE_SHAPES], ids=[c[0] for c in TILE_SHAPES])
def test_t2t_shapes_take_dense_tiles(x, kernel, tokens, row_tile):
    """The T2T splits: token input loads along its channels (the token tiles), and at most 15 % of the lanes
    of a row's pieces are padding."""
    assert kernels.token_layout(x, kernel) == tokens
    channels = x.shape[2] if tokens else x.shape[1]
    features = channels * kernel * kernel
    constexprs, _ = kernels.row_config(row_tile, tokens, features, channels, kernel)
    lanes = constexprs["U_A"] * constexprs["V_A"] + constexprs["U_B"] * constexprs["V_B"]
    assert features <= lanes <= features / 0.85


def test_token_tiles_need_aligned_contiguous_channels():
    assert kernels.token_layout(torch.empty(2, 36, 64), 3)
    assert not kernels.token_layout(torch.empty(2, 64, 36).transpose(1, 2), 3)  # channels strided
    assert not kernels.token_layout(torch.empty(2, 36, 24), 3)  # C not a multiple of 16
    assert not kernels.token_layout(torch.empty(2, 36, 64), 2)  # no 2x2 token configuration


# ----------------------------------------------------------------------------------------- output dtype

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[CASES[0][0], CASES[2][0]])
@pytest.mark.parametrize("backend", FUSED_BACKENDS + ("torch",))
def test_soft_split_layernorm_out_dtype(case, out_dtype, backend):
    """float32 input written at a lower precision (the first split under autocast): y is the float32 result
    rounded once; dy arrives in that precision, dx keeps x's dtype, and the gradients are float32-accurate."""
    _, _, kernel, stride, padding, grid = case
    x64, w64, b64, x, w, b = _make(case, torch.float32, torch.float32)
    expected_y = soft_split_layernorm_ref(x, kernel, stride, padding, w, b, grid_size=grid).to(out_dtype)
    dy = torch.randn(expected_y.shape, device=DEVICE).to(out_dtype)
    exact = _run(soft_split_layernorm_ref, x64, w64, b64, dy.double(), kernel, stride, padding, grid_size=grid)
    ours = _run(soft_split_layernorm, x, w, b, dy, kernel, stride, padding, grid_size=grid, backend=backend,
                out_dtype=out_dtype)
    assert ours[0].dtype == out_dtype
    assert all(grad.dtype == torch.float32 for grad in ours[1:])
    torch.testing.assert_close(ours[0].float(), expected_y.float(), rtol=ULP[out_dtype], atol=1e-6)
    for what, actual, expected in zip(("dx", "dweight", "dbias"), ours[1:], exact[1:]):
        assert_relative_close(actual, expected, 1e-5, what=what)


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ("torch",))
def test_soft_split_layernorm_out_dtype_float32_from_bf16(backend):
    """bf16 tokens written as float32 (a pair the kernels do not write directly): normalised in float32, no
    bf16 rounding of y."""
    x = randn(2, 36, 64).bfloat16()
    w, b = randn(576), randn(576)
    ours = _run(soft_split_layernorm, x, w, b, randn(2, 9, 576), 3, 2, 1, grid_size=(6, 6), backend=backend,
                out_dtype=torch.float32)
    exact = _run(soft_split_layernorm_ref, x.double(), w.double(), b.double(), randn(2, 9, 576).double(), 3, 2, 1,
                 grid_size=(6, 6))
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16
    assert_relative_close(ours[0], exact[0], 1e-5, what="y")


# ------------------------------------------------------------------------------------ dtypes and geometry

@pytest.mark.parametrize("backend", [FUSED_BACKENDS[1], "torch", "auto"])
def test_float64_input_with_float32_parameters(backend):
    """float64 x with float32 LayerNorm parameters is computed in float64 on every backend that takes float64
    (the parameters' gradients come back in float32); the Triton kernels refuse float64 alike."""
    x = randn(2, 20, 6, dtype=torch.float64)
    w, b = randn(54), randn(54)
    dy = randn(2, 42, 54, dtype=torch.float64)
    exact = _run(soft_split_layernorm_ref, x, w.double(), b.double(), dy, 3, 1, 2, grid_size=(5, 4))
    ours = _run(soft_split_layernorm, x, w, b, dy, 3, 1, 2, grid_size=(5, 4), backend=backend)
    assert ours[0].dtype == ours[1].dtype == torch.float64 and ours[2].dtype == ours[3].dtype == torch.float32
    for what, actual, expected, rtol in zip(("y", "dx", "dweight", "dbias"), ours, exact, (1e-12, 1e-12, 1e-6, 1e-6)):
        assert_relative_close(actual, expected, rtol, what=what)
    with pytest.raises(BackendUnavailableError, match="float64"):
        soft_split_layernorm(x, 3, 1, 2, w, b, grid_size=(5, 4), backend="triton")


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ("torch",))
@pytest.mark.parametrize("shape", [(1, 3, 0, 5), (2, 3, 4, 0)], ids=["H0", "W0"])
def test_soft_split_layernorm_empty_image(shape, backend):
    """A window of 1 with padding 1 fits an empty image, but there is nothing to normalise: a ValueError."""
    with pytest.raises(ValueError, match="empty"):
        soft_split_layernorm(randn(*shape), 1, 1, 1, randn(3), randn(3), backend=backend)


def test_triton_refuses_indices_beyond_int32():
    """2**31 rows (a stride-0 batch, so nothing is allocated) would overflow the kernels' int32 indices."""
    x = torch.zeros(1, 1, 1, device=DEVICE).expand(2**31, 1, 1)
    w = torch.ones(1, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="int32"):
        soft_split_layernorm(x, 1, 1, 0, w, w, grid_size=(1, 1), backend="triton")
    with pytest.raises(BackendUnavailableError, match="int32"):
        torch.ops.t2t_fast.soft_split_layernorm_fwd(x, w, w, 1, 1, 0, 1e-5, 1, 1, torch.float32, False)


# ------------------------------------------------------------------------------- the registered ops' checks

# Calls of the registered ops that crashed the process or read out of bounds before the ops checked their
# arguments, with the error each must give now on both paths (native False / True). Run in a subprocess, so
# that a crash fails these tests rather than the test run. ``N`` is the native flag.
_FWD = "torch.ops.t2t_fast.soft_split_layernorm_fwd"
_BWD = "torch.ops.t2t_fast.soft_split_layernorm_bwd"
REPRODUCERS = {
    "fwd_grid_beyond_the_tokens": (f"{_FWD}(tok, w27, w27, 3, 2, 1, 1e-5, 100, 100, torch.float32, N)",
                                   "ValueError", r"10000 positions but x has 16 tokens"),
    "fwd_grid_for_an_image": (f"{_FWD}(img, w147, w147, 7, 4, 2, 1e-5, 5, 5, torch.float32, N)",
                              "ValueError", r"grid_size is only for token input"),
    "fwd_tokens_without_grid": (f"{_FWD}(tok, w27, w27, 3, 2, 1, 1e-5, 0, 0, torch.float32, N)",
                                "ValueError", r"two positive ints"),
    "fwd_window_does_not_fit": (f"{_FWD}(img[:, :, :4, :4], w147, w147, 7, 1, 0, 1e-5, 0, 0, torch.float32, N)",
                                "ValueError", r"does not fit"),
    "fwd_weight_length": (f"{_FWD}(tok, w147, w27, 3, 2, 1, 1e-5, 4, 4, torch.float32, N)",
                          "ValueError", r"weight must have shape \(27,\)"),
    "fwd_kernel_0": (f"{_FWD}(tok, w27, w27, 0, 2, 1, 1e-5, 4, 4, torch.float32, N)",
                     "ValueError", r"kernel_size must be >= 1"),
    "fwd_stride_0": (f"{_FWD}(tok, w27, w27, 3, 0, 1, 1e-5, 4, 4, torch.float32, N)",
                     "ValueError", r"stride must be >= 1"),
    "fwd_padding_negative": (f"{_FWD}(tok, w27, w27, 3, 2, -5, 1e-5, 4, 4, torch.float32, N)",
                             "ValueError", r"padding must be >= 0"),
    "fwd_int_x": (f"{_FWD}(tok.long(), w27, w27, 3, 2, 1, 1e-5, 4, 4, torch.float32, N)",
                  "TypeError", r"x has dtype int64"),
    "fwd_int_out_dtype": (f"{_FWD}(tok, w27, w27, 3, 2, 1, 1e-5, 4, 4, torch.int32, N)",
                          "TypeError", r"out_dtype"),
    "fwd_eps_negative": (f"{_FWD}(tok, w27, w27, 3, 2, 1, -1.0, 4, 4, torch.float32, N)", "ValueError", r"eps"),
    "fwd_empty_image": (f"{_FWD}(torch.randn(1, 3, 0, 5), w3, w3, 1, 1, 1, 1e-5, 0, 0, torch.float32, N)",
                        "ValueError", r"empty"),
    "fwd_weight_elsewhere": (f"{_FWD}(tok, w27.to('meta'), w27, 3, 2, 1, 1e-5, 4, 4, torch.float32, N)",
                             "ValueError", r"weight is on meta"),
    "bwd_dy_shape": (f"{_BWD}(torch.randn(1, 4, 27), tok, w27, stat, stat, 3, 2, 1, 4, 4, N, True)",
                     "ValueError", r"dy must have shape \(2, 4, 27\)"),
    "bwd_grid_beyond_the_tokens": (f"{_BWD}(dy, tok, w27, stat, stat, 3, 2, 1, 1000, 1000, N, True)",
                                   "ValueError", r"N must equal H\*W"),
    "bwd_mean_shape": (f"{_BWD}(dy, tok, w27, stat[:3], stat, 3, 2, 1, 4, 4, N, True)",
                       "ValueError", r"mean must have shape \(8,\)"),
    "bwd_rstd_dtype": (f"{_BWD}(dy, tok, w27, stat, stat.half(), 3, 2, 1, 4, 4, N, True)",
                       "TypeError", r"rstd has dtype torch.float16"),
    "bwd_weight_length": (f"{_BWD}(dy, tok, w147, stat, stat, 3, 2, 1, 4, 4, N, False)",
                          "ValueError", r"weight must have shape \(27,\)"),
    "bwd_int_dy": (f"{_BWD}(dy.int(), tok, w27, stat, stat, 3, 2, 1, 4, 4, N, True)",
                   "TypeError", r"dy has dtype int32"),
    "bwd_window_does_not_fit": (f"{_BWD}(dy, tok, w27, stat, stat, 3, 1, 0, 1, 16, N, True)",
                                "ValueError", r"does not fit"),
}

_REPRODUCER_SETUP = """
import t2t_fast.ops  # registers the custom ops
torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: Triton in its interpreter
tok, img = torch.randn(2, 16, 3), torch.randn(1, 3, 8, 8)
w3, w27, w147 = torch.randn(3), torch.randn(27), torch.randn(147)
dy, stat = torch.randn(2, 4, 27), torch.rand(8) + 0.5
"""


@pytest.fixture(scope="module")
def reproducer_outcomes(tmp_path_factory):
    """REPRODUCERS on both paths (native False/True in place of N), run one after the other in one subprocess
    (see :func:`run_calls_in_subprocess`)."""
    calls = {f"{name},{native}": call.replace("N)", f"{native})").replace("N, ", f"{native}, ")
             for name, (call, _, _) in REPRODUCERS.items() for native in (False, True)}
    return run_calls_in_subprocess(_REPRODUCER_SETUP, calls, cwd=tmp_path_factory.mktemp("reproducers"))


@pytest.mark.parametrize("native", [False, True], ids=["triton", "native"])
@pytest.mark.parametrize("case", list(REPRODUCERS))
def test_bad_direct_calls_raise_instead_of_crashing(case, native, reproducer_outcomes):
    _, kind, match = REPRODUCERS[case]
    assert_call_raised(*reproducer_outcomes, f"{case},{native}", kind, match)


OP_ERRORS = (ValueError, TypeError)


@st.composite
def direct_op_calls(draw):
    """Arguments of the registered ops: a consistent small geometry, then one to three of its parts replaced
    by random values (some of which still agree)."""
    tokens = draw(st.booleans())
    batch, channels = draw(st.integers(0, 2)), draw(st.integers(1, 4))
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    kernel, stride, padding = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 2))
    kernel = min(kernel, height + 2 * padding, width + 2 * padding)
    shape = [batch, height * width, channels] if tokens else [batch, channels, height, width]
    grid = [height, width] if tokens else [0, 0]
    window = [kernel, stride, padding]
    features = channels * kernel * kernel
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    shapes = dict(weight=[features], bias=[features], dy=[batch, out_h * out_w, features],
                  mean=[batch * out_h * out_w], rstd=[batch * out_h * out_w])
    dtypes = dict(x=torch.float32, weight=torch.float32, bias=torch.float32, dy=torch.float32,
                  mean=torch.float32, rstd=torch.float32)
    for change in draw(st.lists(st.sampled_from([*GEOMETRY_CHANGES, "tensor_shape", "dtype"]), min_size=1,
                                max_size=3)):
        if change in GEOMETRY_CHANGES:
            shape, grid, window = change_split_geometry(draw, change, shape, grid, window, largest=8)
        elif change == "tensor_shape":
            name = draw(st.sampled_from(sorted(shapes)))
            shapes[name] = draw(st.lists(st.integers(0, 40), min_size=0, max_size=3))
        else:
            dtypes[draw(st.sampled_from(sorted(dtypes)))] = draw(st.sampled_from(
                [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool]))
    return dict(shape=shape, grid=grid, window=window, shapes=shapes, dtypes=dtypes)


def _random(shape, dtype):
    if dtype.is_floating_point:
        return (torch.rand(shape, dtype=torch.float64) + 0.5).to(dtype)
    return torch.randint(0, 2, shape).to(dtype)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=direct_op_calls(), native=st.booleans())
def test_registered_ops_raise_or_match_the_reference(call, native):
    """torch.ops.t2t_fast.soft_split_layernorm_fwd / _bwd called directly with arguments that mostly disagree
    with each other: a clear ValueError / TypeError (or, for Triton, BackendUnavailableError for a dtype it
    does not take), or the reference's result (never a crash, never numbers of a geometry the tensors lack)."""
    x = _random(call["shape"], call["dtypes"]["x"]).to(DEVICE)
    t = {name: _random(shape, call["dtypes"][name]).to(DEVICE) for name, shape in call["shapes"].items()}
    kernel, stride, padding = call["window"]
    grid_h, grid_w = call["grid"]
    errors = OP_ERRORS if native else OP_ERRORS + (BackendUnavailableError,)
    grid = (grid_h, grid_w) if x.dim() == 3 else None
    try:
        with poison_outputs():
            y, mean, rstd = torch.ops.t2t_fast.soft_split_layernorm_fwd(
                x, t["weight"], t["bias"], kernel, stride, padding, 1e-5, grid_h, grid_w, torch.float32, native)
    except errors as exc:
        assert str(exc).startswith("soft_split_layernorm: "), exc
    else:
        expected = soft_split_layernorm_ref(x, kernel, stride, padding, t["weight"], t["bias"], grid_size=grid,
                                            out_dtype=torch.float32)
        _close(y, expected, RELATIVE_TOLERANCE[compute_dtype_of(x)], what="y")
    try:
        with poison_outputs():
            dx, dw, db = torch.ops.t2t_fast.soft_split_layernorm_bwd(
                t["dy"], x, t["weight"], t["mean"], t["rstd"], kernel, stride, padding, grid_h, grid_w, native, True)
    except errors as exc:
        assert str(exc).startswith("soft_split_layernorm: "), exc
    else:
        # the statistics were made up: check against the backward of LayerNorm with those statistics
        assert dx.shape == x.shape and dw.shape == db.shape == t["weight"].shape
        rows = F.unfold(x.double() if x.dim() == 4 else x.double().transpose(1, 2).reshape(
            x.shape[0], x.shape[2], grid_h, grid_w), kernel, padding=padding, stride=stride).transpose(1, 2)
        xhat = (rows - t["mean"].double().reshape(rows.shape[:2] + (1,))) * t["rstd"].double().reshape(
            rows.shape[:2] + (1,))
        _close(db, t["dy"].double().sum((0, 1)), 1e-5, what="dbias")
        _close(dw, (t["dy"].double() * xhat).sum((0, 1)), 1e-5, what="dweight")


def compute_dtype_of(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _close(actual, expected, rtol, what):
    """assert_relative_close that also takes empty tensors (then only the shapes must agree) and all-but-zero
    ones: a row of one feature normalises to exactly 0, and its gradients are rounding residue (|x - mean| of
    ~1e-8 times rstd ~ 300) that one backend cancels exactly and another does not, so differences are measured
    against the O(1) scale of the unit-normal inputs there."""
    if expected.numel() == 0:
        assert actual.shape == expected.shape, what
    elif expected.detach().abs().max() < 1e-3:
        assert (actual.double() - expected.double()).abs().max() <= 1e-3, what
    else:
        assert_relative_close(actual, expected, rtol, what=what)


@st.composite
def wrapper_calls(draw):
    """soft_split_layernorm arguments, valid or not: shapes with zeros, grids that may not match, windows
    that may not fit, zero strides and negative paddings."""
    tokens = draw(st.booleans())
    shape = draw(st.lists(st.integers(0, 6), min_size=3 if tokens else 4, max_size=3 if tokens else 4))
    grid = None
    if tokens or draw(st.integers(0, 4)) == 0:
        grid = draw(st.one_of(st.none(), st.tuples(st.integers(-1, 6), st.integers(-1, 6))))
    channels = shape[-1] if tokens else shape[1]
    kernel = draw(st.integers(0, 3))
    features = draw(st.sampled_from([channels * kernel * kernel, max(channels * kernel * kernel - 1, 0)]))
    return dict(shape=shape, grid=grid, kernel=kernel, stride=draw(st.integers(0, 3)),
                padding=draw(st.integers(-1, 2)), features=features)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=wrapper_calls(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       out_dtype=st.sampled_from([None, torch.bfloat16]))
def test_backends_agree_or_raise_alike(call, dtype, out_dtype):
    """For any arguments the wrapper is given, backends torch, cpp and triton (interpreter on CPU) give the same
    forward and gradients within the output dtype's tolerance, or raise the same exception type."""
    x = torch.randn(call["shape"], dtype=torch.float64).to(dtype)
    w = torch.randn(call["features"], dtype=torch.float64).float()
    b = torch.randn(call["features"], dtype=torch.float64).float()
    backends = ("torch", "triton", "cuda" if DEVICE == "cuda" else "cpp")
    outcomes = {}
    for backend in backends:
        leaves = [t.to(DEVICE).requires_grad_() for t in (x, w, b)]
        try:
            with poison_outputs():
                y = soft_split_layernorm(leaves[0], call["kernel"], call["stride"], call["padding"], leaves[1],
                                         leaves[2], grid_size=call["grid"], backend=backend, out_dtype=out_dtype)
        except Exception as exc:  # noqa: BLE001 - the type is what is compared
            outcomes[backend] = type(exc)
            continue
        torch.manual_seed(0)
        dy = torch.randn(y.shape, dtype=torch.float64).to(y.dtype).to(DEVICE)
        with poison_outputs():
            grads = torch.autograd.grad(y, leaves, dy)
        outcomes[backend] = (y.detach(), *grads)
    first = outcomes["torch"]
    for backend in backends[1:]:
        if isinstance(first, type):
            assert outcomes[backend] is first, (backend, outcomes[backend], first)
            continue
        assert not isinstance(outcomes[backend], type), (backend, outcomes[backend])
        for what, ours, ref in zip(("y", "dx", "dweight", "dbias"), outcomes[backend], first):
            assert ours.dtype == ref.dtype, what
            rtol = 2 * RELATIVE_TOLERANCE[ours.dtype]
            if what == "dx" and ref.numel():
                if call["features"] == 2:  # ill-conditioned: test_two_feature_rows_dx checks it
                    continue
                scale = max(ref.abs().max().item(), _dx_term_scale(x, w, dy, call))
                assert (ours.double() - ref.double()).abs().max() <= rtol * scale, f"{backend} dx"
                continue
            _close(ours, ref, rtol, what=f"{backend} {what}")


def _dx_term_scale(x, weight, dy, call, eps=1e-5):
    """The size of the terms LayerNorm's backward sums into dx, max over rows of rstd * max |dy * weight|: where
    a row's own inputs barely move its output (a row of one non-zero tap among padding, normalised to the same
    pattern whatever its value) dx is their cancellation residue, and two correct float32 implementations
    differ by rounding of the terms, not of dx."""
    rows = F.unfold(as_image(x.double().cpu(), call["grid"]), call["kernel"], padding=call["padding"],
                    stride=call["stride"]).transpose(1, 2)
    rstd = (rows.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    return (rstd * (dy.double().cpu() * weight.double()).abs()).max().item()


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ("torch",))
def test_two_feature_rows_dx(backend):
    """Rows of two features (kernel 1 over two channels): LayerNorm's dx there is rstd (g1 - g2) / 2 (1 - xhat^2)
    with g = dy w and xhat^2 = d^2/4 / (d^2/4 + eps), d the row's difference: terms of size rstd |g| cancel to
    O(eps / d^2) of it, and float32 rounding of x - mean is amplified by |x| / d, so two correct float32
    implementations differ far beyond float32 rounding of dx itself (3e-4 relative was seen). Each backend's dx
    against float64 row by row, to 1e-4 of the row's rstd max |g| (torch's own float32 reaches 1.5e-5): a dx that
    drops or mis-scales a term is off by O(1) of it in the rows where dx is not negligible."""
    x = randn(3, 2, 4, 5)
    w, b = randn(2), randn(2)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with poison_outputs():
        y = soft_split_layernorm(leaves[0], 1, 1, 0, leaves[1], leaves[2], backend=backend)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, leaves[0], dy)
    exact = x.double().requires_grad_()
    (dx_exact,) = torch.autograd.grad(soft_split_layernorm_ref(exact, 1, 1, 0, w.double(), b.double()), exact,
                                      dy.double())
    def by_row(t):  # (image, channel, y, x) -> the rows in the output's (image, y, x) order
        return t.double().permute(0, 2, 3, 1).reshape(-1, 2)

    rstd = (by_row(x).var(dim=1, unbiased=False) + 1e-5).rsqrt()
    terms = rstd * (dy.double().reshape(-1, 2) * w.double()).abs().max(dim=1).values
    error = (by_row(dx) - by_row(dx_exact)).abs().max(dim=1).values
    assert dx.dtype == x.dtype and (error <= 1e-4 * terms).all(), (backend, (error / terms).max().item())


def test_persistent_programs_follow_occupancy(monkeypatch):
    """The backward row kernel runs as many programs as fit on the GPU at once: registers are allocated per
    warp in 256-register units, and threads and shared memory limit the blocks per SM too."""
    import types

    props = types.SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                                  shared_memory_per_multiprocessor=233472, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)

    def compiled(n_regs, num_warps, shared):
        return types.SimpleNamespace(n_regs=n_regs, metadata=types.SimpleNamespace(num_warps=num_warps,
                                                                                   shared=shared))

    assert kernels._blocks_per_sm(compiled(72, 4, 4096), "cuda") == 7  # 72 x 32 = 2304 registers per warp
    assert kernels._blocks_per_sm(compiled(70, 4, 4096), "cuda") == 7  # rounded up to 2304 as well
    assert kernels._blocks_per_sm(compiled(32, 4, 0), "cuda") == 16  # 2048 threads
    assert kernels._blocks_per_sm(compiled(40, 4, 100_000), "cuda") == 2  # shared memory
    assert kernels._blocks_per_sm(compiled(255, 16, 0), "cuda") == 1


@pytest.mark.parametrize("tokens", [False, True], ids=["image", "tokens"])
def test_soft_split_layernorm_gradgradcheck_float64(tokens):
    """Double backward (create_graph=True) through the native op: its backward is differentiated through the
    reference."""
    torch.manual_seed(0)
    grid = (5, 4) if tokens else None
    x = (torch.randn(2, 20, 3) if tokens else torch.randn(2, 3, 5, 4)).double().requires_grad_()
    weight = (1 + 0.3 * torch.randn(27)).double().requires_grad_()
    bias = (0.2 * torch.randn(27)).double().requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: soft_split_layernorm(x, 3, 2, 1, w, b, grid_size=grid, backend="cpp"), (x, weight, bias))
