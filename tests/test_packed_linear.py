"""The packed-weight linear (t2t_fast.ops.packed_linear): y = x W^T + b (+ exact GELU), bfloat16 on AMX tiles or
AVX512-BF16 and float32 on AVX-512, against float64 within twice the error of torch's own linear in the dtype, for
the backbone's shapes and sizes off the kernels' blocks (32 rows and features in bf16; 6 rows and 64 features in
fp32, and any in_features there), strided rows, no bias, one row; determinism across thread counts; the weight
packing cache; which path runs when (dtype, sizes, gradient, instruction set, backend, CPU class); the choice in
t2t_fast.onednn and the logits path; its custom-op registration; and the extension's own argument checks. The
kernels' tests need a CPU with AVX512-BF16 (bf16; AMX tiles for the tile kernel) or AVX-512 (fp32); the reasons given
elsewhere are checked everywhere."""
import copy
import importlib

import pytest
import torch

import t2t_fast
from t2t_fast import onednn
from t2t_fast._native import native_module
from t2t_fast.backend import CPU_CLASSES, BackendUnavailableError, cpu_class, cpu_isa, set_cpu_isa
from t2t_fast.ops import packed_linear, packed_linear_ref
from t2t_fast.testing import (assert_within_reference_error, needs_packed_kernels, packed_kernels_missing,
                              poison_outputs, results_at_thread_counts, with_packed_kernels)

linear_module = importlib.import_module("t2t_fast.ops.packed_linear")
needs_bf16, needs_avx512 = needs_packed_kernels(torch.bfloat16), needs_packed_kernels(torch.float32)
# the bfloat16 kernel's instruction sets: AMX tiles, AVX512-BF16 dot products
BF16_ISAS = [pytest.param(isa, marks=needs_packed_kernels(torch.bfloat16, isa)) for isa in ("amx", "avx512")]
LINEAR = torch.ops.t2t_fast.packed_linear_cpp


def _case(rows, in_features, out_features, bias=True, dtype=torch.bfloat16):
    x = torch.randn(*rows, in_features).to(dtype)
    weight = (torch.randn(out_features, in_features) / in_features ** 0.5).to(dtype)
    return x, weight, (torch.randn(out_features).to(dtype) if bias else None)


def _check(out, x, weight, bias, gelu):
    exact = packed_linear_ref(x.double(), weight.double(), None if bias is None else bias.double(), gelu)
    assert out.dtype == x.dtype and out.shape == exact.shape
    assert_within_reference_error(out, packed_linear_ref(x, weight, bias, gelu), exact, what="packed_linear")


def _kernel(x, weight, bias, gelu):
    with torch.no_grad(), poison_outputs():
        return LINEAR(x, linear_module.packed_weight(weight), bias, weight.shape[0], gelu)


# (rows, in, out): the backbone's qkv, proj, fc1 and fc2 at batch 1, the T2T project at batch 1, rows off the
# 32-row blocks (1, 31, 33) and many blocks, the narrowest features, fewer feature pairs than threads.
SHAPES = (((1, 197), 384, 1152), ((1, 197), 384, 384), ((1, 197), 1152, 384), ((196,), 576, 384), ((1,), 64, 32),
          ((31,), 32, 64), ((2, 33), 96, 128), ((1000,), 64, 64), ((5,), 128, 32))


@pytest.mark.parametrize("isa", BF16_ISAS)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], s[1], s[2]))))
def test_matches_float64_reference(shape, gelu, isa):
    rows, in_features, out_features = shape
    x, weight, bias = _case(rows, in_features, out_features)
    set_cpu_isa(isa)
    try:
        out = _kernel(x, weight, bias, gelu)
        with torch.no_grad():
            assert torch.equal(packed_linear(x, weight, bias, gelu), out)
    finally:
        set_cpu_isa(None)
    _check(out, x, weight, bias, gelu)


