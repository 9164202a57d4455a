"""The fast model under torch.fx symbolic tracing (and torchvision's feature extractor built on it), torch.jit.trace
and torch.jit.script: the fx graph keeps the fused steps as leaves; the jit-traced and scripted models run the ops'
references. All reproduce the eager logits."""
import warnings

import pytest
import torch

import t2t_fast
import t2t_fast.model as fast

NAMES = ["t2t_vit_7", "t2t_vit_t_14", "t2t_vit_14_se", "t2t_vit_dense", "t2t_vit_16_ghost"]
SIZE = 64


def _model(name):
    torch.manual_seed(0)
    return t2t_fast.create_model(name, img_size=SIZE).eval()


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_matches_eager(name):
    model = _model(name)
    graph = torch.fx.symbolic_trace(model)
    leaves = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    assert fast.split_norm_project in leaves and fast.restructurize_split in leaves
    assert (fast.linear_attention in leaves) == ("_t_" not in name)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)
    # the gradients of the traced graph are the model's (the graph shares the model's parameters)
    graph(x).square().sum().backward()
    traced = {n: p.grad.clone() for n, p in graph.named_parameters()}
    model.zero_grad()
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(traced[n], p.grad, rtol=1e-5, atol=1e-7)


def test_torchvision_feature_extractor():
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    model = _model("t2t_vit_7")
    extractor = feature_extraction.create_feature_extractor(model, return_nodes={"blocks.3": "mid", "norm": "out"})
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        got = extractor(x)
        _, (mid,) = model.forward_intermediates(x, indices=[3], output_fmt="NLC")
        torch.testing.assert_close(got["out"], model.forward_features(x), rtol=0, atol=0)
    torch.testing.assert_close(got["mid"][:, 1:], mid, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_torchscript_matches_eager(name):
    model = _model(name)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-4, atol=1e-5)
    assert scripted.code  # compiled, not traced: TorchScript holds the whole forward


@pytest.mark.parametrize("name", NAMES)
def test_jit_trace_matches_eager(name):
    """torch.jit.trace records the ops' pure-torch references (the image size becomes a constant of the trace, the
    batch size does not)."""
    model = _model(name)
    x, other = torch.randn(2, 3, SIZE, SIZE), torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)
        for images in (x, other):
            torch.testing.assert_close(traced(images), model(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make_reference", [False, True])
def test_torchscript_refuses_what_the_model_refuses(make_reference):
    """A scripted model checks its input as the model does (TorchScript raises its own error type, with the
    model's message): a wrong image size is no silent answer."""
    import t2t_fast.reference as reference

    torch.manual_seed(0)
    model = (reference.t2t_vit_7 if make_reference else t2t_fast.t2t_vit_7)(img_size=SIZE).eval()
    scripted = torch.jit.script(model)
    bad = [torch.randn(2, 3, SIZE - 16, SIZE), torch.randn(2, 4, SIZE, SIZE), torch.randn(3, SIZE, SIZE),
           torch.randn(0, 3, SIZE, SIZE), torch.randint(0, 255, (2, 3, SIZE, SIZE), dtype=torch.uint8)]
    for images in bad:
        with pytest.raises((TypeError, ValueError)) as eager:
            model(images)
        with pytest.raises(torch.jit.Error) as script:
            scripted(images)
        message = str(eager.value).replace(", got dtype torch.uint8", "")  # TorchScript prints a dtype's number
        assert f"builtins.{eager.type.__name__}: {message}" in str(script.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchscript_of_an_optimized_model(dtype, tmp_path):
    """torch.jit.script of an optimize_for_inference model: the same fp32 images in, logits in their dtype out,
    equal to the optimized model's within the dtype's rounding, through a save and load."""
    optimized = t2t_fast.optimize_for_inference(_model("t2t_vit_7"), dtype=dtype)
    torch.jit.save(torch.jit.script(optimized), tmp_path / "model.pt")
    scripted = torch.jit.load(tmp_path / "model.pt")
    x = torch.randn(2, 3, SIZE, SIZE)
    got = scripted(x)
    assert got.dtype == torch.float32 and got.grad_fn is None
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got, optimized(x), rtol=tolerance, atol=tolerance)
    with pytest.raises(torch.jit.Error, match="built for 64x64 images but got 48x64"):
        scripted(torch.randn(2, 3, 48, SIZE))
