"""favor_attention (fused FAVOR+): forward and gradients against the float64 reference, for the Triton
kernels (on CUDA tensors where a GPU is present, else on CPU tensors in the interpreter) and the stabilised
torch backend; overflow safety in fp16 and for finite rows whose |u|^2 overflows; strided views; custom-op
registration (opcheck, torch.compile); input validation of the wrapper and of the registered ops called
directly; the frozen w."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from t2t_fast.backend import BackendUnavailableError, unavailable_reason
from t2t_fast.ops import favor_attention, favor_attention_ref
from t2t_fast.testing import (RELATIVE_TOLERANCE, assert_call_raised, assert_relative_close,
                              assert_within_reference_error, poison_outputs, relative_error, run_calls_in_subprocess)

BACKENDS = ("triton", "torch")
LOW_PRECISION = (torch.float16, torch.bfloat16)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _tensors_on_device():
    """Tensors the tests create go to DEVICE (Triton runs CPU tensors only in its interpreter)."""
    with torch.device(DEVICE):
        yield


def _projection(m, e, scale=1.0):
    """The official random matrix: orthogonal rows of norm sqrt(m) (times ``scale``)."""
    return torch.nn.init.orthogonal_(torch.empty(m, e)) * math.sqrt(m) * scale


def _kqv(batch, tokens, e, dtype, scale=0.5):
    """k, q, v as strided views of one (B, T, 3e) projection output, like the performer layer."""
    kqv = (torch.randn(batch, tokens, 3 * e) * scale).to(dtype)
    return kqv.split(e, dim=-1)


def _run(fn, k, q, v, w, grad, **kwargs):
    """y and (dk, dq, dv) of ``fn`` with every output buffer NaN-poisoned."""
    leaves = [t.detach().clone().requires_grad_() for t in (k, q, v)]
    with poison_outputs():
        y = fn(*leaves, w, **kwargs)
        y.backward(grad)
    return y.detach(), [t.grad for t in leaves]


def _exact(k, q, v, w, grad):
    return _run(favor_attention_ref, *(t.double() for t in (k, q, v, w)), grad.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("batch,tokens", ((2, 1), (2, 17), (2, 196), (1, 784)))
def test_matches_float64_reference(backend, dtype, batch, tokens):
    e, m = 64, 32
    w = _projection(m, e)
    k, q, v = _kqv(batch, tokens, e, dtype)
    grad = torch.randn(batch, tokens, e).to(dtype)
    y, grads = _run(favor_attention, k, q, v, w, grad, backend=backend)
    y64, grads64 = _exact(k, q, v, w, grad)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    names = ("y", "dk", "dq", "dv")
    if tokens == 1:
        # One token: y = v D/(D + eps), so dk and dq are the O(eps) gradient of the eps term alone, a pure
        # cancellation (4e-3 relative error even for the fp32 reference). Check them absolutely, at the
        # scale of dv (the well-conditioned gradient), and y, dv as usual below.
        scale = grads64[2].abs().max().item()
        for name, ours, exact in zip(names[1:3], grads[:2], grads64[:2]):
            err = (ours.double() - exact).abs().max().item() / scale
            assert err <= RELATIVE_TOLERANCE[dtype], f"{name}: error {err:.2e} (scale of dv)"
        names, (y, *grads), (y64, *grads64) = ("y", "dv"), (y, grads[2]), (y64, grads64[2])
    if dtype == torch.float32:
        for name, ours, exact in zip(names, (y, *grads), (y64, *grads64)):
            assert_relative_close(ours, exact, 1e-5, what=name)
    else:
        y_lp, grads_lp = _run(favor_attention_ref, k, q, v, w, grad)
        if tokens == 1:
            y_lp, grads_lp = y_lp, [grads_lp[2]]
        for name, ours, ref, exact in zip(names, (y, *grads), (y_lp, *grads_lp), (y64, *grads64)):
            assert_within_reference_error(ours, ref, exact, what=name)


@pytest.mark.parametrize("m,e", ((16, 16), (32, 32), (64, 64), (16, 64), (64, 32), (24, 48)))
def test_feature_and_width_sizes_triton(m, e):
    w = _projection(m, e) if m <= e else torch.randn(m, e)
    k, q, v = _kqv(2, 37, e, torch.float32)
    grad = torch.randn(2, 37, e)
    y, grads = _run(favor_attention, k, q, v, w, grad, backend="triton")
    y64, grads64 = _exact(k, q, v, w, grad)
    for name, ours, exact in zip(("y", "dk", "dq", "dv"), (y, *grads), (y64, *grads64)):
        assert_relative_close(ours, exact, 1e-5, what=f"{name} m={m} e={e}")


def _to_tf32(x, round_to_nearest):
    """fp32 -> tf32 (10 mantissa bits) as the tensor cores read it: cvt.rna rounds (ties away from zero; the
    bits are sign-magnitude), an MMA operand that was not converted is truncated."""
    import numpy as np
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if round_to_nearest:
        bits = bits + np.uint32(0x1000)
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


@pytest.fixture
def tensor_core_dot(monkeypatch):
    """tl.dot in the interpreter rounded as on an NVIDIA GPU. The interpreter multiplies fp32 exactly whatever
    input precision a kernel asks for; the GPU rounds the operands to tf32, and for tf32x3 splits each into
    big = rna(x) and small = x - big and sums big*big + big*small + small*big (small*small dropped)."""
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    exact_dot = interpreter.InterpreterBuilder.create_dot
    tf32, tf32x3 = ir.INPUT_PRECISION.TF32, ir.INPUT_PRECISION.TF32x3

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype != np.float32 or b.data.dtype != np.float32 or input_precision not in (tf32, tf32x3):
            return exact_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        a_big, b_big = _to_tf32(a.data, True), _to_tf32(b.data, True)
        product = np.matmul(a_big, b_big, dtype=np.float32)
        if input_precision == tf32x3:
            a_small, b_small = _to_tf32(a.data - a_big, False), _to_tf32(b.data - b_big, False)
            product += np.matmul(a_big, b_small, dtype=np.float32) + np.matmul(a_small, b_big, dtype=np.float32)
        return interpreter.TensorHandle(product + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.mark.skipif(DEVICE == "cuda", reason="emulates the GPU's rounding on CPU; on a GPU the tests above run it")
@pytest.mark.parametrize("precision", [None, "tf32"], ids=["shipped", "tf32-control"])
@pytest.mark.parametrize("batch,tokens", ((2, 196), (1, 784)))
def test_fp32_accuracy_with_tensor_core_rounding(tensor_core_dot, monkeypatch, precision, batch, tokens):
    """The interpreter's exact products cannot show what tensor cores do to the fp32 kernels: with the GPU's
    rounding emulated, the shipped tl.dot precision (tf32x3) keeps y and every gradient within 1e-5 of
    float64. The control, plain tf32, must miss that (errors ~1e-3), or the emulation did not take effect."""
    import triton.language as tl

    from t2t_fast.kernels import favor_attention as favor_kernels

    if precision is not None:
        monkeypatch.setattr(favor_kernels, "DOT_PRECISION", tl.constexpr(precision))
    e, m = 64, 32
    w = _projection(m, e)
    k, q, v = _kqv(batch, tokens, e, torch.float32)
    grad = torch.randn(batch, tokens, e)
    y, grads = _run(favor_attention, k, q, v, w, grad, backend="triton")
    y64, grads64 = _exact(k, q, v, w, grad)
    errors = {name: relative_error(ours, exact)
              for name, ours, exact in zip(("y", "dk", "dq", "dv"), (y, *grads), (y64, *grads64))}
    if precision is None:
        assert max(errors.values()) <= 1e-5, errors
    else:
        assert min(errors.values()) > 1e-4, errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_strides(backend):
    """k, q, v in a (B, e, T) layout (token stride 1) and a non-contiguous upstream gradient."""
    e, m, tokens = 32, 16, 45
    w = _projection(m, e)
    k, q, v = ((torch.randn(2, e, tokens) * 0.5).transpose(1, 2) for _ in range(3))
    grad = torch.randn(2, tokens, 2 * e)[..., ::2]
    y, grads = _run(favor_attention, k, q, v, w, grad, backend=backend)
    y64, grads64 = _exact(k, q, v, w, grad)
    for name, ours, exact in zip(("y", "dk", "dq", "dv"), (y, *grads), (y64, *grads64)):
        assert_relative_close(ours, exact, 1e-5, what=name)


def _aligned_inputs(w, batch, tokens, dtype, scale=1.0):
    """Keys and queries near random rows of ``scale * w``: the largest features the layer can produce."""
    m, e = w.shape
    rows = scale * w
    k = rows[torch.randint(0, m, (batch, tokens))] + 0.3 * torch.randn(batch, tokens, e)
    q = rows[torch.randint(0, m, (batch, tokens))] + 0.3 * torch.randn(batch, tokens, e)
    return k.to(dtype), q.to(dtype), torch.randn(batch, tokens, e).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_overflow_of_the_official_amp_path(backend):
    """|k|, |q| ~ sqrt(m) along w's rows: features ~1e6, whose sums overflow fp16. The reference run
    under fp16 autocast (the official AMP training) gives inf/NaN; this op gives the float64 answer."""
    w = _projection(32, 64)
    k, q, v = _aligned_inputs(w, 2, 64, torch.float16)
    with torch.autocast(DEVICE, dtype=torch.float16):
        amp = favor_attention_ref(k, q, v, w)
    assert not torch.isfinite(amp).all()
    exact = favor_attention_ref(k.double(), q.double(), v.double(), w.double())
    plain = favor_attention_ref(k, q, v, w)
    with poison_outputs():
        y = favor_attention(k, q, v, w, backend=backend)
    assert_within_reference_error(y, plain, exact)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_keeps_fp32_maths(backend):
    """Under bf16 autocast (AMP) the op still computes its features in fp32."""
    w = _projection(32, 64)
    k, q, v = _kqv(2, 40, 64, torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = favor_attention(k, q, v, w, backend=backend)
    assert torch.equal(y, favor_attention(k, q, v, w, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_inputs_whose_features_overflow_fp32(backend):
    """Large |q|, |k| (a w with rows 3x the official norm, inputs along them): the logits reach ~144, exp()
    overflows fp32, and the reference gives NaN at fp16; this op is finite, matches float64, and so are
    its gradients."""
    w = _projection(32, 64, scale=3.0)
    k, q, v = _aligned_inputs(w, 2, 64, torch.float16, scale=1.0)
    assert not torch.isfinite(favor_attention_ref(k, q, v, w)).all()
    grad = torch.randn(2, 64, 64).half()
    y, grads = _run(favor_attention, k, q, v, w, grad, backend=backend)
    y64, grads64 = _exact(k, q, v, w, grad)
    assert all(torch.isfinite(t).all() for t in (y64, *grads64))
    for name, ours, exact in zip(("y", "dk", "dq", "dv"), (y, *grads), (y64, *grads64)):
        assert torch.isfinite(ours).all(), name
        # fp16 inputs: the only rounding left is that of the fp16 outputs (2^-11 relative).
        assert_relative_close(ours, exact, 4e-3, what=name)


def test_gradcheck_torch_backend_float64():
    # The Triton kernels compute in float32 (float64 is not a Triton dtype here); their gradients are
    # checked against the float64 reference above.
    w = torch.randn(4, 6, dtype=torch.float64)
    k, q, v = (torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda k, q, v: favor_attention(k, q, v, w, backend="torch"), (k, q, v))


def test_triton_rejects_float64():
    k, q, v = _kqv(1, 3, 16, torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        favor_attention(k, q, v, torch.randn(16, 16, dtype=torch.float64), backend="triton")


def test_deterministic_and_eps():
    w = _projection(32, 64)
    k, q, v = _kqv(1, 300, 64, torch.float32)
    y1 = favor_attention(k, q, v, w, backend="triton")
    y2 = favor_attention(k, q, v, w, backend="triton")
    assert torch.equal(y1, y2)
    for eps in (0.0, 1e-3, 10.0):
        exact = favor_attention_ref(k.double(), q.double(), v.double(), w.double(), eps=eps)
        for backend in BACKENDS:
            assert_relative_close(favor_attention(k, q, v, w, eps=eps, backend=backend), exact, 1e-5,
                                  what=f"eps={eps} {backend}")


def test_opcheck():
    w = _projection(16, 32)
    k, q, v = (t.detach().clone().requires_grad_() for t in _kqv(2, 9, 32, torch.float32))
    fwd = torch.ops.t2t_fast.favor_attention_fwd.default
    torch.library.opcheck(fwd, (k, q, v, w, 1e-8))
    _, s, z, c_k = fwd(k, q, v, w, 1e-8)
    torch.library.opcheck(torch.ops.t2t_fast.favor_attention_bwd.default,
                          (torch.randn(2, 9, 32), k.detach(), q.detach(), v.detach(), w, s, z, c_k, 1e-8))


def test_torch_compile_fullgraph():
    w = _projection(16, 32)
    k, q, v = _kqv(2, 9, 32, torch.float32)
    grad = torch.randn(2, 9, 32)
    fn = torch.compile(lambda k, q, v: favor_attention(k, q, v, w, backend="triton"), fullgraph=True)
    y, grads = _run(lambda k, q, v, w: fn(k, q, v), k, q, v, w, grad)
    y_eager, grads_eager = _run(favor_attention, k, q, v, w, grad, backend="triton")
    for ours, eager in zip((y, *grads), (y_eager, *grads_eager)):
        assert_relative_close(ours, eager, 1e-6)


def test_torch_backend_exports():
    w = _projection(16, 32)
    k, q, v = _kqv(1, 7, 32, torch.float32)

    class Layer(torch.nn.Module):
        def forward(self, k, q, v):
            return favor_attention(k, q, v, w, backend="torch")

    exported = torch.export.export(Layer(), (k.contiguous(), q.contiguous(), v.contiguous()))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not any("t2t_fast" in t for t in targets), targets
    assert_relative_close(exported.module()(k, q, v), favor_attention(k, q, v, w, backend="torch"), 1e-6)


def test_empty_inputs():
    w = _projection(16, 32)
    for shape in ((0, 5, 32), (2, 0, 32)):
        k, q, v = (torch.randn(shape) for _ in range(3))
        for backend in BACKENDS:
            assert favor_attention(k, q, v, w, backend=backend).shape == shape


@pytest.mark.parametrize("args,error,match", [
    ((torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(4, 6)), ValueError, "w must"),
    ((torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.randn(2, 3, 8), torch.randn(4, 8)), ValueError, "shape"),
    ((torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8), torch.randn(4, 8)), ValueError, "B, T, e"),
    ((torch.randn(2, 3, 8), torch.randn(2, 3, 8).half(), torch.randn(2, 3, 8), torch.randn(4, 8)), TypeError,
     "same dtype"),
    ((torch.randint(0, 3, (2, 3, 8)), torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(4, 8)), TypeError,
     "dtype"),
    ((torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8), [[1.0] * 8]), TypeError, "w must"),
])
def test_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        favor_attention(*args)


def test_bad_eps_backend_and_sizes():
    k, q, v = _kqv(1, 3, 8, torch.float32)
    w = torch.randn(4, 8)
    for eps in (-1.0, float("nan"), float("inf"), "1e-8"):
        with pytest.raises(ValueError, match="eps"):
            favor_attention(k, q, v, w, eps=eps)
    with pytest.raises(ValueError, match="backend"):
        favor_attention(k, q, v, w, backend="nope")
    if DEVICE == "cpu":
        with pytest.raises(BackendUnavailableError):
            favor_attention(k, q, v, w, backend="cuda")
    k, q, v = _kqv(1, 3, 96, torch.float32)
    with pytest.raises(BackendUnavailableError, match="at most 64"):
        favor_attention(k, q, v, torch.randn(4, 96), backend="triton")
    assert favor_attention(k, q, v, torch.randn(4, 96)).shape == (1, 3, 96)  # auto: torch path


# Finite rows whose |u|^2/2 overflows fp32 (and bf16): 1e20 squares to inf; 3e38 also overflows u w^T.
HUGE = (1e20, 3e38)
# The interpreter (NumPy) warns about the overflows in the discarded branches of tl.where.
_OVERFLOW_WARNINGS = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                                "ignore:invalid value encountered:RuntimeWarning")


def _with_huge_components(x, index, value):
    """A contiguous copy of ``x`` with the elements at ``index`` set to ``value``."""
    x = x.contiguous().clone()
    x[index] = value
    return x


@_OVERFLOW_WARNINGS
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("magnitude", HUGE)
def test_query_whose_half_norm_overflows(backend, dtype, magnitude):
    """A query with one huge component: the reference's features of that row are exp(finite - inf) = 0, so
    its y is 0 / eps = 0 (float64, where nothing overflows, agrees: its features underflow to 0). Was NaN on
    every backend (inf - inf in the shifts). Every other row, and every gradient, as float64."""
    w = _projection(32, 64)
    k, q, v = _kqv(2, 20, 64, dtype)
    q = _with_huge_components(q, (0, 3, 0), magnitude)
    grad = torch.randn(2, 20, 64).to(dtype)
    y, grads = _run(favor_attention, k, q, v, w, grad, backend=backend)
    y64, grads64 = _exact(k, q, v, w, grad)
    assert (y64[0, 3] == 0).all()
    if magnitude == 1e20:  # (at 3e38 the fp32 reference's u w^T overflows too: inf - inf, NaN)
        assert (favor_attention_ref(k, q, v, w)[0, 3] == 0).all()
    assert y[0, 3].float().abs().max() <= 1e-20  # 0 up to P S / e^EPS_LOG_CLAMP
    for name, ours, exact in zip(("y", "dk", "dq", "dv"), (y, *grads), (y64, *grads64)):
        assert_relative_close(ours, exact, RELATIVE_TOLERANCE[dtype], what=name)


def _limit_eps0(k, q, v, w, huge_rows):
    """float64 y at eps = 0 with the rows of q in ``huge_rows`` (a (B, T) mask) taken to the limit of a huge
    query along their direction: the reference's weights exp(q w_j^T) concentrate on j* = argmax_j q w_j^T,
    so y_t = sum_s kp_sj* v_s / sum_s kp_sj*. Differentiable (the limit depends on k and v only)."""
    k, q, v, w = (t.double() for t in (k, q, v, w))
    y = favor_attention_ref(k, torch.where(huge_rows[..., None], 0.0, q), v, w, eps=0.0)
    kp = torch.exp(k @ w.t() - 0.5 * (k * k).sum(-1, keepdim=True))                  # (B, T, m)
    top = (q.detach() @ w.t()).argmax(dim=-1)                                         # (B, T)
    kp_top = torch.gather(kp, 2, top[:, None, :].expand(-1, k.shape[1], -1))          # (B, T_k, T_q)
    y_limit = (kp_top.transpose(1, 2) @ v) / kp_top.sum(dim=1)[..., None]
    return torch.where(huge_rows[..., None], y_limit, y)


@_OVERFLOW_WARNINGS
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", HUGE)
def test_query_whose_half_norm_overflows_at_eps_0(backend, magnitude):
    """With eps = 0 the reference gives 0/0 on such a row; the limit of a growing query is the P-weighted
    average with P concentrated on its largest feature (worked out in float64 by _limit_eps0)."""
    w = _projection(16, 32)
    k, q, v = _kqv(2, 12, 32, torch.float32)
    q = _with_huge_components(q, (1, 5, 2), magnitude)
    grad = torch.randn(2, 12, 32)
    huge_rows = torch.zeros(2, 12, dtype=torch.bool)
    huge_rows[1, 5] = True
    y, grads = _run(favor_attention, k, q, v, w, grad, backend=backend, eps=0.0)
    y64, grads64 = _run(lambda k, q, v, w: _limit_eps0(k, q, v, w, huge_rows), *(t.double() for t in (k, q, v)),
                        w, grad.double())
    for name, ours, exact in zip(("y", "dk", "dq", "dv"), (y, *grads), (y64, *grads64)):
        assert_relative_close(ours, exact, 1e-5, what=name)


@_OVERFLOW_WARNINGS
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("magnitude", HUGE)
@pytest.mark.parametrize("eps", (1e-8, 0.0))
def test_keys_whose_half_norm_overflows(backend, dtype, magnitude, eps):
    """Image 0: two keys with a huge component, whose features are 0 in the reference: they add nothing.
    Image 1: every key that large, so the reference's S and D are 0 and y = 0 / eps = 0 (0/0 at eps = 0,
    where 0 is the only value without keys). Was NaN for the whole image (max of -inf logits, -inf - -inf)."""
    w = _projection(32, 64)
    k, q, v = _kqv(2, 20, 64, dtype)
    k = _with_huge_components(k, (0, [2, 5], 1), magnitude)
    k[1, :, 0] = magnitude
    grad = torch.randn(2, 20, 64).to(dtype)
    y, grads = _run(favor_attention, k, q, v, w, grad, backend=backend, eps=eps)
    assert (y[1] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert all((g[1] == 0).all() for g in grads)  # y is 0 for any nearby k, q, v of image 1
    if eps > 0:
        y64, grads64 = _exact(k, q, v, w, grad)
        if magnitude == 1e20:  # (at 3e38 the fp32 reference's k w^T overflows too: inf - inf, NaN)
            assert (favor_attention_ref(k, q, v, w)[1] == 0).all()
    else:
        y64, grads64 = _run(favor_attention_ref, *(t[:1].double() for t in (k, q, v)), w.double(),
                            grad[:1].double(), eps=0.0)
        y, grads = y[:1], [g[:1] for g in grads]
    for name, ours, exact in zip(("y", "dk", "dq", "dv"), (y, *grads), (y64, *grads64)):
        assert_relative_close(ours, exact, RELATIVE_TOLERANCE[dtype], what=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_key_makes_its_image_nan(backend):
    """A key with a NaN element: y of its image is NaN, as in the reference (its features enter S and z), and so
    are some of every gradient of that image (the reference's all: its denominator has no max(D, 1), which takes 1
    where D is NaN); the other image's y and gradients are those of the clean input."""
    w = _projection(32, 64)
    k, q, v = _kqv(2, 20, 64, torch.float32)
    k = k.clone()
    k[1, 5, 3] = float("nan")
    grad = torch.randn(2, 20, 64)
    y, grads = _run(favor_attention, k, q, v, w, grad, backend=backend)
    reference = _run(favor_attention_ref, k, q, v, w, grad)
    clean = _run(favor_attention, k.nan_to_num(0.0), q, v, w, grad, backend=backend)
    assert torch.isnan(y[1]).all() and torch.isnan(reference[0][1]).all()
    for ours, without in zip((y, *grads), (clean[0], *clean[1])):
        assert torch.isnan(ours[1]).any()
        torch.testing.assert_close(ours[0], without[0])


