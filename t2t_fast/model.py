"""The fast T2T-ViT: the official module tree and state_dict, running fused kernels.

Per T2T stage the unfolded tokens never exist for long: the soft split + ``norm1`` LayerNorm is one
fused op reading the previous stage's tokens in place, FAVOR+ reads k/q/v as strided views of the
``kqv`` output, and in training the split+LN+projection is recomputed in backward instead of keeping
the (B, L, 147/576) tensors alive. The backbone uses ``F.scaled_dot_product_attention``.
Backends: see :mod:`t2t_fast.backend` (``backend=`` here sets the model's default).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from t2t_fast import _config, ops
from t2t_fast._api import T2TViTAPI
from t2t_fast.backend import check_backend_name


def drop_path(x, rate, training):
    """Stochastic depth per sample."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep) / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, out_features=None, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class _SoftSplitLayer(nn.Module):
    """A T2T layer that starts from the previous stage's output (an NCHW image or (B, H*W, C) tokens)
    and applies soft split + ``norm1`` + the input projection as one recomputable unit."""

    def __init__(self, split):
        super().__init__()
        self.split = split  # (kernel, stride, padding)
        self.backend = None

    def _split_norm_project(self, x, grid_size):
        kernel, stride, padding = self.split
        tokens = ops.soft_split_layernorm(x, kernel, stride, padding, self.norm1.weight, self.norm1.bias,
                                          self.norm1.eps, grid_size=grid_size, backend=self.backend)
        return self.input_projection()(tokens)

    def split_norm_project(self, x, grid_size):
        if self.training and torch.is_grad_enabled():
            # Keep only the stage input for backward; the unfolded (B, L, C*k*k) rows are recomputed.
            return torch.utils.checkpoint.checkpoint(self._split_norm_project, x, grid_size, use_reentrant=False)
        return self._split_norm_project(x, grid_size)


class TokenPerformer(_SoftSplitLayer):
    """Performer T2T layer: fused soft split + LN -> kqv -> FAVOR+ on strided k/q/v -> proj + v-skip -> MLP."""

    def __init__(self, dim, in_dim, split, kernel_ratio=0.5, dropout=0.1, eps=1e-8):
        super().__init__(split)
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

    def input_projection(self):
        return self.kqv

    def forward(self, x, grid_size=None):
        k, q, v = self.split_norm_project(x, grid_size).split(self.emb, dim=-1)
        y = ops.favor_attention(k, q, v, self.w, eps=self.eps, backend=self.backend)
        y = v + self.dp(self.proj(y))
        return y + self.mlp(self.norm2(y))


class TokenTransformerAttention(nn.Module):
    def __init__(self, dim, in_dim):
        super().__init__()
        self.in_dim = in_dim
        self.scale = dim ** -0.5  # official quirk: the scale comes from the input width (147 / 576)
        self.qkv = nn.Linear(dim, 3 * in_dim, bias=False)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(0.0)


class TokenTransformer(_SoftSplitLayer):
    """Transformer T2T layer: fused soft split + LN -> qkv -> SDPA (one head) -> proj + v-skip -> MLP."""

    def __init__(self, dim, in_dim, split):
        super().__init__(split)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenTransformerAttention(dim, in_dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_dim, in_dim, in_dim)

    def input_projection(self):
        return self.attn.qkv

    def forward(self, x, grid_size=None):
        q, k, v = self.split_norm_project(x, grid_size).split(self.attn.in_dim, dim=-1)
        y = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                           dropout_p=self.attn.attn_drop.p if self.training else 0.0,
                                           scale=self.attn.scale).squeeze(1)
        y = v + self.attn.proj_drop(self.attn.proj(y))
        return y + self.mlp(self.norm2(y))


