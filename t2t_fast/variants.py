"""Fast experimental T2T-ViT families: squeeze-excite, dense and ghost backbones.

Same module tree and state_dict as :mod:`t2t_fast.reference.variants` (the oracle); the forward code is
independent. Attention runs through ``F.scaled_dot_product_attention``. Ghost layers fold their
per-channel "cheap operations" into the projections: q/k/v come from one GEMM with the weight
``[Wq; s_q*Wq; Wk; s_k*Wk; Wv; s_v*Wv]`` (rebuilt each call, so gradients reach both parameters), and the
ghost MLP scales its hidden map with one broadcast multiply instead of two depthwise convolutions.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from t2t_fast import _config
from t2t_fast.model import Attention, Block, DropPath, Mlp, T2TViT


def _attend(q, k, v, attn_drop, scale, training):
    """SDPA on (B, H, T, d) heads -> (B, T, H*d)."""
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop.p if training else 0.0, scale=scale)
    return y.transpose(1, 2).flatten(2)


class _PreNormBlock(nn.Module):
    """The fast ``Block``'s structure and names around a given attention and MLP module."""

    def __init__(self, dim, attn, mlp, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp

    forward = Block.forward


# ----------------------------------------------------------------------------------------------- SE
class SqueezeExcite(nn.Module):
    """``x * sigmoid(W2 relu(W1 mean_t(x)))`` over all tokens (no biases, bottleneck dim // 16)."""

    def __init__(self, dim, reduction=_config.SE_REDUCTION):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
                                nn.Linear(dim // reduction, dim, bias=False), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(x.mean(dim=1)).unsqueeze(1)


class SEAttention(Attention):
    """SDPA attention; the ``proj`` output is gated by ``se_layer`` before ``proj_drop``."""

    def __init__(self, dim, num_heads, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.se_layer = SqueezeExcite(dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        y = self.proj(_attend(q, k, v, self.attn_drop, self.scale, self.training))
        return self.proj_drop(self.se_layer(y))


class T2TViTSE(T2TViT):
    """Fast T2T-ViT-SE (``t2t_vit_14_se``): pre-norm blocks whose attention output is rescaled per channel
    by a squeeze-excite gate (token mean -> D/16 -> ReLU -> D -> sigmoid) after ``proj``. See
    :class:`t2t_fast.reference.T2TViTSE`."""

    def make_blocks(self, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                    drop_path_rate):
        blocks = nn.ModuleList(
            _PreNormBlock(embed_dim,
                          SEAttention(embed_dim, num_heads, qkv_bias, qk_scale, attn_drop_rate, drop_rate),
                          Mlp(embed_dim, int(embed_dim * mlp_ratio), drop=drop_rate), rate)
            for rate in torch.linspace(0, drop_path_rate, depth).tolist())
        return blocks, embed_dim


# -------------------------------------------------------------------------------------------- dense
class DenseBlock(Block):
    """Fast pre-norm block at width w plus ``dense_linear`` (w -> growth): (B, T, w) -> (B, T, w + growth)."""

    def __init__(self, dim, growth_rate, num_heads, mlp_ratio, qkv_bias=False, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=0.0):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path)
        self.dense_linear = nn.Linear(dim, growth_rate)

    def forward(self, x):
        return torch.cat([x, self.dense_linear(super().forward(x))], dim=-1)


class Transition(nn.Module):
    """``GELU(linear(x))`` halving the width between dense stages."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.act = nn.GELU()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.act(self.linear(x))


class T2TViTDense(T2TViT):
    """Fast T2T-ViT-Dense (``t2t_vit_dense``): ``depth`` is a tuple of per-stage block counts; each block
    appends ``growth_rate`` channels, transitions halve the width between stages; stage s drops paths at
    ``linspace(0, drop_path_rate, 12)[s]``. See :class:`t2t_fast.reference.T2TViTDense`."""

    def __init__(self, *args, growth_rate=64, **kwargs):
        self.growth_rate = growth_rate  # read by make_blocks during T2TViT.__init__
        super().__init__(*args, **kwargs)

    def make_blocks(self, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                    drop_path_rate):
        plan, width = _config.dense_layout(embed_dim, depth, self.growth_rate, num_heads)
        rates = _config.dense_drop_path_rates(drop_path_rate, len(depth))
        return nn.ModuleList(
            DenseBlock(w_in, w_out - w_in, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                       rates[stage]) if kind == "block" else Transition(w_in, w_out)
            for kind, stage, w_in, w_out in plan), width


# -------------------------------------------------------------------------------------------- ghost
def _depthwise_1x1(channels):
    return nn.Conv1d(channels, channels, kernel_size=1, groups=channels, bias=False)


class GhostAttention(nn.Module):
    """Ghost attention with q/k/v (each ``[p, s*p]`` of a half-width projection p) from one fused GEMM,
    then SDPA."""

    def __init__(self, dim, num_heads, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        half = dim // 2
        self.q = nn.Linear(dim, half, bias=qkv_bias)
        self.k = nn.Linear(dim, half, bias=qkv_bias)
        self.v = nn.Linear(dim, half, bias=qkv_bias)
        self.cheap_operation_q = _depthwise_1x1(half)
        self.cheap_operation_k = _depthwise_1x1(half)
        self.cheap_operation_v = _depthwise_1x1(half)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def fused_qkv_params(self):
        """(weight (3D, D), bias (3D) or None) of the q|k|v projection including the ghost halves."""
        pairs = ((self.q, self.cheap_operation_q), (self.k, self.cheap_operation_k), (self.v, self.cheap_operation_v))
        weights, biases = [], []
        for linear, cheap in pairs:
            scale = cheap.weight.view(-1)
            weights += [linear.weight, linear.weight * scale.unsqueeze(1)]
            if linear.bias is not None:
                biases += [linear.bias, linear.bias * scale]
        return torch.cat(weights), (torch.cat(biases) if biases else None)

    def forward(self, x):
        batch, tokens, dim = x.shape
        weight, bias = self.fused_qkv_params()
        q, k, v = F.linear(x, weight, bias).view(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(
            2, 0, 3, 1, 4)
        return self.proj_drop(self.proj(_attend(q, k, v, self.attn_drop, self.scale, self.training)))


class GhostMlp(nn.Module):
    """Ghost MLP: ``h = GELU(fc1 x)``; hidden ``[h, GELU(s2*h), GELU(s3*h)]`` (one broadcast multiply);
    ``fc2`` back to D. Hidden width must be exactly 3D."""

    def __init__(self, dim, hidden_features, drop=0.0):
        super().__init__()
        if hidden_features != 3 * dim:
            raise ValueError(f"the ghost MLP needs hidden_features == 3 * dim (mlp_ratio=3), got {hidden_features} "
                             f"for dim {dim}")
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, dim)
        self.drop = nn.Dropout(drop)
        self.cheap_operation2 = _depthwise_1x1(dim)
        self.cheap_operation3 = _depthwise_1x1(dim)

    def forward(self, x):
        h = self.act(self.fc1(x))                                                        # (B, T, D)
        scales = torch.stack([self.cheap_operation2.weight.view(-1), self.cheap_operation3.weight.view(-1)])
        ghosts = self.act(h.unsqueeze(-2) * scales.to(h.dtype))                          # (B, T, 2, D)
        hidden = self.drop(torch.cat([h, ghosts.flatten(-2)], dim=-1))                  # (B, T, 3D)
        return self.drop(self.fc2(hidden))


class T2TViTGhost(T2TViT):
    """Fast T2T-ViT-Ghost (``t2t_vit_16_ghost``): pre-norm blocks of :class:`GhostAttention` and
    :class:`GhostMlp`; needs ``mlp_ratio=3`` and an even ``embed_dim``. See
    :class:`t2t_fast.reference.T2TViTGhost`."""

    def make_blocks(self, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                    drop_path_rate):
        _config.check_ghost_args(embed_dim, mlp_ratio)
        blocks = nn.ModuleList(
            _PreNormBlock(embed_dim,
                          GhostAttention(embed_dim, num_heads, qkv_bias, qk_scale, attn_drop_rate, drop_rate),
                          GhostMlp(embed_dim, int(embed_dim * mlp_ratio), drop=drop_rate), rate)
            for rate in torch.linspace(0, drop_path_rate, depth).tolist())
        return blocks, embed_dim
