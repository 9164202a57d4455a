"""The vectorised C++ CPU kernels (csrc/cpu_kernels.inc), on every instruction set this CPU runs them with:
the fused soft split + LayerNorm forward and the fused FAVOR+ forward against the float64 references, the
FAVOR+ state against the Triton forward's, rows whose norms overflow, strides, determinism across thread
counts, when the model's layers take them (grad mode, dtype), their custom-op registration, and the extension's
own argument checks."""
import importlib
import math

import pytest
import torch

from t2t_fast import backend
from t2t_fast._native import native_avx512_bf16, native_cpu_isas, native_module, native_vector_isas
from t2t_fast.backend import BackendUnavailableError, set_cpu_isa, unavailable_reason
from t2t_fast.ops import (favor_attention, favor_attention_ref, restructurize_unfold, restructurize_unfold_ref,
                          soft_split_layernorm, soft_split_layernorm_ref)
from t2t_fast.testing import (RELATIVE_TOLERANCE, assert_relative_close, assert_within_reference_error,
                              poison_outputs, results_at_thread_counts)

favor_module = importlib.import_module("t2t_fast.ops.favor_attention")  # the module (ops exports the function)
ISAS = native_vector_isas()
pytestmark = pytest.mark.skipif(not ISAS, reason="needs the native extension t2t_fast._C")
FAVOR = torch.ops.t2t_fast.favor_attention_cpp


@pytest.fixture(params=ISAS)
def isa(request):
    """Each test runs once per instruction set this CPU has."""
    set_cpu_isa(request.param)
    yield request.param
    set_cpu_isa(None)


def _projection(m, e, scale=1.0):
    """The official random matrix (orthogonal rows of norm sqrt(m)) where m <= e, else Gaussian rows."""
    w = torch.nn.init.orthogonal_(torch.empty(m, e)) * math.sqrt(m) if m <= e else torch.randn(m, e)
    return w * scale


def _kqv(batch, tokens, e, dtype, scale=0.5):
    """k, q, v as strided views of one (B, T, 3e) projection, as the performer layer has them."""
    return (torch.randn(batch, tokens, 3 * e) * scale).to(dtype).split(e, dim=-1)


def _cpp(k, q, v, w, eps=1e-8):
    """y, s, z, c_k of the C++ forward, every output NaN-poisoned first."""
    with torch.no_grad(), poison_outputs():
        return FAVOR(k, q, v, w, eps)


def _check_y(y, k, q, v, w, eps=1e-8):
    exact = favor_attention_ref(k.double(), q.double(), v.double(), w.double(), eps)
    if k.dtype == torch.float32:
        assert_relative_close(y, exact, 1e-5, what="y")
    else:
        assert_within_reference_error(y, favor_attention_ref(k, q, v, w, eps), exact, what="y")


# (B, T, e, m): the T2T layers' (tokens of 224 px images, m = e/2), chunk edges (128 tokens a chunk), widths
# and feature counts off the vector lengths, m > e.
FAVOR_SHAPES = ((2, 1, 64, 32), (2, 17, 64, 32), (2, 196, 64, 32), (1, 784, 64, 32), (2, 3136, 64, 32),
                (3, 128, 64, 32), (2, 129, 64, 32), (1, 257, 20, 10), (2, 40, 5, 3), (2, 70, 33, 20),
                (1, 50, 70, 70), (2, 30, 16, 40))


# dtypes of (k, q, v) and w: bfloat16 inputs with w in bfloat16 (as a bfloat16 model holds it) take the pair
# products of the AVX512-BF16 kernels where the CPU has them; with a float32 w, float32 products everywhere.
FAVOR_DTYPES = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16))


def _dtype_ids(dtypes):
    return "-w".join(str(d).replace("torch.", "") for d in dtypes)


