"""The AMX linear (t2t_fast.ops.amx_linear): bfloat16 y = x W^T + b (+ exact GELU) on AMX tiles against float64,
within twice the error of torch's own bf16 linear, for the backbone's shapes and sizes off the 32-row and
32-feature tiles, strided rows, no bias, one row; determinism across thread counts; the weight packing cache;
which path runs when (dtype, sizes, gradient, instruction set, backend); the choice in t2t_fast.onednn and the
logits path; its custom-op registration; and the extension's own argument checks. The kernel's tests need a CPU
with AMX; the reasons it gives elsewhere are checked everywhere."""
import copy
import importlib

import pytest
import torch

import t2t_fast
from t2t_fast import onednn
from t2t_fast._native import native_cpu_isas, native_module
from t2t_fast.backend import BackendUnavailableError, set_cpu_isa
from t2t_fast.ops import amx_linear, amx_linear_ref
from t2t_fast.testing import assert_within_reference_error, poison_outputs, results_at_thread_counts

amx_module = importlib.import_module("t2t_fast.ops.amx_linear")
needs_amx = pytest.mark.skipif("amx" not in native_cpu_isas(), reason="needs a CPU with AMX tiles")
LINEAR = torch.ops.t2t_fast.amx_linear_cpp


def _case(rows, in_features, out_features, bias=True):
    x = torch.randn(*rows, in_features).bfloat16()
    weight = (torch.randn(out_features, in_features) / in_features ** 0.5).bfloat16()
    return x, weight, (torch.randn(out_features).bfloat16() if bias else None)


def _check(out, x, weight, bias, gelu):
    exact = amx_linear_ref(x.double(), weight.double(), None if bias is None else bias.double(), gelu)
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    assert_within_reference_error(out, amx_linear_ref(x, weight, bias, gelu), exact, what="amx_linear")


def _amx(x, weight, bias, gelu):
    with torch.no_grad(), poison_outputs():
        return LINEAR(x, amx_module.packed_weight(weight), bias, weight.shape[0], gelu)


# (rows, in, out): the backbone's qkv, proj, fc1 and fc2 at batch 1, the T2T project at batch 1, rows off the
# 32-row blocks (1, 31, 33) and many blocks, the narrowest features, fewer feature pairs than threads.
SHAPES = (((1, 197), 384, 1152), ((1, 197), 384, 384), ((1, 197), 1152, 384), ((196,), 576, 384), ((1,), 64, 32),
          ((31,), 32, 64), ((2, 33), 96, 128), ((1000,), 64, 64), ((5,), 128, 32))


@needs_amx
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], s[1], s[2]))))
def test_matches_float64_reference(shape, gelu):
    rows, in_features, out_features = shape
    x, weight, bias = _case(rows, in_features, out_features)
    out = _amx(x, weight, bias, gelu)
    _check(out, x, weight, bias, gelu)
    with torch.no_grad():
        assert torch.equal(amx_linear(x, weight, bias, gelu), out)


@needs_amx
def test_no_bias_strided_rows_and_large_values():
    """No bias; rows that are a view into wider rows; GELU's tails (|x| past 10, where erf saturates)."""
    x, weight, _ = _case((2, 40), 128, 96, bias=False)
    wide = torch.cat([x, torch.randn(2, 40, 32).bfloat16()], dim=-1)[..., :128]
    assert not wide.is_contiguous()
    _check(_amx(wide, weight, None, False), wide, weight, None, False)
    loud = x * 40
    _check(_amx(loud, weight, None, True), loud, weight, None, True)


@needs_amx
def test_deterministic_across_thread_counts():
    """The work splits by output features (or, with fewer feature pairs than threads, by rows): alike at 1 and 2
    threads."""
    for shape in (((197,), 384, 1152), ((197,), 64, 32)):
        x, weight, bias = _case(*shape)
        one, two = results_at_thread_counts(lambda: _amx(x, weight, bias, True))
        assert torch.equal(one, two)


@needs_amx
def test_packed_weight_follows_changes():
    x, weight, bias = _case((9,), 64, 64)
    first = amx_module.packed_weight(weight)
    assert amx_module.packed_weight(weight) is first
    with torch.no_grad():
        weight.mul_(-1)
    assert amx_module.packed_weight(weight) is not first
    _check(_amx(x, weight, bias, False), x, weight, bias, False)


@needs_amx
def test_kernel_choice(calls_of):
    """The kernel runs for bf16 without a gradient; fp32, features off 32, a gradient, another instruction set or
    backend='torch' run F.linear; a forced 'cpp' that cannot take the input raises."""
    calls = calls_of(amx_module, "_cpp_op")
    x, weight, bias = _case((3,), 64, 96)
    with torch.no_grad():
        amx_linear(x, weight, bias)
        amx_linear(x, weight, bias, backend="cpp")
        assert len(calls) == 2
        amx_linear(x, weight, bias, backend="torch")
        amx_linear(x.float(), weight.float(), bias.float())
        amx_linear(x[..., :48], weight[:, :48], bias)
    leaf = x.clone().requires_grad_()
    amx_linear(leaf, weight, bias).float().sum().backward()
    assert leaf.grad is not None
    set_cpu_isa("avx512")
    try:
        with torch.no_grad():
            amx_linear(x, weight, bias)
            with pytest.raises(BackendUnavailableError, match="instruction set is avx512"):
                amx_linear(x, weight, bias, backend="cpp")
    finally:
        set_cpu_isa(None)
    assert len(calls) == 2
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match="multiples of 32"):
        amx_linear(x[..., :48], weight[:, :48], bias, backend="cpp")


