"""The backbone's softmax attention op (t2t_fast.ops.multihead_attention): its C++ kernel for float32 and bfloat16
inference on AVX512-BF16 CPUs, with each instruction set it runs with here (AMX tiles, AVX-512), against the float64
reference (float32 to 1e-5, bfloat16 within twice the bf16 reference's own error), odd token counts and head sizes,
strided qkv, large logits, determinism across thread counts, which path runs when (dtype, gradient, head size,
backend), the model's use of it and the table in t2t_fast.backend, its custom-op registration, and the extension's
own argument checks."""
import importlib

import pytest
import torch

from t2t_fast import backend, model as fast_model
from t2t_fast._native import native_avx512_bf16, native_cpu_isas, native_module
from t2t_fast.backend import BackendUnavailableError, cpu_attention, set_cpu_isa
from t2t_fast.ops import multihead_attention, multihead_attention_ref
from t2t_fast.testing import (assert_relative_close, assert_within_reference_error, poison_outputs,
                              results_at_thread_counts)

attention_module = importlib.import_module("t2t_fast.ops.multihead_attention")
needs_kernel = pytest.mark.skipif(not native_avx512_bf16(),
                                  reason="needs the native extension on a CPU with AVX512-BF16")
ATTENTION = torch.ops.t2t_fast.multihead_attention_cpp
# the instruction sets the kernel runs with on this CPU: 'amx' takes the tiles for bf16 head sizes off 32
ATTENTION_ISAS = tuple(isa for isa in native_cpu_isas() if isa in ("amx", "avx512"))


@pytest.fixture(params=ATTENTION_ISAS)
def attention_isa(request):
    set_cpu_isa(request.param)
    yield request.param
    set_cpu_isa(None)


def _qkv(batch, tokens, heads, head_dim, scale=1.0, dtype=torch.bfloat16):
    return (torch.randn(batch, tokens, 3 * heads * head_dim) * scale).to(dtype)


def _cpp(qkv, heads, scale):
    with torch.no_grad(), poison_outputs():
        return ATTENTION(qkv, heads, scale)


def _check(out, qkv, heads, scale):
    exact = multihead_attention_ref(qkv.double(), heads, scale)
    assert out.dtype == qkv.dtype and out.shape == exact.shape
    if qkv.dtype == torch.float32:
        assert_relative_close(out, exact, 1e-5, what="attention")
    else:
        assert_within_reference_error(out, multihead_attention_ref(qkv, heads, scale), exact, what="attention")


# (B, T, H, d): the backbone's (197 tokens, 64 per head), a single token, token counts off the 16-key blocks, the
# 12-row and the 32-row tiles (33: one row past a tile, its keys padded over two vectors), head sizes 16-128 (the
# tiles take multiples of 32), one head.
SHAPES = ((2, 197, 6, 64), (1, 1, 2, 64), (2, 5, 3, 16), (1, 17, 1, 32), (3, 33, 2, 48), (2, 33, 3, 32),
          (1, 200, 4, 128), (2, 64, 7, 64), (1, 577, 2, 64))


@needs_kernel
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, dtype, attention_isa):
    batch, tokens, heads, head_dim = shape
    qkv = _qkv(batch, tokens, heads, head_dim, scale=2.0, dtype=dtype)
    scale = head_dim ** -0.5
    out = _cpp(qkv, heads, scale)
    _check(out, qkv, heads, scale)
    with torch.no_grad():
        assert torch.equal(multihead_attention(qkv, heads, scale), out)


@needs_kernel
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_strided_qkv_and_large_logits(dtype, attention_isa):
    """qkv as a view into wider rows (the token stride past 3 H d), and scores far past exp's range."""
    wide = _qkv(2, 50, 2, 32, scale=1.0, dtype=torch.float32)
    wide = torch.cat([wide, torch.randn(2, 50, 40)], dim=-1).to(dtype)
    qkv = wide[..., :192]
    assert not qkv.is_contiguous()
    _check(_cpp(qkv, 2, 32 ** -0.5), qkv, 2, 32 ** -0.5)
    loud = _qkv(1, 40, 2, 64, scale=30.0, dtype=dtype)
    out = _cpp(loud, 2, 0.125)
    assert torch.isfinite(out).all()
    _check(out, loud, 2, 0.125)