@pytest.mark.parametrize("dtypes", FAVOR_DTYPES, ids=_dtype_ids)
@pytest.mark.parametrize("shape", FAVOR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_favor_matches_float64_reference(isa, dtypes, shape):
    batch, tokens, e, m = shape
    dtype, w_dtype = dtypes
    w = _projection(m, e).to(w_dtype)
    k, q, v = _kqv(batch, tokens, e, dtype)
    y, s, z, c_k = _cpp(k, q, v, w)
    assert y.dtype == dtype and y.shape == k.shape
    assert all(t.dtype == torch.float32 for t in (s, z, c_k))
    assert s.shape == (batch, m, e) and z.shape == c_k.shape == (batch, m)
    _check_y(y, k, q, v, w)
    with torch.no_grad():
        assert torch.equal(favor_attention(k, q, v, w, backend="cpp"), y)


@pytest.mark.skipif(unavailable_reason("triton", "cpu") is not None, reason="needs Triton's interpreter")
@pytest.mark.parametrize("shape", ((2, 150, 64, 32), (1, 40, 24, 12)), ids=lambda s: "x".join(map(str, s)))
def test_favor_state_is_the_triton_forwards(isa, shape):
    """s, z, c_k have the definitions of the Triton forward's saved state (a backward could take them)."""
    batch, tokens, e, m = shape
    w = _projection(m, e)
    k, q, v = _kqv(batch, tokens, e, torch.float32)
    ours = _cpp(k, q, v, w)
    with torch.no_grad():
        theirs = torch.ops.t2t_fast.favor_attention_fwd(k, q, v, w, 1e-8)
    for name, a, b in zip(("y", "s", "z", "c_k"), ours, theirs):
        assert_relative_close(a, b, 1e-5, what=name)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtypes", FAVOR_DTYPES, ids=_dtype_ids)
@pytest.mark.parametrize("eps", (1e-8, 0.0))
@pytest.mark.parametrize("magnitude", (1e20, 3e38))
def test_favor_rows_whose_half_norm_overflows(isa, dtypes, eps, magnitude):
    """Keys with a huge component add nothing, an image of only such keys gives y = 0, and a query with one
    gets the torch path's limit (0 for eps > 0): as the stabilised torch backend, never NaN."""
    dtype, w_dtype = dtypes
    w = _projection(32, 64).to(w_dtype)
    k, q, v = (t.contiguous() for t in _kqv(3, 150, 64, dtype))
    k[0, [2, 140], 1] = magnitude
    k[1, :, 0] = magnitude
    q[2, [3, 131], 5] = magnitude
    y = _cpp(k, q, v, w, eps)[0]
    with torch.no_grad():
        expected = favor_attention(k, q, v, w, eps=eps, backend="torch")
    assert torch.isfinite(y).all()
    assert (y[1] == 0).all()
    assert_relative_close(y, expected, RELATIVE_TOLERANCE[dtype])


def test_favor_logits_that_overflow_float32(isa):
    """Keys and queries along the rows of a w 3x the official norm: logits ~144, whose exp() overflows fp32 in
    the reference; the shifted features match float64."""
    w = _projection(32, 64, scale=3.0)
    rows = w[torch.randint(0, 32, (2, 300))]
    k = rows + 0.3 * torch.randn(2, 300, 64)
    q = w[torch.randint(0, 32, (2, 300))] + 0.3 * torch.randn(2, 300, 64)
    v = torch.randn(2, 300, 64)
    assert not torch.isfinite(favor_attention_ref(k, q, v, w)).all()
    exact = favor_attention_ref(k.double(), q.double(), v.double(), w.double())
    with torch.no_grad():  # logits ~144 lose ~144 x 2^-24 to fp32 rounding: compare with the torch path's error
        stabilised = favor_attention(k, q, v, w, backend="torch")
    assert_within_reference_error(_cpp(k, q, v, w)[0], stabilised, exact)


@pytest.mark.parametrize("dtypes", FAVOR_DTYPES, ids=_dtype_ids)
def test_favor_nan_query_gives_a_nan_row(isa, dtypes):
    """A query with a NaN element: its output row is NaN, as on the torch path and in the reference; the other
    rows are those of the clean input."""
    w = _projection(16, 32).to(dtypes[1])
    k, q, v = _kqv(2, 40, 32, dtypes[0])
    q = q.clone()
    q[1, 7, 3] = float("nan")
    y = _cpp(k, q, v, w)[0]
    nan_rows = torch.isnan(y).any(-1)
    assert nan_rows[1, 7] and nan_rows.sum() == 1 and torch.isnan(y[1, 7]).all()
    with torch.no_grad():
        torch.testing.assert_close(torch.isnan(favor_attention(k, q, v, w, backend="torch")).any(-1), nan_rows)
    clean = _cpp(k, q.nan_to_num(0.0), v, w)[0]
    assert torch.equal(y[~nan_rows], clean[~nan_rows])


@pytest.mark.parametrize("dtypes", FAVOR_DTYPES, ids=_dtype_ids)
def test_favor_nan_key_makes_its_image_nan(isa, dtypes):
    """A key with a NaN element: every output row of its image is NaN (its features enter S and z), as on the torch
    path and in the reference; the other image is that of the clean input."""
    w = _projection(16, 32).to(dtypes[1])
    k, q, v = _kqv(2, 40, 32, dtypes[0])
    k = k.clone()
    k[1, 7, 3] = float("nan")
    y = _cpp(k, q, v, w)[0]
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()
    with torch.no_grad():
        assert torch.isnan(favor_attention(k, q, v, w, backend="torch")[1]).all()
        assert torch.isnan(favor_attention_ref(k, q, v, w)[1]).all()
    assert torch.equal(y[0], _cpp(k.nan_to_num(0.0), q, v, w)[0][0])


@pytest.mark.skipif(not native_avx512_bf16() or "avx2" not in ISAS, reason="needs AVX512-BF16 and AVX2")
@pytest.mark.parametrize("shape", FAVOR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_favor_pair_products_are_the_float32_maths(shape):
    """bfloat16 k, q and w: the AVX512-BF16 kernels' projections by pair products (each product exact in float32)
    give the state (s, z, c_k) of the AVX2 kernels' float32 products, but for the order of the sums."""
    batch, tokens, e, m = shape
    w = _projection(m, e).bfloat16()
    k, q, v = _kqv(batch, tokens, e, torch.bfloat16)
    states = {}
    for isa in ("avx512", "avx2"):
        set_cpu_isa(isa)
        try:
            states[isa] = _cpp(k, q, v, w)
        finally:
            set_cpu_isa(None)
    (y_pairs, *state_pairs), (y_fp32, *state_fp32) = states["avx512"], states["avx2"]
    for name, pairs, fp32 in zip(("s", "z", "c_k"), state_pairs, state_fp32):
        assert_relative_close(pairs, fp32, 1e-5, what=name)
    # y is rounded to bfloat16: a sum's last bit may round it either way
    assert_relative_close(y_pairs, y_fp32, RELATIVE_TOLERANCE[torch.bfloat16], what="y")


def test_favor_strides(isa):
    """Token-major views, a (B, e, T) layout (copied: the kernel reads rows of e) and a batch slice."""
    w = _projection(16, 32)
    transposed = [(torch.randn(2, 32, 45) * 0.5).transpose(1, 2) for _ in range(3)]
    sliced = [t[1::2] for t in _kqv(5, 45, 32, torch.float32)]
    for k, q, v in (transposed, sliced):
        _check_y(_cpp(k, q, v, w)[0], k, q, v, w)


@pytest.mark.parametrize("dtypes", FAVOR_DTYPES, ids=_dtype_ids)
def test_favor_deterministic_across_thread_counts(isa, dtypes):
    w = _projection(32, 64).to(dtypes[1])
    k, q, v = _kqv(3, 700, 64, dtypes[0])
    one, two = results_at_thread_counts(lambda: _cpp(k, q, v, w))
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.fixture
def cpp_calls(calls_of):
    """The calls of the C++ FAVOR+ forward the wrapper makes (directly in eager mode, or through its custom op)."""
    return calls_of(favor_module, "run_cpp")


def test_favor_kernel_choice(cpp_calls):
    """The C++ forward runs for float32/bfloat16 without a gradient (the default backend on CPU, or 'cpp');
    with a gradient, in float16/float64, or with backend='torch' the torch path runs (and trains)."""
    w = _projection(16, 32)
    k, q, v = _kqv(2, 20, 32, torch.float32)
    with torch.no_grad():
        favor_attention(k, q, v, w)
        favor_attention(k.bfloat16(), q.bfloat16(), v.bfloat16(), w, backend="cpp")
    assert len(cpp_calls) == 2
    with torch.no_grad():
        favor_attention(k, q, v, w, backend="torch")
        for dtype in (torch.float16, torch.float64):
            favor_attention(k.to(dtype), q.to(dtype), v.to(dtype), w, backend="cpp")
    leaves = [t.detach().clone().requires_grad_() for t in (k, q, v)]
    y = favor_attention(*leaves, w, backend="cpp")
    y.sum().backward()
    assert len(cpp_calls) == 2 and all(t.grad is not None for t in leaves)
    with torch.inference_mode():
        for shape in ((0, 5, 32), (2, 0, 32)):
            empty = [torch.randn(shape) for _ in range(3)]
            assert favor_attention(*empty, w).shape == shape


def test_favor_op_registration():
    """opcheck of the custom op, and torch.compile(fullgraph=True) of a no-grad call equal to eager."""
    w = _projection(16, 32)
    k, q, v = _kqv(2, 9, 32, torch.float32)
    torch.library.opcheck(FAVOR, (k, q, v, w, 1e-8))
    fn = torch.compile(lambda k, q, v: favor_attention(k, q, v, w), fullgraph=True)
    with torch.no_grad():
        assert_relative_close(fn(k, q, v), favor_attention(k, q, v, w), 1e-6)
    with pytest.raises(BackendUnavailableError, match="float16"):
        FAVOR(k.half(), q.half(), v.half(), w, 1e-8)


# ------------------------------------------------------------------------------- soft split + LayerNorm

# (name, input shape, grid, kernel, stride, padding); token inputs carry a grid
SPLITS = (("image_k7", (2, 3, 37, 29), None, 7, 4, 2),
          ("image_224", (1, 3, 224, 224), None, 7, 4, 2),
          ("tokens_k3", (2, 15 * 13, 64), (15, 13), 3, 2, 1),
          ("tokens_56", (2, 56 * 56, 64), (56, 56), 3, 2, 1),
          ("tokens_5_channels", (2, 7 * 9, 5), (7, 9), 3, 2, 1),
          ("image_k2_no_padding", (3, 4, 10, 10), None, 2, 2, 0),
          # rows of 1024 and 1170 features: the longest bfloat16 rows widened to float32 once, and longer ones
          ("image_1024_features", (1, 16, 20, 20), None, 8, 4, 2),
          ("tokens_1170_features", (2, 9 * 7, 130), (9, 7), 3, 2, 1))
SPLIT_IDS = [case[0] for case in SPLITS]


def _split_input(shape, dtype, layout):
    x = torch.randn(shape) * 2 + 0.5
    if layout == "strided":  # a view into a wider buffer: tokens of a channel slice, images of a column slice
        wide = torch.randn(*shape[:-1], shape[-1] + 3)
        wide[..., :shape[-1]] = x
        x = wide[..., :shape[-1]]
    return x.to(dtype)


@pytest.mark.parametrize("layout", ("contiguous", "strided"))
@pytest.mark.parametrize("dtypes", ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)),
                         ids=("fp32", "bf16", "fp32-to-bf16", "bf16-to-fp32"))