def test_reasons_without_the_kernel():
    """Every CPU: what the kernel cannot take says why; the reference path runs (forward and gradient)."""
    x, weight, bias = _case((4,), 64, 64)
    reason = amx_module.cpp_unsupported(x.float(), weight.float(), bias.float())
    assert any(why in reason for why in ("bfloat16", "instruction set", "extension")), reason
    with torch.inference_mode():
        frozen = weight.clone()
    if "amx" in native_cpu_isas():
        assert "inference_mode" in amx_module.cpp_unsupported(x, frozen, bias)
        assert "strides" in amx_module.cpp_unsupported(torch.randn(64, 4).bfloat16().t(), weight, bias)
    leaf = x.float().requires_grad_()
    out = amx_linear(leaf, weight.float(), bias.float(), gelu=True)
    exact = amx_linear_ref(x.double(), weight.double(), bias.double(), True)
    assert (out.double() - exact).abs().max() < 1e-5
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("args,error,match", [
    ((torch.randn(2, 8), torch.randn(4, 6)), ValueError, "do not match"),
    ((torch.randn(2, 8), torch.randn(4, 8), torch.randn(3)), ValueError, "bias must be"),
    ((torch.randn(2, 8), torch.randn(4, 8), None, 1), TypeError, "gelu must be a bool"),
    ((torch.randn(2, 8).long(), torch.randn(4, 8)), TypeError, "x has dtype"),
], ids=("shapes", "bias", "gelu", "dtype"))
def test_invalid_arguments(args, error, match):
    with pytest.raises(error, match=match):
        amx_linear(*args)


@needs_amx
def test_onednn_linear_takes_the_tiles_at_few_rows(calls_of):
    """t2t_fast.onednn.linear (an optimize_for_inference model's linears) runs the kernel up to
    AMX_LINEAR_MAX_ROWS bf16 rows with features off 32, oneDNN's primitive past it, and nothing of it during a
    torch.compile trace."""
    runs = calls_of(onednn, "_amx_run")
    x, weight, bias = _case((197,), 384, 384)
    big = torch.randn(onednn.AMX_LINEAR_MAX_ROWS + 1, 384).bfloat16()
    with torch.no_grad():
        out = onednn.linear(x, weight, bias, True)
        assert len(runs) == 1
        onednn.linear(big, weight, bias)
        onednn.linear(x[:, :352], weight[:352, :352], bias[:352])
        onednn.linear(x, weight[:100], bias[:100])
    assert len(runs) == 2  # 352 features: a multiple of 32; 100 output features: oneDNN
    _check(out, x, weight, bias, True)
    compiled = torch.compile(lambda x: onednn.linear(x, weight, bias), fullgraph=True)
    with torch.no_grad():
        compiled(x)
    assert len(runs) == 2


@needs_amx
def test_logits_path_runs_the_tiles(calls_of):
    """At batch 1 every backbone linear of a bf16 optimize_for_inference model runs on the tiles (those of all
    blocks but the last inside t2t_fast.ops.encoder_blocks), the logits within twice the bf16 reference's error of
    float64."""
    runs = calls_of(onednn, "_amx_run")
    encoded = calls_of(importlib.import_module("t2t_fast.inference"), "encoder_blocks_cpp")
    model = t2t_fast.create_model("t2t_vit_7", img_size=64).eval()
    fast = t2t_fast.optimize_for_inference(model, torch.bfloat16)
    images = torch.randn(1, 3, 64, 64)
    logits = fast(images)
    assert len(runs) + 4 * sum(len(call[1]) for call in encoded) >= 4 * len(model.blocks)
    with torch.no_grad():
        reference = copy.deepcopy(model).bfloat16()(images.bfloat16()).float()
        exact = model.double()(images.double())
    assert_within_reference_error(logits, reference, exact, what="logits")


@needs_amx
def test_op_registration():
    x, weight, bias = _case((5,), 64, 32)
    packed = amx_module.packed_weight(weight)
    torch.library.opcheck(LINEAR, (x, packed, bias, 32, True))
    # under torch.compile the wrapper takes the torch path (the packing is made outside graphs)
    fn = torch.compile(lambda x: amx_linear(x, weight, bias, True), fullgraph=True)
    with torch.no_grad():
        _check(fn(x), x, weight, bias, True)


@needs_amx
def test_extension_checks_its_buffers():
    x, weight, bias = _case((4,), 64, 32)
    packed, y = amx_module.packed_weight(weight), torch.empty(4, 32, dtype=torch.bfloat16)
    args = dict(x=(x.data_ptr(), x.numel(), 64), rows=4, packed=(packed.data_ptr(), packed.numel()), out_features=32,
                in_features=64, bias=(bias.data_ptr(), bias.numel()), gelu=False, y=(y.data_ptr(), y.numel()),
                threads=1)
    native_module().linear_forward_cpu(**args)
    for changes, match in ((dict(rows=5), "x holds 256"), (dict(y=(y.data_ptr(), 127)), "y holds 127"),
                           (dict(in_features=48), "multiples of 32"), (dict(bias=(bias.data_ptr(), 31)), "bias holds"),
                           (dict(packed=(packed.data_ptr(), 100)), "packed holds"),
                           (dict(x=(x.data_ptr(), x.numel(), 32)), "row stride"), (dict(rows=0), "positive")):
        with pytest.raises(ValueError, match=match):
            native_module().linear_forward_cpu(**{**args, **changes})
    with pytest.raises(ValueError, match="packed holds"):
        native_module().linear_pack_weight_cpu((weight.data_ptr(), weight.numel()), 32, 64, (packed.data_ptr(), 10))
