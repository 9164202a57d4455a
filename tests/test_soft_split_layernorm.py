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

from t2t_fast.backend import BackendUnavailableError
from t2t_fast.ops import soft_split_layernorm, soft_split_layernorm_ref
from t2t_fast.testing import assert_relative_close, assert_within_reference_error, poison_outputs

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
    with pytest.raises(ValueError, match="float64"):
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
                          (x, w, b, 3, 2, 1, 1e-5, 4, 3, native))
    y, mean, rstd = torch.ops.t2t_fast.soft_split_layernorm_fwd(x, w, b, 3, 2, 1, 1e-5, 4, 3, native)
    for input_grad in (True, False):
        torch.library.opcheck(torch.ops.t2t_fast.soft_split_layernorm_bwd.default,
                              (torch.randn_like(y), x, w, mean, rstd, 3, 2, 1, 4, 3, native, input_grad))
    image = randn(1, 3, 9, 10, requires_grad=True)
    torch.library.opcheck(torch.ops.t2t_fast.soft_split_layernorm_fwd.default,
                          (image, randn(147, requires_grad=True), randn(147), 7, 4, 2, 1e-5, 0, 0, native))


@pytest.mark.parametrize("native", [False, True], ids=["triton", "native"])
def test_soft_split_layernorm_backward_without_input_grad(native):
    """An input that needs no gradient (the image of the first split): the backward op skips dx and gives the
    same dweight, dbias; through autograd, x gets no gradient and the parameters the reference's."""
    x, w, b = randn(2, 3, 13, 11), randn(147), randn(147)
    y, mean, rstd = torch.ops.t2t_fast.soft_split_layernorm_fwd(x, w, b, 7, 4, 2, 1e-5, 0, 0, native)
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