@pytest.mark.parametrize("case", SPLITS, ids=SPLIT_IDS)
def test_split_layernorm_matches_reference(isa, case, dtypes, layout):
    _, shape, grid, kernel, stride, padding = case
    x_dtype, out_dtype = dtypes
    x = _split_input(shape, x_dtype, layout)
    features = (shape[-1] if grid else shape[1]) * kernel * kernel
    weight, bias = torch.randn(features), torch.randn(features)
    with torch.no_grad(), poison_outputs():
        y = soft_split_layernorm(x, kernel, stride, padding, weight, bias, grid_size=grid, backend="cpp",
                                 out_dtype=out_dtype)
    assert y.dtype == out_dtype
    exact = soft_split_layernorm_ref(x.double(), kernel, stride, padding, weight.double(), bias.double(),
                                     grid_size=grid)
    if out_dtype == torch.float32:
        assert_relative_close(y, exact, 1e-5)
    else:  # one rounding of the float32 result, as the reference does
        reference = soft_split_layernorm_ref(x, kernel, stride, padding, weight, bias, grid_size=grid,
                                             out_dtype=out_dtype)
        assert_within_reference_error(y, reference, exact)


@pytest.mark.parametrize("case", SPLITS[:3], ids=SPLIT_IDS[:3])
def test_split_layernorm_statistics(isa, case):
    """The row mean and rstd the backward takes: those of the unfolded rows (biased variance + eps)."""
    _, shape, grid, kernel, stride, padding = case
    x = torch.randn(shape) + 1.0
    features = (shape[-1] if grid else shape[1]) * kernel * kernel
    weight, bias = torch.randn(features), torch.randn(features)
    with poison_outputs():
        _, mean, rstd = torch.ops.t2t_fast.soft_split_layernorm_fwd(
            x, weight, bias, kernel, stride, padding, 1e-5, *(grid or (0, 0)), torch.float32, True)
    rows = torch.nn.functional.unfold(x.double().transpose(1, 2).reshape(shape[0], shape[2], *grid) if grid
                                      else x.double(), kernel, padding=padding, stride=stride).transpose(1, 2)
    assert_relative_close(mean, rows.mean(-1).reshape(-1), 1e-5, what="mean")
    assert_relative_close(rstd, (rows.var(-1, unbiased=False) + 1e-5).rsqrt().reshape(-1), 1e-5, what="rstd")


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
         torch.float64: torch.int64}