FROZEN_W_BACKENDS = ("torch", "triton", "cpp", "auto")


@pytest.mark.parametrize("backend", FROZEN_W_BACKENDS)
def test_w_requiring_grad_is_refused_on_every_backend(backend):
    """w is the frozen random matrix: no backend gives it a gradient, so a w that requires grad is refused
    while grad mode is on (instead of a gradient on some backends and silently none on others); under no_grad,
    or frozen as the model holds it (a parameter without grad, or a buffer), every backend runs."""
    k, q, v = (t.detach().clone().requires_grad_() for t in _kqv(1, 5, 32, torch.float32))
    w = _projection(16, 32)
    with pytest.raises(ValueError, match="frozen"):
        favor_attention(k, q, v, w.clone().requires_grad_(), backend=backend)
    reason = unavailable_reason(backend, DEVICE)
    if reason is not None:
        with pytest.raises(BackendUnavailableError):
            favor_attention(k, q, v, w, backend=backend)
        return
    expected = favor_attention(k, q, v, w, backend="torch")
    with torch.no_grad():
        assert_relative_close(favor_attention(k, q, v, w.clone().requires_grad_(), backend=backend), expected, 1e-5)

    class Layer(torch.nn.Module):
        def __init__(self, as_buffer):
            super().__init__()
            if as_buffer:
                self.register_buffer("w", w.clone())
            else:
                self.w = torch.nn.Parameter(w.clone(), requires_grad=False)

        def forward(self, k, q, v):
            return favor_attention(k, q, v, self.w, backend=backend)

    for as_buffer in (False, True):
        layer = Layer(as_buffer)
        y = layer(k, q, v)
        y.sum().backward()
        assert layer.w.grad is None and k.grad is not None
        assert_relative_close(y, expected, 1e-5)


