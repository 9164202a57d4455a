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
from t2t_fast.ops._common import DTYPE_CODES, split_geometry, storage_extent
from t2t_fast.testing import (GEOMETRY_CHANGES, assert_call_raised, assert_relative_close,
                              assert_within_reference_error, change_split_geometry, poison_outputs,
                              run_calls_in_subprocess)

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
    """The CUDA kernels, run serially on CPU tensors: (y, dx) with NaN-filled outputs."""
    grid_h, grid_w = grid if grid is not None else (0, 0)
    sizes, kernel, stride, padding, (out_h, out_w) = ru_module._validate(x, grid, kernel, stride, padding)
    strides = split_geometry(x, grid_h, grid_w)[1]
    code = DTYPE_CODES[x.dtype]
    y = torch.full((sizes[0], out_h * out_w, sizes[1] * kernel[0] * kernel[1]), float("nan"), dtype=x.dtype)
    native_module().restructurize_unfold_forward_emulated(x.data_ptr(), storage_extent(x), y.data_ptr(),
                                                          y.numel(), sizes, kernel, stride, padding, strides, code,
                                                          index_bits)
    dx = torch.full(x.shape, float("nan"), dtype=x.dtype)
    native_module().restructurize_unfold_backward_emulated(
        dy.data_ptr(), dy.numel(), dx.data_ptr(), dx.numel(), sizes, kernel, stride, padding,
        ru_module._contiguous_strides(tuple(x.shape), grid_h, grid_w), code, index_bits)
    return y, dx


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometry=geometries(), tokens=st.booleans(), strided=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       index_bits=st.sampled_from([32, 64]))
def test_cuda_kernels_emulated_on_cpu(geometry, tokens, strided, dtype, index_bits):
    """The CUDA kernels' per-thread indexing (restructurize_unfold.h: the staged forward of token input,
    forward_row, the staged backward) with the launch's blocks and threads, in 32- and 64-bit indices: forward equal
    to the reference, dx equal bit for bit to the CPU kernels (both sum each element's taps in (oh, ow) order)."""
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


STAGED_CASES = {
    # id: (channels, height, width, kernel, stride, padding, dtype, storage offset of x in elements)
    "rows_split_into_channel_chunks_fp32": (700, 5, 4, 3, 2, 1, torch.float32, 0),  # 25 KB rows
    "rows_split_into_channel_chunks_bf16": (1400, 3, 3, 3, 1, 1, torch.bfloat16, 0),  # 16-bit pairs
    "unaligned_bf16": (6, 5, 6, 3, 2, 1, torch.bfloat16, 1),  # x off 32-bit words: one channel per load
    "odd_channels_fp16": (5, 6, 7, (3, 2), (2, 1), (1, 0), torch.float16, 0),  # rows of 60 bytes
    "float64": (4, 6, 5, 3, 2, 1, torch.float64, 0),
    "taps_beyond_the_table": (2, 33, 33, 33, 1, 0, torch.float32, 0),  # 1089 taps: forward_row's kernel
}


@pytest.mark.parametrize("index_bits", [32, 64])
@pytest.mark.parametrize("case", list(STAGED_CASES))
def test_cuda_forward_emulated_staged_paths(case, index_bits):
    """Token input takes the staged forward (tiles through shared memory, loads along channels): rows split
    into channel chunks, 16-bit channels loaded in pairs or singly, 16-byte or element-wide stores; windows
    with more taps than the tile table fall back to forward_row."""
    channels, height, width, kernel, stride, padding, dtype, offset = STAGED_CASES[case]
    shape = (2, height * width, channels)
    x = torch.randn(offset + 2 * height * width * channels, dtype=torch.float64).to(dtype)[offset:].view(shape)
    grid = (height, width)
    expected = restructurize_unfold_ref(x, grid, kernel, stride, padding)
    dy = torch.randn(expected.shape, dtype=torch.float64).to(dtype)
    y, dx = run_emulated_cuda(x, grid, kernel, stride, padding, dy, index_bits)
    assert torch.equal(y, expected)
    xg = x.detach().requires_grad_()
    (dx_cpu,) = torch.autograd.grad(restructurize_unfold(xg, grid, kernel, stride, padding, backend="cpp"), xg, dy)
    assert torch.equal(dx, dx_cpu)