@needs_kernel
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_deterministic_across_thread_counts(dtype, attention_isa):
    """One image of one head splits its query rows across threads: the rows are computed alike."""
    qkv = _qkv(1, 197, 1, 64, dtype=dtype)
    one, two = results_at_thread_counts(lambda: _cpp(qkv, 1, 0.125))
    assert torch.equal(one, two)


@pytest.fixture
def cpp_calls(calls_of):
    """The calls of the C++ forward the wrapper makes (directly in eager mode, or through its custom op)."""
    return calls_of(attention_module, "run_cpp")


@needs_kernel
def test_kernel_choice(cpp_calls):
    """The kernel runs for float32 and bfloat16 without a gradient; float16, float64, a head size off 16, a
    gradient, or backend='torch' run the reference path (which trains); a forced 'cpp' that cannot take the input
    raises."""
    qkv = _qkv(2, 9, 2, 32)
    with torch.no_grad():
        multihead_attention(qkv, 2, 0.2)
        multihead_attention(qkv.float(), 2, 0.2, backend="cpp")
    assert len(cpp_calls) == 2
    with torch.no_grad():
        multihead_attention(qkv, 2, 0.2, backend="torch")
        multihead_attention(qkv.half(), 2, 0.2)
        multihead_attention(qkv.double(), 2, 0.2)
        multihead_attention(_qkv(2, 9, 2, 8), 2, 0.2)
    leaf = qkv.detach().clone().requires_grad_()
    multihead_attention(leaf, 2, 0.2).float().sum().backward()
    assert len(cpp_calls) == 2 and leaf.grad is not None
    for bad, match in ((qkv.half(), "takes float32 and bfloat16"), (_qkv(2, 9, 2, 8), "multiples of 16")):
        with torch.no_grad(), pytest.raises(BackendUnavailableError, match=match):
            multihead_attention(bad, 2, 0.2, backend="cpp")
    with torch.inference_mode():
        assert multihead_attention(_qkv(0, 9, 2, 32), 2, 0.2).shape == (0, 9, 64)


@needs_kernel
@pytest.mark.skipif("avx2" not in native_cpu_isas(), reason="needs a CPU that runs the avx2 kernels")
def test_instruction_set_without_the_kernel(cpp_calls):
    """With the CPU kernels' instruction set lowered below AVX-512 the op runs the reference path; a forced 'cpp'
    says why."""
    qkv = _qkv(2, 9, 2, 32)
    set_cpu_isa("avx2")
    try:
        with torch.no_grad():
            out = multihead_attention(qkv, 2, 0.2)
            with pytest.raises(BackendUnavailableError, match="instruction set is avx2"):
                multihead_attention(qkv, 2, 0.2, backend="cpp")
    finally:
        set_cpu_isa(None)
    assert not cpp_calls
    assert torch.equal(out, multihead_attention_ref(qkv, 2, 0.2))


def test_reference_path_without_the_kernel():
    """Every CPU runs the op: float32 with a gradient (never the kernel) against float64, forward and gradient."""
    qkv = _qkv(2, 11, 3, 8, dtype=torch.float32).requires_grad_()
    out = multihead_attention(qkv, 3, 8 ** -0.5)
    exact = multihead_attention_ref(qkv.detach().double(), 3, 8 ** -0.5)
    assert_relative_close(out, exact, 1e-5)
    grad = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, qkv, grad)
    leaf = qkv.detach().double().requires_grad_()
    (dq_exact,) = torch.autograd.grad(multihead_attention_ref(leaf, 3, 8 ** -0.5), leaf, grad.double())
    assert_relative_close(dq, dq_exact, 1e-5, what="dqkv")


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 9, 30), 4, 0.1), "3 \\* num_heads"),
    ((torch.randn(2, 9), 1, 0.1), "2 dims"),
    ((torch.randn(2, 9, 24), 0, 0.1), "num_heads must be a positive int"),
    ((torch.randn(2, 9, 24), 2, 0.0), "scale must be a positive finite number"),
    ((torch.randn(2, 9, 24), 2, float("inf")), "scale must be a positive finite number"),
], ids=("width", "dims", "heads", "scale_zero", "scale_inf"))
def test_invalid_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        multihead_attention(*args)