def test_registered_op_refuses_w_requiring_grad():
    k, q, v = (t.detach().clone().requires_grad_() for t in _kqv(1, 5, 32, torch.float32))
    with pytest.raises(ValueError, match="frozen"):
        torch.ops.t2t_fast.favor_attention_fwd(k, q, v, _projection(16, 32).requires_grad_(), 1e-8)


def _op_args(batch=2, tokens=9, e=16, m=8, dtype=torch.float32):
    """Consistent arguments of the registered ops: (k, q, v, w, eps) and (grad_y, k, q, v, w, s, z, c_k, eps)."""
    k, q, v = _kqv(batch, tokens, e, dtype)
    w = _projection(m, e)
    _, s, z, c_k = torch.ops.t2t_fast.favor_attention_fwd(k, q, v, w, 1e-8)
    return (k, q, v, w, 1e-8), (torch.randn(batch, tokens, e).to(dtype), k, q, v, w, s, z, c_k, 1e-8)


def _replace(args, index, value):
    return args[:index] + (value,) + args[index + 1:]


def _bad_op_calls():
    """(name, op, args, exception, message) of direct calls with arguments that disagree."""
    fwd, bwd = _op_args()
    fwd_op, bwd_op = torch.ops.t2t_fast.favor_attention_fwd, torch.ops.t2t_fast.favor_attention_bwd
    k = fwd[0]
    return [
        ("q_tokens", fwd_op, _replace(fwd, 1, torch.randn(2, 5, 16)), ValueError, "same shape"),
        ("k_dims", fwd_op, _replace(fwd, 0, torch.randn(18, 16)), ValueError, r"\(B, T, e\)"),
        ("v_dtype", fwd_op, _replace(fwd, 2, fwd[2].half()), TypeError, "same dtype"),
        ("k_int", fwd_op, (k.int(), k.int(), k.int(), fwd[3], 1e-8), TypeError, "dtype int32"),
        ("w_width", fwd_op, _replace(fwd, 3, torch.randn(8, 15)), ValueError, "w must be"),
        ("w_too_many_features", fwd_op, _replace(fwd, 3, torch.randn(65, 16)), BackendUnavailableError,
         "at most 64"),
        ("float64", fwd_op, tuple(t.double() for t in fwd[:4]) + (1e-8,), BackendUnavailableError, "float64"),
        ("eps_nan", fwd_op, _replace(fwd, 4, float("nan")), ValueError, "eps"),
        ("grad_y_shape", bwd_op, _replace(bwd, 0, torch.randn(2, 9, 15)), ValueError, "grad_y"),
        ("grad_y_dtype", bwd_op, _replace(bwd, 0, bwd[0].double()), TypeError, "grad_y"),
        ("s_shape", bwd_op, _replace(bwd, 5, bwd[5][:1]), ValueError, r"s must be \(2, 8, 16\)"),
        ("s_dtype", bwd_op, _replace(bwd, 5, bwd[5].half()), TypeError, "s has dtype"),
        ("z_shape", bwd_op, _replace(bwd, 6, bwd[6][:, :3]), ValueError, "z must be"),
        ("c_k_shape", bwd_op, _replace(bwd, 7, bwd[7].reshape(-1)), ValueError, "c_k must be"),
        ("bwd_k_tokens", bwd_op, _replace(bwd, 1, torch.randn(2, 4, 16)), ValueError, "same shape"),
    ]


