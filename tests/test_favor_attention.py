"""favor_attention (fused FAVOR+): forward and gradients against the float64 reference, for the Triton
kernels (on CUDA tensors where a GPU is present, else on CPU tensors in the interpreter) and the stabilised
torch backend; overflow safety in fp16; strided views; custom-op registration (opcheck, torch.compile);
input validation."""
import math

import pytest
import torch

from t2t_fast.backend import BackendUnavailableError
from t2t_fast.ops import favor_attention, favor_attention_ref
from t2t_fast.testing import (RELATIVE_TOLERANCE, assert_relative_close, assert_within_reference_error,
                              poison_outputs, relative_error)

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
    with pytest.raises(ValueError, match="float64"):
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
    with pytest.raises(ValueError, match="at most 64"):
        favor_attention(k, q, v, torch.randn(4, 96), backend="triton")
    assert favor_attention(k, q, v, torch.randn(4, 96)).shape == (1, 3, 96)  # auto: torch path
