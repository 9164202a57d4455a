"""The fast T2T-ViT: the reference's module tree, parameters and init, running fused forwards.

Every class here subclasses its :mod:`t2t_fast.reference` twin for the constructor and defines only the
forward it fuses; what has nothing to fuse (blocks, MLPs, drop-path, the backbone loop) is the reference's.
Per T2T stage the unfolded tokens never exist for long: the soft split + ``norm1`` LayerNorm is one fused op
reading the previous stage's tokens in place, FAVOR+ reads k/q/v as strided views of the ``kqv`` output,
and in training the split+LN+projection is recomputed in backward instead of keeping the (B, L, 147/576)
tensors alive. The backbone uses ``F.scaled_dot_product_attention``.
Backends: see :mod:`t2t_fast.backend` (``backend=`` here sets the model's default).
"""
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from t2t_fast import ops, reference
from t2t_fast.backend import check_backend_name
from t2t_fast.geometry import SOFT_SPLITS, token_grids
from t2t_fast.reference import layers


def autocast_dtype(x):
    """The dtype autocast gives the projection after a soft split of ``x`` (None outside autocast): the split
    writes its rows in it directly, instead of fp32 rows (the first split reads the fp32 image) and a cast."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype == torch.float32:
        return torch.get_autocast_dtype(device)
    return None


class _FusedSoftSplit:
    """Mixin of the fused T2T layers: they start from the previous stage's output (an NCHW image or
    (B, H*W, C) tokens) and apply soft split + ``norm1`` + the input projection as one recomputable unit."""

    backend = None

    def _split_norm_project(self, x, split, grid_size):
        kernel, stride, padding = split
        tokens = ops.soft_split_layernorm(x, kernel, stride, padding, self.norm1.weight, self.norm1.bias,
                                          self.norm1.eps, grid_size=grid_size, backend=self.backend,
                                          out_dtype=autocast_dtype(x))
        return self.input_projection()(tokens)

    def split_norm_project(self, x, split, grid_size):
        if self.training and torch.is_grad_enabled():
            # Keep only the stage input for backward; the unfolded (B, L, C*k*k) rows are recomputed.
            return torch.utils.checkpoint.checkpoint(self._split_norm_project, x, split, grid_size,
                                                     use_reentrant=False)
        return self._split_norm_project(x, split, grid_size)


class TokenPerformer(_FusedSoftSplit, layers.TokenPerformer):
    """Performer T2T layer: fused soft split + LN -> kqv -> FAVOR+ on strided k/q/v -> proj + v-skip -> MLP."""

    def input_projection(self):
        return self.kqv

    def forward(self, x, split, grid_size=None):
        """``x``: the stage input, ``split``: its (kernel, stride, padding), ``grid_size``: its token grid when
        ``x`` holds tokens (None for an image)."""
        k, q, v = self.split_norm_project(x, split, grid_size).split(self.emb, dim=-1)
        y = ops.favor_attention(k, q, v, self.w, eps=self.eps, backend=self.backend)
        y = v + self.dp(self.proj(y))
        return y + self.mlp(self.norm2(y))


class TokenTransformer(_FusedSoftSplit, layers.TokenTransformer):
    """Transformer T2T layer: fused soft split + LN -> qkv -> SDPA (one head) -> proj + v-skip -> MLP."""

    def input_projection(self):
        return self.attn.qkv

    def forward(self, x, split, grid_size=None):
        """Arguments as :meth:`TokenPerformer.forward`."""
        q, k, v = self.split_norm_project(x, split, grid_size).split(self.attn.in_dim, dim=-1)
        y = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                           dropout_p=self.attn.attn_drop.p if self.training else 0.0,
                                           scale=self.attn.scale).squeeze(1)
        y = v + self.attn.proj_drop(self.attn.proj(y))
        return y + self.mlp(self.norm2(y))


class T2TModule(layers.T2TModule):
    """Tokens-to-Token: fused (soft split + LN) T2T layers on token layout, then re-structurize + unfold
    + ``project``."""

    token_layers = {"performer": TokenPerformer, "transformer": TokenTransformer}
    backend = None

    def forward(self, x):
        split0, split1, (kernel, stride, padding) = SOFT_SPLITS
        grids = token_grids(tuple(x.shape[-2:]))
        x = self.attention1(x, split0)                        # image -> (B, H1*W1, token_dim)
        x = self.attention2(x, split1, grid_size=grids[0])    # tokens -> (B, H2*W2, token_dim)
        x = ops.restructurize_unfold(x, grids[1], kernel, stride, padding, backend=self.backend)
        return self.project(x)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def low_precision_on_cpu(x):
    """True for fp16/bf16 maths on CPU: x in half precision, or CPU autocast to it."""
    if x.device.type != "cpu":
        return False
    return x.dtype in _LOW_PRECISION or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") in _LOW_PRECISION)


def split_heads(qkv, num_heads):
    """(B, T, 3D) -> q, k, v as (B, H, T, D/H) views.

    Unbinding the (B, T, 3, H, Dh) view makes the stack of dq, dk, dv in backward the qkv layout already
    (permuting first would cost one more copy of the qkv gradient per block)."""
    batch, tokens, _ = qkv.shape
    return (t.transpose(1, 2) for t in qkv.view(batch, tokens, 3, num_heads, -1).unbind(2))


def attend(q, k, v, attn_drop, scale, training):
    """Softmax attention of (B, H, T, d) heads -> (B, T, H*d): ``F.scaled_dot_product_attention`` (flash /
    memory-efficient kernels), except in fp16/bf16 on CPU, where torch's flash kernel is slower than a plain
    matmul + softmax at the backbone's 197 tokens (see bench/RESULTS.md), so the attention matrix is formed
    as in the reference."""
    if low_precision_on_cpu(q):
        y = attn_drop(((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)) @ v
    else:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop.p if training else 0.0, scale=scale)
    return y.transpose(1, 2).flatten(2)


class Attention(layers.Attention):
    """Multi-head self-attention through :func:`attend`."""

    def forward(self, x):
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        return self.proj_drop(self.output(attend(q, k, v, self.attn_drop, self.scale, self.training)))


class T2TViT(reference.T2TViT):
    """T2T-ViT with fused kernels. Arguments as the official ``T2T_ViT`` (see
    :class:`t2t_fast.reference.T2TViT`) plus:

    * ``img_size`` may be an int or (H, W); any size for which the three soft splits are defined.
    * ``dynamic_img_size=True`` accepts other input sizes too (the sinusoid table is built for the grid).
    * ``backend``: ``'auto'`` (default), ``'triton'``, ``'cuda'``, ``'cpp'`` or ``'torch'`` (see
      :mod:`t2t_fast.backend`); also settable later with :meth:`set_backend`.
    """

    t2t_module = T2TModule
    attn_layer = Attention

    def __init__(self, *args, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_backend(backend)

    def set_backend(self, backend):
        """Select the kernels this model runs (None: ``T2T_FAST_BACKEND`` or auto)."""
        self.backend = check_backend_name(backend)
        for module in self.tokens_to_token.modules():
            if hasattr(module, "backend"):
                module.backend = self.backend
        return self