# float32 (rows, in, out): the backbone's four at batch 1, the T2T layers' (147 and 576 inputs, 192 and 64
# outputs at their 3136 / 784 rows), the classifier (1000 outputs: a partial panel) on one row, rows off the
# 6-row blocks, odd in_features, fewer panels than threads
FLOAT32_SHAPES = SHAPES[:4] + (((3136,), 147, 192), ((784,), 64, 64), ((1,), 384, 1000), ((13,), 7, 65),
                               ((5,), 1, 3), ((2, 7), 33, 130))


@needs_avx512
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", FLOAT32_SHAPES, ids=lambda s: "x".join(map(str, (*s[0], s[1], s[2]))))
def test_float32_matches_float64_reference(shape, gelu):
    rows, in_features, out_features = shape
    x, weight, bias = _case(rows, in_features, out_features, dtype=torch.float32)
    out = _kernel(x, weight, bias, gelu)
    _check(out, x, weight, bias, gelu)
    with torch.no_grad():
        assert torch.equal(packed_linear(x, weight, bias, gelu), out)


@pytest.mark.parametrize("dtype", with_packed_kernels(torch.bfloat16, torch.float32))
def test_no_bias_strided_rows_and_large_values(dtype):
    """No bias; rows that are a view into wider rows; GELU's tails (|x| past 10, where erf saturates)."""
    x, weight, _ = _case((2, 40), 128, 96, bias=False, dtype=dtype)
    wide = torch.cat([x, torch.randn(2, 40, 32).to(dtype)], dim=-1)[..., :128]
    assert not wide.is_contiguous()
    _check(_kernel(wide, weight, None, False), wide, weight, None, False)
    loud = x * 40
    _check(_kernel(loud, weight, None, True), loud, weight, None, True)


@pytest.mark.parametrize("dtype", with_packed_kernels(torch.bfloat16, torch.float32))
def test_deterministic_across_thread_counts(dtype):
    """bf16 splits by output features (or, with fewer feature pairs than threads, by rows), fp32 by panels and, as
    far as needed for an even split, by rows: alike at 1 and 2 threads."""
    for shape in (((197,), 384, 1152), ((197,), 64, 32), ((100,), 64, 192)):
        x, weight, bias = _case(*shape, dtype=dtype)
        one, two = results_at_thread_counts(lambda: _kernel(x, weight, bias, True))
        assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", with_packed_kernels(torch.bfloat16, torch.float32))
def test_packed_weight_follows_changes(dtype):
    x, weight, bias = _case((9,), 64, 64, dtype=dtype)
    first = linear_module.packed_weight(weight)
    assert linear_module.packed_weight(weight) is first
    with torch.no_grad():
        weight.mul_(-1)
    assert linear_module.packed_weight(weight) is not first
    _check(_kernel(x, weight, bias, False), x, weight, bias, False)


@needs_bf16
def test_kernel_choice(calls_of):
    """The kernels run for bf16 and fp32 without a gradient, with the instruction set amx or avx512; bf16 features
    off 32, a gradient, avx2 or backend='torch' run F.linear; a forced 'cpp' that cannot take the input raises."""
    calls = calls_of(linear_module, "run_cpp")  # the kernel's calls, direct or through the custom op
    x, weight, bias = _case((3,), 64, 96)
    with torch.no_grad():
        packed_linear(x, weight, bias)
        packed_linear(x, weight, bias, backend="cpp")
        packed_linear(x.float(), weight.float(), bias.float())
        packed_linear(x[..., :48].float(), weight[:, :48].float(), bias.float())
        assert len(calls) == 4
        packed_linear(x, weight, bias, backend="torch")
        packed_linear(x[..., :48], weight[:, :48], bias)
    leaf = x.clone().requires_grad_()
    packed_linear(leaf, weight, bias).float().sum().backward()
    assert leaf.grad is not None
    set_cpu_isa("avx512")
    try:
        with torch.no_grad():
            packed_linear(x, weight, bias)  # bf16 on AVX512-BF16 dot products
            packed_linear(x.float(), weight.float(), bias.float())
        set_cpu_isa("avx2")
        with torch.no_grad():
            packed_linear(x, weight, bias)
            with pytest.raises(BackendUnavailableError, match="packed-weight kernels need avx512"):
                packed_linear(x.float(), weight.float(), bias.float(), backend="cpp")
    finally:
        set_cpu_isa(None)
    assert len(calls) == 6
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match="multiples of 32"):
        packed_linear(x[..., :48], weight[:, :48], bias, backend="cpp")


