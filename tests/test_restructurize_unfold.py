"""restructurize_unfold (native cpp / cuda kernels) against restructurize_unfold_ref (transpose + reshape +
F.unfold + transpose): forward bit for bit, backward against autograd through the reference."""
import ast
import importlib
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from t2t_fast._native import native_cuda_compiled, native_module
from t2t_fast.backend import BackendUnavailableError
from t2t_fast.ops import restructurize_unfold, restructurize_unfold_ref
from t2t_fast.testing import assert_relative_close, assert_within_reference_error, poison_outputs

# The op's module (t2t_fast.ops.restructurize_unfold is the function of that name).
ru_module = importlib.import_module("t2t_fast.ops.restructurize_unfold")
requires_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and native_cuda_compiled()),
                                   reason="needs a CUDA device and the CUDA kernels of t2t_fast._C")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def make_input(batch, channels, height, width, tokens, dtype, device="cpu", strided=False):
    """Fresh random tokens (B, H*W, C) or an image (B, C, H, W); ``strided`` gives a non-contiguous view."""
    shape = (batch, height * width, channels) if tokens else (batch, channels, height, width)
    if strided:  # every other element of the last dim of a twice-as-wide tensor
        x = torch.randn(*shape[:-1], 2 * shape[-1], device=device, dtype=torch.float64)[..., ::2]
    else:
        x = torch.randn(*shape, device=device, dtype=torch.float64)
    return x.to(dtype)


def check_op(x, grid, kernel, stride, padding, backend):
    """Forward equal to the reference bit for bit; dx against autograd through the reference (float64)."""
    x = x.detach().requires_grad_()
    with poison_outputs():
        y = restructurize_unfold(x, grid, kernel, stride, padding, backend=backend)
    expected = restructurize_unfold_ref(x, grid, kernel, stride, padding)
    assert y.shape == expected.shape and y.dtype == expected.dtype and y.is_contiguous()
    assert torch.equal(y, expected), "forward differs from the reference"

    dy = torch.randn(y.shape, device=y.device, dtype=torch.float64).to(y.dtype)
    with poison_outputs():
        (dx,) = torch.autograd.grad(y, x, dy)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    (dx_ref,) = torch.autograd.grad(expected, x, dy)
    x64 = x.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad(restructurize_unfold_ref(x64, grid, kernel, stride, padding), x64, dy.double())
    if x.dtype in LOW_PRECISION:
        assert_within_reference_error(dx, dx_ref, exact, what="dx")
    else:
        assert_relative_close(dx, exact, 1e-12 if x.dtype == torch.float64 else 1e-6, what="dx")
    return y, dx


@st.composite
def geometries(draw):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    height = draw(st.integers(max(1, kernel[0] - 2 * padding[0]), 9))
    width = draw(st.integers(max(1, kernel[1] - 2 * padding[1]), 9))
    square = draw(st.booleans())
    if square:  # the int form of the arguments (T2T's square windows)
        kernel, stride, padding = kernel[0], stride[0], padding[0]
        height = max(height, kernel - 2 * padding)
        width = max(width, kernel - 2 * padding)
    return dict(batch=draw(st.integers(1, 3)), channels=draw(st.integers(1, 9)), height=height, width=width,
                kernel=kernel, stride=stride, padding=padding)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometry=geometries(), tokens=st.booleans(), strided=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_matches_reference_property(geometry, tokens, strided, dtype):
    g = geometry
    x = make_input(g["batch"], g["channels"], g["height"], g["width"], tokens, dtype, strided=strided)
    grid = (g["height"], g["width"]) if tokens else None
    check_op(x, grid, g["kernel"], g["stride"], g["padding"], "cpp")


