"""The reference T2T-ViT: construction, the timm-style model API and the eager forward.

The fast model subclasses :class:`T2TViT`: it inherits the constructor (so the module tree, state_dict and
init are the reference's by construction) and the API, and swaps in its fused layers through the class
attributes ``t2t_module`` and ``attn_layer``. The variants swap ``attn_layer`` / ``mlp_layer`` or override
:meth:`T2TViT.make_blocks`.

The forward is written so that the model also works under ``torch.fx`` symbolic tracing (shape-dependent
helpers are ``torch.fx.wrap``-ped leaves) and ``torch.jit.script`` (Python-only work is skipped when
``torch.jit.is_scripting()``).
"""
import numbers
from typing import List, Optional, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.utils.checkpoint

from t2t_fast import registry
from t2t_fast.backend import autocast_enabled, is_exporting
from t2t_fast.geometry import SOFT_SPLITS, image_size, is_int, token_grids
from t2t_fast.reference.layers import Attention, Block, Mlp, T2TModule


def sinusoid_table(num_positions: int, dim: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The fixed sinusoid position table (1, num_positions, dim): angle pos / 10000^(2*floor(j/2)/dim),
    sin on even j, cos on odd j, computed in float64 and returned in float32."""
    pos = torch.arange(num_positions, dtype=torch.float64, device=device).unsqueeze(1)
    j = torch.arange(dim, device=device)
    angles = pos / torch.pow(10000.0, (2 * torch.div(j, 2, rounding_mode="floor")).to(torch.float64) / dim)
    table = torch.where(j % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.to(torch.float32).unsqueeze(0)


def add_position_embedding(x: torch.Tensor, pos_embed: torch.Tensor, dynamic: bool = False) -> torch.Tensor:
    """``x + pos_embed``; for another token count (``dynamic`` models) the sinusoid table of that length, which an
    export of a ``dynamic`` model computes for every count, its own too (so the image size stays a symbol of the
    export): the same numbers unless ``pos_embed`` is no longer that table (``load_checkpoint(...,
    pos_embed="interpolate")``)."""
    if (dynamic and is_exporting()) or x.shape[1] != pos_embed.shape[1]:
        pos_embed = sinusoid_table(x.shape[1], pos_embed.shape[-1], pos_embed.device).to(pos_embed.dtype)
    return x + pos_embed


torch.fx.wrap("add_position_embedding")  # a leaf for torch.fx: the branch depends on the input's shape


def check_model_args(in_chans, num_classes, embed_dim, depth, num_heads, tokens_type, mlp_ratio, token_dim):
    """Reject constructor arguments no T2T-ViT can be built with, saying why."""
    counts = [("in_chans", in_chans, 1), ("num_classes", num_classes, 0), ("embed_dim", embed_dim, 1),
              ("num_heads", num_heads, 1), ("token_dim", token_dim, 1)]
    if not isinstance(depth, (tuple, list)):  # the dense family's depth is one count per stage (checked there)
        counts.append(("depth", depth, 0))
    for name, value, least in counts:
        if not is_int(value) or value < least:
            raise (ValueError if is_int(value) else TypeError)(
                f"{name} must be an integer >= {least}, got {value!r}")
    if tokens_type not in T2TModule.token_layers:
        raise ValueError(f"tokens_type must be 'performer' or 'transformer', got {tokens_type!r}"
                         + (" (the official 'convolution' option never worked upstream)"
                            if tokens_type == "convolution" else ""))
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    if not isinstance(mlp_ratio, numbers.Real) or isinstance(mlp_ratio, bool) or not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")


def check_image(x, in_chans, img_size, dynamic_img_size, weight_dtype):
    """Validate a model input: :func:`check_image_layout`, and the weights' dtype unless autocast is on.
    Returns (H, W)."""
    if isinstance(x, torch.fx.Proxy):
        return None  # symbolic tracing: no values or shapes to check
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an image tensor, got {type(x).__name__}")
    size = check_image_layout(x, in_chans, img_size, dynamic_img_size)
    if x.dtype != weight_dtype and not autocast_enabled(x.device.type):
        raise TypeError(f"the image is {x.dtype} but the model's weights are {weight_dtype}: cast the image "
                        f"(x.to({weight_dtype})), convert the model (model.to({x.dtype})) or run it under "
                        f"torch.autocast")
    return size


def check_image_layout(x: torch.Tensor, in_chans: int, img_size: Tuple[int, int],
                       dynamic_img_size: bool) -> Tuple[int, int]:
    """Validate an image batch's layout: a float tensor (B, in_chans, H, W) with B > 0 and, unless
    ``dynamic_img_size``, (H, W) == img_size, large enough for the soft splits. Returns (H, W). Compiles under
    ``torch.jit.script``, so a scripted model refuses what the model refuses."""
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D image batch (B, C, H, W), got shape {_shape_text(x.shape)}")
    if not x.is_floating_point():
        # TorchScript formats a dtype as its number
        got = "" if torch.jit.is_scripting() else f", got dtype {x.dtype}"
        raise TypeError(f"expected a floating-point image{got} (convert and normalise it first)")
    if x.shape[0] == 0:
        raise ValueError("empty batch: the input has batch size 0")
    if x.shape[1] != in_chans:
        raise ValueError(f"the model takes {in_chans} input channels, got {x.shape[1]} "
                         f"(shape {_shape_text(x.shape)})")
    size = (x.shape[2], x.shape[3])
    if not dynamic_img_size and size != (img_size[0], img_size[1]):
        raise ValueError(f"the model was built for {img_size[0]}x{img_size[1]} images but got {size[0]}x{size[1]}; "
                         f"build it with img_size={size} or dynamic_img_size=True")
    token_grids(size)
    return size


def _shape_text(shape: List[int]) -> str:
    return "(" + ", ".join([str(d) for d in shape]) + ")"


def init_module_weights(module):
    """Official init: trunc-normal(0.02) Linear weights, zero biases, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def drop_path_rates(max_rate, count):
    """``count`` stochastic-depth rates rising linearly from 0 to ``max_rate`` (float32 steps, as upstream's
    ``torch.linspace``; built on the CPU whatever the default device)."""
    return torch.linspace(0, max_rate, count, device="cpu").tolist()


def feature_take_indices(num_blocks, indices):
    """timm's rule for ``indices`` of :meth:`T2TViT.forward_intermediates`: None takes every block, an int n
    the last n, a sequence the listed ones (negative counting from the end). Returns (sorted list, max)."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices} asks for the last {indices} blocks; the model has {num_blocks}")
        taken = list(range(num_blocks - indices, num_blocks))
    else:
        taken = []
        for index in indices:
            position = num_blocks + index if index < 0 else index
            if not 0 <= position < num_blocks:
                raise ValueError(f"block index {index} is out of range for a model with {num_blocks} blocks")
            taken.append(position)
        if not taken:
            raise ValueError("indices is empty: name at least one block")
    return taken, max(taken)


class T2TViT(nn.Module):
    """T2T-ViT (reference). Arguments as the official ``T2T_ViT``; ``img_size`` may be (H, W).

    ``dynamic_img_size=True`` accepts any input size for which the soft splits are defined and uses the
    sinusoid table of the actual token grid.

    ``pos_embed`` (the fixed sinusoid table) and the performer layers' random ``w`` are persistent buffers:
    frozen as upstream, in the state_dict under the official names, and not parameters (every parameter is
    trained)."""

    t2t_module = T2TModule
    block_fn = Block
    attn_layer = Attention
    mlp_layer = Mlp
    num_prefix_tokens = 1
    global_pool = "token"
    __jit_unused_properties__ = ["default_cfg", "head_hidden_size"]
    __jit_ignored_attributes__ = ["pretrained_cfg"]

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, tokens_type="performer", token_dim=64, qkv_bias=False, qk_scale=None,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, dynamic_img_size=False, global_pool="token"):
        super().__init__()
        if global_pool != "token":  # timm's ViT argument: T2T-ViT classifies its cls token
            raise ValueError(f"T2T-ViT pools the cls token only; global_pool={global_pool!r} is not supported")
        check_model_args(in_chans, num_classes, embed_dim, depth, num_heads, tokens_type, mlp_ratio, token_dim)
        self.img_size = image_size(img_size)
        self.grid_size = token_grids(self.img_size)[-1]
        self.in_chans = int(in_chans)
        self.num_classes = int(num_classes)
        self.embed_dim = embed_dim
        self.tokens_type = tokens_type
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.pretrained_cfg = self.built_cfg()  # timm's data config of the model (a plain dict, as timm's)

        self.tokens_to_token = self.t2t_module(in_chans, embed_dim, tokens_type, token_dim)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sinusoid_table(num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks, self.num_features = self.make_blocks(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = self.block_feature_info()
        self.init_weights()

    def make_blocks(self, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                    drop_path_rate):
        """The backbone: (nn.ModuleList of blocks, width of their output). The dense variant overrides this."""
        rates = drop_path_rates(drop_path_rate, depth)
        blocks = nn.ModuleList(
            self.block_fn(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, rate,
                          attn_layer=self.attn_layer, mlp_layer=self.mlp_layer)
            for rate in rates)
        return blocks, embed_dim

    def block_output_widths(self):
        """The channel count of each entry of ``self.blocks``' output."""
        return [self.embed_dim] * len(self.blocks)

    def norm_width(self):
        """The width the final norm takes (None once pruned to Identity)."""
        return self.norm.normalized_shape[0] if isinstance(self.norm, nn.LayerNorm) else None

    def block_feature_info(self):
        """timm's ``feature_info``: one entry per backbone block, on the 1/16 token grid."""
        stride = 1
        for _, split_stride, _ in SOFT_SPLITS:
            stride *= split_stride
        return [dict(module=f"blocks.{i}", num_chs=width, reduction=stride)
                for i, width in enumerate(self.block_output_widths())]

    # ------------------------------------------------------------------------------- timm-style model API
    def built_cfg(self, variant=None):
        """The timm-style pretrained config of this model as built (its input size, classes, first layer), of
        ``variant`` when it was built by name: what ``pretrained_cfg`` starts as."""
        return registry.pretrained_cfg(variant, self.in_chans, self.img_size, self.num_classes,
                                       not self.dynamic_img_size, self.tokens_type)

    @property
    def default_cfg(self):
        """timm's older name of ``pretrained_cfg`` (the same dict; assigning either sets both)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg):
        self.pretrained_cfg = cfg

    @property
    def head_hidden_size(self):
        return self.num_features

    def init_weights(self):
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_module_weights)

    def no_weight_decay(self):
        """Parameter names excluded from weight decay (pos_embed and w are buffers, not trained at all)."""
        return {"cls_token"}

    def group_matcher(self, coarse=False):
        """Parameter groups for layer-wise LR decay, as timm's ViT defines them."""
        return dict(stem=r"^cls_token|pos_embed|tokens_to_token",
                    blocks=r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        """Replace the head by a fresh ``Linear(num_features, num_classes)`` (``Identity`` for 0), on the
        model's device and dtype and in its train/eval mode."""
        if global_pool not in (None, "token"):
            raise ValueError(f"T2T-ViT pools the cls token only; global_pool={global_pool!r} is not supported")
        self.num_classes = int(num_classes)
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        if num_classes > 0:
            like = self.cls_token
            self.head = nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
            init_module_weights(self.head)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)

    def set_grad_checkpointing(self, enable=True):
        """Checkpoint every backbone block in training (recompute activations in backward)."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------------------------------ forward
    def forward_tokens(self, x):
        """The image as the backbone's input tokens (B, 1 + N, embed_dim): T2T module, cls token, positions."""
        if torch.jit.is_scripting():
            check_image_layout(x, self.in_chans, self.img_size, self.dynamic_img_size)
        else:
            check_image(x, self.in_chans, self.img_size, self.dynamic_img_size, self.cls_token.dtype)
        x = self.tokens_to_token(x)
        # cat/add promote: under autocast the residual stream stays in the parameters' fp32, as upstream
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(add_position_embedding(x, self.pos_embed, self.dynamic_img_size))

    def checkpointing(self):
        """Whether blocks are checkpointed now: enabled, in training, with grad (never in TorchScript)."""
        return self.grad_checkpointing and self.training and torch.is_grad_enabled()

    def forward_features(self, x):
        """All tokens (B, 1 + N, num_features) after the final norm."""
        x = self.forward_tokens(x)
        for block in self.blocks:
            if torch.jit.is_scripting():
                x = block(x)
            elif self.checkpointing():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        """Classifier on the cls token of ``forward_features``' output; ``pre_logits`` returns it unclassified."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------------------ backbone features
    @torch.jit.ignore
    def forward_intermediates(self, x, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Block outputs for dense prediction, with timm's semantics.

        Args:
            x: images (B, in_chans, H, W).
            indices: None for every block, an int n for the last n, or a list of block indices.
            return_prefix_tokens: pair each intermediate with its cls token (B, 1, C).
            norm: apply the final norm to the intermediates (only to outputs of its width).
            stop_early: stop after the last block taken (the final output is then that block's).
            output_fmt: ``'NCHW'`` (B, C, H/16, W/16) maps on the token grid, or ``'NLC'`` (B, N, C) tokens.
            intermediates_only: return only the list of intermediates.

        Returns:
            ``(final normed tokens (B, 1 + N, num_features), [intermediates])``, or the list alone.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.blocks), indices)
        widths, norm_width = self.block_output_widths(), self.norm_width()
        if norm and norm_width is not None and any(widths[i] != norm_width for i in take):
            raise ValueError(f"norm=True: the final norm takes {norm_width} channels; blocks "
                             f"{[i for i in take if widths[i] != norm_width]} output others")
        if stop_early and not intermediates_only and norm_width not in (None, widths[last]):
            raise ValueError(f"stop_early=True: block {last} outputs {widths[last]} channels, which the final norm "
                             f"({norm_width}) cannot take; pass intermediates_only=True")
        images = x
        x = self.forward_tokens(images)
        grid = token_grids(tuple(images.shape[-2:]))[-1]
        blocks = self.blocks[:last + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointing() else block(x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        prefixes = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefixes))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Drop the blocks after the last of ``indices`` (timm's semantics); ``prune_norm`` replaces the final
        norm by Identity, ``prune_head`` the head. Returns the block indices kept, as a list."""
        take, last = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        width = self.block_output_widths()[-1]
        if prune_norm or self.norm_width() not in (None, width):
            self.norm = nn.Identity()  # also when the norm's width no longer fits the last block (dense family)
        if width != self.num_features:
            if not prune_head:
                raise ValueError(f"the head takes {self.num_features} features but block {last} outputs {width}; "
                                 f"pass prune_head=True")
            self.num_features = width
        self.feature_info = self.block_feature_info()
        if prune_head:
            self.reset_classifier(0)
        return take