def test_reasons_without_the_kernel():
    """Every CPU: what the kernels cannot take says why; the reference path runs (forward and gradient)."""
    x, weight, bias = _case((4,), 64, 64)
    reason = linear_module.cpp_unsupported(x.half(), weight.half(), bias.half())
    assert any(why in reason for why in ("float32 and bfloat16", "extension")), reason
    with torch.inference_mode():
        frozen = weight.clone()
    if packed_kernels_missing(torch.bfloat16) is None:
        assert "inference_mode" in linear_module.cpp_unsupported(x, frozen, bias)
        assert "strides" in linear_module.cpp_unsupported(torch.randn(64, 4).bfloat16().t(), weight, bias)
    leaf = x.float().requires_grad_()
    out = packed_linear(leaf, weight.float(), bias.float(), gelu=True)
    exact = packed_linear_ref(x.double(), weight.double(), bias.double(), True)
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
        packed_linear(*args)


@pytest.mark.parametrize("cpu", CPU_CLASSES)
@pytest.mark.parametrize("dtype", with_packed_kernels(torch.bfloat16, torch.float32))
def test_onednn_linear_takes_the_kernels_by_cpu_class(calls_of, monkeypatch, dtype, cpu):
    """t2t_fast.onednn.linear (an optimize_for_inference model's linears) runs the kernels up to the rows
    PACKED_LINEAR_MAX_ROWS gives the CPU class and dtype (bf16 not with features off 32), oneDNN's primitive past
    them and on a class it does not name, and nothing of them during a torch.compile trace."""
    runs = calls_of(onednn, "_packed_run")
    monkeypatch.setattr(onednn.backend, "cpu_class", lambda: cpu)
    limit = onednn.PACKED_LINEAR_MAX_ROWS.get(cpu, {}).get(dtype, 0)
    x, weight, bias = _case((197,), 384, 384, dtype=dtype)
    with torch.no_grad():
        out = onednn.linear(x, weight, bias, True)
        onednn.linear(torch.randn(limit + 1, 384).to(dtype), weight, bias)
        onednn.linear(x[:, :352], weight[:352, :352], bias[:352])  # 352: a multiple of 32
        onednn.linear(x, weight[:100], bias[:100])  # 100 output features: fp32 only
    expected = 0 if limit < len(x) else 2 if dtype == torch.bfloat16 else 3
    assert len(runs) == expected
    _check(out, x, weight, bias, True)
    if cpu == "amx":
        compiled = torch.compile(lambda x: onednn.linear(x, weight, bias), fullgraph=True)
        with torch.no_grad():
            compiled(x)
        assert len(runs) == expected