_INT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
BACKWARD_CASES = {
    # id: (batch, channels, height, width, tokens, kernel, stride, padding, dtype, dy offset, dx gap)
    # dx gap: elements between pixels (tokens) or after each image row (images) of the dx buffer
    "tokens56_k3s2p1_fp32": (2, 64, 56, 56, True, 3, 2, 1, torch.float32, 0, 0),
    "tokens56_k3s2p1_fp16": (2, 64, 56, 56, True, 3, 2, 1, torch.float16, 0, 0),
    "tokens56_k3s2p1_bf16": (2, 64, 56, 56, True, 3, 2, 1, torch.bfloat16, 0, 0),
    "tokens28_k3s2p1_fp32": (3, 64, 28, 28, True, 3, 2, 1, torch.float32, 0, 0),
    "tokens28_k3s2p1_fp16": (3, 64, 28, 28, True, 3, 2, 1, torch.float16, 0, 0),
    "tokens28_k3s2p1_bf16": (3, 64, 28, 28, True, 3, 2, 1, torch.bfloat16, 0, 0),
    "odd_channels_fp32": (2, 5, 7, 9, True, (3, 2), (2, 1), (1, 0), torch.float32, 0, 0),  # 120-byte dy rows
    "odd_channels_bf16": (2, 7, 6, 5, True, 3, 2, 1, torch.bfloat16, 0, 0),  # one channel per thread
    "float64": (2, 6, 9, 7, True, 3, 2, 1, torch.float64, 0, 0),
    "chunked_rows_fp32": (2, 300, 11, 9, True, 3, 2, 1, torch.float32, 0, 0),
    "chunked_rows_bf16": (2, 600, 5, 6, True, 3, 1, 1, torch.bfloat16, 0, 0),
    "dy_off_16_bytes_bf16": (2, 64, 9, 10, True, 3, 2, 1, torch.bfloat16, 1, 0),
    "dx_pixels_apart_bf16": (2, 16, 8, 7, True, 3, 2, 1, torch.bfloat16, 0, 2),  # 32-bit words still
    "dx_pixels_odd_apart_fp16": (2, 16, 8, 7, True, 3, 2, 1, torch.float16, 0, 1),  # one channel per thread
    "stride_beyond_kernel": (2, 4, 13, 11, True, 2, 3, 0, torch.float32, 0, 0),  # pixels in no window
    "image224_k7s4p2_fp32": (1, 3, 224, 224, False, 7, 4, 2, torch.float32, 0, 0),
    "image224_k7s4p2_bf16": (1, 3, 224, 224, False, 7, 4, 2, torch.bfloat16, 0, 0),
    "image_rows_apart_fp64": (2, 3, 19, 17, False, (5, 7), (2, 3), (1, 2), torch.float64, 0, 5),
    "windows_beyond_shared_memory": (1, 2, 40, 40, True, 33, 1, 0, torch.float32, 0, 0),  # the unstaged kernel
}