def run_emulated_cuda(x, grid, kernel, stride, padding, dy, index_bits):
    """The CUDA kernels' threads, run serially on CPU tensors: (y, dx) with NaN-filled outputs."""
    _, kernel, stride, padding = ru_module._validate(x, grid, kernel, stride, padding)
    grid_h, grid_w = grid if grid is not None else (0, 0)
    window = [*kernel, *stride, *padding]
    sizes, pairs, (out_h, out_w), strides = ru_module._geometry(x, grid_h, grid_w, window)
    code = ru_module._DTYPE_CODES[x.dtype]
    y = torch.full((sizes[0], out_h * out_w, sizes[1] * kernel[0] * kernel[1]), float("nan"), dtype=x.dtype)
    native_module().restructurize_unfold_forward_emulated(x.data_ptr(), y.data_ptr(), sizes, *pairs, strides, code,
                                                          index_bits)
    dx = torch.full(x.shape, float("nan"), dtype=x.dtype)
    native_module().restructurize_unfold_backward_emulated(
        dy.data_ptr(), dx.data_ptr(), sizes, *pairs, ru_module._contiguous_strides(tuple(x.shape), grid_h, grid_w),
        x.dim() == 3, code, index_bits)
    return y, dx


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometry=geometries(), tokens=st.booleans(), strided=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       index_bits=st.sampled_from([32, 64]))
def test_cuda_kernels_emulated_on_cpu(geometry, tokens, strided, dtype, index_bits):
    """The CUDA kernels' per-thread indexing (restructurize_unfold.h: forward_row, backward_pixel) with the
    launch's threads per row, in 32- and 64-bit indices: forward equal to the reference, dx equal bit for bit
    to the CPU kernels (both sum each element's taps in (oh, ow) order)."""
    g = geometry
    x = make_input(g["batch"], g["channels"], g["height"], g["width"], tokens, dtype, strided=strided)
    grid = (g["height"], g["width"]) if tokens else None
    expected = restructurize_unfold_ref(x, grid, g["kernel"], g["stride"], g["padding"])
    dy = torch.randn(expected.shape, dtype=torch.float64).to(dtype)
    y, dx = run_emulated_cuda(x, grid, g["kernel"], g["stride"], g["padding"], dy, index_bits)
    assert torch.equal(y, expected)
    xg = x.detach().requires_grad_()
    (dx_cpu,) = torch.autograd.grad(restructurize_unfold(xg, grid, g["kernel"], g["stride"], g["padding"],
                                                         backend="cpp"), xg, dy)
    assert torch.equal(dx, dx_cpu)


@pytest.mark.parametrize("case", ["tokens28_k3s2p1", "image224_k7s4p2", "tokens_c300"])
def test_cuda_kernels_emulated_on_cpu_at_t2t_shapes(case):
    """Rows wider than one pass of threads: 576 features, and 300 channels per pixel in the backward."""
    shape, kernel, stride, padding = T2T_CASES.get(case, (dict(channels=300, height=5, width=3, tokens=True), 3, 2, 1))
    x = make_input(2, shape["channels"], shape["height"], shape["width"], shape["tokens"], torch.float32)
    grid = (shape["height"], shape["width"]) if shape["tokens"] else None
    expected = restructurize_unfold_ref(x, grid, kernel, stride, padding)
    dy = torch.randn(expected.shape)
    y, dx = run_emulated_cuda(x, grid, kernel, stride, padding, dy, 0)
    assert torch.equal(y, expected)
    xg = x.detach().requires_grad_()
    (dx_cpu,) = torch.autograd.grad(restructurize_unfold(xg, grid, kernel, stride, padding, backend="cpp"), xg, dy)
    assert torch.equal(dx, dx_cpu)


def test_emulated_cuda_rejects_bad_index_bits():
    x = make_input(1, 2, 4, 4, True, torch.float32)
    dy = torch.randn(1, 4, 18)
    with pytest.raises(ValueError, match="index_bits"):
        run_emulated_cuda(x, (4, 4), 3, 2, 1, dy, 16)