@pytest.mark.parametrize("dtype", with_packed_kernels(torch.bfloat16, torch.float32))
def test_logits_path_runs_the_kernels(calls_of, dtype):
    """At batch 1 every backbone linear of an optimize_for_inference model runs on the kernels (all inside
    t2t_fast.ops.encoder_blocks there), the logits within twice the reference's error of float64 in the dtype."""
    if dtype not in onednn.PACKED_LINEAR_MAX_ROWS.get(cpu_class(), {}):
        pytest.skip(f"{dtype} linears run on oneDNN's primitive on this CPU class")
    runs = calls_of(onednn, "_packed_run")
    encoded = calls_of(importlib.import_module("t2t_fast.inference"), "encoder_blocks_cpp")
    model = t2t_fast.create_model("t2t_vit_7", img_size=64).eval()
    fast = t2t_fast.optimize_for_inference(model, dtype)
    images = torch.randn(1, 3, 64, 64)
    logits = fast(images)
    assert len(runs) + 4 * sum(len(call[1]) for call in encoded) >= 4 * len(model.blocks)
    with torch.no_grad():
        reference = copy.deepcopy(model).to(dtype)(images.to(dtype)).float()
        exact = model.double()(images.double())
    assert_within_reference_error(logits, reference, exact, what="logits")


@pytest.mark.parametrize("dtype", with_packed_kernels(torch.bfloat16, torch.float32))
def test_op_registration(dtype):
    x, weight, bias = _case((5,), 64, 32, dtype=dtype)
    packed = linear_module.packed_weight(weight)
    torch.library.opcheck(LINEAR, (x, packed, bias, 32, True))
    # under torch.compile the wrapper takes the torch path (the packing is made outside graphs)
    fn = torch.compile(lambda x: packed_linear(x, weight, bias, True), fullgraph=True)
    with torch.no_grad():
        _check(fn(x), x, weight, bias, True)


@needs_bf16
def test_extension_checks_its_buffers():
    x, weight, bias = _case((4,), 64, 32)
    packed, y = linear_module.packed_weight(weight), torch.empty(4, 32, dtype=torch.bfloat16)
    args = dict(x=(x.data_ptr(), x.numel(), 64), dtype=2, rows=4, packed=(packed.data_ptr(), packed.numel()),
                out_features=32, in_features=64, bias=(bias.data_ptr(), bias.numel()), gelu=False,
                y=(y.data_ptr(), y.numel()), isa=cpu_isa(), threads=1)
    native_module().linear_forward_cpu(**args)
    for changes, match in ((dict(rows=5), "x holds 256"), (dict(y=(y.data_ptr(), 127)), "y holds 127"),
                           (dict(in_features=48), "multiples of 32"), (dict(bias=(bias.data_ptr(), 31)), "bias holds"),
                           (dict(packed=(packed.data_ptr(), 100)), "packed holds"),
                           (dict(x=(x.data_ptr(), x.numel(), 32)), "row stride"), (dict(rows=0), "positive"),
                           (dict(dtype=1), "float32 or bfloat16"), (dict(isa="avx2"), "amx or avx512, not avx2"),
                           (dict(isa="sse"), "unknown CPU kernel ISA"),
                           (dict(x=(x.data_ptr() + 1, x.numel(), 64)), "aligned")):
        with pytest.raises(ValueError, match=match):
            native_module().linear_forward_cpu(**{**args, **changes})
    with pytest.raises(ValueError, match="packed holds"):
        native_module().linear_pack_weight_cpu((weight.data_ptr(), weight.numel()), 2, 32, 64, (packed.data_ptr(), 10))
    # float32: the packed weight is rounded up to whole panels of 64 output features
    x32, weight32 = x.float(), torch.randn(65, 64)
    packed32, y32 = linear_module.packed_weight(weight32), torch.empty(4, 65)
    assert packed32.numel() == native_module().linear_packed_elements(0, 65, 64) == 128 * 64
    args32 = dict(args, x=(x32.data_ptr(), x32.numel(), 64), dtype=0, packed=(packed32.data_ptr(), packed32.numel()),
                  out_features=65, bias=(0, 0), y=(y32.data_ptr(), y32.numel()))
    native_module().linear_forward_cpu(**args32)
    assert torch.allclose(y32, x32 @ weight32.t(), atol=1e-4)
    with pytest.raises(ValueError, match="packed holds"):
        native_module().linear_forward_cpu(**dict(args32, packed=(packed32.data_ptr(), 65 * 64)))