def backward_buffers(batch, channels, height, width, tokens, kernel, stride, padding, dtype, dy_offset, gap):
    """dy (fresh random, at `dy_offset` elements into its buffer) and dx's geometry: a NaN-filled dx buffer and
    the (B, C, H, W) strides that leave `gap` elements between its pixels (tokens) or image rows."""
    kernel, stride, padding = ((v, v) if isinstance(v, int) else v for v in (kernel, stride, padding))
    out_h = (height + 2 * padding[0] - kernel[0]) // stride[0] + 1
    out_w = (width + 2 * padding[1] - kernel[1]) // stride[1] + 1
    features = channels * kernel[0] * kernel[1]
    dy = torch.randn(dy_offset + batch * out_h * out_w * features, dtype=torch.float64).to(dtype)[dy_offset:]
    if tokens:
        pixel = channels + gap
        strides = (height * width * pixel, 1, width * pixel, pixel)
    else:
        row = width + gap
        strides = (channels * height * row, height * row, row, 1)
    dx = torch.full((batch * strides[0],), float("nan"), dtype=dtype)
    return dy, dx, ((batch, channels, height, width), kernel, stride, padding, strides)


@pytest.mark.parametrize("index_bits", [32, 64])
@pytest.mark.parametrize("case", list(BACKWARD_CASES))
def test_cuda_backward_emulated_staged_paths(case, index_bits):
    """The staged backward (tiles of dx: dy's windows through shared memory, loaded along dy's rows, then summed
    per pixel) at the T2T shapes and around them: dx bit for bit the CPU backward's, gaps between dx's pixels
    left untouched. Covers 16-byte and element-wide loads, 16-bit channels stored in pairs or singly, rows split
    into channel chunks, images, and windows too large for shared memory (the unstaged kernels)."""
    batch, channels, height, width, tokens, kernel, stride, padding, dtype, dy_offset, gap = BACKWARD_CASES[case]
    dy, dx, geometry = backward_buffers(*BACKWARD_CASES[case])
    code = DTYPE_CODES[dtype]
    module = native_module()
    plan = module.restructurize_unfold_backward_plan(dy.data_ptr(), dx.data_ptr(), *geometry, code, index_bits)
    elem = dy.element_size()
    if case == "windows_beyond_shared_memory":
        assert plan["tiles"] == 0
    else:
        assert plan["tiles"] > 0 and plan["table_bytes"] + plan["stage_bytes"] <= 48 * 1024
        pairs = tokens and elem == 2 and channels % 2 == 0 and gap % 2 == 0
        assert plan["granule"] == (2 if pairs else 1)
        wide = dy_offset * elem % 16 == 0 and geometry[0][1] * geometry[1][0] * geometry[1][1] * elem % 16 == 0
        assert plan["load_bytes"] == (16 if wide else elem)
        if case.startswith("chunked_rows"):
            assert plan["channels_per_tile"] < channels
    expected = dx.clone()
    module.restructurize_unfold_backward_emulated(dy.data_ptr(), dy.numel(), dx.data_ptr(), dx.numel(), *geometry,
                                                  code, index_bits)
    module.restructurize_unfold_backward_cpu(dy.data_ptr(), dy.numel(), expected.data_ptr(), expected.numel(),
                                             *geometry, code, 2)
    assert not torch.isnan(expected).all()
    assert torch.equal(dx.view(_INT_VIEWS[elem]), expected.view(_INT_VIEWS[elem]))


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
    assert {"restructurize_unfold_cpu", "linear_cpu", "encoder_cpu"} <= set(kernels)
    assert ("restructurize_unfold_cuda" in kernels) == native_cuda_compiled()


def test_native_entry_point_rejects_bad_geometry():
    """A direct call with a bad geometry raises before touching memory (the wrapper validates first)."""
    module = native_module()
    x = torch.randn(1, 2, 3, 3)
    y = torch.empty(1, 9, 18)
    args = dict(x=x.data_ptr(), x_extent=x.numel(), y=y.data_ptr(), y_extent=y.numel(), kernel=(3, 3),
                stride=(1, 1), padding=(1, 1), strides=x.stride(), dtype=0, threads=1, isa="baseline")
    with pytest.raises(ValueError, match="positive"):
        module.restructurize_unfold_forward_cpu(sizes=(1, 2, 0, 3), **args)
    with pytest.raises(ValueError, match="does not fit"):
        module.restructurize_unfold_forward_cpu(sizes=(1, 2, 3, 3), **{**args, "kernel": (9, 3)})
    with pytest.raises(ValueError, match="dtype"):
        module.restructurize_unfold_forward_cpu(sizes=(1, 2, 3, 3), **{**args, "dtype": 7})