@pytest.mark.parametrize("dtype", tuple(_BITS), ids=lambda dtype: str(dtype).split(".")[-1])
@pytest.mark.parametrize("channels", (64, 96, 37, 5))
def test_k3_token_windows_are_copied_bit_for_bit(isa, dtype, channels):
    """The 3x3 windows of channels-last tokens (the interleave of nine taps' channels, by permutes on AVX-512 in
    blocks of 32 two-byte or 16 four-byte channels, then the channels left): every element of the unfold in
    place, NaN payloads, -0 and the padding's +0 included, for whole blocks, partial ones and fewer channels
    than a block; tokens of a wider buffer (a channel slice)."""
    wide = torch.randn(2, 9 * 7, channels + 3).to(dtype)
    wide.view(_BITS[dtype])[0, :5, :3] = torch.tensor([-1, 0x7fff, 0x7fc1], dtype=_BITS[dtype]) if \
        dtype.itemsize == 2 else torch.tensor([-1, -(2 ** 30), 7], dtype=_BITS[dtype])
    wide[1, 3, :] = -0.0
    x = wide[..., :channels]
    with poison_outputs():
        y = restructurize_unfold(x, (9, 7), 3, 2, 1, backend="cpp")
    expected = restructurize_unfold_ref(x, (9, 7), 3, 2, 1)
    assert torch.equal(y.view(_BITS[dtype]), expected.view(_BITS[dtype]))


