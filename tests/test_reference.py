"""The reference implementation behaves as the official model: unfold order, performer, transformer T2T
layers, sinusoid table, dropout and drop-path."""
import math

import torch
import torch.nn.functional as F

import t2t_fast.reference as ref
from t2t_fast.reference.model import sinusoid_table


def _double(module):
    return module.double().eval()


def test_unfold_feature_order_is_channel_then_kernel_row_then_column():
    t2t = ref.T2TModule(in_chans=3, embed_dim=32, tokens_type="performer", token_dim=64)
    image = torch.randn(2, 3, 224, 224)
    patches = t2t.soft_split0(image).transpose(1, 2)  # (B, 3136, 147)
    assert patches.shape == (2, 3136, 147)
    padded = F.pad(image, (2, 2, 2, 2))
    for token, (i, j) in [(0, (0, 0)), (57, (1, 1)), (3135, (55, 55)), (1000, (17, 48))]:
        assert token == i * 56 + j
        for c, ki, kj in [(0, 0, 0), (1, 3, 5), (2, 6, 6), (2, 0, 6)]:
            feature = c * 49 + ki * 7 + kj
            assert patches[1, token, feature] == padded[1, c, 4 * i + ki, 4 * j + kj]


def test_performer_w_is_orthogonal_scaled_and_frozen():
    model = ref.create_model("t2t_vit_7")
    for layer in (model.tokens_to_token.attention1, model.tokens_to_token.attention2):
        w = layer.w.detach().double()
        assert w.shape == (32, 64) and not layer.w.requires_grad
        torch.testing.assert_close(w @ w.T, 32 * torch.eye(32, dtype=torch.float64), atol=1e-4, rtol=0)
        torch.testing.assert_close(w.norm(dim=1), torch.full((32,), math.sqrt(32), dtype=torch.float64), rtol=1e-6, atol=0)


def _performer_formula(layer, x):
    """Independent float64 statement of the official performer: kqv split k, q, v; phi; v-skip; MLP."""
    h = F.layer_norm(x, x.shape[-1:], layer.norm1.weight, layer.norm1.bias, 1e-5)
    kqv = h @ layer.kqv.weight.T + layer.kqv.bias
    k, q, v = kqv[..., :64], kqv[..., 64:128], kqv[..., 128:]
    m = layer.w.shape[0]

    def phi(u):
        return torch.exp(u @ layer.w.T - (u * u).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    kp, qp = phi(k), phi(q)
    y = (qp @ (kp.transpose(1, 2) @ v)) / (qp @ kp.sum(1).unsqueeze(-1) + 1e-8)
    y = v + y @ layer.proj.weight.T + layer.proj.bias
    return y + layer.mlp(layer.norm2(y))


def test_performer_matches_formula_with_k_q_v_split_order():
    layer = _double(ref.TokenPerformer(dim=147, in_dim=64))
    for linear in (layer.kqv, layer.proj):
        torch.nn.init.normal_(linear.bias, std=0.1)
    x = torch.randn(2, 50, 147, dtype=torch.float64)
    expected = _performer_formula(layer, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    # swapping the k and q rows of kqv changes the result: the order matters and is k, q, v
    with torch.no_grad():
        layer.kqv.weight[:128] = torch.cat([layer.kqv.weight[64:128], layer.kqv.weight[:64]])
    assert not torch.allclose(layer(x), expected)


def test_token_transformer_uses_input_width_scale_and_v_skip():
    model = ref.create_model("t2t_vit_t_14")
    assert model.tokens_to_token.attention1.attn.scale == 147 ** -0.5
    assert model.tokens_to_token.attention2.attn.scale == 576 ** -0.5
    layer = _double(ref.TokenTransformer(dim=576, in_dim=64))
    torch.nn.init.normal_(layer.attn.proj.bias, std=0.1)
    x = torch.randn(2, 30, 576, dtype=torch.float64)
    h = F.layer_norm(x, (576,), layer.norm1.weight, layer.norm1.bias, 1e-5)
    q, k, v = (h @ layer.attn.qkv.weight.T).split(64, dim=-1)  # rows q, k, v
    attn = torch.softmax((q * 576 ** -0.5) @ k.transpose(1, 2), dim=-1)
    y = v + (attn @ v) @ layer.attn.proj.weight.T + layer.attn.proj.bias
    torch.testing.assert_close(layer(x), y + layer.mlp(layer.norm2(y)), rtol=1e-10, atol=1e-10)


def test_sinusoid_rows():
    table = ref.create_model("t2t_vit_7").pos_embed
    assert table.shape == (1, 197, 256) and not table.requires_grad
    row0 = torch.tensor([0.0, 1.0] * 128)
    torch.testing.assert_close(table[0, 0], row0)
    for pos, j in [(1, 0), (1, 1), (5, 10), (196, 255), (100, 37)]:
        angle = pos / 10000 ** (2 * (j // 2) / 256)
        expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
        assert abs(table[0, pos, j].item() - expected) < 1e-6
    torch.testing.assert_close(sinusoid_table(197, 256), table.detach())


def test_eval_mode_is_deterministic():
    model = ref.create_model("t2t_vit_7", drop_rate=0.1, drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_train_mode_dropout_is_active_in_the_performer_only():
    model = ref.create_model("t2t_vit_7").train()  # drop_rate = drop_path_rate = 0: only the T2T dropouts
    layer = model.tokens_to_token.attention1
    assert [m.p for m in layer.modules() if isinstance(m, torch.nn.Dropout)] == [0.1, 0.1]
    x = torch.randn(1, 3136, 147)
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    transformer = ref.create_model("t2t_vit_t_14").train().tokens_to_token.attention1
    assert torch.equal(transformer(x), transformer(x))  # no dropout in the transformer T2T layers


def test_drop_path_rates_follow_linspace():
    model = ref.create_model("t2t_vit_7", drop_path_rate=0.3)
    rates = [block.drop_path.drop_prob for block in model.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 7))
