"""Public model API: factories, timm-style methods, image sizes and input validation (both models)."""
import numpy as np
import pytest
import torch

import t2t_fast
import t2t_fast.reference as ref
from t2t_fast.reference.model import add_position_embedding, sinusoid_table

FACTORIES = {"reference": ref.create_model, "fast": t2t_fast.create_model}


@pytest.fixture(params=list(FACTORIES))
def factory(request):
    return FACTORIES[request.param]


def test_public_names():
    assert t2t_fast.T2TViT is t2t_fast.model.T2TViT
    for name in t2t_fast.list_models():
        assert callable(getattr(t2t_fast, name)) and callable(getattr(ref, name))
    assert t2t_fast.list_models("t2t_vit_t_*") == ["t2t_vit_t_14", "t2t_vit_t_19", "t2t_vit_t_24"]
    model = t2t_fast.t2t_vit_7(num_classes=3)
    assert isinstance(model, t2t_fast.T2TViT) and model.num_classes == 3 and model.variant == "t2t_vit_7"


def test_timm_style_methods(factory):
    model = factory("t2t_vit_7").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 197, 256)
        pre = model.forward_head(tokens, pre_logits=True)
        assert torch.equal(pre, tokens[:, 0])
        assert torch.equal(model.forward_head(tokens), model.head(pre))
    assert model.get_classifier() is model.head
    assert model.no_weight_decay() == {"cls_token"}
    assert model.num_features == 256 and model.num_prefix_tokens == 1
    cfg = model.default_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert model.pretrained_cfg["url"].endswith("71.7_T2T_ViT_7.pth.tar")
    model.reset_classifier(0)
    with torch.no_grad():
        assert torch.equal(model(x), pre)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)


def test_grad_checkpointing_gives_the_same_gradients(factory):
    torch.manual_seed(0)
    model = factory("t2t_vit_7").train()
    for m in model.modules():  # remove randomness so the two passes are comparable
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randn(2, 3, 224, 224)
    model(x).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        if n in plain:
            torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-7)


def test_non_square_image(factory):
    model = factory("t2t_vit_7", img_size=(224, 160)).eval()
    assert model.grid_size == (14, 10) and model.pos_embed.shape == (1, 141, 256)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 160)).shape == (1, 1000)
    with pytest.raises(ValueError, match=r"224x160.*160x224"):
        model(torch.randn(1, 3, 160, 224))


def test_mismatched_size_error_and_dynamic_size(factory):
    model = factory("t2t_vit_7").eval()
    with pytest.raises(ValueError, match=r"built for 224x224 images but got 240x240"):
        model(torch.randn(1, 3, 240, 240))
    dynamic = factory("t2t_vit_7", dynamic_img_size=True).eval()
    dynamic.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 240, 200)
    with torch.no_grad():
        out = dynamic(x)
        at_size = factory("t2t_vit_7", img_size=(240, 200)).eval()
        state = {k: v for k, v in model.state_dict().items() if k != "pos_embed"}
        at_size.load_state_dict({**state, "pos_embed": at_size.pos_embed}, strict=True)
        torch.testing.assert_close(out, at_size(x), rtol=1e-5, atol=1e-5)
        same_size = torch.randn(1, 3, 224, 224)
        torch.testing.assert_close(dynamic(same_size), model(same_size), rtol=0, atol=0)


def test_position_table_of_another_size_is_the_sinusoid_of_that_length(factory):
    model = factory("t2t_vit_7", dynamic_img_size=True).eval()
    tokens = torch.randn(2, 151, model.embed_dim)  # 150 tokens (15x10 grid) + cls
    expected = tokens + sinusoid_table(151, model.embed_dim)
    torch.testing.assert_close(add_position_embedding(tokens, model.pos_embed), expected, rtol=0, atol=0)
    model.double()
    assert add_position_embedding(tokens.double(), model.pos_embed).dtype == torch.float64