def test_native_entry_points_check_the_reach_of_the_geometry():
    """The extension is told how many elements each buffer holds from its address (a tensor's storage past its
    offset) and refuses a geometry that reaches further, or overflows int64, or writes dx through overlapping
    strides."""
    module = native_module()
    x = torch.randn(1, 2, 3, 3)
    y = torch.empty(1, 9, 18)
    forward = dict(x=x.data_ptr(), x_extent=x.numel(), y=y.data_ptr(), y_extent=y.numel(), sizes=(1, 2, 3, 3),
                   kernel=(3, 3), stride=(1, 1), padding=(1, 1), strides=x.stride(), dtype=0)
    module.restructurize_unfold_forward_cpu(**forward, threads=1, isa="baseline")
    assert torch.equal(y, restructurize_unfold_ref(x, None, 3, 1, 1))
    for bad, match in [
        (dict(sizes=(2, 2, 3, 3)), "x holds 18 elements but the geometry reaches 36"),
        (dict(strides=(18, 9, 3, 2)), "x holds 18 elements but the geometry reaches 20"),
        (dict(y_extent=y.numel() - 1), "y holds 161 elements but the geometry reaches 162"),
        (dict(x=x.data_ptr() + 2), "not aligned"),
        (dict(y=0), "null"),
        (dict(sizes=(2**40, 2**40, 3, 3)), "overflow"),
        (dict(padding=(2**62, 1)), "overflow"),
    ]:
        with pytest.raises(ValueError, match=match):
            module.restructurize_unfold_forward_cpu(**{**forward, **bad}, threads=1, isa="baseline")
        with pytest.raises(ValueError, match=match):
            module.restructurize_unfold_forward_emulated(**{**forward, **bad})
    dy = torch.randn(1, 9, 18)
    dx = torch.empty(1, 2, 3, 3)
    backward = dict(dy=dy.data_ptr(), dy_extent=dy.numel(), dx=dx.data_ptr(), dx_extent=dx.numel(),
                    sizes=(1, 2, 3, 3), kernel=(3, 3), stride=(1, 1), padding=(1, 1), strides=dx.stride(), dtype=0)
    for bad, match in [
        (dict(dy_extent=dy.numel() - 1), "dy holds 161 elements"),
        (dict(dx_extent=dx.numel() - 1), "dx holds 17 elements"),
        (dict(strides=(18, 4, 3, 1)), "overlap"),  # channel 1 written over row 1 of channel 0
        (dict(strides=(0, 9, 3, 1), sizes=(2, 2, 3, 3), dy_extent=2 * dy.numel()), "overlap"),  # both images
    ]:
        with pytest.raises(ValueError, match=match):
            module.restructurize_unfold_backward_cpu(**{**backward, **bad}, threads=1)
        with pytest.raises(ValueError, match=match):
            module.restructurize_unfold_backward_emulated(**{**backward, **bad})


