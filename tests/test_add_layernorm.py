"""The residual add + LayerNorm op (t2t_fast.ops.add_layernorm): its C++ kernel in float32 and bfloat16 on every
ISA this CPU runs against the float64 reference (the sum exactly as torch's add rounds it; the LayerNorm to 1e-5
in float32 and within twice the bf16 reference's error in bfloat16), odd widths and strided inputs, which path
runs when (dtype, gradient, backend), its custom-op registration, and the extension's own argument checks."""
import importlib

import pytest
import torch

from t2t_fast import backend
from t2t_fast._native import native_module, native_vector_isas
from t2t_fast.ops import add_layernorm, add_layernorm_ref
from t2t_fast.testing import (assert_relative_close, assert_within_reference_error, poison_outputs,
                              results_at_thread_counts)

add_layernorm_module = importlib.import_module("t2t_fast.ops.add_layernorm")
needs_extension = pytest.mark.skipif(backend.unavailable_reason("cpp", "cpu") is not None,
                                     reason="needs the native extension")
ADD_LAYERNORM = torch.ops.t2t_fast.add_layernorm_cpp


def _inputs(shape, dtype):
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    residual = torch.randn(shape).to(dtype)
    width = shape[-1]
    return x, residual, torch.randn(width) * 0.5 + 1, torch.randn(width) * 0.1


def _cpp(*args, eps=1e-5):
    with torch.no_grad(), poison_outputs():
        return ADD_LAYERNORM(*args, eps)


def _check(total, normed, x, residual, weight, bias, eps=1e-5):
    expected_total, expected_normed = add_layernorm_ref(x, residual, weight, bias, eps)
    assert total.dtype == normed.dtype == x.dtype and total.shape == normed.shape == x.shape
    assert torch.equal(total, expected_total)  # the add in the dtype, rounded as torch rounds it
    exact = torch.nn.functional.layer_norm(total.double(), x.shape[-1:], weight.double(), bias.double(), eps)
    if x.dtype == torch.float32:
        assert_relative_close(normed, exact, 1e-5, what="normed")
    else:
        assert_within_reference_error(normed, expected_normed, exact, what="normed")


# the backbone's rows (197 tokens, 384 and 768 wide), the T2T layers' 64, widths off the 16 lanes, one element
SHAPES = ((2, 197, 384), (1, 197, 768), (3, 50, 64), (5, 147), (2, 3, 17), (1, 1, 1), (4, 1, 33))


@needs_extension
@pytest.mark.parametrize("isa", native_vector_isas())
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, dtype, isa, monkeypatch):
    monkeypatch.setenv(backend.CPU_ISA_ENV_VAR, isa)
    inputs = _inputs(shape, dtype)
    total, normed = _cpp(*inputs)
    _check(total, normed, *inputs)


@needs_extension
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_strided_inputs_and_parameters(dtype):
    """The cls rows of a (B, T, C) stream (row stride T*C), an expanded residual, bf16 affine parameters."""
    stream, residual, weight, bias = _inputs((3, 20, 48), dtype)
    x = stream[:, :1]
    cls_residual = residual[:, :1]
    _check(*_cpp(x, cls_residual, weight, bias), x, cls_residual, weight, bias)
    expanded = torch.randn(1, 1, 48).to(dtype).expand(3, 20, 48)
    _check(*_cpp(stream, expanded, weight, bias), stream, expanded, weight, bias)
    transposed = stream.transpose(0, 1).contiguous().transpose(0, 1)
    _check(*_cpp(transposed, residual, weight, bias), transposed, residual, weight, bias)
    low_weight, low_bias = weight.to(dtype), bias.to(dtype)
    total, normed = _cpp(stream, residual, low_weight, low_bias)
    expected = add_layernorm_ref(stream.double(), residual.double(), low_weight.double(), low_bias.double(), 1e-5)
    assert_relative_close(normed, expected[1], 1e-2 if dtype == torch.bfloat16 else 1e-5)


@needs_extension
def test_nan_and_large_values_stay_in_their_rows():
    """A NaN makes its own row NaN only; a row of ~1e15 (squares near float32's limit) is normalised as any."""
    x, residual, weight, bias = _inputs((4, 40), torch.float32)
    x[1, 3] = float("nan")
    x[2] *= 1e15
    total, normed = _cpp(x, residual, weight, bias)
    assert torch.isnan(normed[1]).all() and torch.isfinite(normed[[0, 2, 3]]).all()
    _check(total[[0, 2, 3]], normed[[0, 2, 3]], x[[0, 2, 3]], residual[[0, 2, 3]], weight, bias)


@needs_extension
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_deterministic_across_thread_counts(dtype):
    inputs = _inputs((8, 197, 384), dtype)
    one, two = results_at_thread_counts(lambda: _cpp(*inputs))
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.fixture
def cpp_calls(calls_of):
    """The calls of the C++ forward the wrapper makes (directly in eager mode, or through its custom op)."""
    return calls_of(add_layernorm_module, "run_cpp")