def test_bf16_outputs_round_float32_denormals_by_the_isa(isa):
    """bf16 outputs are float32 results rounded to nearest even, NaN kept, as torch rounds, except that the
    AVX512-BF16 table (ISA avx512 or amx on a CPU with AVX512-BF16) rounds with vcvtneps2bf16, which turns float32
    denormals into zeros of their sign. A LayerNorm with weight 0 writes its bias: normal, denormal and NaN ones."""
    bias = torch.tensor([1.0, -3.5e-3, 1e-39, -2e-39, 6e-39, float("nan"), 0.0, -1e-30, 2.5, 7.0] * 9)[:90]
    x = torch.randn(2, 4 * 4, 10)
    with torch.no_grad(), poison_outputs():
        y = soft_split_layernorm(x, 3, 1, 1, torch.zeros(90), bias, grid_size=(4, 4), backend="cpp",
                                 out_dtype=torch.bfloat16)
    expected = bias.to(torch.bfloat16).expand_as(y).clone()
    denormal = (bias != 0) & (bias.abs() < torch.finfo(torch.float32).tiny)
    if isa in ("avx512", "amx") and native_avx512_bf16():
        expected[..., denormal] = torch.copysign(torch.zeros(()), bias[denormal]).to(torch.bfloat16)
    assert denormal.sum() == 3 * 9
    nan = bias.isnan().expand_as(y)
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


def test_split_layernorm_deterministic_across_thread_counts(isa):
    x = torch.randn(3, 56 * 56, 64)
    weight, bias = torch.randn(576), torch.randn(576)
    results = results_at_thread_counts(
        lambda: soft_split_layernorm(x, 3, 2, 1, weight, bias, grid_size=(56, 56), backend="cpp"))
    assert torch.equal(*results)