# Calls that crashed the process or read out of bounds before the custom ops checked their arguments, with the
# error each must give now. Run in a subprocess, so that a crash fails these tests rather than the test run.
REPRODUCERS = {
    "fwd_grid_beyond_the_tokens": (
        "torch.ops.t2t_fast.restructurize_unfold_fwd(torch.randn(2, 16, 3), 10000, 10000, [1, 1, 1000, 1000, 0, 0])",
        "ValueError", r"N must equal H\*W"),
    "bwd_dy_smaller_than_input_shape": (
        "torch.ops.t2t_fast.restructurize_unfold_bwd(torch.zeros(1), [1, 2000 * 2000, 4], 2000, 2000, "
        "[3, 3, 1, 1, 1, 1])", "ValueError", r"dy has shape \(1,\)"),
    "fwd_grid_of_more_positions_than_tokens": (
        "torch.ops.t2t_fast.restructurize_unfold_fwd(torch.randn(2, 16, 3), 5, 4, [3, 3, 1, 1, 1, 1])",
        "ValueError", r"20 positions but tokens has 16 tokens"),
    "fwd_short_window": (
        "torch.ops.t2t_fast.restructurize_unfold_fwd(torch.randn(2, 16, 3), 4, 4, [3, 3, 1])",
        "TypeError", r"window must be 6 ints"),
    "fwd_int_dtype": (
        "torch.ops.t2t_fast.restructurize_unfold_fwd(torch.randint(0, 9, (2, 16, 3)), 4, 4, [3, 3, 1, 1, 1, 1])",
        "TypeError", r"dtype int64"),
    "bwd_int_dtype": (
        "torch.ops.t2t_fast.restructurize_unfold_bwd(torch.randint(0, 9, (2, 4, 27)), [2, 16, 3], 4, 4, "
        "[3, 3, 2, 2, 1, 1])", "TypeError", r"dy has dtype int64"),
    "native_entry_point_beyond_x": (
        "t2t_fast._C.restructurize_unfold_forward_cpu(x.data_ptr(), x.numel(), y.data_ptr(), y.numel(), "
        "(1, 1, 1000, 1000), (1, 1), (1, 1), (0, 0), (0, 1, 1000, 1), 0, 1, 'baseline')", "ValueError", r"x holds 96 elements"),
}

_REPRODUCER_SETUP = """
import t2t_fast._C
import t2t_fast.ops  # registers the custom ops
x, y = torch.randn(2, 16, 3), torch.empty(10**6)
"""


@pytest.fixture(scope="module")
def reproducer_outcomes(tmp_path_factory):
    """REPRODUCERS run one after the other in one subprocess (see :func:`run_calls_in_subprocess`)."""
    return run_calls_in_subprocess(_REPRODUCER_SETUP, {name: call for name, (call, _, _) in REPRODUCERS.items()},
                                   cwd=tmp_path_factory.mktemp("reproducers"), timeout=300)


@pytest.mark.parametrize("case", list(REPRODUCERS))
def test_bad_direct_calls_raise_instead_of_crashing(case, reproducer_outcomes):
    _, kind, match = REPRODUCERS[case]
    assert_call_raised(*reproducer_outcomes, case, kind, match)


OP_ERRORS = (ValueError, TypeError)


@st.composite
def direct_op_calls(draw):
    """Arguments of the registered forward and backward ops: a consistent geometry, then one to three of its
    parts replaced by random values (some of which still agree)."""
    g = draw(geometries())
    pair = [(v, v) if isinstance(v, int) else v for v in (g["kernel"], g["stride"], g["padding"])]
    window = [pair[0][0], pair[0][1], pair[1][0], pair[1][1], pair[2][0], pair[2][1]]
    tokens = draw(st.booleans())
    batch, channels, height, width = g["batch"], g["channels"], g["height"], g["width"]
    shape = [batch, height * width, channels] if tokens else [batch, channels, height, width]
    grid = [height, width] if tokens else [0, 0]
    out_h = (height + 2 * window[4] - window[0]) // window[2] + 1
    out_w = (width + 2 * window[5] - window[1]) // window[3] + 1
    dy_shape = [batch, out_h * out_w, channels * window[0] * window[1]]
    dtype = torch.float32
    for change in draw(st.lists(st.sampled_from([*GEOMETRY_CHANGES, "window_length", "dtype", "dy_shape", "empty"]),
                                min_size=1, max_size=3)):
        if change in GEOMETRY_CHANGES:
            shape, grid, window = change_split_geometry(draw, change, shape, grid, window, largest=10)
        elif change == "window_length":
            window = window[:draw(st.integers(0, 7))] + [1] * draw(st.integers(0, 2))
        elif change == "dtype":
            dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64,
                                          torch.bool]))
        elif change == "dy_shape":
            dy_shape[draw(st.integers(0, 2))] = draw(st.integers(0, 40))
        else:
            shape[0] = dy_shape[0] = 0
    return dict(shape=shape, grid=grid, window=window, dy_shape=dy_shape, dtype=dtype)


