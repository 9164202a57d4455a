"""The fast model against the reference: parity on every variant, backends, mixed precision,
torch.compile, ONNX export and training memory."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import t2t_fast
import t2t_fast.reference as ref
from t2t_fast.testing import assert_within_reference_error, relative_error

ALL_VARIANTS = t2t_fast.list_models()
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pair(name, **kwargs):
    """A reference model and a fast model holding the same weights (eval mode)."""
    reference = ref.create_model(name, **kwargs).eval()
    fast = t2t_fast.create_model(name, **kwargs).eval()
    fast.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(fast.state_dict(), strict=True)  # and back: both directions load
    return reference, fast


def _loss_and_grads(model, x, probe):
    model.zero_grad()
    logits = model(x)
    (logits * probe).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def _check_parity(reference, fast, x, logits_rtol=1e-5, grad_rtol=1e-4):
    probe = torch.randn(x.shape[0], reference.num_classes, dtype=x.dtype, device=x.device)
    ref_logits, ref_grads = _loss_and_grads(reference, x, probe)
    fast_logits, fast_grads = _loss_and_grads(fast, x, probe)
    assert relative_error(fast_logits, ref_logits) <= logits_rtol
    assert ref_grads.keys() == fast_grads.keys()
    worst = max(ref_grads, key=lambda n: relative_error(fast_grads[n], ref_grads[n]))
    assert relative_error(fast_grads[worst], ref_grads[worst]) <= grad_rtol, worst


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_parity_with_reference_cpu_fp32(name):
    torch.manual_seed(0)
    reference, fast = _pair(name)
    _check_parity(reference, fast, torch.randn(2, 3, 224, 224))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="runs the Triton kernels on CPU tensors in the interpreter")
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_parity_triton_backend_in_interpreter(name):
    torch.manual_seed(0)
    reference, fast = _pair(name, img_size=112)
    fast.set_backend("triton")
    _check_parity(reference, fast, torch.randn(1, 3, 112, 112))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_forced_cpu_backends_agree(backend):
    reference, fast = _pair("t2t_vit_7", img_size=112)
    fast.set_backend(backend)
    _check_parity(reference, fast, torch.randn(2, 3, 112, 112))


def test_forced_backend_that_cannot_run_raises():
    fast = t2t_fast.create_model("t2t_vit_7", backend="cuda").eval()
    with pytest.raises(t2t_fast.BackendUnavailableError, match="cuda"):
        fast(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match="unknown backend"):
        t2t_fast.create_model("t2t_vit_7", backend="fastest")


@pytest.mark.parametrize("triton_version,numpy_version,usable", [
    ("3.6.0", "2.4.1", False), ("3.6.0", "2.3.5", True), ("3.7.0", "2.4.1", True), ("3.10.0", "2.5.0rc1", True)])
def test_triton_interpreter_known_incompatibility(monkeypatch, triton_version, numpy_version, usable):
    """Triton 3.6's interpreter fails every runtime-bound loop under NumPy >= 2.4 (triton-lang/triton#9171):
    a forced 'triton' backend on CPU tensors says so instead of failing inside a kernel."""
    import numpy
    import triton

    from t2t_fast.backend import unavailable_reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    reason = unavailable_reason("triton", "cpu")
    assert (reason is None) == usable
    if not usable:
        assert "9171" in reason and triton_version in reason and numpy_version in reason


def test_env_var_selects_backend(monkeypatch):
    fast = t2t_fast.create_model("t2t_vit_7").eval()
    monkeypatch.setenv("T2T_FAST_BACKEND", "cuda")
    with pytest.raises(t2t_fast.BackendUnavailableError):
        fast(torch.randn(1, 3, 224, 224))
    monkeypatch.setenv("T2T_FAST_BACKEND", "torch")
    with torch.no_grad():
        assert torch.isfinite(fast(torch.randn(1, 3, 224, 224))).all()


@requires_cuda
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_parity_on_cuda(name):
    """The auto backend on CUDA tensors (Triton kernels, the CUDA extension, SDPA) against the reference on
    the same GPU, fp32: logits and every parameter gradient."""
    torch.manual_seed(0)
    reference, fast = (model.cuda() for model in _pair(name))
    _check_parity(reference, fast, torch.randn(2, 3, 224, 224, device="cuda"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_bf16_autocast_error_within_twice_the_reference(name, device):
    torch.manual_seed(0)
    reference, fast = (model.to(device) for model in _pair(name))
    x = torch.randn(2, 3, 224, 224, device=device)
    with torch.no_grad():
        exact = ref.create_model(name).double().eval().to(device)
        exact.load_state_dict(reference.state_dict())
        expected = exact(x.double())
        with torch.autocast(device, dtype=torch.bfloat16):
            ref_bf16 = reference(x)
            fast_bf16 = fast(x)
    assert_within_reference_error(fast_bf16.float(), ref_bf16.float(), expected, factor=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_first_split_writes_the_autocast_dtype(dtype, monkeypatch):
    """Under autocast the first soft split reads the fp32 image and writes its rows in the autocast dtype
    (no fp32 rows and cast): the first projection's input has that dtype and is the fp32 rows rounded once (within
    half a unit in the last place of the dtype, plus the fp32 rounding of the statistics)."""
    torch.manual_seed(0)
    model = t2t_fast.create_model("t2t_vit_7", img_size=64).eval()
    layer = model.tokens_to_token.attention1
    seen = []
    split = t2t_fast.ops.soft_split_layernorm

    def recording_split(*args, **kwargs):
        seen.append(split(*args, **kwargs).detach().clone())
        return seen[-1]

    monkeypatch.setattr(t2t_fast.ops, "soft_split_layernorm", recording_split)
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=dtype):
        model(x)
    kernel, stride, padding = t2t_fast.geometry.SOFT_SPLITS[0]
    rows = t2t_fast.ops.soft_split_layernorm_ref(x, kernel, stride, padding, layer.norm1.weight.detach(),
                                                 layer.norm1.bias.detach(), layer.norm1.eps)
    assert seen[0].dtype == dtype
    half_ulp = torch.finfo(dtype).eps / 2
    error = (seen[0].float() - rows).abs()
    assert (error <= rows.abs() * (half_ulp + 1e-5) + 1e-6).all(), error.max()


@pytest.mark.parametrize("mode", ["autocast-bf16", "autocast-fp16", "bf16-weights"])
def test_backbone_attention_in_low_precision_on_cpu(mode, monkeypatch):
    """The matmul + softmax form of the backbone attention (chosen on CPU per CPU class, dtype and grad mode; see
    t2t_fast.backend.cpu_attention; forced here) in fp16/bf16: output and input gradient within twice the
    reference attention's error against float64, and no flash kernel call."""
    monkeypatch.setenv(t2t_fast.backend.CPU_ATTENTION_ENV_VAR, "matmul")
    torch.manual_seed(0)
    reference, fast = _pair("t2t_vit_7", img_size=112)
    ref_attn, fast_attn = reference.blocks[0].attn, fast.blocks[0].attn
    exact_attn = ref.create_model("t2t_vit_7", img_size=112).blocks[0].attn.double()
    exact_attn.load_state_dict(ref_attn.state_dict())
    x = torch.randn(2, 50, 256, dtype=torch.float64)
    dy = torch.randn(2, 50, 256, dtype=torch.float64)
    dtype = torch.float16 if mode == "autocast-fp16" else torch.bfloat16
    if mode == "bf16-weights":
        ref_attn, fast_attn = ref_attn.to(dtype), fast_attn.to(dtype)
        inputs, context = x.to(dtype), torch.autocast("cpu", enabled=False)
    else:
        inputs, context = x.float(), torch.autocast("cpu", dtype=dtype)

    def output_and_dx(module, inp, context):
        inp = inp.detach().requires_grad_()
        with context:
            out = module(inp)
        (dx,) = torch.autograd.grad(out, inp, dy.to(out.dtype))
        return out.double(), dx.double()

    with context:
        assert inputs.device.type == "cpu"
        assert t2t_fast.model.cpu_maths_dtype(inputs) in (torch.float16, torch.bfloat16)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("the flash kernel ran in fp16/bf16 on CPU")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    exact = output_and_dx(exact_attn, x, torch.autocast("cpu", enabled=False))
    theirs = output_and_dx(ref_attn, inputs, context)
    ours = output_and_dx(fast_attn, inputs, context)
    for what, actual, lowp, expected in zip(("output", "dx"), ours, theirs, exact):
        assert_within_reference_error(actual, lowp, expected, what=what)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights(dtype):
    reference, fast = _pair("t2t_vit_7", img_size=112)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = reference(x)
        out = fast.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, expected) < (2e-2 if dtype == torch.float16 else 8e-2)