@pytest.fixture(scope="module")
def bad_op_calls():
    with torch.device(DEVICE):
        return {name: call for name, *call in _bad_op_calls()}


BAD_OP_CALLS = ("q_tokens", "k_dims", "v_dtype", "k_int", "w_width", "w_too_many_features", "float64", "eps_nan",
                "grad_y_shape", "grad_y_dtype", "s_shape", "s_dtype", "z_shape", "c_k_shape", "bwd_k_tokens")


@pytest.mark.parametrize("case", BAD_OP_CALLS)
def test_registered_ops_reject_inconsistent_arguments(case, bad_op_calls):
    """torch.ops.t2t_fast.favor_attention_fwd / _bwd are public: called directly with arguments that disagree,
    they raise the wrapper's clear errors before any kernel runs."""
    assert set(bad_op_calls) == set(BAD_OP_CALLS)
    op, args, error, match = bad_op_calls[case]
    with pytest.raises(error, match=match):
        op(*args)


# Direct calls that read out of bounds without the checks (a crash, or NaN / garbage from memory that is not
# the tensors'): run in a subprocess, so a crash fails these tests instead of killing the run.
REPRODUCERS = {
    "k_300000_tokens_v_3": ("fwd(torch.randn(1, 300000, 16), torch.randn(1, 300000, 16), torch.randn(1, 3, 16), "
                            "w, 1e-8)", "ValueError", "same shape"),
    "q_short": ("fwd(torch.randn(2, 4000, 16), torch.randn(2, 3, 16), torch.randn(2, 4000, 16), w, 1e-8)",
                "ValueError", "same shape"),
    "w_128_features": ("fwd(k, k, k, torch.randn(128, 16), 1e-8)", "BackendUnavailableError", "at most 64"),
    "s_of_one_image": ("bwd(k, k, k, k, w, s[:1], z, c, 1e-8)", "ValueError", "s must be"),
    "z_short": ("bwd(k, k, k, k, w, s, z[:, :2], c, 1e-8)", "ValueError", "z must be"),
    "grad_y_short": ("bwd(k[:, :5], k, k, k, w, s, z, c, 1e-8)", "ValueError", "grad_y must have"),
    "s_for_w_of_64_features": ("bwd(k, k, k, k, torch.randn(64, 16), s, z, c, 1e-8)", "ValueError", "s must be"),
}