# ----------------------------------------------------------------------------- ISA choice, extension checks

def test_isa_choice(monkeypatch):
    assert ISAS[-1] == "baseline" and backend.cpu_isa() == native_cpu_isas()[0]
    with pytest.raises(ValueError, match="set_cpu_isa: 'sse9'"):
        set_cpu_isa("sse9")
    for missing in {"amx", "avx512", "avx2"} - set(native_cpu_isas()):
        with pytest.raises(ValueError, match=f"{missing!r} is not an instruction set this CPU runs"):
            set_cpu_isa(missing)
    monkeypatch.setenv(backend.CPU_ISA_ENV_VAR, "baseline")
    assert backend.cpu_isa() == "baseline"
    set_cpu_isa(ISAS[0])
    assert backend.cpu_isa() == ISAS[0]  # the call wins over the variable
    set_cpu_isa("auto")
    monkeypatch.setenv(backend.CPU_ISA_ENV_VAR, "neon")
    with pytest.raises(ValueError, match="T2T_FAST_CPU_ISA: 'neon'"):
        backend.cpu_isa()


def _favor_native_args(**changes):
    k = torch.randn(2, 10, 16)
    y, s, z, c_k, w_t = torch.empty(2, 10, 16), torch.empty(2, 8, 16), torch.empty(2, 8), torch.empty(2, 8), \
        torch.zeros(16, 16)
    operand = (k.data_ptr(), k.numel(), 160, 16)
    args = dict(k=operand, q=operand, v=operand, dtype=0, batch=2, tokens=10, width=16, features=8,
                w_t=(w_t.data_ptr(), w_t.numel()), log_eps_m=-15.0, y=(y.data_ptr(), y.numel()),
                s=(s.data_ptr(), s.numel()), z=(z.data_ptr(), z.numel()), c_k=(c_k.data_ptr(), c_k.numel()),
                isa="baseline", threads=1)
    args.update(changes)
    return args, (k, y, s, z, c_k, w_t)


@pytest.mark.parametrize("changes,match", [
    (dict(dtype=1), "float32 or bfloat16"),
    (dict(tokens=11), "k holds 320 elements"),
    (dict(features=17), "w_t holds 256 elements"),
    (dict(isa="avx9"), "unknown CPU kernel ISA"),
    (dict(batch=0), "must be positive"),
], ids=("float16", "tokens_past_k", "w_t_short", "isa", "no_batch"))
def test_favor_extension_checks_its_buffers(changes, match):
    args, _buffers = _favor_native_args(**changes)
    with pytest.raises(ValueError, match=match):
        native_module().favor_attention_forward_cpu(**args)
    if "avx512" not in ISAS:
        args, _buffers = _favor_native_args(isa="avx512")
        with pytest.raises(ValueError, match="cannot run the avx512 kernels"):
            native_module().favor_attention_forward_cpu(**args)


def test_split_layernorm_extension_checks_its_buffers():
    x, y = torch.randn(1, 2, 5, 5), torch.empty(1, 9, 18)
    weight, stats = torch.ones(18), torch.empty(9)
    args = dict(x=x.data_ptr(), x_extent=x.numel(), sizes=(1, 2, 5, 5), kernel=(3, 3), stride=(2, 2),
                padding=(1, 1), strides=(50, 25, 5, 1), x_dtype=0, weight=weight.data_ptr(),
                bias=weight.data_ptr(), params_extent=18, eps=1e-5, y=y.data_ptr(), y_extent=y.numel(), y_dtype=0,
                mean=stats.data_ptr(), rstd=stats.data_ptr(), stats_extent=9, isa="baseline", threads=1)
    native_module().soft_split_layernorm_forward_cpu(**args)
    for changes, match in ((dict(x_extent=49), "x holds 49"), (dict(y_extent=161), "y holds 161"),
                           (dict(params_extent=17), "weight holds 17"), (dict(stats_extent=8), "mean holds 8"),
                           (dict(y_dtype=3), "float32 or bfloat16"), (dict(isa="x"), "unknown CPU kernel ISA")):
        with pytest.raises(ValueError, match=match):
            native_module().soft_split_layernorm_forward_cpu(**{**args, **changes})