def random_tensor(shape, dtype):
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=torch.float64).to(dtype)
    return torch.randint(0, 9, shape).to(dtype)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=direct_op_calls())
def test_registered_ops_raise_or_match_the_reference(call):
    """torch.ops.t2t_fast.restructurize_unfold_fwd / _bwd called directly with arguments that mostly disagree
    with each other: a clear ValueError / TypeError, or the reference's result (never a crash, never numbers
    from a geometry the tensors do not have)."""
    x = random_tensor(call["shape"], call["dtype"])
    grid_h, grid_w = call["grid"]
    window = call["window"]
    try:
        with poison_outputs():
            y = torch.ops.t2t_fast.restructurize_unfold_fwd(x, grid_h, grid_w, window)
    except OP_ERRORS as exc:
        assert str(exc).startswith("restructurize_unfold: "), exc
    else:
        grid = (grid_h, grid_w) if x.dim() == 3 else None
        expected = restructurize_unfold_ref(x, grid, window[0:2], window[2:4], window[4:6])
        assert torch.equal(y, expected)

    dy = random_tensor(call["dy_shape"], call["dtype"])
    try:
        with poison_outputs():
            dx = torch.ops.t2t_fast.restructurize_unfold_bwd(dy, call["shape"], grid_h, grid_w, window)
    except OP_ERRORS as exc:
        assert str(exc).startswith("restructurize_unfold: "), exc
    else:
        x64 = torch.zeros(call["shape"], dtype=torch.float64, requires_grad=True)
        grid = (grid_h, grid_w) if x64.dim() == 3 else None
        reference = restructurize_unfold_ref(x64, grid, window[0:2], window[2:4], window[4:6])
        (exact,) = torch.autograd.grad(reference, x64, dy.double())
        assert dx.shape == exact.shape and dx.dtype == dy.dtype
        # sums of a few taps, rounded once to dy's dtype
        tolerance = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dy.dtype, 1e-2)
        assert torch.allclose(dx.double(), exact, rtol=tolerance, atol=tolerance)


def _pair_or_int(draw, low, high):
    if draw(st.booleans()):
        return draw(st.integers(low, high))
    return (draw(st.integers(low, high)), draw(st.integers(low, high)))