@needs_kernel
def test_op_registration():
    """opcheck of the custom op, and torch.compile(fullgraph=True) of a no-grad call equal to eager."""
    qkv = _qkv(2, 9, 2, 32)
    torch.library.opcheck(ATTENTION, (qkv, 2, 0.25))
    fn = torch.compile(lambda qkv: multihead_attention(qkv, 2, 0.25), fullgraph=True)
    with torch.no_grad():
        assert torch.equal(fn(qkv), multihead_attention(qkv, 2, 0.25))


def test_cpu_attention_choice(monkeypatch):
    """'cpp' only where the kernel takes the input: by the table on the classes it was measured on, or forced."""
    monkeypatch.delenv(backend.CPU_ATTENTION_ENV_VAR, raising=False)
    bf16 = torch.bfloat16
    assert cpu_attention(bf16, False, cpu="avx512_bf16", cpp_takes=True) == "cpp"
    assert cpu_attention(bf16, False, cpu="avx512_bf16", cpp_takes=False) == "matmul"
    assert cpu_attention(bf16, False, cpu="amx", cpp_takes=True) == "cpp"
    assert cpu_attention(bf16, False, cpu="amx", cpp_takes=False) == "sdpa"
    assert cpu_attention(bf16, False, cpu="none", cpp_takes=True) == "sdpa"
    monkeypatch.setenv(backend.CPU_ATTENTION_ENV_VAR, "cpp")
    assert cpu_attention(bf16, False, cpu="none", cpp_takes=True) == "cpp"
    assert cpu_attention(torch.float32, False, cpu="amx", cpp_takes=False) == "sdpa"
    monkeypatch.delenv(backend.CPU_ATTENTION_ENV_VAR)
    assert cpu_attention(torch.float32, False, cpu="avx512_bf16", cpp_takes=True) == "cpp"
    assert cpu_attention(torch.float32, True, cpu="avx512_bf16", cpp_takes=False) == "sdpa"
    monkeypatch.setenv(backend.CPU_ATTENTION_ENV_VAR, "sdpa")
    assert cpu_attention(bf16, False, cpu="avx512_bf16", cpp_takes=True) == "sdpa"


@needs_kernel
def test_model_attention_runs_the_kernel(cpp_calls, monkeypatch):
    """A bf16 block's attention in inference takes the kernel on this CPU class, and gives the numbers of the
    matmul path within twice the bf16 reference's error."""
    monkeypatch.delenv(backend.CPU_ATTENTION_ENV_VAR, raising=False)
    if backend.cpu_class() != "avx512_bf16":
        monkeypatch.setenv(backend.CPU_ATTENTION_ENV_VAR, "cpp")
    qkv = _qkv(2, 197, 6, 64)
    with torch.inference_mode():
        out = fast_model.attention(qkv, 6, 0.0, 0.125)
        assert len(cpp_calls) == 1
        monkeypatch.setenv(backend.CPU_ATTENTION_ENV_VAR, "matmul")
        matmul = fast_model.attention(qkv, 6, 0.0, 0.125)
    assert len(cpp_calls) == 1
    assert_within_reference_error(out, matmul, multihead_attention_ref(qkv.double(), 6, 0.125))


@needs_kernel
def test_extension_checks_its_buffers():
    qkv, out = _qkv(2, 10, 2, 16), torch.empty(2, 10, 32, dtype=torch.bfloat16)
    args = dict(qkv=(qkv.data_ptr(), qkv.numel(), 960, 96), dtype=2, batch=2, tokens=10, heads=2, head_dim=16,
                scale=0.25, out=(out.data_ptr(), out.numel()), isa=ATTENTION_ISAS[0], threads=1)
    native_module().attention_forward_cpu(**args)
    for changes, match in ((dict(tokens=11), "qkv holds 1920"), (dict(out=(out.data_ptr(), 639)), "out holds 639"),
                           (dict(head_dim=8, heads=4), "multiple of 16"), (dict(scale=-1.0), "scale"),
                           (dict(dtype=1), "float32 or bfloat16"),
                           (dict(qkv=(qkv.data_ptr(), qkv.numel(), 960, 2 ** 26)), "token stride"),
                           (dict(isa="baseline"), "runs with amx or avx512"), (dict(isa="sse9"), "unknown CPU")):
        with pytest.raises(ValueError, match=match):
            native_module().attention_forward_cpu(**{**args, **changes})
