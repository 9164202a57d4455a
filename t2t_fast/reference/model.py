"""The reference T2T-ViT: construction, the timm-style model API and the eager forward.

The fast model subclasses :class:`T2TViT`: it inherits the constructor (so the module tree, parameter names,
state_dict and init are the reference's by construction) and the API, and swaps in its fused layers through
the class attributes ``t2t_module`` and ``attn_layer``. The variants swap ``attn_layer`` / ``mlp_layer`` or
override :meth:`T2TViT.make_blocks`.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint

from t2t_fast import registry
from t2t_fast.geometry import image_size, token_grids
from t2t_fast.reference.layers import Attention, Block, Mlp, T2TModule


def sinusoid_table(num_positions, dim):
    """The fixed sinusoid position table (1, num_positions, dim): angle pos / 10000^(2*floor(j/2)/dim),
    sin on even j, cos on odd j, computed in float64 and returned in float32."""
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angles = pos / np.power(10000.0, 2 * (j // 2) / dim)[None, :]
    table = np.where(j % 2 == 0, np.sin(angles), np.cos(angles))
    return torch.from_numpy(table).to(torch.float32).unsqueeze(0)


def check_model_args(embed_dim, num_heads, tokens_type, mlp_ratio, token_dim):
    """Reject constructor arguments no T2T-ViT can be built with, saying why."""
    if tokens_type not in T2TModule.token_layers:
        raise ValueError(f"tokens_type must be 'performer' or 'transformer', got {tokens_type!r}"
                         + (" (the official 'convolution' option never worked upstream)"
                            if tokens_type == "convolution" else ""))
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    if token_dim < 1 or mlp_ratio <= 0:
        raise ValueError(f"token_dim must be >= 1 and mlp_ratio > 0, got {token_dim} and {mlp_ratio}")


def check_image(x, in_chans, img_size, dynamic_img_size):
    """Validate a model input: a float tensor (B, in_chans, H, W) with B > 0 and, unless
    ``dynamic_img_size``, (H, W) == img_size. Returns (H, W)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an image tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D image batch (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point image, got dtype {x.dtype} (convert and normalise it first)")
    if x.shape[0] == 0:
        raise ValueError("empty batch: the input has batch size 0")
    if x.shape[1] != in_chans:
        raise ValueError(f"the model takes {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    size = (x.shape[2], x.shape[3])
    if not dynamic_img_size and size != tuple(img_size):
        raise ValueError(f"the model was built for {img_size[0]}x{img_size[1]} images but got {size[0]}x{size[1]}; "
                         f"build it with img_size={size} or dynamic_img_size=True")
    token_grids(size)
    return size


def init_module_weights(module):
    """Official init: trunc-normal(0.02) Linear weights, zero biases, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class T2TViT(nn.Module):
    """T2T-ViT (reference). Arguments as the official ``T2T_ViT``; ``img_size`` may be (H, W).

    ``dynamic_img_size=True`` accepts any input size for which the soft splits are defined and builds the
    sinusoid table for the actual token grid."""

    t2t_module = T2TModule
    block_fn = Block
    attn_layer = Attention
    mlp_layer = Mlp
    num_prefix_tokens = 1
    global_pool = "token"

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, tokens_type="performer", token_dim=64, qkv_bias=False, qk_scale=None,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, dynamic_img_size=False):
        super().__init__()
        check_model_args(embed_dim, num_heads, tokens_type, mlp_ratio, token_dim)
        self.img_size = image_size(img_size)
        self.grid_size = token_grids(self.img_size)[-1]
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.tokens_to_token = self.t2t_module(in_chans, embed_dim, tokens_type, token_dim)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sinusoid_table(num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks, self.num_features = self.make_blocks(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def make_blocks(self, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                    drop_path_rate):
        """The backbone: (nn.ModuleList of blocks, width of their output). The dense variant overrides this."""
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        blocks = nn.ModuleList(
            self.block_fn(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, rate,
                          attn_layer=self.attn_layer, mlp_layer=self.mlp_layer)
            for rate in rates)
        return blocks, embed_dim

    # ------------------------------------------------------------------------------- timm-style model API
    @property
    def pretrained_cfg(self):
        return registry.pretrained_cfg(getattr(self, "variant", None), self.in_chans, self.img_size,
                                       self.num_classes, not self.dynamic_img_size)

    @property
    def default_cfg(self):
        return self.pretrained_cfg

    @property
    def head_hidden_size(self):
        return self.num_features

    def init_weights(self):
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_module_weights)

    def no_weight_decay(self):
        """Parameter names excluded from weight decay (the frozen pos_embed and w are not trained at all)."""
        return {"cls_token"}

    def group_matcher(self, coarse=False):
        """Parameter groups for layer-wise LR decay, as timm's ViT defines them."""
        return dict(stem=r"^cls_token|pos_embed|tokens_to_token",
                    blocks=r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        """Replace the head by a fresh ``Linear(num_features, num_classes)`` (``Identity`` for 0)."""
        if global_pool not in (None, "token"):
            raise ValueError(f"T2T-ViT pools the cls token only; global_pool={global_pool!r} is not supported")
        self.num_classes = num_classes
        device = self.cls_token.device
        self.head = nn.Linear(self.num_features, num_classes).to(device) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_module_weights(self.head)

    def set_grad_checkpointing(self, enable=True):
        """Checkpoint every backbone block in training (recompute activations in backward)."""
        self.grad_checkpointing = enable

    def position_table(self, num_tokens):
        """``pos_embed``, or for another token count (``dynamic_img_size``) the sinusoid table of that length."""
        if num_tokens == self.pos_embed.shape[1]:
            return self.pos_embed
        key = (num_tokens, self.pos_embed.device, self.pos_embed.dtype)
        # One table per token count, device and dtype, built once (eager; compiled graphs build it inline).
        cache = None if torch.compiler.is_compiling() else self.__dict__.setdefault("_position_tables", {})
        if cache is not None and key in cache:
            return cache[key]
        table = sinusoid_table(num_tokens, self.pos_embed.shape[-1])
        table = table.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        if cache is not None:
            cache[key] = table
        return table

    # ------------------------------------------------------------------------------------------ forward
    def forward_features(self, x):
        """All tokens (B, 1 + N, num_features) after the final norm."""
        check_image(x, self.in_chans, self.img_size, self.dynamic_img_size)
        x = self.tokens_to_token(x)
        # cat/add promote: under autocast the residual stream stays in the parameters' fp32, as upstream
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.position_table(x.shape[1]))
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        return self.norm(x)

    def forward_head(self, x, pre_logits=False):
        """Classifier on the cls token of ``forward_features``' output; ``pre_logits`` returns it unclassified."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))