class T2TModule(nn.Module):
    """Tokens-to-Token: fused (soft split + LN) T2T layers on token layout, then re-structurize + unfold
    + ``project``."""

    def __init__(self, in_chans, embed_dim, tokens_type, token_dim):
        super().__init__()
        split0, split1, self.final_split = _config.SOFT_SPLITS
        layer = TokenPerformer if tokens_type == "performer" else TokenTransformer
        self.attention1 = layer(in_chans * split0[0] ** 2, token_dim, split0)
        self.attention2 = layer(token_dim * split1[0] ** 2, token_dim, split1)
        self.project = nn.Linear(token_dim * self.final_split[0] ** 2, embed_dim)
        self.backend = None

    def forward(self, x):
        grids = _config.token_grids(tuple(x.shape[-2:]))
        x = self.attention1(x)                        # image -> (B, H1*W1, token_dim)
        x = self.attention2(x, grid_size=grids[0])    # tokens -> (B, H2*W2, token_dim)
        kernel, stride, padding = self.final_split
        x = ops.restructurize_unfold(x, grids[1], kernel, stride, padding, backend=self.backend)
        return self.project(x)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def low_precision_on_cpu(x):
    """True for fp16/bf16 maths on CPU: x in half precision, or CPU autocast to it."""
    if x.device.type != "cpu":
        return False
    return x.dtype in _LOW_PRECISION or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") in _LOW_PRECISION)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient
    kernels), except in fp16/bf16 on CPU: there torch's flash kernel takes about twice the time of a plain
    matmul + softmax at the backbone's 197 tokens (bf16, 2 threads, batch 8: forward 6.5 vs 3.2 ms,
    forward + backward 27 vs 10 ms per block), so the attention matrix is formed as in the reference."""

    def __init__(self, dim, num_heads, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        batch, tokens, dim = x.shape
        # unbind along the (B, N, 3, H, Dh) view: in backward the stack of dq, dk, dv is then already the qkv
        # layout (permuting first would cost one more copy of the qkv gradient per block)
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(batch, tokens, 3, self.num_heads, -1).unbind(2))
        if low_precision_on_cpu(q):
            x = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                               scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, tokens, dim)))


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
    """T2T-ViT with fused kernels. Arguments as the official ``T2T_ViT`` plus:

    * ``img_size`` may be an int or (H, W); any size for which the three soft splits are defined.
    * ``dynamic_img_size=True`` accepts other input sizes too (the sinusoid table is built for the grid).
    * ``backend``: ``'auto'`` (default), ``'triton'``, ``'cuda'``, ``'cpp'`` or ``'torch'`` (see
      :mod:`t2t_fast.backend`); also settable later with :meth:`set_backend`.
    """

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, tokens_type="performer", token_dim=64, qkv_bias=False, qk_scale=None,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, dynamic_img_size=False, backend=None):
        super().__init__()
        _config.check_model_args(embed_dim, depth, num_heads, tokens_type, mlp_ratio, token_dim)
        self.img_size = _config.to_2tuple(img_size, "img_size")
        self.grid_size = _config.token_grids(self.img_size)[-1]
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.dynamic_img_size = dynamic_img_size
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
        self.set_backend(backend)

    def make_blocks(self, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                    drop_path_rate):
        """The backbone: (nn.ModuleList of blocks, width of their output). Variants override this."""
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, rate)
            for rate in rates)
        return blocks, embed_dim

    def set_backend(self, backend):
        """Select the kernels this model runs (None: ``T2T_FAST_BACKEND`` or auto)."""
        self.backend = check_backend_name(backend)
        for module in self.tokens_to_token.modules():
            if hasattr(module, "backend"):
                module.backend = self.backend
        return self

    def forward_features(self, x):
        """All tokens (B, 1 + N, num_features) after the final norm."""
        _config.check_image(x, self.in_chans, self.img_size, self.dynamic_img_size)
        x = self.tokens_to_token(x)
        # cat/add promote: under autocast the residual stream stays in the parameters' fp32, as upstream
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.position_table(x.shape[1]))
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        return self.norm(x)