def _overflowing_pair():
    """Weights for which every performer feature of attention1 is exp(~16): inf in fp16."""
    reference, fast = _pair("t2t_vit_7", img_size=112)
    layer = reference.tokens_to_token.attention1
    with torch.no_grad():
        layer.kqv.weight.mul_(0.01)
        layer.kqv.bias[:64] = layer.w[0]      # k ~ w_0
        layer.kqv.bias[64:128] = layer.w[0]   # q ~ w_0: u.w_0 - |u|^2/2 ~ 16, exp(16) > fp16 max
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def test_fp16_input_that_makes_the_reference_nan_stays_finite():
    reference, fast = _overflowing_pair()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        exact = ref.create_model("t2t_vit_7", img_size=112).double().eval()
        exact.load_state_dict(reference.state_dict())
        expected = exact(x.double())
        with torch.autocast("cpu", dtype=torch.float16):
            ref_out = reference(x)
            fast_out = fast(x)
    assert not torch.isfinite(ref_out).all(), "the crafted input no longer breaks the reference"
    assert torch.isfinite(fast_out).all()
    assert relative_error(fast_out.float(), expected) < 5e-2


def _tiny(**kwargs):
    return t2t_fast.T2TViT(img_size=64, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10,
                           **kwargs)


@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_torch_compile_fullgraph_forward_and_backward(tokens_type):
    torch._dynamo.reset()
    model = _tiny(tokens_type=tokens_type).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    expected.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("implemented", [("cpp", "cuda", "torch"), ("triton", "torch"),
                                         ("triton", "cuda", "cpp", "torch")])