@needs_extension
def test_kernel_choice(cpp_calls):
    """The kernel runs for float32 and bfloat16 without a gradient; float16, float64, a gradient, or
    backend='torch' run the reference path (which trains), also where 'cpp' is forced (as a forced model's
    other ops do)."""
    inputs = _inputs((2, 9, 32), torch.bfloat16)
    with torch.no_grad():
        add_layernorm(*inputs)
        add_layernorm(inputs[0].float(), inputs[1].float(), *inputs[2:], backend="cpp")
    assert len(cpp_calls) == 2
    with torch.no_grad():
        add_layernorm(*inputs, backend="torch")
        add_layernorm(inputs[0].half(), inputs[1].half(), *inputs[2:])
        add_layernorm(inputs[0].double(), inputs[1].double(), *inputs[2:])
    x = inputs[0].float().requires_grad_()
    weight = inputs[2].clone().requires_grad_()
    total, normed = add_layernorm(x, inputs[1].float(), weight, inputs[3], backend="cpp")
    (total.sum() + normed.square().sum()).backward()
    with torch.no_grad():
        add_layernorm(inputs[0].half(), inputs[1].half(), *inputs[2:], backend="cpp")
    assert len(cpp_calls) == 2 and x.grad is not None and weight.grad is not None
    with torch.inference_mode():
        empty = torch.empty(0, 9, 32)
        assert [t.shape for t in add_layernorm(empty, empty, *inputs[2:])] == [(0, 9, 32)] * 2


def test_reference_path_gradients():
    """Every CPU runs the op: float32 with gradients (never the kernel) against float64, forward and every
    gradient."""
    x, residual, weight, bias = (t.float().requires_grad_() for t in _inputs((2, 7, 24), torch.float32))
    total, normed = add_layernorm(x, residual, weight, bias)
    grads = torch.randn_like(total), torch.randn_like(normed)
    got = torch.autograd.grad((total, normed), (x, residual, weight, bias), grads)
    leaves = [t.detach().double().requires_grad_() for t in (x, residual, weight, bias)]
    exact = add_layernorm_ref(*leaves, 1e-5)
    assert_relative_close(normed, exact[1], 1e-5)
    expected = torch.autograd.grad(exact, leaves, [g.double() for g in grads])
    for name, actual, wanted in zip(("dx", "dresidual", "dweight", "dbias"), got, expected):
        assert_relative_close(actual, wanted, 1e-5, what=name)


@pytest.mark.parametrize("change,error,match", [
    (dict(residual=torch.randn(2, 5, 9)), ValueError, "one shape"),
    (dict(x=torch.tensor(1.0), residual=torch.tensor(1.0)), ValueError, "at least one dim"),
    (dict(residual=torch.randn(2, 5, 8).double()), TypeError, "one dtype"),
    (dict(weight=torch.randn(9)), ValueError, "weight and bias must be \\(8,\\)"),
    (dict(bias=torch.randn(2, 4)), ValueError, "weight and bias must be \\(8,\\)"),
    (dict(eps=-1.0), ValueError, "eps must be a finite non-negative number"),
    (dict(x=torch.arange(80).view(2, 5, 8)), TypeError, "x has dtype int64"),
], ids=("shape", "scalar", "dtype", "weight", "bias", "eps", "int"))
def test_invalid_arguments(change, error, match):
    args = dict(x=torch.randn(2, 5, 8), residual=torch.randn(2, 5, 8), weight=torch.ones(8), bias=torch.zeros(8),
                eps=1e-5)
    with pytest.raises(error, match=match):
        add_layernorm(**{**args, **change})


@needs_extension
def test_op_registration():
    """opcheck of the custom op, and torch.compile(fullgraph=True) of a no-grad call equal to eager."""
    inputs = _inputs((2, 9, 32), torch.bfloat16)
    torch.library.opcheck(ADD_LAYERNORM, (*inputs, 1e-5))
    fn = torch.compile(lambda *args: add_layernorm(*args), fullgraph=True)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fn(*inputs), add_layernorm(*inputs)))


@needs_extension
def test_extension_checks_its_buffers():
    x, residual, weight, bias = _inputs((4, 16), torch.float32)
    total, normed = torch.empty_like(x), torch.empty_like(x)
    args = dict(x=(x.data_ptr(), 64, 16), residual=(residual.data_ptr(), 64, 16), dtype=0, rows=4, features=16,
                weight=(weight.data_ptr(), 16), bias=(bias.data_ptr(), 16), eps=1e-5,
                sum=(total.data_ptr(), 64), normed=(normed.data_ptr(), 64), isa="baseline", threads=1)
    native_module().add_layernorm_forward_cpu(**args)
    for changes, match in ((dict(rows=5), "x holds 64"), (dict(normed=(normed.data_ptr(), 63)), "normed holds 63"),
                           (dict(weight=(weight.data_ptr(), 15)), "weight holds 15"),
                           (dict(residual=(residual.data_ptr(), 64, 8)), "row stride of residual"),
                           (dict(dtype=1), "float32 or bfloat16"), (dict(eps=float("nan")), "eps"),
                           (dict(features=0), "positive"), (dict(isa="sse"), "unknown CPU kernel ISA")):
        with pytest.raises(ValueError, match=match):
            native_module().add_layernorm_forward_cpu(**{**args, **changes})
