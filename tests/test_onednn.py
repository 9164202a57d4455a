"""oneDNN's linear primitive for CPU inference (t2t_fast.onednn): the numbers of F.linear (+ exact GELU) for
float32 and bfloat16 with frozen weights (packed once), the F.linear path wherever it does not apply (a trainable
weight, an input needing a gradient, dtypes that differ, torch.compile), a packed weight that follows in-place
changes, and the conversion optimize_for_inference makes (which GELUs move into their linears, state_dict
unchanged, copies and pickles)."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t2t_fast
from t2t_fast import onednn
from t2t_fast.testing import assert_relative_close, assert_within_reference_error, relative_error

pytestmark = pytest.mark.skipif(not onednn._AVAILABLE, reason="needs torch built with oneDNN")
DTYPES = [torch.float32] + ([torch.bfloat16] if t2t_fast.backend.cpu_has_fast_matmul(torch.bfloat16) else [])


def _case(shape, in_features, out_features, dtype, bias=True, frozen=True):
    x = torch.randn(*shape, in_features).to(dtype)
    weight = (torch.randn(out_features, in_features) / in_features ** 0.5).to(dtype).requires_grad_(not frozen)
    b = torch.randn(out_features).to(dtype) if bias else None
    return x, weight, b


def _check(actual, x, weight, bias, gelu):
    exact = F.linear(x.double(), weight.detach().double(), None if bias is None else bias.double())
    exact = F.gelu(exact) if gelu else exact
    if x.dtype == torch.float32:
        assert_relative_close(actual, exact, 1e-5)
    else:
        expected = F.linear(x, weight.detach(), bias)
        assert_within_reference_error(actual, F.gelu(expected) if gelu else expected, exact)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("case", [((8, 197), 384, 1152, True), ((50,), 147, 192, True), ((2, 3, 5), 64, 64, False),
                                  ((1,), 576, 384, True)], ids=["block", "t2t_kqv", "no_bias", "one_row"])
def test_matches_f_linear(case, gelu, dtype):
    shape, in_features, out_features, bias = case
    x, weight, b = _case(shape, in_features, out_features, dtype, bias)
    with torch.no_grad():
        assert onednn.takes(x, weight)
        out = onednn.linear(x, weight, b, gelu)
    assert out.shape == (*shape, out_features) and out.dtype == dtype
    _check(out, x, weight, b, gelu)


def test_f_linear_where_it_does_not_apply():
    """A trainable weight (even under no_grad), an input that needs a gradient, a dtype unlike the weight's, or
    torch.compile: F.linear (and autograd)."""
    x, weight, b = _case((4,), 32, 16, torch.float32, frozen=False)
    with torch.no_grad():
        assert not onednn.takes(x, weight)
    out = onednn.linear(x, weight, b, gelu=True)
    out.sum().backward()
    assert weight.grad is not None
    weight = weight.detach()
    leaf = x.clone().requires_grad_()
    assert not onednn.takes(leaf, weight)
    onednn.linear(leaf, weight, b).sum().backward()
    assert leaf.grad is not None
    assert not onednn.takes(x.double(), weight)
    assert onednn.takes(x, weight)
    compiled = torch.compile(lambda x: onednn.linear(x, weight.detach(), b, gelu=True), fullgraph=True)
    with torch.no_grad():
        assert_relative_close(compiled(x), F.gelu(F.linear(x, weight, b)), 1e-5)


def test_packed_weight_follows_changes():
    x, weight, b = _case((6,), 48, 32, torch.float32)
    with torch.no_grad():
        before = onednn.linear(x, weight, b)
        weight.mul_(2)
        after = onednn.linear(x, weight, b)
    assert_relative_close(after, F.linear(x, weight, b), 1e-5)
    assert relative_error(after - b, 2 * (before - b)) < 1e-5


def test_weights_made_in_inference_mode():
    """Inference tensors have no version counter: they are used as they are, never packed and cached."""
    with torch.inference_mode():
        x, weight, b = _case((6,), 48, 32, torch.float32)
        out = onednn.linear(x, weight, b)
        weight.mul_(2)
        assert_relative_close(onednn.linear(x, weight, b), F.linear(x, weight, b), 1e-5)
    assert_relative_close(out, F.linear(x, weight / 2, b), 1e-5)
    with torch.inference_mode():
        model = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=5)
        optimized = t2t_fast.optimize_for_inference(model, dtype=torch.float32)
        x = torch.randn(1, 3, 32, 32)
        assert_relative_close(optimized(x), model.eval()(x), 1e-5, what="logits")


def test_conversion_of_a_model():
    """Every nn.Linear becomes a OneDnnLinear; the exact GELU after an Mlp's fc1 or a Sequential's linear moves into
    it, a tanh GELU does not; the state_dict is unchanged and the outputs are those of the original."""
    torch.manual_seed(0)
    model = t2t_fast.create_model("t2t_vit_7", img_size=64, num_classes=10).eval()
    model.tokens_to_token.attention1.mlp[1] = nn.GELU(approximate="tanh")
    optimized = t2t_fast.optimize_for_inference(model, dtype=torch.float32)
    converted = optimized.model
    assert not any(type(m) is nn.Linear for m in converted.modules())
    assert all(type(block.mlp.act) is nn.Identity and block.mlp.fc1.gelu for block in converted.blocks)
    assert type(converted.tokens_to_token.attention2.mlp[1]) is nn.Identity
    assert type(converted.tokens_to_token.attention1.mlp[1]) is nn.GELU
    assert not converted.tokens_to_token.attention1.mlp[0].gelu
    assert list(converted.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), model.state_dict().values()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_relative_close(optimized(x), model(x), 1e-5, what="logits")


def test_copies_and_pickles_of_an_optimized_model():
    """The packed weights live beside the model, not in it: deepcopy and torch.save work, and give its logits."""
    torch.manual_seed(0)
    optimized = t2t_fast.optimize_for_inference(t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=5),
                                                dtype=torch.float32)
    x = torch.randn(2, 3, 32, 32)
    logits = optimized(x)
    buffer = io.BytesIO()
    torch.save(optimized, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copy.deepcopy(optimized), loaded):
        torch.testing.assert_close(other(x), logits, rtol=0, atol=0)