# The T2T shapes: the re-structurize + split of both token stages and the first split of the image.
T2T_CASES = {
    "tokens56_k3s2p1": (dict(channels=64, height=56, width=56, tokens=True), 3, 2, 1),
    "tokens28_k3s2p1": (dict(channels=64, height=28, width=28, tokens=True), 3, 2, 1),
    "image224_k7s4p2": (dict(channels=3, height=224, width=224, tokens=False), 7, 4, 2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(T2T_CASES))
def test_t2t_shapes(case, dtype):
    shape, kernel, stride, padding = T2T_CASES[case]
    x = make_input(2, shape["channels"], shape["height"], shape["width"], shape["tokens"], dtype)
    grid = (shape["height"], shape["width"]) if shape["tokens"] else None
    y, _ = check_op(x, grid, kernel, stride, padding, "cpp")
    assert y.shape[-1] == shape["channels"] * kernel * kernel  # 576 / 147 features


@pytest.mark.parametrize("kernel,stride,padding", [
    (7, 4, 2), (7, 1, 0), (7, 3, 3), ((5, 7), (2, 3), (1, 2)), ((7, 5), 2, (3, 1)), ((7, 7), (1, 2), (0, 1)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_image_windows_seven_wide(kernel, stride, padding, dtype):
    """The image forward's fixed-size path for windows 7 taps wide that lie wholly inside the image (the first
    soft split), next to padded windows: 2-, 4- and 8-byte elements, and an image whose rows are longer than
    its width (a column slice: x stride 1, y stride W + 5)."""
    channels, height, width = 5, 19, 17
    wide = make_input(2, channels, height, width + 5, False, dtype)
    for image in (wide[..., :width].contiguous(), wide[..., :width]):
        check_op(image, None, kernel, stride, padding, "cpp")


def test_gradcheck_float64():
    x = make_input(2, 3, 5, 4, True, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: restructurize_unfold(t, (5, 4), 3, 2, 1, backend="cpp"), (x,))
    image = make_input(1, 2, 5, 6, False, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: restructurize_unfold(t, None, (2, 3), (2, 1), (1, 0), backend="cpp"),
                                    (image,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_conversions_round_trip(dtype):
    """k=1, s=1: each dx element is one dy element converted to fp32 and back, so every bit pattern must
    survive (NaNs stay NaN; -0 becomes +0, as the sum starts from +0): covers the kernels' own fp16 / bf16
    conversions."""
    patterns = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    dy = patterns.reshape(1, 256, 256)  # (B, L, C) with a 16x16 grid, k=1
    x = torch.randn(1, 256, 256, dtype=dtype, requires_grad=True)
    (dx,) = torch.autograd.grad(restructurize_unfold(x, (16, 16), 1, 1, 0, backend="cpp"), x, dy)
    nan = torch.isnan(patterns.float()).reshape(dx.shape)
    assert torch.isnan(dx[nan].float()).all()
    assert torch.equal(dx[~nan], dy[~nan])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_sums_round_to_nearest_even(dtype):
    """dy in [1, 2): sums of up to 4 windows are exact in fp32, so dx must be torch's rounding of them."""
    x = torch.randn(2, 49, 8, dtype=dtype, requires_grad=True)
    y = restructurize_unfold(x, (7, 7), 2, 1, 0, backend="cpp")
    dy = (1 + torch.rand(y.shape)).to(dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    x32 = x.detach().float().requires_grad_()
    (exact,) = torch.autograd.grad(restructurize_unfold_ref(x32, (7, 7), 2, 1, 0), x32, dy.float())
    assert torch.equal(dx, exact.to(dtype))


@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "image"])
def test_backward_is_deterministic_and_thread_independent(tokens):
    """Both CPU backward paths (channels-last pixels, image planes) at 1-3 OpenMP threads: identical dx."""
    x = make_input(3, 16, 13, 11, tokens, torch.float32).requires_grad_()
    grid = (13, 11) if tokens else None
    y = restructurize_unfold(x, grid, 3, 2, 1, backend="cpp")
    dy = torch.randn_like(y)
    threads = torch.get_num_threads()
    grads = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            grads.append(torch.autograd.grad(y, x, dy, retain_graph=True)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_native_module_shares_torch_openmp_runtime(tmp_path):
    """The CPU kernels' OpenMP threads must be torch's: in a process with torch and t2t_fast._C (and nothing
    else that vendors an OpenMP, as scikit-learn does) exactly one runtime is loaded. A second one's workers
    would spin against torch's on the same cores."""
    script = ("import torch, t2t_fast._C\n"
              "names = ('libgomp', 'libiomp', 'libomp')\n"
              "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if any(n in l for n in names)}))")
    # Run outside the checkout, where the installed package (not the source folder) is imported.
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    runtimes = ast.literal_eval(out.strip().splitlines()[-1])
    assert len(runtimes) == 1, f"OpenMP runtimes loaded: {runtimes}"


def test_backends_and_dispatch():
    x = make_input(2, 5, 6, 7, True, torch.float32)
    expected = restructurize_unfold_ref(x, (6, 7), 3, 2, 1)
    for backend in (None, "auto", "cpp", "torch"):
        assert torch.equal(restructurize_unfold(x, (6, 7), 3, 2, 1, backend=backend), expected)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        restructurize_unfold(x, (6, 7), 3, 2, 1, backend="cuda")


def test_native_module_reports_kernels():
    kernels = native_module().compiled_kernels()
    assert "restructurize_unfold_cpu" in kernels
    assert ("restructurize_unfold_cuda" in kernels) == native_cuda_compiled()


def test_native_entry_point_rejects_bad_geometry():
    """A direct call with a bad geometry raises before touching memory (the wrapper validates first)."""
    module = native_module()
    x = torch.randn(1, 2, 3, 3)
    y = torch.empty(1, 9, 18)
    args = dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), strides=x.stride(), dtype=0, threads=1)
    with pytest.raises(ValueError, match="positive"):
        module.restructurize_unfold_forward_cpu(x.data_ptr(), y.data_ptr(), sizes=(1, 2, 0, 3), **args)
    with pytest.raises(ValueError, match="does not fit"):
        module.restructurize_unfold_forward_cpu(x.data_ptr(), y.data_ptr(), sizes=(1, 2, 3, 3),
                                                **{**args, "kernel": (9, 3)})
    with pytest.raises(ValueError, match="dtype"):
        module.restructurize_unfold_forward_cpu(x.data_ptr(), y.data_ptr(), sizes=(1, 2, 3, 3),
                                                **{**args, "dtype": 7})


def _cuda_driver_loads():
    import ctypes
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not native_cuda_compiled() or _cuda_driver_loads(),
                    reason="needs the CUDA kernels compiled in and no CUDA driver on the machine")
def test_cuda_entry_point_without_a_driver_says_what_to_do():
    """The CUDA runtime is linked statically, so a driver older than the building nvcc fails every call:
    the error names the build's CUDA version and the way out, instead of CUDA's bare message. (A machine
    with no driver at all gives the same CUDA error.)"""
    module = native_module()
    args = dict(sizes=(1, 2, 4, 4), kernel=(3, 3), stride=(2, 2), padding=(1, 1), strides=(32, 16, 4, 1),
                dtype=0, device=0, stream=0)
    with pytest.raises(RuntimeError, match=r"cudaSetDevice: .* built with CUDA \d+\.\d+.*backend='torch'"):
        module.restructurize_unfold_forward_cuda(0, 0, **args)
    with pytest.raises(RuntimeError, match=r"built with CUDA \d+\.\d+.*backend='torch'"):
        module.restructurize_unfold_backward_cuda(0, 0, channels_last=False, **args)


@pytest.mark.parametrize("bad, error, match", [
    (dict(tokens=torch.randn(2, 12, 3).to(torch.int32)), TypeError, "dtype"),
    (dict(tokens=[[1.0]]), TypeError, "torch.Tensor"),
    (dict(grid_size=(3, 5)), ValueError, "N must equal H\\*W"),
    (dict(grid_size=None), ValueError, "needs grid_size"),
    (dict(grid_size=(3, 0)), ValueError, "positive ints"),
    (dict(tokens=torch.randn(2, 3, 4, 4)), ValueError, "only for token input"),
    (dict(tokens=torch.randn(12, 3), grid_size=(3, 4)), ValueError, "2 dims"),
    (dict(tokens=torch.randn(2, 12, 0)), ValueError, "no channels"),
    (dict(kernel_size=9), ValueError, "does not fit"),
    (dict(kernel_size=(3, 3, 3)), TypeError, "pair of ints"),
    (dict(kernel_size=2.0), TypeError, "kernel_size"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(padding=-1), ValueError, "padding must be >= 0"),
    (dict(backend="nope"), ValueError, "unknown backend"),
])
def test_validation(bad, error, match):
    args = dict(tokens=torch.randn(2, 12, 3), grid_size=(3, 4), kernel_size=3, stride=2, padding=1, backend="cpp")
    args.update(bad)
    with pytest.raises(error, match=match):
        restructurize_unfold(**args)


def test_opcheck():
    from t2t_fast.ops.restructurize_unfold import _bwd_op, _fwd_op

    tokens = make_input(2, 5, 6, 7, True, torch.float32).requires_grad_()
    image = make_input(2, 3, 9, 8, False, torch.float32)[..., 1:].requires_grad_()
    torch.library.opcheck(_fwd_op, (tokens, 6, 7, [3, 3, 2, 2, 1, 1]))
    torch.library.opcheck(_fwd_op, (image, 0, 0, [3, 2, 2, 1, 1, 0]))
    dy = torch.randn(2, 12, 45)
    torch.library.opcheck(_bwd_op, (dy, [2, 42, 5], 6, 7, [3, 3, 2, 2, 1, 1]))


def test_torch_compile_fullgraph_forward_backward():
    x = make_input(2, 8, 7, 6, True, torch.float32).requires_grad_()

    def fn(t):
        return restructurize_unfold(t, (7, 6), 3, 2, 1, backend="cpp").square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(x), x)
    (expected,) = torch.autograd.grad(fn(x), x)
    assert torch.equal(grad, expected)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(T2T_CASES) + ["odd_tokens", "odd_image_strided"])
def test_cuda_matches_reference(case, dtype):
    if case == "odd_tokens":
        shape, kernel, stride, padding, strided = dict(channels=5, height=7, width=9, tokens=True), (3, 2), 2, 1, False
    elif case == "odd_image_strided":
        shape, kernel, stride, padding, strided = dict(channels=3, height=11, width=6, tokens=False), 4, 3, 2, True
    else:
        (shape, kernel, stride, padding), strided = T2T_CASES[case], False
    x = make_input(3, shape["channels"], shape["height"], shape["width"], shape["tokens"], dtype, device="cuda",
                   strided=strided)
    grid = (shape["height"], shape["width"]) if shape["tokens"] else None
    _, dx = check_op(x, grid, kernel, stride, padding, "cuda")
    # the same gather order as the CPU kernel: identical gradients
    y_cpu = restructurize_unfold(x.cpu().requires_grad_(), grid, kernel, stride, padding, backend="cpp")
    torch.manual_seed(1)
    dy = torch.randn(y_cpu.shape, dtype=torch.float64).to(dtype)
    x_cuda = x.detach().requires_grad_()
    (dx_cuda,) = torch.autograd.grad(restructurize_unfold(x_cuda, grid, kernel, stride, padding, backend="cuda"),
                                     x_cuda, dy.cuda())
    x_cpu = x.detach().cpu().requires_grad_()
    (dx_cpu,) = torch.autograd.grad(restructurize_unfold(x_cpu, grid, kernel, stride, padding, backend="cpp"),
                                    x_cpu, dy)
    assert torch.equal(dx_cuda.cpu(), dx_cpu)


@requires_cuda
def test_cuda_uses_current_stream_and_compiles():
    x = make_input(2, 16, 14, 14, True, torch.bfloat16, device="cuda").requires_grad_()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = restructurize_unfold(x, (14, 14), 3, 2, 1, backend="cuda")
    stream.synchronize()
    assert torch.equal(y, restructurize_unfold_ref(x, (14, 14), 3, 2, 1))
    compiled = torch.compile(lambda t: restructurize_unfold(t, (14, 14), 3, 2, 1).float().sum(), fullgraph=True)
    (grad,) = torch.autograd.grad(compiled(x), x)
    (expected,) = torch.autograd.grad(restructurize_unfold_ref(x, (14, 14), 3, 2, 1).float().sum(), x)
    assert torch.equal(grad, expected)