def test_backend_selection_traces_for_every_device(device_type, implemented):
    """Each op asks the selector inside compiled code. The CPU model compiles never ask about CUDA, so the
    CUDA answers are traced here on a CPU machine: Dynamo must not meet a call it cannot trace (such as
    one into the pybind11 extension), whatever the answer is."""
    from t2t_fast.backend import select_backend

    def chosen_index(t):
        chosen = select_backend("op", torch.device(device_type), implemented)
        return t + implemented.index(chosen)

    torch._dynamo.reset()
    x = torch.randn(3)
    torch.testing.assert_close(torch.compile(chosen_index, fullgraph=True, backend="eager")(x), chosen_index(x))


COMPILE_FIRST = """
import torch, t2t_fast
model = t2t_fast.T2TViT(img_size=64, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10).eval()
x = torch.randn(2, 3, 64, 64)
compiled = torch.compile(model, fullgraph=True)
with torch.no_grad():
    for dtype in (None, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            out, expected = compiled(x), model(x)
        assert out.dtype == expected.dtype and (out.float() - expected.float()).abs().max() < 1e-2, dtype
print("ok")
"""


def test_torch_compile_as_the_first_call(tmp_path):
    """A fresh process whose first call goes through torch.compile(fullgraph=True), fp32 and bf16 autocast:
    nothing the backend selector needs may be imported lazily inside the traced code. (Run outside the
    checkout, so that it imports the installed package.)"""
    result = subprocess.run([sys.executable, "-c", COMPILE_FIRST], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_round_trip(tmp_path, dynamo):
    """Both ONNX exporters (torch.export's, and the TorchScript-based one: a jit trace) with a dynamic batch, and
    torch.export's with a dynamic image size for a dynamic_img_size model: the sizes stay symbols of the graph."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    cases = [(_tiny().eval(), {0: "batch"}, [(3, 3, 64, 64)])]
    if dynamo:
        torch.manual_seed(0)
        dynamic = t2t_fast.create_model("t2t_vit_7", img_size=64, dynamic_img_size=True).eval()
        cases.append((dynamic, {0: "batch", 2: "height", 3: "width"}, [(1, 3, 64, 64), (3, 3, 40, 72)]))
    for index, (model, axes, others) in enumerate(cases):
        x = torch.randn(2, 3, 64, 64)
        path = tmp_path / f"t2t{index}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and its trace's TracerWarnings
            kwargs = dict(dynamic_shapes=({k: torch.export.Dim.AUTO for k in axes},)) if dynamo else dict(
                dynamic_axes={"image": axes})
            torch.onnx.export(model, (x,), str(path), opset_version=18, input_names=["image"],
                              output_names=["logits"], dynamo=dynamo, **kwargs)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for shape in [x.shape, *others]:
            images = torch.randn(shape)
            (logits,) = session.run(None, {"image": images.numpy()})
            with torch.no_grad():
                torch.testing.assert_close(torch.from_numpy(logits), model(images), rtol=1e-4, atol=1e-4)


def test_torch_compile_with_dynamic_image_sizes():
    """A dynamic_img_size model compiled with symbolic sizes (dynamic=True) takes other image sizes, forward and
    backward, with the eager model's numbers (aot_eager: the sizes go through the model's checks as symbols, as
    under inductor, without its code generation)."""
    torch.manual_seed(0)
    model = _tiny(dynamic_img_size=True).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the same numbers without the same masks
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for size in [(64, 64), (40, 72)]:
        x = torch.randn(2, 3, *size)
        model.zero_grad()
        model(x).square().sum().backward()
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        compiled(x).square().sum().backward()
        for got, want in zip((p.grad for p in model.parameters()), expected):
            assert relative_error(got, want) <= 1e-4


def test_torch_export_matches_eager():
    model = _tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_training_keeps_no_unfolded_tensor_alive():
    """The (B, L, C*k*k) soft-split rows are recomputed in backward, never saved."""
    model = t2t_fast.create_model("t2t_vit_7", img_size=112).train()
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.tokens_to_token(torch.randn(2, 3, 112, 112))
    unfolded = [s for s in saved if len(s) == 3 and s[-1] in (147, 576)]
    assert not unfolded, f"unfolded tensors saved for backward: {unfolded}"
    out.sum().backward()
    assert model.tokens_to_token.attention1.kqv.weight.grad is not None


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_forward_mode_ad_matches_the_reference(name):
    """torch.func.jvp and torch.autograd.forward_ad: the fused ops step aside for the torch ops, which have
    forward-mode formulas (the tangents are the reference's, not zeros)."""
    torch.manual_seed(0)
    reference, fast = _pair(name, img_size=64)
    x, tangent = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    expected = torch.func.jvp(reference, (x,), (tangent,))[1]
    assert expected.abs().max() > 0
    assert relative_error(torch.func.jvp(fast, (x,), (tangent,))[1], expected) <= 1e-5
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level():
        dual = fast(forward_ad.make_dual(x, tangent))
        assert relative_error(forward_ad.unpack_dual(dual).tangent, expected) <= 1e-5


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_func_grad_in_training_matches_backward(name):
    """torch.func.grad of a training step (dropout on: the same seed gives the same masks) equals backward's
    gradients; the T2T layers keep their unfolded rows there instead of recomputing them."""
    torch.manual_seed(0)
    model = t2t_fast.create_model(name, img_size=64, num_classes=5).train()
    x, target = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(params, x):
        logits = torch.func.functional_call(model, (params, buffers), (x,))
        return torch.nn.functional.cross_entropy(logits, target)

    torch.manual_seed(1)
    grads = torch.func.grad(loss)(params, x)
    torch.manual_seed(1)
    torch.nn.functional.cross_entropy(model(x), target).backward()
    for n, p in model.named_parameters():
        assert relative_error(grads[n], p.grad) <= 1e-5, n


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_double_backward_with_matmul_attention(name, monkeypatch):
    """A gradient penalty (create_graph=True, then backward) through the fused T2T ops matches the reference, with
    the matmul form of attention on CPU (torch's fused attention kernels have no double backward)."""
    monkeypatch.setattr(t2t_fast.backend, "_cpu_attention_override", "matmul")
    torch.manual_seed(0)
    reference, fast = _pair(name, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (reference, fast):
        model.zero_grad()
        image = x.clone().requires_grad_()
        image_grad, = torch.autograd.grad(model(image).square().sum(), image, create_graph=True)
        image_grad.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, expected in grads[0].items():
        assert relative_error(grads[1][n], expected) <= 1e-4, n
