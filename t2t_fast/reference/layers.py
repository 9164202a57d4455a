"""The layers of the reference T2T-ViT: readable eager PyTorch, behaving exactly like the official model.

They are the oracle every fused path is checked against, so their forwards are written out in plain torch
ops and nothing here imports the fast model or the kernels. The fast model subclasses them for their
constructors (module tree, parameter names, init) and replaces only the forwards it fuses; the hooks for
that are the ``token_layers`` table of :class:`T2TModule`, the ``attn_layer`` / ``mlp_layer`` arguments of
:class:`Block` and :meth:`Attention.output`. Official quirks kept on purpose: the k/q/v split order and the
v-skip of the performer, its frozen random ``w`` stored in the state_dict, its hard-coded 0.1 dropouts, the
input-width attention scale of the transformer T2T layers.
"""
import math

import torch
import torch.fx
import torch.nn as nn

from t2t_fast.geometry import SOFT_SPLITS, image_token_grids

torch.fx.wrap("image_token_grids")  # a leaf for torch.fx: the grids are computed from the input's shape


def _at_least_fp32(t):
    """Upstream's ``.float()``: widens fp16/bf16 to fp32; float64 stays float64 so the reference can
    also serve as the float64 oracle (upstream would crash there)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def performer_projection(m, emb):
    """The frozen random matrix w (m, emb) of a performer layer: orthogonal rows scaled to norm sqrt(m)
    (draws from the global CPU RNG whatever the default device, then moves there)."""
    w = torch.randn(m, emb, device="cpu")
    return (torch.nn.init.orthogonal_(w) * math.sqrt(m)).to(torch.get_default_device())


class DropPath(nn.Module):
    """Stochastic depth per sample (active in train mode only)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep)
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
        self.m = int(in_dim * kernel_ratio)
        self.eps = eps
        self.register_buffer("w", performer_projection(self.m, self.emb))  # frozen: a buffer, not a parameter
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
    """Tokens-to-Token: soft split -> T2T layer -> re-structurize -> soft split -> ... -> project.

    ``token_layers`` maps ``tokens_type`` to the class of the two T2T layers."""

    token_layers = {"performer": TokenPerformer, "transformer": TokenTransformer}

    def __init__(self, in_chans, embed_dim, tokens_type, token_dim):
        super().__init__()
        self.splits = SOFT_SPLITS  # an attribute, so that TorchScript can read it
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = SOFT_SPLITS
        self.soft_split0 = nn.Unfold(kernel_size=k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(kernel_size=k1, stride=s1, padding=p1)
        self.soft_split2 = nn.Unfold(kernel_size=k2, stride=s2, padding=p2)
        layer = self.token_layers[tokens_type]
        self.attention1 = layer(in_chans * k0 * k0, token_dim)
        self.attention2 = layer(token_dim * k1 * k1, token_dim)
        self.project = nn.Linear(token_dim * k2 * k2, embed_dim)

    def forward(self, x):
        grids = image_token_grids(x, self.splits)
        x = self.attention1(self.soft_split0(x).transpose(1, 2))
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grids[0][0], grids[0][1])   # re-structurize
        x = self.attention2(self.soft_split1(x).transpose(1, 2))
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grids[1][0], grids[1][1])
        return self.project(self.soft_split2(x).transpose(1, 2))


class Attention(nn.Module):
    """Multi-head softmax self-attention of the backbone (explicit matmul-softmax-matmul)."""

    def __init__(self, dim, num_heads, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def output(self, mixed):
        """The output projection of the mixed heads (B, T, D), before ``proj_drop``."""
        return self.proj(mixed)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        mixed = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.output(mixed))


class Block(nn.Module):
    """Pre-norm ViT block around an ``attn_layer`` and an ``mlp_layer`` (the variants pass their own)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, attn_layer=Attention, mlp_layer=Mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn_layer(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), drop=drop)

    def update(self, x):
        """The attention and MLP residual steps (the dense block appends a projection of their result)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x):
        return self.update(x)