_REPRODUCER_SETUP = """
import t2t_fast.ops  # registers the custom ops
torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")
fwd, bwd = torch.ops.t2t_fast.favor_attention_fwd, torch.ops.t2t_fast.favor_attention_bwd
k, w = torch.randn(2, 300, 16), torch.randn(8, 16)
_, s, z, c = fwd(k, k, k, w, 1e-8)
"""


@pytest.fixture(scope="module")
def reproducer_outcomes(tmp_path_factory):
    """REPRODUCERS run one after the other in one subprocess (see :func:`run_calls_in_subprocess`)."""
    return run_calls_in_subprocess(_REPRODUCER_SETUP, {name: call for name, (call, _, _) in REPRODUCERS.items()},
                                   cwd=tmp_path_factory.mktemp("reproducers"))


@pytest.mark.parametrize("case", list(REPRODUCERS))
def test_out_of_bounds_direct_calls_raise_instead(case, reproducer_outcomes):
    _, kind, match = REPRODUCERS[case]
    assert_call_raised(*reproducer_outcomes, case, kind, match)


OP_ERRORS = (ValueError, TypeError, BackendUnavailableError)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def direct_op_calls(draw):
    """Arguments of the registered ops: a consistent set (tiny sizes, the interpreter is slow), then zero to
    three parts of it replaced by random values (some of which still agree)."""
    sizes = dict(batch=draw(st.integers(0, 2)), tokens=draw(st.integers(0, 40)), e=draw(st.integers(1, 70)),
                 m=draw(st.integers(1, 70)))
    shapes = {name: [sizes["batch"], sizes["tokens"], sizes["e"]] for name in ("k", "q", "v", "grad_y")}
    shapes.update(w=[sizes["m"], sizes["e"]], s=[sizes["batch"], sizes["m"], sizes["e"]],
                  z=[sizes["batch"], sizes["m"]], c_k=[sizes["batch"], sizes["m"]])
    dtype = draw(st.sampled_from(_DTYPES))
    dtypes = dict.fromkeys(("k", "q", "v", "grad_y"), dtype)
    dtypes.update(w=draw(st.sampled_from((torch.float32, torch.float64))), s=torch.float32, z=torch.float32,
                  c_k=torch.float32)
    eps = 1e-8
    changes = st.lists(st.sampled_from(["size", "dims", "dtype", "eps"]), min_size=draw(st.sampled_from([0, 1, 1])),
                       max_size=3)
    for change in draw(changes):
        name = draw(st.sampled_from(sorted(shapes)))
        if change == "size" and shapes[name]:
            shape = shapes[name]
            shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 300))
        elif change == "dims":
            shapes[name] = draw(st.lists(st.integers(0, 20), max_size=4))
        elif change == "dtype":
            dtypes[name] = draw(st.sampled_from((torch.float64, torch.int32, torch.bool) + _DTYPES))
        else:
            eps = draw(st.sampled_from([0.0, -1.0, float("inf"), float("nan"), 1e300]))
    return dict(sizes=sizes, shapes=shapes, dtypes=dtypes, eps=eps, strided=draw(st.booleans()))


