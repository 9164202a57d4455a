"""Readable eager PyTorch T2T-ViT, behaving exactly like the official implementation.

This is the oracle every fused path is checked against, so it shares no forward code with the fast
modules. Official quirks kept on purpose (see the spec): k/q/v split order and the v-skip of the
performer, its frozen random ``w`` stored in the state_dict, its hard-coded 0.1 dropouts, the
input-width attention scale of the transformer T2T layers, the frozen sinusoid ``pos_embed``.
"""
import math

import torch
import torch.nn as nn
import torch.utils.checkpoint

from t2t_fast import _config
from t2t_fast._api import T2TViTAPI


def _at_least_fp32(t):
    """Upstream's ``.float()``: widens fp16/bf16 to fp32; float64 stays float64 so the reference can
    also serve as the float64 oracle (upstream would crash there)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class DropPath(nn.Module):
    """Stochastic depth per sample (active in train mode only)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, out_features=None, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TokenPerformer(nn.Module):
    """T2T layer with FAVOR+ linear attention (one head, m = token_dim/2 random features)."""

    def __init__(self, dim, in_dim, kernel_ratio=0.5, dropout=0.1, eps=1e-8):
        super().__init__()
        self.emb = in_dim
        self.m = _config.performer_features(in_dim, kernel_ratio)
        self.eps = eps
        self.w = nn.Parameter(_config.performer_projection(self.m, self.emb), requires_grad=False)
        self.kqv = nn.Linear(dim, 3 * self.emb)
        self.dp = nn.Dropout(dropout)
        self.proj = nn.Linear(self.emb, self.emb)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(self.emb)
        self.mlp = nn.Sequential(nn.Linear(self.emb, self.emb), nn.GELU(),
                                 nn.Linear(self.emb, self.emb), nn.Dropout(dropout))

    def positive_features(self, u):
        # phi(u) = exp(u w^T - |u|^2 / 2) / sqrt(m); the half squared norm stays in u's dtype, the
        # projection runs on u cast to fp32, as upstream does.
        half_sq_norm = (u * u).sum(dim=-1, keepdim=True).repeat(1, 1, self.m) / 2
        u_wide = _at_least_fp32(u)
        projected = torch.einsum("bti,mi->btm", u_wide, self.w.to(u_wide.dtype))
        return torch.exp(projected - half_sq_norm) / math.sqrt(self.m)

    def attention(self, x):
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        kp, qp = self.positive_features(k), self.positive_features(q)       # (B, T, m)
        normaliser = torch.einsum("btm,bm->bt", qp, kp.sum(dim=1)).unsqueeze(-1)  # (B, T, 1)
        context = torch.einsum("bte,btm->bem", _at_least_fp32(v), kp)              # (B, e, m)
        y = torch.einsum("btm,bem->bte", qp, context) / (normaliser.repeat(1, 1, self.emb) + self.eps)
        return v + self.dp(self.proj(y.to(v.dtype)))

    def forward(self, x):
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenTransformerAttention(nn.Module):
    """One-head softmax attention of the transformer T2T layers; its scale comes from the *input*
    width (147^-0.5 or 576^-0.5, an official quirk the checkpoints depend on)."""

    def __init__(self, dim, in_dim):
        super().__init__()
        self.in_dim = in_dim
        self.scale = dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * in_dim, bias=False)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.in_dim).unbind(dim=2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = self.proj_drop(self.proj(self.attn_drop(attn) @ v))
        return v + y  # v-skip: the widths differ, so the residual comes from v


class TokenTransformer(nn.Module):
    """T2T layer with full softmax attention (the ``t2t_vit_t_*`` variants)."""

    def __init__(self, dim, in_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenTransformerAttention(dim, in_dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_dim, in_dim, in_dim)

    def forward(self, x):
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TModule(nn.Module):
    """Tokens-to-Token: soft split -> T2T layer -> re-structurize -> soft split -> ... -> project."""

    def __init__(self, in_chans, embed_dim, tokens_type, token_dim):
        super().__init__()
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = _config.SOFT_SPLITS
        self.soft_split0 = nn.Unfold(kernel_size=k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(kernel_size=k1, stride=s1, padding=p1)
        self.soft_split2 = nn.Unfold(kernel_size=k2, stride=s2, padding=p2)
        layer = TokenPerformer if tokens_type == "performer" else TokenTransformer
        self.attention1 = layer(in_chans * k0 * k0, token_dim)
        self.attention2 = layer(token_dim * k1 * k1, token_dim)
        self.project = nn.Linear(token_dim * k2 * k2, embed_dim)

    def forward(self, x):
        grids = _config.token_grids(tuple(x.shape[-2:]))
        x = self.attention1(self.soft_split0(x).transpose(1, 2))
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grids[0])   # re-structurize
        x = self.attention2(self.soft_split1(x).transpose(1, 2))
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grids[1])
        return self.project(self.soft_split2(x).transpose(1, 2))


class Attention(nn.Module):
    """Multi-head softmax self-attention of the backbone (explicit matmul-softmax-matmul)."""

    def __init__(self, dim, num_heads, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm ViT block."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class T2TViT(T2TViTAPI, nn.Module):
    """T2T-ViT (reference). Arguments as the official ``T2T_ViT``; ``img_size`` may be (H, W).

    ``dynamic_img_size=True`` accepts any input size for which the soft splits are defined and builds the
    sinusoid table for the actual token grid."""

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, tokens_type="performer", token_dim=64, qkv_bias=False, qk_scale=None,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, dynamic_img_size=False):
        super().__init__()
        _config.check_model_args(embed_dim, depth, num_heads, tokens_type, mlp_ratio, token_dim)
        self.img_size = _config.to_2tuple(img_size, "img_size")
        self.grid_size = _config.token_grids(self.img_size)[-1]
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.dynamic_img_size = dynamic_img_size
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.tokens_to_token = T2TModule(in_chans, embed_dim, tokens_type, token_dim)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(_config.sinusoid_table(num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks, self.num_features = self.make_blocks(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.init_weights()

    def make_blocks(self, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                    drop_path_rate):
        """The backbone: (nn.ModuleList of blocks, width of their output). Variants override this."""
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, rate)
            for rate in rates)
        return blocks, embed_dim

    def forward_features(self, x):
        """All tokens (B, 1 + N, num_features) after the final norm."""
        _config.check_image(x, self.in_chans, self.img_size, self.dynamic_img_size)
        x = self.tokens_to_token(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.position_table(x.shape[1]))
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)