@st.composite
def wrapper_calls(draw):
    """restructurize_unfold arguments, valid or not: shapes with zeros, grids that may not match, windows
    that may not fit, negative strides and paddings."""
    tokens = draw(st.booleans())
    shape = draw(st.lists(st.integers(0, 7), min_size=3, max_size=3)) if tokens else \
        draw(st.lists(st.integers(0, 7), min_size=4, max_size=4))
    grid = None
    if tokens or draw(st.integers(0, 4)) == 0:
        grid = draw(st.one_of(st.none(), st.tuples(st.integers(-1, 6), st.integers(-1, 6))))
    return dict(shape=shape, grid=grid, kernel=_pair_or_int(draw, 0, 5), stride=_pair_or_int(draw, -1, 3),
                padding=_pair_or_int(draw, -1, 3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=wrapper_calls(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_torch_and_cpp_backends_agree_or_raise_alike(call, dtype):
    """For any arguments, backends torch and cpp give the same forward and dx, or raise the same exception type
    (the one check in front of both)."""
    x = torch.randn(call["shape"], dtype=torch.float64).to(dtype)
    outcomes = {}
    for backend in ("torch", "cpp"):
        xg = x.detach().requires_grad_()
        try:
            y = restructurize_unfold(xg, call["grid"], call["kernel"], call["stride"], call["padding"],
                                     backend=backend)
        except Exception as exc:  # noqa: BLE001 - the type is what is compared
            outcomes[backend] = type(exc)
            continue
        torch.manual_seed(0)
        dy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
        outcomes[backend] = (y, torch.autograd.grad(y, xg, dy)[0] if y.numel() else None)
    torch_outcome, cpp_outcome = outcomes["torch"], outcomes["cpp"]
    if isinstance(torch_outcome, type) or isinstance(cpp_outcome, type):
        assert torch_outcome == cpp_outcome
    else:
        assert torch.equal(torch_outcome[0], cpp_outcome[0])
        if torch_outcome[1] is not None:
            assert_relative_close(cpp_outcome[1], torch_outcome[1], 1e-2 if dtype == torch.bfloat16 else 1e-6,
                                  what="dx")


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
    # host buffers of the right extents: the call fails at cudaSetDevice, before any launch
    image, unfolded = torch.empty(32), torch.empty(72)
    args = dict(sizes=(1, 2, 4, 4), kernel=(3, 3), stride=(2, 2), padding=(1, 1), strides=(32, 16, 4, 1),
                dtype=0, device=0, stream=0)
    with pytest.raises(RuntimeError, match=r"cudaSetDevice: .* built with CUDA \d+\.\d+.*backend='torch'"):
        module.restructurize_unfold_forward_cuda(image.data_ptr(), 32, unfolded.data_ptr(), 72, **args)
    with pytest.raises(RuntimeError, match=r"built with CUDA \d+\.\d+.*backend='torch'"):
        module.restructurize_unfold_backward_cuda(unfolded.data_ptr(), 72, image.data_ptr(), 32, **args)


@pytest.mark.parametrize("bad, error, match", [
    (dict(tokens=torch.randn(2, 12, 3).to(torch.int32)), TypeError, "dtype"),
    (dict(tokens=[[1.0]]), TypeError, "torch.Tensor"),
    (dict(grid_size=(3, 5)), ValueError, "N must equal H\\*W"),
    (dict(grid_size=None), ValueError, "needs grid_size"),
    (dict(grid_size=(3, 0)), ValueError, "positive ints"),
    (dict(tokens=torch.randn(2, 3, 4, 4)), ValueError, "only for token input"),
    (dict(tokens=torch.randn(12, 3), grid_size=(3, 4)), ValueError, "2 dims"),
    (dict(tokens=torch.randn(2, 12, 0)), ValueError, "no channels"),
    (dict(tokens=torch.randn(2, 3, 0, 4), grid_size=None), ValueError, "empty image \\(0x4\\)"),
    (dict(tokens=torch.randn(2, 3, 4, 0), grid_size=None), ValueError, "empty image \\(4x0\\)"),
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
    stream.wait_stream(torch.cuda.current_stream())  # x was written on the current stream
    with torch.cuda.stream(stream):
        y = restructurize_unfold(x, (14, 14), 3, 2, 1, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)  # y is read on the current stream
    assert torch.equal(y, restructurize_unfold_ref(x, (14, 14), 3, 2, 1))
    compiled = torch.compile(lambda t: restructurize_unfold(t, (14, 14), 3, 2, 1).float().sum(), fullgraph=True)
    (grad,) = torch.autograd.grad(compiled(x), x)
    (expected,) = torch.autograd.grad(restructurize_unfold_ref(x, (14, 14), 3, 2, 1).float().sum(), x)
    assert torch.equal(grad, expected)


def test_gradgradcheck_float64():
    """The backward (a fold) is differentiable again: double backward (create_graph=True) works."""
    x = make_input(2, 3, 5, 4, True, torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: restructurize_unfold(t, (5, 4), 3, 2, 1, backend="cpp"), (x,))