def test_frozen_tables_are_buffers(factory):
    model = factory("t2t_vit_7")
    buffers = dict(model.named_buffers())
    assert set(buffers) == {"pos_embed", "tokens_to_token.attention1.w", "tokens_to_token.attention2.w"}
    assert not any(b.requires_grad for b in buffers.values())
    assert set(buffers) <= set(model.state_dict())
    model.train()
    model(torch.randn(1, 3, 224, 224)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_built_on_the_default_device(factory, device):
    with torch.device(device):
        model = factory("t2t_vit_7", img_size=64)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {device}
    if device == "meta":
        model.to(torch.bfloat16)
        assert model(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16, device="meta")).shape == (2, 1000)
        model.reset_classifier(4)
        assert model.head.weight.device.type == "meta" and model.head.weight.dtype == torch.bfloat16


def test_reset_classifier_keeps_dtype_and_mode(factory):
    model = factory("t2t_vit_7", img_size=64).to(torch.float64).eval()
    model.reset_classifier(3)
    assert model.head.weight.dtype == torch.float64 and not model.head.training
    assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).shape == (1, 3)


def test_bad_input(factory):
    model = factory("t2t_vit_7").eval()
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 224, 224))
    with pytest.raises(ValueError, match="3 input channels, got 1"):
        model(torch.randn(2, 1, 224, 224))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.randint(0, 255, (2, 3, 224, 224), dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.randn(0, 3, 224, 224))
    with pytest.raises(TypeError, match="image tensor"):
        model([1, 2, 3])
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(TypeError, match=rf"image is {dtype} but the model's weights are torch.float32: cast"):
            model(torch.randn(1, 3, 224, 224, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast mixes dtypes on purpose
        assert model(torch.randn(1, 3, 224, 224, dtype=torch.bfloat16)).shape == (1, 1000)
    with pytest.raises(ValueError, match="too small"):
        factory("t2t_vit_7", img_size=2)


def test_bad_construction_arguments(factory):
    with pytest.raises(ValueError, match=r"unknown model 't2t_vit_13'.*Did you mean"):
        factory("t2t_vit_13")
    with pytest.raises(TypeError, match="t2t_vit_7: unknown keyword argument 'colour'"):
        factory("t2t_vit_7", colour=1)
    with pytest.raises(ValueError, match="tokens_type"):
        factory("t2t_vit_7", tokens_type="convolution")
    with pytest.raises(ValueError, match="divisible"):
        factory("t2t_vit_7", num_heads=5)
    with pytest.raises(TypeError, match="img_size"):
        factory("t2t_vit_7", img_size=224.0)
    for kwargs, error, message in [
            (dict(in_chans=0), ValueError, "in_chans must be an integer >= 1, got 0"),
            (dict(in_chans=3.0), TypeError, "in_chans must be an integer >= 1, got 3.0"),
            (dict(num_classes=True), TypeError, "num_classes must be an integer >= 0, got True"),
            (dict(num_classes=10.0), TypeError, "num_classes must be an integer >= 0, got 10.0"),
            (dict(depth=-1), ValueError, "depth must be an integer >= 0, got -1"),
            (dict(token_dim=0), ValueError, "token_dim must be an integer >= 1, got 0"),
            (dict(mlp_ratio=0), ValueError, "mlp_ratio must be a number > 0, got 0")]:
        with pytest.raises(error, match=message):
            factory("t2t_vit_7", img_size=32, **kwargs)
    # NumPy integers are integers
    model = factory("t2t_vit_7", img_size=np.int64(32), num_classes=np.int64(5), depth=np.int64(1))
    assert model.img_size == (32, 32) and type(model.num_classes) is int and model.head.out_features == 5
    # timm's global_pool: the cls token, the only pooling there is
    assert factory("t2t_vit_7", img_size=32, global_pool="token").global_pool == "token"
    with pytest.raises(ValueError, match="pools the cls token only; global_pool='avg' is not supported"):
        factory("t2t_vit_7", img_size=32, global_pool="avg")