def _random_tensor(shape, dtype, strided=False):
    if not dtype.is_floating_point:
        return torch.randint(0, 2, shape).to(dtype)
    x = torch.randn([*shape[:-1], 2 * shape[-1]] if strided and shape else shape, dtype=torch.float64) * 0.5
    return (x[..., ::2] if strided and shape else x).to(dtype)


def _consistent(call):
    """(forward, backward): whether the registered ops must accept ``call``, their contract written out
    independently of the op's code."""
    shapes, dtypes, eps = call["shapes"], call["dtypes"], call["eps"]
    k, w = shapes["k"], shapes["w"]
    forward = (len(k) == 3 and shapes["q"] == k and shapes["v"] == k and len(w) == 2 and w[1] == k[2]
               and 1 <= w[0] <= 64 and 1 <= k[2] <= 64 and dtypes["k"] in _DTYPES
               and dtypes["q"] == dtypes["v"] == dtypes["k"] and dtypes["w"].is_floating_point and 0 <= eps < math.inf)
    backward = (forward and shapes["grad_y"] == k and shapes["s"] == [k[0], w[0], k[2]]
                and shapes["z"] == shapes["c_k"] == [k[0], w[0]] and dtypes["grad_y"] == dtypes["k"]
                and all(dtypes[n] == torch.float32 for n in ("s", "z", "c_k")))
    return forward, backward


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=direct_op_calls())
def test_registered_ops_raise_or_match_the_torch_backend(call):
    """torch.ops.t2t_fast.favor_attention_fwd / _bwd called directly with arguments that mostly disagree with
    each other: a clear ValueError / TypeError / BackendUnavailableError, or, exactly when the arguments are
    consistent, the torch backend's result: never a crash, never numbers from tensors that are not there."""
    shapes, dtypes, eps = call["shapes"], call["dtypes"], call["eps"]
    t = {name: _random_tensor(shapes[name], dtypes[name], call["strided"] and name in ("k", "q", "v"))
         for name in shapes}
    forward_ok, backward_ok = _consistent(call)
    try:
        with poison_outputs():
            y, s, z, c_k = torch.ops.t2t_fast.favor_attention_fwd(t["k"], t["q"], t["v"], t["w"], eps)
    except OP_ERRORS as exc:
        assert not forward_ok, exc
        assert str(exc).startswith("favor_attention: "), exc
    else:
        assert forward_ok, "accepted inconsistent arguments"
        expected = favor_attention(t["k"], t["q"], t["v"], t["w"], eps=eps, backend="torch")
        assert y.shape == expected.shape and y.dtype == expected.dtype
        if y.numel():
            assert_relative_close(y, expected, RELATIVE_TOLERANCE[t["k"].dtype], what="y")
        if backward_ok:  # the forward's own state, so that the gradients can be checked
            t.update(s=s, z=z, c_k=c_k)
    try:
        with poison_outputs():
            grads = torch.ops.t2t_fast.favor_attention_bwd(t["grad_y"], t["k"], t["q"], t["v"], t["w"], t["s"],
                                                           t["z"], t["c_k"], eps)
    except OP_ERRORS as exc:
        assert not backward_ok, exc
        assert str(exc).startswith("favor_attention: "), exc
        return
    assert backward_ok, "accepted inconsistent arguments"
    leaves = [t[name].detach().clone().requires_grad_() for name in ("k", "q", "v")]
    expected = torch.autograd.grad(favor_attention(*leaves, t["w"], eps=eps, backend="torch"), leaves,
                                   t["grad_y"], allow_unused=True)
    expected = [torch.zeros_like(x) if g is None else g for g, x in zip(expected, leaves)]
    scale = max([g.double().abs().max().item() for g in expected if g.numel()] + [1e-30])
    for name, ours, exact in zip(("dk", "dq", "dv"), grads, expected):
        assert ours.shape == exact.shape and ours.dtype == exact.dtype, name
        err = (ours.double() - exact.double()).abs().max().item() if ours.numel() else 0.0
        assert err <= RELATIVE_TOLERANCE[ours.dtype] * scale, f"{name}: error {err:.2e} at scale {scale:.2e}"


@st.composite
def wrapper_inputs(draw):
    """favor_attention arguments the wrapper accepts: shapes, layouts, dtypes (float64 too), eps, w of the
    official kind or random, and rows with huge components."""
    batch, tokens = draw(st.integers(1, 2)), draw(st.integers(1, 24))
    e, m = draw(st.integers(1, 72)), draw(st.integers(1, 72))
    dtype = draw(st.sampled_from(_DTYPES + (torch.float64,)))
    layout = draw(st.sampled_from(["split", "contiguous", "transposed"]))
    scale = draw(st.sampled_from([0.1, 0.5, 1.0]))
    # tensors from a generator seeded by the example, so that Hypothesis replays the same values
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cpu").to(DEVICE)

    if layout == "split":
        k, q, v = (randn(batch, tokens, 3 * e) * scale).to(dtype).split(e, dim=-1)
    elif layout == "contiguous":
        k, q, v = ((randn(batch, tokens, e) * scale).to(dtype) for _ in range(3))
    else:
        k, q, v = ((randn(batch, e, tokens) * scale).to(dtype).transpose(1, 2) for _ in range(3))
    if dtype != torch.float16 and draw(st.booleans()):
        name, value = draw(st.sampled_from("kq")), draw(st.sampled_from(HUGE))
        huge = _with_huge_components(dict(k=k, q=q)[name], (0, draw(st.integers(0, tokens - 1)), 0), value)
        k, q = (huge, q) if name == "k" else (k, huge)
    official = m <= e and draw(st.booleans())
    w = (torch.nn.init.orthogonal_(torch.empty(m, e, device="cpu"), generator=generator).to(DEVICE) * math.sqrt(m)
         if official else randn(m, e) * draw(st.sampled_from([0.3, 1.0])))
    eps = draw(st.sampled_from([1e-8, 0.0, 1e-3, 10.0]))
    return k, q, v, w, eps


def _outcome(backend, k, q, v, w, eps, grad):
    """(y, (dk, dq, dv)) of ``backend``, or the exception it raised."""
    leaves = [t.detach().clone().requires_grad_() for t in (k, q, v)]
    try:
        with poison_outputs():
            y = favor_attention(*leaves, w, eps=eps, backend=backend)
            y.backward(grad)
    except Exception as exc:  # compared between the backends below
        return exc
    return y.detach(), [t.grad for t in leaves]


@_OVERFLOW_WARNINGS
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=wrapper_inputs())
def test_torch_and_triton_backends_agree_or_raise_alike(inputs):
    """For inputs the wrapper accepts, the triton and torch backends give the same y and gradients within
    the dtype's tolerance, or raise the same exception type; triton may instead refuse what its kernels do not
    take (float64, m or e > 64), with BackendUnavailableError. cpp runs the torch implementation for this op."""
    k, q, v, w, eps = inputs
    grad = torch.randn(k.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(k.numel()),
                       device="cpu").to(DEVICE, k.dtype)
    torch_outcome = _outcome("torch", k, q, v, w, eps, grad)
    triton_outcome = _outcome("triton", k, q, v, w, eps, grad)
    if isinstance(torch_outcome, Exception):
        assert type(triton_outcome) is type(torch_outcome), (torch_outcome, triton_outcome)
        return
    if isinstance(triton_outcome, BackendUnavailableError):
        assert k.dtype == torch.float64 or max(w.shape) > 64, triton_outcome
        return
    assert not isinstance(triton_outcome, Exception), triton_outcome
    tolerance = RELATIVE_TOLERANCE[k.dtype]
    (y_torch, grads_torch), (y_triton, grads_triton) = torch_outcome, triton_outcome
    assert_relative_close(y_triton, y_torch, tolerance, what="y")
    # Gradients at the scale of the largest: dq and dk can be pure cancellations (one token: O(eps)).
    scale = max(g.double().abs().max().item() for g in grads_torch)
    for name, ours, theirs in zip(("dk", "dq", "dv"), grads_triton, grads_torch):
        assert torch.isfinite(ours).all(), name
        err = (ours.double() - theirs.double()).abs().max().item()
        assert err <= tolerance * max(scale, 1e-30), f"{name}: error {err:.2e} at scale {scale:.2e}"
    if DEVICE == "cpu" and unavailable_reason("cpp", "cpu") is None:
        y_cpp, grads_cpp = _outcome("cpp", k, q, v, w, eps, grad)
        assert torch.equal(y_cpp, y_torch) and all(torch.equal(a, b) for a, b in zip(grads_cpp, grads_torch))
